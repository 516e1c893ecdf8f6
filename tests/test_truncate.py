"""truncate.py: the layer maps, the student folder, and that the student computes the teacher's kept blocks."""
import json
import subprocess

import pytest
import torch

from conftest import assert_one_line_error, run, write_config
from lmcompress.errors import UserError
from lmcompress.truncation import distil_layers, main, select_layers


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory, tokenizer_dir):
    """A randomly initialised 4-layer tiny GPT-2 with the test tokenizer: truncation needs no training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmcompress.models import load_config

    folder = tmp_path_factory.mktemp("teacher4")
    config = load_config(str(write_config(folder / "config4.json", n_layer=4)))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def call_main(argv, capsys):
    """Run truncate.py's main in this process; return what ``run`` would (exit code, stdout, stderr)."""
    try:
        main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def logits(model_folder, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_paper_layer_maps_for_gpt2():
    assert select_layers("alt", 12) == [0, 2, 4, 6, 8, 10]
    assert select_layers("distil", 12) == [0, 2, 4, 7, 9, 11]
    assert select_layers("first", 12) == [0, 1, 2, 3, 4, 5]
    assert select_layers("last", 12) == [6, 7, 8, 9, 10, 11]
    assert select_layers("custom", 12, layers="0,2,4,6,8,10") == [0, 2, 4, 6, 8, 10]


def test_distil_generalises_to_other_depths():
    # The original's 24-layer table has 0,4,8,13,17,21, which drops the last layer; the rule keeps it.
    assert select_layers("distil", 24, 6) == [0, 5, 9, 14, 18, 23]
    assert select_layers("distil", 36, 6) == [0, 7, 14, 21, 28, 35]
    assert select_layers("distil", 48, 6) == [0, 9, 19, 28, 38, 47]
    # With three layers it is the original's "3l" map for both depths of its table.
    assert select_layers("distil", 12, 3) == [0, 6, 11] and select_layers("distil", 24, 3) == [0, 12, 23]
    for n_layer in range(1, 49):
        for n_keep in range(1, n_layer + 1):
            kept = distil_layers(n_layer, n_keep)
            assert len(kept) == n_keep and kept == sorted(set(kept)) and kept[0] == 0
            assert n_keep == 1 or kept[-1] == n_layer - 1
            gaps = [b - a for a, b in zip(kept, kept[1:])]
            assert not gaps or max(gaps) - min(gaps) <= 1, (n_layer, n_keep, kept)


def test_default_depth_is_half_and_alt_has_room_for_every_other_layer():
    assert select_layers("alt", 24) == list(range(0, 24, 2))
    assert select_layers("distil", 5) == [0, 4]
    assert select_layers("alt", 5, 3) == [0, 2, 4]
    with pytest.raises(UserError, match="at most 3 of 5"):
        select_layers("alt", 5, 4)


@pytest.mark.parametrize("strategy, num_layers, layers, message", [
    ("custom", None, "3,1", "increasing order"),
    ("custom", None, "1,1", "increasing order"),
    ("custom", None, "0,12", "out of range"),
    ("custom", None, "-1,2", "out of range"),
    ("custom", None, "0,x", "comma-separated"),
    ("custom", None, None, "needs --layers"),
    ("custom", 3, "0,1", "--layers lists 2"),
    ("alt", None, "0,2", "goes with --strategy custom"),
    ("distil", 13, None, "between 1 and"),
    ("distil", 0, None, "between 1 and"),
    ("middle", None, None, "unknown strategy"),
])
def test_bad_layer_choices_are_refused(strategy, num_layers, layers, message):
    with pytest.raises(UserError, match=message):
        select_layers(strategy, 12, num_layers, layers)


def test_keeping_every_layer_reproduces_the_teacher(random_teacher, tmp_path, capsys):
    result = call_main(["--teacher_name_or_path", random_teacher, "--strategy", "custom", "--layers", "0,1,2,3",
                        "--output_dir", tmp_path / "all"], capsys)
    assert result.returncode == 0, result.stderr
    input_ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(tmp_path / "all", input_ids), logits(random_teacher, input_ids), atol=1e-5)


