"""Raw text → token folders, streaming: memory stays bounded whatever the size of the input.

Text is read in pieces of about ``PIECE_CHARS`` characters, cut only where a byte-level BPE pre-tokenizer
(GPT-2's) would put a token boundary anyway: just before a single space or newline that stands between two
non-space characters. Tokenizing piece by piece therefore gives the same ids as tokenizing the whole text,
and decoding a split gives back its text byte for byte. Documents (a local file, a hub record) are each
followed by the end-of-text token. Pieces are encoded in batches, in worker processes with ``num_proc`` > 1.
"""
import codecs
import contextlib
import dataclasses
import hashlib
import itertools
import multiprocessing
import os
import re
from pathlib import Path

from tqdm.auto import tqdm

from .cleaning import CleaningOptions, LineCleaner
from .errors import UserError, require_file
from .tokenfiles import FORMAT_VERSION, SplitWriter, StagedFolder, read_meta, split_path, token_dtype, write_meta
from .vocab import first_line, tokenizer_record

PIECE_CHARS = 1 << 18
READ_BYTES = 1 << 20
# One piece per batch: the Rust tokenizer then encodes on the calling thread, and its per-thread allocator arenas
# (over 100 MB for a batch of 2 MB of text) never come into being; on 2 cores this is no slower.
BATCH_CHARS = PIECE_CHARS
SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")
SPLITS = ("train", "validation", "test")
RECORDS_PER_BATCH = 1000


@dataclasses.dataclass
class TextSources:
    """What to tokenize: local files per split, or a hub dataset."""

    files: dict = dataclasses.field(default_factory=dict)  # split -> [paths]
    dataset_name: str = None
    dataset_config_name: str = None
    validation_split_percentage: float = 5.0
    clean: bool = False
    cleaning: CleaningOptions = CleaningOptions()

    def describe(self):
        if self.dataset_name:
            config = f" --dataset_config_name {self.dataset_config_name}" if self.dataset_config_name else ""
            return f"--dataset_name {self.dataset_name}{config}"
        return ", ".join(str(path) for paths in self.files.values() for path in paths)


# ---------------------------------------------------------------------------------------------- cutting text


def safe_cut(text, target):
    """The last safe cut position at or before ``target`` (else the first after it, else ``len(text)``)."""
    for lo in (max(0, target - 4096), 0):
        last = None
        for match in SAFE_CUT.finditer(text, lo, target + 1):
            last = match.start()
        if last:
            return last
    match = SAFE_CUT.search(text, target)
    return match.start() if match else len(text)


def pieces(chunks, piece_chars=PIECE_CHARS):
    """Re-cut a stream of text chunks into pieces of about ``piece_chars`` at safe cut positions.

    A run of more than ``4 * piece_chars`` characters with no safe position (no spaces at all) is cut
    anyway: the text still decodes exactly, and only the tokens at that cut may differ.
    """
    pending = ""
    for chunk in chunks:
        pending += chunk
        while len(pending) >= 2 * piece_chars:
            cut = safe_cut(pending, piece_chars)
            if cut >= len(pending):
                if len(pending) < 4 * piece_chars:
                    break
                cut = piece_chars
            yield pending[:cut]
            pending = pending[cut:]
    while pending:
        cut = safe_cut(pending, piece_chars) if len(pending) > piece_chars else len(pending)
        yield pending[:cut]
        pending = pending[cut:]


