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
    """Delete the staging files and folders in ``folder`` that a run killed while writing left behind."""
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


def move_files_into(staged, folder, markers):
    """Move the files of the complete folder ``staged`` into ``folder``, which holds other things too (and so cannot
    be replaced whole), replacing files of the same name; then remove ``staged``.

    The files named in ``markers`` are what makes ``folder`` usable (a model's weights): those already in ``folder``
    are deleted first, and the new ones moved in after every other file. So a kill at any moment leaves ``folder``
    with its previous files, or without any marker, or with every new file: never a new marker beside older
    versions of the files staged with it.
    """
    fsync_tree(staged)
    for name in markers:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    for name in sorted(os.listdir(staged), key=lambda name: name in markers):
        os.replace(os.path.join(staged, name), os.path.join(folder, name))
    shutil.rmtree(staged, ignore_errors=True)
