"""tokenize_datasets.py: exact round trips, streaming cuts, reuse, cleaning and bad input."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import SHARED_DATA, assert_one_line_error, run
from lmcompress.cleaning import LineCleaner
from lmcompress.tokenfiles import token_dtype
from lmcompress.tokenization import pieces, safe_cut


def decode_split(folder, split, tokenizer):
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.fromfile(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
    assert ids[-1] == tokenizer.eos_token_id, "every document ends with the end-of-text token"
    documents = np.split(ids, np.flatnonzero(ids == tokenizer.eos_token_id) + 1)
    return "".join(tokenizer.decode(doc[:-1].tolist()) for doc in documents if len(doc))


def test_round_trip_is_exact_with_carved_validation(tmp_path, tokenizer_dir, corpus_files):
    text = corpus_files["train"].read_text(encoding="utf-8")
    run(["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir, "--train_file", corpus_files["train"],
         "--validation_split_percentage", "10", "--output_dir", tmp_path / "tokens"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    validation = decode_split(tmp_path / "tokens", "validation", tokenizer)
    train = decode_split(tmp_path / "tokens", "train", tokenizer)
    assert validation + train == text
    assert 0.05 < len(validation.encode()) / len(text.encode()) < 0.15
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16"
    assert meta["tokenizer"]["vocab_size"] == len(tokenizer) and meta["tokenizer"]["fingerprint"]
    assert meta["sources"][0]["bytes"] == len(text.encode()) and len(meta["sources"][0]["sha256"]) == 64
    whole = tokenizer(text)["input_ids"]
    assert meta["splits"]["train"]["n_tokens"] + meta["splits"]["validation"]["n_tokens"] - 2 == pytest.approx(
        len(whole), abs=2), "cutting the text costs at most a token at the cut"


def test_pieces_tokenize_like_the_whole_text(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "".join(f"Line {i}:  two  spaces\tand tab \n\n\n   indented code(x)\r\n trailing \n" for i in range(300))
    cut = list(pieces([text[i : i + 97] for i in range(0, len(text), 97)], piece_chars=200))
    assert len(cut) > 20 and "".join(cut) == text
    assert sum((tokenizer(piece)["input_ids"] for piece in cut), []) == tokenizer(text)["input_ids"]


def test_safe_cut_only_between_words():
    text = "alpha beta\n\ngamma  delta epsilon"
    position = safe_cut(text, 20)
    assert text[position] in " \n" and not text[position - 1].isspace() and not text[position + 1].isspace()


def test_parallel_tokenization_gives_the_same_files(tmp_path, tokenizer_dir, corpus_files):
    for num_proc in (1, 2):
        run(["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir, "--train_file", corpus_files["train"],
             "--validation_file", corpus_files["validation"], "--num_proc", num_proc,
             "--output_dir", tmp_path / f"p{num_proc}"])
    for split in ("train", "validation"):
        assert (tmp_path / "p1" / f"{split}.bin").read_bytes() == (tmp_path / "p2" / f"{split}.bin").read_bytes()


def test_rerun_reuses_and_overwrite_redoes(tmp_path, tokenizer_dir, corpus_files):
    args = ["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir, "--train_file", corpus_files["test"],
            "--output_dir", tmp_path / "tokens"]
    first = run(args)
    assert "Reusing" not in first.stdout
    assert "Reusing" in run(args).stdout
    assert "Reusing" not in run(args + ["--overwrite"]).stdout
    other = run(args[:3] + ["--train_file", corpus_files["validation"], "--output_dir", tmp_path / "tokens"], check=False)
    assert_one_line_error(other, "--output_dir", "--overwrite")


def test_token_dtype_grows_with_the_vocabulary():
    assert token_dtype(50257) == "uint16" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


CLEANING_INPUT = """The first line is a perfectly ordinary sentence.
The first line is a perfectly ordinary sentence.
THE first line is a perfectly ordinary sentence!
<div class="ad">Buy now</div>
ok
1234 5678 9012 3456 !!!! ???? $$$$ 7890

