"""train.py: fine-tune or pre-train a causal LM on fixed-size blocks with the HuggingFace Trainer.

The Trainer brings torchrun/DDP, DeepSpeed, native mixed precision, exact resume and TensorBoard. This module
adds the project's data (token folders, blocks, each rank its own shard, reshuffled every epoch), a
token-weighted evaluation with perplexity, output-folder safety and the legacy flags users' scripts pass.
"""
import dataclasses
import os
import sys
import time

import torch
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from . import deepspeed_support, faults
from .atomic import move_files_into, remove_stale_staging, staging_path
from .cli import parse_dataclass_args
from .data import (BlockDataset, DataArguments, check_vocabulary, choose_block_size, plan_tokens,
                   require_planned_split, resolve_token_folder)
from .distributed import COLLECTIVE_TIMEOUT_S, local_main_first, start_process_group
from .errors import UserError, entry_point, removed_on_failure, require_writable_folder
from .jsonio import write_json
from .losses import IGNORE_INDEX, summed_nll
from .models import WEIGHTS_NAMES, is_trained_model_folder, load_causal_lm, load_config, n_positions, plain_output_head
from .perplexity import perplexity_from, reduce_sums, stream_nll
from .tokenfiles import open_split, read_meta
from .throughput import ThroughputCallback, count_parameters, peak_gpu_memory
from .vocab import load_tokenizer


@dataclasses.dataclass
class ModelArguments:
    model_name_or_path: str = dataclasses.field(default=None, metadata={"help": "hub name or model folder"})
    config_name: str = dataclasses.field(default=None, metadata={"help": "config JSON or folder: random initialisation"})
    tokenizer_name: str = dataclasses.field(default=None, metadata={"help": "tokenizer (default: the model's)"})


