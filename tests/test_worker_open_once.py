"""The local backend's shards of one job open the sealed bundle once, and never reuse a stale opening.

Real seal, real bundle, real MCsquare (tiny phantom); the worker runs as the process the local backend
starts. `cloud.worker._opened_once` is what makes a later shard skip the decrypt/unpack/hash.
"""

from __future__ import annotations

import pytest

from anonymizer.errors import IntegrityError
from anonymizer.seal import new_data_key
from cloud.backends.local import LocalBackend
from cloud.bundle import make_bundle
from cloud.dispatch import dispatch
from cloud.worker import _opened_once
from tests.cloud_data import sealed_job, shard_tasks


def test_the_shards_of_a_job_open_its_bundle_once(tmp_path):
    job = sealed_job(tmp_path)
    work = tmp_path / "work"
    backend = LocalBackend(retries=0, work_dir=work)
    opened = work / f"{job.job_id}-bundle" / "bundle"
    first = dispatch(shard_tasks(job, 1, 200, "wave1"), job.key, backend)
    inode = (opened / "inputs" / "CT.raw").stat().st_ino  # still there: a later wave reads it
    (opened / "left-by-wave-1").write_text("an opening is reused, not redone")
    tasks = shard_tasks(job, 3, 600, "wave2")[1:]  # the next wave: shards 1 and 2
    later = dispatch(tasks, job.key, backend)
    assert len(first) == 1 and len(later) == 2
    assert (opened / "left-by-wave-1").is_file() and (opened / "inputs" / "CT.raw").stat().st_ino == inode
    assert oct((work / f"{job.job_id}-bundle").stat().st_mode & 0o777) == "0o700"
    backend.release(job.job_id)  # the job's last wave ended
    assert list(work.iterdir()) == []


def test_a_bundle_sealed_again_is_opened_again(tmp_path):
    job = sealed_job(tmp_path)
    shared = tmp_path / "shared"
    folder = _opened_once(job.bundle, job.key, job.job_id, shared)
    (folder / "stale").write_text("from the first sealing")
    assert _opened_once(job.bundle, job.key, job.job_id, shared) == folder and (folder / "stale").is_file()
    # a retry seals afresh with a new key: the old opening must not be taken for the new bundle
    key = new_data_key()
    make_bundle(job.bundle, key, job.job_id, {"inputs": job.folder / "inputs"}, {"engine": "mcsquare"})
    folder = _opened_once(job.bundle, key, job.job_id, shared)
    assert not (folder / "stale").exists() and (folder / "inputs" / "CT.raw").is_file()
    # a forged mark (no job key) is not trusted either
    (folder / "stale").write_text("again")
    (shared / "opened").write_text("0" * 64)
    _opened_once(job.bundle, key, job.job_id, shared)
    assert not (folder / "stale").exists()


def test_a_tampered_bundle_is_refused_and_leaves_no_mark(tmp_path):
    job = sealed_job(tmp_path)
    raw = bytearray(job.bundle.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    job.bundle.write_bytes(bytes(raw))
    shared = tmp_path / "shared"
    with pytest.raises(IntegrityError, match="fails authentication"):
        _opened_once(job.bundle, job.key, job.job_id, shared)
    assert not (shared / "opened").exists()
    assert not (shared / "bundle" / "inputs").exists()  # nothing unverified is left to run on
