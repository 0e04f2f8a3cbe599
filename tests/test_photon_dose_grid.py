"""Photon doses on the dose grid, kept inside the body, like proton doses (cloud/engines/dosegrid.py):
the CT averaged onto the dose grid's lattice (``average_onto``, ``covering_grid``) and (slow) photon
plans through the offline compute path on a uniform grid, zeroed outside the External contour or,
without a structure set, in air.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom import dcmread

from cloud.engines import dosegrid
from cloud.grid import Grid
from dicom_node.phantom import write_study
from tests.photon_plans import MACHINE, photon_plan, water_study


def test_average_onto_is_the_mean_over_each_voxel_and_counts_outside_as_given():
    rng = np.random.default_rng(3)
    src = Grid.regular((6, 8, 10), origin=(0.5, 0.5, 0.5), spacing=(1.0, 1.0, 1.0))  # edges z 0..6, y 0..8, x 0..10
    volume = rng.uniform(0, 100, size=src.shape)
    # 2 mm voxels aligned with the source: block means of 2x2x2
    dst = Grid.regular((3, 4, 5), origin=(1.0, 1.0, 1.0), spacing=(2.0, 2.0, 2.0))
    blocks = volume.reshape(3, 2, 4, 2, 5, 2).mean(axis=(1, 3, 5))
    assert np.allclose(dosegrid.average_onto(volume, src, dst), blocks)
    # the transform is applied before averaging
    assert np.allclose(dosegrid.average_onto(volume, src, dst, transform=np.sqrt),
                       np.sqrt(volume).reshape(3, 2, 4, 2, 5, 2).mean(axis=(1, 3, 5)))
    # a voxel half outside the source along x (edges 9..11): half the mean of its inside part, half `outside`
    edge = Grid.regular((1, 1, 1), origin=(3.0, 4.0, 10.0), spacing=(6.0, 8.0, 2.0))
    inside = volume[:, :, 9].mean()
    assert dosegrid.average_onto(volume, src, edge, outside=-7.0)[0, 0, 0] == pytest.approx(0.5 * inside - 3.5)


def test_covering_grid_extends_the_dose_lattice_over_the_ct():
    # z -100..100, y and x -120..120
    ct = Grid.regular((40, 48, 48), origin=(-97.5, -117.5, -117.5), spacing=(5.0, 5.0, 5.0))
    dose = Grid.regular((4, 5, 6), origin=(-7.5, 2.5, -12.5), spacing=(5.0, 5.0, 5.0))
    cover, (oz, oy, ox) = dosegrid.covering_grid(dose, ct)
    assert cover.spacing == dose.spacing
    for (lo, hi), (lo_ct, hi_ct) in zip(cover.extent(), ct.extent(), strict=True):  # covers the CT's outer edges
        assert lo <= lo_ct + 1e-9 and hi >= hi_ct - 1e-9
    # the dose grid sits in it at the offsets, on the same lattice
    assert cover.x[ox] == pytest.approx(dose.x[0])
    assert cover.y[oy] == pytest.approx(dose.y[0])
    assert cover.z[oz] == pytest.approx(dose.z[0])
    assert cover.shape == (40, 48, 48)


def test_photon_inputs_on_a_dose_grid_say_what_they_hold(tmp_path):
    """prepare alone (no ompMC run): the transport grid covers the CT on the dose grid's lattice, its mean
    density is the CT's, the body is the contour, and a photon dose is dose to medium whatever was asked."""
    from cloud.engines import get_engine
    from cloud.engines.base import DoseOptions
    from cloud.engines.ompmc.photon import GEOMETRY_FILE, geometry_density

    study = water_study()
    plan = photon_plan(study, segments=((100.0, (-50, 50), (-50, 50), None),))
    inputs = get_engine("ompmc").prepare([*study.ct, study.rtstruct, plan], tmp_path,
                                         beam_models={MACHINE: "generic"},
                                         dose=DoseOptions(grid_mm=10.0, dose_to_water=True))
    assert inputs.dose_grid is not None and inputs.dose_grid.shape == (20, 24, 24)
    assert inputs.dose_to_water is False and any("dose to medium" in w for w in inputs.warnings)
    assert inputs.extra["body"] == "structure 'BODY'" and inputs.body_mask() is not None
    assert inputs.extra["fluence_left_out_percent"] == 0.0  # an open field: every beamlet alike
    density = geometry_density(tmp_path / GEOMETRY_FILE)
    assert density.shape == (20, 24, 24)  # the CT (24 x 24 x 20 cm) is whole 10 mm voxels of the dose grid
    assert density[10, 12, 12] == pytest.approx(1.0, abs=0.02)  # water inside the cube ...
    assert density[10, 12, 0] < 0.01  # ... air outside it


