"""DeepSpeed on CPU, two processes over gloo: ZeRO-2 with optimizer offload, ZeRO-3, ZeRO inference, bad configs.

On first use DeepSpeed compiles its CPU Adam and shared-memory communication ops (about 100 s on two idle
cores, longer under load), cached afterwards in ~/.cache/torch_extensions (or TORCH_EXTENSIONS_DIR).
"""
import json
import math
from pathlib import Path

import pytest

from conftest import assert_one_line_error, free_port, run

MAX_STEPS = 8
WARMUP_RATIO = 0.25  # 2 of the 8 steps
LEARNING_RATE = 1e-3


def launch_env(tokenizer_dir, tiny_config, corpus_files, output_dir, **overrides):
    """Variables for the launch scripts: two processes, the tiny model, local files, fp32, a short run."""
    return {"NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "CONFIG": str(tiny_config),
            "TOKENIZER": str(tokenizer_dir), "TRAIN_FILE": str(corpus_files["train"]),
            "VALIDATION_FILE": str(corpus_files["validation"]), "OUTPUT_DIR": str(output_dir), "PRECISION": "fp32",
            "BLOCK_SIZE": "64", "BATCH_SIZE": "4", "EVAL_BATCH_SIZE": "8", "GRAD_ACC": "1", "LOGGING_STEPS": "1",
            "LEARNING_RATE": str(LEARNING_RATE), "WARMUP_RATIO": str(WARMUP_RATIO), "SEED": "3", **overrides}


def train(script, env):
    run(["bash", script, "--max_steps", MAX_STEPS, "--lr_scheduler_type", "linear", "--eval_strategy", "no",
         "--save_strategy", "no", "--report_to", "none"], env=env)
    return Path(env["OUTPUT_DIR"])


