"""The S3 object store (boto3): ``s3://bucket/key`` URIs, any S3-compatible endpoint.

``endpoint_url`` and ``region`` come from config; left unset, boto3's own resolution applies
(``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, instance roles), which is how a worker inside an AWS
Batch container finds the store. Every boto error is converted to StoreError here. Only sealed bytes
are ever put.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from cloud.errors import StoreError
from cloud.stores.base import ObjectStore


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://bucket/key`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise StoreError(f"not an s3://bucket/key URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def aws_client(service: str = "s3", endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 client; empty strings from config mean 'let boto3 decide'."""
    return boto3.session.Session().client(service, endpoint_url=endpoint_url or None,
                                          region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


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
            self._client.download_file(bucket, key, str(tmp))
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
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
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
