"""An English corpus that every machine with Python has: the standard library's own documentation.

Two parts, so one can stand in for a pre-training corpus and the other for a fine-tuning target:
  * ``docstrings``: module, class and function docstrings of the standard library's sources, read with
    ``ast`` (nothing is imported, so no module's import-time side effects run);
  * ``topics``: the ``pydoc_data`` help topics (the language reference as plain text).
Each part yields documents in an order that is deterministic for a given Python version.
"""
import ast
import sysconfig
import warnings
from pathlib import Path

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def _stdlib_sources():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            yield path


def _docstrings_of(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                yield doc.strip()


def docstrings():
    """The standard library's docstrings, one document each."""
    for path in _stdlib_sources():
        yield from _docstrings_of(path)


def topics():
    """The ``pydoc_data`` help topics, one document each, sorted by topic name."""
    from pydoc_data.topics import topics as table

    for name in sorted(table):
        yield table[name].strip()




def _licence_lines(paths, limit=400):
    """Leading comment lines of source files: licence and boilerplate text, repeated across the sources."""
    for path in paths[:limit]:
        try:
            head = path.read_text(encoding="utf-8").splitlines()[:8]
        except (UnicodeDecodeError, OSError):
            continue
        lines = [line for line in head if line.startswith("#") and len(line) > 2]
        if lines:
            yield "\n".join(lines)


def _code_lines(paths, limit=200, per_file=12):
    """Short and symbol-heavy lines of source code: brackets, operators, decorators."""
    for path in paths[:limit]:
        try:
            text = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        picked = [line.strip() for line in text if 0 < len(line.strip()) < 40][:per_file]
        if picked:
            yield "\n".join(picked)


def _help_html():
    path = Path(sysconfig.get_paths()["stdlib"]) / "idlelib" / "help.html"
    if path.is_file():
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for start in range(0, len(lines), 40):
            yield "\n".join(lines[start:start + 40])


def noisy_documents():
    """Real text of the kinds that web-crawled corpora carry and cleaning drops: documentation HTML (IDLE's
    help page), licence headers repeated across files, and short or symbol-heavy lines of source code."""
    sources = list(_stdlib_sources())
    yield from _help_html()
    yield from _licence_lines(sources)
    yield from _code_lines(sources)


def with_noise(documents, noise, every=4):
    """``documents`` with one ``noise`` document after each ``every`` of them, the rest of the noise at the end."""
    noise = iter(noise)
    for index, document in enumerate(documents, 1):
        yield document
        if index % every == 0:
            yield from _take(noise)
    yield from noise


def _take(iterator):
    item = next(iterator, None)
    return () if item is None else (item,)
