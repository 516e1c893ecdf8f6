"""train.py / train.sh / evaluate.sh end to end: training, ranks, resume, schedules and bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run, torchrun, train_command


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.mark.slow
def test_train_sh_then_evaluate_sh(tmp_path, tokenizer_dir, tiny_config, corpus_files, untrained_model):
    env = {"CONFIG": tiny_config, "TOKENIZER": tokenizer_dir, "TRAIN_FILE": corpus_files["train"],
           "VALIDATION_FILE": corpus_files["validation"], "OUTPUT_DIR": tmp_path / "finetune", "BLOCK_SIZE": "64",
           "BATCH_SIZE": "8", "GRAD_ACC": "1", "LEARNING_RATE": "3e-3", "NPROC_PER_NODE": "1"}
    run(["bash", "train.sh", "--max_steps", "120", "--save_strategy", "no"], env=env)
    results = json.loads((tmp_path / "finetune" / "eval_results.json").read_text())
    assert {"eval_loss", "perplexity", "block_size"} <= results.keys() and results["block_size"] == 64
    assert list((tmp_path / "finetune" / "runs").glob("events.out.tfevents.*")), "TensorBoard logs"
    assert (tmp_path / "finetune" / "train_results.json").exists()

    evaluated = {}
    for name, model in (("trained", tmp_path / "finetune"), ("untrained", untrained_model)):
        env = {"MODEL": model, "TEST_FILE": corpus_files["test"], "BLOCK_SIZE": "64", "NPROC_PER_NODE": "1",
               "OUTPUT_FILE": tmp_path / f"{name}.json"}
        run(["bash", "evaluate.sh"], env=env)
        evaluated[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert evaluated["untrained"]["perplexity"] > 300, "a random model is about as good as uniform over 512 tokens"
    assert evaluated["trained"]["perplexity"] < evaluated["untrained"]["perplexity"] / 2


@pytest.mark.slow
def test_two_ranks_read_different_blocks_and_end_identical(tmp_path, tokenizer_dir, tiny_config, corpus_files):
    small_train = tmp_path / "small.txt"
    small_train.write_text(corpus_files["train"].read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    files = {"train": small_train, "validation": corpus_files["validation"]}
    command = train_command(tmp_path / "out", tokenizer_dir, tiny_config, files, "--num_train_epochs", "2")
    run([*torchrun(), "tests/rank_probe.py", *command[1:]])
    ranks = [json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"], "DDP keeps the replicas identical"
    n_blocks = ranks[0]["n_blocks"]
    per_rank = len(ranks[0]["blocks"]) // 2
    for epoch in (0, 1):
        shares = [set(rank["blocks"][epoch * per_rank:(epoch + 1) * per_rank]) for rank in ranks]
        # accelerate completes the last global batch (2 ranks x 8) with blocks from the epoch's start
        assert len(shares[0] & shares[1]) < 16, "each rank reads its own shard"
        assert len(shares[0] | shares[1]) == n_blocks, "together the ranks cover the epoch"
    assert ranks[0]["blocks"][:per_rank] != ranks[0]["blocks"][per_rank:], "reshuffled every epoch"


@pytest.mark.slow
def test_resume_from_checkpoint_is_exact(tmp_path, tokenizer_dir, tiny_config, corpus_files):
    small_train = tmp_path / "small.txt"
    small_train.write_text(corpus_files["train"].read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    files = {"train": small_train, "validation": corpus_files["validation"]}

    def command(output_dir, *extra):
        return train_command(output_dir, tokenizer_dir, tiny_config, files, "--max_steps", "24",
                             "--save_strategy", "steps", "--save_steps", "15", "--warmup_steps", "5", *extra)

    run(command(tmp_path / "straight"))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-15", interrupted / "checkpoint-15")
    run(command(interrupted, "--resume_from_checkpoint", "latest"))
    state = json.loads((interrupted / "trainer_state.json").read_text())
    assert state["global_step"] == 24 and state["epoch"] > 1, "the run crossed an epoch boundary after resuming"
    assert_same_weights(weights(tmp_path / "straight"), weights(interrupted), atol=1e-6)


def test_warmup_ratio_warms_up_then_decays(tmp_path, tokenizer_dir, tiny_config, corpus_files):
    run(train_command(tmp_path / "out", tokenizer_dir, tiny_config, corpus_files, "--max_steps", "10",
                      "--warmup_ratio", "0.5", "--logging_steps", "1"))
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert rates[:5] == sorted(rates[:5]) and rates[0] < rates[4], "linear warm-up over the first half"
    assert rates[5:] == sorted(rates[5:], reverse=True) and rates[-1] < rates[5], "then linear decay"


def test_output_folder_with_a_trained_model_is_protected(tmp_path, tokenizer_dir, tiny_config, corpus_files,
                                                         untrained_model):
    output_dir = tmp_path / "out"
    shutil.copytree(untrained_model, output_dir)
    command = train_command(output_dir, tokenizer_dir, tiny_config, corpus_files, "--max_steps", "2")
    assert_one_line_error(run(command, check=False), "--output_dir", "--overwrite_output_dir")
    run(command + ["--overwrite_output_dir"])


def make_token_folder(tmp_path, tokenizer_dir, text_file, name="tokens"):
    run(["tokenize_datasets.py", "--tokenizer_name_or_path", tokenizer_dir, "--train_file", text_file,
         "--output_dir", tmp_path / name])
    return tmp_path / name


def test_bad_training_input_fails_in_one_line(tmp_path, tokenizer_dir, tiny_config, corpus_files):
    base = ["train.py", "--config_name", tiny_config, "--tokenizer_name", tokenizer_dir, "--max_steps", "2",
            "--report_to", "none", "--output_dir", tmp_path / "out"]

    def fails(*extra, fragment):
        assert_one_line_error(run(base + list(map(str, extra)), check=False), *fragment)
        assert not (tmp_path / "out" / "model.safetensors").exists()

    fails("--train_file", tmp_path / "missing.txt", fragment=["--train_file", "no such file"])
    (tmp_path / "empty.txt").write_text("")
    fails("--train_file", tmp_path / "empty.txt", fragment=["--train_file", "empty"])
    (tmp_path / "latin1.txt").write_bytes("na\u00efve caf\u00e9\n".encode("latin-1") * 100)
    fails("--train_file", tmp_path / "latin1.txt", fragment=["--train_file", "UTF-8"])
    fails("--train_file", corpus_files["train"], "--block_size", "4096", fragment=["--block_size", "positions"])
    (tmp_path / "short.txt").write_text("A few words only.\n" * 3)
    fails("--train_file", tmp_path / "short.txt", "--validation_file", corpus_files["validation"],
          "--block_size", "128", fragment=["fewer than one block"])
    fails("--train_file", corpus_files["train"], "--warmup_ratio", "1.5", fragment=["--warmup_ratio"])
    fails("--no_such_flag", "1", fragment=["unrecognized arguments"])


def test_data_made_with_another_tokenizer_is_refused(tmp_path, tokenizer_dir, tiny_config, corpus_files):
    from lmcompress.vocab import train_bpe_tokenizer

    other = tmp_path / "other-tokenizer"
    train_bpe_tokenizer([corpus_files["validation"].read_text(encoding="utf-8")], 300, other)
    folder = make_token_folder(tmp_path, other, corpus_files["train"])
    result = run(["train.py", "--config_name", tiny_config, "--tokenizer_name", tokenizer_dir, "--dataset_dir", folder,
                  "--max_steps", "2", "--report_to", "none", "--output_dir", tmp_path / "out"], check=False)
    assert_one_line_error(result, "--dataset_dir", "re-tokenize")


def append_a_byte(folder):
    with open(folder / "train.bin", "ab") as handle:
        handle.write(b"\x01")


def append_a_token(folder):
    with open(folder / "train.bin", "ab") as handle:
        handle.write(b"\x01\x00")


def edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, **changes}))
    return edit


@pytest.mark.parametrize("damage,fragments", [
    (append_a_byte, ["train.bin", "truncated or corrupted"]),
    (append_a_token, ["train.bin", "truncated or corrupted"]),
    (edit_meta(format_version=2), ["meta.json", "format version 2", "--overwrite"]),
    (edit_meta(dtype="float32"), ["meta.json", "unknown dtype"]),
], ids=["size-not-a-multiple-of-the-dtype", "size-disagrees-with-meta", "other-format-version", "unknown-dtype"])
def test_damaged_token_folder_is_refused(damage, fragments, tmp_path, tokenizer_dir, tiny_config, corpus_files):
    folder = make_token_folder(tmp_path, tokenizer_dir, corpus_files["train"])
    damage(folder)
    result = run(["train.py", "--config_name", tiny_config, "--tokenizer_name", tokenizer_dir, "--dataset_dir", folder,
                  "--max_steps", "2", "--report_to", "none", "--output_dir", tmp_path / "out"], check=False)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_training_loss_and_gradients_equal_the_plain_logits_loss(tmp_path, tokenizer_dir, tiny_config, corpus_files):
    import torch.nn.functional as F

    from lmcompress.training import build_trainer, fusable_output_head

    argv = train_command(tmp_path / "out", tokenizer_dir, tiny_config, corpus_files, "--max_steps", 1)[1:]
    trainer, _ = build_trainer([str(arg) for arg in argv])
    model, batch = trainer.model, next(iter(trainer.get_train_dataloader()))
    assert fusable_output_head(model) is not None, "the test must take the path that skips the logits"
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    fused = trainer.compute_loss(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits
    plain = F.cross_entropy(logits.flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, expected in zip(torch.autograd.grad(fused, parameters), torch.autograd.grad(plain, parameters)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)



def test_accumulation_without_a_token_count_equals_one_larger_batch(tmp_path, tokenizer_dir, tiny_config,
                                                                     corpus_files):
    """For a model that takes no loss arguments the Trainer counts no tokens: the loss is then divided by the
    micro-batches of the step, and two micro-batches of 4 give the loss and update of one batch of 8."""
    from lmcompress.training import build_trainer

    results = {}
    for name, batch, accumulation in (("big", 8, 1), ("accumulated", 4, 2)):
        argv = train_command(tmp_path / name, tokenizer_dir, tiny_config, corpus_files, "--max_steps", 1,
                             "--logging_steps", 1, "--optim", "sgd", "--per_device_train_batch_size", batch,
                             "--gradient_accumulation_steps", accumulation)[1:]
        trainer, _ = build_trainer([str(arg) for arg in argv])
        trainer.model_accepts_loss_kwargs = False
        batches = iter(trainer.get_train_dataloader())
        assert trainer.get_batch_samples(batches, accumulation, trainer.args.device)[1] is None, "no token count"
        trainer.train()
        loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        results[name] = (loss, {k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert results["accumulated"][0] == pytest.approx(results["big"][0], abs=1e-5)
    for name, value in results["big"][1].items():
        assert torch.allclose(results["accumulated"][1][name], value, atol=1e-6), name
