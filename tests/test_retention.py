"""Retention: nothing is removed before its job ends; after `[retention] days` the job's originals
(unless another job uses them), folder, reports and vault entry go; `mcnode purge --dry-run` lists."""

from __future__ import annotations

import os
import time

from dicom_node.cli import main
from dicom_node.intake.jobrecord import JobState
from dicom_node.jobs.retention import DAY_SECONDS, purge
from dicom_node.phantom import write_study
from tests.conftest import seal_a_job, storescu, wait_for


def test_purge_keeps_running_jobs_and_removes_ended_ones_after_retention(config_dir, node_factory, phantom_dir,
                                                                          capsys):
    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir, retention={"days": 30})
    data_dir = settings.node.data_dir
    folder, vault = data_dir / "jobs" / job.id, data_dir / "vault" / f"{job.id}.vault"
    originals = [job.data.plan, job.data.structure_set, *job.data.ct]
    later = time.time() + 365 * DAY_SECONDS
    assert purge(settings, node.journal, now=later) == []  # SEALED: not ended, nothing goes however old
    node.journal.transition(job.id, JobState.REJECTED, reason="ended for this test")
    assert purge(settings, node.journal, now=time.time() + 29 * DAY_SECONDS) == []  # not yet 30 days
    # dry run: listed, nothing removed
    capsys.readouterr()
    (item,) = purge(settings, node.journal, dry_run=True, now=later)
    assert len(item.files) == len(originals) and folder in item.folders and item.vault
    assert folder.exists() and vault.exists() and all(os.path.exists(p) for p in originals)
    # the physicist sends the plan again: a new job uses the same CT, which must stay
    assert storescu(node.port, [phantom_dir / "RP.dcm"]).returncode == 0
    second = wait_for(lambda: node.journal.jobs_in(JobState.READY))[0]
    assert second.id != job.id
    (item,) = purge(settings, node.journal, now=later)
    assert item.files == []  # plan, structure set and CT all used by the new job
    assert not folder.exists() and not vault.exists()
    assert all(os.path.exists(p) for p in originals)
    assert node.journal.job(job.id).data.public.purged
    assert purge(settings, node.journal, now=later) == []  # once only
    # the new job ends too: now the originals go, with their journal rows
    node.journal.transition(second.id, JobState.REJECTED, reason="ended for this test")
    (item,) = purge(settings, node.journal, now=later)
    assert len(item.files) == len(originals)
    assert not any(os.path.exists(p) for p in originals)
    assert node.journal.count_instances() == 0
    rows = {r["id"]: r for r in node.journal.list_jobs()}
    assert rows[job.id]["state"] == "REJECTED" and rows[job.id]["purged"]  # the journal keeps the history


def test_purge_cli_dry_run_lists_and_removes_nothing(config_dir, node_factory, phantom_dir, capsys):
    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir)
    config = config_dir / "mcnode.toml"
    config.write_text(config.read_text() + "\n[retention]\ndays = 0.00001\n")  # about one second
    node.journal.transition(job.id, JobState.REJECTED, reason="ended for this test")
    time.sleep(1.5)
    capsys.readouterr()
    assert main(["purge", "-c", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove job {job.id} (REJECTED" in out and "1 job(s)" in out
    assert (settings.node.data_dir / "jobs" / job.id).exists()
    assert main(["purge", "-c", str(config)]) == 0
    assert f"removed job {job.id}" in capsys.readouterr().out
    assert not (settings.node.data_dir / "jobs" / job.id).exists()


def test_received_instances_no_job_uses_go_after_retention(config_dir, node_factory, phantom_dir, make_study, tmp_path):
    """A CT series whose plan never came is removed after `days` too, but not while a plan of that
    patient still waits for its CT, and never what a job uses."""
    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir, retention={"days": 30})
    originals = [job.data.plan, job.data.structure_set, *job.data.ct]
    lone, waiting = tmp_path / "lone", tmp_path / "waiting"
    write_study(make_study(), lone)
    write_study(make_study(), waiting)
    lone_ct = sorted(lone.glob("CT_*.dcm"))
    assert storescu(node.port, lone_ct).returncode == 0  # a CT series and nothing else
    assert storescu(node.port, [waiting / "RP.dcm"]).returncode == 0  # a plan whose CT never comes
    third = wait_for(lambda: node.journal.jobs_in(JobState.RECEIVING))[0]
    before = node.journal.count_instances()
    later = time.time() + 365 * DAY_SECONDS
    assert purge(settings, node.journal, now=time.time() + 29 * DAY_SECONDS) == []  # not 30 days old yet
    assert purge(settings, node.journal, now=later) == []  # that patient's plan still waits: kept
    node.journal.transition(third.id, JobState.REJECTED, reason="ended for this test")
    items = purge(settings, node.journal, now=later)
    (orphans,) = [i for i in items if i.orphans]
    assert len(orphans.files) == len(lone_ct) and "received file(s) no job uses" in orphans.describe()
    assert not any(p.exists() for p in orphans.files)
    assert all(os.path.exists(p) for p in originals)  # the SEALED job's originals stay
    assert node.journal.count_instances() == before - len(lone_ct) - 1  # the CT series and the ended plan
    assert node.journal.job(job.id).state == JobState.SEALED
