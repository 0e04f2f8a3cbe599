"""Many plans at once (issue 14): concurrent jobs on the ssh backend (real sshd), fair shares of the
workers, priorities, and `mcnode cancel` stopping a job's shards.

The node runs the real pipeline and the real worker + MCsquare (few primaries, small phantom);
dcmtk's storescu sends as five TPS associations at once and storescp receives the doses.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread

from cloud.backends import get_backend
from cloud.backends.share import FairShare
from cloud.dispatch import plan_tasks
from dicom_node.intake.jobrecord import JobState
from dicom_node.phantom import FakeIdentity, build_study, write_study
from tests.cloud_data import all_cmdlines, sealed_job
from tests.conftest import SMALL, settings_for, storescu, wait_for
from tests.peers import Sshd, sshd

WORKER = f"{sys.executable} -m cloud.worker"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with sshd(tmp_path_factory.mktemp("sshd")) as s:
        yield s


def _hosts(s: Sshd, work: Path, n: int, command: str = WORKER) -> list[dict[str, object]]:
    return [{"host": "127.0.0.1", "port": s.port, "user": s.user, "key_file": str(s.client_key),
             "work_dir": str(work / f"host{i}"), "command": command} for i in range(n)]


def _ssh_settings(config_dir: Path, server: Sshd, tmp_path: Path, tps_port: int, *, jobs: int, hosts: int,
                  command: str = WORKER, primaries: int = 2000, shards: int = 2,
                  senders: tuple[tuple[str, str], ...] = (("TPS", "normal"),)):
    return settings_for(
        config_dir,
        node={"allowed_callers": [aet for aet, _priority in senders]},
        engine={"primaries": primaries, "threads": 1},
        cloud={"backend": "ssh", "shards": shards, "max_concurrent_jobs": jobs, "shard_retries": 0,
               "ssh": {"hosts": _hosts(server, tmp_path / "work", hosts, command),
                       "known_hosts_file": str(server.known_hosts)}},
        outbox={"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        destinations=[{"calling_ae_title": aet, "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port,
                       "priority": priority} for aet, priority in senders])


@pytest.mark.slow
def test_five_plans_at_once_run_together_and_each_dose_goes_to_its_patient(config_dir, node_factory, storescp,
                                                                          server, tmp_path):
    tps_port, tps_dir = storescp(aet="TPS")
    # Each shard is the real worker + MCsquare, started 3 s late: shards of a few hundred primaries
    # last ~1 s, shorter than the spread of five jobs' sealing on 2 cores, while real shards last minutes.
    slow_worker = f"sh -c 'sleep 3; exec {WORKER} \"$@\"' sh"
    node = node_factory(_ssh_settings(config_dir, server, tmp_path, tps_port, jobs=5, hosts=5,
                                      command=slow_worker), compute=True)
    plans: dict[str, str] = {}  # patient id -> plan UID
    folders = []
    for i in range(5):
        ident = FakeIdentity(patient_name=f"Concurrent^Patient{i}", patient_id=f"PAT-C{i}")
        study = build_study(replace(SMALL, identity=ident))
        folder = tmp_path / f"study{i}"
        write_study(study, folder)
        plans[ident.patient_id] = study.plan.SOPInstanceUID
        folders.append(folder)
    with ThreadPoolExecutor(max_workers=5) as pool:  # five TPS associations at once
        sent = list(pool.map(lambda f: storescu(node.port, sorted(f.iterdir())), folders))
    assert all(r.returncode == 0 for r in sent), [r.stderr for r in sent]
    wait_for(lambda: len(node.journal.jobs_in(JobState.SENT)) == 5, timeout=600, interval=0.5)
    jobs = node.journal.jobs_in(JobState.SENT)
    times = {j.id: {s: t for s, _r, t in node.journal.history(j.id)} for j in jobs}
    # every job was RUNNING before any job was MERGED: they ran together, not one after another
    assert max(t["RUNNING"] for t in times.values()) < min(t["MERGED"] for t in times.values())
    doses = wait_for(lambda: len(list(tps_dir.iterdir())) >= 5 and sorted(tps_dir.iterdir()))
    time.sleep(1.0)  # a sixth (duplicate) dose would have arrived by now
    doses = sorted(tps_dir.iterdir())
    assert len(doses) == 5
    got = {}
    for path in doses:
        rd = dcmread(path)
        assert rd.PatientID not in got, f"two doses for {rd.PatientID}"
        got[rd.PatientID] = rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
        assert str(rd.PatientName) == f"Concurrent^Patient{rd.PatientID[-1]}"
    assert got == plans


# A stand-in worker that sleeps one second per 1000 primaries of its shard and writes its result:
# shards of known length on real sshd, to see how the shared workers are handed out.
SLEEPER = ("sh -c 'read k; r=; p=; n=0; for a; do [ \"$p\" = --result ] && r=${a#file://}; "
           "[ \"$p\" = --primaries ] && n=$a; p=$a; done; sleep $((n / 1000)).$((n % 1000 / 100)); "
           "echo done > \"$r\"' sh")


def test_small_job_sent_after_a_big_one_finishes_first(server, tmp_path):
    job = sealed_job(tmp_path / "job")
    hosts = _hosts(server, tmp_path / "work", 2, SLEEPER)
    share = FairShare(2)
    ended: dict[str, float] = {}

    def run(name: str, shards: int, per_shard: int, priority: str = "normal") -> None:
        backend = get_backend("ssh", hosts=hosts, known_hosts=server.known_hosts, retries=0, deadline_s=60)
        backend.share, backend.priority = share, priority
        tasks = plan_tasks(name, shards, shards * per_shard, job.bundle_uri, job.results_uri(name))
        backend.run(tasks, job.key)
        ended[name] = time.monotonic()

    start = time.monotonic()
    big = threading.Thread(target=run, args=("big", 6, 1500))
    big.start()
    wait_for(lambda: share.targets().get("big") == 2)  # the big job holds both workers
    time.sleep(0.5)
    small = threading.Thread(target=run, args=("small", 2, 100))
    small.start()
    small.join(timeout=60)
    big.join(timeout=60)
    assert ended["small"] < ended["big"]
    # 6 shards of 1.5 s on 2 workers: at least 4.5 s, so no host ran two shards at once
    assert ended["big"] - start >= 4.5


def test_fair_shares_by_priority_then_equal():
    share = FairShare(8)
    share.join("big", "batch")
    assert share.room("big", running=0, pending=64, limit=8) == 8  # alone: everything
    share.join("check", "batch")
    share.join("planner", "interactive")
    share.room("check", running=0, pending=10, limit=8)
    share.room("planner", running=0, pending=4, limit=8)
    # the interactive job first (all it asks for), the two batch jobs split the rest equally
    assert share.targets() == {"planner": 4, "big": 2, "check": 2}
    # no pre-emption: nothing is free while the big job's 8 shards run
    assert share.room("planner", running=0, pending=4, limit=8) == 0
    # as the big job's shards end, the freed slots go to the planner, not back to the big job
    assert share.room("big", running=6, pending=56, limit=8) == 0
    assert share.room("planner", running=0, pending=4, limit=8) == 2


@pytest.mark.slow
def test_cancel_stops_the_shards_and_records_cancelled(config_dir, node_factory, storescp, server, phantom_dir,
                                                       tmp_path, capsys):
    from dicom_node.cli import main

    marker = "sleep 97"
    tps_port, tps_dir = storescp(aet="TPS")
    settings = _ssh_settings(config_dir, server, tmp_path, tps_port, jobs=2, hosts=2,
                             command=f"sh -c 'read k; {marker}' sh")
    node = node_factory(settings, compute=True)
    files = sorted(phantom_dir.iterdir())
    assert storescu(node.port, files).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.RUNNING), timeout=120)[0]
    wait_for(lambda: sum(marker in c for c in all_cmdlines()) >= 2, timeout=60)  # both shards run
    assert main(["cancel", job.id, "-c", str(config_dir / "mcnode.toml")]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    wait_for(lambda: not any(marker in c for c in all_cmdlines()), timeout=30)  # stopped on the hosts
    assert node.pipeline is not None and node.pipeline.wait_idle(30)
    assert node.journal.job(job.id).state == JobState.CANCELLED
    assert [s for s, _r, _t in node.journal.history(job.id)][-2:] == ["RUNNING", "CANCELLED"]
    assert not list(tps_dir.iterdir())  # no dose sent
    # a final state: cancelling again is refused with the reason
    assert main(["cancel", job.id, "-c", str(config_dir / "mcnode.toml")]) == 1
    assert "cannot be cancelled" in capsys.readouterr().err


@pytest.mark.slow
def test_a_planners_plan_sent_after_a_second_check_is_computed_first(config_dir, node_factory, storescp, server,
                                                                     tmp_path):
    """With the one worker busy, a plan from the planner's AE title (priority interactive) that arrives
    after an automatic second check (AE title of the checker, priority batch) gets the worker first."""
    tps_port, tps_dir = storescp(aet="TPS")
    gate = tmp_path / "gate"  # the worker's shards wait for it: the first job holds the worker meanwhile
    gated = f"sh -c 'while [ ! -e {gate} ]; do sleep 0.1; done; exec {WORKER} \"$@\"' sh"
    settings = _ssh_settings(config_dir, server, tmp_path, tps_port, jobs=3, hosts=1, command=gated,
                             senders=(("CHECKER", "batch"), ("PLANNER", "interactive")))
    node = node_factory(settings, compute=True)
    plans = {}
    for name in ("busy", "check", "planner"):
        ident = FakeIdentity(patient_name=f"Priority^{name}", patient_id=f"PAT-{name}")
        study = build_study(replace(SMALL, identity=ident))
        write_study(study, tmp_path / name)
        plans[name] = study.plan.SOPInstanceUID

    def dispatched(name: str):
        """The job of that plan once its shards are handed to the backend (waiting for the worker)."""
        jobs = [j for j in node.journal.jobs_in(JobState.RUNNING) if j.plan_uid == plans[name]]
        return jobs[0] if jobs and jobs[0].shards_total > 0 else None

    ids = {}
    for name, aet in (("busy", "CHECKER"), ("check", "CHECKER"), ("planner", "PLANNER")):
        assert storescu(node.port, sorted((tmp_path / name).iterdir()), aet=aet).returncode == 0
        ids[name] = wait_for(lambda name=name: dispatched(name), timeout=120).id  # type: ignore[misc]
    time.sleep(0.5)  # the planner's backend has joined the share (right after its progress is recorded)
    gate.touch()
    wait_for(lambda: len(node.journal.jobs_in(JobState.SENT)) == 3, timeout=300, interval=0.5)
    merged = {name: next(t for s, _r, t in node.journal.history(jid) if s == "MERGED") for name, jid in ids.items()}
    # the freed worker went to the planner's shards, ahead of the check that arrived first (and of the
    # rest of the first job, which was still computing)
    assert merged["planner"] < merged["check"], merged
    assert merged["planner"] < merged["busy"], merged
    doses = {dcmread(p).PatientID for p in tps_dir.iterdir()}
    assert doses == {"PAT-busy", "PAT-check", "PAT-planner"}