@dataclasses.dataclass
class ProjectTrainingArguments(TrainingArguments):
    """TrainingArguments plus the flags transformers 5 removed that users' scripts still pass."""

    warmup_ratio: float = dataclasses.field(default=None, metadata={"help": "fraction of steps to warm up (alias of a "
                                                                            "fractional --warmup_steps)"})
    overwrite_output_dir: bool = dataclasses.field(default=False, metadata={"help": "allow an output folder that "
                                                                                    "already holds a trained model"})
    report_to: str = dataclasses.field(default="tensorboard", metadata={"help": "tensorboard (default), none, ..."})
    remove_unused_columns: bool = dataclasses.field(default=False, metadata={"help": "keep the blocks' shift_labels"})
    peak_tflops: float = dataclasses.field(default=None, metadata={"help": "peak TFLOPs per device for the logged MFU "
                                                                           "(default: known GPUs by name)"})
    ddp_timeout: int = dataclasses.field(default=COLLECTIVE_TIMEOUT_S, metadata={
        "help": "seconds a collective waits for a rank that stopped answering before the run fails (see distributed)"})
    ddp_find_unused_parameters: bool = dataclasses.field(default=False, metadata={
        "help": "let DDP look for parameters without gradients every step (the Trainer's default; a GPT-2 has none)"})
    skip_nonfinite: bool = dataclasses.field(default=False, metadata={"help": "skip an optimiser step whose loss is "
                                                                              "NaN or infinite on any rank (counted "
                                                                              "as nonfinite_skipped) instead of "
                                                                              "stopping the run"})

    def __post_init__(self):
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
        if self.warmup_ratio:
            if self.warmup_steps:
                raise UserError("give --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        if not torch.cuda.is_available() and not self.deepspeed:
            # Without this, accelerate leaves a torchrun job on CPU undistributed: every rank trains alone.
            self.use_cpu = True
        if isinstance(self.deepspeed, str):
            deepspeed_support.read_config(self.deepspeed)
        try:
            super().__post_init__()
        except ValueError as err:
            raise UserError(" ".join(str(err).split())) from err
        if self.deepspeed:
            deepspeed_support.check_matches_flags(self)
            if self.skip_nonfinite:
                raise UserError("--skip_nonfinite does not work with --deepspeed (the DeepSpeed engine steps the "
                                "optimizer itself); without it a non-finite loss stops the run")


def autocast_dtype(args):
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


class LMTrainer(Trainer):
    """Trainer whose evaluation is the token-weighted NLL over the whole validation stream, with perplexity.

    Its checkpoints are complete or absent, it stops at a non-finite loss (or skips the step) and on SIGTERM
    saves a checkpoint and stops: see ``faults``. Register callbacks that ask for saves before ``checkpoints``.
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises over the whole accumulated batch itself

    def __init__(self, *args, eval_tokens=None, block_size=None, run_info=None, **kwargs):
        # The Trainer only checks that an eval dataset exists; evaluate() reads the token stream itself.
        super().__init__(*args, eval_dataset=eval_tokens, **kwargs)
        self.eval_tokens, self.block_size = eval_tokens, block_size
        self.run_info = run_info or {}  # recorded in eval_results.json
        self.micro_batches_in_step = 1  # of the current optimiser step: see get_batch_samples
        self.nonfinite_guard = faults.NonFiniteGuard(skip=self.args.skip_nonfinite)
        self.preemption = faults.PreemptionCallback()
        self.checkpoints = faults.StagedCheckpoints()
        self.throughput = ThroughputCallback(block_size, self.args.peak_tflops)
        for callback in (self.nonfinite_guard, self.preemption, self.checkpoints, self.throughput):
            self.add_callback(callback)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``, with TensorBoard set up for this run (resumed or not) and a failed save in one line."""
        faults.use_resumable_tensorboard(self, resume_from_checkpoint)
        with self.checkpoints.failed_save_reported(self.args):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Resumed from a checkpoint at --max_steps, the Trainer would still take one step (it compares the step
        # count with --max_steps only after a step) and save a checkpoint past the end: it gets no batch, and stops.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return [], None
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.micro_batches_in_step = len(batches)  # fewer than --gradient_accumulation_steps at an epoch's end
        return batches, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The mean next-token loss; for a plain output layer from the last hidden states, so that the logits of the
        batch (and their gradient) never exist: see ``losses.summed_nll``."""
        targets = inputs["shift_labels"]
        forward_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}
        n_tokens, scale = self.normaliser(targets, num_items_in_batch)
        head = fusable_output_head(self.accelerator.unwrap_model(model))
        if head is None or return_outputs:
            outputs = model(**forward_inputs)
            states, weight = outputs.logits, None
        else:
            outputs = model(**forward_inputs, output_hidden_states=True, logits_to_keep=1)
            states, weight = outputs.hidden_states[-1], head.weight
        # The autocast of the run wraps only model.forward: the output layer's products need it here too.
        precision = autocast_dtype(self.args)
        with torch.autocast(states.device.type, dtype=precision, enabled=precision is not None):
            loss_sum = summed_nll(states.flatten(0, 1), targets.flatten(), weight)
        loss = loss_sum / n_tokens * scale
        return (loss, outputs) if return_outputs else loss

    def normaliser(self, targets, num_items_in_batch):
        """The token count to divide by and the factor to multiply the loss by.

        With ``num_items_in_batch`` (the real tokens of the step's micro-batches, over all ranks when
        ``average_tokens_across_devices``), the sums are divided by it and multiplied by the number of ranks,
        since DDP averages the ranks' gradients. Without it, each micro-batch is averaged over its own tokens and
        divided by the accumulation steps: exact when every micro-batch holds as many tokens, as blocks do.
        """
        if num_items_in_batch is None:
            local = (targets != IGNORE_INDEX).sum()
            return local * self.micro_batches_in_step, 1
        across_ranks = self.args.average_tokens_across_devices and self.accelerator.num_processes > 1
        return num_items_in_batch, self.accelerator.num_processes if across_ranks else 1

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.observe(loss)
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self.nonfinite_guard.skipped:
            logs["nonfinite_skipped"] = self.nonfinite_guard.skipped
        self.throughput.add_figures(self.args, self.state, logs)  # before any callback reads the logs
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.eval_tokens is None:
            raise UserError("evaluation asked for, but the data has no validation split: give --validation_file")
        start = time.time()
        nll_sum, n_scored = stream_nll(self.model, self.eval_tokens, self.block_size, self.block_size,
                                       self.args.per_device_eval_batch_size, self.args.device, autocast_dtype(self.args),
                                       rank=self.args.process_index, world_size=self.args.world_size,
                                       lockstep=is_deepspeed_zero3_enabled())
        nll_sum, n_scored = reduce_sums(nll_sum, n_scored, self.args.device)
        loss, perplexity = perplexity_from(nll_sum, n_scored)
        runtime = time.time() - start
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_perplexity": perplexity,
                   f"{metric_key_prefix}_n_tokens": n_scored, f"{metric_key_prefix}_runtime": round(runtime, 4),
                   f"{metric_key_prefix}_tokens_per_second": round(n_scored / max(runtime, 1e-9), 1)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def fusable_output_head(model):
    """The output layer whose loss ``summed_nll`` can compute from the last hidden states (a plain linear map,
    whole on this rank: not under ZeRO-3), else None."""
    return None if is_deepspeed_zero3_enabled() else plain_output_head(model)


def check_output_dir(args):
    """Refuse to train over a trained model unless told to overwrite or resume."""
    if args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    if is_trained_model_folder(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} already holds a trained model: pass --overwrite_output_dir "
                        "to train over it, --resume_from_checkpoint to continue it, or choose another folder")


def resolve_resume(args):
    """``--resume_from_checkpoint`` PATH, or ``latest`` (the newest complete checkpoint, required) or ``auto`` (if any)."""
    wanted = args.resume_from_checkpoint
    if not wanted:
        return None
    if wanted.lower() in ("auto", "latest", "true"):
        last = faults.latest_complete_checkpoint(args.output_dir)
        if last is None and wanted.lower() != "auto":
            raise UserError(f"--resume_from_checkpoint {wanted}: no complete checkpoint-* folder in {args.output_dir}")
        return last
    if not os.path.isdir(wanted):
        raise UserError(f"--resume_from_checkpoint {wanted}: no such checkpoint folder")
    return wanted


def check_precision(args):
    if args.fp16 and not torch.cuda.is_available():
        raise UserError("--fp16 needs a CUDA GPU; on CPU use --bf16 or full precision")


@dataclasses.dataclass
class PreparedData:
    folder: str
    block_size: int
    train_dataset: BlockDataset
    eval_tokens: object


def prepare_data(data_args, tokenizer, tokenizer_name, config, eval_strategy="no", what="the data"):
    """The blocks to train on and the validation tokens; every split the run needs (train, and validation when
    ``eval_strategy`` evaluates during training) is checked before anything is tokenized."""
    block_size = choose_block_size(data_args.block_size, n_positions(config))
    plan = plan_tokens(data_args, tokenizer, tokenizer_name)
    require_planned_split(plan.splits, "train", data_args)
    if eval_strategy != "no":
        require_planned_split(plan.splits, "validation", data_args, f"--eval_strategy {eval_strategy}",
                              "give --validation_file (or a --validation_split_percentage to carve one from train) "
                              "or --eval_strategy no")
    folder = resolve_token_folder(data_args, tokenizer, tokenizer_name, local_main_first, plan)
    meta = read_meta(folder)
    check_vocabulary(meta, config, what)
    train_dataset = BlockDataset(folder, "train", block_size)
    eval_tokens = open_split(folder, "validation") if "validation" in meta["splits"] else None
    if eval_tokens is not None and len(eval_tokens) < 2:
        eval_tokens = None
    return PreparedData(str(folder), block_size, train_dataset, eval_tokens)


def save_final_model(trainer, output_dir):
    """Save the model and tokenizer into a staging folder, then move its files into ``output_dir``. That folder also
    holds the checkpoints, so it cannot be replaced whole; instead the weights are the last files moved in
    (``atomic.move_files_into``): a kill at any moment leaves the previous model, no weights, or the whole new
    model, never new weights beside older versions of the files saved with them."""
    staging = staging_path(os.path.join(output_dir, "final-model"))
    if trainer.is_world_process_zero():
        remove_stale_staging(output_dir)  # a staging folder of a killed run would add its files to this save
    trainer.accelerator.wait_for_everyone()
    with removed_on_failure(staging, output_dir, faults.save_failure_message(output_dir, "the final model")):
        trainer.save_model(staging)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        move_files_into(staging, output_dir, WEIGHTS_NAMES)
    trainer.accelerator.wait_for_everyone()


def train_and_evaluate(trainer, resume):
    """Train, save the final model, evaluate, and write ``train_results.json`` / ``eval_results.json``."""
    training_args = trainer.args
    result = trainer.train(resume_from_checkpoint=resume)
    faults.exit_if_preempted(trainer, trainer.preemption)
    save_final_model(trainer, training_args.output_dir)
    tokens_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                       * training_args.world_size * trainer.block_size)
    metrics = {**result.metrics, "train_tokens": trainer.state.global_step * tokens_per_step,
               "n_parameters": count_parameters(trainer.model), **peak_gpu_memory()}
    if trainer.is_world_process_zero():
        write_json(os.path.join(training_args.output_dir, "train_results.json"), metrics)
        write_json(os.path.join(training_args.output_dir, "trainer_state.json"), dataclasses.asdict(trainer.state))
    if training_args.do_eval and trainer.eval_tokens is not None:
        eval_metrics = trainer.evaluate()
        eval_results = {**eval_metrics, "perplexity": eval_metrics["eval_perplexity"],
                        **trainer.run_info}
        if trainer.is_world_process_zero():
            write_json(os.path.join(training_args.output_dir, "eval_results.json"), eval_results)
            print(f"eval_loss {eval_results['eval_loss']:.4f}  perplexity {eval_results['perplexity']:.2f}")
    return metrics


def prepare_run(training_args):
    """Checks and environment shared by every training entry point; returns the checkpoint to resume from."""
    check_precision(training_args)
    check_output_dir(training_args)
    require_writable_folder(training_args.output_dir, "--output_dir")
    set_seed(training_args.seed)
    return resolve_resume(training_args)


def parse_training_flags(dataclass_types, prog, argv=None):
    """Start the process group of a multi-process job (``start_process_group``), then parse the flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return parse_dataclass_args(dataclass_types, prog, argv, defaults=start_process_group(argv, prog))


def build_trainer(argv=None):
    """Parse train.py's flags and build its LMTrainer; returns ``(trainer, checkpoint_to_resume)``."""
    model_args, data_args, training_args = parse_training_flags(
        (ModelArguments, DataArguments, ProjectTrainingArguments), "train.py", argv)
    resume = prepare_run(training_args)
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_name is None:
        raise UserError("--tokenizer_name is required with --config_name (no model folder to take it from)")
    tokenizer = load_tokenizer(tokenizer_name, "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    config = load_config(model_args.config_name, model_args.model_name_or_path)
    data = prepare_data(data_args, tokenizer, tokenizer_name, config, training_args.eval_strategy.value)
    model = load_causal_lm(config, None if model_args.config_name else model_args.model_name_or_path)
    trainer = LMTrainer(model=model, args=training_args, train_dataset=data.train_dataset,
                        data_collator=default_data_collator, processing_class=tokenizer,
                        eval_tokens=data.eval_tokens, block_size=data.block_size,
                        run_info={"block_size": data.block_size, "data": data.folder})
    return trainer, resume


@entry_point
def main(argv=None):
    trainer, resume = build_trainer(argv)
    train_and_evaluate(trainer, resume)
