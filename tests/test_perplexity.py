"""evaluate.py and the perplexity maths: strides, exactness against a direct computation, ranks."""
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import assert_one_line_error, run, torchrun
from lmcompress.perplexity import (IGNORE_INDEX, make_batch, scored_positions, window_spans,
                                   word_perplexity)


@pytest.mark.parametrize("n_tokens,block_size,stride", [(1000, 64, 64), (1000, 64, 16), (1000, 64, 1), (65, 64, 64),
                                                        (10, 64, 32), (129, 64, 63)])
def test_every_token_after_the_first_is_scored_once(n_tokens, block_size, stride):
    spans = window_spans(n_tokens, block_size, stride)
    scored = np.concatenate([np.arange(first, end) for _, end, first in spans])
    expected = np.arange(1, n_tokens) if stride < block_size else np.setdiff1d(
        np.arange(1, n_tokens), np.arange(0, n_tokens, block_size))
    assert np.array_equal(np.sort(scored), expected)
    assert all(end - begin <= block_size and begin < first for begin, end, first in spans)


def test_sliding_window_context_is_at_least_block_minus_stride():
    for begin, end, first in window_spans(10_000, 64, 16)[1:]:
        assert first - begin >= 64 - 16


@pytest.mark.parametrize("stride", [0, -1, 65])
def test_stride_out_of_range_is_refused(stride):
    with pytest.raises(Exception, match="--stride"):
        window_spans(1000, 64, stride)


@pytest.mark.parametrize("n_tokens,block_size,stride", [(300, 64, 64), (300, 64, 16), (70, 64, 32), (90, 64, 64)])
def test_scored_positions_are_the_labelled_predictions(n_tokens, block_size, stride):
    spans = window_spans(n_tokens, block_size, stride)[-5:]
    input_ids, _, labels = make_batch(np.arange(n_tokens) % 50, spans)
    expected = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    assert torch.equal(scored_positions(spans, input_ids.shape[1]), expected)


def test_evaluate_logs_its_figures_to_tensorboard_and_accepts_the_legacy_local_rank(tmp_path, untrained_model,
                                                                                     corpus_files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # --local_rank: what torch.distributed.launch and the deepspeed launcher pass
    result = evaluate(untrained_model, corpus_files["test"], tmp_path, "ppl", "--local_rank", "0")
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    assert events.Scalars("test/perplexity")[0].value == pytest.approx(result["perplexity"], rel=1e-6)
    assert events.Scalars("test/tokens_per_second")[0].value == pytest.approx(result["tokens_per_second"], rel=1e-6)


def test_padding_does_not_change_the_batch_nll(untrained_model):
    model = AutoModelForCausalLM.from_pretrained(untrained_model).eval()
    tokens = np.arange(200) % 300
    spans = [(0, 64, 1), (150, 200, 151)]
    together = batch_nll_of(model, tokens, spans)
    apart = [batch_nll_of(model, tokens, [span]) for span in spans]
    assert together[0] == pytest.approx(apart[0][0] + apart[1][0], rel=1e-5)
    assert together[1] == apart[0][1] + apart[1][1]


def batch_nll_of(model, tokens, spans):
    from lmcompress.perplexity import batch_nll

    with torch.no_grad():
        total, count = batch_nll(model, *make_batch(tokens, spans))
    return total.item(), count


def evaluate(model, test_file, tmp_path, name, *extra, launcher=()):
    output = tmp_path / f"{name}.json"
    args = [sys.executable, *launcher, "evaluate.py"] if launcher else ["evaluate.py"]
    data_flag = "--validation_file" if "validation" in extra else "--test_file"
    run(args + ["--model_name_or_path", model, data_flag, test_file, "--block_size", "64",
                "--per_device_eval_batch_size", "4", "--output_file", output, *map(str, extra)])
    return json.loads(output.read_text())


def test_non_overlapping_loss_equals_a_direct_computation(tmp_path, untrained_model, corpus_files):
    result = evaluate(untrained_model, corpus_files["test"], tmp_path, "blocks")
    tokens = np.fromfile(result["data"] + "/test.bin", dtype="<u2").astype(np.int64)
    model = AutoModelForCausalLM.from_pretrained(untrained_model).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 64):
            block = torch.from_numpy(tokens[start : start + 64])[None]
            if block.shape[1] < 2:
                continue
            logits = model(block).logits[0, :-1].double()
            total += F.cross_entropy(logits, block[0, 1:], reduction="sum").item()
            count += block.shape[1] - 1
    assert result["n_tokens"] == count and result["stride"] == 64 and result["block_size"] == 64
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["word_perplexity"] == pytest.approx(
        word_perplexity(result["loss"], len(tokens), result["n_words"]), rel=1e-9)
    assert result["word_perplexity"] > result["perplexity"], "words are longer than tokens"


def test_sliding_window_equals_the_perplexity_guide_loop(tmp_path, untrained_model, corpus_files):
    """The naive loop of HuggingFace's perplexity guide, token-weighted, gives the same loss."""
    result = evaluate(untrained_model, corpus_files["test"], tmp_path, "s24", "--stride", "24")
    tokens = torch.from_numpy(np.fromfile(result["data"] + "/test.bin", dtype="<u2").astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(untrained_model).eval()
    total, count, previous_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(tokens), 24):
            end = min(begin + 64, len(tokens))
            window = tokens[begin:end][None]
            labels = window.clone()
            labels[:, : -(end - previous_end)] = IGNORE_INDEX
            logits = model(window).logits[0, :-1].double()
            total += F.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels[0, 1:] != IGNORE_INDEX).sum())
            previous_end = end
            if end == len(tokens):
                break
    assert result["n_tokens"] == count == len(tokens) - 1
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)


def test_smaller_stride_never_scores_worse(tmp_path, trained_model, corpus_files):
    def on_validation(name, *extra):
        return evaluate(trained_model, corpus_files["validation"], tmp_path, name, "--split", "validation", *extra)

    blocks = on_validation("s64")
    sliding = on_validation("s16", "--stride", "16")
    assert sliding["stride"] == 16 and sliding["n_tokens"] > blocks["n_tokens"]
    assert sliding["perplexity"] <= blocks["perplexity"]


@pytest.mark.slow
def test_one_and_two_processes_agree(tmp_path, trained_model, corpus_files):
    one = evaluate(trained_model, corpus_files["test"], tmp_path, "one", "--stride", "32")
    two = evaluate(trained_model, corpus_files["test"], tmp_path, "two", "--stride", "32",
                   launcher=torchrun()[1:])
    assert two["world_size"] == 2 and two["n_tokens"] == one["n_tokens"]
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


@pytest.mark.parametrize("extra,fragment", [(["--stride", "0"], "--stride"), (["--stride", "129"], "--stride"),
                                            (["--block_size", "4096"], "--block_size"),
                                            (["--split", "validation"], "validation")])
def test_bad_evaluation_flags_fail_in_one_line(tmp_path, untrained_model, corpus_files, extra, fragment):
    result = run(["evaluate.py", "--model_name_or_path", untrained_model, "--test_file", corpus_files["test"],
                  "--output_file", tmp_path / "out.json", *extra], check=False)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out.json").exists()
