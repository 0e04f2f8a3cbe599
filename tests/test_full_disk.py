"""A full disk in the pipeline: the job goes FAILED with the reason (once, no retry loop), and
`mcnode retry` completes it once there is space again. The node's data_dir is a small real tmpfs."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.intake.jobrecord import JobData, JobState, PublicData
from dicom_node.intake.journal import Journal
from tests.conftest import settings_for, storescu, wait_for


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:  # a real small file system needs root, as `make test` runs in CI
        pytest.fail(f"cannot mount a 24 MB tmpfs (run the tests as root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Leave `leave` bytes free on the file system."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_full_disk_fails_the_job_with_the_reason_and_retry_completes_it(config_dir, node_factory, phantom_dir,
                                                                        storescp, small_disk, caplog, capsys):
    tps_port, tps_dir = storescp(aet="TPS")
    settings = settings_for(config_dir, node={"data_dir": str(small_disk)}, engine={"primaries": 4000},
                            cloud={"shards": 2},
                            destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1",
                                           "port": tps_port}])
    config = config_dir / "mcnode.toml"
    config.write_text(config.read_text().replace('data_dir = "data"', f'data_dir = "{small_disk}"'))
    receiver = node_factory(settings)  # receive only, then stop: the computing node starts on a full disk
    assert storescu(receiver.port, sorted(phantom_dir.iterdir())).returncode == 0
    job = wait_for(lambda: receiver.journal.jobs_in(JobState.READY))[0]
    receiver.stop()
    filler = _fill(small_disk, leave=256 * 1024)  # room for the journal, not for sealing the job
    with caplog.at_level(logging.INFO):
        node = node_factory(settings, compute=True)
        failed = wait_for(lambda: node.journal.job(job.id).state == JobState.FAILED and node.journal.job(job.id),
                          timeout=60)
        assert failed.reason.startswith("READY: disk full (No space left on device)"), failed.reason
        # the job stays FAILED: no retry loop, no traceback, no rollback error
        node.pipeline._pick_up_retries()
        node.pipeline.wait_idle(30)
        assert [s for s, _r, _t in node.journal.history(job.id)].count(JobState.FAILED) == 1
        assert "Traceback" not in caplog.text and "cannot rollback" not in caplog.text
        assert not (small_disk / "jobs" / job.id).exists()  # the half-written job folder is gone
        filler.unlink()
        capsys.readouterr()
        assert main(["retry", job.id, "-c", str(config)]) == 0
        assert "READY again" in capsys.readouterr().out
        wait_for(lambda: node.journal.job(job.id).state == JobState.SENT, timeout=120)
    assert len([p for p in tps_dir.iterdir() if p.name.startswith("RD")]) == 1


def test_journal_survives_a_full_disk_during_commit(small_disk):
    """SQLite rolls back by itself when COMMIT finds no space; our rollback must not then fail over it."""
    from dicom_node.errors import JournalError

    with Journal.open(small_disk) as journal:
        job = journal.create_job("1.2.3", "TPS")
        _fill(small_disk, leave=0)
        with pytest.raises(JournalError, match="full"):
            for i in range(10_000):
                journal.update_job_data(job.id, JobData(public=PublicData(extra={f"k{i}": "x" * 4000})))
        (small_disk / "filler").unlink()
        journal.transition(job.id, JobState.FAILED, reason="RECEIVING: test")
        assert journal.job(job.id).state == JobState.FAILED
