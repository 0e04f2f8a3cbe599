"""End to end on a real plan with a commissioned beam model: the second check reaches VERIFIED pass.

The machine TR3 is commissioned (`mcnode commission`) on one RayStation plan ("reference",
Cube101010); the node then receives a *different* plan of the same machine ("ramp_10cm", a dose
ramp) with its phantom CT, structure set and RayStation's own RT Dose from storescu as the TPS,
computes it with MCsquare to the second check's uncertainty, sends the MC dose back and compares:
VERIFIED with verdict pass. RayStation's dose shifted by 3 mm, sent as a newer TPS dose, then
fails with the displacement named.
"""

from __future__ import annotations

import copy

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.cli import main
from dicom_node.intake.jobrecord import JobState
from tests.conftest import settings_for, storescu, wait_for
from tests.realdata import PHANTOM_SCANNER, phantom_calibration, reference_folder

pytestmark = pytest.mark.slow

COMMISSION_PRIMARIES = 50_000
# Waves of shards until the pooled relative SE reaches the target: at 4 M primaries on the CT grid it was
# 2.3 % and 3%/2mm passed 94.98 % (noise in the high-dose slab); the second check itself caps the
# target at its max_mc_uncertainty_percent (2 %), the test asks for 1.5 %.
FIRST_WAVE = 1_000_000
TARGET_PERCENT = 1.5
MAX_PRIMARIES = 16_000_000


def test_real_plan_with_a_commissioned_model_is_verified_pass(tmp_path, config_dir, node_factory, storescp):
    fit_on = reference_folder("reference", tmp_path / "fit")
    plan_dir = reference_folder("ramp_10cm", tmp_path / "plan")
    density, material = phantom_calibration(tmp_path)
    scanner = "/".join(PHANTOM_SCANNER)
    config = tmp_path / "commission.toml"
    config.write_text(f'[engine]\nct_calibrations = {{"{scanner}" = ["{density}", "{material}"]}}\n')
    bdl = tmp_path / "tr3.txt"
    assert main(["commission", "--reference", str(fit_on), "-o", str(bdl), "--primaries",
                 str(COMMISSION_PRIMARIES), "-c", str(config)]) == 0

    tps_port, _tps_dir = storescp(aet="TPS")
    settings = settings_for(
        config_dir, engine={"primaries": FIRST_WAVE, "target_uncertainty_percent": TARGET_PERCENT,
                            "max_primaries": MAX_PRIMARIES, "beam_models": {"TR3": str(bdl)},
                            "ct_calibrations": {scanner: [str(density), str(material)]}},
        cloud={"shards": 4}, outbox={"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
    node = node_factory(settings, compute=True)
    assert storescu(node.port, sorted(plan_dir.glob("*.dcm"))).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.VERIFIED, JobState.FAILED, JobState.REJECTED),
                   timeout=3000)[0]
    job = node.journal.job(job.id)
    check = job.data.secondcheck or {}
    print("commissioned:", job.state, job.reason, check.get("mc_uncertainty_percent"), job.data.public.gamma_pass_rates,
          check.get("shift"), check.get("dose_difference", {}).get("high_dose_ratio_percent"),
          check.get("seconds"))
    assert job.state == JobState.VERIFIED, job.reason
    assert job.data.public.verdict == "pass", job.reason
    assert check["mc_uncertainty_percent"] <= TARGET_PERCENT
    assert check["gamma"]["3%/2mm"]["pass_rate_percent"] >= 95.0
    assert abs(check["dose_difference"]["high_dose_ratio_percent"]) < 3.0

    # RayStation's dose 3 mm to the side, as a newer TPS dose: compared again, fails naming the shift
    shifted = copy.deepcopy(dcmread(next(plan_dir.glob("RD*.dcm"))))
    shifted.SOPInstanceUID = shifted.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    x, y, z = (float(v) for v in shifted.ImagePositionPatient)
    shifted.ImagePositionPatient = [x + 3.0, y, z]
    shifted.save_as(tmp_path / "RD_shifted.dcm", enforce_file_format=True)
    assert storescu(node.port, [tmp_path / "RD_shifted.dcm"]).returncode == 0
    again = wait_for(lambda: node.journal.job(job.id).data.tps_dose_uid == shifted.SOPInstanceUID
                     and node.journal.job(job.id), timeout=300)
    assert again.state == JobState.VERIFIED and again.data.public.verdict == "fail"
    assert "displaced from the MC dose by" in (again.reason or ""), again.reason
