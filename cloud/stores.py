"""Object stores for bundles and results: a local folder (default) and S3 (cloud.stores_s3).

URIs name objects: ``file:///abs/path`` for the local store, ``s3://bucket/key`` for S3. Stores only
ever see sealed bytes.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

from cloud.errors import StoreError


class ObjectStore(ABC):
    """Put and get whole objects by URI."""

    @abstractmethod
    def put_file(self, src: Path, uri: str) -> None: ...

    @abstractmethod
    def get_file(self, uri: str, dst: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, data: bytes, uri: str) -> None: ...

    @abstractmethod
    def get_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def delete(self, uri: str) -> None: ...


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


def store_for(uri: str, **options: object) -> ObjectStore:
    """The store that serves this URI's scheme."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        return LocalStore()
    if scheme == "s3":
        from cloud.stores_s3 import S3Store  # boto3 only where S3 is used

        return S3Store(**options)  # type: ignore[arg-type]
    raise StoreError(f"no object store for URI scheme {scheme!r}")
