"""evaluate.py: perplexity of a causal LM on one split, batched, with the windows split across ranks."""
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from . import deepspeed_support
from .cli import parse_dataclass_args
from .data import (DataArguments, check_vocabulary, choose_block_size, plan_tokens, require_planned_split,
                   resolve_token_folder)
from .distributed import COLLECTIVE_TIMEOUT_S, end_process_group, init_distributed, local_main_first
from .errors import UserError, entry_point, require_writable_folder
from .jsonio import write_json
from .models import load_causal_lm, load_config, n_positions
from .perplexity import check_stride, perplexity_from, reduce_sums, stream_nll, window_spans, word_perplexity
from .throughput import evaluation_throughput, peak_gpu_memory
from .tokenfiles import open_split, read_meta
from .vocab import load_tokenizer


@dataclasses.dataclass
class EvaluationArguments:
    model_name_or_path: str = dataclasses.field(default=None, metadata={"help": "hub name or model folder"})
    tokenizer_name: str = dataclasses.field(default=None, metadata={"help": "tokenizer (default: the model's)"})
    split: str = dataclasses.field(default="test", metadata={"help": "train, validation or test"})
    stride: int = dataclasses.field(default=None, metadata={"help": "window step (default: block size, no overlap)"})
    per_device_eval_batch_size: int = dataclasses.field(default=8, metadata={"help": "windows per forward pass"})
    fp16: bool = dataclasses.field(default=False, metadata={"help": "float16 autocast (CUDA)"})
    bf16: bool = dataclasses.field(default=False, metadata={"help": "bfloat16 autocast"})
    deepspeed: str = dataclasses.field(default=None, metadata={"help": "DeepSpeed config JSON (ZeRO inference)"})
    output_file: str = dataclasses.field(default=None, metadata={"help": "JSON result (default: perplexity.json in the model folder, in the current directory for a hub name)"})
    peak_tflops: float = dataclasses.field(default=None, metadata={"help": "peak TFLOPs per device for the reported "
                                                                           "MFU (default: known GPUs by name)"})
    ddp_timeout: int = dataclasses.field(default=COLLECTIVE_TIMEOUT_S, metadata={
        "help": "seconds a collective waits for a rank that stopped answering before the run fails"})
    report_to: str = dataclasses.field(default="tensorboard", metadata={"help": "tensorboard (events in "
                                       "$TENSORBOARD_LOGGING_DIR, else runs/ beside the output file) or none"})
    local_rank: int = dataclasses.field(default=-1, metadata={"help": "passed by the deepspeed launcher and "
                                        "torch.distributed.launch; the rank itself is read from $LOCAL_RANK"})

    def __post_init__(self):
        if self.report_to not in ("tensorboard", "none"):
            raise UserError(f"--report_to {self.report_to}: evaluate.py reports to tensorboard or none")
        if self.deepspeed:
            deepspeed_support.read_config(self.deepspeed)


def default_output_file(args):
    """``--output_file``, else ``perplexity.json`` in the model's folder (in the current one for a hub model)."""
    if args.output_file:
        return args.output_file
    folder = args.model_name_or_path if os.path.isdir(args.model_name_or_path) else "."
    return os.path.join(folder, "perplexity.json")


def log_to_tensorboard(result, output_file, model_folder):
    """The result's figures as ``{split}/...`` scalars, at the model's training step when it has one, so that they
    sit beside train.py's curves when both write to the model folder's ``runs/``."""
    from torch.utils.tensorboard import SummaryWriter

    logging_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(os.path.dirname(output_file), "runs")
    state_file = os.path.join(model_folder, "trainer_state.json")
    step = json.loads(Path(state_file).read_text())["global_step"] if os.path.isfile(state_file) else 0
    with SummaryWriter(log_dir=logging_dir) as writer:
        for name in ("perplexity", "loss", "word_perplexity", "tokens_per_second", "mfu"):
            if result.get(name) is not None:
                writer.add_scalar(f"{result['split']}/{name}", result[name], step)


def precision_dtype(args, device):
    if args.fp16 and args.bf16:
        raise UserError("give --fp16 or --bf16, not both")
    if args.fp16 and device.type != "cuda":
        raise UserError("--fp16 needs a CUDA GPU; on CPU use --bf16 or full precision")
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None


