"""The photon second check against a real TPS's own dose: Pinnacle 16.0's RT Dose of its photon plan
(tests/data/realdata/pinnacle_photon: two open static 6 MV fields of 10 x 10 cm, gantry 0 and 270, 118 MU
each, 25 fractions; see its README), end to end with real peers.

storescu sends the plan, a CT rebuilt from the RT Dose's outline (the export has neither CT nor structure
set: `tests/realdata.outline_ct`, water inside) and Pinnacle's RT Dose; the node computes the plan with
ompMC (2 shards on the local backend), sends its dose to storescp and compares it with Pinnacle's. Then
Pinnacle's dose, scaled by 8 % and moved by 4 mm, is sent again as a newer TPS dose for the plan, and each
must fail with its reason.

What this can and cannot show. The machine ``ElektaVersa`` is mapped to the *generic* photon model
(uncommissioned: 1 cGy/MU at 1.5 cm depth, 10 x 10 cm, SSD 100 cm by definition; mohan6 spectrum; point
source; no head scatter). Only one plan of this machine exists, so nothing is commissioned on one case and
checked on another: the absolute agreement found here (TPS/MC -2.0 % in the high-dose region) says that
this machine's calibration happens to be what the generic model assumes and that the node's MU, fraction
and beam bookkeeping agree with Pinnacle's, not that the generic model is commissioned. Both fields are
the reference field size, where the missing output factors matter least. What the test pins: the real
TPS dose is matched to its plan's job by UID, read (Pinnacle's implicit-VR RT Dose, 2.5 mm grid, PLAN sum
of 25 fractions), resampled and compared; the dose level (median TPS/MC over the high-dose voxels), the
dose-weighted centres (geometry: gantry, isocentre, HFS axes) and the dose shape (gamma) agree within
bounds measured below; and a TPS dose that is 8 % too high or 4 mm off is told apart from it by the
check's verdict and reason.

Settings that are not the defaults, and why (numbers measured on this case, 400 000 histories, 10 mm grid;
the shards' seeds are fixed, so a run repeats them):

- ``[engine] dose_grid_mm = 10``, ``primaries = 400_000``: ompMC runs about 1 800 histories per second
  per core here; 400 000 histories give a pooled relative SE of 2.0 % on 10 mm voxels (6.7 % on 5 mm at
  200 000), 2.5 minutes of both cores from C-STORE to the verdict. A lower noise costs more minutes than the
  suite has.
- ``[secondcheck] criteria = ["3%/5mm"]``, ``min_pass_rate_percent = 90``, ``max_mc_uncertainty_percent = 3``:
  a 10 mm voxel's MC value is the mean over the voxel, matched in a gradient by the TPS dose within half a
  voxel (5 mm), so the DTA must be at least 5 mm on this grid (see test_secondcheck_commissioned.py for the
  same argument at 4 mm). With 2 % noise per voxel the high-dose voxels fail 3 % on noise alone about
  one time in nine (measured offline with the same settings: 255 of 2 205 voxels above 50 % fail, where the
  median difference is -0.5 %), so the pass rate is noise-limited near 93 % (measured 93.5 % at 3%/5mm,
  4 894 voxels; 87.8 % at 3%/2mm); 90 % keeps a margin of 3 points for other seeds (another seed gave
  93.2 %) and still fails the 8 % scale (measured 76.7 %). The noise limit is 3 % so that 2.04 % reads as
  conclusive; the default 2 % would make this "inconclusive".
- ``max_shift_mm`` stays at its default 2 mm: the unshifted doses' centres lie 0.5 mm apart (measured:
  0.54 mm with Pinnacle's dose averaged over the 10 mm voxels; 0.51 mm at their centres), the 4 mm
  shift reads 3.5 mm (x +3.5 mm; 4.3 mm, x +4.2, at the voxel centres: averaged, the part of the moved
  dose that leaves the body counts as zero in the surface voxels, as an MC scores it).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cloud.engines.base import UNCOMMISSIONED
from dicom_node.intake.jobrecord import JobState
from tests.conftest import settings_for, storescu, wait_for
from tests.realdata import PINNACLE, outline_ct, scaled_dose, shifted_dose

pytestmark = pytest.mark.slow

MACHINE = "ElektaVersa"
HISTORIES = 400_000
GRID_MM = 10.0
CRITERION = "3%/5mm"


def _as_new_instance(ds: Dataset, out: Path) -> Path:
    """An RT Dose saved as a new instance: the TPS sending a newer dose for the plan."""
    ds = copy.deepcopy(ds)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def _numbers(result: dict) -> dict:
    g = result["gamma"][CRITERION]
    return {"verdict": result["verdict"], "uncertainty_percent": result["mc_uncertainty_percent"],
            "gamma": g["pass_rate_percent"], "evaluated": g["evaluated_voxels"],
            "tps_over_mc_percent": result["dose_difference"]["high_dose_ratio_percent"],
            "shift_mm": result["shift"]["magnitude_mm"]}


def test_pinnacle_photon_plan_is_checked_against_pinnacles_own_dose(tmp_path, config_dir, node_factory, storescp):
    t0 = time.perf_counter()
    folder = tmp_path / "study"
    folder.mkdir()
    for f in PINNACLE.glob("R[PD].*.dcm"):
        shutil.copy(f, folder / f.name)
    plan = dcmread(next(folder.glob("RP.*.dcm")))
    rd = dcmread(next(folder.glob("RD.*.dcm")))
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert rd.Manufacturer == plan.Manufacturer == "Philips"
    outline_ct(rd, plan, folder)

    tps_port, tps_dir = storescp(aet="TPS")
    settings = settings_for(
        config_dir,
        engine={"primaries": HISTORIES, "dose_grid": "uniform", "dose_grid_mm": GRID_MM,
                "beam_models": {MACHINE: "generic"}},
        cloud={"shards": 2}, outbox={"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        secondcheck={"criteria": [CRITERION], "report_criteria": ["3%/2mm"], "min_pass_rate_percent": 90.0,
                     "max_mc_uncertainty_percent": 3.0},
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
    assert settings.secondcheck.max_shift_mm == 2.0 and settings.secondcheck.normalisation == "tps_max"
    node = node_factory(settings, compute=True)
    assert storescu(node.port, sorted(folder.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.VERIFIED, JobState.FAILED, JobState.REJECTED),
                   timeout=1800, interval=1.0)[0]
    job = node.journal.job(job.id)
    check = job.data.secondcheck or {}
    print(f"\nC-STORE to {job.state.value} in {time.perf_counter() - t0:.0f} s; {json.dumps(check.get('gamma'))}; "
          f"TPS/MC {check.get('dose_difference', {}).get('high_dose_ratio_percent')} %; shift {check.get('shift')}; "
          f"uncertainty {check.get('mc_uncertainty_percent')} %; reason {job.reason}")
    assert job.state == JobState.VERIFIED, job.reason
    assert job.data.tps_dose_uid == str(rd.SOPInstanceUID)  # Pinnacle's dose, matched to the plan by UID
    # the MC dose the TPS received: the generic model says so in the DICOM itself, on the 10 mm grid
    (sent,) = [dcmread(p) for p in tps_dir.iterdir() if p.name.startswith("RD")]
    assert sent.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert UNCOMMISSIONED in f"{sent.get('SeriesDescription', '')} {sent.get('DoseComment', '')}"
    assert [float(v) for v in sent.PixelSpacing] == [GRID_MM, GRID_MM]
    mc_max = float(sent.pixel_array.max()) * float(sent.DoseGridScaling)

    # the verdict on Pinnacle's own dose, and the numbers behind it
    assert job.data.public.verdict == "pass", job.reason
    assert check["mc_uncertainty_percent"] < 3.0
    gamma = check["gamma"][CRITERION]
    assert gamma["pass_rate_percent"] >= 90.0 and gamma["evaluated_voxels"] > 3_000
    # the dose level: 25 fractions of 2 x 118 MU; a beam left out, a fraction count or a per-fraction /
    # plan mix-up would be tens of percent; measured -1.97 % with Pinnacle's dose averaged over the 10 mm
    # voxels as ompMC scores its dose (-0.64 % with Pinnacle's dose at the voxel centres, which hid part of
    # the generic model's difference: it is lower by 1.0-1.4 % in the shoulders and the build-up peak that
    # a 10 mm voxel averages down); the median's own noise is below 0.1 %
    base = check["dose_difference"]["high_dose_ratio_percent"]
    assert abs(base) < 3.0
    # the normalisation is the TPS maximum inside the body on the MC's voxel centres (measured 48.88 Gy; the
    # RT Dose's own maximum is 49.87 Gy); the MC maximum, on 10 mm voxels (averaging the peak down) with 2 %
    # noise (lifting the highest voxel), lies near the latter: measured 1.007 x
    tps_max = float(rd.pixel_array.max()) * float(rd.DoseGridScaling)
    assert 0.95 * tps_max < check["method"]["normalisation_gy"] <= tps_max
    assert 0.95 < mc_max / tps_max < 1.08
    # geometry: gantry 0 and 270, isocentre (0, 120, 0), HFS axes: the dose-weighted centres agree
    assert check["shift"]["magnitude_mm"] < 1.5
    assert check["method"]["body"].startswith("CT above")  # no structure set: the body is the CT above -500 HU
    numbers = {"pinnacle": _numbers(check)}

    def compare_again(ds: Dataset, name: str) -> tuple[str, dict]:
        path = _as_new_instance(ds, tmp_path / name)
        assert storescu(node.port, [path]).returncode == 0
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        again = wait_for(lambda: node.journal.job(job.id).data.tps_dose_uid == uid and node.journal.job(job.id),
                         timeout=300, interval=0.5)
        print(f"{name}: {again.state.value} {again.data.public.verdict}; {again.reason}")
        assert again.state == JobState.VERIFIED and again.data.public.verdict == "fail", again.reason
        return again.reason or "", again.data.secondcheck

    # Pinnacle's dose 8 % higher: the pass rate and the dose ratio are the reason, no displacement
    why, result = compare_again(scaled_dose(rd, 1.08), "RD_scaled.dcm")
    numbers["scaled_8pct"] = _numbers(result)
    assert f"gamma {CRITERION} pass rate" in why, why
    m = re.search(r"the TPS dose is ([\d.]+) % higher than the MC dose in the high-dose region", why)
    assert m and 5.0 <= float(m.group(1)) <= 10.0, why
    # 8 % on top of the unscaled dose's own level (measured 5.8 % = 1.08 x 0.980)
    scaled = result["dose_difference"]["high_dose_ratio_percent"]
    assert (1.0 + scaled / 100.0) / (1.0 + base / 100.0) == pytest.approx(1.08, abs=0.005)
    assert "> 2 mm" not in why, why

    # Pinnacle's dose 4 mm to the patient's left: the displacement is the reason
    why, result = compare_again(shifted_dose(rd, 4.0), "RD_shifted.dcm")
    numbers["shifted_4mm"] = _numbers(result)
    m = re.search(r"the TPS dose is displaced from the MC dose by ([\d.]+) mm \(x ([+-][\d.]+),", why)
    assert m and float(m.group(1)) > 2.0 and 3.0 < float(m.group(2)) < 5.5, why
    assert abs(result["shift"]["x_mm"] - check["shift"]["x_mm"] - 4.0) < 1.0  # relative to the unshifted check
    print(json.dumps({**numbers, "test_wall_s": round(time.perf_counter() - t0, 1)}))
