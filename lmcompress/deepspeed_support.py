"""DeepSpeed configs (read with one-line errors, filled for inference) and ZeRO-3 inference for frozen models.

Training goes through the HuggingFace Trainer's DeepSpeed integration, which fills the configs' "auto"
values from the flags. Inference has no Trainer, so ``inference_config`` fills them here.
"""
import copy
import json
import os

import torch

from . import coupling
from .errors import UserError


def read_config(path, flag="--deepspeed"):
    """The config as a dict, or a one-line error for a missing, malformed or non-object file."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such DeepSpeed config file")
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise UserError(f"{flag} {path}: expected a JSON object of DeepSpeed settings")
    return config


def zero_stage(config):
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_matches_flags(training_args):
    """Refuse values the config states that contradict the flags (the Trainer would raise deep inside train())."""
    mismatches = coupling.deepspeed_mismatches(training_args)
    if mismatches:
        raise UserError(f"--deepspeed {training_args.deepspeed} contradicts the flags: {'; '.join(mismatches)}; set "
                        "these to \"auto\" in the config or make them agree")


def _hidden_size_defaults(hidden_size):
    """What the Trainer puts for these "auto" values (transformers' trainer_config_finalize)."""
    return {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}


def _auto_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield prefix + key


def inference_config(config, hidden_size, micro_batch_size, dtype, path="--deepspeed"):
    """A training config turned into an inference one: no optimizer or schedule, "auto" values filled."""
    config = copy.deepcopy(config)
    for key in ("optimizer", "scheduler", "gradient_clipping", "train_batch_size"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    for key, value in _hidden_size_defaults(hidden_size).items():
        if zero.get(key) == "auto":
            zero[key] = value
    config["fp16"] = {**config.get("fp16", {}), "enabled": dtype == torch.float16}
    config["bf16"] = {**config.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = 1
    left = list(_auto_keys(config))
    if left:
        raise UserError(f"{path}: cannot fill \"auto\" for {', '.join(left)} without a Trainer: give numbers")
    return config


def zero3_inference(model, config):
    """A DeepSpeed engine for ZeRO-3 inference: each forward gathers the parameters it needs, layer by layer.

    Call the engine as the model (it holds the hooks' state, so keep it). Every rank must run the same number
    of forward passes. Load the model while an ``HfDeepSpeedConfig`` (or the Trainer's ZeRO-3 arguments) is
    alive, so that it is partitioned as it loads and never held whole.
    """
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def frozen_teacher(teacher, training_args, dtype):
    """A distillation teacher for the Trainer's run: frozen, in eval mode, in the run's precision.

    Under ZeRO-3 it is partitioned like the student and runs as ZeRO inference, since ZeRO-3 is the choice for
    models that do not fit one GPU and the teacher is the larger model; every rank calls it once per micro-batch,
    which keeps the ranks in lockstep. Otherwise each rank holds a copy.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    teacher.requires_grad_(False)
    if not is_deepspeed_zero3_enabled():
        return teacher.to(training_args.device, dtype=dtype).eval()
    config = inference_config(coupling.deepspeed_config(training_args), teacher.config.hidden_size,
                              training_args.per_device_train_batch_size, dtype)
    return zero3_inference(teacher, config)
