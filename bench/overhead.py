"""Distributed overhead (issues 5 and 14): the ssh and aws backends, n = 1 .. 128 workers, with a profile.

- ssh: one real sshd on 127.0.0.1 and n host entries (own connection, own work folder each). The
  `transport` series runs a shell stand-in for the worker (reads the key line, writes a result file),
  so the time is the backend's own: connect + authenticate, stage the sealed bundle by SFTP, start
  the worker, wait for its exit, take the result back on the exec channel, remove the folder (or,
  pooled, keep the connection, its folder and staged bundle). Three series: new connections;
  pooled with a new job each run (its bundle staged); pooled with the same job (a later wave). The `worker` series
  (n <= 16 here: every real worker costs ~1 s of CPU and this machine has 2 cores) runs the real
  `python -m cloud.worker` + MCsquare on a tiny job.
- aws: moto_server on 127.0.0.1 (S3, KMS, Batch without containers). The backend uploads the bundle,
  wraps the key with KMS, submits one Batch array job of n children, polls, collects n sealed results
  from S3 and deletes what it put. A stand-in "container runtime" (the on_submit hook) stores each
  child's result object; its time is measured and taken off, so `aws` is the backend's own time.
  AWS Batch's real queueing and container start-up are not in it (see README, Scale).

T(n) (best of `--rounds` per n) is fitted to T(n) = a/n + beta*n + gamma by least squares. The
profile per n sums each phase over the hosts/children of the best run (`sum`) and gives its
slowest single instance (`max`), so it shows which phase grows with n.

    .venv/bin/python bench/overhead.py [--max-n 128] [--rounds 3] [--only ssh|aws|worker]

Last stdout line: JSON with beta_s_per_node / gamma_s (ssh transport), aws_beta_s_per_node /
aws_gamma_s, worker_beta_s_per_node / worker_gamma_s, every T(n) and the profiles.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, today  # noqa: E402
from cloud.backends import get_backend  # noqa: E402
from cloud.backends.base import Backend  # noqa: E402
from cloud.backends.ssh import POOL  # noqa: E402
from cloud.dispatch import plan_tasks  # noqa: E402
from cloud.worker import ShardTask  # noqa: E402
from tests.cloud_data import SealedJob, sealed_job  # noqa: E402
from tests.peers import Sshd, moto_aws, sshd  # noqa: E402

PRIMARIES_PER_SHARD = 100
STUB = ("sh -c 'read k; r=; p=; for a; do [ \"$p\" = --result ] && r=${a#file://}; p=$a; done; "
        "echo stub > \"$r\"' sh")
WORKER_MAX_N = 16


def fit(ns: list[int], ts: list[float]) -> tuple[float, float, float]:
    a = np.array([[1.0 / n, n, 1.0] for n in ns])
    (inv, beta, gamma), *_ = np.linalg.lstsq(a, np.array(ts), rcond=None)
    return float(inv), float(beta), float(gamma)


def profile(phases: list[tuple[str, float]]) -> dict[str, dict[str, float]]:
    by: dict[str, list[float]] = defaultdict(list)
    for name, seconds in phases:
        by[name].append(seconds)
    return {k: {"sum": round(sum(v), 3), "max": round(max(v), 4), "count": len(v)} for k, v in by.items()}


def tasks_for(job: SealedJob, n: int, name: str) -> list[ShardTask]:
    return [replace(t, threads=1) for t in plan_tasks(job.job_id, n, PRIMARIES_PER_SHARD * n, job.bundle_uri,
                                                      job.results_uri(name))]


def series(label: str, ns: list[int], rounds: int, make: Callable[[int], Backend], job: SealedJob,
           extra: Callable[[], float] = lambda: 0.0, warmup: bool = False,
           new_bundle: bool = False) -> tuple[dict[int, float], dict[int, Any]]:
    """Best-of-rounds T(n) and the profile of that best run. `extra()` is stand-in time to take off;
    `warmup` runs once untimed first (pooled connections are then open); `new_bundle`: every run has
    a bundle file of its own (a new job, staged afresh), else all runs share the job's (a job's next
    wave finds it staged on pooled connections). The profile's `node_cpu_s` is this process's CPU
    time over the run (all threads): the node's own per-run cost."""
    times: dict[int, float] = {}
    profiles: dict[int, Any] = {}
    print(f"{label}:", flush=True)
    for n in ns:
        best = float("inf")
        for r in range(-1 if warmup else 0, rounds):
            backend = make(n)
            tasks = tasks_for(job, n, f"{label}-{n}-{r}")
            if new_bundle:
                copy = job.bundle.with_name(f"bundle-{n}-{r}.sealed")
                shutil.copy(job.bundle, copy)
                tasks = [replace(t, bundle_uri=copy.as_uri()) for t in tasks]
            extra()  # reset
            cpu = time.process_time()
            start = time.perf_counter()
            backend.run(tasks, job.key)
            took = time.perf_counter() - start - extra()
            cpu = time.process_time() - cpu
            if r >= 0 and took < best:
                best = took
                profiles[n] = {**profile(getattr(backend, "phases", [])), "node_cpu_s": round(cpu, 3)}
        times[n] = best
        phases = {k: v for k, v in profiles[n].items() if isinstance(v, dict)}
        top = sorted(phases.items(), key=lambda kv: -kv[1]["max"])[:3]
        print(f"  n={n:3d}  T={best:.3f} s  node CPU {profiles[n]['node_cpu_s']:.2f} s  slowest: "
              + "  ".join(f"{k} {v['max']:.3f}s" for k, v in top), flush=True)
    return times, profiles


