"""Files written so that a crash or a power cut leaves the old file or the whole new one, never a part.

``write_atomically`` writes through a temporary file beside the destination (mode 0600, created
exclusively), flushes it to disk, renames it over the destination and, with ``sync_dir``, flushes the
folder too so that the rename itself survives a power cut. The spool (received DICOM), the identity
vault and sealed bundles and results all write this way; ``fsync_dir`` is the folder flush alone (after
a file is removed for good).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename or an unlink in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically[T](dst: Path, write: Callable[[BinaryIO], T], *, fsync: bool = True,
                        sync_dir: bool = False) -> T:
    """``write(file)`` into a temporary file, then rename it to ``dst``; returns what ``write`` returned.

    ``fsync`` False skips the flushes (tests on a RAM disk). OSError propagates; the temporary file is
    removed in every case.
    """
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            result = write(out)
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        os.replace(tmp, dst)
        if fsync and sync_dir:
            fsync_dir(dst.parent)
        return result
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
