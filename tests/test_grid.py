"""The one grid (cloud.grid): axis order (z, y, x) for shape, origin, spacing and axes; (x, y, z) only for
DICOM points, MHD headers and ompMC's voxel edges; inputs.json format 1 (x first) still read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cloud.engines.base import FORMAT_VERSION, ShardInputs
from cloud.errors import EngineError
from cloud.grid import Grid


def test_one_axis_order_and_the_dicom_point_order():
    grid = Grid.regular((3, 4, 5), origin=(10.0, -20.0, -30.0), spacing=(2.5, 2.0, 1.0))
    assert grid.shape == (3, 4, 5) and grid.origin == (10.0, -20.0, -30.0) and grid.spacing == (2.5, 2.0, 1.0)
    np.testing.assert_allclose(grid.z, [10.0, 12.5, 15.0])
    np.testing.assert_allclose(grid.y, [-20.0, -18.0, -16.0, -14.0])
    np.testing.assert_allclose(grid.x, [-30.0, -29.0, -28.0, -27.0, -26.0])
    assert grid.voxel_volume_cm3 == pytest.approx(0.005)
    assert grid.extent() == [(8.75, 16.25), (-21.0, -13.0), (-30.5, -25.5)]
    np.testing.assert_allclose(grid.voxel_edges()[0], [8.75, 11.25, 13.75, 16.25])
    np.testing.assert_allclose(grid.voxel_edges()[2], [-30.5, -29.5, -28.5, -27.5, -26.5, -25.5])
    # a DICOM point (x, y, z) -> the [z, y, x] index of the nearest voxel centre, clipped to the grid
    assert grid.index_of((-27.2, -16.1, 12.4)) == (1, 2, 3)
    assert grid.index_of((100.0, -100.0, 12.4)) == (1, 0, 4)
    assert grid.describe() == "5x4x3 voxels of 1.00x2.00x2.50 mm, x -30.0..-26.0, y -20.0..-14.0, z 10.0..15.0 mm"


def test_json_round_trip_and_the_old_xyz_order_still_read():
    grid = Grid.regular((3, 4, 5), origin=(10.0, -20.0, -30.0), spacing=(2.5, 2.0, 1.0))
    assert grid.to_json() == {"axes": "zyx", "shape": [3, 4, 5], "origin": [10.0, -20.0, -30.0],
                              "spacing": [2.5, 2.0, 1.0]}
    assert Grid.from_json(grid.to_json()) == grid
    old = {"shape": [3, 4, 5], "origin": [-30.0, -20.0, 10.0], "spacing": [1.0, 2.0, 2.5]}  # inputs.json format 1
    assert Grid.from_json(old) == grid
    assert Grid.from_json(old) != Grid.regular((3, 4, 5), origin=(-30.0, -20.0, 10.0), spacing=(1.0, 2.0, 2.5))


def test_inputs_json_format_2_written_and_format_1_read(tmp_path):
    grid = Grid.regular((3, 4, 5), origin=(10.0, -20.0, -30.0), spacing=(2.5, 2.0, 1.0))
    dose = Grid.regular((2, 2, 2), origin=(11.0, -19.0, -29.0), spacing=(3.0, 3.0, 3.0))
    ShardInputs(root=tmp_path, engine="mcsquare", grid=grid, protons_per_fraction=1e9, fractions=2,
                dose_grid=dose).save()
    data = json.loads((tmp_path / "inputs.json").read_text())
    assert FORMAT_VERSION == 2 and data["format"] == 2 and data["grid"]["origin"] == [10.0, -20.0, -30.0]
    back = ShardInputs.load(tmp_path)
    assert back.grid == grid and back.dose_grid == dose and back.scoring_grid == dose
    # a bundle sealed before the one axis order (format 1: origin and spacing x first) reads the same
    data["format"] = 1
    for key in ("grid", "dose_grid"):
        del data[key]["axes"]
        data[key]["origin"], data[key]["spacing"] = data[key]["origin"][::-1], data[key]["spacing"][::-1]
    (tmp_path / "inputs.json").write_text(json.dumps(data))
    old = ShardInputs.load(tmp_path)
    assert old.grid == grid and old.dose_grid == dose
    data["format"] = 3
    (tmp_path / "inputs.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match="unknown format 3"):
        ShardInputs.load(tmp_path)


def test_a_column_keeps_its_width_and_a_rectilinear_grid_its_mean_step():
    column = Grid.regular((3, 1, 1), origin=(5.0, 0.0, 0.0), spacing=(10.0, 4.0, 4.0))  # a depth-dose column
    assert column.spacing == (10.0, 4.0, 4.0) and Grid.from_json(column.to_json()) == column
    uneven = Grid(z=np.array([0.0, 2.0, 6.0]), y=np.array([1.0]), x=np.array([0.0, 1.0]))
    assert uneven.spacing == (3.0, 0.0, 1.0) and uneven.shape == (3, 1, 2) and not uneven.is_regular()
    with pytest.raises(ValueError, match="only a regular grid"):
        uneven.to_json()
