"""End to end on a real plan with a commissioned beam model: the second check reaches VERIFIED pass,
and RayStation's dose shifted by 3 mm or scaled by 4 % fails with the reason.

The machine TR3 is commissioned here (`mcnode commission`, 50 000 primaries, seconds) on one
RayStation 12 plan ("reference", Cube101010). The node then receives a *different* plan of the same
machine ("ramp_10cm", 24 layers) from storescu as the TPS, with its structure set, RayStation's own RT
Dose and the phantom CT rebuilt from the External contour (tests/realdata.py; the export has no CT).
It computes the plan with MCsquare in waves of shards until its target uncertainty is met, sends the
MC dose to the TPS (storescp), compares it with RayStation's: VERIFIED, verdict pass. RayStation's
dose shifted 3 mm across the beam, then scaled by 4 %, each sent as a newer TPS dose for the plan, is
compared again with the same MC dose: VERIFIED, verdict fail, the reason naming the displacement
or the dose ratio.

Settings that are not the defaults, and why:

- ``[engine] dose_grid_mm = 4`` (default 2.5). On this plan the MC's per-voxel noise falls roughly
  with the voxel's cross-section *across* the beam, not with its volume (a proton crosses a voxel
  along the beam depositing nearly the same energy; what varies is how many cross it). Measured at
  400 000 primaries (2 shards): pooled relative SE 9.45 % on 2.5 mm cubes, 7.46 % on the CT's
  2 x 2 x 5 mm voxels, 5.62 % on 4 mm cubes; the same uncertainty therefore costs 2.8 times the
  primaries on 2.5 mm as on 4 mm (about 11 M instead of 4 M for 1.8 %: many minutes of both cores,
  too much for the suite). Gamma at 3%/2mm still means what it says on 4 mm: the MC dose is the
  reference, sampled at the 4 mm voxel centres; the TPS dose is the searched one, on its own 2 mm
  grid, interpolated continuously (`dicom_node.qa.gamma`). A 4 mm voxel's MC value is the mean dose
  over the voxel, which in a gradient along one axis equals the dose at some point within 2 mm of the
  centre (mean value theorem): the voxel averaging alone never needs more than the 2 mm DTA to be
  matched. On cubes larger than twice the DTA it could use up more than the DTA; 4 mm is the
  coarsest grid for which it cannot. A 3 mm displacement still fails (this test).
- ``[engine] target_uncertainty_percent = 1.8`` (default 0, no waves). The node runs waves until the
  pooled relative SE is at most min(1.8, ``[secondcheck] max_mc_uncertainty_percent``, left at its
  default 2). 1.8 rather than 2 so that the MC's own noise alone leaves the 3%/2mm pass rate a
  margin above 95 %: on this plan and grid against RayStation's dose, 2.55 % (2 M primaries) gave
  94.3 %, 1.82 % (4 M) gave 98.2 %.
- The dose-weighted centres (the displacement the check reports) are compared on the MC's 4 mm voxels,
  with RayStation's 2 mm dose averaged over each of them as the MC scores it (`box_average`: no dose
  outside the External or in the CT's air). Taken at the voxel centres instead, the unshifted dose
  read 1.0 mm off along the beam (y) in every run (BENCHMARKS.md), half the 2 mm limit; averaged,
  0.17 mm (2026-11-25). The pass case's displacement is held under 0.5 mm.
- The phantom CT keeps its 2 mm pixels: MCsquare's time does not depend on them (measured: the same
  CPU seconds on 4 mm pixels), and the body's edge stays within 1 mm.
- The second-check policy is the default one (3%/2mm >= 95 %, 2%/2mm reported, 10 % threshold,
  normalised to the TPS maximum, displacement limit 2 mm, MC uncertainty limit 2 %).
"""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from cloud.engines.base import UNCOMMISSIONED
from dicom_node.cli import main
from dicom_node.intake.jobrecord import JobState
from dicom_node.jobs.rtdose import UNCERTAINTY_ABOVE_TARGET
from tests.conftest import settings_for, storescu, wait_for
from tests.realdata import PHANTOM_SCANNER, phantom_calibration, reference_folder, scaled_dose, shifted_dose

pytestmark = pytest.mark.slow

