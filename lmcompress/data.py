"""The common data flags of train.py, distiller.py and evaluate.py, and fixed-size blocks for training.

Data comes from ``--dataset_dir`` (a tokenize_datasets.py folder), from raw text files (tokenized on first
use into a cache keyed by the files' contents and the tokenizer) or from a hub dataset (likewise cached).
Every token folder records its tokenizer; a model whose tokenizer differs is refused.
"""
import dataclasses
import os
import typing
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .losses import next_token_targets
from .tokenfiles import open_split, read_meta
from .tokenization import (TextSources, describe_sources, existing_key, job_key, planned_splits,
                           tokenize_to_folder)
from .vocab import tokenizer_fingerprint, tokenizer_record


@dataclasses.dataclass
class DataArguments:
    dataset_dir: str = dataclasses.field(default=None, metadata={"help": "token folder from tokenize_datasets.py"})
    train_file: str = dataclasses.field(default=None, metadata={"help": "raw text for training"})
    validation_file: str = dataclasses.field(default=None, metadata={"help": "raw text for validation"})
    test_file: str = dataclasses.field(default=None, metadata={"help": "raw text for testing"})
    dataset_name: str = dataclasses.field(default=None, metadata={"help": "hub dataset, e.g. wikitext"})
    dataset_config_name: str = dataclasses.field(default=None, metadata={"help": "e.g. wikitext-103-raw-v1"})
    validation_split_percentage: float = dataclasses.field(
        default=5.0, metadata={"help": "percent of train used for validation when no validation data is given"})
    block_size: int = dataclasses.field(default=None, metadata={"help": "tokens per block (default: min(1024, n_positions))"})
    preprocessing_num_workers: int = dataclasses.field(default=1, metadata={"help": "tokenizer processes for raw text"})

    def has_data(self):
        return bool(self.dataset_dir or self.train_file or self.validation_file or self.test_file or self.dataset_name)

    def describe(self):
        """The data as the user named it, for messages."""
        if self.dataset_dir:
            return f"--dataset_dir {self.dataset_dir}"
        if self.dataset_name:
            config = f" --dataset_config_name {self.dataset_config_name}" if self.dataset_config_name else ""
            return f"--dataset_name {self.dataset_name}{config}"
        return " ".join(f"--{split}_file {path}" for split, path in
                        (("train", self.train_file), ("validation", self.validation_file), ("test", self.test_file))
                        if path)


def cache_root():
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmcompress" / "tokens"
    return Path(os.environ.get("LMCOMPRESS_CACHE", default))


class TokenPlan(typing.NamedTuple):
    """Where the tokens of the data flags are (or will be), which splits they have (or will have), and the raw
    text to tokenize into that folder (None for ``--dataset_dir``)."""

    folder: Path
    splits: list
    sources: TextSources = None


def plan_tokens(data_args, tokenizer, tokenizer_name):
    """The ``TokenPlan`` of the data flags, known before anything is tokenized, so that every flag that needs a
    split is checked first: the splits of a token folder (``--dataset_dir``, or the cache's when it already holds
    this job) from its meta.json, those of text still to tokenize from ``planned_splits``."""
    if not data_args.has_data():
        raise UserError("no data: give --dataset_dir, --train_file/--validation_file/--test_file or --dataset_name")
    if data_args.dataset_dir:
        if data_args.train_file or data_args.validation_file or data_args.test_file or data_args.dataset_name:
            raise UserError("--dataset_dir excludes --train_file/--validation_file/--test_file/--dataset_name")
        meta = read_meta(data_args.dataset_dir)
        check_tokenizer(meta, tokenizer, f"--dataset_dir {data_args.dataset_dir}")
        return TokenPlan(Path(data_args.dataset_dir), list(meta["splits"]))
    files = {split: [path] for split, path in
             (("train", data_args.train_file), ("validation", data_args.validation_file),
              ("test", data_args.test_file)) if path}
    sources = TextSources(files=files, dataset_name=data_args.dataset_name,
                          dataset_config_name=data_args.dataset_config_name,
                          validation_split_percentage=data_args.validation_split_percentage if "train" in files or
                          data_args.dataset_name else 0)
    key = job_key(sources, describe_sources(sources), tokenizer_record(tokenizer, tokenizer_name))
    folder = cache_root() / key[:24]
    splits = list(read_meta(folder)["splits"]) if existing_key(folder) == key else planned_splits(sources)
    return TokenPlan(folder, splits, sources)


