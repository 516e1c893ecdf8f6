"""Each name of transformers that lmcompress/coupling.py relies on, beyond its documented API, still works."""
from transformers import TrainingArguments

from lmcompress import coupling


def test_deepspeed_mismatches_and_filled_config_come_from_the_training_arguments(tmp_path):
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": 3}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, deepspeed=config)
    assert coupling.deepspeed_mismatches(args) == ["ds gradient_accumulation_steps=3 vs hf gradient_accumulation_steps=2"]
    assert coupling.deepspeed_config(args)["train_micro_batch_size_per_gpu"] == 8


def test_training_args_replace_the_copy_the_trainer_saves(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "staging"), report_to="none")).save_model(
        str(tmp_path / "saved"))
    written = sorted(path.name for path in (tmp_path / "saved").iterdir())
    coupling.save_training_args(TrainingArguments(output_dir="final", report_to="none"), str(tmp_path / "saved"))
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == written, "the Trainer's copy, replaced"
    saved = [torch.load(path, weights_only=False) for path in (tmp_path / "saved").glob("*.bin")]
    assert [args.output_dir for args in saved] == ["final"]