COMMISSION_PRIMARIES = 50_000
GRID_MM = 4.0
TARGET_PERCENT = 1.8
FIRST_WAVE = 1_000_000  # about 3.6 % on this grid; the next wave is sized by 1/sqrt(N) to the target
MAX_PRIMARIES = 10_000_000  # about 4.5 M are needed; beyond this the dose is marked and the check inconclusive


def _as_new_instance(ds, out: Path) -> Path:
    """An RT Dose saved as a new instance (new SOP Instance UID): the TPS sending a newer dose for the plan."""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def _numbers(result: dict) -> dict:
    g = result["gamma"]
    return {"verdict": result["verdict"], "uncertainty_percent": result["mc_uncertainty_percent"],
            "gamma_3_2": g["3%/2mm"]["pass_rate_percent"], "gamma_2_2": g["2%/2mm"]["pass_rate_percent"],
            "evaluated": g["3%/2mm"]["evaluated_voxels"],
            "tps_over_mc_percent": result["dose_difference"]["high_dose_ratio_percent"],
            "shift_mm": result["shift"], "check_s": result["seconds"]["total"], "check_cpu_s": result["seconds"]["cpu"]}


def test_real_plan_with_a_commissioned_model_is_verified_pass_and_a_wrong_tps_dose_fails(
        tmp_path, config_dir, node_factory, storescp):
    t0 = time.perf_counter()
    fit_on = reference_folder("reference", tmp_path / "fit")
    plan_dir = reference_folder("ramp_10cm", tmp_path / "plan")
    density, material = phantom_calibration(tmp_path)
    scanner = "/".join(PHANTOM_SCANNER)
    config = tmp_path / "commission.toml"
    config.write_text(f'[engine]\nct_calibrations = {{"{scanner}" = ["{density}", "{material}"]}}\n')
    bdl = tmp_path / "tr3.txt"
    assert main(["commission", "--reference", str(fit_on), "-o", str(bdl), "--primaries",
                 str(COMMISSION_PRIMARIES), "-c", str(config)]) == 0
    commissioned_s = time.perf_counter() - t0

    tps_port, tps_dir = storescp(aet="TPS")
    settings = settings_for(
        config_dir, engine={"primaries": FIRST_WAVE, "target_uncertainty_percent": TARGET_PERCENT,
                            "max_primaries": MAX_PRIMARIES, "beam_models": {"TR3": str(bdl)},
                            "ct_calibrations": {scanner: [str(density), str(material)]},
                            "dose_grid": "uniform", "dose_grid_mm": GRID_MM},
        cloud={"shards": 2}, outbox={"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
    assert settings.secondcheck.max_mc_uncertainty_percent == 2.0  # the policy's default, not loosened
    node = node_factory(settings, compute=True)
    files = sorted(plan_dir.glob("*.dcm"))
    assert sum(f.name.startswith("RD") for f in files) == 1 and sum(f.name.startswith("CT") for f in files) > 50
    assert storescu(node.port, files).returncode == 0
    t_sent = time.perf_counter()
    job = wait_for(lambda: node.journal.jobs_in(JobState.VERIFIED, JobState.FAILED, JobState.REJECTED),
                   timeout=3000, interval=1.0)[0]
    verified_s = time.perf_counter() - t_sent
    job = node.journal.job(job.id)
    check = job.data.secondcheck or {}
    public = job.data.public
    print(f"\ncommissioned in {commissioned_s:.1f} s; C-STORE to {job.state.value} in {verified_s:.1f} s; "
          f"waves {[(w['primaries'], w['uncertainty_percent']) for w in public.waves or []]}; "
          f"primaries {public.primaries}; uncertainty {check.get('mc_uncertainty_percent')} %; "
          f"gamma {public.gamma_pass_rates}; "
          f"TPS/MC {check.get('dose_difference', {}).get('high_dose_ratio_percent')} %; "
          f"shift {check.get('shift')}; check seconds {check.get('seconds')}; reason {job.reason}")
    assert job.state == JobState.VERIFIED, job.reason
    assert public.verdict == "pass", job.reason
    # the node ran waves to its target; the uncertainty it reached is what the check judged
    assert public.waves and len(public.waves) >= 2 and public.uncertainty_target_met is True
    assert check["mc_uncertainty_percent"] <= TARGET_PERCENT
    assert check["mc_uncertainty_percent"] == pytest.approx(public.waves[-1]["uncertainty_percent"], abs=1e-3)
    assert check["gamma"]["3%/2mm"]["pass_rate_percent"] >= 95.0
    assert check["gamma"]["3%/2mm"]["evaluated_voxels"] > 10_000
    assert abs(check["dose_difference"]["high_dose_ratio_percent"]) < 1.5  # the commissioning holds
    assert check["shift"]["magnitude_mm"] < 0.5  # the same dose: no displacement (was 1.0 mm, see above)
    assert check["method"]["body"] == "ROI 'External' (type EXTERNAL)"
    # the MC dose the TPS received: commissioned model, target met, on the 4 mm grid
    sent = [dcmread(p) for p in tps_dir.iterdir() if p.name.startswith("RD")]
    assert len(sent) == 1
    marks = f"{sent[0].get('SeriesDescription', '')} {sent[0].get('DoseComment', '')}"
    assert UNCOMMISSIONED not in marks and UNCERTAINTY_ABOVE_TARGET not in marks, marks
    assert [float(v) for v in sent[0].PixelSpacing] == [GRID_MM, GRID_MM]
    assert np.allclose(np.diff([float(v) for v in sent[0].GridFrameOffsetVector]), GRID_MM)
    assert Path(job.data.report.pdf).stat().st_size > 10_000

    rd = dcmread(next(plan_dir.glob("RD*.dcm")))

    def compare_again(path: Path):
        assert storescu(node.port, [path]).returncode == 0
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        again = wait_for(lambda: node.journal.job(job.id).data.tps_dose_uid == uid and node.journal.job(job.id),
                         timeout=600, interval=0.5)
        result = again.data.secondcheck
        print(f"{path.name}: {again.state.value} {again.data.public.verdict}; "
              f"gamma {again.data.public.gamma_pass_rates}; check seconds {result['seconds']}; reason {again.reason}")
        assert again.state == JobState.VERIFIED and again.data.public.verdict == "fail", again.reason
        return again.reason or "", result

    # RayStation's dose 3 mm to the patient's left (across the beam): the displacement is the reason
    why, result = compare_again(_as_new_instance(shifted_dose(rd, 3.0), tmp_path / "RD_shifted.dcm"))
    numbers = {"shifted_3mm": _numbers(result)}
    m = re.search(r"the TPS dose is displaced from the MC dose by ([\d.]+) mm \(x ([+-][\d.]+), y [+-][\d.]+, "
                  r"z [+-][\d.]+ mm; dose-weighted centres inside the body\) > 2 mm", why)
    assert m and float(m.group(1)) > 2.0 and 2.5 < float(m.group(2)) < 3.5, why
    assert 2.5 < result["shift"]["x_mm"] < 3.5
    assert abs(result["shift"]["x_mm"] - check["shift"]["x_mm"] - 3.0) < 0.5  # relative to the unshifted check

    # RayStation's dose 4 % higher: the gamma pass rate and the dose ratio are the reason, no displacement
    why, result = compare_again(_as_new_instance(scaled_dose(rd, 1.04), tmp_path / "RD_scaled.dcm"))
    numbers["scaled_4pct"] = _numbers(result)
    assert "3%/2mm pass rate" in why, why
    m = re.search(r"the TPS dose is ([\d.]+) % higher than the MC dose in the high-dose region", why)
    assert m and 3.0 <= float(m.group(1)) <= 5.0, why
    # the centres do not move with the scale: the displacement is no reason to fail
    assert result["shift"]["magnitude_mm"] < 0.5 and "> 2 mm" not in why, why
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    # one JSON line last, as the benches print (BENCHMARKS.md, "Second check (issue 12)")
    print(json.dumps({"commission_s": round(commissioned_s, 1), "cstore_to_verified_s": round(verified_s, 1),
                      "waves": [[w["primaries"], w["uncertainty_percent"]] for w in public.waves],
                      "primaries": public.primaries, "grid_mm": GRID_MM, "pass": _numbers(check), **numbers,
                      "test_wall_s": round(time.perf_counter() - t0, 1),
                      "test_cpu_s": round(cpu, 1)}))  # this process and its ended children