def resolve_token_folder(data_args, tokenizer, tokenizer_name, main_process_first, plan=None):
    """The token folder of ``plan`` (default: the data flags' ``plan_tokens``), tokenizing raw text into the
    cache if needed (main process first)."""
    plan = plan or plan_tokens(data_args, tokenizer, tokenizer_name)
    if plan.sources is not None:
        with main_process_first():
            tokenize_to_folder(plan.sources, tokenizer, tokenizer_name, plan.folder,
                               num_proc=data_args.preprocessing_num_workers)
    return plan.folder


def require_planned_split(splits, split, data_args, asked_by=None, remedy=None):
    """Refuse data whose ``splits`` lack ``split``, naming the data as the user gave it and the flag that asked
    for the split (``asked_by``, e.g. ``--split test``)."""
    if split not in splits:
        raise UserError(f"{asked_by + ': ' if asked_by else ''}{data_args.describe()} has no '{split}' split (it has: "
                        f"{', '.join(splits)}); {remedy or f'give data with a {split} split'}")


def check_tokenizer(meta, tokenizer, what):
    made_with = meta["tokenizer"]
    if made_with["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"{what} was tokenized with {made_with['name_or_path']} (vocabulary {made_with['vocab_size']}, "
            f"fingerprint {made_with['fingerprint']}), not with this model's tokenizer (vocabulary {len(tokenizer)}, "
            f"fingerprint {tokenizer_fingerprint(tokenizer)}): re-tokenize with the model's tokenizer")


def check_vocabulary(meta, model_config, what):
    if meta["tokenizer"]["vocab_size"] > model_config.vocab_size:
        raise UserError(f"{what}: its tokenizer has {meta['tokenizer']['vocab_size']} tokens but the model's vocabulary "
                        f"is {model_config.vocab_size}: use the model's tokenizer")


def choose_block_size(requested, n_positions, flag="--block_size"):
    if requested is None:
        return min(1024, n_positions)
    if requested < 2:
        raise UserError(f"{flag} {requested}: must be at least 2")
    if requested > n_positions:
        raise UserError(f"{flag} {requested} is larger than the model's {n_positions} positions: use {flag} {n_positions} "
                        "or less")
    return requested


class BlockDataset(torch.utils.data.Dataset):
    """Consecutive, non-overlapping ``block_size`` blocks of a token file; the remainder is left out.

    Each item holds ``input_ids``, ``labels`` (the same block) and ``shift_labels``, the next-token targets.

    The file is memory-mapped lazily, so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, folder, split, block_size):
        self.folder, self.split, self.block_size = Path(folder), split, block_size
        n_tokens = len(open_split(self.folder, split))
        if n_tokens < block_size:
            raise UserError(f"{self.folder}/{split}.bin holds {n_tokens} tokens, fewer than one block of {block_size}: "
                            "give more text or a smaller --block_size")
        self.n_blocks = n_tokens // block_size
        self._tokens = None

    def __len__(self):
        return self.n_blocks

    def __getitem__(self, index):
        if self._tokens is None:
            self._tokens = open_split(self.folder, self.split)
        start = index * self.block_size
        block = torch.from_numpy(np.asarray(self._tokens[start:start + self.block_size], dtype=np.int64))
        # shift_labels: the Trainer counts them for the loss's token count (it would count ``labels`` whole,
        # one token per block more than the positions that predict one)
        return {"input_ids": block, "labels": block, "shift_labels": next_token_targets(block[None])[0]}

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}
