"""The dose grid apart from the CT, the body outline, dose to water: real MCsquare, few primaries.

Geometry is pinned through the DICOM round trip: the RT Dose written on each grid is read back by
its ImagePositionPatient / PixelSpacing / GridFrameOffsetVector alone, and the Bragg peak and the
spot's lateral position must land at the same patient coordinates on every grid.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from cloud.dispatch import primaries_for_target
from cloud.engines import get_engine
from cloud.engines.base import DoseOptions, ShardInputs
from cloud.engines.ct import ct_grid
from cloud.engines.dosegrid import body_roi, grid_from_rtdose, rasterise_planes, uniform_grid
from cloud.errors import UnsupportedPlan
from cloud.grid import Grid
from cloud.merge import merge
from dicom_node.jobs.rtdose import write_rt_dose
from dicom_node.phantom import PhantomSpec, Spot, build_study
from dicom_node.qa.compare import dose_from_rtdose

ENGINE = get_engine("mcsquare")
GENERIC = {"GENERIC_PBS": "generic"}  # the phantom's machine, mapped explicitly to the uncommissioned model
THREADS = 2
# A 90 MeV pencil beam (range ~64 mm) off axis at gantry 0 into a water box in air, CT of 2 mm voxels.
SPOT = Spot(12.0, -8.0, 90.0, 1.0)
PENCIL = PhantomSpec(size_mm=(80.0, 120.0, 60.0), spacing_mm=(2.0, 2.0, 2.0), water_box_mm=(70.0, 110.0, 50.0),
                     bone_slab_thickness_mm=0.0, fractions=1, spots=(SPOT,))


def _rt_dose_round_trip(inputs: ShardInputs, study, tmp_path: Path, primaries: int = 20_000):
    tally = ENGINE.run_shard(inputs, primaries, seed=7, threads=THREADS)
    merged = merge([tally], inputs.protons_per_fraction, inputs.fractions, expected_shards=1,
                   body=inputs.body_mask())
    path = tmp_path / f"rd-{inputs.root.name}.dcm"
    write_rt_dose(merged, inputs.scoring_grid, study.ct[0], study.plan, dose_to_water=False).save_as(
        path, enforce_file_format=True)
    return dcmread(path)


def _landmarks(rd) -> tuple[float, float, float, float]:
    """(Bragg peak y, lateral centroid x, lateral centroid z, integral dose x voxel volume) in patient mm."""
    dose = dose_from_rtdose(rd)
    g, d = dose.grid, dose.values
    depth = d.sum(axis=(0, 2))
    x_prof, z_prof = d.sum(axis=(0, 1)), d.sum(axis=(1, 2))
    return (float(g.y[int(np.argmax(depth))]), float((x_prof * g.x).sum() / x_prof.sum()),
            float((z_prof * g.z).sum() / z_prof.sum()), float(d.sum() * g.voxel_volume_cm3))


@pytest.mark.slow
def test_bragg_peak_and_spot_land_at_the_same_patient_position_on_every_dose_grid(tmp_path):
    study = build_study(PENCIL)
    ct = ct_grid(sorted(study.ct, key=lambda d: float(d.ImagePositionPatient[2])))
    # the water surface is at y = -55; this grid starts there, at voxel edges unlike the CT's
    tps_like = Grid.regular((15, 33, 21), origin=(-24.25, -53.5, -31.0), spacing=(3.5, 3.0, 3.0))
    grids = {"ct": DoseOptions(), "2.5 mm": DoseOptions(grid_mm=2.5), "tps-like": DoseOptions(grid=tps_like)}
    marks = {}
    for name, options in grids.items():
        inputs = ENGINE.prepare(study.all(), tmp_path / name.replace(" ", ""), beam_models=GENERIC, dose=options)
        rd = _rt_dose_round_trip(inputs, study, tmp_path)
        expected = {"ct": ct, "2.5 mm": uniform_grid(ct, 2.5), "tps-like": tps_like}[name]
        assert grid_from_rtdose(rd) == expected  # what the RT Dose says is the grid that was scored
        marks[name] = _landmarks(rd)
    peak_ct, x_ct, z_ct, integral_ct = marks["ct"]
    # IEC gantry 0, HFS: spot +X lands at patient +x, spot +Y at +z; 90 MeV stops ~64 mm behind the surface
    assert x_ct == pytest.approx(SPOT.x_mm, abs=1.0) and z_ct == pytest.approx(SPOT.y_mm, abs=1.0)
    surface = -PENCIL.water_box_mm[1] / 2
    assert 55.0 < peak_ct - surface < 68.0
    for name in ("2.5 mm", "tps-like"):
        peak, x, z, integral = marks[name]
        voxel = max(grids[name].grid.spacing) if grids[name].grid else 2.5
        assert abs(peak - peak_ct) <= voxel, name
        assert abs(x - x_ct) <= 0.5 and abs(z - z_ct) <= 0.5, name
        assert integral == pytest.approx(integral_ct, rel=0.02), name  # the same energy, only re-binned


def test_uniform_grid_is_centred_on_the_ct_and_inside_it():
    ct = Grid.regular((177, 512, 512), origin=(-100.0, -160.0, -150.0), spacing=(1.25, 0.59, 0.59))
    g = uniform_grid(ct, 2.5)
    assert g.shape == (88, 120, 120) and g.spacing == (2.5, 2.5, 2.5)
    for a, a_ct, d_ct in zip(g.axes, ct.axes, ct.spacing, strict=True):
        assert (a[0] + a[-1]) / 2 == pytest.approx((a_ct[0] + a_ct[-1]) / 2)  # centred on the CT
        assert a[0] - 1.25 >= a_ct[0] - d_ct / 2 - 1e-9 and a[-1] + 1.25 <= a_ct[-1] + d_ct / 2 + 1e-9
    # the RT Dose of a 512x512x177 head CT on this grid: 120x120x88 uint32, well under 25 MB
    assert 4 * np.prod(g.shape) < 25e6 / 4


def test_a_tps_grid_outside_the_ct_is_refused_with_the_axis(tmp_path):
    study = build_study(dataclasses.replace(PENCIL, spots=(Spot(0.0, 0.0, 70.0, 1.0),)))
    far = Grid.regular((5, 5, 5), origin=(0.0, 0.0, 30.0), spacing=(3.0, 3.0, 3.0))  # beyond the CT along x
    with pytest.raises(UnsupportedPlan, match="outside the CT along x"):
        ENGINE.prepare(study.all(), tmp_path / "x", beam_models=GENERIC, dose=DoseOptions(grid=far))
    assert not (tmp_path / "x").exists()  # refused before anything was written


@pytest.mark.slow
def test_no_dose_outside_the_body_contour_or_in_air_without_one(tmp_path):
    study = build_study(PENCIL)
    with_body = ENGINE.prepare(study.all(), tmp_path / "body", beam_models=GENERIC, dose=DoseOptions(grid_mm=2.5))
    assert with_body.extra["body"] == "structure 'BODY'"
    mask = with_body.body_mask()
    g = with_body.scoring_grid
    y = g.y[None, :, None]
    upstream_air = np.broadcast_to(y < -PENCIL.water_box_mm[1] / 2 - 2, g.shape)
    z, y3, x = np.meshgrid(*g.axes, indexing="ij")
    hx, hy, hz = (s / 2 for s in PENCIL.water_box_mm)
    assert mask.sum() == ((np.abs(x) <= hx) & (np.abs(y3) <= hy) & (np.abs(z) <= hz)).sum()
    assert not mask[upstream_air].any()
    tally = ENGINE.run_shard(with_body, 20_000, seed=3, threads=THREADS)
    raw = tally.dose_per_primary
    # MCsquare's density segmentation is always on: the air the beam crosses scores nothing (per gram of
    # air it would be a good part of the peak dose, and it would inflate dose voxels on the skin) ...
    assert raw[upstream_air].max() == 0 and raw[mask].max() > 0
    merged = merge([tally], with_body.protons_per_fraction, 1, expected_shards=1, body=mask)
    # ... and the contour sets every dose voxel outside the body to 0, leaving the inside as it was
    assert merged.per_fraction_gy[~mask].max() == 0
    np.testing.assert_allclose(merged.per_fraction_gy[mask], raw[mask] * with_body.protons_per_fraction, rtol=1e-6)
    assert merged.summary["body_voxels"] == int(mask.sum())

    # no structure set: MCsquare's density segmentation leaves the air without dose, the water as it was
    no_ss = ENGINE.prepare([*study.ct, study.plan], tmp_path / "nobody", beam_models=GENERIC,
                           dose=DoseOptions(grid_mm=2.5))
    assert no_ss.body_mask() is None and no_ss.extra["body"].startswith("density >= 0.05")
    seg = ENGINE.run_shard(no_ss, 20_000, seed=3, threads=THREADS).dose_per_primary
    assert seg[upstream_air].max() == 0
    assert seg[mask].sum() == pytest.approx(raw[mask].sum(), rel=0.03)


@pytest.mark.slow
def test_dose_to_water_raises_bone_and_keeps_water(tmp_path):
    spec = PhantomSpec(size_mm=(60.0, 120.0, 60.0), spacing_mm=(2.0, 2.0, 2.0), water_box_mm=(50.0, 100.0, 50.0),
                       bone_slab_thickness_mm=20.0, bone_slab_center_y_mm=-20.0, fractions=1,
                       spots=(Spot(-8.0, 0.0, 100.0, 1.0),))
    study = build_study(spec)
    doses = {}
    for to_water in (False, True):
        inputs = ENGINE.prepare(study.all(), tmp_path / str(to_water), beam_models=GENERIC,
                                dose=DoseOptions(grid_mm=2.5, dose_to_water=to_water))
        assert inputs.dose_to_water is to_water and ShardInputs.load(inputs.root).dose_to_water is to_water
        doses[to_water] = ENGINE.run_shard(inputs, 20_000, seed=5, threads=THREADS).dose_per_primary
    g = inputs.scoring_grid
    z, y, x = np.meshgrid(*g.axes, indexing="ij")
    inside = (np.abs(x) < 22) & (np.abs(z) < 22)
    medium, water_dose = doses[False], doses[True]
    dosed = medium > 0.1 * medium.max()
    bone = inside & (np.abs(y + 20) <= 8) & (x <= -3) & dosed  # the slab covers x <= 0; centres clear of its edge
    water = inside & (y > 3) & (y < 47) & dosed
    assert bone.sum() > 50 and water.sum() > 50
    # same seed: the histories nearly match, the stopping-power-ratio conversion makes the difference
    assert np.median(water_dose[bone] / medium[bone]) > 1.03  # bone: dose to water > dose to bone
    assert np.median(water_dose[water] / medium[water]) == pytest.approx(1.0, abs=0.02)


def test_rasterise_even_odd_with_a_hole_and_body_roi_choice():
    circle = [np.column_stack([30 * np.cos(t), 30 * np.sin(t)]) for t in [np.linspace(0, 2 * np.pi, 200)]]
    hole = [np.column_stack([10 * np.cos(t), 10 * np.sin(t)]) for t in [np.linspace(0, 2 * np.pi, 100)]]
    axis = np.arange(-40.0, 40.5, 1.0)
    z = np.array([-4.0, 0.0, 4.0, 9.0])
    mask = rasterise_planes({0.0: circle + hole, 4.0: circle}, z, axis, axis)
    area = mask.sum(axis=(1, 2))
    assert area[0] == 0 and area[3] == 0  # beyond the first / last contour plane by more than half a step
    assert area[1] == pytest.approx(math.pi * (30**2 - 10**2), rel=0.03)
    assert area[2] == pytest.approx(math.pi * 30**2, rel=0.03)

    rs = build_study(PENCIL).rtstruct
    assert body_roi(rs) == (1, "BODY")
    rs.RTROIObservationsSequence[0].RTROIInterpretedType = "ORGAN"
    rs.StructureSetROISequence[0].ROIName = "External"
    assert body_roi(rs) == (1, "External")  # no EXTERNAL type: the name
    rs.StructureSetROISequence[0].ROIName = "Couch"
    assert body_roi(rs) is None


def test_next_wave_follows_one_over_sqrt_n():
    # 4 % after 1e5 primaries, target 2 %: 4x the primaries in all (x 1.1 margin) -> 3.4e5 more
    assert primaries_for_target(100_000, 4.0, 2.0, 10**8, shards=4) == 340_000
    # never past the cap, nothing once it is reached
    assert primaries_for_target(100_000, 4.0, 2.0, 200_000, shards=4) == 100_000
    assert primaries_for_target(200_000, 4.0, 2.0, 200_000, shards=4) == 0
    # barely above the target: still at least 10 % more
    assert primaries_for_target(100_000, 2.01, 2.0, 10**8, shards=4, margin=1.0) == 10_000


def test_ct_written_a_slice_at_a_time_in_mcsquare_order(tmp_path):
    from cloud.engines.mcsquare.adapter import read_mhd, write_mhd

    volume = (np.arange(3 * 4 * 5) - 30).astype(np.int16).reshape(3, 4, 5)
    write_mhd(tmp_path / "ct.mhd", volume, (3.0, 2.0, 1.0))  # (dz, dy, dx)
    assert "ElementSpacing = 1.000000 2.000000 3.000000" in (tmp_path / "ct.mhd").read_text()  # x first
    assert "DimSize = 5 4 3" in (tmp_path / "ct.mhd").read_text()
    raw = np.fromfile(tmp_path / "ct.raw", dtype="<i2").reshape(3, 4, 5)
    np.testing.assert_array_equal(raw, volume[:, ::-1, ::-1])  # rows and columns reversed, z as is
    np.testing.assert_array_equal(read_mhd(tmp_path / "ct.mhd"), volume)
