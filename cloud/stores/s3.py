"""The S3 object store (boto3): ``s3://bucket/key`` URIs, any S3-compatible endpoint.

``endpoint_url`` and ``region`` come from config; left unset, boto3's own resolution applies
(``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, instance roles), which is how a worker inside an AWS
Batch container finds the store. Every boto error is converted to StoreError here. Only sealed bytes
are ever put.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cloud.errors import StoreError
from cloud.stores.base import ObjectStore

MAX_POOL_CONNECTIONS = 32
CHUNK = 1 << 20


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://bucket/key`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise StoreError(f"not an s3://bucket/key URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def aws_client(service: str = "s3", endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 client; empty strings from config mean 'let boto3 decide'. Its connection pool is
    large enough for the threads that share one client (the aws backend collects results 16 at a time)."""
    return boto3.session.Session().client(service, endpoint_url=endpoint_url or None,
                                          region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                                          config=Config(max_pool_connections=MAX_POOL_CONNECTIONS))


class S3Store(ObjectStore):
    """Whole objects in S3. `bucket` and `prefix` are not needed here: URIs carry them."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None, **_ignored: object) -> None:
        self._client = aws_client("s3", endpoint_url, region)

    def _fail(self, what: str, uri: str, exc: Exception) -> StoreError:
        return StoreError(f"cannot {what} {uri}: {exc}")

    def put_file(self, src: Path, uri: str) -> None:
        bucket, key = split_s3_uri(uri)
        try:
            self._client.upload_file(str(src), bucket, key)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._fail("store", uri, exc) from exc

    def get_file(self, uri: str, dst: Path) -> None:
        bucket, key = split_s3_uri(uri)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
        try:
            # one streamed GET: download_file would add a HEAD and a thread pool per object
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"]
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(body, fh, CHUNK)
            os.replace(tmp, dst)
        except (BotoCoreError, ClientError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail("read", uri, exc) from exc

    def put_bytes(self, data: bytes, uri: str) -> None:
        bucket, key = split_s3_uri(uri)
        try:
            self._client.upload_fileobj(io.BytesIO(data), bucket, key)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("store", uri, exc) from exc

    def get_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3_uri(uri)
        try:
            return bytes(self._client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("read", uri, exc) from exc

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3_uri(uri)
        try:
            self._client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("look up", uri, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("look up", uri, exc) from exc
        return True

    def delete(self, uri: str) -> None:
        bucket, key = split_s3_uri(uri)
        try:
            self._client.delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("delete", uri, exc) from exc

    def delete_many(self, uris: list[str]) -> list[str]:
        """One DeleteObjects request per bucket and 1000 keys (S3's limit), not one request per object."""
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            bucket, key = split_s3_uri(uri)
            by_bucket.setdefault(bucket, []).append(key)
        failed = []
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):
                chunk = keys[start:start + 1000]
                try:
                    answer = self._client.delete_objects(
                        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
                except (BotoCoreError, ClientError) as exc:
                    failed += [f"s3://{bucket}/{k}: {exc}" for k in chunk]
                    continue
                failed += [f"s3://{bucket}/{e.get('Key')}: {e.get('Message', e.get('Code'))}"
                           for e in answer.get("Errors", [])]
        return failed