def host_keys(server: Sshd, n: int) -> list[str]:
    """n copies of the test client key under distinct names, each a distinct host entry for the pool."""
    out = []
    for i in range(n):
        path = server.folder / f"client-{i}"
        if not path.exists():
            shutil.copy(server.client_key, path)
            path.chmod(0o600)
        out.append(str(path))
    return out


def ssh_series(job: SealedJob, tmp: Path, ns: list[int], rounds: int, worker: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with sshd(tmp / "sshd") as server:
        def make(command: str, keep_s: float = 0.0) -> Callable[[int], Backend]:
            def backend(n: int) -> Backend:
                # one key per host entry: pooled connections are per (host, port, user, key)
                hosts = [{"host": "127.0.0.1", "port": server.port, "user": server.user,
                          "key_file": keys[i], "work_dir": str(tmp / f"w{i}"), "command": command}
                         for i in range(n)]
                return get_backend("ssh", hosts=hosts, known_hosts=server.known_hosts, retries=0, deadline_s=120,
                                   keep_connections_s=keep_s)
            return backend

        keys = host_keys(server, max(ns, default=1))
        out["transport"] = series("ssh transport, new connections (stand-in worker)", ns, rounds, make(STUB), job)
        out["warm"] = series("ssh transport, pooled connections, a new job each run (stand-in worker)", ns,
                             rounds, make(STUB, keep_s=600), job, warmup=True, new_bundle=True)
        out["wave"] = series("ssh transport, pooled connections, the job's next wave (stand-in worker)", ns,
                             rounds, make(STUB, keep_s=600), job, warmup=True)
        POOL.close_idle()
        if worker:
            out["worker"] = series("ssh worker (real worker + MCsquare)", [n for n in ns if n <= WORKER_MAX_N],
                                   rounds, make(f"{sys.executable} -m cloud.worker"), job)
    return out


def aws_series(job: SealedJob, tmp: Path, ns: list[int], rounds: int) -> tuple[dict[int, float], dict[int, Any]]:
    import boto3

    with moto_aws(tmp / "moto") as (url, kms_key_id):
        batch = boto3.client("batch", endpoint_url=url)
        s3 = boto3.client("s3", endpoint_url=url)
        spent = [0.0]

        def container_runtime(batch_id: str) -> None:
            """Each child 'runs' and stores its result object, as the worker in its container would."""
            start = time.perf_counter()
            desc = batch.describe_jobs(jobs=[batch_id])["jobs"][0]
            argv = desc["container"]["command"]
            result = argv[argv.index("--result") + 1].removeprefix("s3://")
            bucket, key = result.split("/", 1)
            first = int(argv[argv.index("--shard") + 1])
            for i in range(desc.get("arrayProperties", {}).get("size", 0) or 1):
                s3.put_object(Bucket=bucket, Key=key.replace("{shard}", str(first + i)), Body=b"stub")
            spent[0] += time.perf_counter() - start

        def taken() -> float:
            value, spent[0] = spent[0], 0.0
            return value

        def make(n: int) -> Backend:
            return get_backend("aws", bucket="mcnode-test", prefix="bench", job_queue="mcnode-q",
                               job_definition="mcnode", kms_key_id=kms_key_id, endpoint_url=url,
                               region="us-east-1", poll_s=0.05, retries=0, on_submit=container_runtime)

        return series("aws transport (moto: S3, KMS, Batch array job)", ns, rounds, make, job, taken)


def fitted(times: dict[int, float]) -> tuple[float, float]:
    _a, beta, gamma = fit(list(times), list(times.values()))
    return round(beta, 4), round(gamma, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("ssh", "aws", "worker"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n <= args.max_n]
    result: dict[str, Any] = {"machine": machine(), "date": today()}
    with tempfile.TemporaryDirectory(prefix="mcb") as tmp_name:
        tmp = Path(tmp_name)
        job = sealed_job(tmp / "job")
        if args.only in (None, "ssh", "worker"):
            ssh = ssh_series(job, tmp, ns if args.only != "worker" else [], args.rounds,
                             worker=args.only in (None, "worker"))
            if "transport" in ssh and ssh["transport"][0]:
                t, prof = ssh["transport"]
                result["beta_s_per_node"], result["gamma_s"] = fitted(t)
                result["transport_T_s"] = {str(k): round(v, 3) for k, v in t.items()}
                result["transport_profile"] = {str(k): v for k, v in prof.items()}
                t, prof = ssh["warm"]
                result["warm_beta_s_per_node"], result["warm_gamma_s"] = fitted(t)
                result["warm_T_s"] = {str(k): round(v, 3) for k, v in t.items()}
                result["warm_profile"] = {str(k): v for k, v in prof.items()}
                t, prof = ssh["wave"]
                result["wave_beta_s_per_node"], result["wave_gamma_s"] = fitted(t)
                result["wave_T_s"] = {str(k): round(v, 3) for k, v in t.items()}
                result["wave_profile"] = {str(k): v for k, v in prof.items()}
            if "worker" in ssh:
                t, _prof = ssh["worker"]
                result["worker_beta_s_per_node"], result["worker_gamma_s"] = fitted(t)
                result["worker_T_s"] = {str(k): round(v, 3) for k, v in t.items()}
        if args.only in (None, "aws"):
            t, prof = aws_series(job, tmp, ns, args.rounds)
            result["aws_beta_s_per_node"], result["aws_gamma_s"] = fitted(t)
            result["aws_T_s"] = {str(k): round(v, 3) for k, v in t.items()}
            result["aws_profile"] = {str(k): v for k, v in prof.items()}
    print(f"machine: {result['machine']}; date {result['date']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
