"""The local object store: objects as files under ``file://`` URIs, written atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from cloud.errors import StoreError
from cloud.stores.base import ObjectStore


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise StoreError(f"not a local file URI: {uri}")
    return Path(parsed.path)


class LocalStore(ObjectStore):
    """Objects as files; writes are atomic (temp file + rename)."""

    def put_file(self, src: Path, uri: str) -> None:
        dst = _local_path(uri)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as exc:
            raise StoreError(f"cannot store {uri}: {exc.strerror or exc}") from exc

    def get_file(self, uri: str, dst: Path) -> None:
        try:
            shutil.copyfile(_local_path(uri), dst)
        except OSError as exc:
            raise StoreError(f"cannot read {uri}: {exc.strerror or exc}") from exc

    def local_path(self, uri: str) -> Path | None:
        return _local_path(uri)

    def put_bytes(self, data: bytes, uri: str) -> None:
        dst = _local_path(uri)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        except OSError as exc:
            raise StoreError(f"cannot store {uri}: {exc.strerror or exc}") from exc

    def get_bytes(self, uri: str) -> bytes:
        try:
            return _local_path(uri).read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {uri}: {exc.strerror or exc}") from exc

    def exists(self, uri: str) -> bool:
        return _local_path(uri).exists()

    def delete(self, uri: str) -> None:
        _local_path(uri).unlink(missing_ok=True)
