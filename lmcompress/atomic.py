"""Files and folders that appear whole or not at all: written under a staging name beside their destination, made
durable, then renamed into place. A reader never sees a half-written one, and the previous one stays until the new
one is whole. Every staging name starts with ``STAGING_PREFIX``: a run that starts again may delete any of them."""
import contextlib
import os
import shutil

STAGING_PREFIX = ".staging-"


def staging_path(final, use=None):
    """The staging name beside ``final``: ``.staging-NAME``, or ``.staging-USE-NAME`` for another ``use`` of it."""
    folder, name = os.path.split(os.path.normpath(os.fspath(final)))
    return os.path.join(folder, f"{STAGING_PREFIX}{use + '-' if use else ''}{name}")


def remove_stale_staging(folder):
    """The staging files and folders in ``folder`` that a run killed while writing left behind."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(STAGING_PREFIX):
                path = os.path.join(folder, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)


def write_file(path, data):
    """Write ``data`` (text as UTF-8, or bytes) to ``path``: into a staging file beside it, flushed to disk, then
    renamed over it; the staging file is removed if anything fails."""
    staged = f"{staging_path(path)}-{os.getpid()}"
    try:
        with open(staged, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staged)
        raise


def fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


def remove_folder(path):
    """Rename first, so that a kill during the deletion leaves no half-deleted folder under ``path``."""
    doomed = staging_path(path, "deleted")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def replace_folder(staged, final):
    """Move the complete folder ``staged`` to ``final``; an older ``final`` is renamed aside first and deleted
    only once the new one is in place, so a kill at any moment leaves one whole folder under ``final`` or aside,
    and a failed move puts it back."""
    fsync_tree(staged)
    replaced = None
    if os.path.exists(final):
        replaced = staging_path(final, "replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    try:
        os.rename(staged, final)
    except BaseException:
        if replaced:
            os.rename(replaced, final)
        raise
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)

