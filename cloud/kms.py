"""The job's data key wrapped by a KMS key, for workers that have no control channel (AWS Batch).

The wrapped key is stored as an object next to the bundle; only a principal allowed to call
``kms:Decrypt`` with this job's encryption context can unwrap it, and the clear key never touches a
store. The encryption context binds the blob to its job, so a blob copied to another job fails.
boto errors become CloudError here.
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from cloud.errors import CloudError
from cloud.stores.base import store_for
from cloud.stores.s3 import aws_client

CONTEXT_KEY = "mcnode-job"


def wrap_data_key(key: bytes, kms_key_id: str, job_id: str, *, region: str | None = None,
                  endpoint_url: str | None = None) -> bytes:
    """The data key encrypted under the KMS key, bound to the job."""
    try:
        reply = aws_client("kms", endpoint_url, region).encrypt(
            KeyId=kms_key_id, Plaintext=key, EncryptionContext={CONTEXT_KEY: job_id})
    except (BotoCoreError, ClientError) as exc:
        raise CloudError(f"job {job_id}: KMS could not wrap the data key: {exc}") from exc
    return bytes(reply["CiphertextBlob"])


def store_wrapped_key(key: bytes, uri: str, kms_key_id: str, job_id: str, *, region: str | None = None,
                      endpoint_url: str | None = None, store_endpoint_url: str | None = None) -> str:
    """Wrap the data key and store the blob at `uri`; return the uri."""
    blob = wrap_data_key(key, kms_key_id, job_id, region=region, endpoint_url=endpoint_url)
    store_for(uri, endpoint_url=store_endpoint_url, region=region).put_bytes(blob, uri)
    return uri


def unwrap_data_key(uri: str, job_id: str, *, region: str | None = None, endpoint_url: str | None = None,
                    store_endpoint_url: str | None = None) -> bytes:
    """Read a wrapped key from a store and unwrap it with KMS (the worker's side)."""
    blob = store_for(uri, endpoint_url=store_endpoint_url, region=region).get_bytes(uri)
    try:
        reply = aws_client("kms", endpoint_url, region).decrypt(
            CiphertextBlob=blob, EncryptionContext={CONTEXT_KEY: job_id})
    except (BotoCoreError, ClientError) as exc:
        raise CloudError(f"job {job_id}: KMS could not unwrap the data key: {exc}") from exc
    key = bytes(reply["Plaintext"])
    if len(key) != 32:
        raise CloudError(f"job {job_id}: the unwrapped data key is {len(key)} bytes, not 32")
    return key
