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
