"""Real Eclipse (ARIA 16.1) RT Ion Plans through a running node (tests/data/realdata/eclipse_ion_plans,
see its README): a 4-field QA plan (80-210 MeV) and a 24-layer SOBP, both on machine "TR3".

The export has plans only. Unmapped, TR3 is REJECTED on arrival naming the machine; mapped to the
generic model the plan is accepted with the UNCOMMISSIONED warning. The SOBP is then computed on a
water box CT built for its frame of reference (the referenced structure set is not part of the
export, so the node assembles by frame of reference) and its RT Dose must say UNCOMMISSIONED, put
the distal edge where the highest layer's range in water is, and be flat where Eclipse made it flat:
Eclipse's own spot metersets, read by our plan reader, are what shapes that plateau.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.intake.jobrecord import JobState
from tests.conftest import settings_for, storescu, wait_for
from tests.realdata import write_ct_slice

ECLIPSE = Path(__file__).parent / "data" / "realdata" / "eclipse_ion_plans"
QA_PLAN = ECLIPSE / "RN.1.2.246.352.71.5.361940808526.37240.20200311150225.dcm"
SOBP_PLAN = ECLIPSE / "RN.1.2.246.352.71.5.37402163639.162240.20220929101251.dcm"

# The water box: x and z +-99 mm, y (the beam's depth at gantry 0) from -150 mm; 3 mm voxels.
SPACING_MM = 3.0
HALF_X_MM, Y0_MM, DEPTH_MM = 99.0, -150.0, 300.0  # Y0_MM: centre of the first water voxel
SURFACE_MM = Y0_MM - SPACING_MM / 2


def pstar_csda_mm(energy_mev: float) -> float:
    """NIST PSTAR CSDA range in water, log-log between its 150 MeV (15.77) and 200 MeV (25.96 g/cm2)."""
    assert 150.0 <= energy_mev <= 200.0
    exponent = np.log(25.96 / 15.77) / np.log(200.0 / 150.0)
    return float(157.7 * (energy_mev / 150.0) ** exponent)


def water_box_ct(plan: Dataset, out: Path) -> list[Path]:
    """CT slices of a water box in the plan's frame of reference, patient and study (HU 0 = water)."""
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    n_xy = int(round(2 * HALF_X_MM / SPACING_MM)) + 1
    n_y = int(round(DEPTH_MM / SPACING_MM))
    hu = np.full((n_y + 4, n_xy), -1000, dtype=np.int16)  # two rows of air before and after the water
    hu[2:-2, :] = 0
    paths = []
    for k, z in enumerate(np.arange(-HALF_X_MM, HALF_X_MM + 1e-6, SPACING_MM), start=1):
        paths.append(write_ct_slice(out / f"CT_{k:04d}.dcm", hu, like=plan, uid=generate_uid(), series=series,
                                    frame_of_reference=str(plan.FrameOfReferenceUID), number=k,
                                    position=(-HALF_X_MM, Y0_MM - 2 * SPACING_MM, float(z)), spacing_mm=SPACING_MM,
                                    thickness_mm=SPACING_MM))
    return paths


@pytest.mark.parametrize("plan_file", [QA_PLAN, SOBP_PLAN], ids=["qa_4_fields", "sobp"])
def test_eclipse_plan_on_an_unmapped_machine_is_rejected_and_accepted_once_mapped(plan_file, config_dir,
                                                                                  node_factory):
    node = node_factory()  # the test config maps no machine named TR3
    assert storescu(node.port, [plan_file]).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.REJECTED), timeout=10)[0]
    assert "treatment machine 'TR3' has no beam model" in job.reason
    node.stop()

    mapped = node_factory(settings_for(config_dir, node={"data_dir": str(config_dir / "mapped")},
                                       engine={"beam_models": {"TR3": "generic"}}))
    assert storescu(mapped.port, [plan_file]).returncode == 0
    job = wait_for(lambda: [j for j in mapped.journal.jobs_in(JobState.RECEIVING) if j.data.public.warnings],
                   timeout=10)[0]
    assert any("UNCOMMISSIONED BEAM MODEL" in w for w in job.data.public.warnings or [])
    assert not mapped.journal.jobs_in(JobState.REJECTED)


