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