def read_text_file(path, flag):
    """Decode a UTF-8 file in chunks, refusing binary or non-UTF-8 content with a clear error."""
    require_file(path, flag)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as handle:
        while True:
            raw = handle.read(READ_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                raise UserError(f"{flag} {path}: not UTF-8 text (invalid byte at offset {offset + err.start}); "
                                "convert it, e.g. iconv -f latin1 -t utf-8") from err
            if "\x00" in text:
                raise UserError(f"{flag} {path}: looks binary (NUL byte near offset {offset}); give a text file")
            if text:
                yield text
            if not raw:
                return
            offset += len(raw)


def lines_of(chunks):
    """Split a chunk stream into lines that keep their line endings."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        lines = pending.splitlines(keepends=True)
        pending = lines.pop() if lines and not lines[-1].endswith(("\n", "\r")) else ""
        yield from lines
    if pending:
        yield pending


def cleaned(chunks, cleaner):
    cleaner.start_document()
    return (line for line in lines_of(chunks) if cleaner.keep(line))


# ------------------------------------------------------------------------------------------- documents by split


def local_documents(sources, cleaner):
    """Yield ``(split, chunk_iterator)`` per document: one document per file."""
    for split, paths in sources.files.items():
        for path in paths:
            chunks = read_text_file(path, f"--{split}_file")
            yield split, (cleaned(chunks, cleaner) if cleaner else chunks)


def carve_validation(documents, budget_bytes):
    """Send the first ``budget_bytes`` of the train documents to a validation split, cut at a safe position.

    The rest of the cut document streams on from where the cut was made: it is never held in memory."""
    remaining = budget_bytes
    for split, chunks in documents:
        if split != "train" or remaining <= 0:
            yield split, chunks
            continue
        stream = pieces(chunks)
        validation_part, rest = [], None
        for piece in stream:
            size = len(piece.encode("utf-8"))
            if size <= remaining:
                validation_part.append(piece)
                remaining -= size
                continue
            cut = safe_cut(piece, max(1, int(len(piece) * remaining / size)))
            validation_part.append(piece[:cut])
            rest = itertools.chain([piece[cut:]] if cut < len(piece) else [], stream)
            remaining = 0
            break
        if validation_part:
            yield "validation", iter(validation_part)
        first = next(rest, None) if rest is not None else None
        if first is not None:
            yield "train", itertools.chain([first], rest)


def hub_documents(sources, cleaner):
    """Yield ``(split, chunk_iterator)`` per document of a hub dataset.

    Datasets stored one line per record (WikiText) are recognised by records that each hold one line, newline
    included; their records are concatenated verbatim into one document per split instead of one document per
    line. Records are read from the memory-mapped Arrow table a batch at a time, never a whole split at once.
    """
    for split, dataset in load_hub_splits(sources).items():
        column = text_column(dataset, sources.describe())
        if records_are_lines(dataset, column):
            chunks = (record for record in records(dataset, column) if record)
            yield split, (cleaned(chunks, cleaner) if cleaner else chunks)
            continue
        for record in records(dataset, column):
            if record:
                yield split, (cleaned([record], cleaner) if cleaner else iter([record]))


def records(dataset, column, batch_size=RECORDS_PER_BATCH):
    for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
        yield from batch[column]


@contextlib.contextmanager
def hub_errors(sources):
    """A dataset that datasets cannot find or load, in one line."""
    try:
        yield
    except Exception as err:  # datasets raises many types for a missing or unreachable dataset
        offline = (" (offline: the dataset must be in the local cache)" if os.environ.get("HF_DATASETS_OFFLINE")
                   and not os.path.isdir(sources.dataset_name) else "")
        raise UserError(f"{sources.describe()}: cannot load{offline}: {first_line(err)}") from err


def known_splits(names, sources):
    """The train, validation and test splits among a dataset's split ``names``, in that order; at least one."""
    found = [name for name in SPLITS if name in names]
    if not found:
        raise UserError(f"{sources.describe()}: no train, validation or test split (it has: {', '.join(names) or 'none'})")
    return found


def load_hub_splits(sources):
    import datasets

    with hub_errors(sources):
        loaded = datasets.load_dataset(sources.dataset_name, sources.dataset_config_name)
    splits = {name: loaded[name] for name in known_splits(list(loaded), sources)}
    if "train" in splits and "validation" not in splits:
        n_validation = int(len(splits["train"]) * sources.validation_split_percentage / 100)
        splits["validation"] = splits["train"].select(range(n_validation))
        splits["train"] = splits["train"].select(range(n_validation, len(splits["train"])))
    return splits


def planned_splits(sources):
    """The splits tokenizing ``sources`` writes, known before any text is read: those given, and a validation
    split carved from train when none is given and ``validation_split_percentage`` asks for one. A hub
    dataset's are read from its split names (a train split of fewer than 100 / percentage records carves none)."""
    if sources.dataset_name:
        import datasets

        with hub_errors(sources):
            names = datasets.get_dataset_split_names(sources.dataset_name, sources.dataset_config_name)
        given = known_splits(names, sources)
        carves = sources.validation_split_percentage > 0
    else:
        given = [split for split in SPLITS if split in sources.files]
        for split in given:
            for path in sources.files[split]:
                require_file(path, f"--{split}_file")
        carves = validation_budget(sources) > 0
    if "train" in given and "validation" not in given and carves:
        given.insert(1, "validation")
    return given


def validation_budget(sources):
    """The bytes of local train text that go to the validation split (none when a validation file is given)."""
    if "validation" in sources.files:
        return 0
    train_bytes = sum(os.path.getsize(path) for path in sources.files.get("train", []))
    return int(train_bytes * sources.validation_split_percentage / 100)


def text_column(dataset, name):
    """``text``, else the dataset's only string column."""
    if "text" in dataset.column_names:
        return "text"
    strings = [column for column, feature in dataset.features.items() if getattr(feature, "dtype", None) == "string"]
    if len(strings) == 1:
        return strings[0]
    raise UserError(f"{name}: no 'text' column (columns: {', '.join(dataset.column_names)}); "
                    "save the dataset with its text in a column named text (datasets: rename_column)")


def records_are_lines(dataset, column, sample=1000):
    lines = [record for record in records(dataset.select(range(min(sample, len(dataset)))), column) if record]
    return bool(lines) and all(line.endswith("\n") and line.count("\n") == 1 for line in lines)


# ---------------------------------------------------------------------------------------------------- encoding

_worker_tokenizer = None


def _init_worker(tokenizer_json):
    global _worker_tokenizer
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def encode_batch(texts, tokenizer=None):
    """Encode texts; return per text ``(ids, n_words, n_bytes)``."""
    backend = tokenizer or _worker_tokenizer
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets nobody reads here: ~1.5x faster
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    return [(encoding.ids, len(text.split()), len(text.encode("utf-8"))) for text, encoding in zip(texts, encodings)]


def batches(documents):
    """Group document pieces into batches of about ``BATCH_CHARS``: lists of ``(split, text, ends_document)``."""
    batch, size = [], 0
    for split, chunks in documents:
        previous = None
        for piece in pieces(chunks):
            if previous is not None:
                batch.append((split, previous, False))
                size += len(previous)
                if size >= BATCH_CHARS:
                    yield batch
                    batch, size = [], 0
            previous = piece
        batch.append((split, previous or "", True))
        size += len(previous or "")
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encoded(documents, tokenizer, num_proc):
    """Yield ``(split, ids, n_words, n_bytes, ends_document)`` in input order, encoding in ``num_proc`` workers."""
    backend = tokenizer.backend_tokenizer
    if num_proc <= 1:
        for batch in batches(documents):
            results = encode_batch([text for _, text, _ in batch], backend)
            for (split, _, ends), result in zip(batch, results):
                yield (split, *result, ends)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(backend.to_str(),)) as pool:
        window = []
        for batch in batches(documents):
            window.append(batch)
            if len(window) == num_proc * 2:
                yield from _encode_window(pool, window)
                window = []
        yield from _encode_window(pool, window)


