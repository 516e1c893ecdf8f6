"""Tokenizers: loading with clear errors, a fingerprint that identifies a vocabulary, and training a small BPE."""
import hashlib
import json
import os

from .errors import UserError


MAKES_FOLDERS = ("truncate.py writes truncated students, train.py and distiller.py their --output_dir; run the step "
                 "that makes it first")


def names_a_local_folder(name_or_path):
    """Whether ``name_or_path`` is a local path rather than a hub id (``name`` or ``org/name``): absolute or
    starting with ``.``, deeper than ``org/name``, existing, or inside a folder that exists here (``outputs/finetune``
    when ``outputs/`` does)."""
    return (os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1
            or os.path.exists(name_or_path) or ("/" in name_or_path and os.path.isdir(name_or_path.split("/")[0])))


def require_folder_if_local(name_or_path, flag):
    """Refuse a local path (``names_a_local_folder``) that is not a folder, so a missing folder is not reported as
    a malformed hub name."""
    if names_a_local_folder(name_or_path) and not os.path.isdir(name_or_path):
        raise UserError(f"{flag} {name_or_path}: no such folder ({MAKES_FOLDERS})")


def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def load_failure(name_or_path, flag, what, err):
    """The one-line error for a model, config or tokenizer (``what``) that did not load. A name of the form
    ``org/name`` that is no folder here is either a folder not made yet or a hub model: the line says both."""
    offline = hub_offline() and not os.path.isdir(name_or_path)
    if not os.path.isdir(name_or_path) and name_or_path.count("/") == 1:
        hub = "nor a hub model in the local cache (offline)" if offline else f"nor a hub model: {first_line(err)}"
        return UserError(f"{flag} {name_or_path}: no such folder ({MAKES_FOLDERS}), {hub}")
    hint = " (offline: give a local folder written by save_pretrained)" if offline else ""
    return UserError(f"{flag} {name_or_path}: cannot load{' ' + what if what else ''}{hint}: {first_line(err)}")


def load_tokenizer(name_or_path, flag="--tokenizer_name"):
    """Load a fast tokenizer from a folder (``save_pretrained``) or a hub name."""
    from transformers import AutoTokenizer

    if name_or_path is None:
        raise UserError(f"{flag} is required: give a tokenizer folder or hub name")
    require_folder_if_local(name_or_path, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise load_failure(name_or_path, flag, "a tokenizer", err) from err
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"{flag} {name_or_path}: a fast (Rust) tokenizer is required; save one with tokenizer.json")
    if tokenizer.eos_token_id is None:
        raise UserError(f"{flag} {name_or_path}: the tokenizer has no end-of-text token, needed to separate documents")
    return tokenizer


class BackendTokenizer:
    """A saved fast tokenizer read with the ``tokenizers`` library alone (no transformers, no torch).

    Offers what tokenization needs (``backend_tokenizer``, ``eos_token_id``, ``get_vocab``, ``len``) with the same
    values as ``AutoTokenizer``, so ``tokenizer_fingerprint`` is identical; tokenize_datasets.py uses it to keep
    its memory low (importing transformers and torch alone costs ~440 MB of resident memory).
    """

    def __init__(self, backend, eos_token):
        self.backend_tokenizer = backend
        self.eos_token = eos_token
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None

    def get_vocab(self):
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self):
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)


def _special_token(value):
    return value.get("content") if isinstance(value, dict) else value


def load_backend_tokenizer(name_or_path, flag="--tokenizer_name"):
    """``load_tokenizer`` without importing transformers when ``name_or_path`` is a folder holding
    ``tokenizer.json`` and ``tokenizer_config.json`` (what ``save_pretrained`` writes); otherwise ``load_tokenizer``.
    """
    folder = name_or_path and os.path.isdir(name_or_path) and name_or_path
    files = [os.path.join(folder, name) for name in ("tokenizer.json", "tokenizer_config.json")] if folder else []
    if not files or not all(os.path.isfile(path) for path in files):
        return load_tokenizer(name_or_path, flag)
    try:
        from tokenizers import Tokenizer

        with open(files[1], encoding="utf-8") as handle:
            config = json.load(handle)
        backend = Tokenizer.from_file(files[0])
    except Exception:  # anything unusual: let transformers load it (and report its errors)
        return load_tokenizer(name_or_path, flag)
    eos_token = _special_token(config.get("eos_token"))
    tokenizer = BackendTokenizer(backend, eos_token)
    if eos_token is not None and tokenizer.eos_token_id is None:
        return load_tokenizer(name_or_path, flag)  # a token transformers would add: its loader knows how
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
