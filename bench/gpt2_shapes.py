"""GPT-2's real shapes, end to end through the entry points: time and peak memory of each route.

    .venv/bin/python -m bench.gpt2_shapes                 # GPT-2 small (12 × 768, vocabulary 50257, 1024 positions)
    .venv/bin/python -m bench.gpt2_shapes --eval_blocks 8

A randomly initialised GPT-2 small (offline; GPT-2's tokenizer built from its vocabulary files in ../shared/data)
is cut to 6 layers by truncate.py; then one optimiser step of train.py and one of distiller.py (that teacher, the
paper's loss weights) at batch 1 × 1024, and evaluate.py over a few blocks of 1024. There is no baseline: the row
is there so that a change that breaks or bloats the real shapes shows here before a GPU box sees it.

Each route runs its entry point's ``main`` in a fresh process (as ``bench.stages`` does): the memory is that
process's peak resident set (the peak allocated GPU memory on a GPU), the time is the route's own figure (the
Trainer's ``train_runtime`` of its one step, evaluate.py's ``runtime_seconds``, truncate.py's wall time).
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.stages import REPO, SHARED_DATA, peak_memory, prepare, run_side

ROUTES = ("truncate", "train", "distil", "eval")


def training_flags(spec, output_dir):
    return ["--dataset_dir", spec["tokens"], "--block_size", str(spec["block_size"]),
            "--per_device_train_batch_size", str(spec["batch_size"]), "--max_steps", "1",
            "--output_dir", output_dir, "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--logging_steps", "1000", "--seed", "0", *spec["precision_flags"]]


def train_runtime(output_dir):
    return json.loads((Path(output_dir) / "train_results.json").read_text())["train_runtime"]


def side_truncate(spec):
    from lmcompress.truncation import main

    start = time.perf_counter()
    main(["--teacher_name_or_path", spec["model"], "--strategy", "alt", "--num_layers", str(spec["student_layers"]),
          "--output_dir", spec["student"]])
    return {"seconds": time.perf_counter() - start}


def side_train(spec):
    from lmcompress.training import main

    output_dir = str(Path(spec["work"]) / "train")
    main(["--model_name_or_path", spec["student"], *training_flags(spec, output_dir)])
    return {"seconds": train_runtime(output_dir), "tokens": spec["batch_size"] * spec["block_size"]}


def side_distil(spec):
    from lmcompress.distillation import main

    output_dir = str(Path(spec["work"]) / "distil")
    main(["--teacher_name_or_path", spec["model"], "--student_name_or_path", spec["student"],
          *training_flags(spec, output_dir)])
    return {"seconds": train_runtime(output_dir), "tokens": spec["batch_size"] * spec["block_size"]}


def side_eval(spec):
    from lmcompress.evaluation import main

    output_file = Path(spec["work"]) / "eval.json"
    main(["--model_name_or_path", spec["student"], "--dataset_dir", spec["tokens"], "--split", "test",
          "--block_size", str(spec["block_size"]), "--per_device_eval_batch_size", str(spec["eval_batch_size"]),
          "--output_file", str(output_file), "--report_to", "none",
          *[flag for flag in spec["precision_flags"] if flag != "--fp16"]])
    result = json.loads(output_file.read_text())
    return {"seconds": result["runtime_seconds"], "tokens": result["n_tokens"]}


SIDES = {"truncate": side_truncate, "train": side_train, "distil": side_distil, "eval": side_eval}


def saved_bytes(model, input_ids, autocast_dtype):
    """Bytes of the distinct storages autograd saves for the backward during one forward of ``model``."""
    import torch

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        model(input_ids=input_ids)
    return sum(storages.values())


def activation_bytes(cli, pure_bf16):
    """Activation memory of one GPT-2 block per token at ``block_size`` tokens: what autograd saves, in train mode,
    under bfloat16 autocast (torch.amp, fp32 weights) or with bfloat16 weights. The slope over batch and depth cancels
    the weights' and embeddings' share. Attention dropout is off (on GPUs the flash kernel applies it without
    storing a mask), the other dropouts are on (each stores a mask)."""
    import torch
    from transformers import GPT2Config, GPT2Model

    def measure(n_layer, batch):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=256, n_positions=cli.block_size, n_embd=cli.n_embd, n_layer=n_layer,
                            n_head=cli.n_embd // 64, attn_pdrop=0.0)
        model = GPT2Model(config).train()
        if pure_bf16:
            model = model.to(torch.bfloat16)
        input_ids = torch.randint(0, 256, (batch, cli.block_size))
        return saved_bytes(model, input_ids, None if pure_bf16 else torch.bfloat16)

    per_layer = [measure(2, batch) - measure(1, batch) for batch in (1, 2)]
    return (per_layer[1] - per_layer[0]) / cli.block_size


# ------------------------------------------------------------------------------- computed memory per GPU

PAPER_ROUTES = [  # (route, trained layers, teacher layers, per-GPU batch) at the scripts' defaults, 1024 tokens
    ("train.sh: fine-tune GPT-2 small", 12, 0, 8),
    ("train.sh: fine-tune a 6-layer student", 6, 0, 8),
    ("pretrain.sh: pre-train the 6-layer student", 6, 0, 16),
    ("distil.sh: distil GPT-2 small into 6 layers", 6, 12, 4),
]


def gpt2_parameters(n_layer, h=768, vocab=50257, positions=1024):
    """Embeddings (the output layer shares them), per block 12h² + 13h (attention, MLP, two LayerNorms), final LN."""
    return vocab * h + positions * h + n_layer * (12 * h * h + 13 * h) + 2 * h


def reduce_buckets_bytes():
    """GPU memory of ZeRO-2's gradient reduce buckets in ds_config.json: one bucket of 16-bit elements, two with
    overlap_comm (DeepSpeed allocates them whole, whatever the model's size)."""
    zero = json.loads((REPO / "ds_config.json").read_text())["zero_optimization"]
    return 2 * int(zero["reduce_bucket_size"]) * (2 if zero.get("overlap_comm") else 1)


def memory_per_gpu(layers, teacher_layers, batch, k_amp, k_16bit, offload, block=1024, h=768, vocab=50257):
    """Bytes per GPU by part. Without ZeRO: torch.amp (fp32 weights, gradients and Adam moments, and the 16-bit
    weight copies autocast keeps for the backward). ZeRO-2 with CPU offload: 16-bit weights and the reduce buckets on
    the GPU; fp32 weights, gradients and Adam moments in CPU memory. Activations: the measured bytes per token per
    layer. Output layer: train.py's fused loss keeps only float32 gradients of the output matrix and of the last
    hidden states from its forward to its backward; distillation holds the student's and the teacher's 16-bit
    logits and the student's logit gradient. The teacher: 16-bit weights, no activations kept (no gradients)."""
    n = gpt2_parameters(layers)
    if offload:
        parts = {"weights": 2 * n, "gradients": reduce_buckets_bytes(), "adam": 0,
                 "activations": k_16bit * layers * batch * block}
    else:
        parts = {"weights": 4 * n + 2 * n, "gradients": 4 * n, "adam": 8 * n,
                 "activations": k_amp * layers * batch * block}
    if teacher_layers:
        parts["output layer"] = 3 * 2 * batch * block * vocab
        parts["teacher"] = 2 * gpt2_parameters(teacher_layers)
    else:
        parts["output layer"] = 4 * vocab * h + 4 * batch * block * h
        parts["teacher"] = 0
    return parts


PARTS = ("weights", "gradients", "adam", "activations", "output layer", "teacher")


def memory_table(k_amp, k_16bit):
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lines = ["| route | batch | ZeRO-2 offload | " + " | ".join(PARTS) + " | total GiB |",
             "|---" * (len(PARTS) + 4) + "|"]
    for route, layers, teacher_layers, batch in PAPER_ROUTES:
        for offload in (False, True):
            parts = memory_per_gpu(layers, teacher_layers, batch, k_amp, k_16bit, offload)
            lines.append(f"| {route} | {batch}x1024 | {'yes' if offload else 'no'} | "
                         + " | ".join(gib(parts[name]) for name in PARTS) + f" | {gib(sum(parts.values()))} |")
    return "\n".join(lines)


def default_precision():
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def run(cli):
    work = Path(tempfile.mkdtemp(prefix="bench-gpt2-shapes-"))
    try:
        spec = prepare(work, argparse.Namespace(**vars(cli), eval_block_size=cli.block_size,
                                                window_tokens=cli.block_size))
        precision = cli.precision or default_precision()
        spec.update(student=str(work / "student"), precision=precision,
                    precision_flags=[] if precision == "fp32" else [f"--{precision}"])
        return {route: run_side(route, spec, "bench.gpt2_shapes") for route in ROUTES}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rows(results, cli):
    """Rows of the summary table (see bench.__main__): no baseline, time and peak memory per route."""
    shape = f"{cli.n_layer}x{cli.n_embd} GPT-2"
    student = f"{cli.student_layers}x{cli.n_embd}"
    batch = f"batch {cli.batch_size}x{cli.block_size}"
    labels = {"truncate": f"(f) truncate.py, {shape} -> {cli.student_layers} layers",
              "train": f"(f) train.py step, {student}, {batch}",
              "distil": f"(f) distiller.py step, {shape} -> {student}, {batch}",
              "eval": f"(f) evaluate.py, {student}, {cli.eval_blocks} blocks of {cli.block_size}"}
    out = []
    for route, result in results.items():
        unit = "s" if route in ("truncate", "eval") else "s/step"
        out.append({"stage": labels[route], "baseline": "-", "unit": unit, "ours": result["seconds"], "base": None,
                    "speedup": None, "ours_mb": result["peak_mb"], "base_mb": None, "memory": result["memory"],
                    "tokens_per_second": result["tokens"] / result["seconds"] if "tokens" in result else None})
    return out


def parser():
    parser = argparse.ArgumentParser(prog="python -m bench.gpt2_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--n_layer", type=int, default=12, help="teacher depth")
    parser.add_argument("--n_embd", type=int, default=768, help="hidden size (a multiple of 64)")
    parser.add_argument("--student_layers", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--eval_blocks", type=int, default=4)
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                        help="default: fp32 on CPU, bf16 on GPUs that support it, else fp16")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    cli = parser().parse_args(argv)
    if cli.side:
        result = SIDES[cli.side](json.loads(cli.spec))
        print(json.dumps({**result, **peak_memory()}), flush=True)
        return None
    if not (SHARED_DATA / "gpt2-tokenizer").exists():
        raise SystemExit(f"{SHARED_DATA} is not present: the benchmark reads GPT-2's tokenizer files from there")
    table = rows(run(cli), cli)
    for row in table:
        speed = f", {row['tokens_per_second']:,.0f} tokens/s" if row["tokens_per_second"] else ""
        print(f"{row['stage']}: {row['ours']:.2f} {row['unit']}{speed}, peak {row['ours_mb']:,.0f} MB "
              f"({row['memory']})", flush=True)
    amp, pure = (activation_bytes(cli, pure_bf16) for pure_bf16 in (False, True))
    note = (f"activations saved for backward per token per layer at {cli.block_size} positions: {amp:,.0f} bytes "
            f"({amp / cli.n_embd:.1f}·h) with bf16 autocast, {pure:,.0f} bytes ({pure / cli.n_embd:.1f}·h) with bf16 "
            "weights")
    print(note)
    table[ROUTES.index("train")]["note"] = note
    if (cli.n_embd, cli.block_size) == (768, 1024):
        print("\nmemory per GPU at GPT-2 small's size, computed from those activations (GiB; CUDA context and "
              "allocator slack not counted):\n" + memory_table(amp, pure), flush=True)
    return table


if __name__ == "__main__":
    main()
