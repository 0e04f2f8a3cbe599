"""The aws backend: the sealed bundle in S3, the data key wrapped by KMS next to it, one AWS Batch
array job (one child per shard) running ``mcnode worker``.

Children find their shard, seed and result object from ``AWS_BATCH_JOB_ARRAY_INDEX`` (see
cloud.worker). Shards of one job differ in primaries by at most one, so they go out as at most two
array jobs (a Batch array has 2 or more children; a lone shard is a plain job). The backend polls
(base.Backend.run: retries, deadlines, progress) until every child has ended; a finished child's
sealed result is copied to its task's result URI, and a child that reports success but stored no
result counts as failed. boto errors become DispatchError (Batch, KMS) or StoreError (S3) here. Objects it put in S3
are deleted when the run ends.

Not built (yet): starting EC2 instances to use as ssh hosts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from cloud.backends.base import Attempt, Backend
from cloud.errors import DispatchError
from cloud.kms import store_wrapped_key
from cloud.stores.base import ObjectStore, store_for
from cloud.stores.s3 import aws_client
from cloud.worker import ShardTask

LOGGER = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED")
BATCH_MIN_TIMEOUT_S = 60  # Batch refuses attemptDurationSeconds below 60
COLLECT_THREADS = 16  # finished shards' results are fetched from S3 this many at a time


@dataclass(frozen=True)
class _Child:
    """One shard as a Batch job (a child of an array job, or a plain job): `Attempt.handle`."""

    batch_id: str  # "<array job id>:<index>" or a plain job id
    remote_result: str


class AwsBackend(Backend):
    name = "aws"

    def __init__(self, retries: int = 2, deadline_s: float = 3600.0, *, bucket: str, job_queue: str,
                 job_definition: str, kms_key_id: str, prefix: str = "mcnode", region: str | None = None,
                 endpoint_url: str | None = None, s3_endpoint_url: str | None = None,
                 command: Sequence[str] = ("mcnode", "worker"), poll_s: float = 5.0,
                 worker_env: dict[str, str] | None = None,
                 on_submit: Callable[[str], None] | None = None) -> None:
        super().__init__(retries, deadline_s)
        if not (bucket and job_queue and job_definition and kms_key_id):
            raise DispatchError("the aws backend needs cloud.s3.bucket, cloud.aws.job_queue, "
                                "cloud.aws.job_definition and cloud.aws.kms_key_id")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.job_queue, self.job_definition, self.kms_key_id = job_queue, job_definition, kms_key_id
        self.region, self.endpoint_url = region or None, endpoint_url or None
        self.s3_endpoint_url = s3_endpoint_url or self.endpoint_url
        self.command = list(command)
        self.poll_s = poll_s  # Backend.run polls Batch this often
        self._put: list[str] = []  # objects this run stored in S3, deleted when it ends
        self._bundle: str | None = None
        self._key_uri: str | None = None
        self._results: str | None = None
        self.worker_env = dict(worker_env or {})
        # Called with each submitted Batch job id. Where no Batch compute runs the containers (moto
        # without docker), the tests play the container runtime here.
        self.on_submit = on_submit
        self._batch = aws_client("batch", self.endpoint_url, self.region)
        self._s3: ObjectStore | None = None
        # (phase, seconds) of the last run: upload, key, submit, poll, collect, delete (for the benchmark)
        self.phases: list[tuple[str, float]] = []
        self._clock = _Clock(self.phases)

    def workers(self) -> int:
        return 10_000  # Batch scales the compute environment; an array job is not limited here

    def _uri(self, job_id: str, name: str) -> str:
        return f"s3://{self.bucket}/{'/'.join(p for p in (self.prefix, job_id, name) if p)}"

    def _store(self, uri: str) -> ObjectStore:
        """One store (one boto3 client, thread-safe) per backend: a new client costs tens of ms of CPU."""
        if urlparse(uri).scheme != "s3":
            return store_for(uri)
        if self._s3 is None:
            self._s3 = store_for(uri, endpoint_url=self.s3_endpoint_url, region=self.region)
        return self._s3

    # --- Batch -------------------------------------------------------------------------------

    def _submit(self, group: list[Attempt]) -> None:
        """One Batch request for a run of shards (an array job when there are several)."""
        first = group[0]
        assert self._bundle is not None and self._key_uri is not None and self._results is not None
        task = replace(first.task, bundle_uri=self._bundle, result_uri=self._results)
        argv = [*self.command, *task.argv(key_uri=self._key_uri)]
        env = dict(self.worker_env)
        if self.s3_endpoint_url:
            env.setdefault("AWS_ENDPOINT_URL", self.s3_endpoint_url)
        if self.region:
            env.setdefault("AWS_DEFAULT_REGION", self.region)
        request = {
            "jobName": f"mcnode-{task.job_id}-{task.index}-a{first.number}"[:128],
            "jobQueue": self.job_queue, "jobDefinition": self.job_definition,
            "containerOverrides": {"command": argv,
                                   "environment": [{"name": k, "value": v} for k, v in sorted(env.items())]},
            "timeout": {"attemptDurationSeconds": max(BATCH_MIN_TIMEOUT_S, int(self.deadline_s))},
        }
        if len(group) > 1:
            request["arrayProperties"] = {"size": len(group)}
        try:
            batch_id = self._batch.submit_job(**request)["jobId"]
        except (BotoCoreError, ClientError) as exc:
            raise DispatchError(f"job {task.job_id}: AWS Batch refused the shards: {exc}") from exc
        LOGGER.info("job %s: submitted shards %d-%d to AWS Batch as %s", task.job_id, task.index,
                    group[-1].task.index, batch_id)
        if self.on_submit is not None:
            self.on_submit(batch_id)
        now = time.monotonic()
        for i, a in enumerate(group):
            a.started = now
            a.handle = _Child(f"{batch_id}:{i}" if len(group) > 1 else batch_id,
                              self._results.replace("{shard}", str(a.task.index)))

    def _statuses(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for start in range(0, len(ids), 100):
            try:
                jobs = self._batch.describe_jobs(jobs=ids[start:start + 100])["jobs"]
            except (BotoCoreError, ClientError) as exc:
                raise DispatchError(f"cannot read AWS Batch job status: {exc}") from exc
            for j in jobs:
                out[j["jobId"]] = (j.get("status", ""), j.get("statusReason", ""))
        return out

    def _terminate(self, children: list[_Child], reason: str) -> None:
        for batch_id in sorted({c.batch_id.split(":")[0] for c in children}):
            try:
                self._batch.terminate_job(jobId=batch_id, reason=reason)
            except (BotoCoreError, ClientError) as exc:
                LOGGER.warning("could not terminate AWS Batch job %s: %s", batch_id, exc)

    # --- what Backend.run calls ------------------------------------------------------------

    def _open(self, tasks: list[ShardTask], key: bytes) -> list[ShardTask]:
        job_id = tasks[0].job_id
        self._put = []
        self.phases.clear()
        bundle = tasks[0].bundle_uri
        if urlparse(bundle).scheme != "s3":
            remote = self._uri(job_id, "bundle.sealed")
            with self._clock("upload"):
                self._store(remote).put_file(Path(urlparse(bundle).path), remote)
            self._put.append(remote)
            bundle = remote
        key_uri = self._uri(job_id, "data.key.kms")
        with self._clock("key"):
            store_wrapped_key(key, key_uri, self.kms_key_id, job_id, region=self.region,
                              endpoint_url=self.endpoint_url, store_endpoint_url=self.s3_endpoint_url)
        self._put.append(key_uri)
        self._bundle, self._key_uri = bundle, key_uri
        self._results = self._uri(job_id, "shard-{shard}.tally")
        return tasks

    def _start(self, attempts: list[Attempt], room: int, key: bytes) -> list[Attempt]:
        started = attempts[:room]
        with self._clock("submit"):
            for group in _groups(started):
                self._submit(group)
        return started

    def _poll(self, running: list[Attempt]) -> list[tuple[Attempt, str | None]]:
        with self._clock("poll"):
            status = self._statuses([a.handle.batch_id for a in running])
        ended: list[tuple[Attempt, str | None]] = []
        succeeded = []
        for a in running:
            state, reason = status.get(a.handle.batch_id, ("", ""))
            if state == "SUCCEEDED":
                succeeded.append(a)
            elif state == "FAILED":
                ended.append((a, f"AWS Batch child failed: {reason or 'no reason given'}"))
        if succeeded:
            with self._clock("collect"), ThreadPoolExecutor(max_workers=min(COLLECT_THREADS, len(succeeded)),
                                                            thread_name_prefix="aws-collect") as pool:
                ended += zip(succeeded, pool.map(self._collect, succeeded), strict=True)
        return ended

    def _stop(self, attempts: list[Attempt], reason: str) -> None:
        self._terminate([a.handle for a in attempts], reason)

    def _close(self) -> None:
        with self._clock("delete"):
            for why in self._store(self._put[0]).delete_many(self._put) if self._put else []:
                LOGGER.warning("could not delete %s", why)
        self._put = []

    def _collect(self, attempt: Attempt) -> str | None:
        """Bring a finished child's sealed result to its task's URI; the reason when it cannot."""
        child: _Child = attempt.handle
        src = self._store(child.remote_result)
        if not src.exists(child.remote_result):
            return "AWS Batch reported success but the shard stored no result"
        dst = attempt.task.result_uri
        if dst == child.remote_result:
            return None
        if urlparse(dst).scheme in ("", "file"):
            path = Path(urlparse(dst).path)
            path.parent.mkdir(parents=True, exist_ok=True)
            src.get_file(child.remote_result, path)
        else:
            store_for(dst).put_bytes(src.get_bytes(child.remote_result), dst)
        self._put.append(child.remote_result)
        return None


class _Clock:
    """Adds (phase, seconds) to a list around a `with` block."""

    def __init__(self, phases: list[tuple[str, float]]) -> None:
        self.phases = phases

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((phase, time.perf_counter() - start))


def _groups(attempts: list[Attempt]) -> list[list[Attempt]]:
    """Runs of shards one array job can carry: consecutive shards and seeds, same primaries and attempt."""
    out: list[list[Attempt]] = []
    for a in sorted(attempts, key=lambda a: a.task.index):
        last = out[-1][-1] if out else None
        if (last is not None and a.task.index == last.task.index + 1 and a.task.seed == last.task.seed + 1
                and a.task.primaries == last.task.primaries and a.number == last.number
                and a.task.threads == last.task.threads and a.task.bundle_uri == last.task.bundle_uri):
            out[-1].append(a)
        else:
            out.append([a])
    return out
