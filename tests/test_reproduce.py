"""reproduce.sh: the dry run of the paper scale, and the mini pipeline end to end at toy size, resumable."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, assert_one_line_error, run

from lmcompress import report
from lmcompress.mini import model_config

TOY = {"WIDTH": "32", "VOCAB_SIZE": "400", "BLOCK_SIZE": "32", "BATCH_SIZE": "4", "TEACHER_STEPS": "30",
       "STUDENT_STEPS": "4", "FINETUNE_STEPS": "4", "CALIBRATION_TOKENS": "256", "OMP_NUM_THREADS": "1"}
ROWS = [row[1] for row in report.ROWS]


def test_paper_dry_run_prints_the_papers_commands(tmp_path):
    result = run(["bash", "reproduce.sh"], env={"SCALE": "paper", "DRY_RUN": "1", "OUTPUT_ROOT": tmp_path / "paper"})
    lines = result.stdout.splitlines()
    assert not (tmp_path / "paper").exists(), "a dry run writes nothing"
    openwebtext = [line for line in lines if "--dataset_name openwebtext" in line]
    assert len(openwebtext) == 2 and sum("--clean" in line for line in openwebtext) == 1, "raw and cleaned"
    assert any("wikitext-103-raw-v1" in line for line in lines)
    assert sum("truncate.py --teacher_name_or_path gpt2 --strategy" in line for line in lines) == 4
    assert any("--strategy alt --num_layers 6" in line for line in lines)
    importance = next(line for line in lines if "--strategy importance" in line)
    assert "--importance block_influence" in importance and "--calibration_split train" in importance
    assert sum("distil.sh" in line for line in lines) == 7 and sum("/train.sh" in line for line in lines) == 8
    assert sum("evaluate.sh" in line for line in lines) == 12
    assert any("pretrain.sh" in line and "truncated/alt" in line and "pretrain-raw" in line for line in lines)
    assert any("configs/distilgpt2.json" in line for line in lines)
    assert "--max_steps" not in result.stdout, "the paper scale runs the scripts' own (paper) settings"
    kd = [line for line in lines if "distil.sh" in line and "TEACHER=" in line and "teacher/finetune" in line]
    assert len(kd) == 4, "every ft-* row is taught by the fine-tuned teacher"
    for line in kd:
        assert "STUDENT=" + str(tmp_path / "paper" / "distil-kd" / "distil") in line
        assert all(setting in line for setting in ("EPOCHS=6", "BATCH_SIZE=8", "GRAD_ACC=4", "TEMPERATURE=1.0",
                                                   "ALPHA_CE=0.2", "ALPHA_CLM=0.2", "ALPHA_COS=0.2"))
        # distil_pkd.sh's runner defaults, which are also train.sh's (ft-none's)
        assert all(setting in line for setting in ("LEARNING_RATE=5e-5", "WARMUP_RATIO=0.0", "FREEZE_POS_EMBS=0"))
    hidden = next(line for line in kd if "--alpha_hidden 0.2" in line)
    assert "--layer_map" not in hidden, "the distilled student's truncation.json maps its blocks"
    assert any("--alpha_att 0.2 --alpha_val 0.2" in line for line in kd)
    assert any("--divergence reverse_kl" in line for line in kd)


def test_rows_selects_a_subset(tmp_path):
    result = run(["bash", "reproduce.sh"], env={"SCALE": "paper", "DRY_RUN": "1", "ROWS": "ft-kd",
                                                "OUTPUT_ROOT": tmp_path / "paper"})
    assert "ft-kd/finetune" in result.stdout and "ft-kd-hidden" not in result.stdout
    assert "teacher/finetune" in result.stdout and "distil-kd/distil" in result.stdout, "what ft-kd needs runs"
    assert "alt-pretrain" not in result.stdout and "truncated/first" not in result.stdout


@pytest.mark.parametrize("rows, runs", [("ft-none", "distil-kd/finetune"), ("alt-pretrain-clean", "alt-pretrain/finetune")])
def test_rows_that_reuse_another_run_run_it(tmp_path, rows, runs):
    result = run(["bash", "reproduce.sh"], env={"SCALE": "paper", "DRY_RUN": "1", "ROWS": rows,
                                                "OUTPUT_ROOT": tmp_path / "paper"})
    assert f"{tmp_path / 'paper' / runs} " in result.stdout


def test_an_unknown_row_is_refused_with_the_valid_names(tmp_path):
    result = run(["bash", "reproduce.sh"], env={"DRY_RUN": "1", "ROWS": "ft-kd ft-kdd", "OUTPUT_ROOT": tmp_path / "x"},
                 check=False)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    prefix = "reproduce.sh: error: ROWS: no row ft-kdd; the rows are: "
    assert line.startswith(prefix) and sorted(line[len(prefix):].split()) == sorted(ROWS), "every report row"


def test_llama_writes_its_own_results_folder():
    result = run(["bash", "reproduce.sh"], env={"ARCH": "llama", "SCALE": "mini", "DRY_RUN": "1"})
    commands = result.stdout.splitlines()
    assert any("lmcompress.mini" in line and "--arch llama" in line for line in commands)
    assert all("outputs/reproduce-mini-llama/" in line for line in commands[:-1] if "outputs/" in line)
    assert "--output_root outputs/reproduce-mini-llama " in commands[-1]


@pytest.mark.parametrize("rows, stages, absent", [
    ("importance", ["truncate-importance", "importance-distil"], ["truncate-distil", "distil-kd-distil"]),
    ("ft-kd", ["truncate-distil", "distil-kd-distil"], ["truncate-importance", "importance-distil"]),
])
def test_rows_run_only_the_stages_they_need(tmp_path, rows, stages, absent):
    result = run(["bash", "reproduce.sh"], env={"SCALE": "mini", "DRY_RUN": "1", "ROWS": rows,
                                                "OUTPUT_ROOT": tmp_path / "mini"})
    folders = {"truncate-importance": "truncated/importance", "importance-distil": "importance/distil",
               "truncate-distil": "truncated/distil", "distil-kd-distil": "distil-kd/distil"}
    for stage in stages:
        assert f"{tmp_path / 'mini' / folders[stage]} " in result.stdout, stage
    for stage in absent:
        assert f"{tmp_path / 'mini' / folders[stage]} " not in result.stdout, stage


def test_unknown_arch_is_refused(tmp_path):
    result = run(["bash", "reproduce.sh"], env={"ARCH": "bert", "DRY_RUN": "1", "OUTPUT_ROOT": tmp_path / "x"},
                 check=False)
    assert result.returncode == 2 and "ARCH=bert" in result.stderr


def test_a_llama_arch_at_paper_scale_is_refused_in_one_line(tmp_path):
    result = run(["bash", "reproduce.sh"], env={"SCALE": "paper", "ARCH": "llama", "DRY_RUN": "1",
                                                "OUTPUT_ROOT": tmp_path / "x"}, check=False)
    assert_one_line_error(result, "ARCH=llama", "SCALE=paper", "SCALE=mini")
    assert result.returncode == 2 and not (tmp_path / "x").exists()


def test_unknown_scale_is_refused(tmp_path):
    result = run(["bash", "reproduce.sh"], env={"SCALE": "huge", "OUTPUT_ROOT": tmp_path / "x"}, check=False)
    assert result.returncode == 2 and "SCALE=huge" in result.stderr


def start(root, **env):
    env = {**os.environ, "PYTHON": sys.executable, "SCALE": "mini", "OUTPUT_ROOT": str(root), **TOY, **env}
    return subprocess.Popen(["bash", "reproduce.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_mini_pipeline_resumes_after_a_kill_and_reuses_every_stage(tmp_path):
    root = tmp_path / "mini"
    interrupted = start(root)
    deadline = time.time() + 600
    while not (root / "truncated" / "alt" / "truncation.json").exists():
        assert interrupted.poll() is None and time.time() < deadline, interrupted.stdout.read()[-3000:]
        time.sleep(0.5)
    os.killpg(interrupted.pid, signal.SIGKILL)
    interrupted.wait()
    teacher_seconds = (root / "timings" / "teacher-pretrain.seconds").read_text()

    completed = start(root)
    output, _ = completed.communicate(timeout=900)
    assert completed.returncode == 0, output[-4000:]
    assert "== teacher-pretrain: done" in output and "== truncate-alt: done" in output
    assert (root / "timings" / "teacher-pretrain.seconds").read_text() == teacher_seconds
    for name in ("results.md", "results.csv", "results.png", "reproduce.log"):
        assert (root / name).stat().st_size > 0, name
    with open(root / "results.csv", encoding="utf-8") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ROWS
    assert {row["table"] for row in rows.values()} == {"kd_finetune", "compression", "cleaning"}
    assert rows["ft-none"]["test_ppl"] == rows["distil-kd"]["test_ppl"], "ft-none is distil-kd's run"
    assert rows["alt-pretrain-clean"]["test_ppl"] == rows["alt-pretrain"]["test_ppl"]
    assert "html=" in rows["alt-pretrain-clean"]["cleaning_dropped"]
    assert float(re.search(r"\(([\d.]+)% of lines\)", rows["alt-pretrain-clean"]["cleaning_dropped"])[1]) >= 5
    assert rows["ft-kd"]["stage1_seconds"] == rows["distil-kd"]["stage1_seconds"], "the shared stage, counted"
    assert rows["alt-pretrain-raw"]["cleaning_dropped"] == "not cleaned"
    for row in rows.values():
        assert float(row["test_ppl"]) > 1 and float(row["validation_ppl"]) > 1 and float(row["test_word_ppl"]) > 1
    assert rows["alt-pretrain"]["layers"] == "0,2" and rows["first"]["layers"] == "0,1"
    assert int(rows["alt-kd"]["stage1_tokens"]) == 4 * 4 * 32
    markdown = (root / "results.md").read_text()
    assert "Greedy continuations" in markdown
    headings = [markdown.index(f"## {heading}") for heading in report.TABLES.values()]
    assert headings == sorted(headings), "the three tables in the paper's order"

    again = start(root)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0
    assert output.count(": done (") == output.count("== "), "a re-run only reuses finished stages"
    with open(root / "results.csv", encoding="utf-8") as handle:
        assert {row["model"]: row["test_ppl"] for row in csv.DictReader(handle)} == {
            name: row["test_ppl"] for name, row in rows.items()}


@pytest.mark.slow
def test_a_llama_teacher_runs_the_mini_rows_offline(tmp_path):
    """ARCH=llama: the teacher built and pre-trained here is a Llama; the importance row truncates and distils it."""
    root = tmp_path / "mini-llama"
    process = start(root, ARCH="llama", ROWS="teacher importance")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    with open(root / "results.csv", encoding="utf-8") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["teacher", "importance"]
    assert all(1 < float(row["test_ppl"]) < float("inf") for row in rows.values())
    assert json.loads((root / "teacher" / "finetune" / "config.json").read_text())["model_type"] == "llama"
    truncation = json.loads((root / "truncated" / "importance" / "truncation.json").read_text())
    assert len(truncation["layers"]) == 2 and len(truncation["importance"]["scores"]) == 4
    assert rows["importance"]["layers"] == ",".join(map(str, truncation["layers"]))
    assert not (root / "distil-kd").exists(), "rows not asked for are not run"


def test_findings_are_computed_from_the_numbers():
    def row(table, model, ppl, seconds=10.0, dropped=None):
        return {"table": table, "model": model, "test_ppl": ppl, "stage1_seconds": seconds,
                "cleaning_dropped": dropped}

    kd = [row("kd_finetune", "ft-none", 100.0), row("kd_finetune", "ft-kd", 90.0)]
    assert "helps here" in report.kd_finetune_finding(kd) and "ft-kd -10.0 %" in report.kd_finetune_finding(kd)
    assert "this run agrees" in report.kd_finetune_finding(kd)
    kd[1]["test_ppl"] = 99.5
    assert "no KD variant beats plain fine-tuning by more than 1 %" in report.kd_finetune_finding(kd)
    kd[1]["test_ppl"] = 100.5
    assert "every KD variant does worse" in report.kd_finetune_finding(kd) and "differs" in report.kd_finetune_finding(kd)
    assert "optimiser step" not in report.kd_finetune_finding(kd)
    kd[0]["tokens_per_step"], kd[1]["tokens_per_step"] = 131072, 32768
    assert "tokens per optimiser step (131,072 against 32,768)" in report.kd_finetune_finding(kd)
    compression = [row("compression", "teacher", 50.0), row("compression", "distil-kd", 60.0, 30.0),
                   row("compression", "alt-pretrain", 66.0, 20.0)]
    text = report.compression_finding(compression)
    assert "ahead of every student" in text and "+10.0 %" in text and "this run differs" in text
    compression[2]["test_ppl"] = 57.0
    assert "this run agrees" in report.compression_finding(compression)
    compression[0]["test_ppl"] = 61.0
    assert "NOT ahead" in report.compression_finding(compression)
    cleaning = [row("cleaning", "alt-pretrain-raw", 80.0, dropped="not cleaned"),
                row("cleaning", "alt-pretrain-clean", 76.0, dropped="html=3 (5.0% of lines)")]
    assert "-5.0 %" in report.cleaning_finding(cleaning) and "agrees" in report.cleaning_finding(cleaning)


def test_clean_drops_at_least_5_percent_of_the_mini_raw_corpus_of_every_kind_of_noise():
    """The raw pre-training text lmcompress.mini writes, cleaned as tokenize_datasets.py --clean cleans a file."""
    from lmcompress.cleaning import LineCleaner
    from lmcompress.corpus import docstrings, noisy_documents, with_noise
    from lmcompress.tokenization import cleaned

    text = "\n\n".join(with_noise(docstrings(), noisy_documents())) + "\n"
    cleaner = LineCleaner()
    kept = sum(1 for _ in cleaned([text], cleaner))
    counts = cleaner.counts
    assert counts["kept"] == kept and sum(counts.values()) == len(text.splitlines())
    assert 1 - kept / sum(counts.values()) >= 0.05
    assert all(counts[kind] > 0 for kind in ("duplicate", "html", "too_short", "nonalpha")), counts


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mini_configs_build_the_architecture(arch):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**model_config(arch, vocab_size=64, block_size=16, width=32, n_layer=3))
    model = AutoModelForCausalLM.from_config(config)
    assert config.model_type == arch and config.num_hidden_layers == 3
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


# validation and test perplexity, first-stage and fine-tuning seconds of each run folder (the mini tables of
# docs/reproduction.md)
MEASURED = {"distil-kd": (157.33, 190.74, ("distil", 35), 17), "ft-kd": (160.43, 193.31, None, 29),
            "ft-kd-hidden": (160.26, 193.23, None, 29), "ft-kd-attention": (160.88, 193.27, None, 33),
            "ft-reverse-kl": (161.01, 193.48, None, 30), "teacher": (152.11, 186.24, ("pretrain", 209), 22),
            "random-init": (582.17, 646.68, None, 16), "first": (160.39, 192.50, None, 16),
            "alt-pretrain": (158.49, 193.29, ("pretrain", 16), 16), "alt-kd": (156.70, 190.22, ("distil", 32), 16),
            "importance": (158.55, 190.93, ("distil", 29), 17),
            "alt-pretrain-raw": (159.16, 188.71, ("pretrain", 15), 16)}


def write_run_folders(root):
    """The files report.py reads, for the runs of MEASURED; each fine-tuning evaluated at half and full epoch."""
    def put(path, values):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values) if isinstance(values, dict) else str(values), encoding="utf-8")

    for index, (folder, (valid, test, stage, finetune_seconds)) in enumerate(MEASURED.items()):
        finetune = root / folder / "finetune"
        put(finetune / "perplexity.json", {"perplexity": test, "word_perplexity": 200 * test})
        put(finetune / "eval_results.json", {"perplexity": valid})
        put(finetune / "train_results.json", {"train_tokens": 102400, "n_parameters": 937472})
        put(finetune / "config.json", {"n_layer": 2})
        losses = [math.log(valid) + 0.3 + 0.01 * index, math.log(valid)]
        put(finetune / "trainer_state.json", {"global_step": 50, "log_history": [
            {"epoch": epoch, "step": step, "eval_loss": loss} for epoch, step, loss in zip((0.5, 1.0), (25, 50), losses)]})
        put(root / "timings" / f"{folder}-finetune.seconds", finetune_seconds)
        if folder.startswith("ft-"):
            put(finetune / "distillation.json", {"freeze_pos_embs": True})
        if stage:
            put(root / folder / stage[0] / "train_results.json", {"train_tokens": 81920})
            put(root / "timings" / f"{folder}-{stage[0]}.seconds", stage[1])


def collected_rows(root):
    return [report.collect_row(root, *row) for row in report.ROWS
            if (root / row[4] / "finetune" / "perplexity.json").is_file()]


def test_every_kd_finetune_row_counts_the_shared_distillation_stage(tmp_path):
    write_run_folders(tmp_path)
    rows = {row["model"]: row for row in collected_rows(tmp_path)}
    for name in ("ft-none", "ft-kd", "ft-kd-attention"):
        assert (rows[name]["stage1_tokens"], rows[name]["stage1_seconds"]) == (81920, 35.0), name
    assert rows["first"]["stage1_seconds"] is None and rows["alt-kd"]["stage1_seconds"] == 32.0
    finding = report.kd_finetune_finding([row for row in rows.values() if row["table"] == "kd_finetune"])
    assert "position embeddings (trained against frozen)" in finding and "tokens per optimiser step" not in finding


def test_results_png_has_a_panel_per_table_whose_rows_can_be_told_apart(tmp_path):
    write_run_folders(tmp_path)
    rows = collected_rows(tmp_path)
    report.write_plot(tmp_path / "results.png", tmp_path, rows)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = report.results_figure(tmp_path, rows)
    bars, curves = figure.axes[:3], figure.axes[3:]  # the top row, then the bottom row
    assert [axis.get_title() for axis in bars] == [heading.split(" (")[0] for heading in report.TABLES.values()]
    compression = bars[1]
    assert 193.29 < compression.get_xlim()[1] < 646.68, "the random-init row does not set the axis"
    labels = [text.get_text() for text in compression.texts]
    assert any("646.7" in label and "off scale" in label for label in labels)
    assert any(label.strip() == "190.7 · 52 s" for label in labels), "value and cost beside the bar"
    kd_labels = [text.get_text().strip() for text in bars[0].texts]
    assert kd_labels[:2] == ["190.7 · 52 s", "193.3 · 64 s"], "the shared stage counted in every ft-* row"
    # the last validation points of ft-kd and ft-kd-attention differ by 0.3 %: at least 3 % of the axis apart
    finals = {line.get_label(): line.get_ydata()[-1] for line in curves[0].get_lines()}
    low, high = curves[0].get_ylim()
    assert abs(finals["ft-kd"] - finals["ft-kd-attention"]) > 0.03 * (high - low)
    assert "ft-none" in curves[0].get_ylabel()
