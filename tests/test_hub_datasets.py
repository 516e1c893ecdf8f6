"""The hub-dataset route, offline: dataset folders in the hub's layout (a README.md whose ``configs:`` name a
parquet file per split), built here, through tokenize_datasets.py, train.py (under torchrun too), distiller.py and
evaluate.py; their bad input; and the checks that come before any tokenization."""
import json
import math
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import REPO, assert_one_line_error, run, write_config
from lmcompress.errors import UserError
from lmcompress.models import load_config
from lmcompress.tokenization import TextSources, describe_sources, hub_documents, job_key, load_hub_splits
from test_faults import torchrun
from test_tokenize import decode_split

WIKITEXT_CONFIG = "wikitext-103-raw-v1"


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """datasets' Arrow cache inside the test run, for this process and the ones it starts."""
    import datasets

    folder = tmp_path_factory.mktemp("hf-datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(folder))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
        yield folder


def write_hub_folder(folder, configs):
    """``configs``: config name → split → columns (name → values). Returns the folder."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        (folder / config).mkdir(parents=True, exist_ok=True)
        for split, columns in splits.items():
            path = f"{config}/{split}-00000-of-00001.parquet"
            pq.write_table(pa.table(columns), folder / path)
            lines += [f"  - split: {split}", f"    path: {path}"]
    (folder / "README.md").write_text("\n".join(lines + ["---", "", "Made by the tests."]) + "\n", encoding="utf-8")
    return folder


def wikitext_records(text):
    """WikiText's layout: one record per line, newline kept; ' = Title = ' headers; '' for a blank line."""
    records = []
    for number, paragraph in enumerate(text.split("\n\n")):
        records += ["", f" = Section {number} = \n", ""]
        records += [f" {line}\n" if line.strip() else "" for line in paragraph.splitlines()]
    return records


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory, corpus_files):
    """A WikiText-like folder: two configs, train/validation/test; returns (folder, records per split)."""
    records = {"train": wikitext_records(corpus_files["train"].read_text(encoding="utf-8")[:30000]),
               "validation": wikitext_records(corpus_files["validation"].read_text(encoding="utf-8")[:6000]),
               "test": wikitext_records(corpus_files["test"].read_text(encoding="utf-8")[:6000])}
    small = {split: lines[: len(lines) // 4] for split, lines in records.items()}
    folder = write_hub_folder(tmp_path_factory.mktemp("hub") / "wikitext", {
        WIKITEXT_CONFIG: {split: {"text": lines} for split, lines in records.items()},
        "wikitext-2-raw-v1": {split: {"text": lines} for split, lines in small.items()}})
    return folder, records


def openwebtext_documents(n):
    """``(dirty, clean)`` documents with inner newlines: each dirty one holds a run of two blank lines and one line
    of a kind --clean drops: html, duplicate, near-duplicate, too short, non-alphabetic, in turn."""
    dirty, clean = [], []
    for i in range(n):
        first = f"Story {i} begins with a sentence that belongs to it alone.\n"
        second = f"Its second line carries story {i} onwards.\n"
        last = f"After a blank line, the story ends in paragraph {i}.\n"
        noise = ["<p>Subscribe to our newsletter</p>\n", first, first.upper().replace(".", "!"), "ok\n",
                 "1234 5678 9012 3456 !!!! ???? $$$$\n"][i % 5]
        dirty.append(first + second + noise + "\n\n" + last)
        clean.append(first + second + "\n" + last)
    return dirty, clean


@pytest.fixture(scope="module")
def openwebtext(tmp_path_factory):
    """An OpenWebText-like folder: one config, a train split only; returns (folder, dirty, clean documents)."""
    dirty, clean = openwebtext_documents(2000)
    folder = write_hub_folder(tmp_path_factory.mktemp("hub") / "openwebtext",
                              {"plain_text": {"train": {"text": dirty}}})
    return folder, dirty, clean


def tokenize(tokenizer_dir, output_dir, dataset, *extra, check=True):
    return run(["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir, "--dataset_name", dataset,
                "--output_dir", output_dir, *extra], check=check)


def meta_of(folder):
    return json.loads((folder / "meta.json").read_text())


def test_wikitext_like_splits_decode_to_their_concatenated_records(tmp_path, tokenizer_dir, wikitext):
    folder, records = wikitext
    tokenize(tokenizer_dir, tmp_path / "tokens", folder, "--dataset_config_name", WIKITEXT_CONFIG)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    meta = meta_of(tmp_path / "tokens")
    for split, lines in records.items():
        assert decode_split(tmp_path / "tokens", split, tokenizer) == "".join(lines), split
        assert meta["splits"][split]["n_documents"] == 1, "one line per record: one document per split"


def test_openwebtext_like_validation_cleaning_and_workers(tmp_path, tokenizer_dir, openwebtext):
    folder, dirty, clean = openwebtext
    for num_proc in (1, 2):
        tokenize(tokenizer_dir, tmp_path / f"p{num_proc}", folder, "--clean", "--num_proc", num_proc)
    for split in ("train", "validation"):
        assert (tmp_path / "p1" / f"{split}.bin").read_bytes() == (tmp_path / "p2" / f"{split}.bin").read_bytes()
    meta = meta_of(tmp_path / "p1")
    n_validation = len(dirty) * 5 // 100  # the first records, as run_clm.py
    assert meta["cleaning"]["counts"] == {"duplicate": 400, "near_duplicate": 400, "html": 400, "too_short": 400,
                                          "nonalpha": 400, "blank_run": 2000, "kept": 4 * 2000}
    assert meta["splits"]["validation"]["n_documents"] == n_validation
    assert meta["splits"]["train"]["n_documents"] == len(dirty) - n_validation
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert decode_split(tmp_path / "p1", "validation", tokenizer) == "".join(clean[:n_validation])
    assert decode_split(tmp_path / "p1", "train", tokenizer) == "".join(clean[n_validation:])


def test_hub_records_are_read_a_batch_at_a_time(tmp_path):
    records = [f"Document {i} says " + "several plain words " * 15 for i in range(40000)]
    folder = write_hub_folder(tmp_path / "big", {"default": {"train": {"text": records}}})
    sources = TextSources(dataset_name=str(folder), validation_split_percentage=0)
    list(load_hub_splits(sources))  # datasets converts the parquet file into its Arrow cache once
    tracemalloc.start()
    n_chars = sum(len(chunk) for _, chunks in hub_documents(sources, None) for chunk in chunks)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    text_bytes = sum(map(len, records))
    assert n_chars == text_bytes
    assert peak < text_bytes / 8, f"{peak:,} bytes of Python objects at once for {text_bytes:,} bytes of text"


def test_an_edited_dataset_folder_is_a_new_tokenization_job(tmp_path):
    sources = TextSources(dataset_name=str(tmp_path / "data"))
    key = lambda: job_key(sources, describe_sources(sources), {"fingerprint": "any"})  # noqa: E731
    write_hub_folder(tmp_path / "data", {"default": {"train": {"text": ["One document.\n"]}}})
    before = key()
    write_hub_folder(tmp_path / "data", {"default": {"train": {"text": ["One edited document.\n"]}}})
    assert key() != before


def test_train_distil_and_evaluate_take_the_dataset_by_name(tmp_path, wikitext, untrained_model):
    """Tokenized on first use, under torchrun by one rank while the other waits (train.py, then evaluate.py on
    another config), and reused (distiller.py takes train.py's tokens)."""
    folder, _ = wikitext
    cache = tmp_path / "cache"
    env = {"LMCOMPRESS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    by_name = ["--dataset_name", folder, "--block_size", "32"]
    data = [*by_name, "--dataset_config_name", WIKITEXT_CONFIG]
    steps = ["--per_device_train_batch_size", "2", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none"]
    trained = run([*torchrun(), REPO / "train.py", "--model_name_or_path", untrained_model, *data, *steps,
                   "--output_dir", tmp_path / "train"], env=env)
    assert trained.stdout.count("Reusing") == 1, "one rank tokenizes, the other finds its folder"
    assert (tmp_path / "train" / "model.safetensors").is_file()
    token_folders = [path for path in cache.iterdir() if not path.name.startswith(".")]
    assert len(token_folders) == 1
    student = write_config(tmp_path / "student.json", n_layer=1)
    distilled = run(["distiller.py", "--teacher_name_or_path", untrained_model, "--student_config", student, *data,
                     *steps, "--output_dir", tmp_path / "distil"], env=env)
    assert "Reusing" in distilled.stdout and (tmp_path / "distil" / "model.safetensors").is_file()
    evaluated = run([*torchrun(), REPO / "evaluate.py", "--model_name_or_path", tmp_path / "train", *by_name,
                     "--dataset_config_name", "wikitext-2-raw-v1", "--output_file", tmp_path / "ppl.json",
                     "--report_to", "none"], env=env)
    assert evaluated.stdout.count("Reusing") == 1, "one rank tokenizes, the other finds its folder"
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert math.isfinite(result["perplexity"]) and result["world_size"] == 2
    folders = {path for path in cache.iterdir() if not path.name.startswith(".")}
    assert len(folders) == 2 and token_folders[0] in folders and result["data"] in map(str, folders - {token_folders[0]})


def test_a_dataset_without_a_text_column_fails_in_one_line(tmp_path, tokenizer_dir):
    folder = write_hub_folder(tmp_path / "data", {"default": {"train": {
        "url": ["https://example.com/a"], "body": ["Some text.\n"], "n": [1]}}})
    result = tokenize(tokenizer_dir, tmp_path / "tokens", folder, check=False)
    assert_one_line_error(result, "no 'text' column", "url, body, n")
    assert not (tmp_path / "tokens").exists()


def test_an_unknown_config_fails_in_one_line(tmp_path, tokenizer_dir, wikitext):
    result = tokenize(tokenizer_dir, tmp_path / "tokens", wikitext[0], "--dataset_config_name", "wikitext-7",
                      check=False)
    assert_one_line_error(result, "--dataset_name", "wikitext-7", WIKITEXT_CONFIG)


def call_tool(tool, argv):
    """train.py's, distiller.py's, evaluate.py's or truncate.py's work up to where a bad flag must have been
    refused."""
    from lmcompress import distillation, evaluation, training, truncation

    argv = [str(arg) for arg in argv]
    if tool in ("evaluate.py", "truncate.py"):
        return (evaluation if tool == "evaluate.py" else truncation).main.__wrapped__(argv)
    return (training if tool == "train.py" else distillation).build_trainer(argv)


def tool_argv(tool, model, output, *data):
    if tool == "evaluate.py":
        return ["--model_name_or_path", model, *data, "--output_file", output / "ppl.json", "--report_to", "none"]
    if tool == "truncate.py":
        return ["--teacher_name_or_path", model, *data, "--output_dir", output]
    models = (["--model_name_or_path", model] if tool == "train.py" else
              ["--teacher_name_or_path", model, "--student_name_or_path", model])
    return [*models, *data, "--output_dir", output, "--report_to", "none", "--save_strategy", "no"]


EARLY_REFUSALS = {  # case: (tool, data and other flags, what the one line says)
    "evaluate --stride 0": ("evaluate.py", ["--test_file", "{validation}", "--stride", "0"], ["--stride 0"]),
    "distil --layer_map naming a missing teacher block": (
        "distiller.py", ["--train_file", "{train}", "--alpha_hidden", "1", "--layer_map", "0:0,1:7"],
        ["--layer_map 0:0,1:7", "no block 7"]),
    "evaluate --split test of a train file": (
        "evaluate.py", ["--train_file", "{train}", "--split", "test"], ["--split test", "'test'", "train, validation"]),
    "train on a validation file only": ("train.py", ["--validation_file", "{validation}"], ["'train'", "validation"]),
    "train evaluating with no validation data": (
        "train.py", ["--train_file", "{train}", "--validation_split_percentage", "0", "--eval_strategy", "steps"],
        ["--eval_strategy steps", "'validation'", "--validation_file"]),
    "distil evaluating with no validation data": (
        "distiller.py", ["--train_file", "{train}", "--validation_split_percentage", "0", "--eval_strategy", "steps"],
        ["--eval_strategy steps", "'validation'", "--validation_file"]),
    "evaluate --split test of a hub dataset with a train split only": (
        "evaluate.py", ["--dataset_name", "{openwebtext}", "--split", "test"],
        ["--split test", "--dataset_name", "has no 'test' split (it has: train, validation)"]),
    "truncate --calibration_split test of a train file": (
        "truncate.py", ["--strategy", "importance", "--num_layers", "1", "--train_file", "{train}",
                        "--calibration_split", "test"], ["--calibration_split test", "'test'", "train, validation"]),
}


@pytest.mark.parametrize("case", EARLY_REFUSALS)
def test_a_bad_flag_or_missing_split_is_refused_before_any_tokenization(case, tmp_path, monkeypatch, untrained_model,
                                                                        corpus_files, request):
    tool, data, fragments = EARLY_REFUSALS[case]
    paths = {"train": corpus_files["train"], "validation": corpus_files["validation"],
             "openwebtext": request.getfixturevalue("openwebtext")[0] if "{openwebtext}" in data else None}
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMCOMPRESS_CACHE", str(cache))
    with pytest.raises(UserError) as refused:
        call_tool(tool, tool_argv(tool, untrained_model, tmp_path / "out", *[arg.format(**paths) for arg in data]))
    for fragment in fragments:
        assert fragment in str(refused.value), str(refused.value)
    assert not cache.exists() or not any(cache.iterdir()), "nothing was tokenized"


def test_a_model_folder_that_does_not_exist_says_so(tmp_path, corpus_files):
    missing = "outputs/truncated/gpt2-alt"
    result = run([REPO / "train.py", "--model_name_or_path", missing, "--train_file", corpus_files["train"],
                  "--output_dir", tmp_path / "out", "--report_to", "none"], cwd=tmp_path, check=False)
    line = assert_one_line_error(result, missing)
    assert "Repo id" not in line and "truncate.py" in line, line


@pytest.mark.parametrize("tool", ["train.py", "distiller.py", "evaluate.py"])
def test_a_model_folder_inside_an_existing_folder_is_a_folder(tool, tmp_path, monkeypatch, untrained_model,
                                                              corpus_files):
    """``outputs/finetune`` looks like a hub ``org/name``; with ``outputs/`` here it is a folder not made yet."""
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = tool_argv(tool, "outputs/finetune", tmp_path / "out", "--train_file", corpus_files["train"])
    if tool == "distiller.py":
        argv[1] = untrained_model  # the teacher; the student is the missing folder
    with pytest.raises(UserError, match="outputs/finetune: no such folder .*truncate.py"):
        call_tool(tool, argv)


def test_an_org_and_name_that_is_neither_a_folder_nor_cached_names_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="nosuch-org/model: no such folder .*nor a hub model in the local cache"):
        load_config(None, "nosuch-org/model")


def test_the_launch_scripts_take_the_dataset_by_name(tmp_path, wikitext, untrained_model):
    """train.sh, distil.sh and evaluate.sh with DATASET_NAME / DATASET_CONFIG naming a hub-layout folder."""
    folder, _ = wikitext
    common = {"DATASET_NAME": str(folder), "DATASET_CONFIG": "wikitext-2-raw-v1", "BLOCK_SIZE": "32",
              "NPROC_PER_NODE": "1", "PRECISION": "fp32", "LMCOMPRESS_CACHE": str(tmp_path / "cache"),
              "OMP_NUM_THREADS": "1"}
    steps = ["--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none"]
    run(["bash", "train.sh", *steps], env={**common, "MODEL": untrained_model, "OUTPUT_DIR": tmp_path / "train",
                                           "BATCH_SIZE": "2", "GRAD_ACC": "1"})
    assert math.isfinite(json.loads((tmp_path / "train" / "eval_results.json").read_text())["perplexity"])
    student = write_config(tmp_path / "student.json", n_layer=1)
    run(["bash", "distil.sh", *steps], env={**common, "TEACHER": untrained_model, "STUDENT_CONFIG": student,
                                            "TOKENIZER": untrained_model, "OUTPUT_DIR": tmp_path / "distil",
                                            "BATCH_SIZE": "2", "GRAD_ACC": "1"})
    assert (tmp_path / "distil" / "model.safetensors").is_file()
    run(["bash", "evaluate.sh"], env={**common, "MODEL": tmp_path / "distil", "OUTPUT_FILE": tmp_path / "ppl.json"})
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert result["split"] == "test" and math.isfinite(result["perplexity"])
