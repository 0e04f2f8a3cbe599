"""MCsquare gets the CT cut to the patient: the air around it is not read, converted and held per shard.

`dosegrid.matter_box` picks the box; the MCsquare adapter writes the cut CT and scores the part of the
dose grid over it. The dose must not change: the same plan with the whole CT (the box refused) is the
reference, both run by the real MCsquare.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread

from cloud.engines import dosegrid, get_engine
from cloud.engines.base import DoseOptions
from cloud.engines.mcsquare.adapter import ENGINE_CUT
from cloud.grid import Grid
from dicom_node.phantom import PhantomSpec, build_study, write_study


def test_the_box_holds_every_dense_voxel_and_the_dose_voxels_over_it():
    ct = Grid.regular((40, 100, 100), (-50.0, -99.0, -99.0), (2.5, 2.0, 2.0))  # edges z -51.25.., y/x -100..
    volume = np.full(ct.shape, -1000, np.int16)
    volume[10:30, 40:60, 20:50] = 0  # water: z -25..25, y -19..21, x -59..1 (voxel edges)
    volume[35, 5, 95] = -980  # air noise below the threshold: not matter
    dose = dosegrid.uniform_grid(ct, 5.0)
    (cz, cy, cx), box = dosegrid.matter_box(volume, ct, dose, hu_min=-950.0, margin_mm=5.0)
    cut_ct, cut_dose = dosegrid.sub_grid(ct, (cz, cy, cx)), dosegrid.sub_grid(dose, box)
    matter = [(-26.25, 23.75), (-20.0, 20.0), (-60.0, 0.0)]  # the water's outer voxel edges, z y x
    for (lo, hi), (dlo, dhi), (mlo, mhi), (glo, ghi), axis, b in zip(
            cut_ct.extent(), cut_dose.extent(), matter, dose.extent(), dose.axes, box, strict=True):
        assert lo - 1e-6 <= dlo and dhi <= hi + 1e-6  # the scored grid lies inside the CT MCsquare gets
        assert dlo <= max(mlo - 5.0, glo) + 1e-6 and dhi >= min(mhi + 5.0, ghi) - 1e-6  # matter + margin kept
        step = axis[1] - axis[0]
        if b.start > 0:  # the dose voxel left out below does not reach the margin
            assert axis[b.start - 1] + step / 2 <= mlo - 5.0 + 1e-6
        if b.stop < len(axis):
            assert axis[b.stop] - step / 2 >= mhi + 5.0 - 1e-6
    assert np.prod(cut_ct.shape) < 0.3 * np.prod(ct.shape)
    # all air, or matter nearly everywhere: nothing to cut
    assert dosegrid.matter_box(np.full(ct.shape, -1000, np.int16), ct, dose, -950.0) is None
    assert dosegrid.matter_box(np.zeros(ct.shape, np.int16), ct, dose, -950.0) is None


@pytest.mark.slow
def test_the_cut_ct_gives_the_dose_of_the_whole_ct(tmp_path, monkeypatch):
    # an 80 x 120 mm water box in a 200 mm wide CT (what a head in a 300 mm field of view looks like), one beam
    spec = PhantomSpec(size_mm=(200.0, 200.0, 120.0), spacing_mm=(2.0, 2.0, 3.0), water_box_mm=(80.0, 120.0, 60.0),
                       target_radius_mm=10.0, energy_layers=3, spot_spacing_mm=5.0, bone_slab_thickness_mm=0.0)
    write_study(build_study(spec), tmp_path / "study")
    datasets = [dcmread(p) for p in sorted((tmp_path / "study").iterdir())]
    engine = get_engine("mcsquare")
    options = DoseOptions(grid_mm=4.0)
    models = {spec.machine_name: "generic"}
    cut = engine.prepare(datasets, tmp_path / "cut", beam_models=models, dose=options)
    assert ENGINE_CUT in cut.extra
    header = (tmp_path / "cut" / "CT.mhd").read_text()
    nx, ny, nz = (int(v) for v in header.split("DimSize = ")[1].split()[:3])
    assert nx * ny * nz < 0.4 * np.prod(cut.grid.shape), header
    monkeypatch.setattr(dosegrid, "matter_box", lambda *a, **k: None)  # the reference: the whole CT
    whole = engine.prepare(datasets, tmp_path / "whole", beam_models=models, dose=options)
    assert ENGINE_CUT not in whole.extra
    assert cut.scoring_grid == whole.scoring_grid
    a = engine.run_shard(cut, 100_000, seed=3, threads=2).dose_per_primary
    b = engine.run_shard(whole, 100_000, seed=3, threads=2).dose_per_primary
    assert a.shape == b.shape == whole.scoring_grid.shape
    high = b > 0.5 * b.max()
    # the same dose within the noise of 100 000 primaries (about 1 % a voxel here): the total, the mean
    # over the high-dose region, and the depth dose along the beam (gantry 0: along y) where it is high
    assert a.sum() == pytest.approx(b.sum(), rel=0.01)
    assert a[high].mean() == pytest.approx(b[high].mean(), rel=0.015)
    depth_a, depth_b = a.sum(axis=(0, 2)), b.sum(axis=(0, 2))
    plateau = depth_b > 0.5 * depth_b.max()
    np.testing.assert_allclose(depth_a[plateau], depth_b[plateau], rtol=0.03)
