"""Receiving from a TPS: dcmtk's storescu/echoscu against the node's real SCP."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, RTIonPlanStorage
from pynetdicom import AE

from dicom_node.cli import main
from dicom_node.intake.jobrecord import JobState
from dicom_node.net import status
from dicom_node.phantom import FakeIdentity, write_study
from tests.conftest import run_dcmtk, settings_for, storescu, wait_for


def _ready_jobs(node):
    return node.journal.jobs_in(JobState.READY)


def test_echo_answers(node_factory):
    node = node_factory()
    result = run_dcmtk("echoscu", "-aet", "TPS", "-aec", "MCNODE", "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr


def test_storescu_study_becomes_ready(node_factory, phantom_dir):
    node = node_factory()
    files = sorted(phantom_dir.iterdir())
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr
    jobs = wait_for(lambda: _ready_jobs(node))
    (job,) = jobs
    assert job.data.public.assembly == "structure set references"
    assert len(job.data.ct) == len([f for f in files if f.name.startswith("CT_")])
    assert all(Path(p).exists() for p in job.data.ct)
    assert [s for s, _r, _t in node.journal.history(job.id)] == [JobState.RECEIVING, JobState.READY]
    assert node.journal.count_instances() == len(files)
    # the spooled file is the data set as sent
    plan = dcmread(job.data.plan)
    assert plan.SOPClassUID == RTIonPlanStorage
    assert plan.PatientID == FakeIdentity().patient_id


def test_unknown_caller_refused_and_logged(node_factory, caplog):
    node = node_factory()
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.scp"):
        result = run_dcmtk("echoscu", "-aet", "STRANGER", "-aec", "MCNODE", "127.0.0.1", str(node.port))
        wait_for(lambda: "STRANGER" in caplog.text)
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr
    assert "rejected" in caplog.text


def test_malformed_file_fails_good_file_in_same_association_stored(node_factory, phantom_dir, tmp_path, caplog):
    node = node_factory()
    good = phantom_dir / "CT_0001.dcm"
    broken = tmp_path / "broken.dcm"
    ds = dcmread(phantom_dir / "CT_0002.dcm")
    del ds.FrameOfReferenceUID
    ds.save_as(broken)
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.scp"):
        result = storescu(node.port, [broken, good], "TPS", "MCNODE", "--no-halt", "-v")
    responses = [line for line in (result.stdout + result.stderr).splitlines() if "Store Response" in line]
    assert len(responses) == 2 and "Success" not in responses[0] and "Success" in responses[1], responses
    assert node.journal.instance(dcmread(good).SOPInstanceUID) is not None
    assert node.journal.instance(ds.SOPInstanceUID) is None
    assert "missing required attribute FrameOfReferenceUID" in caplog.text
    # logs name the instance by a hash of its UID, never the clinic's UID itself
    assert ds.SOPInstanceUID not in caplog.text and "uid#" in caplog.text


def test_undecodable_stream_gets_failure_status_and_node_keeps_serving(node_factory, phantom_dir, tmp_path, caplog,
                                                                       monkeypatch):
    """Bytes that are not a data set at all, sent raw by pynetdicom, then a good file."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = node_factory()
    good = phantom_dir / "CT_0003.dcm"
    garbage = tmp_path / "garbage.dcm"
    original = good.read_bytes()
    meta_end = original.index(b"\x08\x00\x05\x00")  # first data set element (0008,0005)
    garbage.write_bytes(original[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(64))
    ae = AE(ae_title="TPS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MCNODE")
    assert assoc.is_established
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.scp"):
        bad_rsp = assoc.send_c_store(garbage)
        good_rsp = assoc.send_c_store(good)
    assoc.release()
    assert 0xC000 <= bad_rsp.Status <= 0xCFFF
    assert good_rsp.Status == status.SUCCESS
    assert "cannot decode data set" in caplog.text
    assert run_dcmtk("echoscu", "-aet", "TPS", "-aec", "MCNODE", "127.0.0.1", str(node.port)).returncode == 0


def test_same_instance_twice_is_idempotent(node_factory, phantom_dir):
    node = node_factory()
    files = [phantom_dir / "CT_0001.dcm", phantom_dir / "CT_0002.dcm"]
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files).returncode == 0
    assert node.journal.count_instances() == 2
    spooled = [p for p in node.spool.root.rglob("*") if p.is_file()]
    assert len(spooled) == 2


