"""Authenticated job files: what later steps read back from a job folder is checked before use.

After sealing, the merge and the RT Dose writer read files the pipeline wrote earlier into
`jobs/J/` (the engine's `inputs.json` with fractions and protons per fraction, the anonymized
DICOM), and the outbox sends `jobs/J/RD.dcm`. Each of those files gets an HMAC-SHA256 when it is
written, under a key derived from the job's data key (which is stored only wrapped by the site
key), in `jobs/J/integrity.json`. A file read back must match its MAC: a changed, swapped or
missing file fails the job with the file's name instead of becoming a wrong dose.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from dicom_node.errors import NodeError

RECORD = "integrity.json"
_LABEL = b"mcnode job files v1"


class TamperedFile(NodeError):
    """A job file does not match the MAC recorded when it was written."""


class JobFiles:
    """MACs of the files in one job folder, keyed by their path inside it."""

    def __init__(self, folder: Path, data_key: bytes, job_id: str, shown_as: str | None = None) -> None:
        self.folder = folder
        self.job_id = job_id
        self._key = hmac.new(data_key, _LABEL + job_id.encode(), hashlib.sha256).digest()
        # how messages name the folder (relative to the node's data_dir; no machine paths)
        self.shown_as = shown_as or f"jobs/{job_id}"

    def _mac(self, name: str, content: bytes) -> str:
        mac = hmac.new(self._key, name.encode() + b"\0", hashlib.sha256)
        mac.update(content)
        return mac.hexdigest()

    def _load(self) -> dict[str, str]:
        path = self.folder / RECORD
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise TamperedFile(f"{self.shown_as}/{RECORD} cannot be read ({exc}); the job's files cannot be "
                               "trusted") from exc
        return {str(k): str(v) for k, v in data.get("files", {}).items()}

    def record(self, *names: str) -> None:
        """Add (or replace) the MACs of these files, as they are now on disk."""
        macs = self._load()
        for name in names:
            macs[name] = self._mac(name, (self.folder / name).read_bytes())
        tmp = self.folder / f".{RECORD}.tmp"
        with tmp.open("w") as fh:
            json.dump({"job": self.job_id, "files": macs}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / RECORD)

    def names(self) -> list[str]:
        """The files that have a recorded MAC."""
        return sorted(self._load())

    def read(self, name: str) -> bytes:
        """The file's bytes, only when they are the bytes recorded; TamperedFile otherwise."""
        shown = f"{self.shown_as}/{name}"
        expected = self._load().get(name)
        if expected is None:
            raise TamperedFile(f"{shown} has no integrity record; it was not written by this job's pipeline")
        try:
            content = (self.folder / name).read_bytes()
        except OSError as exc:
            raise TamperedFile(f"{shown} cannot be read: {exc.strerror or exc}") from exc
        if not hmac.compare_digest(self._mac(name, content), expected):
            raise TamperedFile(f"{shown} was changed after it was written (integrity check failed); "
                               "nothing computed from it is used")
        return content
