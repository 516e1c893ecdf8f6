"""Loading configs, models and their tokenizers with clear errors."""
import json
import os

import torch

from .errors import UserError
from .jsonio import read_json
from .vocab import first_line, load_failure, require_folder_if_local


def n_positions(config):
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise UserError(f"the model config ({config.model_type}) states no number of positions")


def load_config(config_name=None, model_name_or_path=None, config_flag="--config_name", model_flag="--model_name_or_path"):
    """A config from a JSON file or folder (``config_flag``) or from the model itself (``model_flag``)."""
    from transformers import AutoConfig

    if config_name:
        if config_name.endswith(".json"):
            if not os.path.isfile(config_name):
                raise UserError(f"{config_flag} {config_name}: no such file")
            try:
                values = read_json(config_name)
            except json.JSONDecodeError as err:
                raise UserError(f"{config_flag} {config_name}: not valid JSON ({err})") from err
            if "model_type" not in values:
                raise UserError(f"{config_flag} {config_name}: no \"model_type\" (e.g. \"gpt2\")")
            try:
                return AutoConfig.for_model(**values)
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"{config_flag} {config_name}: {first_line(err)}") from err
        return _from_pretrained(AutoConfig, config_name, config_flag)
    if model_name_or_path:
        return _from_pretrained(AutoConfig, model_name_or_path, model_flag)
    raise UserError(f"give {model_flag} (a hub name or folder) or {config_flag} (a config JSON)")


def _from_pretrained(cls, name_or_path, flag, **kwargs):
    require_folder_if_local(name_or_path, flag)
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise load_failure(name_or_path, flag, None, err) from err


def load_causal_lm(config, model_name_or_path=None, flag="--model_name_or_path"):
    """Weights from ``model_name_or_path`` when given, else a random initialisation from ``config``."""
    from transformers import AutoModelForCausalLM

    if model_name_or_path:
        return _from_pretrained(AutoModelForCausalLM, model_name_or_path, flag, config=config)
    return AutoModelForCausalLM.from_config(config)


# The files from which from_pretrained loads a model's weights (a sharded model: its index, naming the shards).
WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def is_trained_model_folder(path):
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    return (("config.json" in names and bool(names.intersection(WEIGHTS_NAMES)))
            or any(name.startswith("checkpoint-") for name in names))


# Config fields of decoders whose logits are not a plain linear map of the last hidden state.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_output_head(model):
    """The output layer when the model's logits are exactly ``last hidden state @ head.weight.T``, else None:
    losses may then run the head themselves, chunk by chunk; models that soft-cap or scale their logits, or add a
    bias, go through their own forward."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or any(getattr(model.config, name, None) for name in LOGIT_TRANSFORMS):
        return None
    return head


def position_embeddings(model):
    """The learned absolute position embeddings (GPT-2's ``wpe``, OPT's ``embed_positions``), or None for models
    with rotary or no position embeddings."""
    for module in (model.base_model, getattr(model.base_model, "decoder", None)):
        for name in ("wpe", "embed_positions"):
            found = getattr(module, name, None)
            if isinstance(found, torch.nn.Embedding):
                return found
    return None