@pytest.mark.slow
def test_eclipse_sobp_computed_through_the_node(config_dir, node_factory, storescp, tmp_path):
    plan = dcmread(SOBP_PLAN)
    cts = water_box_ct(plan, tmp_path / "ct")
    tps_port, tps_dir = storescp(aet="TPS")
    settings = settings_for(
        config_dir, engine={"beam_models": {"TR3": "generic"}, "primaries": 60_000},
        cloud={"shards": 2}, trigger={"stable_seconds": 1},
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
    node = node_factory(settings, compute=True)
    assert storescu(node.port, [*cts, SOBP_PLAN]).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.SENT), timeout=600)[0]
    assert "frame of reference" in (job.data.public.assembly or "")  # the referenced RS is not in the export
    (rd_path,) = wait_for(lambda: sorted(tps_dir.glob("RD*")))
    rd = dcmread(rd_path)
    assert "UNCOMMISSIONED BEAM MODEL - NOT FOR CLINICAL USE" in rd.SeriesDescription
    assert "UNCOMMISSIONED" in rd.DoseComment
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert rd.PatientID == plan.PatientID

    dose = rd.pixel_array.astype(np.float64) * float(rd.DoseGridScaling)  # (z, y, x)
    dy = float(rd.PixelSpacing[0])
    ys = float(rd.ImagePositionPatient[1]) + dy * np.arange(int(rd.Rows))
    xs = float(rd.ImagePositionPatient[0]) + float(rd.PixelSpacing[1]) * np.arange(int(rd.Columns))
    zs = float(rd.ImagePositionPatient[2]) + np.asarray([float(v) for v in rd.GridFrameOffsetVector])
    core = (np.abs(zs) <= 30)[:, None] & (np.abs(xs) <= 30)[None, :]  # inside the 114 mm field
    depth_dose = dose.transpose(1, 0, 2)[:, core].mean(axis=1)
    depth_mm = ys - SURFACE_MM
    top = depth_dose.max()
    i_max = int(np.argmax(depth_dose))
    distal = next(i for i in range(i_max, len(ys) - 1) if depth_dose[i + 1] < 0.8 * top <= depth_dose[i])
    r80_mm = depth_mm[distal] + (depth_dose[distal] - 0.8 * top) / (depth_dose[distal] - depth_dose[distal + 1]) * dy
    energies = [float(cp.NominalBeamEnergy) for cp in plan.IonBeamSequence[0].IonControlPointSequence
                if "NominalBeamEnergy" in cp]
    expected_mm = pstar_csda_mm(max(energies))
    low_mm = expected_mm * (min(energies) / max(energies)) ** 1.77  # Bragg-Kleeman: where the plateau starts
    plateau = depth_dose[(depth_mm >= low_mm + 5) & (depth_mm <= expected_mm - 10)]
    flatness = (plateau.max() - plateau.min()) / plateau.mean()
    # "SOBP_cent_2Gy": the generic model's absolute dose is tens of times Eclipse's (vendor MU
    # conventions), which is why it is marked UNCOMMISSIONED; the shape is what is checked here.
    print(f"R80 {r80_mm:.1f} mm (PSTAR CSDA range of {max(energies):.1f} MeV: {expected_mm:.1f} mm), plateau "
          f"{low_mm + 5:.0f}-{expected_mm - 10:.0f} mm: {plateau.mean():.3g} Gy, max-min {100 * flatness:.1f} %")
    assert abs(r80_mm - expected_mm) < 0.02 * expected_mm
    assert flatness < 0.10
    assert depth_dose[depth_mm > expected_mm + 15].max() < 0.05 * top  # nothing beyond the range
