"""Closing the loop with real peers: storescu as the TPS sending, storescp as the TPS receiving.

The node runs the real pipeline (anonymize, seal, MCsquare shards on the local backend, merge,
re-identify) with few primaries on a small phantom.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from anonymizer.seal import unwrap_key
from cloud.bundle import open_bundle
from dicom_node.intake.jobrecord import JobState
from dicom_node.intake.journal import Journal
from dicom_node.phantom import write_study
from tests.conftest import free_port, run_dcmtk, settings_for, storescu, wait_for

pytestmark = pytest.mark.slow

PRIMARIES = 20_000


def _compute_settings(config_dir: Path, tps_port: int, **more):
    sections = {
        "engine": {"primaries": PRIMARIES},
        "cloud": {"shards": 2},
        "outbox": {"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        "destinations": [{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}],
    }
    return settings_for(config_dir, **{**sections, **more})


def _doses(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("RD"))


def test_dose_returns_to_tps_linked_to_its_plan(config_dir, node_factory, storescp, phantom_dir, tmp_path):
    tps_port, tps_dir = storescp(aet="TPS")
    node = node_factory(_compute_settings(config_dir, tps_port), compute=True)
    files = sorted(phantom_dir.iterdir())
    assert storescu(node.port, files).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.SENT), timeout=300)[0]
    (dose_file,) = wait_for(lambda: _doses(tps_dir))
    rd = dcmread(dose_file)
    plan = dcmread(phantom_dir / "RP.dcm")
    cts = sorted((dcmread(p) for p in phantom_dir.glob("CT_*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    # the references a TPS links the dose by, exactly
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert rd.StudyInstanceUID == plan.StudyInstanceUID
    assert rd.FrameOfReferenceUID == cts[0].FrameOfReferenceUID
    assert rd.PatientID == plan.PatientID and str(rd.PatientName) == str(plan.PatientName)
    assert rd.SeriesInstanceUID not in {plan.SeriesInstanceUID, cts[0].SeriesInstanceUID}
    # the grid is engine.dose_grid_mm's default: 2.5 mm cubes centred on the CT, inside its edges
    assert [float(v) for v in rd.PixelSpacing] == [2.5, 2.5]
    offsets = [float(v) for v in rd.GridFrameOffsetVector]
    assert offsets == pytest.approx([2.5 * k for k in range(int(rd.NumberOfFrames))])
    ct_spacing = (float(cts[0].PixelSpacing[1]), float(cts[0].PixelSpacing[0]),
                  float(cts[1].ImagePositionPatient[2]) - float(cts[0].ImagePositionPatient[2]))
    ct_counts = (int(cts[0].Columns), int(cts[0].Rows), len(cts))
    for axis, n in enumerate((int(rd.Columns), int(rd.Rows), int(rd.NumberOfFrames))):
        ct_first = float(cts[0].ImagePositionPatient[axis])
        ct_centre = ct_first + (ct_counts[axis] - 1) * ct_spacing[axis] / 2
        first = float(rd.ImagePositionPatient[axis])
        assert first + (n - 1) * 2.5 / 2 == pytest.approx(ct_centre)
        assert first - 1.25 >= ct_first - ct_spacing[axis] / 2 - 1e-6
    assert rd.DoseUnits == "GY" and rd.DoseSummationType == "PLAN" and rd.BitsAllocated == 32
    dose = rd.pixel_array * float(rd.DoseGridScaling)
    assert dose.max() > 0
    # dcmtk reads it without complaint
    dump = run_dcmtk("dcmdump", "-q", str(dose_file))
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    rows = node.journal.list_jobs()
    assert rows[0]["state"] == JobState.SENT and rows[0]["shards_done"] == rows[0]["shards_total"] == 2
    assert [s for s, _r, _t in node.journal.history(job.id)] == \
        ["RECEIVING", "READY", "SEALED", "RUNNING", "MERGED", "SENT"]
    # what left the building: the engine's inputs only, no DICOM file; the job records the list
    assert node.pipeline is not None
    folder = node.pipeline.job_dir(job.id)
    key = unwrap_key(node.pipeline.site_key, (folder / "data.key").read_bytes(), job.id)
    opened = open_bundle(folder / "bundle.sealed", key, job.id, tmp_path / "opened")
    assert opened["files"] and all(name.startswith("inputs/") for name in opened["files"])
    for path in (tmp_path / "opened").rglob("*"):
        if path.is_file():
            assert path.read_bytes()[128:132] != b"DICM", path.name
    recorded = node.journal.job(job.id).data.public.bundle_files or []
    assert sorted(name for name, _size in recorded) == sorted(opened["files"])
    assert len(list((folder / "anonymized").iterdir())) == len(files)  # the DICOM stayed here


def test_tps_down_dose_arrives_once_it_is_up(config_dir, node_factory, storescp, phantom_dir):
    tps_port = free_port()
    node = node_factory(_compute_settings(config_dir, tps_port), compute=True)
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.MERGED), timeout=300)[0]
    wait_for(lambda: (node.journal.job(job.id).data.public.send_attempts or 0) >= 2, timeout=30)
    assert node.journal.job(job.id).state == JobState.MERGED
    _port, tps_dir = storescp(aet="TPS", port=tps_port)
    wait_for(lambda: node.journal.jobs_in(JobState.SENT), timeout=30)
    time.sleep(3)  # longer than the back-off: nothing else may arrive
    assert len(_doses(tps_dir)) == 1


def test_sigkill_while_running_then_restart_delivers_once(config_dir, storescp, phantom_dir):
    tps_port, tps_dir = storescp(aet="TPS")
    port = free_port()
    cfg = config_dir / "mcnode.toml"
    text = cfg.read_text().replace("port = 0", f"port = {port}", 1).replace("port = 11113", f"port = {tps_port}")
    text = text.replace("primaries = 1000000", "primaries = 200000").replace("shards = 4", "shards = 2")
    cfg.write_text(text)
    env = {**os.environ}

    def serve() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "-c", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: run_dcmtk("echoscu", "-aet", "TPS", "-aec", "MCNODE", "127.0.0.1", str(port),
                                   timeout=5).returncode == 0, timeout=30)
        return proc

    first = serve()
    try:
        assert storescu(port, sorted(phantom_dir.iterdir())).returncode == 0
        journal = Journal.open(config_dir / "data")
        wait_for(lambda: journal.jobs_in(JobState.RUNNING), timeout=120)
        os.killpg(first.pid, signal.SIGKILL)  # the node and its workers, as a power cut would
        first.wait(timeout=10)
        assert journal.jobs_in(JobState.RUNNING) and not _doses(tps_dir)
        second = serve()
        try:
            wait_for(lambda: journal.jobs_in(JobState.SENT), timeout=300)
            time.sleep(2)
            assert len(_doses(tps_dir)) == 1
        finally:
            second.terminate()
            second.wait(timeout=30)
        journal.close()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


def test_two_plans_of_one_patient_get_two_doses(config_dir, node_factory, storescp, make_study, tmp_path):
    tps_port, tps_dir = storescp(aet="TPS")
    node = node_factory(_compute_settings(config_dir, tps_port), compute=True)
    study = make_study()
    folder = tmp_path / "two"
    write_study(study, folder)
    second = dcmread(folder / "RP.dcm")
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    second.RTPlanLabel = "PLAN_B"
    second.save_as(folder / "RP2.dcm")
    assert storescu(node.port, sorted(folder.iterdir())).returncode == 0
    wait_for(lambda: len(node.journal.jobs_in(JobState.SENT)) == 2, timeout=600)
    doses = wait_for(lambda: len(_doses(tps_dir)) == 2 and _doses(tps_dir))
    refs = {dcmread(p).ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID for p in doses}
    assert refs == {study.plan.SOPInstanceUID, second.SOPInstanceUID}


def test_plan_the_engine_cannot_compute_is_rejected_with_reason(config_dir, node_factory, storescp, make_study,
                                                                 tmp_path, capsys):
    from dicom_node.cli import main
    from dicom_node.intake.jobrecord import JobState

    tps_port, tps_dir = storescp(aet="TPS")
    settings = _compute_settings(config_dir, tps_port)
    node = node_factory(settings, compute=True)
    study = make_study()
    for beam in study.plan.IonBeamSequence:
        beam.ScanMode = "UNIFORM"  # passive/uniform scanning: not pencil-beam scanning
    folder = tmp_path / "uniform"
    write_study(study, folder)
    assert storescu(node.port, sorted(folder.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.REJECTED), timeout=60)[0]
    assert "scan mode UNIFORM is not pencil-beam scanning" in job.reason
    capsys.readouterr()
    assert main(["jobs", "-c", str(config_dir / "mcnode.toml"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "REJECTED" in out and "UNIFORM" in out
    assert not _doses(tps_dir)
    # the received data is still there
    assert all(Path(p).exists() for p in job.data.ct)


def test_failed_job_reports_reason_and_retry_completes_it(config_dir, node_factory, storescp, phantom_dir, tmp_path,
                                                          monkeypatch, capsys):
    from dicom_node.cli import main
    from dicom_node.intake.jobrecord import JobState

    tps_port, tps_dir = storescp(aet="TPS")
    node = node_factory(_compute_settings(config_dir, tps_port, cloud={"shards": 2, "shard_retries": 1}),
                        compute=True)
    empty = tmp_path / "no-mcsquare"
    empty.mkdir()
    monkeypatch.setenv("MCSQUARE_HOME", str(empty))  # the workers find no engine: every shard fails
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.FAILED), timeout=120)[0]
    assert job.reason.startswith("RUNNING: shard") and "failed 2 time(s)" in job.reason
    monkeypatch.delenv("MCSQUARE_HOME")
    # a job file changed since sealing: the retry does not keep the job folder, it seals afresh
    folder = Path(node.settings.node.data_dir) / "jobs" / job.id
    wrapped = (folder / "data.key").read_bytes()
    inputs_json = folder / "inputs" / "inputs.json"
    inputs_json.write_bytes(inputs_json.read_bytes() + b" ")  # still valid JSON, not the bytes sealed
    capsys.readouterr()
    assert main(["retry", job.id, "-c", str(config_dir / "mcnode.toml")]) == 0
    assert "READY again" in capsys.readouterr().out
    done = wait_for(lambda: [j for j in node.journal.jobs_in(JobState.SENT) if j.id == job.id], timeout=120)[0]
    assert len(wait_for(lambda: _doses(tps_dir))) == 1
    states = [s for s, _r, _t in node.journal.history(job.id)]
    assert states[-6:] == ["FAILED", "READY", "SEALED", "RUNNING", "MERGED", "SENT"]
    retry = done.data.public.retry or {}
    assert "inputs/inputs.json was changed" in retry.get("resealed", ""), retry
    assert (folder / "data.key").read_bytes() != wrapped  # a new data key: sealed from the originals


def _counting_mcsquare(folder: Path) -> tuple[Path, Path]:
    """An MCSQUARE_HOME whose binary runs the real MCsquare, writes each run's RNG_Seed to a log first,
    and fails (exit 3) for a seed listed in the fail file. Returns (log, fail file)."""
    from cloud.engines.mcsquare.adapter import mcsquare_binary

    binary, materials = mcsquare_binary()
    folder.mkdir()
    (folder / "Materials").symlink_to(materials, target_is_directory=True)
    log, fail = folder / "runs.log", folder / "fail-seeds"
    script = folder / binary.name.split("-")[0]  # the cached copy is named <variant>-<size>-<mtime>
    script.write_text(f"""#!/bin/sh
