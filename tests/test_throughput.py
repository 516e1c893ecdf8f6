"""Throughput and MFU logging: the FLOPs formula, the MFU arithmetic, the callback's log."""
import json
import types

import pytest
import torch
from transformers import GPT2Config

from conftest import run, train_command
from lmcompress.throughput import ThroughputCallback, evaluation_throughput, flops_per_token, mfu


def test_flops_per_token_gpt2_small():
    config = GPT2Config()  # 12 layers, 12 heads, 768 wide: 124,439,808 parameters
    n = 124_439_808
    assert flops_per_token(config, n, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(config, n, 1024, training=False) == pytest.approx((6 * n + 12 * 12 * 12 * 64 * 1024) / 3)


def test_mfu_arithmetic():
    assert mfu(1000.0, 1e9, 2.0) == pytest.approx(0.5)  # 1e12 FLOPs/s of 2e12
    assert mfu(1000.0, 1e9, 1.0, n_devices=4) == pytest.approx(0.25)
    assert mfu(1000.0, 1e9, None) is None


def _args(**kwargs):
    return types.SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=3, world_size=1, **kwargs)


def test_callback_logs_tokens_per_second_and_mfu_with_a_peak():
    model = types.SimpleNamespace(config=GPT2Config(n_layer=2, n_head=2, n_embd=128),
                                  parameters=lambda: [types.SimpleNamespace(numel=lambda: 1000)])
    callback = ThroughputCallback(block_size=64, peak_tflops=1e-3)
    state = types.SimpleNamespace(global_step=0)
    callback.on_train_begin(_args(), state, None, model=model)
    callback._start -= 2.0  # two seconds ago
    state.global_step = 4
    logs = {"loss": 1.0}
    callback.add_figures(_args(), state, logs)
    assert logs["tokens_per_second"] == pytest.approx(4 * 2 * 3 * 64 / 2.0, rel=0.05)
    expected = logs["tokens_per_second"] * flops_per_token(model.config, 1000, 64) / 1e9
    assert logs["mfu"] == pytest.approx(expected, rel=1e-3)
    eval_logs = {"eval_loss": 1.0}  # evaluation logs are left alone
    callback.add_figures(_args(), state, eval_logs)
    assert eval_logs == {"eval_loss": 1.0}


def test_no_mfu_without_a_known_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = types.SimpleNamespace(config=GPT2Config(n_layer=2, n_head=2, n_embd=128),
                                  parameters=lambda: [types.SimpleNamespace(numel=lambda: 1000)])
    result = evaluation_throughput(model, 64, n_tokens=1000, seconds=2.0)
    assert result == {"tokens_per_second": 500.0}
    assert evaluation_throughput(model, 64, 1000, 2.0, peak_tflops=1.0)["mfu"] > 0


def test_train_py_logs_throughput_to_tensorboard_and_the_trainer_state(tmp_path, tokenizer_dir, tiny_config,
                                                                         corpus_files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "out"
    run(train_command(output_dir, tokenizer_dir, tiny_config, corpus_files, "--max_steps", 2, "--logging_steps", 1,
                      "--report_to", "tensorboard"))
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["tokens_per_second"] > 0 for entry in history if "loss" in entry] == [True, True]
    events = EventAccumulator(str(output_dir / "runs"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/tokens_per_second")] == [1, 2]
