"""Throughput and MFU logging: the FLOPs formula, the MFU arithmetic, the figures train.py logs."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import run, train_command
from lmcompress.throughput import count_parameters, evaluation_throughput, flops_per_token, mfu


def test_flops_per_token_gpt2_small():
    config = GPT2Config()  # 12 layers, 12 heads, 768 wide: 124,439,808 parameters
    n = 124_439_808
    assert flops_per_token(config, n, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(config, n, 1024, training=False) == pytest.approx((6 * n + 12 * 12 * 12 * 64 * 1024) / 3)


def test_mfu_arithmetic():
    assert mfu(1000.0, 1e9, 2.0) == pytest.approx(0.5)  # 1e12 FLOPs/s of 2e12
    assert mfu(1000.0, 1e9, 1.0, n_devices=4) == pytest.approx(0.25)
    assert mfu(1000.0, 1e9, None) is None


def test_evaluation_mfu_counts_the_fed_tokens_and_needs_a_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU name to look a peak up by
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    assert evaluation_throughput(model, 64, n_tokens=1000, seconds=2.0) == {"tokens_per_second": 500.0}
    flops = flops_per_token(model.config, count_parameters(model), 64, training=False)
    result = evaluation_throughput(model, 64, n_tokens=1000, seconds=2.0, peak_tflops=1e-6, n_fed=3000)
    assert result == {"tokens_per_second": 500.0, "mfu": round(1500 * flops / 1e6, 6)}


def test_train_py_logs_throughput_to_tensorboard_and_the_trainer_state(tmp_path, tokenizer_dir, tiny_config,
                                                                         corpus_files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "out"
    peak_tflops = 1e-3
    run(train_command(output_dir, tokenizer_dir, tiny_config, corpus_files, "--max_steps", 2, "--logging_steps", 1,
                      "--eval_strategy", "steps", "--eval_steps", 2, "--report_to", "tensorboard",
                      "--peak_tflops", peak_tflops))
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    trained = [entry for entry in history if "loss" in entry]
    assert [entry["tokens_per_second"] > 0 for entry in trained] == [True, True]
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    mfu_per_token_per_second = flops_per_token(model.config, count_parameters(model), 64) / (peak_tflops * 1e12)
    for entry in trained:  # tokens_per_second is logged to 0.1, mfu to 1e-6
        assert entry["mfu"] == pytest.approx(entry["tokens_per_second"] * mfu_per_token_per_second,
                                             abs=0.05 * mfu_per_token_per_second + 5e-7)
    evaluated = [entry for entry in history if "eval_loss" in entry]
    assert len(evaluated) == 1 and "mfu" not in evaluated[0] and "tokens_per_second" not in evaluated[0]
    events = EventAccumulator(str(output_dir / "runs"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/tokens_per_second")] == [1, 2]
