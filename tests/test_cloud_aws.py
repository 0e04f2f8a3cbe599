"""The aws backend against moto_server on 127.0.0.1: S3 round trip, KMS key wrapping, Batch array jobs.

moto runs no containers here (Batch with use_docker off), so the test plays the container runtime:
for each submitted Batch job it reads the command and environment back from Batch and runs every
child's worker with AWS_BATCH_JOB_ARRAY_INDEX set, as a container would.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import boto3
import numpy as np
import pytest

from anonymizer.seal import open_file
from cloud.backends import get_backend
from cloud.dispatch import dispatch
from cloud.engines.base import Tally
from cloud.errors import CloudError, StoreError
from cloud.kms import store_wrapped_key, unwrap_data_key
from cloud.stores.base import store_for
from tests.cloud_data import local_tallies, sealed_job, shard_tasks
from tests.peers import moto_aws

SHARDS, PRIMARIES = 3, 3000


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory):
    """moto_server plus a bucket, a KMS key and a Batch queue; fake credentials only in this scope."""
    with moto_aws(tmp_path_factory.mktemp("moto")) as (url, key_id):
        s3 = boto3.client("s3", endpoint_url=url)
        batch = boto3.client("batch", endpoint_url=url)
        yield {"url": url, "kms_key_id": key_id, "batch": batch, "s3": s3}


def test_s3_round_trip_of_a_sealed_bundle(aws, tmp_path):
    job = sealed_job(tmp_path / "job")
    uri = f"s3://mcnode-test/t/{job.job_id}/bundle.sealed"
    store = store_for(uri, endpoint_url=aws["url"])
    store.put_file(job.bundle, uri)
    assert store.exists(uri)
    store.get_file(uri, tmp_path / "back.sealed")
    assert (tmp_path / "back.sealed").read_bytes() == job.bundle.read_bytes()
    open_file(tmp_path / "back.sealed", tmp_path / "back.tar", job.key, job.job_id, "bundle")  # verifies
    store.delete(uri)
    assert not store.exists(uri)
    with pytest.raises(StoreError, match="cannot read"):
        store.get_bytes(uri)


def test_kms_wraps_the_data_key_for_one_job(aws):
    data_key = os.urandom(32)
    uri = store_wrapped_key(data_key, "s3://mcnode-test/t/job-9/data.key.kms", aws["kms_key_id"], "job-9")
    blob = store_for(uri).get_bytes(uri)
    assert data_key not in blob and data_key.hex().encode() not in blob
    assert unwrap_data_key(uri, "job-9") == data_key
    with pytest.raises(CloudError, match="could not unwrap"):
        unwrap_data_key(uri, "job-10")  # bound to its job by the encryption context


def test_batch_array_job_with_a_lost_child_gives_the_local_dose(aws, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    job = sealed_job(tmp_path / "job")
    reference = local_tallies(job, SHARDS, PRIMARIES)
    batch, s3 = aws["batch"], aws["s3"]
    submitted: list[dict] = []
    commands: list[list[str]] = []

    def container_runtime(batch_id: str) -> None:
        desc = batch.describe_jobs(jobs=[batch_id])["jobs"][0]
        submitted.append(desc)
        command = desc["container"]["command"]
        env = {**os.environ, **{e["name"]: e["value"] for e in desc["container"].get("environment", [])}}
        size = desc.get("arrayProperties", {}).get("size", 0)
        # nothing in the bucket holds the key in clear while the children run
        for obj in s3.list_objects_v2(Bucket="mcnode-test").get("Contents", []):
            body = s3.get_object(Bucket="mcnode-test", Key=obj["Key"])["Body"].read()
            assert job.key not in body and job.key.hex().encode() not in body
        for index in range(size) if size else [None]:
            if len(submitted) == 1 and index == 1:
                continue  # this child's container is lost: Batch says SUCCEEDED, no result stored
            child_env = env if index is None else {**env, "AWS_BATCH_JOB_ARRAY_INDEX": str(index)}
            commands.append(command)
            subprocess.run(command, env=child_env, check=True, stdin=subprocess.DEVNULL, timeout=120)

    backend = get_backend("aws", bucket="mcnode-test", prefix="jobs", job_queue="mcnode-q", job_definition="mcnode",
                          kms_key_id=aws["kms_key_id"], endpoint_url=aws["url"], region="us-east-1",
                          command=[sys.executable, "-m", "cloud.worker"], poll_s=0.1, retries=1,
                          on_submit=container_runtime)
    progress: list[tuple[int, int]] = []
    tallies = dispatch(shard_tasks(job, SHARDS, PRIMARIES, "aws"), job.key, backend,
                       on_progress=lambda d, t: progress.append((d, t)))
    for got, want in zip(tallies, reference, strict=True):
        assert np.array_equal(Tally.from_bytes(got).dose_per_primary, Tally.from_bytes(want).dose_per_primary)
    assert submitted[0]["arrayProperties"]["size"] == SHARDS
    assert "arrayProperties" not in submitted[1] or not submitted[1]["arrayProperties"].get("size")  # the retry
    assert "stored no result" in caplog.text
    assert progress[-1] == (SHARDS, SHARDS)
    key_hex = job.key.hex()
    assert all(key_hex not in " ".join(c) for c in commands) and key_hex not in caplog.text
    # what the backend put in S3 is removed when the job ends
    assert not s3.list_objects_v2(Bucket="mcnode-test", Prefix="jobs/").get("Contents")
