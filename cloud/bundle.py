"""The job bundle: everything a worker needs, anonymized, in one sealed tar.

Layout inside the tar::

    manifest.json     job id, engine, shard plan, sha256 of every file
    inputs/...        the engine's prepared inputs (CT as MHD, tables, beam model, plan file, ...)

No DICOM file goes in: the engine reads only its inputs, so the de-identified DICOM they were made
from stays on the node (less leaves the building, and each worker handles half the bytes).
The tar is written to a temporary file next to the destination, sealed with the job's data key
(part name "bundle"), and removed; nothing in the bundle identifies the patient.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from anonymizer.seal import open_file, seal_file
from cloud.errors import BundleError

BUNDLE_PART = "bundle"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_bundle(dst: Path, key: bytes, job_id: str, folders: dict[str, Path], manifest: dict[str, Any]) -> Path:
    """Tar the given folders (name in bundle -> local folder) plus a manifest and seal them to dst."""
    files: dict[str, str] = {}
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".bundle-", suffix=".tar", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            for arc_root, folder in folders.items():
                for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
                    name = f"{arc_root}/{path.relative_to(folder).as_posix()}"
                    files[name] = _sha256(path)
                    tar.add(path, arcname=name, recursive=False)
            body = json.dumps({**manifest, "job_id": job_id, "files": files}, indent=1, sort_keys=True).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        seal_file(tmp, dst, key, job_id, BUNDLE_PART)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def open_bundle(sealed: Path, key: bytes, job_id: str, into: Path) -> dict[str, Any]:
    """Verify and unpack a sealed bundle into a folder; return its manifest."""
    into.mkdir(parents=True, exist_ok=True)
    tar_path = into / ".bundle.tar"
    try:
        open_file(sealed, tar_path, key, job_id, BUNDLE_PART)
        with tarfile.open(tar_path, mode="r") as tar:
            tar.extractall(into, filter="data")
    finally:
        tar_path.unlink(missing_ok=True)
    manifest: dict[str, Any] = json.loads((into / MANIFEST).read_text())
    if manifest.get("job_id") != job_id:
        raise BundleError(f"bundle belongs to job {manifest.get('job_id')!r}, not {job_id!r}")
    for name, digest in manifest["files"].items():
        if _sha256(into / name) != digest:
            raise BundleError(f"bundle file {name} does not match its manifest")
    return manifest