def test_unwritable_storage_answers_out_of_resources(node_factory, phantom_dir):
    node = node_factory()
    # Root ignores permission bits, so make the spool unusable another way: a file where its folder is.
    shutil.rmtree(node.spool.root)
    node.spool.root.write_text("not a folder")
    ae = AE(ae_title="TPS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MCNODE")
    rsp = assoc.send_c_store(phantom_dir / "CT_0001.dcm")
    assoc.release()
    assert rsp.Status == status.OUT_OF_RESOURCES
    assert node.journal.count_instances() == 0
    assert not list(node.spool.root.parent.glob("**/*.tmp"))


@pytest.mark.parametrize("order", ["plan_first", "ct_first"])
def test_without_structure_set_ct_series_used_once_stable(node_factory, make_study, tmp_path, order):
    node = node_factory()
    study = make_study()
    del study.plan.ReferencedStructureSetSequence
    folder = tmp_path / "nostruct"
    write_study(study, folder)
    (folder / "RS.dcm").unlink()
    plan, cts = [folder / "RP.dcm"], sorted(folder.glob("CT_*.dcm"))
    first, second = (plan, cts) if order == "plan_first" else (cts, plan)
    assert storescu(node.port, first).returncode == 0
    time.sleep(0.3)
    assert storescu(node.port, second).returncode == 0
    job = wait_for(lambda: _ready_jobs(node))[0]
    assert len(job.data.ct) == len(cts)
    assert "stable" in job.data.public.assembly
    assert job.data.structure_set is None


def test_ct_first_then_struct_then_plan(node_factory, phantom_dir):
    node = node_factory()
    assert storescu(node.port, sorted(phantom_dir.glob("CT_*.dcm"))).returncode == 0
    assert storescu(node.port, [phantom_dir / "RS.dcm"]).returncode == 0
    assert node.journal.jobs_in(JobState.READY, JobState.RECEIVING) == []
    assert storescu(node.port, [phantom_dir / "RP.dcm"]).returncode == 0
    job = wait_for(lambda: _ready_jobs(node))[0]
    assert job.data.public.assembly == "structure set references"


def test_two_patients_at_once_never_mix(node_factory, make_study, tmp_path):
    node = node_factory()
    a = make_study(identity=FakeIdentity(patient_id="PAT-A", patient_name="Alpha^Ann"))
    b = make_study(identity=FakeIdentity(patient_id="PAT-B", patient_name="Beta^Bob"))
    fa, fb = tmp_path / "a", tmp_path / "b"
    write_study(a, fa)
    write_study(b, fb)
    # interleave the two studies slice by slice, plans first, in two concurrent associations
    la = [fa / "RP.dcm", fa / "RS.dcm", *sorted(fa.glob("CT_*.dcm"))]
    lb = [fb / "RP.dcm", fb / "RS.dcm", *sorted(fb.glob("CT_*.dcm"))]
    env = {**os.environ, "TCP_NODELAY": "1"}
    procs = [subprocess.Popen(["storescu", "-R", "-aet", aet, "-aec", "MCNODE", "127.0.0.1", str(node.port),
                               *map(str, files)], env=env, stderr=subprocess.DEVNULL)
             for aet, files in (("TPS", la), ("TPS2", lb))]
    for p in procs:
        assert p.wait(timeout=60) == 0
    jobs = wait_for(lambda: len(_ready_jobs(node)) == 2 and _ready_jobs(node))
    by_plan = {j.plan_uid: j for j in jobs}
    for study in (a, b):
        job = by_plan[study.plan.SOPInstanceUID]
        got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in job.data.ct}
        assert got == {ds.SOPInstanceUID for ds in study.ct}
    assert {j.calling_ae for j in jobs} == {"TPS", "TPS2"}


def test_incomplete_plan_rejected_after_timeout_with_reason(config_dir, node_factory, phantom_dir):
    settings = settings_for(config_dir, trigger={"timeout_seconds": 1.5})
    node = node_factory(settings)
    cts = sorted(phantom_dir.glob("CT_*.dcm"))
    assert storescu(node.port, [phantom_dir / "RP.dcm", phantom_dir / "RS.dcm", *cts[:-3]]).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.REJECTED), timeout=10)[0]
    assert job.reason == f"CT incomplete after 1.5 s: 3 of {len(cts)} slices referenced by the structure set missing"
    rows = node.journal.list_jobs()
    assert rows[0]["state"] == JobState.REJECTED and "3 of" in rows[0]["reason"]


def test_restart_keeps_instances_and_ready_job(config_dir, node_factory, phantom_dir):
    node = node_factory()
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    job = wait_for(lambda: _ready_jobs(node))[0]
    count = node.journal.count_instances()
    node.stop()
    again = node_factory()
    assert again.journal.count_instances() == count
    assert [j.id for j in again.journal.jobs_in(JobState.READY)] == [job.id]
    assert all(Path(p).exists() for p in again.journal.job(job.id).data.ct)


