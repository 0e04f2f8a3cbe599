"""What an object store is, and which one serves a URI: a local folder (cloud.stores.local) or S3 (cloud.stores.s3).

URIs name objects: ``file:///abs/path`` for the local store, ``s3://bucket/key`` for S3. Stores only
ever see sealed bytes.
"""

from __future__ import annotations

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

    def local_path(self, uri: str) -> Path | None:
        """The object as a file on this machine, to read in place; None when it must be fetched."""
        return None

    def delete_many(self, uris: list[str]) -> list[str]:
        """Delete every object; return the URIs that could not be deleted (with a reason each)."""
        failed = []
        for uri in uris:
            try:
                self.delete(uri)
            except StoreError as exc:
                failed.append(f"{uri}: {exc}")
        return failed


def store_for(uri: str, **options: object) -> ObjectStore:
    """The store that serves this URI's scheme."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        from cloud.stores.local import LocalStore

        return LocalStore()
    if scheme == "s3":
        from cloud.stores.s3 import S3Store  # boto3 only where S3 is used

        return S3Store(**options)  # type: ignore[arg-type]
    raise StoreError(f"no object store for URI scheme {scheme!r}")
