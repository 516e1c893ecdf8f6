"""Faults during training: kill and resume, kill during a save, checkpoint rotation, SIGTERM, non-finite losses,
a dead rank. Faults that cannot be caused from outside are injected by tests/fault_probe.py."""
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_one_line_error, free_port, run, torchrun, train_command
from lmcompress import faults
from lmcompress.training import resolve_resume

SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}
STEPS, SAVE_STEPS = 60, 10
HANG_BOUND_S = 120  # generous: only tells a prompt exit from a hang


def run_one_thread(command, env=None, check=True):
    """conftest.run with one thread per process and any environment values as strings."""
    return run(command, env={key: str(value) for key, value in {**SINGLE_THREAD, **(env or {})}.items()}, check=check)


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def checkpoint_steps(folder):
    return sorted(faults.checkpoint_step(path) for path in faults.complete_checkpoints(folder))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_files):
    folder = tmp_path_factory.mktemp("small-corpus")
    (folder / "train.txt").write_text(corpus_files["train"].read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return {"train": folder / "train.txt", "validation": corpus_files["validation"]}


@pytest.fixture(scope="module")
def train_args(tokenizer_dir, tiny_config, small_corpus):
    """train.py's flags (without the script) for a run of STEPS steps that saves every SAVE_STEPS steps."""

    def args(output_dir, *extra):
        return train_command(output_dir, tokenizer_dir, tiny_config, small_corpus, "--max_steps", STEPS,
                             "--save_strategy", "steps", "--save_steps", SAVE_STEPS, "--warmup_steps", 5,
                             *extra)[1:]

    return args


@pytest.fixture(scope="module")
def straight(tmp_path_factory, train_args):
    output_dir = tmp_path_factory.mktemp("straight") / "out"
    run_one_thread(["train.py", *train_args(output_dir)])
    return output_dir


def start(command, env, log_dir):
    """Start a command in its own process group (so that a kill reaches every process it started)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **SINGLE_THREAD, **{k: str(v) for k, v in env.items()}}
    command = [str(part) for part in command]
    if command[0].endswith(".py"):
        command = [sys.executable] + command
    process = subprocess.Popen(command, cwd=REPO, env=full_env, start_new_session=True,
                               stdout=open(log_dir / "stdout", "w"), stderr=open(log_dir / "stderr", "w"))
    process.log_dir = log_dir
    return process


def wait_until(condition, process, what, timeout=HANG_BOUND_S):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before {what}:\n"
                                 f"{(process.log_dir / 'stderr').read_text()[-3000:]}")
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def kill_after_first_checkpoint(process, output_dir):
    wait_until(lambda: checkpoint_steps(output_dir), process, "first checkpoint")
    time.sleep(random.uniform(0, 0.3))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (output_dir / "model.safetensors").exists(), "killed too late: the run had finished"


def finish_within(process, timeout=HANG_BOUND_S):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s:\n{(process.log_dir / 'stderr').read_text()[-3000:]}")


# ---- Checkpoints complete or absent --------------------------------------------------------------------------

def make_checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / faults.TRAINER_STATE_NAME).write_text("{}")
    return path


def test_resume_auto_and_latest_ignore_incomplete_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, complete=False)  # cut short: the plain Trainer writes checkpoints in place
    (tmp_path / faults.staging_root(tmp_path, 30)).mkdir()
    for wanted in ("auto", "latest"):
        args = SimpleNamespace(resume_from_checkpoint=wanted, output_dir=str(tmp_path))
        assert resolve_resume(args) == str(tmp_path / "checkpoint-10")


def test_rotation_never_deletes_the_newest_checkpoint(tmp_path):
    for step in (10, 20, 30):
        make_checkpoint(tmp_path, step)
    # Resumed from checkpoint-10 (say checkpoint-30 diverged) and just saved checkpoint-15: it must stay.
    newest = make_checkpoint(tmp_path, 15)
    faults.rotate_checkpoints(str(tmp_path), 2, str(newest))
    assert checkpoint_steps(tmp_path) == [15, 30]
    faults.rotate_checkpoints(str(tmp_path), 1, str(newest))
    assert checkpoint_steps(tmp_path) == [15]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")], "no leftovers"


def tensorboard_steps(logging_dir, tag="train/loss"):
    """The steps of ``tag`` as TensorBoard shows them (it drops events purged by a later run's purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logging_dir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, train_args, straight):
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "out"
    logged = ["--report_to", "tensorboard", "--logging_steps", 5]
    killed = run_one_thread(["tests/fault_probe.py", "train", *train_args(output_dir, *logged)],
                 env={"FAULT_KILL_IN_SAVE": 2 * SAVE_STEPS}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == [f"checkpoint-{SAVE_STEPS}"]
    assert list(output_dir.glob(f".staging-checkpoint-{2 * SAVE_STEPS}/checkpoint-*")), "killed in the middle of a save"
    AutoModelForCausalLM.from_pretrained(output_dir / f"checkpoint-{SAVE_STEPS}")

    run_one_thread(["train.py", *train_args(output_dir, "--resume_from_checkpoint", "auto", *logged)])
    assert_same_weights(weights(straight), weights(output_dir))
    assert not list(output_dir.glob(".staging-*")), "the resumed run cleared the half-written checkpoint"
    assert tensorboard_steps(output_dir / "runs") == list(range(5, STEPS + 1, 5)), \
        "the steps logged after the checkpoint by the killed run appear once"


def test_resuming_from_the_last_checkpoint_takes_no_step_past_max_steps(tmp_path, train_args, straight):
    output_dir = tmp_path / "out"
    shutil.copytree(straight / f"checkpoint-{STEPS}", output_dir / f"checkpoint-{STEPS}")
    run_one_thread(["train.py", *train_args(output_dir, "--resume_from_checkpoint", "auto")])
    assert checkpoint_steps(output_dir) == [STEPS]
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == STEPS
    assert_same_weights(weights(straight), weights(output_dir), atol=0)


# ---- Kill and resume -------------------------------------------------------------------------------------------

def train_sh_env(tokenizer_dir, tiny_config, small_corpus, output_dir, **overrides):
    return {"CONFIG": tiny_config, "TOKENIZER": tokenizer_dir, "TRAIN_FILE": small_corpus["train"],
            "VALIDATION_FILE": small_corpus["validation"], "OUTPUT_DIR": output_dir, "BLOCK_SIZE": 64,
            "BATCH_SIZE": 8, "GRAD_ACC": 1, "LEARNING_RATE": "3e-3", "WARMUP_RATIO": 0.1, "SAVE_STEPS": SAVE_STEPS,
            "LOGGING_STEPS": 5, "SEED": 1, "NPROC_PER_NODE": 1, "MASTER_PORT": free_port(), **overrides}


def kill_and_resume_with_script(tmp_path, script, env, extra_flags):
    """Run ``script`` straight; run it again killed after its first checkpoint and re-run it with RESUME=auto."""
    command = ["bash", script, *map(str, extra_flags)]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    run_one_thread(command, env={**env, "OUTPUT_DIR": straight_dir})
    resumable = {**env, "OUTPUT_DIR": resumed_dir, "RESUME": "auto"}
    kill_after_first_checkpoint(start(command, resumable, tmp_path / "killed"), resumed_dir)
    run_one_thread(command, env={**resumable, "MASTER_PORT": free_port()})
    assert_same_weights(weights(straight_dir), weights(resumed_dir))
    return straight_dir, resumed_dir


@pytest.mark.slow
def test_train_sh_on_two_ranks_killed_then_resumed_ends_as_if_uninterrupted(tmp_path, tokenizer_dir, tiny_config,
                                                                            small_corpus):
    env = train_sh_env(tokenizer_dir, tiny_config, small_corpus, None, NPROC_PER_NODE=2, BATCH_SIZE=4)
    _, resumed = kill_and_resume_with_script(tmp_path, "train.sh", env, ["--max_steps", STEPS, "--eval_strategy", "no",
                                                                         "--save_total_limit", 2])
    assert checkpoint_steps(resumed) == [STEPS - SAVE_STEPS, STEPS], "the limit keeps the newest checkpoints"


@pytest.mark.slow
def test_distil_sh_on_two_ranks_killed_then_rerun_with_resume_auto_ends_as_if_uninterrupted(
        tmp_path, untrained_model, tiny_config, small_corpus):
    env = {"TEACHER": untrained_model, "STUDENT_CONFIG": tiny_config, "TOKENIZER": untrained_model,
           "TRAIN_FILE": small_corpus["train"], "VALIDATION_FILE": small_corpus["validation"], "BLOCK_SIZE": 64,
           "BATCH_SIZE": 4, "GRAD_ACC": 1, "LEARNING_RATE": "1e-3", "SAVE_STEPS": SAVE_STEPS, "LOGGING_STEPS": 5,
           "NPROC_PER_NODE": 2, "MASTER_PORT": free_port()}
    kill_and_resume_with_script(tmp_path, "distil.sh", env, ["--max_steps", STEPS, "--report_to", "none"])


# ---- Preemption ------------------------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_at_the_next_step_and_exits(tmp_path, train_args):
    output_dir = tmp_path / "out"
    process = start(["train.py", *train_args(output_dir, "--max_steps", 5000)], {}, tmp_path / "log")
    wait_until(lambda: checkpoint_steps(output_dir), process, "first checkpoint")
    os.kill(process.pid, signal.SIGTERM)
    signalled = time.time()
    assert finish_within(process) == faults.EXIT_PREEMPTED
    print(f"SIGTERM to exit: {time.time() - signalled:.1f} s")
    stderr = (process.log_dir / "stderr").read_text()
    assert "Traceback" not in stderr and "preempted (SIGTERM)" in stderr.splitlines()[-1]
    saved = checkpoint_steps(output_dir)
    assert saved[-1] > SAVE_STEPS and saved[-1] % SAVE_STEPS, "saved at the step the signal came, not a planned save"
    assert not (output_dir / "model.safetensors").exists(), "a preempted run is not a finished model"
    state = json.loads((output_dir / f"checkpoint-{saved[-1]}" / "trainer_state.json").read_text())
    assert state["global_step"] == saved[-1]


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_ranks_at_one_checkpoint(tmp_path, train_args):
    output_dir, pids = tmp_path / "out", tmp_path / "pids"
    process = start([*torchrun(), "tests/fault_probe.py", "train", *train_args(output_dir, "--max_steps", 5000)],
                    {"FAULT_PID_DIR": pids}, tmp_path / "log")
    wait_until(lambda: checkpoint_steps(output_dir) and (pids / "rank1.pid").exists(), process, "first checkpoint")
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
    finish_within(process)
    stderr = (process.log_dir / "stderr").read_text()
    assert "preempted (SIGTERM)" in stderr, stderr[-3000:]
    saved = checkpoint_steps(output_dir)
    assert saved[-1] > SAVE_STEPS and saved[-1] % SAVE_STEPS, "both ranks saved at the step the signal came"
    assert not list(output_dir.glob(".staging-*"))


# ---- Non-finite loss -------------------------------------------------------------------------------------------

def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, train_args):
    result = run_one_thread(["tests/fault_probe.py", "train", *train_args(tmp_path / "out")],
                 env={"FAULT_NAN_AT_STEP": 13}, check=False)
    assert_one_line_error(result, "non-finite training loss at step 13 on rank 0")
    assert checkpoint_steps(tmp_path / "out") == [SAVE_STEPS]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_skip_nonfinite_skips_the_step_and_counts_it(tmp_path, train_args):
    output_dir = tmp_path / "out"
    run_one_thread(["tests/fault_probe.py", "train", *train_args(output_dir, "--max_steps", 20, "--logging_steps", 1,
                                                       "--skip_nonfinite")],
        env={"FAULT_NAN_AT_STEP": 13})
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    skipped = {entry["step"]: entry.get("nonfinite_skipped", 0) for entry in history if "loss" in entry}
    assert skipped[12] == 0 and skipped[13] == 1 and skipped[20] == 1
    assert all(torch.isfinite(tensor).all() for tensor in weights(output_dir).values())


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_stops_both_ranks(tmp_path, train_args):
    process = start([*torchrun(), "tests/fault_probe.py", "train", *train_args(tmp_path / "out")],
                    {"FAULT_NAN_AT_STEP": 13, "FAULT_NAN_RANK": 1}, tmp_path / "log")
    assert finish_within(process) != 0
    stderr = (process.log_dir / "stderr").read_text()
    message = "fault_probe.py: error: non-finite training loss at step 13 on rank 1"
    assert stderr.count(message) == 2, f"both ranks stop with the message:\n{stderr[-3000:]}"


# ---- A rank dies -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_killing_one_rank_ends_the_other_promptly(tmp_path, train_args):
    pids = tmp_path / "pids"
    process = start([*torchrun(), "tests/fault_probe.py", "train", *train_args(tmp_path / "out", "--max_steps", 5000)],
                    {"FAULT_PID_DIR": pids}, tmp_path / "log")
    wait_until(lambda: (pids / "rank1.pid").exists() and (pids / "rank0.pid").exists(), process, "training")
    survivor = int((pids / "rank0.pid").read_text())
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)
    killed = time.time()
    assert finish_within(process) != 0
    print(f"rank 1 SIGKILLed: torchrun exited after {time.time() - killed:.1f} s")
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_run_after_the_collective_timeout(tmp_path, train_args):
    output_dir, pids, timeout_s = tmp_path / "out", tmp_path / "pids", 15
    process = start([*torchrun(), "tests/fault_probe.py", "train",
                     *train_args(output_dir, "--max_steps", 5000, "--ddp_timeout", timeout_s)],
                    {"FAULT_PID_DIR": pids}, tmp_path / "log")
    wait_until(lambda: checkpoint_steps(output_dir) and (pids / "rank1.pid").exists(), process, "first checkpoint")
    frozen = int((pids / "rank1.pid").read_text())
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.time()
    try:
        assert finish_within(process, timeout=timeout_s + 60) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)
    print(f"rank 1 frozen (SIGSTOP): torchrun exited after {time.time() - stopped:.1f} s")
    stderr = (process.log_dir / "stderr").read_text()
    assert f"a rank stopped answering for {timeout_s} s (--ddp_timeout)" in stderr, stderr[-3000:]