def load_model(args, config, dtype, device):
    """The model and whether ranks must run in lockstep: ZeRO-3 with ``--deepspeed``, else a copy on each rank.

    ZeRO stages 1 and 2 partition only optimizer state and gradients, so for inference they are a plain copy.
    """
    ds_config = deepspeed_support.read_config(args.deepspeed) if args.deepspeed else None
    if ds_config is None or deepspeed_support.zero_stage(ds_config) < 3:
        return load_causal_lm(config, args.model_name_or_path).to(device), False
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = deepspeed_support.inference_config(ds_config, config.hidden_size, args.per_device_eval_batch_size,
                                                   dtype, f"--deepspeed {args.deepspeed}")
    zero3_loading = HfDeepSpeedConfig(ds_config)  # while it lives, from_pretrained partitions the weights as it loads
    model = load_causal_lm(config, args.model_name_or_path)
    del zero3_loading
    return deepspeed_support.zero3_inference(model, ds_config), True


@entry_point
def main(argv=None):
    args, data_args = parse_dataclass_args((EvaluationArguments, DataArguments), "evaluate.py", argv)
    if not args.model_name_or_path:
        raise UserError("--model_name_or_path is required")
    rank, world_size, device = init_distributed(args.ddp_timeout)
    dtype = precision_dtype(args, device)
    tokenizer_name = args.tokenizer_name or args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_name, "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path")
    config = load_config(None, args.model_name_or_path)
    output_file = default_output_file(args)
    if rank == 0:
        require_writable_folder(os.path.dirname(output_file) or ".", "--output_file")
    block_size = choose_block_size(data_args.block_size, n_positions(config))
    stride = block_size if args.stride is None else args.stride
    check_stride(stride, block_size)
    plan = plan_tokens(data_args, tokenizer, tokenizer_name)
    require_planned_split(plan.splits, args.split, data_args, f"--split {args.split}",
                          f"give data with a {args.split} split or choose one of those")
    folder = resolve_token_folder(data_args, tokenizer, tokenizer_name, local_main_first, plan)
    meta = read_meta(folder)
    check_vocabulary(meta, config, str(folder))
    tokens = open_split(folder, args.split, "--split")
    if len(tokens) < 2:
        raise UserError(f"{folder}/{args.split}.bin: fewer than two tokens, nothing to score")
    model, lockstep = load_model(args, config, dtype, device)

    start = time.time()
    nll_sum, n_scored = stream_nll(model, tokens, block_size, stride, args.per_device_eval_batch_size, device, dtype,
                                   rank=rank, world_size=world_size, progress=rank == 0, lockstep=lockstep)
    nll_sum, n_scored = reduce_sums(nll_sum, n_scored, device)
    runtime = time.time() - start
    loss, perplexity = perplexity_from(nll_sum, n_scored)
    split_meta = meta["splits"][args.split]
    result = {
        "perplexity": perplexity, "loss": loss, "n_tokens": n_scored, "block_size": block_size, "stride": stride,
        "model": args.model_name_or_path, "data": str(folder), "split": args.split,
        "word_perplexity": word_perplexity(loss, split_meta["n_tokens"], split_meta.get("n_words")),
        "n_words": split_meta.get("n_words"), "precision": str(dtype or torch.float32).replace("torch.", ""),
        "world_size": world_size, "runtime_seconds": round(runtime, 3),
        # tokens/s of scored tokens; MFU (forward FLOPs of every token fed, windows overlap) when the peak is known
        **evaluation_throughput(model, block_size, n_scored, runtime, args.peak_tflops, world_size,
                                n_fed=len(window_spans(len(tokens), block_size, stride)) * block_size),
        **peak_gpu_memory(),
    }
    if rank == 0:
        write_json(output_file, result)
        if args.report_to == "tensorboard":
            log_to_tensorboard(result, output_file, args.model_name_or_path)
        word = f"  word perplexity {result['word_perplexity']:.2f}" if result["word_perplexity"] else ""
        speed = f"  {result['tokens_per_second']:,.0f} tokens/s"
        speed += f"  MFU {result['mfu']:.1%}" if "mfu" in result else ""
        print(f"perplexity {perplexity:.3f}  loss {loss:.5f}  over {n_scored:,} tokens{word}{speed}  → {output_file}")
    end_process_group()
