"""Outputs on a read-only file system, a disk that fills while saving, and a huge single-line input.

Read-only and full disks are real: each case runs in a private mount namespace (``unshare -rm``) with a small
tmpfs mounted over the output folder, so nothing needs root on the host.
"""
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, assert_one_line_error, run, train_command


def can_mount_tmpfs():
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare -rm to mount a private tmpfs")


def on_tmpfs(command, mount_point, options, keep=None):
    """Run ``command`` with a tmpfs (mount ``options``) over ``mount_point``; copy what it left there to ``keep``."""
    mount_point.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount_point))} || exit 97\n\"$@\"\nrc=$?\n"
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        script += f"cp -a {shlex.quote(str(mount_point))}/. {shlex.quote(str(keep))}/\n"
    script += "exit $rc\n"
    command = [str(part) for part in command]
    if command[0].endswith(".py"):
        command = [sys.executable] + command
    result = run(["unshare", "-rm", "sh", "-c", script, "sh", *command], env={"OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode != 97, f"could not mount the tmpfs: {result.stderr}"
    return result


# ---- A read-only output folder: refused before any work ------------------------------------------------------

@needs_tmpfs
@pytest.mark.parametrize("script", ["tokenize_datasets.py", "train.py", "truncate.py", "evaluate.py"])
def test_output_on_a_read_only_file_system_is_a_one_line_error(script, tmp_path, tokenizer_dir, tiny_config,
                                                                 corpus_files, untrained_model):
    read_only = tmp_path / "read-only"
    commands = {
        "tokenize_datasets.py": ["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir,
                                 "--train_file", corpus_files["train"], "--output_dir", read_only / "tokens"],
        "train.py": train_command(read_only / "out", tokenizer_dir, tiny_config, corpus_files, "--max_steps", 5),
        "truncate.py": ["truncate.py", "--teacher_name_or_path", untrained_model, "--num_layers", 1,
                        "--output_dir", read_only / "student"],
        "evaluate.py": ["evaluate.py", "--model_name_or_path", untrained_model, "--test_file", corpus_files["test"],
                        "--output_file", read_only / "perplexity.json"],
    }
    flag = "--output_file" if script == "evaluate.py" else "--output_dir"
    result = on_tmpfs(commands[script], read_only, "ro,size=1m")
    assert_one_line_error(result, flag, "Read-only file system")
    assert "it/s" not in result.stderr, "refused before any work"


# ---- A disk that fills while saving ----------------------------------------------------------------------------

def tree_bytes(folder):
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@needs_tmpfs
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, tokenizer_dir, tiny_config,
                                                                     corpus_files):
    from transformers import AutoModelForCausalLM

    def command(output_dir, steps):
        return train_command(output_dir, tokenizer_dir, tiny_config, corpus_files, "--max_steps", steps,
                             "--save_strategy", "steps", "--save_steps", 5)

    run(command(tmp_path / "sizing", 5))
    checkpoint_bytes = tree_bytes(tmp_path / "sizing" / "checkpoint-5")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    result = on_tmpfs(command(disk, 15), disk, f"size={checkpoint_bytes * 3 // 2 // 1024}k", keep=kept)

    assert_one_line_error(result, "could not save checkpoint-10", "disk is full", "checkpoint-5",
                          "--resume_from_checkpoint auto")
    assert sorted(path.name for path in kept.iterdir()) == ["checkpoint-5"], "no half-written checkpoint left"
    AutoModelForCausalLM.from_pretrained(kept / "checkpoint-5")


@needs_tmpfs
def test_disk_full_while_tokenizing_leaves_no_output(tmp_path, tokenizer_dir, corpus_files):
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    result = on_tmpfs(["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir,
                       "--train_file", corpus_files["train"], "--output_dir", disk / "tokens"],
                      disk, "size=16k", keep=kept)
    assert_one_line_error(result, "No space left on device", "free some space")
    assert not list(kept.iterdir()), "the staging folder is removed"


# ---- A 200 MB file on a single line: valid input, tokenized in bounded memory -------------------------------

def peak_rss_mib(command):
    """Run ``command`` and return its peak resident memory (MiB) as the kernel accounts it."""
    process = subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, stderr[-3000:]
    return usage.ru_maxrss / 1024


def write_single_line(path, n_bytes, seed_text):
    words = " ".join(seed_text.split())
    with open(path, "w", encoding="utf-8") as handle:
        written = 0
        while written < n_bytes:
            written += handle.write(words + " ")
    return path


@pytest.mark.slow
def test_a_200_mb_single_line_file_is_tokenized_in_bounded_memory(tmp_path, tokenizer_dir, corpus_files):
    seed = corpus_files["train"].read_text(encoding="utf-8")[:200_000]
    small = write_single_line(tmp_path / "small.txt", 2 * 2**20, seed)
    large = write_single_line(tmp_path / "large.txt", 200 * 2**20, seed)

    def tokenize(source, name):
        return ["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir, "--train_file", source,
                "--output_dir", tmp_path / name]

    small_peak = peak_rss_mib(tokenize(small, "small"))
    started = time.time()
    large_peak = peak_rss_mib(tokenize(large, "large"))
    print(f"peak RSS: {small_peak:.0f} MiB for 2 MB, {large_peak:.0f} MiB for 200 MB "
          f"({time.time() - started:.0f} s)")
    assert large_peak < small_peak + 100, "memory grows with the length of the line"
    assert (tmp_path / "large" / "train.bin").stat().st_size > 0 and (tmp_path / "large" / "validation.bin").exists()


def test_replace_folder_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path):
    from lmcompress.atomic import replace_folder

    final, staged = tmp_path / "model", tmp_path / "staged"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(OSError):
        replace_folder(str(tmp_path / "missing"), str(final))
    assert (final / "weights").read_text() == "old"
    staged.mkdir()
    (staged / "weights").write_text("new")
    replace_folder(str(staged), str(final))
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_staging_file(tmp_path, monkeypatch):
    import errno

    from lmcompress import atomic

    path = tmp_path / "result.json"
    path.write_text("old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError):
        atomic.write_file(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_moving_a_model_into_a_folder_never_puts_new_weights_beside_older_files(tmp_path, monkeypatch):
    """Stopped after any number of file operations, the folder holds the old model, no weights, or the new one."""
    from lmcompress import atomic
    from lmcompress.models import WEIGHTS_NAMES

    files = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json"]

    def prepare(step):
        folder, staged = tmp_path / f"out{step}", tmp_path / f"out{step}" / ".staging-final-model"
        staged.mkdir(parents=True)
        (folder / "checkpoint-5").mkdir()
        for name in files:
            (folder / name).write_text("old")
            (staged / name).write_text("new")
        return folder, staged

    def present(folder):
        return {name: (folder / name).read_text() for name in files if (folder / name).exists()}

    def stop_after(n_operations):
        done = []

        def counted(operation):
            def run_it(*args):
                if len(done) == n_operations:
                    raise KeyboardInterrupt
                done.append(args)
                return operation(*args)
            return run_it

        monkeypatch.setattr(atomic.os, "replace", counted(os.replace))
        monkeypatch.setattr(atomic.os, "remove", counted(os.remove))

    for step in range(2 * len(files) + 1):
        folder, staged = prepare(step)
        stop_after(step)
        try:
            atomic.move_files_into(str(staged), str(folder), WEIGHTS_NAMES)
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        found = present(folder)
        if "model.safetensors" in found:
            assert set(found.values()) in ({"old"}, {"new"}) and len(found) == len(files), (step, found)
    assert found == dict.fromkeys(files, "new")
    assert sorted(p.name for p in folder.iterdir()) == sorted(files + ["checkpoint-5"])
