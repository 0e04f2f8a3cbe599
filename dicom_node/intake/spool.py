"""The spool: received instances as DICOM files, written atomically before success is answered.

Each file is written to a temporary name in its final folder, flushed and fsynced, then renamed,
so a crash leaves either the whole file or nothing under the final name. Receiving the same SOP
Instance again replaces the file atomically (idempotent for identical data). Nothing is deleted
here: a job's inputs stay until the job has ended.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from dicom_node.errors import SpoolError

LOGGER = logging.getLogger(__name__)


class Spool:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {self.root}: {exc.strerror}") from exc

    def path_for(self, series_uid: str, sop_instance_uid: str) -> Path:
        # Short hashed folder names keep paths short and free of anything from the data set.
        series_dir = hashlib.sha256(series_uid.encode()).hexdigest()[:16]
        return self.root / series_dir / f"{sop_instance_uid}.dcm"

    def store(self, series_uid: str, sop_instance_uid: str, *parts: bytes) -> Path:
        """Write one DICOM file (the concatenated parts) durably; leave nothing half-written."""
        final = self.path_for(series_uid, sop_instance_uid)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{id(parts):x}.tmp")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if self.fsync:
                dir_fd = os.open(final.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            # the file name is the SOP Instance UID: logs get its hash only
            ref = "uid#" + hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:12]
            raise SpoolError(f"cannot write instance {ref}: {exc.strerror or exc}") from exc
        return final
