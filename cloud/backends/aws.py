"""The aws backend: the sealed bundle in S3, the data key wrapped by KMS next to it, one AWS Batch
array job (one child per shard) running ``mcnode worker``.

Children find their shard, seed and result object from ``AWS_BATCH_JOB_ARRAY_INDEX`` (see
cloud.worker). Shards of one job differ in primaries by at most one, so they go out as at most two
array jobs (a Batch array has 2 or more children; a lone shard is a plain job). The backend polls
until every child has ended, copies the sealed results to the tasks' result URIs, and runs failed
children again (up to `retries`); a child that reports success but stored no result counts as
failed. boto errors become DispatchError (Batch, KMS) or StoreError (S3) here. Objects it put in S3
are deleted when the run ends.

Not built (yet): starting EC2 instances to use as ssh hosts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from cloud.backends.base import Backend, ProgressCallback
from cloud.errors import Cancelled, CloudError, DispatchError
from cloud.kms import store_wrapped_key
from cloud.stores.base import store_for
from cloud.stores.s3 import aws_client
from cloud.worker import ShardTask

LOGGER = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED")
BATCH_MIN_TIMEOUT_S = 60  # Batch refuses attemptDurationSeconds below 60


@dataclass
class _Child:
    task: ShardTask
    batch_id: str  # "<array job id>:<index>" or a plain job id
    attempt: int
    submitted: float
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
        self.poll_s = poll_s
        self.worker_env = dict(worker_env or {})
        # Called with each submitted Batch job id. Where no Batch compute runs the containers (moto
        # without docker), the tests play the container runtime here.
        self.on_submit = on_submit
        self._batch = aws_client("batch", self.endpoint_url, self.region)

    def workers(self) -> int:
        return 10_000  # Batch scales the compute environment; an array job is not limited here

    def _uri(self, job_id: str, name: str) -> str:
        return f"s3://{self.bucket}/{'/'.join(p for p in (self.prefix, job_id, name) if p)}"

    def _store(self, uri: str):  # noqa: ANN202 - ObjectStore
        return store_for(uri, endpoint_url=self.s3_endpoint_url, region=self.region)

    # --- Batch -------------------------------------------------------------------------------

    def _submit(self, group: list[ShardTask], attempt: int, bundle: str, key_uri: str,
                results: str) -> list[_Child]:
        first = group[0]
        argv = [*self.command, "--job", first.job_id, "--bundle", bundle, "--shard", str(first.index),
                "--primaries", str(first.primaries), "--seed", str(first.seed), "--result", results,
                "--threads", str(first.threads), "--key-uri", key_uri]
        env = dict(self.worker_env)
        if self.s3_endpoint_url:
            env.setdefault("AWS_ENDPOINT_URL", self.s3_endpoint_url)
        if self.region:
            env.setdefault("AWS_DEFAULT_REGION", self.region)
        request = {
            "jobName": f"mcnode-{first.job_id}-{first.index}-a{attempt}"[:128],
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
            raise DispatchError(f"job {first.job_id}: AWS Batch refused the shards: {exc}") from exc
        LOGGER.info("job %s: submitted shards %d-%d to AWS Batch as %s", first.job_id, first.index,
                    group[-1].index, batch_id)
        if self.on_submit is not None:
            self.on_submit(batch_id)
        now = time.monotonic()
        return [_Child(t, f"{batch_id}:{i}" if len(group) > 1 else batch_id, attempt, now,
                       results.replace("{shard}", str(t.index))) for i, t in enumerate(group)]

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
        for batch_id in {c.batch_id.split(":")[0] for c in children}:
            try:
                self._batch.terminate_job(jobId=batch_id, reason=reason)
            except (BotoCoreError, ClientError) as exc:
                LOGGER.warning("could not terminate AWS Batch job %s: %s", batch_id, exc)

    # --- the run -----------------------------------------------------------------------------

    def run(self, tasks: list[ShardTask], key: bytes, on_done: ProgressCallback | None = None) -> None:
        if not tasks:
            return
        job_id = tasks[0].job_id
        put: list[str] = []
        children: list[_Child] = []
        try:
            bundle = tasks[0].bundle_uri
            if urlparse(bundle).scheme != "s3":
                remote = self._uri(job_id, "bundle.sealed")
                self._store(remote).put_file(Path(urlparse(bundle).path), remote)
                put.append(remote)
                bundle = remote
            key_uri = self._uri(job_id, "data.key.kms")
            store_wrapped_key(key, key_uri, self.kms_key_id, job_id, region=self.region,
                              endpoint_url=self.endpoint_url, store_endpoint_url=self.s3_endpoint_url)
            put.append(key_uri)
            results = self._uri(job_id, "shard-{shard}.tally")
            for group in _groups([(t, 0) for t in tasks]):
                children += self._submit([t for t, _a in group], 0, bundle, key_uri, results)
            while children:
                if self.cancelled.wait(self.poll_s):
                    self._terminate(children, "mcnode is stopping")
                    raise Cancelled("stopped: the node is shutting down")
                status = self._statuses([c.batch_id for c in children])
                retry: list[tuple[ShardTask, int]] = []
                for child in list(children):
                    state, reason = status.get(child.batch_id, ("", ""))
                    why = None
                    if state == "SUCCEEDED":
                        why = self._collect(child, put)
                        if why is None:
                            children.remove(child)
                            if on_done:
                                on_done(child.task)
                            continue
                    elif state == "FAILED":
                        why = f"AWS Batch child failed: {reason or 'no reason given'}"
                    elif time.monotonic() - child.submitted > self.deadline_s:
                        self._terminate([child], "shard deadline passed")
                        why = f"passed its deadline of {self.deadline_s:g} s"
                    if why is None:
                        continue
                    children.remove(child)
                    LOGGER.warning("job %s shard %d (attempt %d) %s", job_id, child.task.index, child.attempt + 1,
                                   why)
                    if child.attempt >= self.retries:
                        self._terminate(children, "another shard failed")
                        raise DispatchError(f"shard {child.task.index} failed {child.attempt + 1} time(s); "
                                            f"last: {why}")
                    retry.append((child.task, child.attempt + 1))
                for group in _groups(retry):
                    children += self._submit([t for t, _a in group], group[0][1], bundle, key_uri, results)
        finally:
            for uri in put:
                try:
                    self._store(uri).delete(uri)
                except CloudError as exc:
                    LOGGER.warning("job %s: could not delete %s: %s", job_id, uri, exc)

    def _collect(self, child: _Child, put: list[str]) -> str | None:
        """Bring a finished child's sealed result to its task's URI; the reason when it cannot."""
        src = self._store(child.remote_result)
        if not src.exists(child.remote_result):
            return "AWS Batch reported success but the shard stored no result"
        dst = child.task.result_uri
        if dst == child.remote_result:
            return None
        if urlparse(dst).scheme in ("", "file"):
            path = Path(urlparse(dst).path)
            path.parent.mkdir(parents=True, exist_ok=True)
            src.get_file(child.remote_result, path)
        else:
            store_for(dst).put_bytes(src.get_bytes(child.remote_result), dst)
        put.append(child.remote_result)
        return None


def _groups(items: list[tuple[ShardTask, int]]) -> list[list[tuple[ShardTask, int]]]:
    """Runs of tasks one array job can carry: consecutive shards and seeds, same primaries and attempt."""
    out: list[list[tuple[ShardTask, int]]] = []
    for task, attempt in sorted(items, key=lambda ta: ta[0].index):
        last = out[-1][-1] if out else None
        if (last is not None and task.index == last[0].index + 1 and task.seed == last[0].seed + 1
                and task.primaries == last[0].primaries and attempt == last[1]
                and task.threads == last[0].threads and task.bundle_uri == last[0].bundle_uri):
            out[-1].append((task, attempt))
        else:
            out.append([(task, attempt)])
    return out
