"""Under --bf16 every matrix product with a vocabulary-sized dimension runs in bfloat16, through the real
training step (the model's forward, the fused loss outside it, and their backward)."""
import pytest
import torch

from conftest import train_command
from recorders import VocabularyProducts

BATCH = ["--per_device_train_batch_size", 4]  # 4 × 64 positions: no dimension but the vocabulary's is 512


def training_step_loss(argv, record=None, build_trainer=None):
    if build_trainer is None:
        from lmcompress.training import build_trainer

    trainer, _ = build_trainer([str(arg) for arg in argv])
    model = trainer.accelerator.prepare_model(trainer.model)  # as train() does: autocast around model.forward
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {key: value.to(trainer.args.device) for key, value in batch.items()}
    model.train()
    if record is None:
        return trainer.training_step(model, batch).item(), model.config.vocab_size
    with record:
        return trainer.training_step(model, batch).item(), model.config.vocab_size


@pytest.mark.slow
def test_bf16_training_step_runs_vocabulary_products_in_bfloat16(tmp_path, tokenizer_dir, tiny_config, corpus_files):
    argv = train_command(tmp_path / "out", tokenizer_dir, tiny_config, corpus_files, "--max_steps", 1, *BATCH)[1:]
    reference, vocabulary = training_step_loss(argv)
    recorder = VocabularyProducts(vocabulary)
    loss, _ = training_step_loss([*argv, "--bf16"], recorder)
    assert len(recorder.products) == 4, ("the last position's logits (logits_to_keep=1), the fused loss's logits "
                                         f"and its two gradient products: {recorder.products}")
    assert recorder.dtypes() == {torch.bfloat16}, recorder.products
    assert loss == pytest.approx(reference, rel=2e-2)


@pytest.mark.slow
def test_bf16_distillation_step_runs_vocabulary_products_in_bfloat16(tmp_path, untrained_model, corpus_files):
    from lmcompress.distillation import build_trainer

    argv = ["--teacher_name_or_path", untrained_model, "--student_name_or_path", untrained_model,
            "--train_file", corpus_files["train"], "--block_size", 64, *BATCH,
            "--max_steps", 1, "--output_dir", tmp_path / "out", "--save_strategy", "no", "--report_to", "none",
            "--alpha_ce", 0.5, "--alpha_clm", 0.5, "--seed", 1, "--dataloader_num_workers", 0]
    reference, vocabulary = training_step_loss(argv, build_trainer=build_trainer)
    recorder = VocabularyProducts(vocabulary)
    loss, _ = training_step_loss([*argv, "--bf16"], recorder, build_trainer)
    assert len(recorder.products) == 4, ("the teacher's and the student's output layers, and the student's two "
                                         f"backward products: {recorder.products}")
    assert recorder.dtypes() == {torch.bfloat16}, recorder.products
    assert loss == pytest.approx(reference, rel=2e-2)
