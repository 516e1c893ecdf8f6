"""User-facing errors: one clear line and a non-zero exit, never a traceback from deep inside a library."""
import contextlib
import errno
import functools
import os
import re
import shutil
import sys
import tempfile


class UserError(Exception):
    """Bad input that the user can fix. The message names the file or flag and what to do."""


EXIT_USER_ERROR = 2

# Failures of the file system that the user fixes (free space, another folder), not bugs to show a traceback for.
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# Libraries that write through C++ (torch.save) report a full disk as a RuntimeError; below this much free space
# a failed write is taken to be one.
DISK_FULL_BYTES = 16 * 2**20


def entry_point(main):
    """Wrap a script's ``main`` so that a ``UserError`` prints ``<script>: error: <message>`` and exits 2.

    Set ``LMCOMPRESS_TRACEBACK=1`` to see the full traceback instead.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, OSError, RuntimeError) as err:
            message = one_line_message(err)
            if os.environ.get("LMCOMPRESS_TRACEBACK") or message is None:
                raise
            script = os.path.basename(sys.argv[0]) or "lmcompress"
            print(f"{script}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
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


def one_line_message(err):
    """What to tell the user about ``err``, or None for a bug (shown with its traceback)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):
        if err.errno not in FILE_SYSTEM_ERRNOS:
            return None
        full = "; free some space and re-run" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return f"{err.filename}: {err.strerror}{full}"
    return collective_failure(str(err))


def collective_failure(message):
    """A gloo collective that timed out because another rank stopped answering (read from torch's message). A
    rank that dies needs no message here: the launcher ends the others and names the dead one."""
    timed_out = re.search(r"Timed out waiting (\d+)ms", message)
    if timed_out is None:
        return None
    return (f"a rank stopped answering for {int(timed_out.group(1)) // 1000} s (--ddp_timeout), so this one gave up "
            "waiting for it; the last checkpoint holds the run: re-run with --resume_from_checkpoint auto (RESUME=auto)")


def require_writable_folder(path, flag):
    """Create ``path`` if needed and prove it writable now, rather than after hours of work."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write there ({err.strerror}); choose another folder") from err


def file_system_failure(err, folder):
    """Why writing into ``folder`` failed when the file system is the cause (full, read-only, no permission)."""
    if isinstance(err, OSError) and err.errno in FILE_SYSTEM_ERRNOS:
        return err.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return f"the disk is full ({free / 2**20:.1f} MiB free)" if free < DISK_FULL_BYTES else None


@contextlib.contextmanager
def removed_on_failure(staging, folder, message):
    """Remove the half-written ``staging`` folder if the body fails. When the file system of ``folder`` is the
    cause, the failure becomes the one-line ``UserError`` ``message(cause)``; any other stays as it was."""
    try:
        yield
    except Exception as err:
        shutil.rmtree(staging, ignore_errors=True)
        cause = file_system_failure(err, folder)
        if cause is None:
            raise
        raise UserError(message(cause)) from err
