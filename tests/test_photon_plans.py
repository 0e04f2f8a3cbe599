"""Photon RT Plans on the ompmc engine: what is read from the plan, what is refused (naming the
element), the beam geometry (IEC 61217, HFS), and (slow) doses through the offline compute path:
the entrance side of a lateral beam, and the absolute dose of the beam model's own reference field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from cloud.engines import engine_name_for, get_engine
from cloud.engines.ompmc.photon import beam_axes, beam_fluence, read_photon_model
from cloud.engines.ompmc.photonplan import PhotonBeam, Segment, open_fraction, read_photon_plan
from cloud.errors import UnsupportedPlan
from dicom_node.phantom import write_study
from tests.photon_plans import MACHINE, arc_plan, on_study, photon_plan, water_study
from tests.test_photon_arrival import PHOTON_PLAN

MONACO_VMAT = Path(__file__).parent / "data" / "realdata" / "monaco_vmat" / "RP_vmat.dcm"

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


def test_applicator_rotating_collimator_and_sliding_window_are_refused(study):
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
    plan.BeamSequence[0].ControlPointSequence[0].BeamLimitingDeviceRotationDirection = "CW"
    with pytest.raises(UnsupportedPlan, match="collimator rotates during the beam"):
        ENGINE.check_plan(plan, beam_models=GENERIC)
    plan = photon_plan(study)
    plan.BeamSequence[0].ControlPointSequence[1].GantryAngle = 20.0  # turns, but which way?
    with pytest.raises(UnsupportedPlan, match="from 0 to 20 degrees with no GantryRotationDirection"):
        ENGINE.check_plan(plan, beam_models=GENERIC)
    sliding = photon_plan(study)
    sliding.BeamSequence[0].ControlPointSequence[1].BeamLimitingDevicePositionSequence[2].LeafJawPositions = \
        [-40.0] * 40 + [50.0] * 40
    with pytest.raises(UnsupportedPlan, match="MLCX moves while the beam is on at a fixed gantry angle"):
        ENGINE.check_plan(sliding, beam_models=GENERIC)


@pytest.mark.parametrize("angles, direction, means", [
    ((350.0, 0.0, 10.0), "CW", (355.0, 5.0)),   # clockwise through 0
    ((10.0, 0.0, 350.0), "CC", (5.0, 355.0)),   # counter-clockwise through 0
    ((90.0, 270.0), "CW", (180.0,)),            # half a turn clockwise passes 180 ...
    ((90.0, 270.0), "CC", (0.0,)),              # ... counter-clockwise passes 0
])
def test_an_arc_is_its_control_point_intervals_at_their_mean_gantry_angle(study, angles, direction, means):
    plan = read_photon_plan(arc_plan(study, angles, direction, mu=300.0))
    assert [b.gantry for b in plan.beams] == pytest.approx(means)
    assert [b.mu for b in plan.beams] == pytest.approx([300.0 / len(means)] * len(means))
    assert plan.dicom_beams == ("B1",)


def test_the_real_monaco_vmat_plan_is_read_as_control_points():
    ds = dcmread(MONACO_VMAT, force=True)
    plan = read_photon_plan(ds)
    meterset = {int(r.ReferencedBeamNumber): float(r.BeamMeterset) for r in ds.FractionGroupSequence[0].
                ReferencedBeamSequence}
    assert plan.dicom_beams == ("1-1", "1-2")
    arc1 = [b for b in plan.beams if b.dicom_beam == "1-1"]
    arc2 = [b for b in plan.beams if b.dicom_beam == "1-2"]
    assert len(arc1) == 31 and len(arc2) == 30  # every interval that delivers MU
    assert sum(b.mu for b in arc1) == pytest.approx(meterset[1])
    assert sum(b.mu for b in arc2) == pytest.approx(meterset[2])
    cps = ds.BeamSequence[0].ControlPointSequence  # the first interval: 90 -> 91.7 deg, its share of the MU
    assert arc1[0].gantry == pytest.approx(90.85)
    assert arc1[0].mu == pytest.approx(float(cps[1].CumulativeMetersetWeight) * meterset[1])
    assert arc2[0].gantry == pytest.approx(269.2)  # counter-clockwise from 270
    assert all(90.0 < b.gantry < 150.0 for b in arc1) and all(210.0 < b.gantry < 270.0 for b in arc2)
    # the leaves move with the gantry: each interval's aperture is the mean of its two control points
    a, b = (np.array([float(v) for v in cp.BeamLimitingDevicePositionSequence[-1].LeafJawPositions])
            for cp in cps[5:7])
    n = len(a) // 2
    assert np.allclose(arc1[5].segments[0].mlc, np.column_stack([(a[:n] + b[:n]) / 2, (a[n:] + b[n:]) / 2]))
    assert ENGINE.check_plan(ds, beam_models={"2619": "generic"})


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


def _compute(tmp_path, study, plan, primaries, shards=2):
    from dicom_node.jobs.compute import compute_folder
    from dicom_node.settings import EngineSettings

    folder = tmp_path / "in"
    study = dataclasses.replace(study, plan=plan)
    write_study(study, folder)
    settings = EngineSettings(beam_models=dict(GENERIC), dose_grid_mm=5.0)  # the CT's 5 mm voxels
    result = compute_folder(folder, tmp_path / "out", primaries=primaries, shards=shards,
                            engine_settings=settings)
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
        config_dir, engine={"primaries": 1000, "beam_models": {SMALL.machine_name: "generic", MACHINE: "generic"},
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
    # 1000 primaries are too few for 2 shards of 400 equal 5 mm beamlets (801 a shard): the first wave has 1602
    assert (public.waves or [{}])[0]["primaries"] == 1602
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


@pytest.mark.slow
def test_a_full_arc_gives_a_round_dose_peaked_at_the_isocenter(tmp_path, study):
    # 360 degrees clockwise in 10-degree control points, a 3 x 3 cm aperture, on the 20 cm water cube
    plan = arc_plan(study, [float(a) for a in range(0, 361, 10)], "CW", mu=360.0, field_mm=30.0)
    _result, rd, dose = _compute(tmp_path, study, plan, 24000)
    xs = float(rd.ImagePositionPatient[0]) + float(rd.PixelSpacing[1]) * np.arange(rd.Columns)
    ys = float(rd.ImagePositionPatient[1]) + float(rd.PixelSpacing[0]) * np.arange(rd.Rows)
    zs = float(rd.ImagePositionPatient[2]) + np.array([float(v) for v in rd.GridFrameOffsetVector])
    plane = dose[np.abs(zs) < 10].mean(axis=0)
    iy, ix = np.unravel_index(int(np.argmax(plane)), plane.shape)
    assert abs(xs[ix]) <= 10 and abs(ys[iy]) <= 10  # the beams meet at the isocenter
    ring = [plane[np.abs(ys - y) < 8][:, np.abs(xs - x) < 8].mean() for x, y in
            ((50, 0), (-50, 0), (0, 50), (0, -50))]  # 5 cm out: outside the aperture, every angle alike
    centre = plane[np.abs(ys) < 8][:, np.abs(xs) < 8].mean()
    assert max(ring) < 0.5 * centre
    assert min(ring) > 0.8 * max(ring)


@pytest.mark.slow
def test_the_real_monaco_vmat_plan_is_computed(tmp_path, study):
    """Both arcs enter from behind (90->150 and 270->210 degrees) and cross at the isocenter."""
    plan = on_study(study, dcmread(MONACO_VMAT, force=True))
    for beam in plan.BeamSequence:
        beam.TreatmentMachineName = MACHINE
    # one shard: the weakest kept beamlet needs about 40 000 histories of a shard (photon.min_histories)
    _result, rd, dose = _compute(tmp_path, study, plan, 42000, shards=1)
    xs = float(rd.ImagePositionPatient[0]) + float(rd.PixelSpacing[1]) * np.arange(rd.Columns)
    ys = float(rd.ImagePositionPatient[1]) + float(rd.PixelSpacing[0]) * np.arange(rd.Rows)
    zs = float(rd.ImagePositionPatient[2]) + np.array([float(v) for v in rd.GridFrameOffsetVector])
    plane = dose[np.abs(zs) < 10].mean(axis=0)
    iy, ix = np.unravel_index(int(np.argmax(plane)), plane.shape)
    assert abs(xs[ix]) <= 10 and abs(ys[iy]) <= 10
    posterior = plane[(ys > 30) & (ys < 95)].sum()  # entrance side of both arcs
    anterior = plane[(ys < -30) & (ys > -95)].sum()  # their exit side
    assert posterior > 1.2 * anterior
    left, right = plane[:, xs > 10].sum(), plane[:, xs < -10].sum()  # the arcs mirror each other
    assert 0.75 < left / right < 1.33
