"""Job files read back after sealing are authenticated: a changed file fails the job, no dose is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.intake.jobrecord import JobState
from dicom_node.jobs.outbox import Outbox
from tests.conftest import seal_a_job, wait_for


def test_changed_inputs_json_fails_the_job_naming_the_file(config_dir, node_factory, phantom_dir):
    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir)
    inputs = pipeline.job_dir(job.id) / "inputs" / "inputs.json"
    data = json.loads(inputs.read_text())
    data["fractions"] = data["fractions"] + 50  # e.g. 30 -> 80: the dose would be scaled up silently
    inputs.write_text(json.dumps(data))
    done = pipeline.process(job.id)
    assert done.state == JobState.FAILED
    assert f"jobs/{job.id}/inputs/inputs.json was changed after it was written" in done.reason
    assert not (pipeline.job_dir(job.id) / "RD.dcm").exists()
    assert node.journal.job(job.id).data.failed_in == "RUNNING"


def test_missing_integrity_record_fails_the_job(config_dir, node_factory, phantom_dir):
    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir)
    (pipeline.job_dir(job.id) / "integrity.json").unlink()
    done = pipeline.process(job.id)
    assert done.state == JobState.FAILED and "has no integrity record" in done.reason


@pytest.mark.slow
def test_changed_rt_dose_is_not_sent_and_retry_reseals(config_dir, node_factory, phantom_dir, storescp, capsys):
    tps_port, tps_dir = storescp(aet="TPS")
    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir, tps_port)
    merged = pipeline.process(job.id)
    assert merged.state == JobState.MERGED
    rd = Path(merged.data.rtdose)
    raw = bytearray(rd.read_bytes())
    raw[-1] ^= 0xFF  # one dose voxel
    rd.write_bytes(bytes(raw))
    outbox = Outbox(settings, node.journal)
    outbox.start()
    try:
        outbox.submit(merged)
        failed = wait_for(lambda: node.journal.job(job.id).state == JobState.FAILED and node.journal.job(job.id))
    finally:
        outbox.stop()
    assert f"jobs/{job.id}/RD.dcm was changed after it was written" in failed.reason
    assert not list(tps_dir.iterdir())
    # retry seals again from the received originals: a fresh job folder, a dose that verifies
    capsys.readouterr()
    assert main(["retry", job.id, "-c", str(config_dir / "mcnode.toml")]) == 0
    assert "READY again" in capsys.readouterr().out
    assert pipeline.process(job.id).state == JobState.MERGED


@pytest.mark.parametrize("change", ["nothing", "bundle", "anonymized", "settings"])
def test_retry_after_running_keeps_the_job_folder_only_when_it_verifies(config_dir, node_factory, phantom_dir,
                                                                       change):
    """A job that failed while RUNNING and is retried goes READY -> SEALED without sealing when its job
    folder verifies; a changed bundle or job file, or engine settings changed since, seal it afresh."""
    import dataclasses

    from dicom_node.intake.jobrecord import JobData
    from dicom_node.jobs.pipeline import Pipeline

    settings, node, pipeline, job = seal_a_job(config_dir, node_factory, phantom_dir)
    folder = pipeline.job_dir(job.id)
    wrapped = (folder / "data.key").read_bytes()
    node.journal.transition(job.id, JobState.RUNNING, expect=JobState.SEALED)
    node.journal.transition(job.id, JobState.FAILED, reason="RUNNING: shard 1 failed 1 time(s)",
                            data=JobData(failed_in=JobState.RUNNING))
    assert node.journal.retry(job.id).state == JobState.READY
    if change == "bundle":
        raw = bytearray((folder / "bundle.sealed").read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (folder / "bundle.sealed").write_bytes(bytes(raw))
    elif change == "anonymized":
        name = folder / "anonymized" / node.journal.job(job.id).data.anonymized[-1]
        name.write_bytes(name.read_bytes() + b"\0")
    elif change == "settings":
        engine = dataclasses.replace(settings.engine, dose_grid_mm=settings.engine.dose_grid_mm + 1)
        pipeline = Pipeline(dataclasses.replace(settings, engine=engine), node.journal)
    done = pipeline.process(job.id, until=JobState.RUNNING)
    assert done.state == JobState.RUNNING
    states = [s for s, _r, _t in node.journal.history(job.id)]
    assert states[-4:] == ["FAILED", "READY", "SEALED", "RUNNING"]
    retry = done.data.public.retry or {}
    if change == "nothing":
        assert retry == {"reused_seal": True}
        assert (folder / "data.key").read_bytes() == wrapped  # the same data key: the folder was kept
        return
    expected = {"bundle": "part 'bundle'", "anonymized": "was changed after it was written",
                "settings": "the engine settings"}[change]
    assert expected in retry.get("resealed", ""), retry
    assert (folder / "data.key").read_bytes() != wrapped  # sealed afresh: a new data key
