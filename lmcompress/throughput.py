"""Tokens per second and model FLOPs utilisation (MFU), logged every logging step by a TrainerCallback.

FLOPs per token follow nanoGPT (PaLM appendix B): 6·N + 12·L·H·Q·T for a training step (forward and backward),
with N the parameters, L layers, H heads, Q the head size and T the block length; a forward pass alone is a
third of that (evaluation). MFU = achieved FLOPs/s / peak FLOPs/s of the device(s). The peak comes from
``--peak_tflops`` (per device), else from a table of known GPUs by ``torch.cuda.get_device_name``; on CPU and
unknown devices only tokens/s is reported unless ``--peak_tflops`` is given.
"""
import time

import torch
from transformers import TrainerCallback

# Dense peak TFLOPs per GPU for bf16/fp16 tensor cores (float32: the TF32 figure), without sparsity.
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0), ("A10G", 125.0),
    ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("A6000", 155.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_tflops_for(device_name):
    """Peak dense TFLOPs of a GPU from its name (the first table entry it contains), or None when unknown."""
    name = (device_name or "").upper()
    for key, tflops in PEAK_TFLOPS:
        if key.upper() in name:
            return tflops
    return None


def device_peak_tflops(given=None):
    """``given`` (``--peak_tflops``) when set, else the table's figure for this CUDA device, else None."""
    if given:
        return float(given)
    if torch.cuda.is_available():
        return peak_tflops_for(torch.cuda.get_device_name())
    return None


def count_parameters(model):
    """Parameters of the model, also when ZeRO-3 has partitioned them (``ds_numel`` is the full size)."""
    return sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in model.parameters())


def flops_per_token(config, n_parameters, block_size, training=True):
    """nanoGPT's estimate: 6·N + 12·L·H·Q·T per trained token; a third of it per forward-only token."""
    n_layer = getattr(config, "n_layer", None) or config.num_hidden_layers
    n_head = getattr(config, "n_head", None) or config.num_attention_heads
    hidden = getattr(config, "n_embd", None) or config.hidden_size
    flops = 6 * n_parameters + 12 * n_layer * n_head * (hidden // n_head) * block_size
    return flops if training else flops / 3


def mfu(tokens_per_second, flops_token, peak_tflops, n_devices=1):
    """Model FLOPs utilisation in [0, 1], or None without a peak."""
    if not peak_tflops:
        return None
    return tokens_per_second * flops_token / (peak_tflops * 1e12 * n_devices)


class ThroughputCallback(TrainerCallback):
    """Measures ``tokens_per_second`` (all ranks) and, when the peak is known, ``mfu`` between logging steps, on the
    host clock (no device synchronisation is added to the loop); ``add_figures`` puts them into a training log, which
    the trainer calls before the callbacks (TensorBoard, stdout) see it. ``extra_flops``: returns the FLOPs per
    token spent outside the trained model (e.g. a distillation teacher's forward), called once the model is placed."""

    def __init__(self, block_size, peak_tflops=None, extra_flops=None):
        self.block_size, self.peak_tflops, self.extra_flops = block_size, peak_tflops, extra_flops
        self.extra_flops_per_token = 0.0
        self.flops_token, self._start, self._step = None, None, 0

    def tokens_per_step(self, args):
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * self.block_size

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.peak_tflops = device_peak_tflops(self.peak_tflops or getattr(args, "peak_tflops", None))
        if model is not None:
            self.flops_token = flops_per_token(model.config, count_parameters(model), self.block_size)
            if self.extra_flops is not None:
                self.extra_flops_per_token = self.extra_flops()
        self._start, self._step = time.perf_counter(), state.global_step

    def add_figures(self, args, state, logs):
        if self._start is None or "loss" not in logs or state.global_step <= self._step:
            return
        now = time.perf_counter()
        tokens = (state.global_step - self._step) * self.tokens_per_step(args)
        tokens_per_second = tokens / max(now - self._start, 1e-9)
        logs["tokens_per_second"] = round(tokens_per_second, 1)
        if self.flops_token:
            value = mfu(tokens_per_second, self.flops_token + self.extra_flops_per_token, self.peak_tflops,
                        args.world_size)
            if value is not None:
                logs["mfu"] = round(value, 6)
        self._start, self._step = now, state.global_step


def evaluation_throughput(model, block_size, n_tokens, seconds, peak_tflops=None, n_devices=1, n_fed=None):
    """``tokens_per_second`` (scored tokens) and, when the peak is known, ``mfu`` of a forward-only evaluation;
    ``n_fed``: the tokens that went through the model (more than those scored with a sliding window)."""
    result = {"tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1)}
    peak = device_peak_tflops(peak_tflops)
    if peak:
        flops = flops_per_token(model.config, count_parameters(model), block_size, training=False)
        fed_per_second = (n_fed or n_tokens) / max(seconds, 1e-9)
        result["mfu"] = round(mfu(fed_per_second, flops, peak, n_devices), 6)
    return result


def peak_gpu_memory():
    """``peak_memory_bytes``: the most this process's CUDA device held in tensors since the process started
    (``torch.cuda.max_memory_allocated``: weights, optimizer state, gradients, activations); nothing on CPU."""
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated()} if torch.cuda.is_available() else {}
