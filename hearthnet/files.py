"""Writing a private file so that a reader sees the old one or the new one, whole."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically. The new file gets a fresh random name beside it
    (`mkstemp`: O_EXCL, mode 0600), so nothing planted in the directory can redirect or block
    the write, and is fsynced before the rename, so a crash cannot leave it empty or partial.
    The directory is not fsynced: after a crash the rename may be lost and the old file return."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
