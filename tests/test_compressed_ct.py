"""Compressed CT, as a TPS (or Orthanc forwarding as stored) may send it: stored as received,
decoded for the engine, and a job on a JPEG Lossless CT computes to the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from cloud.engines.ct import ct_volume
from dicom_node.intake.jobrecord import JobState
from tests.conftest import run_dcmtk, settings_for, storescu, wait_for


def _compress(src: Path, dst: Path, how: str) -> None:
    if how == "j2k":  # dcmtk has no JPEG 2000 encoder: pydicom's, through pylibjpeg-openjpeg
        ds = dcmread(src)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(dst, enforce_file_format=True)
        return
    tool = {"jpeg": ("dcmcjpeg", "+e1"), "jpegls": ("dcmcjpls",), "rle": ("dcmcrle",)}[how]
    result = run_dcmtk(*tool, str(src), str(dst))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("how", "syntax", "propose"), [
    ("jpeg", JPEGLosslessSV1, "-xs"),
    ("jpegls", JPEGLSLossless, "-xt"),
    ("j2k", JPEG2000Lossless, "-xv"),
    ("rle", RLELossless, "-xr"),
])
def test_lossless_ct_is_stored_as_sent_and_decodes_to_the_same_hu(node_factory, phantom_dir, tmp_path, how,
                                                                   syntax, propose):
    node = node_factory()
    src = phantom_dir / "CT_0005.dcm"
    dst = tmp_path / f"{how}.dcm"
    _compress(src, dst, how)
    assert dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    result = storescu(node.port, [dst], "TPS", "MCNODE", propose)
    assert result.returncode == 0, result.stderr
    inst = wait_for(lambda: node.journal.instance(dcmread(src, stop_before_pixels=True).SOPInstanceUID))
    stored = dcmread(inst.path)
    assert stored.file_meta.TransferSyntaxUID == syntax  # kept as received
    got, _ = ct_volume([stored])
    want, _ = ct_volume([dcmread(src)])
    assert np.array_equal(got, want)


def test_job_on_a_jpeg_lossless_ct_is_computed_and_sent(config_dir, node_factory, phantom_dir, tmp_path, storescp):
    tps_port, tps_dir = storescp(aet="TPS")
    settings = settings_for(config_dir, engine={"primaries": 4000}, cloud={"shards": 2},
                            destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1",
                                           "port": tps_port}])
    node = node_factory(settings, compute=True)
    folder = tmp_path / "jpeg"
    folder.mkdir()
    for path in sorted(phantom_dir.glob("CT_*.dcm")):
        _compress(path, folder / path.name, "jpeg")
    assert storescu(node.port, [phantom_dir / "RP.dcm", phantom_dir / "RS.dcm"]).returncode == 0
    result = storescu(node.port, sorted(folder.iterdir()), "TPS", "MCNODE", "-xs")
    assert result.returncode == 0, result.stderr
    job = wait_for(lambda: node.journal.jobs_in(JobState.SENT, JobState.FAILED, JobState.REJECTED), timeout=180)[0]
    assert job.state == JobState.SENT, job.reason
    (dose,) = [p for p in tps_dir.iterdir() if p.name.startswith("RD")]
    rd = dcmread(dose)
    assert (rd.pixel_array * float(rd.DoseGridScaling)).max() > 0
