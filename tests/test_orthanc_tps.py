"""Orthanc as the TPS: it holds a study, forwards it to the node, and gets the RT Dose back.

A real Orthanc (Debian's package) stores the phantom study with its CT JPEG-Lossless-compressed (by
dcmtk's dcmcjpeg), sends it to the node through its REST API (`POST /modalities/mcnode/store`), and
receives the node's RT Dose on its DICOM port. Orthanc binds every interface, so Orthanc, the node
and this test's REST calls all run in a network namespace that has only loopback
(tests.peers.loopback_network). The node runs the real pipeline with few primaries.
"""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLosslessSV1

from dicom_node.intake.jobrecord import JobState
from tests.conftest import free_port, run_dcmtk, settings_for, wait_for
from tests.peers import loopback_network, orthanc

pytestmark = pytest.mark.slow


def test_orthanc_forwards_a_compressed_study_and_gets_the_dose_in_that_study(config_dir, node_factory,
                                                                              phantom_dir, tmp_path):
    plan = dcmread(phantom_dir / "RP.dcm")
    jpeg = tmp_path / "jpeg"
    jpeg.mkdir()
    for ct in sorted(phantom_dir.glob("CT_*.dcm")):
        done = run_dcmtk("dcmcjpeg", str(ct), str(jpeg / ct.name))  # JPEG Lossless, first-order prediction
        assert done.returncode == 0, done.stderr
    uploads = [*sorted(jpeg.iterdir()), phantom_dir / "RS.dcm", phantom_dir / "RP.dcm"]

    with loopback_network():
        node_port = free_port()
        with orthanc(tmp_path / "orthanc", modalities={"mcnode": ["MCNODE", "127.0.0.1", node_port]}) as tps:
            settings = settings_for(
                config_dir, node={"port": node_port, "allowed_callers": ["ORTHANC"]},
                engine={"primaries": 20_000}, cloud={"shards": 2},
                destinations=[{"calling_ae_title": "ORTHANC", "ae_title": tps.aet, "host": "127.0.0.1",
                               "port": tps.dicom_port}])
            node = node_factory(settings, compute=True)
            for path in uploads:
                assert tps.post("/instances", path.read_bytes(), "application/dicom")["Status"] == "Success"
            (study,) = tps.get("/studies")
            syntaxes = {tps.text(f"/instances/{i['ID']}/metadata/TransferSyntax") for i in
                        tps.get(f"/studies/{study}/instances")}
            assert str(JPEGLosslessSV1) in syntaxes  # Orthanc holds the CT compressed

            tps.post("/modalities/mcnode/store", {"Resources": [study], "Synchronous": True})
            job = wait_for(lambda: node.journal.jobs_in(JobState.SENT, JobState.FAILED, JobState.REJECTED),
                           timeout=120)[0]
            assert job.state == JobState.SENT, job.reason
            assert [s for s, _r, _t in node.journal.history(job.id)] == \
                ["RECEIVING", "READY", "SEALED", "RUNNING", "MERGED", "SENT"]
            received = {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in job.data.ct}
            assert received == {str(JPEGLosslessSV1)}  # Orthanc sent it as stored, and the node computed on it

            doses = [i for i in tps.get(f"/studies/{study}/instances")
                     if tps.get(f"/instances/{i['ID']}/simplified-tags")["Modality"] == "RTDOSE"]
            assert len(doses) == 1  # in the same study: Orthanc filed it under the plan's study
            tags = tps.get(f"/instances/{doses[0]['ID']}/simplified-tags")
            assert tags["ReferencedRTPlanSequence"][0]["ReferencedSOPInstanceUID"] == plan.SOPInstanceUID
            assert tags["StudyInstanceUID"] == plan.StudyInstanceUID
            assert tags["PatientID"] == plan.PatientID
            assert tps.text(f"/instances/{doses[0]['ID']}/metadata/RemoteAET") == "MCNODE"
            assert len(tps.get("/studies")) == 1