def log_history(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def evaluate_deepspeed(model_dir, validation_file, output_file, ds_config):
    """Perplexity of ``model_dir`` on the validation split with evaluate_deepspeed.sh, two processes."""
    run(["bash", "evaluate_deepspeed.sh"], env={
        "MODEL": str(model_dir), "VALIDATION_FILE": str(validation_file), "SPLIT": "validation", "BLOCK_SIZE": "64",
        "EVAL_BATCH_SIZE": "3", "OUTPUT_FILE": str(output_file), "PRECISION": "fp32", "DS_CONFIG": ds_config,
        "NPROC_PER_NODE": "2", "MASTER_PORT": free_port()})
    return json.loads(output_file.read_text())


def eval_loss(model_dir):
    """The validation loss the Trainer measured at the end of training, on the model as DeepSpeed held it."""
    return json.loads((model_dir / "eval_results.json").read_text())["eval_loss"]


def assert_loadable(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert all(parameter.abs().sum() > 0 for parameter in model.parameters())


@pytest.fixture(scope="module")
def zero2_model(tmp_path_factory, tokenizer_dir, tiny_config, corpus_files):
    output_dir = tmp_path_factory.mktemp("zero2") / "model"
    return train("train_deepspeed.sh", launch_env(tokenizer_dir, tiny_config, corpus_files, output_dir))


@pytest.fixture(scope="module")
def zero3_model(tmp_path_factory, tokenizer_dir, tiny_config, corpus_files):
    output_dir = tmp_path_factory.mktemp("zero3") / "model"
    env = launch_env(tokenizer_dir, tiny_config, corpus_files, output_dir, DS_CONFIG="ds_config_zero3.json")
    return train("pretrain_deepspeed.sh", env)


@pytest.mark.slow
def test_zero2_offload_saves_a_loadable_model(zero2_model):
    assert_loadable(zero2_model)
    assert json.loads((zero2_model / "eval_results.json").read_text())["perplexity"] > 1


@pytest.mark.slow
def test_learning_rate_warms_up_then_decays(zero2_model):
    learning_rate = {step: entry["learning_rate"] for step, entry in log_history(zero2_model).items()}
    warmup = math.ceil(WARMUP_RATIO * MAX_STEPS)
    assert learning_rate[1] == pytest.approx(LEARNING_RATE / warmup)
    assert learning_rate[warmup] == pytest.approx(LEARNING_RATE)
    assert learning_rate[MAX_STEPS] == pytest.approx(0, abs=1e-12)
    assert learning_rate[MAX_STEPS - 1] == pytest.approx(LEARNING_RATE / (MAX_STEPS - warmup))


@pytest.mark.slow
def test_zero2_checkpoints_are_staged_and_resume_to_the_same_weights(zero2_model, tmp_path, tokenizer_dir,
                                                                     tiny_config, corpus_files):
    import shutil

    from safetensors.torch import load_file
    from torch.testing import assert_close

    saving = launch_env(tokenizer_dir, tiny_config, corpus_files, tmp_path / "saving")
    run(["bash", "train_deepspeed.sh", "--max_steps", MAX_STEPS, "--lr_scheduler_type", "linear", "--eval_strategy",
         "no", "--save_strategy", "steps", "--save_steps", MAX_STEPS // 2, "--report_to", "none"], env=saving)
    saved = sorted(path.name for path in (tmp_path / "saving").iterdir() if "checkpoint" in path.name)
    assert saved == [f"checkpoint-{MAX_STEPS // 2}", f"checkpoint-{MAX_STEPS}"], "complete, no staging left"
    assert list((tmp_path / "saving" / saved[0]).glob("global_step*/*optim_states.pt")), "DeepSpeed's own state"

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "saving" / saved[0], resumed / saved[0])
    run(["bash", "train_deepspeed.sh", "--max_steps", MAX_STEPS, "--lr_scheduler_type", "linear", "--eval_strategy",
         "no", "--save_strategy", "no", "--report_to", "none"],
        env={**saving, "OUTPUT_DIR": str(resumed), "RESUME": "auto", "MASTER_PORT": free_port()})
    straight, again = (load_file(str(folder / "model.safetensors")) for folder in (zero2_model, resumed))
    for name in straight:
        assert_close(again[name], straight[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_zero2_loss_at_step_1_matches_torchrun(zero2_model, tmp_path, tokenizer_dir, tiny_config, corpus_files):
    torchrun_model = train("train.sh", launch_env(tokenizer_dir, tiny_config, corpus_files, tmp_path / "torchrun"))
    deepspeed_loss, torchrun_loss = (log_history(folder)[1]["loss"] for folder in (zero2_model, torchrun_model))
    assert deepspeed_loss == pytest.approx(torchrun_loss, abs=1e-4)


@pytest.mark.slow
def test_evaluate_deepspeed_writes_the_perplexity(zero2_model, corpus_files, tmp_path):
    result = evaluate_deepspeed(zero2_model, corpus_files["validation"], tmp_path / "ppl.json", "ds_config.json")
    assert (result["split"], result["world_size"]) == ("validation", 2)
    assert result["loss"] == pytest.approx(eval_loss(zero2_model), abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


@pytest.mark.slow
def test_zero3_saves_the_trained_weights_whole(zero3_model, corpus_files, tmp_path):
    assert_loadable(zero3_model)
    run(["evaluate.py", "--model_name_or_path", zero3_model, "--validation_file", corpus_files["validation"],
         "--split", "validation", "--block_size", "64", "--output_file", tmp_path / "plain.json"])
    assert json.loads((tmp_path / "plain.json").read_text())["loss"] == pytest.approx(eval_loss(zero3_model),
                                                                                      abs=1e-5)


@pytest.mark.slow
def test_zero3_inference_scores_like_the_trainer(zero3_model, corpus_files, tmp_path):
    result = evaluate_deepspeed(zero3_model, corpus_files["validation"], tmp_path / "ppl.json", "ds_config_zero3.json")
    assert result["world_size"] == 2
    assert result["loss"] == pytest.approx(eval_loss(zero3_model), abs=1e-5)


def distil(teacher, student_config, tokenizer_dir, corpus_files, output_dir, ds_config):
    """Three steps of distil_deepspeed.sh on two processes, with every loss term but the MSE of logits."""
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "DS_CONFIG": ds_config, "TEACHER": str(teacher),
           "ALPHA_HIDDEN": "1", "ALPHA_ATT": "1", "ALPHA_VAL": "1", "STUDENT_CONFIG": str(student_config),
           "TOKENIZER": str(tokenizer_dir),
           "TRAIN_FILE": str(corpus_files["train"]), "VALIDATION_FILE": str(corpus_files["validation"]),
           "OUTPUT_DIR": str(output_dir), "PRECISION": "fp32", "BLOCK_SIZE": "64", "BATCH_SIZE": "4",
           "EVAL_BATCH_SIZE": "8", "GRAD_ACC": "1", "LOGGING_STEPS": "1"}
    run(["bash", "distil_deepspeed.sh", "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no",
         "--report_to", "none"], env=env)
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["ds_config.json", "ds_config_zero3.json"])
def test_distil_deepspeed_trains_a_loadable_student(ds_config, zero2_model, tiny_config, tokenizer_dir,
                                                    corpus_files, tmp_path):
    student = distil(zero2_model, tiny_config, tokenizer_dir, corpus_files, tmp_path / "student", ds_config)
    assert_loadable(student)
    first = log_history(student)[1]
    terms = {"loss_ce": 5, "loss_clm": 2, "loss_cos": 1, "loss_hidden": 1, "loss_att": 1, "loss_val": 1}
    assert all(math.isfinite(first[term]) and first[term] > 0 for term in terms)
    assert first["loss"] == pytest.approx(sum(weight * first[term] for term, weight in terms.items()), rel=1e-4)
    assert json.loads((student / "distillation.json").read_text())["teacher"] == str(zero2_model)
    assert math.isfinite(eval_loss(student))


def test_lockstep_runs_every_rank_as_often_as_rank_0(tiny_config):
    """Under ZeRO-3 a rank with fewer windows must still join every forward pass, without counting the extra."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmcompress.perplexity import stream_nll

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads(tiny_config.read_text())))
    calls = []
    model.base_model.register_forward_hook(lambda *_: calls.append(1))
    tokens = np.arange(16 * 7 + 1) % 500  # 7 windows of 16 tokens: rank 0 gets 4, rank 1 gets 3
    results = {}
    for lockstep in (False, True):
        calls.clear()
        results[lockstep] = stream_nll(model, tokens, 16, 16, 1, torch.device("cpu"), rank=1, world_size=2,
                                       lockstep=lockstep)
        assert len(calls) == (4 if lockstep else 3)
    assert results[True] == pytest.approx(results[False])
    assert results[True][1] == 3 * 15  # a block's first token has no context and is not scored


@pytest.mark.parametrize("content, fragment", [
    (None, "no such DeepSpeed config file"),
    ("{\"zero_optimization\": {\"stage\": 2},", "not valid JSON"),
    ("[2]", "expected a JSON object"),
    ("{\"zero_optimization\": {\"stage\": 2}, \"train_micro_batch_size_per_gpu\": 4}",
     "train_micro_batch_size_per_gpu=4 vs hf per_device_train_batch_size=8"),
])
def test_bad_deepspeed_config_is_a_one_line_error(tmp_path, content, fragment):
    config = tmp_path / "ds.json"
    if content is not None:
        config.write_text(content)
    result = run(["train.py", "--output_dir", tmp_path / "out", "--deepspeed", config,
                  "--per_device_train_batch_size", "8"], check=False)
    assert_one_line_error(result, "--deepspeed", fragment)


def test_missing_ds_config_in_a_script_is_a_one_line_error(tmp_path):
    result = run(["bash", "train_deepspeed.sh"], env={"DS_CONFIG": str(tmp_path / "none.json")}, check=False)
    assert_one_line_error(result, "DS_CONFIG=")


def test_evaluate_refuses_a_malformed_deepspeed_config(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text("{")
    result = run(["evaluate.py", "--model_name_or_path", tmp_path, "--test_file", config, "--deepspeed", config],
                 check=False)
    assert_one_line_error(result, "not valid JSON")
