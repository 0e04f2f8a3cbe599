"""Photon RT Plans on the ompmc engine: what is read from the plan, what is refused (naming the
element), the beam geometry (IEC 61217, HFS), and (slow) doses through the offline compute path:
the entrance side of a lateral beam, and the absolute dose of the beam model's own reference field.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from pydicom import dcmread

from cloud.engines import engine_name_for, get_engine
from cloud.engines.ompmc.photon import beam_axes, beam_fluence, read_photon_model
from cloud.engines.ompmc.photonplan import PhotonBeam, Segment, open_fraction, read_photon_plan
from cloud.errors import UnsupportedPlan
from dicom_node.phantom import write_study
from tests.photon_plans import MACHINE, photon_plan, water_study
from tests.test_photon_arrival import PHOTON_PLAN

GENERIC = {MACHINE: "generic"}
ENGINE = get_engine("ompmc")


@pytest.fixture(scope="module")
def study():
    return water_study()


def _beam(**kw: float) -> PhotonBeam:
    base = PhotonBeam(name="b", machine="m", energy_mv=6.0, sad_mm=1000.0, gantry=0.0, collimator=0.0, couch=0.0,
                      isocenter=(0.0, 0.0, 0.0), segments=(Segment(1.0, (-50.0, 50.0), (-50.0, 50.0)),))
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("gantry, couch, collimator, source, x_axis", [
    (0, 0, 0, (0, -1, 0), (1, 0, 0)),     # gantry 0: from anterior (-y), jaws X along the patient's left
    (90, 0, 0, (1, 0, 0), (0, 1, 0)),     # gantry 90: from the patient's left (+x)
    (270, 0, 0, (-1, 0, 0), (0, -1, 0)),  # gantry 270: from the right
    (90, 90, 0, (0, 0, -1), (0, 1, 0)),   # couch 90 (counter-clockwise from above) + gantry 90: from inferior
    (0, 0, 90, (0, -1, 0), (0, 0, 1)),    # collimator 90: X jaws along superior
])
def test_beam_axes_follow_iec_61217_for_hfs(gantry, couch, collimator, source, x_axis):
    to_source, xc, yc = beam_axes(_beam(gantry=gantry, couch=couch, collimator=collimator))
    assert np.allclose(to_source, source, atol=1e-9) and np.allclose(xc, x_axis, atol=1e-9)
    assert np.allclose(np.cross(xc, yc), to_source, atol=1e-9)  # right-handed, Z towards the source


def test_open_fraction_jaws_and_leaves():
    xs = ys = np.arange(-47.5, 50.0, 5.0)  # 20 beamlets of 5 mm
    jaws = Segment(1.0, (-12.5, 50.0), (-50.0, 50.0))
    f = open_fraction(jaws, xs, ys, 5.0)
    assert f[xs.tolist().index(-12.5), 0] == pytest.approx(0.5) and f[0, 0] == 0.0 and f[-1, -1] == 1.0
    # MLCX: 10 mm leaves; the pair covering y in [0, 10) closed (both at 0), all others open
    boundaries = np.arange(-50.0, 51.0, 10.0)
    leaves = np.array([[-50.0, 50.0]] * 10)
    leaves[5] = [0.0, 0.0]
    f = open_fraction(Segment(1.0, (-50.0, 50.0), (-50.0, 50.0), leaves, "X", boundaries), xs, ys, 5.0)
    closed = (ys > 0) & (ys < 10)
    assert np.all(f[:, closed] == 0.0) and np.all(f[:, ~closed] == 1.0)


def test_step_and_shoot_segments_and_mu(study):
    left = [-50.0] * 40 + [0.0] * 40   # only x < 0 open
    right = [0.0] * 40 + [50.0] * 40   # only x > 0 open
    plan = read_photon_plan(photon_plan(study, segments=((30.0, (-50, 50), (-50, 50), left),
                                                          (70.0, (-50, 50), (-50, 50), right)), fractions=5))
    (beam,) = plan.beams
    assert plan.fractions == 5 and [s.mu for s in beam.segments] == pytest.approx([30.0, 70.0])
    xs, ys, w = beam_fluence(beam, 5.0)
    assert np.allclose(w[xs < 0][:, np.abs(ys) < 50], 30.0) and np.allclose(w[xs > 0][:, np.abs(ys) < 50], 70.0)


@pytest.mark.parametrize("edit, reason", [
    (dict(wedge="W30"), "wedge (W30) is not modelled"),
    (dict(radiation="ELECTRON"), "radiation type ELECTRON; electron plans"),
    (dict(energy=18.0), "18 MV is not in the photon beam model generic"),
    (dict(machine="LINAC_9"), "PHOTON beams: treatment machine 'LINAC_9' has no beam model"),
])
def test_what_is_not_modelled_is_refused_by_name(study, edit, reason):
    with pytest.raises(UnsupportedPlan, match=re.escape(reason)):
        ENGINE.check_plan(photon_plan(study, **edit), beam_models=GENERIC)


def test_applicator_arc_and_moving_leaves_are_refused(study):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    plan = photon_plan(study)
    app = Dataset()
    app.ApplicatorID = "CONE_15"
    app.ApplicatorType = "STEREOTACTIC"
    plan.BeamSequence[0].ApplicatorSequence = Sequence([app])
    with pytest.raises(UnsupportedPlan, match=re.escape("applicator CONE_15 (STEREOTACTIC)")):
        ENGINE.check_plan(plan, beam_models=GENERIC)
    plan = photon_plan(study)
    plan.BeamSequence[0].ControlPointSequence[0].GantryRotationDirection = "CW"
    with pytest.raises(UnsupportedPlan, match="gantry rotates during the beam"):
        ENGINE.check_plan(plan, beam_models=GENERIC)
    sliding = photon_plan(study)
    sliding.BeamSequence[0].ControlPointSequence[1].BeamLimitingDevicePositionSequence[2].LeafJawPositions = \
        [-40.0] * 40 + [50.0] * 40
    with pytest.raises(UnsupportedPlan, match="MLCX moves while the beam is on"):
        ENGINE.check_plan(sliding, beam_models=GENERIC)


def test_the_real_raystation_photon_plan_is_read():
    ds = dcmread(PHOTON_PLAN)
    assert engine_name_for(ds, "mcsquare") == "ompmc"
    plan = read_photon_plan(ds)
    (beam,) = plan.beams
    assert (beam.machine, beam.energy_mv, beam.sad_mm, beam.gantry) == ("CLINACIX_V9", 6.0, 1000.0, 0.0)
    (seg,) = beam.segments
    assert seg.mu == pytest.approx(1.0) and seg.x_jaw == (-100.0, 100.0) and seg.y_jaw == (-150.0, 150.0)
    assert seg.mlc is not None and seg.mlc.shape == (60, 2) and seg.leaf_boundaries is not None
    warnings = ENGINE.check_plan(ds, beam_models={"CLINACIX_V9": "generic"})
    assert warnings and "UNCOMMISSIONED" in warnings[0]


def test_generic_model_has_its_reference_dose():
    model = read_photon_model("generic")
    assert not model.commissioned and model.beamlet_mm == 5.0
    six = model.energies[6.0]
    assert six.gy_per_mu_ref == 0.01 and six.engine_dose_ref is not None and six.engine_dose_ref > 0


# --- slow: doses through `compute_folder` (bundle-free offline path: prepare, shards, merge, RT Dose) ---------


def _compute(tmp_path, study, plan, primaries):
    from dicom_node.jobs.compute import compute_folder
    from dicom_node.settings import EngineSettings

    folder = tmp_path / "in"
    study = dataclasses.replace(study, plan=plan)
    write_study(study, folder)
    settings = EngineSettings(beam_models=dict(GENERIC), dose_grid_mm=5.0)  # the CT's 5 mm voxels
    result = compute_folder(folder, tmp_path / "out", primaries=primaries, shards=2, engine_settings=settings)
    rd = dcmread(result.rt_dose_path)
    dose = rd.pixel_array.astype(np.float64) * float(rd.DoseGridScaling)
    return result, rd, dose


@pytest.mark.slow
def test_lateral_beam_enters_from_the_patients_left_and_carries_the_warning(tmp_path, study):
    plan = photon_plan(study, gantry=90.0, segments=((200.0, (-50, 50), (-50, 50), None),))
    result, rd, dose = _compute(tmp_path, study, plan, 12000)
    assert "UNCOMMISSIONED" in rd.DoseComment
    xs = float(rd.ImagePositionPatient[0]) + float(rd.PixelSpacing[1]) * np.arange(rd.Columns)
    ys = float(rd.ImagePositionPatient[1]) + float(rd.PixelSpacing[0]) * np.arange(rd.Rows)
    zs = float(rd.ImagePositionPatient[2]) + np.array([float(v) for v in rd.GridFrameOffsetVector])
    core = dose[np.abs(zs) < 30][:, np.abs(ys) < 30]
    left = core[..., (xs > 50) & (xs < 90)].mean()    # near the entrance (water surface at x = +100)
    right = core[..., (xs < -50) & (xs > -90)].mean()
    assert left > 1.3 * right
    outside = dose[np.abs(zs) < 30][:, np.abs(ys) > 75].mean()  # beyond the 10 cm field
    assert outside < 0.1 * core.mean()
    assert result.merged.summary["uncertainty_percent"] is not None


@pytest.mark.slow
def test_reference_field_gives_the_model_output_per_mu(tmp_path, study):
    # SSD 100 cm: isocenter on the anterior water surface (y = -100 mm), 10x10 cm, gantry 0, 100 MU:
    # the model defines 1 cGy/MU at 1.5 cm depth
    plan = photon_plan(study, gantry=0.0, isocenter=(0.0, -100.0, 0.0),
                       segments=((100.0, (-50, 50), (-50, 50), None),))
    _result, rd, dose = _compute(tmp_path, study, plan, 30000)
    xs = float(rd.ImagePositionPatient[0]) + float(rd.PixelSpacing[1]) * np.arange(rd.Columns)
    ys = float(rd.ImagePositionPatient[1]) + float(rd.PixelSpacing[0]) * np.arange(rd.Rows)
    zs = float(rd.ImagePositionPatient[2]) + np.array([float(v) for v in rd.GridFrameOffsetVector])
    near = dose[np.abs(zs) < 10][:, (ys > -90) & (ys < -80)][..., np.abs(xs) < 10]  # depth 1.0-2.0 cm
    assert near.size >= 8
    assert near.mean() == pytest.approx(1.0, rel=0.06)
    assert math.isclose(float(rd.DoseGridScaling) * rd.pixel_array.max(), dose.max())


@pytest.mark.slow
def test_photon_plan_through_the_node_returns_a_marked_rt_dose(config_dir, node_factory, storescp, tmp_path, study):
    """storescu sends CT + structure set + a photon RT Plan; the RT Dose (ompmc shards on the local
    backend in waves until the target uncertainty, merged, re-identified, on the 10 mm dose grid) comes
    back to storescp linked to the plan, marked UNCOMMISSIONED."""
    from dicom_node.intake.jobrecord import JobState
    from tests.conftest import SMALL, settings_for, storescu, wait_for

    tps_port, tps_dir = storescp(aet="TPS")
    settings = settings_for(
        config_dir, engine={"primaries": 4000, "beam_models": {SMALL.machine_name: "generic", MACHINE: "generic"},
                            "dose_grid_mm": 10.0, "target_uncertainty_percent": 10.0, "max_primaries": 80_000},
        cloud={"shards": 2}, secondcheck={"enabled": False},
        outbox={"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])
    node = node_factory(settings, compute=True)
    plan = photon_plan(study, gantry=90.0, segments=((100.0, (-50, 50), (-50, 50), None),))
    folder = tmp_path / "study"
    write_study(dataclasses.replace(study, plan=plan), folder)
    assert storescu(node.port, sorted(folder.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.SENT), timeout=600)[0]
    (dose_file,) = wait_for(lambda: sorted(p for p in tps_dir.iterdir() if p.name.startswith("RD")))
    rd = dcmread(dose_file)
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert rd.PatientID == plan.PatientID and rd.DoseType == "PHYSICAL"
    assert "UNCOMMISSIONED" in rd.DoseComment
    assert rd.pixel_array.max() > 0
    assert job.data.public.beam_model == "generic"
    assert [float(v) for v in rd.PixelSpacing] == [10.0, 10.0]
    public = job.data.public
    estimates = [w["uncertainty_percent"] for w in public.waves or []]
    assert len(estimates) >= 2 and estimates[0] > 10.0 >= estimates[-1], estimates
    assert public.uncertainty_target_met is True and public.dose_grid is not None
    assert public.dose_grid["body"] == "structure 'BODY'"


def test_too_few_histories_for_the_weakest_beamlet_fail_naming_the_minimum():
    from cloud.engines.ompmc.photon import check_histories, min_histories
    from cloud.errors import EngineError

    weights = np.array([1.0, 1.0, 0.5, 0.0])  # the closed beamlet costs nothing
    assert min_histories(weights, 2) == 11  # 2 batches x total 2.5 / smallest 0.5 = 10, and a margin
    check_histories(weights, 11, 2)
    with pytest.raises(EngineError, match="at least 11 are needed per shard"):
        check_histories(weights, 10, 2)