A second paragraph that is unique and long enough.
"""


def test_clean_drops_each_kind_and_counts_it(tmp_path, tokenizer_dir):
    source = tmp_path / "dirty.txt"
    source.write_text(CLEANING_INPUT, encoding="utf-8")
    common = ["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir, "--train_file", source,
              "--validation_split_percentage", "0"]
    run(common + ["--clean", "--output_dir", tmp_path / "clean"])
    counts = json.loads((tmp_path / "clean" / "meta.json").read_text())["cleaning"]["counts"]
    assert counts == {"duplicate": 1, "near_duplicate": 1, "html": 1, "too_short": 1, "nonalpha": 1,
                      "blank_run": 0, "kept": 3}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert decode_split(tmp_path / "clean", "train", tokenizer) == (
        "The first line is a perfectly ordinary sentence.\n\nA second paragraph that is unique and long enough.\n")
    run(common + ["--output_dir", tmp_path / "raw"])
    assert decode_split(tmp_path / "raw", "train", tokenizer) == CLEANING_INPUT
    assert json.loads((tmp_path / "raw" / "meta.json").read_text())["cleaning"]["counts"] is None


def test_blank_runs_collapse_when_cleaning():
    cleaner = LineCleaner()
    kept = [line for line in ["Some real text here.\n", "\n", "\n", "More real text here.\n"] if cleaner.keep(line)]
    assert kept == ["Some real text here.\n", "\n", "More real text here.\n"]
    assert cleaner.counts["blank_run"] == 1


@pytest.mark.parametrize("kind,content,fragment", [
    ("missing", None, "no such file"),
    ("empty", b"", "empty"),
    ("latin1", "caf\u00e9 cr\u00e8me\n".encode("latin-1"), "not UTF-8"),
    ("binary", b"\x00\x01\x02binary\x00" * 50, "binary"),
])
def test_bad_text_files_fail_in_one_line_without_output(tmp_path, tokenizer_dir, kind, content, fragment):
    source = tmp_path / f"{kind}.txt"
    if content is not None:
        source.write_bytes(content)
    result = run(["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir, "--train_file", source,
                  "--output_dir", tmp_path / "out"], check=False)
    assert_one_line_error(result, "--train_file", fragment)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".staging-*")), "the staging folder is removed"


@pytest.mark.realdata
def test_gpt2_tokenizer_on_real_text(tmp_path):
    if not (SHARED_DATA / "gpt2-tokenizer" / "vocab.json").exists():
        pytest.skip("../shared/data is not present")
    from transformers import GPT2TokenizerFast

    folder = tmp_path / "gpt2-tokenizer"
    source = SHARED_DATA / "gpt2-tokenizer"
    GPT2TokenizerFast(vocab=str(source / "vocab.json"), merges=str(source / "merges.txt")).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    text_file = SHARED_DATA / "jargon.txt"
    run(["tokenize_datasets.py", "--tokenizer_name_or_path", folder, "--train_file", text_file,
         "--output_dir", tmp_path / "tokens"])
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 50257
    assert (tmp_path / "tokens" / "train.bin").stat().st_size == 2 * meta["splits"]["train"]["n_tokens"]
    text = text_file.read_text(encoding="utf-8")
    assert decode_split(tmp_path / "tokens", "validation", tokenizer) + decode_split(
        tmp_path / "tokens", "train", tokenizer) == text


def test_a_failure_while_tokenizing_closes_the_token_files(tmp_path, tokenizer_dir, corpus_files, capsys):
    import contextlib
    import os

    from lmcompress.tokenization import READ_BYTES
    from lmcompress.tokenize_cli import main

    def open_files_under(folder):
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the descriptor that listed them is closed by now
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [link for link in links if link.startswith(str(folder))]

    text = corpus_files["train"].read_bytes()
    source = tmp_path / "late-latin1.txt"
    # a byte that is not UTF-8 after two reads of text: tokens are being written when it is found
    source.write_bytes(text * (2 * READ_BYTES // len(text) + 1) + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(SystemExit) as failed:  # it keeps the failed call's frames, and with them any file left open
        main(["--tokenizer_name_or_path", str(tokenizer_dir), "--train_file", str(source),
              "--output_dir", str(tmp_path / "out")])
    assert "not UTF-8" in capsys.readouterr().err
    assert open_files_under(tmp_path) == [], failed.value
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".staging-*"))
