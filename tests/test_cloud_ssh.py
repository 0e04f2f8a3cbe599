"""The ssh backend against a real sshd on 127.0.0.1 acting as several hosts (one work folder each).

Same seeds give identical tallies, so a distributed run must reproduce the local run bit for bit,
also when one host's worker fails and its shards are retried on the others.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cloud.backends import get_backend
from cloud.dispatch import dispatch, dispatch_merged, plan_tasks
from cloud.engines.base import Tally
from cloud.errors import DispatchError
from cloud.merge import StreamingMerge, merge
from tests.cloud_data import SealedJob, all_cmdlines, local_tallies, sealed_job, shard_tasks
from tests.conftest import wait_for
from tests.peers import Sshd, free_port, sshd

WORKER = f"{sys.executable} -m cloud.worker"
SHARDS, PRIMARIES = 4, 4000


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> SealedJob:
    return sealed_job(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def reference(job: SealedJob) -> list[bytes]:
    return local_tallies(job, SHARDS, PRIMARIES)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with sshd(tmp_path_factory.mktemp("sshd")) as s:
        yield s


def host(s: Sshd, work: Path, command: str = WORKER, port: int | None = None) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": port or s.port, "user": s.user, "key_file": str(s.client_key),
            "work_dir": str(work), "command": command}


def doses(tallies: list[bytes]) -> list[np.ndarray]:
    return [Tally.from_bytes(b).dose_per_primary for b in tallies]


def test_one_host_fails_job_completes_with_the_local_dose(job, reference, server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    works = [tmp_path / f"host{i}" for i in range(3)]
    hosts = [host(server, works[0], command="false"),  # its worker exits 1 every time
             host(server, works[1]), host(server, works[2]),
             host(server, tmp_path / "refused", port=free_port())]  # nothing listens there
    backend = get_backend("ssh", hosts=hosts, known_hosts=server.known_hosts, retries=2, deadline_s=120)
    tasks = shard_tasks(job, SHARDS, PRIMARIES, "ssh")
    progress: list[tuple[int, int]] = []
    seen: list[str] = []
    running = threading.Event()

    def watch() -> None:
        while not running.is_set():
            seen.extend(c for c in all_cmdlines() if "cloud.worker" in c)
            running.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        tallies = dispatch(tasks, job.key, backend, on_progress=lambda d, t: progress.append((d, t)))
    finally:
        running.set()
        watcher.join()

    for got, want in zip(doses(tallies), doses(reference), strict=True):
        assert got.shape == want.shape and np.array_equal(got, want)
    assert max(d.max() for d in doses(tallies)) > 0
    assert progress[0] == (0, SHARDS) and progress[-1] == (SHARDS, SHARDS)
    assert "exited with 1" in caplog.text  # the failing host was used and its shards retried
    assert "host unusable" in caplog.text and "Connection refused" in caplog.text  # the refusing host
    # every host's work folder is cleaned
    for work in works:
        assert not work.exists() or not any(work.iterdir()), list(work.iterdir())
    # the data key is on no command line, in no log line and in no stored object
    key_hex = job.key.hex()
    assert seen, "no worker process was seen running"
    assert all(key_hex not in c for c in seen)
    assert all(key_hex not in " ".join(argv) for argv in backend.last_argv)
    assert key_hex not in caplog.text
    for path in [job.bundle, *Path(job.results_uri("ssh")[7:]).iterdir()]:
        data = path.read_bytes()
        assert job.key not in data and key_hex.encode() not in data


def test_unknown_host_key_is_rejected_by_default(job, server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    tasks = plan_tasks(job.job_id, 1, 500, job.bundle_uri, job.results_uri("rejected"))
    backend = get_backend("ssh", hosts=[host(server, tmp_path / "w")], known_hosts=empty)
    with pytest.raises(DispatchError, match="no ssh host could be used.*not found in known_hosts"):
        dispatch(tasks, job.key, backend)
    # accepting new keys is an explicit option (test setups)
    backend = get_backend("ssh", hosts=[host(server, tmp_path / "w")], known_hosts=empty, strict_host_keys=False)
    assert len(dispatch(tasks, job.key, backend)) == 1


def test_retries_exhausted_fail_the_job(job, server, tmp_path):
    tasks = plan_tasks(job.job_id, 2, 1000, job.bundle_uri, job.results_uri("exhausted"))
    hosts = [host(server, tmp_path / f"w{i}", command="sh -c 'echo worker: engine crashed >&2; exit 3' sh")
             for i in range(2)]
    backend = get_backend("ssh", hosts=hosts, known_hosts=server.known_hosts, retries=1)
    with pytest.raises(DispatchError, match=r"failed 2 time\(s\).*exited with 3: worker: engine crashed"):
        dispatch(tasks, job.key, backend)
    assert not any(Path(job.results_uri("exhausted")[7:]).glob("*.tally"))


def test_shard_past_its_deadline_is_stopped(job, server, tmp_path):
    marker = f"mcnode-deadline-{tmp_path.name}"
    tasks = plan_tasks(job.job_id, 1, 500, job.bundle_uri, job.results_uri("late"))
    hosts = [host(server, tmp_path / "w", command=f"sh -c 'sleep 60; echo {marker}' sh")]
    backend = get_backend("ssh", hosts=hosts, known_hosts=server.known_hosts, retries=0, deadline_s=1)
    with pytest.raises(DispatchError, match="deadline of 1 s"):
        dispatch(tasks, job.key, backend)
    assert not [c for c in all_cmdlines() if marker in c]  # the remote process is gone


def test_pooled_connection_is_reused_by_the_next_run(job, server, tmp_path):
    from cloud.backends.ssh import POOL

    work = tmp_path / "pooled"
    hosts = [host(server, work)]

    def run(name: str, bundle_uri: str = job.bundle_uri) -> tuple[object, list[tuple[str, float]]]:
        backend = get_backend("ssh", hosts=hosts, known_hosts=server.known_hosts, retries=0, deadline_s=120,
                              keep_connections_s=60)
        tasks = [replace(t, bundle_uri=bundle_uri) for t in shard_tasks(job, 1, 500, name)]
        tally = dispatch(tasks, job.key, backend)
        assert Tally.from_bytes(tally[0]).primaries == 500  # the result came back over the exec channel
        (idle,) = [w for entries in POOL._idle.values() for _t, w in entries
                   if w.client.get_transport().getpeername()[1] == server.port]
        return idle.client, backend.phases

    try:
        first, phases = run("pool-a")
        assert [p for p, _s in phases].count("stage") == 1
        second, phases = run("pool-b")
        assert second is first  # the second run went over the first run's connection
        # ... and found the same bundle staged in the connection's folder (a job's next wave)
        assert "stage" not in dict(phases) and "exec" in dict(phases)
        (folder,) = list(work.iterdir())  # the pooled connection's folder: the staged bundle, no results
        assert [p.name for p in folder.iterdir()] == ["bundle-0.sealed"]
        # another job's bundle replaces it in the same place
        other = tmp_path / "other.sealed"
        shutil.copy(job.bundle, other)
        assert run("pool-c", other.as_uri())[0] is first
        assert [p.name for p in folder.iterdir()] == ["bundle-0.sealed"]
    finally:
        POOL.close_idle()
    assert not POOL._idle
    assert not list(work.iterdir())  # closing the connection removed its folder


def test_tallies_are_merged_while_other_shards_still_run(job, reference, server, tmp_path):
    """dispatch_merged adds each shard's tally as it arrives: three are summed while the fourth waits
    (for a gate the test opens only then), and the sums give the local run's merged dose."""
    gate = tmp_path / "gate"
    gated = (f"sh -c 'p=; for a; do [ \"$p\" = --shard ] && [ \"$a\" = 1 ] && "
             f"while [ ! -e {gate} ]; do sleep 0.05; done; p=$a; done; exec {WORKER} \"$@\"' sh")
    hosts = [host(server, tmp_path / f"g{i}", command=gated) for i in range(2)]
    backend = get_backend("ssh", hosts=hosts, known_hosts=server.known_hosts, retries=0, deadline_s=120)
    acc = StreamingMerge()
    summed_before_the_last: list[int] = []

    def progress(done: int, total: int) -> None:
        if done == total - 1:  # every shard but the gated one has ended
            wait_for(lambda: len(acc) == done, timeout=60)
            summed_before_the_last.append(len(acc))
            gate.touch()

    dispatch_merged(shard_tasks(job, SHARDS, PRIMARIES, "streamed"), job.key, backend, acc, on_progress=progress)
    assert summed_before_the_last == [SHARDS - 1] and len(acc) == SHARDS
    want = merge([Tally.from_bytes(b) for b in reference], 1e9, 1, expected_shards=SHARDS)
    got = acc.result(1e9, 1, expected_shards=SHARDS)
    np.testing.assert_allclose(got.per_fraction_gy, want.per_fraction_gy, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.std_error_per_fraction_gy, want.std_error_per_fraction_gy, rtol=1e-9, atol=0)
