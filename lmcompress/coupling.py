"""The names of transformers this project relies on that are not its documented API, all of them.

A transformers upgrade that renames one breaks the guarantee beside it: tests/test_coupling.py calls each
function here and fails naming what is gone; the README's "Coupling to transformers" says why each is needed.
"""
import os


def deepspeed_mismatches(training_args):
    """The values of the ``--deepspeed`` config that contradict the flags, one ``ds KEY=V vs hf FLAG=V`` each.

    ``TrainingArguments`` finds them while it is built (``HfTrainerDeepSpeedConfig.mismatches``, undocumented) but
    the Trainer refuses them only inside ``train()``, after the model and data are loaded.
    """
    return [line.lstrip("- ") for line in training_args.hf_deepspeed_config.mismatches]


def deepspeed_config(training_args):
    """The ``--deepspeed`` config with the Trainer's values filled in for "auto" (``hf_deepspeed_config.config``,
    undocumented), from which a frozen teacher's ZeRO-3 inference config is made."""
    return training_args.hf_deepspeed_config.config


def save_training_args(args, folder):
    """Save ``args`` into a checkpoint ``folder`` under the name the Trainer saves them with
    (``transformers.trainer.TRAINING_ARGS_NAME``, undocumented), replacing the Trainer's copy."""
    import torch
    from transformers.trainer import TRAINING_ARGS_NAME

    torch.save(args, os.path.join(folder, TRAINING_ARGS_NAME))
