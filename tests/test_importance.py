"""truncate.py --strategy importance: a block made an identity is ranked least important by every measure and
dropped; the scores reach truncation.json and importance.png; short or missing calibration text is one line."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from conftest import assert_one_line_error, run, torchrun, write_config
from lmcompress.importance import MEASURES, angular_scores, kept_blocks, measure_importance
from lmcompress.models import load_config
from test_truncate import call_main

# a larger initialisation than the default makes every block change the hidden states and the predictions a lot
CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, initializer_range=0.2,
                               bos_token_id=0, eos_token_id=0),
    "llama": lambda: LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.2, bos_token_id=0, eos_token_id=0),
}


def make_identity(model, index):
    """Zero block ``index``'s attention and MLP output projections: its residual stream passes through unchanged."""
    with torch.no_grad():
        if model.config.model_type == "gpt2":
            block = model.transformer.h[index]
            projections = (block.attn.c_proj, block.mlp.c_proj)
        else:
            block = model.model.layers[index]
            projections = (block.self_attn.o_proj, block.mlp.down_proj)
        for projection in projections:
            for parameter in projection.parameters():
                parameter.zero_()
    return model


def teacher_with_identity(name, *identities):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    for index in identities:
        make_identity(model, index)
    return model


def sampled_text(model, n_blocks=8, length=64):
    """Calibration text sampled from the teacher itself: removing any block that changes its predictions then raises
    the expected perplexity (by the KL divergence), so the perplexity ranking does not rest on luck."""
    torch.manual_seed(1)
    start = torch.randint(0, model.config.vocab_size, (n_blocks, 1))
    with torch.no_grad():
        return model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                              max_new_tokens=length - 1, min_new_tokens=length - 1, pad_token_id=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("measure", MEASURES)
def test_an_identity_block_is_ranked_least_important_and_dropped(name, measure):
    teacher = teacher_with_identity(name, 1)
    layers, record = measure_importance(teacher, sampled_text(teacher), measure, n_keep=3)
    assert layers == [0, 2, 3]
    scores = record["scores"]
    assert min(range(4), key=scores.__getitem__) == 1 and sorted(scores)[0] < sorted(scores)[1]
    assert record["measure"] == measure and record["calibration_tokens"] == 8 * 64


def test_block_influence_and_angular_of_an_identity_are_zero_and_its_removal_keeps_the_perplexity():
    teacher = teacher_with_identity("llama", 1)
    text = sampled_text(teacher)
    assert abs(measure_importance(teacher, text, "block_influence", 3)[1]["scores"][1]) < 1e-12
    assert measure_importance(teacher, text, "angular", 3)[1]["scores"][1] < 1e-6
    record = measure_importance(teacher, text, "perplexity", 3)[1]
    assert record["scores"][1] == pytest.approx(record["perplexity"], rel=1e-6)


def test_angular_removes_the_contiguous_run_of_identities():
    teacher = teacher_with_identity("gpt2", 1, 2)
    layers, record = measure_importance(teacher, sampled_text(teacher), "angular", n_keep=2)
    assert layers == [0, 3] and record["removed_run"] == [1, 2]
    assert len(record["run_distances"]) == 3 and record["run_distances"][1] < 1e-6


def test_angular_block_score_is_the_closest_run_holding_it():
    assert angular_scores([0.5, 0.1, 0.3], 2, 4) == [0.5, 0.1, 0.1, 0.3]


def test_ties_keep_the_earlier_block():
    assert kept_blocks([0.2, 0.5, 0.2, 0.1], 2) == [0, 1]


@pytest.fixture(scope="module")
def identity_teacher(tmp_path_factory, tokenizer_dir):
    """A 4-layer tiny GPT-2 with the test tokenizer whose block 1 is an identity."""
    folder = tmp_path_factory.mktemp("identity-teacher")
    config = load_config(str(write_config(folder / "config4.json", n_layer=4, initializer_range=0.2)))
    torch.manual_seed(0)
    make_identity(AutoModelForCausalLM.from_config(config), 1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def test_truncate_py_importance_drops_the_identity_and_writes_scores_and_chart(identity_teacher, corpus_files,
                                                                               tmp_path):
    student = tmp_path / "student"
    result = run(["truncate.py", "--teacher_name_or_path", identity_teacher, "--output_dir", student,
                  "--strategy", "importance", "--num_layers", "3", "--train_file", corpus_files["train"],
                  "--block_size", "64", "--calibration_tokens", "1024"])
    record = json.loads((student / "truncation.json").read_text())
    assert record["layers"] == [0, 2, 3], result.stdout
    importance = record["importance"]
    assert importance["measure"] == "block_influence" and importance["calibration_tokens"] == 1024
    assert len(importance["scores"]) == 4 and min(range(4), key=importance["scores"].__getitem__) == 1
    assert (student / "importance.png").stat().st_size > 0
    assert AutoModelForCausalLM.from_pretrained(student).config.n_layer == 3


@pytest.mark.parametrize("extra, message", [
    (["--train_file", "TRAIN", "--block_size", "64", "--calibration_tokens", "40"], "fewer than one block of 64"),
    (["--train_file", "SHORT", "--block_size", "64"], "fewer than one block of 64"),
    ([], "--strategy importance needs calibration text"),
    (["--train_file", "TRAIN", "--importance", "loudness"], "--importance loudness"),
])
def test_bad_calibration_is_one_line(identity_teacher, corpus_files, tmp_path, capsys, extra, message):
    short = tmp_path / "short.txt"
    short.write_text("A calibration split of a few words.\n", encoding="utf-8")
    extra = [{"TRAIN": str(corpus_files["train"]), "SHORT": str(short)}.get(item, item) for item in extra]
    result = call_main(["--teacher_name_or_path", identity_teacher, "--output_dir", tmp_path / "student",
                        "--strategy", "importance", *extra], capsys)
    assert_one_line_error(result, message)
    assert not (tmp_path / "student").exists()


def test_two_ranks_split_the_calibration_and_agree_with_one(identity_teacher, corpus_files, tmp_path):
    args = ["--teacher_name_or_path", identity_teacher, "--strategy", "importance", "--importance", "perplexity",
            "--num_layers", "2", "--train_file", corpus_files["train"], "--block_size", "64",
            "--calibration_tokens", "1024"]
    run(["truncate.py", *args, "--output_dir", tmp_path / "one"])
    run([*torchrun(), "truncate.py", *args, "--output_dir", tmp_path / "two"])
    one, two = (json.loads((tmp_path / folder / "truncation.json").read_text()) for folder in ("one", "two"))
    assert two["importance"]["calibration_tokens"] == 1024
    assert two["importance"]["scores"] == pytest.approx(one["importance"]["scores"], rel=1e-9)
    assert two["importance"]["perplexity"] == pytest.approx(one["importance"]["perplexity"], rel=1e-9)
    assert two["layers"] == one["layers"]
