"""User-facing errors: one clear line and a non-zero exit, never a traceback from deep inside a library."""
import functools
import os
import sys


class UserError(Exception):
    """Bad input that the user can fix. The message names the file or flag and what to do."""


EXIT_USER_ERROR = 2


def entry_point(main):
    """Wrap a script's ``main`` so that a ``UserError`` prints ``<script>: error: <message>`` and exits 2.

    Set ``LMCOMPRESS_TRACEBACK=1`` to see the full traceback instead.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if os.environ.get("LMCOMPRESS_TRACEBACK"):
                raise
            script = os.path.basename(sys.argv[0]) or "lmcompress"
            message = " ".join(str(err).split())
            print(f"{script}: error: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def require_file(path, flag):
    """Refuse a missing or empty input file with a message that names the flag."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder, expected a text file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{flag} {path}: the file is empty")
