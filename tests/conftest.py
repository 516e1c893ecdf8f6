"""Shared fixtures: a tiny BPE tokenizer, a tiny GPT-2 config and text files, all made here, offline."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  TRANSFORMERS_VERBOSITY="error", DISABLE_TQDM="1")
sys.path.insert(0, str(REPO))

VOCAB_SIZE = 512


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Keep the raw-text token cache inside the test run."""
    os.environ["LMCOMPRESS_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """train/validation/test text files cut from the pydoc topics (English prose with code).

    Validation and test are eight short topics each (~20 KB), so evaluating them takes seconds.
    """
    from lmcompress.corpus import topics

    folder = tmp_path_factory.mktemp("corpus")
    documents = list(topics())
    short = [doc for doc in documents if len(doc) < 8000]
    held_out = {"validation": short[-16:-8], "test": short[-8:]}
    parts = {"train": [doc for doc in documents if doc not in short[-16:]], **held_out}
    files = {}
    for split, docs in parts.items():
        files[split] = folder / f"{split}.txt"
        files[split].write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return files


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_files):
    from lmcompress.vocab import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer([corpus_files["train"].read_text(encoding="utf-8")], VOCAB_SIZE, folder, model_max_length=128)
    return folder


def write_config(path, **overrides):
    values = {"model_type": "gpt2", "vocab_size": VOCAB_SIZE, "n_positions": 128, "n_embd": 64, "n_layer": 2,
              "n_head": 2, "bos_token_id": 0, "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "attn_pdrop": 0.0}
    values.update(overrides)
    Path(path).write_text(json.dumps(values), encoding="utf-8")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("config") / "tiny-gpt2.json")


def free_port():
    """A TCP port free now, for a torchrun rendezvous (tests run beside others on one machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun(nproc=2):
    """The command prefix that starts ``nproc`` local processes of a script."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", free_port()]


def run(args, env=None, check=True, timeout=600, cwd=REPO):
    """Run a command from the repository root with the test environment; return the CompletedProcess."""
    full_env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **(env or {})}
    args = [str(arg) for arg in args]
    if args[0].endswith(".py"):
        args = [sys.executable] + args
    result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
                             f"--- stderr\n{result.stderr[-6000:]}")
    return result


def error_line(result):
    """The last line of stderr, which is where a one-line user error must be."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, f"expected a failure, got exit 0\n{result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = error_line(result)
    assert "error:" in line, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def train_command(output_dir, tokenizer_dir, config, corpus_files, *extra):
    return ["train.py", "--config_name", config, "--tokenizer_name", tokenizer_dir,
            "--train_file", corpus_files["train"], "--validation_file", corpus_files["validation"],
            "--block_size", "64", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
            "--output_dir", output_dir, "--report_to", "none", "--save_strategy", "no", "--seed", "1",
            "--dataloader_num_workers", "0", *map(str, extra)]


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, tokenizer_dir, tiny_config, corpus_files):
    """A tiny GPT-2 trained for 150 steps on the corpus (a folder with weights and tokenizer)."""
    output_dir = tmp_path_factory.mktemp("trained") / "model"
    run(train_command(output_dir, tokenizer_dir, tiny_config, corpus_files, "--max_steps", "150"))
    return output_dir


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory, tokenizer_dir, tiny_config):
    """The same tiny GPT-2, randomly initialised (seed 0), saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("untrained") / "model"
    torch.manual_seed(0)
    config = AutoConfig.for_model(**json.loads(Path(tiny_config).read_text()))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder
