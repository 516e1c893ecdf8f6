"""distiller.py and distil.sh end to end on CPU, offline: a 4-layer teacher trained with train.py, truncated to
2 layers, then distilled; torchrun on two processes; resume; and the one-line refusals of bad input."""
import json
import math
import os
import subprocess

import pytest
import torch

from conftest import REPO, assert_one_line_error, run, torchrun, write_config
from lmcompress import distillation, intermediate
from lmcompress.distillation import translate_legacy_flags
from lmcompress.losses import kd_loss, lm_loss, next_token_targets

TEACHER_STEPS = 300
# few steps: the teacher stays clearly stronger than either student (docs/distillation.md's crossover study sets more)
STUDENT_STEPS = int(os.environ.get("CROSSOVER_STUDENT_STEPS", 20))
BLOCK = 64
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only contend
INTERMEDIATE = ["--alpha_hidden", "1", "--alpha_att", "1", "--alpha_val", "1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus_files, tokenizer_dir):
    folder = tmp_path_factory.mktemp("teacher")
    config = write_config(folder / "config4.json", n_layer=4)
    run(["train.py", "--config_name", config, "--tokenizer_name", tokenizer_dir, "--train_file", corpus_files["train"],
         "--validation_file", corpus_files["validation"], "--block_size", BLOCK, "--per_device_train_batch_size", 16,
         "--max_steps", TEACHER_STEPS, "--learning_rate", 3e-3, "--warmup_steps", 20, "--output_dir", folder / "model",
         "--save_strategy", "no", "--report_to", "none", "--seed", 0], env=SINGLE_THREAD)
    return folder / "model"


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("student") / "alt2"
    run(["truncate.py", "--teacher_name_or_path", teacher, "--strategy", "alt", "--output_dir", folder],
        env=SINGLE_THREAD)
    return folder


def distil_env(teacher, student, corpus_files, output_dir, **overrides):
    return {"TEACHER": str(teacher), "STUDENT": str(student), "TRAIN_FILE": str(corpus_files["train"]),
            "VALIDATION_FILE": str(corpus_files["validation"]), "BLOCK_SIZE": str(BLOCK), "BATCH_SIZE": "8",
            "GRAD_ACC": "1", "LEARNING_RATE": "1e-3", "OUTPUT_DIR": str(output_dir), **SINGLE_THREAD, **overrides}


@pytest.fixture(scope="module")
def runs(teacher, student, corpus_files, tmp_path_factory):
    """The same truncated student trained with distil.sh twice: the paper's loss, and the LM loss only."""
    root = tmp_path_factory.mktemp("distil")
    for name, overrides in (("kd", {}), ("lm", {"ALPHA_CE": "0", "ALPHA_COS": "0"})):
        run(["bash", "distil.sh", "--max_steps", STUDENT_STEPS, "--logging_steps", 10, "--save_strategy", "no"],
            env=distil_env(teacher, student, corpus_files, root / name, **overrides))
    return {"kd": root / "kd", "lm": root / "lm"}


def held_out_scores(teacher_dir, student_dirs, text_file):
    """Perplexity of each model and KL(teacher ‖ student) per token, on text no model trained on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(teacher_dir)(text_file.read_text(encoding="utf-8"))["input_ids"]
    blocks = torch.tensor(ids[:len(ids) // BLOCK * BLOCK]).view(-1, BLOCK)
    targets = next_token_targets(blocks)

    def logits(folder):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=blocks).logits

    teacher_logits = logits(teacher_dir)
    scores = {"teacher": {"ppl": lm_loss(teacher_logits, targets).exp().item(), "kl": 0.0}}
    for name, folder in student_dirs.items():
        student_logits = logits(folder)
        scores[name] = {"ppl": lm_loss(student_logits, targets).exp().item(),
                        "kl": kd_loss(student_logits, teacher_logits, targets != -100, temperature=1.0).item()}
    return scores


@pytest.fixture(scope="module")
def scores(teacher, student, runs, corpus_files):
    result = held_out_scores(teacher, {"initial": student, **runs}, corpus_files["test"])
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.slow
def test_distilled_student_ends_closer_to_the_teacher(scores):
    assert scores["kd"]["kl"] < scores["initial"]["kl"]
    assert scores["kd"]["kl"] < scores["lm"]["kl"]
    assert scores["kd"]["ppl"] < scores["initial"]["ppl"]


@pytest.mark.slow
def test_distillation_beats_lm_only_while_the_teacher_is_clearly_stronger(scores):
    assert scores["teacher"]["ppl"] < scores["kd"]["ppl"] < scores["lm"]["ppl"]


@pytest.mark.slow
def test_distil_sh_writes_the_record_the_results_and_every_loss_term(runs, teacher, student):
    record = json.loads((runs["kd"] / "distillation.json").read_text())
    assert record["teacher"] == str(teacher) and record["student"] == str(student)
    assert (record["alpha_ce"], record["alpha_clm"], record["alpha_cos"], record["alpha_mse"]) == (5.0, 2.0, 1.0, 0.0)
    assert record["temperature"] == 2.0 and record["freeze_pos_embs"] is True
    assert record["student_truncation"]["layers"] == [0, 2]
    assert json.loads((runs["kd"] / "eval_results.json").read_text())["perplexity"] > 1
    logged = [entry for entry in json.loads((runs["kd"] / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert logged and all({"loss_ce", "loss_clm", "loss_cos"} <= set(entry) for entry in logged)
    first = logged[0]
    assert first["loss"] == pytest.approx(5 * first["loss_ce"] + 2 * first["loss_clm"] + first["loss_cos"], rel=1e-4)
    lm_logged = [entry for entry in json.loads((runs["lm"] / "trainer_state.json").read_text())["log_history"]
                 if "loss" in entry]
    assert all("loss_clm" in entry and "loss_ce" not in entry for entry in lm_logged)
    assert list((runs["kd"] / "runs").rglob("events.out.tfevents*")), "no TensorBoard log"


def initial_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_position_embeddings_stay_frozen(runs, student):
    before, after = initial_weights(student), initial_weights(runs["kd"])
    assert torch.equal(before["transformer.wpe.weight"], after["transformer.wpe.weight"])
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"])


TORCHRUN_HELPER = '''
import sys, torch
from lmcompress.distillation import build_trainer
out = sys.argv[1]
trainer, _ = build_trainer(sys.argv[2:])
trainer.train()
rank = trainer.args.process_index
torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, f"{out}/rank{rank}.pt")
if rank == 0:
    torch.save(trainer.state.log_history, f"{out}/log_history.pt")
'''


def distil_args(teacher, student, corpus_files, output_dir, batch_size, steps):
    return ["--teacher_name_or_path", teacher, "--student_name_or_path", student, "--train_file", corpus_files["train"],
            "--block_size", BLOCK, "--per_device_train_batch_size", batch_size, "--max_steps", steps,
            "--logging_steps", 1, "--learning_rate", 1e-3, "--output_dir", output_dir, "--save_strategy", "no",
            "--report_to", "none", "--seed", 3]


@pytest.mark.slow
@pytest.mark.parametrize("extra, new_terms", [
    ([], []),
    (["--alpha_hidden", 1, "--alpha_att", 1], ["loss_hidden", "loss_att"]),
], ids=["logits", "intermediate"])
def test_two_ranks_match_one_rank_with_twice_the_batch_and_end_identical(extra, new_terms, teacher, student,
                                                                         corpus_files, tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text(TORCHRUN_HELPER, encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env = {**SINGLE_THREAD, "PYTHONPATH": str(REPO)}
    run([helper, one, *distil_args(teacher, student, corpus_files, one / "out", 8, 1), *extra], env=env)
    run([*torchrun(), helper, two, *distil_args(teacher, student, corpus_files, two / "out", 4, 3), *extra], env=env)
    first = lambda folder: next(e for e in torch.load(folder / "log_history.pt") if "loss" in e)  # noqa
    for term in ["loss", "loss_ce", *new_terms]:
        assert math.isfinite(first(two)[term]) and first(two)[term] == pytest.approx(first(one)[term], abs=1e-5)
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(rank0[name], initial_weights(student)[name])


def test_gradient_accumulation_equals_one_larger_batch(teacher, student, corpus_files, tmp_path):
    """Two micro-batches of 4 accumulated give the first step's loss and update of one batch of 8."""
    results = {}
    for name, batch, accumulation in (("big", 8, 1), ("accumulated", 4, 2)):
        argv = distil_args(teacher, student, corpus_files, tmp_path / name, batch, 1)
        trainer, _ = distillation.build_trainer([str(a) for a in argv] + ["--gradient_accumulation_steps",
                                                                          str(accumulation)])
        trainer.train()
        loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        results[name] = (loss, {k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert results["accumulated"][0] == pytest.approx(results["big"][0], abs=1e-5)
    for name, value in results["big"][1].items():
        assert torch.allclose(results["accumulated"][1][name], value, atol=1e-5), name


def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(teacher, student, corpus_files, tmp_path):
    def train(output_dir, *extra):
        argv = distil_args(teacher, student, corpus_files, output_dir, 4, 4)
        trainer, resume = distillation.build_trainer([str(a) for a in argv] + ["--save_strategy", "steps",
                                                                                "--save_steps", "2", *extra])
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model.state_dict()

    straight = train(tmp_path / "straight")
    resumed = train(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-2"))
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name


def call_main(argv, capsys):
    """Run distiller.py's main in this process; return what ``run`` would (exit code, stdout, stderr)."""
    try:
        distillation.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A 512-token BPE trained on reversed text: same vocabulary size, different token ids."""
    from lmcompress.corpus import topics
    from lmcompress.vocab import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("other-tokenizer")
    train_bpe_tokenizer(["\n".join(list(topics())[:300])[::-1]], 512, folder, model_max_length=128)
    return folder


def weights_file(tmp_path, **config_overrides):
    from transformers import AutoModelForCausalLM

    from lmcompress.models import load_config

    config = load_config(str(write_config(tmp_path / "weights-config.json", **config_overrides)))
    path = tmp_path / "weights.bin"
    torch.save(AutoModelForCausalLM.from_config(config).state_dict(), path)
    return path


@pytest.mark.parametrize("case, message", [
    ("vocabulary", "same vocabulary"),
    ("tokenizer", "same tokenizer"),
    ("all_zero", "all loss weights are zero: set at least one of --alpha_ce, --alpha_clm, --alpha_cos, --alpha_mse, "
                 "--alpha_hidden, --alpha_att, --alpha_val above zero"),
    ("negative", "--alpha_clm -1.0: the loss weights must be zero or positive"),
    ("temperature_zero", "--temperature 0.0: must be above zero"),
    ("temperature_negative", "--temperature -2.0: must be above zero"),
    ("weight_shapes", "has shape"),
    ("hidden_sizes", "--alpha_cos 1.0: the teacher's hidden size 64 differs from the student's 32"),
    ("hidden_sizes_pkd", "--alpha_hidden 1.0: the teacher's hidden size 64 differs from the student's 32 and there "
                         "is no projection"),
    ("uncapturable_attention", "--alpha_att/--alpha_val: FalconForCausalLM does not call its attention through"),
    ("relation_heads_differ", "the teacher's last layer has 2 attention heads and the student's 4: give "
                              "--num_relation_heads"),
    ("relation_heads_zero", "--num_relation_heads 0: must be above zero"),
    ("relation_heads_divide", "--num_relation_heads 3: must be above zero and divide the teacher's 64 attention"),
    ("relation_heads_unused", "--num_relation_heads 2: only --alpha_att and --alpha_val use relation heads"),
    ("layer_map_unused", "--layer_map 0:0,1:2: only --alpha_hidden uses a layer map"),
    ("jsd_beta", "--jsd_beta 1.0"),
    ("divergence", "--divergence kl: choose from"),
    ("two_students", "exactly one"),
])
def test_bad_input_is_one_line_error(case, message, teacher, student, corpus_files, other_tokenizer, tmp_path,
                                     capsys):
    base = ["--teacher_name_or_path", teacher, "--train_file", corpus_files["train"], "--block_size", BLOCK,
            "--output_dir", tmp_path / "out", "--max_steps", 1, "--report_to", "none"]
    config = lambda **overrides: ["--student_config", write_config(tmp_path / "student.json", **overrides)]  # noqa
    extras = {  # built on demand: several write the same student.json
        "vocabulary": lambda: config(vocab_size=600),
        "tokenizer": lambda: ["--student_name_or_path", student, "--tokenizer_name", other_tokenizer],
        "all_zero": lambda: ["--student_name_or_path", student, "--alpha_ce", 0, "--alpha_clm", 0, "--alpha_cos", 0],
        "negative": lambda: ["--student_name_or_path", student, "--alpha_clm", -1],
        "temperature_zero": lambda: ["--student_name_or_path", student, "--temperature", 0],
        "temperature_negative": lambda: ["--student_name_or_path", student, "--temperature", -2],
        "weight_shapes": lambda: config() + ["--student_pretrained_weights", weights_file(tmp_path, n_embd=32)],
        "hidden_sizes": lambda: config(n_embd=32),
        "hidden_sizes_pkd": lambda: config(n_embd=32) + ["--alpha_cos", 0, "--alpha_hidden", 1],
        "uncapturable_attention": lambda: ["--student_config", _falcon_config(tmp_path), "--alpha_att", 1],
        "relation_heads_differ": lambda: config(n_head=4) + ["--alpha_val", 1],
        "relation_heads_zero": lambda: ["--student_name_or_path", student, "--alpha_att", 1,
                                        "--num_relation_heads", 0],
        "relation_heads_divide": lambda: ["--student_name_or_path", student, "--alpha_att", 1,
                                          "--num_relation_heads", 3],
        "relation_heads_unused": lambda: ["--student_name_or_path", student, "--num_relation_heads", 2],
        "layer_map_unused": lambda: ["--student_name_or_path", student, "--layer_map", "0:0,1:2"],
        "jsd_beta": lambda: ["--student_name_or_path", student, "--divergence", "jsd", "--jsd_beta", 1],
        "divergence": lambda: ["--student_name_or_path", student, "--divergence", "kl"],
        "two_students": lambda: ["--student_name_or_path", student] + config(),
    }
    extra = extras[case]()
    assert_one_line_error(call_main(base + extra, capsys), message)
    assert not (tmp_path / "out" / "config.json").exists()


def _falcon_config(tmp_path):
    """A model whose attention is its own code, not transformers' AttentionInterface."""
    path = tmp_path / "falcon.json"
    path.write_text(json.dumps({"model_type": "falcon", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "max_position_embeddings": 128}), encoding="utf-8")
    return path


def _llama_config(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 2}), encoding="utf-8")
    return path


def test_a_llama_student_learns_from_the_gpt2_teacher_of_the_same_tokenizer(teacher, corpus_files, tmp_path, capsys):
    """Distillation needs one vocabulary, not one architecture; a rotary student has no position embeddings to
    freeze and says so."""
    out = tmp_path / "out"
    argv = ["--teacher_name_or_path", teacher, "--student_config", _llama_config(tmp_path), "--freeze_pos_embs",
            "--train_file", corpus_files["train"], "--block_size", BLOCK, "--output_dir", out, "--max_steps", 2,
            "--logging_steps", 1, "--report_to", "none"]
    result = call_main(argv, capsys)
    assert result.returncode == 0, result.stderr
    assert "no learned position embeddings" in result.stderr
    losses = [entry["loss"] for entry in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_distil_sh_refuses_a_negative_alpha_with_one_line(teacher, student, corpus_files, tmp_path):
    result = run(["bash", "distil.sh", "--max_steps", 1],
                 env=distil_env(teacher, student, corpus_files, tmp_path / "out", ALPHA_CE="-5"), check=False)
    assert_one_line_error(result, "--alpha_ce -5.0")


def test_student_config_with_matching_weights_is_accepted(teacher, corpus_files, tmp_path):
    path = weights_file(tmp_path)
    state = torch.load(path)
    argv = ["--teacher_name_or_path", teacher, "--student_config", tmp_path / "weights-config.json",
            "--student_pretrained_weights", path, "--train_file", corpus_files["train"], "--block_size", BLOCK,
            "--output_dir", tmp_path / "out", "--max_steps", 1, "--report_to", "none"]
    trainer, _ = distillation.build_trainer([str(a) for a in argv])
    assert all(torch.equal(trainer.model.state_dict()[name], value) for name, value in state.items())


def test_legacy_flags_are_translated():
    argv, notes = translate_legacy_flags(
        ["--n_epoch", "4", "--batch_size=5", "--dump_path", "out", "--warmup_prop", "0.05", "--student_type", "gpt2",
         "--teacher_type=gpt2", "--teacher_name", "gpt2", "--force", "--n_gpu", "8", "--fp16", "--alpha_ce", "5"])
    assert argv == ["--num_train_epochs", "4", "--per_device_train_batch_size=5", "--output_dir", "out",
                    "--warmup_ratio", "0.05", "--teacher_name_or_path", "gpt2", "--overwrite_output_dir", "--fp16",
                    "--alpha_ce", "5"]
    assert any(note.startswith("--student_type gpt2: ignored") for note in notes)
    assert any(note.startswith("--n_gpu 8: ignored") for note in notes)
    assert "--dump_path is now --output_dir" in notes


def test_intermediate_terms_are_logged_and_accumulate_like_one_larger_batch(teacher, student, corpus_files, tmp_path):
    results = {}
    for name, batch, accumulation in (("big", 8, 1), ("accumulated", 4, 2)):
        argv = distil_args(teacher, student, corpus_files, tmp_path / name, batch, 1)
        # SGD: after one step the weights differ exactly as the gradients do (Adam's first step is ±lr wherever a
        # gradient is nonzero, so float rounding of a near-zero gradient could flip a weight by 2 lr)
        trainer, _ = distillation.build_trainer([str(a) for a in argv] + INTERMEDIATE + [
            "--gradient_accumulation_steps", str(accumulation), "--optim", "sgd"])
        assert trainer.distillation_args.resolved_layer_map == [(0, 0), (1, 2)]  # from the student's truncation.json
        trainer.train()
        entry = next(entry for entry in trainer.state.log_history if "loss" in entry)
        assert all(entry[term] > 0 for term in ("loss_hidden", "loss_att", "loss_val"))
        results[name] = (entry["loss"], {k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert results["accumulated"][0] == pytest.approx(results["big"][0], abs=1e-5)
    for name, value in results["big"][1].items():
        assert torch.allclose(results["accumulated"][1][name], value, atol=1e-5), name


def test_a_layer_map_naming_a_missing_block_is_one_line(teacher, student, corpus_files, tmp_path, capsys):
    argv = distil_args(teacher, student, corpus_files, tmp_path / "out", 4, 1) + ["--alpha_hidden", "1",
                                                                                  "--layer_map", "0:0,1:7"]
    result = call_main(argv, capsys)
    assert_one_line_error(result, "--layer_map 0:0,1:7: the teacher has no block 7")


def test_a_distilled_student_keeps_its_layer_map_for_distillation_while_fine_tuning(teacher, student, corpus_files,
                                                                                   tmp_path, capsys):
    distilled = tmp_path / "distilled"
    assert call_main(distil_args(teacher, student, corpus_files, distilled, 4, 1), capsys).returncode == 0
    assert (json.loads((distilled / "truncation.json").read_text()) ==
            json.loads((student / "truncation.json").read_text()))
    argv = distil_args(teacher, distilled, corpus_files, tmp_path / "again", 4, 1) + ["--alpha_hidden", 1]
    trainer, _ = distillation.build_trainer([str(a) for a in argv])
    assert trainer.distillation_args.resolved_layer_map == [(0, 0), (1, 2)], "not the evenly spread 0:0,1:3"


CLOSENESS_STEPS = 30


def block_states_and_last_attention(folder, blocks):
    """Each decoder block's output and the last layer's attention probabilities on ``blocks``, computed eagerly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    states = intermediate.BlockOutputs(model.transformer.h, range(len(model.transformer.h)))
    with torch.no_grad():
        attention = model(input_ids=blocks, output_attentions=True).attentions[-1]
    return states.outputs, attention.double()


def distance_to_teacher(teacher_dir, student_dirs, text_file, layer_map):
    """On held-out text: the mean over mapped block pairs and tokens of ‖h_s − h_t‖ / ‖h_t‖, and the mean over
    heads and query positions of KL(teacher ‖ student) of the last layer's attention."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(teacher_dir)(text_file.read_text(encoding="utf-8"))["input_ids"]
    blocks = torch.tensor(ids[:len(ids) // BLOCK * BLOCK]).view(-1, BLOCK)
    t_states, t_att = block_states_and_last_attention(teacher_dir, blocks)
    result = {}
    for name, folder in student_dirs.items():
        s_states, s_att = block_states_and_last_attention(folder, blocks)
        hidden = torch.stack([((s_states[s] - t_states[t]).norm(dim=-1) / t_states[t].norm(dim=-1)).mean()
                              for s, t in layer_map]).mean().item()
        attention = (t_att * (t_att.clamp_min(1e-30).log() - s_att.clamp_min(1e-30).log())).sum(-1).mean().item()
        result[name] = {"hidden": hidden, "attention": attention}
    return result


def test_intermediate_terms_bring_the_student_closer_to_the_teacher_on_held_out_text(teacher, student, corpus_files,
                                                                                       tmp_path, capsys):
    """The same student, seed and steps with the LM loss alone, plus the hidden-state term, plus the attention term."""
    runs = {"lm": [], "hidden": ["--alpha_hidden", 10], "attention": ["--alpha_att", 1]}
    for name, extra in runs.items():
        argv = distil_args(teacher, student, corpus_files, tmp_path / name, 8, CLOSENESS_STEPS) + [
            "--alpha_ce", 0, "--alpha_cos", 0, "--logging_steps", CLOSENESS_STEPS, *extra]
        assert call_main(argv, capsys).returncode == 0
    distances = distance_to_teacher(teacher, {name: tmp_path / name for name in runs}, corpus_files["test"],
                                    [(0, 0), (1, 2)])  # the student's truncation.json
    print(json.dumps(distances, indent=1))
    assert distances["hidden"]["hidden"] < 0.7 * distances["lm"]["hidden"]
    assert distances["attention"]["attention"] < 0.7 * distances["lm"]["attention"]
