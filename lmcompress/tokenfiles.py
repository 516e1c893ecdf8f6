"""Token folders: ``meta.json`` plus one flat little-endian token file per split, ``{split}.bin``.

A folder is written under a temporary name and renamed into place once complete, so a reader sees a whole
folder or none. Readers check the format version, the dtype and each file's size against ``meta.json``.
"""
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .atomic import replace_folder, staging_path
from .errors import UserError, require_writable_folder

FORMAT_VERSION = 1
META_NAME = "meta.json"


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def split_path(folder, split):
    return Path(folder) / f"{split}.bin"


def read_meta(folder, flag="--dataset_dir"):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: no such folder (make one with tokenize_datasets.py)")
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise UserError(f"{flag} {folder}: not a token folder (no {META_NAME}); make one with tokenize_datasets.py")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{meta_path}: not valid JSON ({err}); re-run tokenize_datasets.py with --overwrite") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path}: token format version {meta.get('format_version')!r}, this version reads "
                        f"{FORMAT_VERSION}; re-run tokenize_datasets.py with --overwrite")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise UserError(f"{meta_path}: unknown dtype {meta.get('dtype')!r}; re-run tokenize_datasets.py --overwrite")
    return meta


def open_split(folder, split, flag="--dataset_dir"):
    """Memory-map one split's tokens after checking the file against ``meta.json``."""
    meta = read_meta(folder, flag)
    splits = meta.get("splits", {})
    if split not in splits:
        raise UserError(f"{flag} {folder}: no '{split}' split (it has: {', '.join(splits) or 'none'})")
    path = split_path(folder, split)
    if not path.is_file():
        raise UserError(f"{path}: missing token file; re-run tokenize_datasets.py with --overwrite")
    itemsize = np.dtype(meta["dtype"]).itemsize
    size = path.stat().st_size
    expected = splits[split]["n_tokens"] * itemsize
    if size != expected:
        raise UserError(f"{path}: {size} bytes, but {META_NAME} says {splits[split]['n_tokens']} {meta['dtype']} "
                        f"tokens ({expected} bytes): the file is truncated or corrupted; re-run tokenize_datasets.py")
    if size == 0:
        raise UserError(f"{path}: holds no tokens; give more text")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")


class SplitWriter:
    """Appends token ids to one split's file and counts what it wrote; a context manager that closes the file."""

    def __init__(self, path, dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._file = open(path, "wb")
        self.n_tokens = 0
        self.n_documents = 0
        self.n_words = 0
        self.n_bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._file.close()

    def write(self, ids):
        array = np.ascontiguousarray(ids, dtype=self.dtype)
        self._file.write(memoryview(array).cast("B"))  # unlike ndarray.tofile, a full disk raises ENOSPC
        self.n_tokens += array.size

    def summary(self):
        return {"n_tokens": self.n_tokens, "n_documents": self.n_documents, "n_words": self.n_words,
                "n_bytes": self.n_bytes}


class StagedFolder:
    """A folder built under a temporary name beside its destination and renamed into place on ``commit``."""

    def __init__(self, destination):
        self.destination = Path(destination)
        require_writable_folder(self.destination.parent, "--output_dir")
        staged = Path(staging_path(self.destination))
        self.path = Path(tempfile.mkdtemp(prefix=f"{staged.name}-", dir=staged.parent))

    def commit(self):
        replace_folder(str(self.path), str(self.destination))

    def discard(self):
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_meta(folder, meta):
    (Path(folder) / META_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
