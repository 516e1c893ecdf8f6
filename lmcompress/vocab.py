"""Tokenizers: loading with clear errors, a fingerprint that identifies a vocabulary, and training a small BPE."""
import hashlib
import json
import os

from .errors import UserError


def load_tokenizer(name_or_path, flag="--tokenizer_name"):
    """Load a fast tokenizer from a folder (``save_pretrained``) or a hub name."""
    from transformers import AutoTokenizer

    if name_or_path is None:
        raise UserError(f"{flag} is required: give a tokenizer folder or hub name")
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local and not os.path.isdir(name_or_path):
        raise UserError(f"{flag} {name_or_path}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        hint = " (offline: give a local folder written by save_pretrained)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise UserError(f"{flag} {name_or_path}: cannot load a tokenizer{hint}: {first_line(err)}") from err
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"{flag} {name_or_path}: a fast (Rust) tokenizer is required; save one with tokenizer.json")
    if tokenizer.eos_token_id is None:
        raise UserError(f"{flag} {name_or_path}: the tokenizer has no end-of-text token, needed to separate documents")
    return tokenizer


def first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def tokenizer_fingerprint(tokenizer):
    """A short hash of the vocabulary (token → id, special tokens): equal fingerprints mean equal token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def tokenizer_record(tokenizer, name_or_path):
    """What a token file records about the tokenizer that made it."""
    return {
        "name_or_path": str(name_or_path),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }


def train_bpe_tokenizer(texts, vocab_size, output_dir, model_max_length=1024):
    """Train a GPT-2-style byte-level BPE on ``texts`` and save it as a folder ``AutoTokenizer`` loads."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer
