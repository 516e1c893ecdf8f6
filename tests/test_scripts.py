"""The launch scripts: shellcheck-clean, and evaluate.sh never shadows a hub model with a folder of its name."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error

SCRIPTS = sorted(str(path.relative_to(REPO)) for path in REPO.rglob("*.sh") if ".venv" not in path.parts)


def test_every_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -r requirements-dev.txt"
    result = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_evaluate_sh_with_an_uncached_hub_model_fails_in_one_line_and_leaves_no_folder(tmp_path):
    env = dict(os.environ, MODEL="gpt2", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHON=sys.executable, NPROC_PER_NODE="1", PRECISION="fp32")
    work = tmp_path / "empty"
    work.mkdir()
    result = subprocess.run(["bash", str(REPO / "evaluate.sh")], cwd=work, env=env, capture_output=True, text=True)
    assert_one_line_error(result)
    assert not (work / "gpt2").exists()
    launch_line = next(line for line in result.stderr.splitlines() if line.startswith("+ "))
    assert "--output_file" not in launch_line, "the output file's default is evaluate.py's, never MODEL/perplexity.json"


def launch_with_recording_python(tmp_path, **settings):
    """evaluate.sh with PYTHON a stub that records each call's arguments, passes ``-c`` (lib.sh's GPU probe) to
    the real interpreter and starts nothing else. Returns the calls in order, one argument list each."""
    calls = tmp_path / "calls"
    calls.mkdir()
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\nn=$(find "{calls}" -type f | wc -l)\nprintf "%s\\0" "$@" > "{calls}/$n"\n'
                    f'if [[ "$1" == -c ]]; then exec "{sys.executable}" "$@"; fi\n')
    stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in ("NPROC_PER_NODE", "PRECISION")}
    env.update(PYTHON=str(stub), MODEL=str(tmp_path / "model"), TEST_FILE=str(tmp_path / "test.txt"), **settings)
    subprocess.run(["bash", str(REPO / "evaluate.sh")], cwd=tmp_path, env=env, check=True, capture_output=True)
    return [(calls / str(n)).read_text().split("\0")[:-1] for n in range(len(list(calls.iterdir())))]


def test_the_launch_needs_no_torch_when_nproc_per_node_and_precision_are_set(tmp_path):
    calls = launch_with_recording_python(tmp_path, NPROC_PER_NODE="1", PRECISION="bf16")
    assert [call[0] for call in calls] == [str(REPO / "evaluate.py")], calls
    assert "--bf16" in calls[0]


def test_the_default_precision_on_cpu_is_fp32(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU-only machine's default")
    probe, launch = launch_with_recording_python(tmp_path)
    assert probe[0] == "-c" and "torch" in probe[1], "lib.sh asks torch for the GPUs"
    assert launch[0] == str(REPO / "evaluate.py") and "--bf16" not in launch and "--fp16" not in launch, launch
