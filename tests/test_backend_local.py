"""Backend.run's one retry/deadline/cancel loop, driven through the local backend with real processes.

The "python" the local backend starts is a small shell script here, so a shard can fail, hang past
its deadline or be cancelled without running the engine; the loop under test is the real one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cloud.backends.local import LocalBackend
from cloud.errors import Cancelled, DispatchError
from cloud.worker import ShardTask
from tests.cloud_data import all_cmdlines

# A worker that hangs: one process (exec), with the marker on its command line, so killing it leaves nothing.
_HANG = f'exec {sys.executable} -c "import time; time.sleep(60)" {{marker}}'


def _script(folder: Path, name: str, body: str) -> str:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def _gone(marker: str, within: float = 10.0) -> bool:
    """No process with `marker` on its command line (the kernel may take a moment on a loaded machine)."""
    deadline = time.monotonic() + within
    while [c for c in all_cmdlines() if marker in c]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tasks(folder: Path, n: int) -> list[ShardTask]:
    return [ShardTask("job-loop", i, 10, 1000 + i, (folder / "b.sealed").as_uri(),
                      (folder / f"shard-{i}.tally").as_uri(), threads=1) for i in range(n)]


def test_failed_shard_is_retried_then_reported_with_its_last_reason(tmp_path, caplog):
    log = tmp_path / "starts.log"
    worker = _script(tmp_path, "crash", f'echo "$@" >> {log}; echo "worker: engine crashed" >&2; exit 3')
    backend = LocalBackend(retries=2, python=worker, max_workers=2)
    done: list[int] = []
    with pytest.raises(DispatchError, match=r"shard \d failed 3 time\(s\); last: exited with 3: worker: engine"):
        backend.run(_tasks(tmp_path, 2), b"k" * 32, lambda t: done.append(t.index))
    assert done == []
    starts = log.read_text().splitlines()
    assert len(starts) >= 3 and all("--key-uri" not in s and "6b6b" not in s for s in starts)
    assert "(attempt 1)" in caplog.text and "(attempt 2)" in caplog.text
    assert 3 <= backend.shard_failures <= len(starts)  # counted for the job's record (/metrics)


def test_shard_past_its_deadline_is_killed(tmp_path):
    marker = f"mcnode-local-deadline-{tmp_path.name}"
    worker = _script(tmp_path, "hang", _HANG.format(marker=marker))
    backend = LocalBackend(retries=0, deadline_s=0.5, python=worker)
    start = time.monotonic()
    with pytest.raises(DispatchError, match="passed its deadline of 0.5 s"):
        backend.run(_tasks(tmp_path, 1), b"k" * 32)
    assert time.monotonic() - start < 30
    assert _gone(marker)


def test_cancel_stops_every_running_shard(tmp_path):
    marker = f"mcnode-local-cancel-{tmp_path.name}"
    worker = _script(tmp_path, "hang", _HANG.format(marker=marker))
    backend = LocalBackend(retries=0, python=worker, max_workers=3)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            backend.run(_tasks(tmp_path, 3), b"k" * 32)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 20
    while len([c for c in all_cmdlines() if marker in c]) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len([c for c in all_cmdlines() if marker in c]) == 3  # all shards at once
    backend.cancel()
    thread.join(30)
    assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert _gone(marker)


def _most_at_once(events: list[list[str]]) -> int:
    running = most = 0
    for e in sorted(events, key=lambda e: float(e[1])):
        running += 1 if e[0] == "start" else -1
        most = max(most, running)
    return most


@pytest.mark.parametrize("small", [False, True])
def test_a_first_wave_of_small_shards_runs_side_by_side(tmp_path, small):
    log = tmp_path / "runs.log"
    body = f'echo "start $(date +%s.%N) $*" >> {log}; sleep 1; echo "end $(date +%s.%N)" >> {log}'
    backend = LocalBackend(retries=0, python=_script(tmp_path, "w", body))  # local_workers = 1
    tasks = [ShardTask("job-small", i, 10, 1000 + i, (tmp_path / "b.sealed").as_uri(),
                       (tmp_path / f"shard-{i}.tally").as_uri()) for i in range(2)]
    backend.run(tasks, b"k" * 32, small=small)
    events = [line.split() for line in log.read_text().splitlines()]
    threads = {e[e.index("--threads") + 1] for e in events if e[0] == "start"}
    cores = os.cpu_count() or 1
    side_by_side = min(2, cores) if small else 1
    assert _most_at_once(events) == side_by_side
    assert threads == {"0" if side_by_side == 1 else str(cores // side_by_side)}
    # the next run (a later wave) is back to one shard at a time with every core
    log.write_text("")
    backend.run([replace(t, index=t.index + 2) for t in tasks], b"k" * 32)
    events = [line.split() for line in log.read_text().splitlines()]
    assert _most_at_once(events) == 1 and {e[e.index("--threads") + 1] for e in events if e[0] == "start"} == {"0"}


@pytest.mark.parametrize("workers", [1, 2])
def test_local_workers_shards_at_once_and_the_cores_they_share(tmp_path, workers):
    # each "worker" logs when it starts (with its arguments) and ends, 1 s apart: overlaps show
    log = tmp_path / "runs.log"
    body = f'echo "start $(date +%s.%N) $*" >> {log}; sleep 1; echo "end $(date +%s.%N)" >> {log}'
    backend = LocalBackend(retries=0, python=_script(tmp_path, "w", body), max_workers=workers)
    tasks = [ShardTask("job-workers", i, 10, 1000 + i, (tmp_path / "b.sealed").as_uri(),
                       (tmp_path / f"shard-{i}.tally").as_uri()) for i in range(2)]
    backend.run(tasks, b"k" * 32)
    events = [line.split() for line in log.read_text().splitlines()]
    threads = {e[e.index("--threads") + 1] for e in events if e[0] == "start"}
    cores = os.cpu_count() or 1
    # one at a time: the engine's "every core" (0), as bare MCsquare runs; side by side, the cores split
    assert threads == {"0" if workers == 1 else str(max(1, cores // workers))}
    # the most shards seen running at the same moment
    running = most = 0
    for e in sorted(events, key=lambda e: float(e[1])):
        running += 1 if e[0] == "start" else -1
        most = max(most, running)
    assert most == workers  # the default (1): one at a time, every core
