"""Worker work folders live under data_dir/work and are removed whatever ended the worker."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from anonymizer.seal import unwrap_key
from cloud.backends.local import LocalBackend
from cloud.dispatch import plan_tasks
from cloud.errors import DispatchError
from dicom_node.intake.jobrecord import JobState
from dicom_node.jobs.pipeline import Pipeline
from dicom_node.settings import read_site_key
from tests.conftest import seal_a_job, wait_for


def _worker_pids(job_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"cloud.worker" in cmdline and job_id.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_sigkilled_worker_leaves_no_opened_bundle(config_dir, node_factory, phantom_dir):
    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir)
    folder = pipeline.job_dir(job.id)
    key = unwrap_key(read_site_key(settings), (folder / "data.key").read_bytes(), job.id)
    # enough primaries that the shard is still running when it is killed
    tasks = plan_tasks(job.id, 1, 50_000_000, (folder / "bundle.sealed").as_uri(), (folder / "results").as_uri())
    backend = LocalBackend(retries=0, work_dir=pipeline.work_dir)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            backend.run(tasks, key)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # opened once for the job's shards, in the backend's folder for the job under data_dir/work
        opened = wait_for(lambda: list(pipeline.work_dir.glob(f"{job.id}-bundle/bundle/inputs")), timeout=60)
        assert opened, "the worker opened the bundle under data_dir/work"
        (pid,) = _worker_pids(job.id)
        # the worker's MCsquare (not a probe of the build), killed once it has read its inputs and
        # simulates (it would stop by itself before, as the opened bundle it reads goes away with the run)
        engines = wait_for(lambda: [c for c in _children(pid) if "Simulation started" in _log_of(c)], timeout=60)
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=60)
    finally:
        backend.cancel()
        thread.join(timeout=30)
    assert outcome and isinstance(outcome[0], DispatchError) and "exited with -9" in str(outcome[0])
    assert list(pipeline.work_dir.iterdir()) == []
    # the engine does not run on alone for its 50 M primaries once its worker is gone
    assert wait_for(lambda: not any(_alive(c) for c in engines), timeout=30), engines


def _log_of(engine: int) -> str:
    try:
        return (Path(f"/proc/{engine}/cwd") / "mcsquare.log").read_text(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except OSError:
        return []


def test_node_start_removes_what_an_earlier_run_left(config_dir, node_factory, phantom_dir):
    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir)
    stale = pipeline.work_dir / f"{job.id}-shard0-try0" / "mcnode-x" / "bundle"
    stale.mkdir(parents=True)
    (stale / "plan.txt").write_text("opened bundle of a node killed outright")
    node.journal.transition(job.id, JobState.REJECTED, reason="not computed in this test")
    again = Pipeline(settings, node.journal)
    again.start()
    try:
        assert list(again.work_dir.iterdir()) == []
        assert oct(again.work_dir.stat().st_mode & 0o777) == "0o700"
    finally:
        again.stop()