seed=$(sed -n 's/^RNG_Seed \\([0-9]*\\).*/\\1/p' "$1" 2>/dev/null)
if [ -n "$seed" ]; then
  echo "$seed" >> '{log}'
  if grep -qx "$seed" '{fail}' 2>/dev/null; then echo "deliberate failure, seed $seed"; exit 3; fi
fi
exec '{binary}' "$@"
""")
    script.chmod(0o755)
    return log, fail


def test_retry_after_a_running_failure_runs_only_the_missing_shards(config_dir, node_factory, storescp, phantom_dir,
                                                                    tmp_path, monkeypatch, capsys, caplog):
    """A job whose last shard failed (no shard retries) is retried: the finished shards are kept, a kept
    result that no longer verifies runs again, and the dose is delivered."""
    from cloud.dispatch import BASE_SEED
    from dicom_node.cli import main

    caplog.set_level(logging.INFO, logger="dicom_node.jobs.pipeline")
    log, fail = _counting_mcsquare(tmp_path / "mcsquare")
    monkeypatch.setenv("MCSQUARE_HOME", str(log.parent))
    rng_seed = [BASE_SEED + i + 1 for i in range(4)]  # MCsquare's RNG_Seed of shard i (adapter.write_config)
    fail.write_text(f"{rng_seed[3]}\n")
    tps_port, tps_dir = storescp(aet="TPS")
    node = node_factory(_compute_settings(config_dir, tps_port, cloud={"shards": 4, "shard_retries": 0}),
                        compute=True)
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.FAILED), timeout=180)[0]
    assert job.reason.startswith("RUNNING: shard 3 failed 1 time(s)"), job.reason
    results = Path(node.settings.node.data_dir) / "jobs" / job.id / "results"
    kept = {p.name: p.stat() for p in results.glob("shard-*.tally")}
    assert sorted(kept) == ["shard-0.tally", "shard-1.tally", "shard-2.tally"]  # one shard at a time, in order
    assert sorted(int(s) for s in log.read_text().split()) == rng_seed
    # a kept result changed on disk no longer opens with the job's key: it must run again
    tampered = bytearray((results / "shard-1.tally").read_bytes())
    tampered[-20] ^= 0x01
    (results / "shard-1.tally").write_bytes(bytes(tampered))
    fail.write_text("")  # the host is back
    log.write_text("")
    capsys.readouterr()
    assert main(["retry", job.id, "-c", str(config_dir / "mcnode.toml")]) == 0
    assert "READY again" in capsys.readouterr().out
    done = wait_for(lambda: [j for j in node.journal.jobs_in(JobState.SENT) if j.id == job.id], timeout=180)[0]
    assert len(wait_for(lambda: _doses(tps_dir))) == 1
    # only the shard that never finished and the tampered one ran again
    assert sorted(int(s) for s in log.read_text().split()) == [rng_seed[1], rng_seed[3]]
    for name in ("shard-0.tally", "shard-2.tally"):
        now = (results / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (kept[name].st_ino, kept[name].st_mtime_ns)
    assert done.data.public.retry == {"reused_seal": True, "kept_shards": 2, "shards": 4}
    assert f"job {job.id}: retry: 2 of 4 shards kept" in caplog.text
    assert done.data.public.shards == 4 and done.data.public.primaries == PRIMARIES
    states = [s for s, _r, _t in node.journal.history(job.id)]
    assert states[-6:] == ["FAILED", "READY", "SEALED", "RUNNING", "MERGED", "SENT"]
