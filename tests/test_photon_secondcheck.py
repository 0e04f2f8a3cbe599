"""The second check of a photon plan, end to end with real peers, on a real TPS export: RayStation 9.2's
photon RT Plan and structure set (tests/data/realdata/raystation_photon), on a CT rebuilt from its
External contour (tests/realdata.py). storescu sends plan, structure set and CT; the node computes the
photon dose (ompMC shards on the local backend, uniform dose grid, body mask) and sends it to storescp;
later the "TPS" sends its RT Dose for the plan and the job reaches a verdict.

This export has no TPS RT Dose, so the TPS dose here is the node's own MC dose sent back as the TPS's
(the check against a real TPS's own photon dose is tests/test_photon_secondcheck_pinnacle.py): scaled by
1.2 the check must fail naming the scale, unchanged it must pass with 100 %. That pins the photon path
through the check (plan/dose matching by UID, the dose grid, resampling, gamma, the verdict), not the
engine's accuracy against a TPS.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.intake.jobrecord import JobState
from tests.conftest import SMALL, settings_for, storescu, wait_for
from tests.realdata import phantom_ct

pytestmark = pytest.mark.slow

PHOTON = Path(__file__).parent / "data" / "realdata" / "raystation_photon"
MACHINE = "CLINACIX_V9"


def test_photon_plan_second_check_fails_on_a_scaled_tps_dose_and_passes_on_the_same(config_dir, node_factory,
                                                                                     storescp, tmp_path):
    tps_port, tps_dir = storescp(aet="TPS")
    settings = settings_for(
        config_dir,
        # an open 20 x 30 cm field: 2400 beamlets of 5 mm, so at least 4801 histories a shard (photon.min_histories)
        engine={"primaries": 12_000, "dose_grid_mm": 10.0,
                "beam_models": {SMALL.machine_name: "generic", MACHINE: "generic"}},
        cloud={"shards": 2}, outbox={"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        # the "TPS" dose is the MC dose itself: its noise cancels, so the noise limit is not what is tested
        secondcheck={"report_criteria": [], "max_mc_uncertainty_percent": 1000.0},
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
    node = node_factory(settings, compute=True)
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("RP_photon.dcm", "RS_photon.dcm"):
        shutil.copy(PHOTON / name, folder / name)
    plan, rs = dcmread(folder / "RP_photon.dcm"), dcmread(folder / "RS_photon.dcm")
    phantom_ct(rs, plan, folder, spacing_mm=4.0)
    assert storescu(node.port, sorted(folder.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.SENT), timeout=600)[0]
    (mc_file,) = wait_for(lambda: [p for p in tps_dir.iterdir() if p.name.startswith("RD")])
    mc = dcmread(mc_file)
    assert mc.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert [float(v) for v in mc.PixelSpacing] == [10.0, 10.0]
    public = node.journal.job(job.id).data.public
    assert public.dose_grid is not None and public.dose_grid["body"] == "structure 'External'"
    dose = mc.pixel_array.astype(np.float64) * float(mc.DoseGridScaling)
    assert dose.max() > 0

    def send_as_tps(scale: float, name: str) -> str:
        tps = dcmread(mc_file)
        tps.SOPInstanceUID = tps.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        tps.SeriesInstanceUID = generate_uid()
        tps.Manufacturer = "RaySearch Laboratories"
        tps.DoseGridScaling = float(tps.DoseGridScaling) * scale
        tps.save_as(tmp_path / name, enforce_file_format=True)
        assert storescu(node.port, [tmp_path / name]).returncode == 0
        return str(tps.SOPInstanceUID)

    # 1. a TPS dose 20 % above the MC dose everywhere (far above the noise of 12 000 histories): fail, and
    # the reason says it is a scale
    uid = send_as_tps(1.2, "RD_scaled.dcm")
    wait_for(lambda: node.journal.job(job.id).data.tps_dose_uid == uid, timeout=180)
    scaled = node.journal.job(job.id)
    assert scaled.state == JobState.VERIFIED and scaled.data.public.verdict == "fail"
    reasons = " ".join((scaled.data.secondcheck or {}).get("reasons", []))
    assert "the TPS dose is 20.0 % higher than the MC dose" in reasons, reasons

    # 2. the same dose: pass, every voxel
    uid = send_as_tps(1.0, "RD_same.dcm")
    wait_for(lambda: node.journal.job(job.id).data.tps_dose_uid == uid, timeout=180)
    same = node.journal.job(job.id)
    assert same.state == JobState.VERIFIED and same.data.public.verdict == "pass"
    assert same.data.public.gamma_pass_rates == {"3%/2mm": 100.0}
