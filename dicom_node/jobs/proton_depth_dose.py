"""The proton case of `mcnode depth-dose`: a square field of one energy on a water phantom, MCsquare.

The phantom study (CT of a water box, an RT Ion Plan of one gantry-0 beam whose spots cover the
field on a 5 mm grid at a single energy, equal MU) is made by ``dicom_node.phantom`` and prepared by
the MCsquare adapter exactly as a clinical plan is. Gantry 0 enters anteriorly, so depth runs along
+y from the water surface. The beam model's own source geometry applies: for protons the field is
defined by the spot grid, and ``--ssd`` does not change the setup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cloud.engines import get_engine
from cloud.engines.base import GENERIC_MODEL, ShardInputs, Tally
from dicom_node.phantom import PhantomSpec, Spot, build_study

SPOT_SPACING_MM = 5.0
LATERAL_MARGIN_MM = 30.0
AIR_GAP_MM = 10.0
SPACING_MM = (5.0, 2.0, 5.0)  # x, y (depth), z


def prepare_proton_phantom(energy_mev: float, field_cm: float, depth_cm: float,
                           work_dir: Path) -> tuple[ShardInputs, dict[str, Any]]:
    field_mm = 10.0 * field_cm
    n = max(1, int(round(field_mm / SPOT_SPACING_MM)))
    offsets = (np.arange(n + 1) - n / 2.0) * SPOT_SPACING_MM
    spots = tuple(Spot(x_mm=float(x), y_mm=float(y), energy_mev=float(energy_mev), mu=0.01)
                  for x in offsets for y in offsets)
    lateral = field_mm + 2 * LATERAL_MARGIN_MM
    water = 10.0 * depth_cm
    spec = PhantomSpec(size_mm=(lateral, water + 2 * AIR_GAP_MM, lateral), spacing_mm=SPACING_MM,
                       water_box_mm=(lateral, water, lateral), bone_slab_thickness_mm=0.0, spots=spots,
                       fractions=1, plan_label="DEPTH_DOSE")
    study = build_study(spec)
    # the generic beam model: a depth dose is relative, so no commissioned output is needed
    inputs = get_engine("mcsquare").prepare(study.all(), work_dir, beam_models={spec.machine_name: GENERIC_MODEL})
    setup = {"engine": "mcsquare", "energy_mev": energy_mev, "spots": len(spots),
             "surface_y_mm": -water / 2.0, "column_mm": min(30.0, field_mm / 3.0)}
    return inputs, setup


def central_axis_tally(inputs: ShardInputs, tally: Tally, setup: dict[str, Any]) -> Tally:
    """The shard's dose averaged over the central column (|x|, |z| <= column/2), along depth, as (ny, 1, 1)."""
    grid = inputs.grid
    zs, ys, xs = grid.axes
    dz, _dy, dx = grid.spacing
    half = setup["column_mm"] / 2.0 + 1e-6
    sel_x = np.abs(xs) <= max(half, dx / 2.0)
    sel_z = np.abs(zs) <= max(half, dz / 2.0)
    inside = ys >= setup["surface_y_mm"]
    column = tally.dose_per_primary[np.ix_(sel_z, inside, sel_x)].astype(np.float64).mean(axis=(0, 2))
    return Tally(dose_per_primary=column.reshape(-1, 1, 1), primaries=tally.primaries, seed=tally.seed,
                 wall_s=tally.wall_s, engine=tally.engine, extra=tally.extra)


def depths_cm(inputs: ShardInputs, setup: dict[str, Any]) -> np.ndarray:
    ys = inputs.grid.y
    return np.asarray((ys[ys >= setup["surface_y_mm"]] - setup["surface_y_mm"]) / 10.0)
