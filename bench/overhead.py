"""Distributed overhead (issue 5): the ssh backend against a loopback sshd, n = 1, 2, 4, 8, 16 workers.

Each worker is its own host entry (own connection, own work folder) on one real sshd on 127.0.0.1.
The job is tiny so that the engine stays out of the measurement (10 slices of 20x20 voxels, one
energy layer, 1600 primaries in all). Total dispatch time T(n) is fitted to
T(n) = a/n + beta*n + gamma by least squares (best of 3 runs per n). Two series:

- worker: the real `python -m cloud.worker` (opens the sealed bundle, runs MCsquare, seals the tally);
- transport: a shell stand-in for the worker that reads the key line and writes a result file, so
  the figure is the backend's own cost (connect, authenticate, stage by SFTP, exec, collect, clean).

Last stdout line: JSON with beta_s_per_node and gamma_s of the transport series (the backend's
overhead), the worker series' fit as worker_beta_s_per_node / worker_gamma_s, and every T(n).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, today  # noqa: E402
from cloud.backends import get_backend  # noqa: E402
from cloud.dispatch import plan_tasks  # noqa: E402
from tests.cloud_data import sealed_job  # noqa: E402
from tests.peers import sshd  # noqa: E402

NS = (1, 2, 4, 8, 16)
PRIMARIES = 1600
ROUNDS = 3
STUB = ("sh -c 'read k; r=; p=; for a; do [ \"$p\" = --result ] && r=${a#file://}; p=$a; done; "
        "echo stub > \"$r\"' sh")


def fit(ns: list[int], ts: list[float]) -> tuple[float, float, float]:
    a = np.array([[1.0 / n, n, 1.0] for n in ns])
    (inv, beta, gamma), *_ = np.linalg.lstsq(a, np.array(ts), rcond=None)
    return float(inv), float(beta), float(gamma)


def series(job, server, command: str, tmp: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for n in NS:
        best = float("inf")
        for r in range(ROUNDS):
            hosts = [{"host": "127.0.0.1", "port": server.port, "user": server.user,
                      "key_file": str(server.client_key), "work_dir": str(tmp / f"w{i}"), "command": command}
                     for i in range(n)]
            backend = get_backend("ssh", hosts=hosts, known_hosts=server.known_hosts, retries=0, deadline_s=120)
            tasks = plan_tasks(job.job_id, n, PRIMARIES, job.bundle_uri, job.results_uri(f"r{n}-{r}-{len(out)}"))
            tasks = [t.__class__(**{**t.as_dict(), "threads": 1}) for t in tasks]
            start = time.perf_counter()
            backend.run(tasks, job.key)
            best = min(best, time.perf_counter() - start)
        out[n] = best
        print(f"  n={n:2d}  T={best:.3f} s", flush=True)
    return out


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="mcb") as tmp_name:
        tmp = Path(tmp_name)
        job = sealed_job(tmp / "job")
        with sshd(tmp / "sshd") as server:
            print("worker series (real worker + MCsquare, tiny job):")
            worker = series(job, server, f"{sys.executable} -m cloud.worker", tmp)
            print("transport series (shell stand-in for the worker):")
            transport = series(job, server, STUB, tmp)
    _a, beta, gamma = fit(list(worker), list(worker.values()))
    _ta, tbeta, tgamma = fit(list(transport), list(transport.values()))
    print(f"machine: {machine()}; date {today()}")
    # beta/gamma: the backend's own per-node and constant cost (transport series). With the real
    # worker on this 2-core box, every extra worker's CPU (Python start, MCsquare start) queues behind
    # the others, so worker_beta is CPU contention on one machine, not dispatch overhead.
    print(json.dumps({"beta_s_per_node": round(tbeta, 4), "gamma_s": round(tgamma, 3),
                      "worker_beta_s_per_node": round(beta, 4), "worker_gamma_s": round(gamma, 3),
                      "worker_T_s": {str(k): round(v, 3) for k, v in worker.items()},
                      "transport_T_s": {str(k): round(v, 3) for k, v in transport.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
