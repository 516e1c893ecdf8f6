"""The launch scripts: shellcheck-clean, and evaluate.sh never shadows a hub model with a folder of its name."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
