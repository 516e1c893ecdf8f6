"""reproduce.sh: the dry run of the paper scale, and the mini pipeline end to end at toy size, resumable."""
import csv
import json
import os
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
    assert any("--alpha_hidden 0.2 --layer_map 0:0\\,1:2\\,2:4\\,3:7\\,4:9\\,5:11" in line for line in kd)
    assert any("--alpha_att 0.2 --alpha_val 0.2" in line for line in kd)
    assert any("--divergence reverse_kl" in line for line in kd)


def test_rows_selects_a_subset(tmp_path):
    result = run(["bash", "reproduce.sh"], env={"SCALE": "paper", "DRY_RUN": "1", "ROWS": "ft-kd",
                                                "OUTPUT_ROOT": tmp_path / "paper"})
    assert "ft-kd/finetune" in result.stdout and "ft-kd-hidden" not in result.stdout
    assert "teacher/finetune" in result.stdout and "distil-kd/distil" in result.stdout, "what ft-kd needs runs"
    assert "alt-pretrain" not in result.stdout and "truncated/first" not in result.stdout


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
    kd[1]["test_ppl"] = 100.5
    assert "no KD variant beats" in report.kd_finetune_finding(kd) and "differs" in report.kd_finetune_finding(kd)
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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mini_configs_build_the_architecture(arch):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**model_config(arch, vocab_size=64, block_size=16, width=32, n_layer=3))
    model = AutoModelForCausalLM.from_config(config)
    assert config.model_type == arch and config.num_hidden_layers == 3
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