def _encode_window(pool, window):
    texts = [[text for _, text, _ in batch] for batch in window]
    for batch, results in zip(window, pool.map(encode_batch, texts)):
        for (split, _, ends), result in zip(batch, results):
            yield (split, *result, ends)


# ----------------------------------------------------------------------------------------------- the whole job


def file_record(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {"path": str(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def folder_records(folder):
    """Each file of a local dataset folder by size and modification time: an edited folder is a new job."""
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    return [{"path": str(path.relative_to(folder)), "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
            for path in files]


def describe_sources(sources):
    if sources.dataset_name:
        record = {"dataset_name": sources.dataset_name, "dataset_config_name": sources.dataset_config_name}
        if os.path.isdir(sources.dataset_name):
            record["files"] = folder_records(sources.dataset_name)
        return [record]
    for split, paths in sources.files.items():
        for path in paths:
            require_file(path, f"--{split}_file")
    return [dict(split=split, **file_record(path)) for split, paths in sources.files.items() for path in paths]


def job_key(sources, source_records, tokenizer_info):
    """Identifies a tokenization job: same key, same output."""
    payload = repr((FORMAT_VERSION, source_records, tokenizer_info["fingerprint"],
                    sources.validation_split_percentage if "validation" not in sources.files else None,
                    dataclasses.asdict(sources.cleaning) if sources.clean else None))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def existing_key(output_dir):
    try:
        meta = read_meta(output_dir)
    except UserError:
        return None
    if all(split_path(output_dir, split).is_file() for split in meta.get("splits", {})):
        return meta.get("key")
    return None


def tokenize_to_folder(sources, tokenizer, tokenizer_name, output_dir, num_proc=1, overwrite=False, log=print):
    """Tokenize ``sources`` into ``output_dir``; reuse it when it already holds the same job. Returns the meta."""
    if not sources.files and not sources.dataset_name:
        raise UserError("no data: give --train_file (and optionally --validation_file/--test_file) or --dataset_name")
    info = tokenizer_record(tokenizer, tokenizer_name)
    source_records = describe_sources(sources)
    key = job_key(sources, source_records, info)
    if not overwrite and existing_key(output_dir) == key:
        log(f"Reusing {output_dir}: it already holds these inputs tokenized with this tokenizer (--overwrite redoes it)")
        return read_meta(output_dir)
    if Path(output_dir).exists() and not overwrite and any(Path(output_dir).iterdir()):
        raise UserError(f"--output_dir {output_dir}: holds other data; pass --overwrite or choose another folder")

    cleaner = LineCleaner(sources.cleaning) if sources.clean else None
    if sources.dataset_name:
        documents = hub_documents(sources, cleaner)
        total = None
    else:
        documents = local_documents(sources, cleaner)
        total = sum(os.path.getsize(path) for paths in sources.files.values() for path in paths)
        if validation_budget(sources) > 0:
            documents = carve_validation(documents, validation_budget(sources))

    dtype = token_dtype(info["vocab_size"])
    with StagedFolder(output_dir) as staged:
        writers = {}
        with contextlib.ExitStack() as open_files:
            progress = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None)
            for split, ids, n_words, n_bytes, ends_document in encoded(documents, tokenizer, num_proc):
                if split not in writers:
                    writers[split] = open_files.enter_context(SplitWriter(split_path(staged.path, split), dtype))
                writer = writers[split]
                writer.write(ids)
                writer.n_words += n_words
                writer.n_bytes += n_bytes
                if ends_document:
                    writer.write([tokenizer.eos_token_id])
                    writer.n_documents += 1
                progress.update(n_bytes)
            progress.close()
        empty = [split for split, writer in writers.items() if writer.n_tokens <= writer.n_documents]
        if not writers or empty:
            raise UserError(f"{sources.describe()}: no text left in split(s) {', '.join(empty) or 'any'}"
                            + (" after --clean" if sources.clean else ""))
        meta = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "tokenizer": info,
            "dtype": dtype,
            "splits": {split: writer.summary() for split, writer in writers.items()},
            "sources": source_records,
            "validation_split_percentage": None if "validation" in sources.files else sources.validation_split_percentage,
            "cleaning": {"enabled": sources.clean, **dataclasses.asdict(sources.cleaning),
                         "counts": cleaner.counts if cleaner else None},
        }
        write_meta(staged.path, meta)
    return meta
