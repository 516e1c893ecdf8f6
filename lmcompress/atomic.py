"""Folders that appear whole or not at all: written under a temporary name beside their destination, then
renamed into place. A reader never sees a half-written folder, and the previous one stays until the new is whole."""
import os
import shutil

# Names under which folders are written or set aside; a run that starts again may delete any of them.
STAGING_PREFIX = ".staging-"


def fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


def replace_folder(staged, final):
    """Move the complete folder ``staged`` to ``final``; an older ``final`` is renamed aside first and deleted
    only once the new one is in place, so a kill at any moment leaves one whole folder under ``final`` or aside, and a failed move puts it back."""
    fsync_tree(staged)
    replaced = None
    if os.path.exists(final):
        replaced = os.path.join(os.path.dirname(final) or ".", f"{STAGING_PREFIX}replaced-{os.path.basename(final)}")
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