def test_restart_resumes_a_receiving_job(config_dir, node_factory, phantom_dir):
    node = node_factory()
    cts = sorted(phantom_dir.glob("CT_*.dcm"))
    assert storescu(node.port, [phantom_dir / "RP.dcm", phantom_dir / "RS.dcm", *cts[:5]]).returncode == 0
    wait_for(lambda: node.journal.jobs_in(JobState.RECEIVING))
    node.stop()
    again = node_factory()
    assert storescu(again.port, cts[5:]).returncode == 0
    assert wait_for(lambda: _ready_jobs(again))


@pytest.mark.parametrize(("convert", "propose"), [
    (("dcmcjpeg", "+e1"), "-xs"),   # JPEG lossless SV1
    (("dcmcrle",), "-xr"),          # RLE lossless
    (("dcmconv", "+td"), "-xd"),    # deflated explicit VR little endian
])
def test_compressed_and_deflated_ct_stored_as_received(node_factory, phantom_dir, tmp_path, convert, propose):
    node = node_factory()
    src = phantom_dir / "CT_0001.dcm"
    dst = tmp_path / "converted.dcm"
    result = run_dcmtk(*convert, str(src), str(dst))
    assert result.returncode == 0, result.stderr
    syntax = dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID
    result = storescu(node.port, [dst], "TPS", "MCNODE", propose)
    assert result.returncode == 0, result.stderr
    inst = wait_for(lambda: node.journal.instance(dcmread(dst, stop_before_pixels=True).SOPInstanceUID))
    assert dcmread(inst.path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax


def test_send_cli_reports_success_and_failures(storescp, phantom_dir, tmp_path, capsys):
    port, received = storescp(aet="PEER")
    assert main(["send", str(phantom_dir), "--port", str(port), "--aec", "PEER", "--aet", "TPS"]) == 0
    assert len(list(received.iterdir())) == len(list(phantom_dir.iterdir()))
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    assert main(["send", str(junk), str(phantom_dir / "RP.dcm"), "--port", str(port), "--aec", "PEER"]) == 1
    err = capsys.readouterr().err
    assert "notes.txt" in err and "1 file(s) failed" in err


def test_jobs_cli_lists_no_patient_data(config_dir, node_factory, phantom_dir, capsys):
    node = node_factory()
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    wait_for(lambda: _ready_jobs(node))
    capsys.readouterr()
    assert main(["jobs", "-c", str(config_dir / "mcnode.toml"), "--json"]) == 0
    out = capsys.readouterr().out
    import json

    rows = json.loads(out)
    assert rows[0]["state"] == JobState.READY and set(rows[0]) >= {"id", "state", "reason", "created", "updated"}
    ident = FakeIdentity()
    for secret in (ident.patient_id, "Lindqvist", ident.birth_date, dcmread(phantom_dir / "RP.dcm").StudyInstanceUID):
        assert secret not in out
    assert main(["jobs", "-c", str(config_dir / "mcnode.toml")]) == 0
    assert "READY" in capsys.readouterr().out


def test_serve_stops_cleanly_on_sigterm(config_dir, tmp_path):
    from tests.conftest import free_port

    port = free_port()
    cfg = config_dir / "mcnode.toml"
    cfg.write_text(cfg.read_text().replace("port = 0", f"port = {port}", 1))
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: run_dcmtk("echoscu", "-aet", "TPS", "-aec", "MCNODE", "127.0.0.1", str(port),
                                   timeout=5).returncode == 0, timeout=60)  # start-up on a busy machine
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "node stopped" in out
    assert "Lindqvist" not in out


def test_plan_resent_after_its_job_ended_starts_a_new_job(node_factory, phantom_dir, caplog):
    node = node_factory()
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    first = wait_for(lambda: _ready_jobs(node))[0]
    node.journal.transition(first.id, JobState.REJECTED, reason="ended for this test")
    with caplog.at_level(logging.INFO, logger="dicom_node.intake.journal"):
        assert storescu(node.port, [phantom_dir / "RP.dcm"]).returncode == 0  # the physicist asks again
        second = wait_for(lambda: _ready_jobs(node))[0]
    assert second.id != first.id and second.plan_uid == first.plan_uid
    assert node.journal.job(first.id).state == JobState.REJECTED
    assert f"its plan was sent again after job {first.id} ended" in caplog.text