def test_alt_student_runs_exactly_the_teachers_kept_blocks(random_teacher, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_dir = tmp_path / "alt"
    result = call_main(["--teacher_name_or_path", random_teacher, "--strategy", "alt", "--output_dir", student_dir],
                       capsys)
    assert result.returncode == 0, result.stderr
    assert "2 of 4 layers (alt): 0,2" in result.stdout
    record = json.loads((student_dir / "truncation.json").read_text())
    assert record == {"teacher": str(random_teacher), "teacher_n_layer": 4, "strategy": "alt", "layers": [0, 2]}
    assert json.loads((student_dir / "config.json").read_text())["n_layer"] == 2
    vocab = AutoTokenizer.from_pretrained(student_dir).get_vocab()
    assert vocab == AutoTokenizer.from_pretrained(random_teacher).get_vocab()

    # The teacher itself with blocks 1 and 3 taken out of its forward pass.
    teacher = AutoModelForCausalLM.from_pretrained(random_teacher).eval()
    teacher.transformer.h = torch.nn.ModuleList([teacher.transformer.h[0], teacher.transformer.h[2]])
    teacher.config.n_layer = 2
    input_ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = teacher(input_ids=input_ids, use_cache=False).logits
    assert torch.allclose(logits(student_dir, input_ids), expected, atol=1e-5)


def test_existing_output_folder_is_kept_unless_overwriting(random_teacher, tmp_path, capsys):
    out = tmp_path / "student"
    args = ["--teacher_name_or_path", random_teacher, "--strategy", "first", "--num_layers", "1", "--output_dir", out]
    assert call_main(args, capsys).returncode == 0
    assert_one_line_error(call_main(args, capsys), "already holds a model")
    assert call_main(args + ["--overwrite_output_dir"], capsys).returncode == 0
    assert json.loads((out / "config.json").read_text())["n_layer"] == 1
    assert not list(tmp_path.glob(".staging-*"))


def test_cli_refuses_unsorted_layers_with_one_line(random_teacher, tmp_path):
    result = run(["truncate.py", "--teacher_name_or_path", random_teacher, "--output_dir", tmp_path / "out",
                  "--strategy", "custom", "--layers", "3,1"], check=False)
    assert_one_line_error(result, "increasing order")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "custom", "--layers", "0,4"], "out of range"),
    (["--strategy", "middle"], "unknown strategy"),
    (["--strategy", "alt", "--num_layers", "3"], "at most 2 of 4"),
])
def test_main_refuses_bad_layers_with_one_line(random_teacher, tmp_path, capsys, extra, message):
    result = call_main(["--teacher_name_or_path", random_teacher, "--output_dir", tmp_path / "out", *extra], capsys)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, message", [
    ({"model_type": "mystery", "num_hidden_layers": 4}, "model type `mystery`"),
    ({"model_type": "t5", "vocab_size": 512, "d_model": 32, "num_layers": 4, "num_heads": 2, "d_kv": 16, "d_ff": 64},
     "a t5 model (T5Config), which AutoModelForCausalLM does not load"),
])
def test_unknown_architectures_are_refused_in_one_line(tmp_path, tokenizer_dir, capsys, config, message):
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(config), encoding="utf-8")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(teacher)
    result = call_main(["--teacher_name_or_path", teacher, "--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(result, f"--teacher_name_or_path {teacher}", message)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pretrain_sh_trains_a_truncated_folder(random_teacher, corpus_files, tmp_path, capsys):
    student_dir = tmp_path / "gpt2-alt"
    assert call_main(["--teacher_name_or_path", random_teacher, "--strategy", "alt", "--output_dir", student_dir],
                     capsys).returncode == 0
    run(["bash", "pretrain.sh", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none"],
        env={"MODEL": str(student_dir), "TRAIN_FILE": str(corpus_files["train"]),
             "VALIDATION_FILE": str(corpus_files["validation"]), "BLOCK_SIZE": "32", "BATCH_SIZE": "2",
             "GRAD_ACC": "1", "OUTPUT_DIR": str(tmp_path / "pretrain"), "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "pretrain" / "eval_results.json").read_text())
    assert results["perplexity"] > 1
    assert json.loads((tmp_path / "pretrain" / "config.json").read_text())["n_layer"] == 2