# --- slow: photon plans on the dose grid (offline compute path) ------------------------------------------------


def _run(tmp_path, study, *, with_structures=True, **engine):
    from dicom_node.jobs.compute import compute_folder
    from dicom_node.settings import EngineSettings

    folder = tmp_path / "in"
    write_study(study, folder)
    if not with_structures:
        (rs,) = [p for p in folder.iterdir() if dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"]
        rs.unlink()
    settings = EngineSettings(beam_models={MACHINE: "generic"}, **engine)
    result = compute_folder(folder, tmp_path / "out", primaries=6000, shards=2, engine_settings=settings)
    rd = dcmread(result.rt_dose_path)
    dose = rd.pixel_array.astype(np.float64) * float(rd.DoseGridScaling)
    xs = float(rd.ImagePositionPatient[0]) + float(rd.PixelSpacing[1]) * np.arange(rd.Columns)
    return result, rd, dose, xs


def _shrink_body(study, factor):
    rs = study.rtstruct.copy()
    for roi in rs.ROIContourSequence:
        if int(roi.ReferencedROINumber) == 1:  # BODY
            for c in roi.ContourSequence:
                pts = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
                pts[:, :2] *= factor
                c.ContourData = [f"{v:.3f}" for v in pts.ravel()]
    return dataclasses.replace(study, rtstruct=rs)


@pytest.mark.slow
def test_photon_dose_on_the_uniform_grid_inside_the_contour_and_out_of_air(tmp_path):
    study = water_study()  # 20 cm water cube in a 24 cm CT of 5 mm voxels
    # a lateral 10x10 field (it crosses the whole cube along x); the BODY contour drawn at 12 of the 20 cm
    study = dataclasses.replace(study, plan=photon_plan(study, gantry=90.0,
                                                        segments=((100.0, (-50, 50), (-50, 50), None),)))
    result, rd, dose, xs = _run(tmp_path / "contour", _shrink_body(study, 0.6), dose_grid_mm=10.0)
    ct = Grid.regular((40, 48, 48), origin=(-97.5, -117.5, -117.5), spacing=(5.0, 5.0, 5.0))
    grid = dosegrid.uniform_grid(ct, 10.0)
    assert (rd.NumberOfFrames, rd.Rows, rd.Columns) == grid.shape == (20, 24, 24)
    assert [float(v) for v in rd.PixelSpacing] == [10.0, 10.0]
    assert [round(float(v), 3) for v in rd.ImagePositionPatient] == [round(v, 3) for v in grid.origin[::-1]]
    profile = dose[8:12, 10:14].mean(axis=(0, 1))  # central rows of the field, along the beam
    assert profile[np.abs(xs) < 55].min() > 0.3 * profile.max()  # inside the drawn body: dose
    assert np.all(profile[np.abs(xs) > 65] == 0.0)  # water outside the contour: none
    assert result.merged.summary["body_voxels"] == 12 * 12 * 20  # the 12 cm contour on every 10 mm slice
    assert result.merged.summary["uncertainty_percent"] is not None

    # without a structure set: the density threshold; water scores, the air around the cube does not
    result2, _rd, dose2, xs2 = _run(tmp_path / "density", study, with_structures=False, dose_grid_mm=10.0)
    profile2 = dose2[8:12, 10:14].mean(axis=(0, 1))
    assert profile2[np.abs(xs2) < 95].min() > 0.3 * profile2.max()
    assert np.all(profile2[np.abs(xs2) > 105] == 0.0)
    assert result2.merged.summary["body_voxels"] is None
