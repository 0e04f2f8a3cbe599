"""The spool: received instances as DICOM files, written atomically before success is answered.

Each file is written to a temporary name in its final folder, flushed and fsynced, then renamed,
so a crash leaves either the whole file or nothing under the final name. Receiving the same SOP
Instance again replaces the file atomically (idempotent for identical data). Nothing is deleted
here: a job's inputs stay until the job has ended.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from anonymizer.durable import write_atomically
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
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(final, lambda out: out.writelines(parts), fsync=self.fsync, sync_dir=True)
        except OSError as exc:
            # the file name is the SOP Instance UID: logs get its hash only
            ref = "uid#" + hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:12]
            raise SpoolError(f"cannot write instance {ref}: {exc.strerror or exc}") from exc
        return final
