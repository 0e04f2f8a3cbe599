"""dose_grid = "tps" on a real RayStation 12 export: the MC dose comes back on exactly RayStation's grid.

The export (tests/data/realdata/raystation12_tr3/reference: plan "Cube101010", its structure set and
RayStation's RT Dose on a 2 mm grid that reaches past the External contour) has no CT;
tests/realdata.py rebuilds it from the External contour on 2 mm voxels with the CT slices the
structure set references (5 mm apart). Machine TR3 is mapped to the generic model: absolute dose is
not what is checked here, geometry is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.jobs.compute import compute_folder
from dicom_node.qa.compare import dose_from_rtdose
from dicom_node.settings import EngineSettings
from tests.realdata import PHANTOM_SCANNER, phantom_calibration, reference_folder

pytestmark = pytest.mark.slow

PRIMARIES = 40_000


def _landmarks(rd) -> tuple[float, float, float]:
    """(distal 80 % depth along +y of the integrated depth dose, dose-weighted x and z centroids), mm.

    Integrals over whole planes: robust against per-voxel noise at few primaries, and against the
    generic beam model's spot sizes (not TR3's), which change the dose's shape but not where it is.
    """
    dose = dose_from_rtdose(rd)
    g, d = dose.grid, dose.values
    idd = d.sum(axis=(0, 2))
    peak = int(np.argmax(idd))
    level = 0.8 * idd[peak]
    i = next(i for i in range(peak, len(idd) - 1) if idd[i] >= level > idd[i + 1])
    r80 = g.y[i] + (level - idd[i]) / (idd[i + 1] - idd[i]) * (g.y[i + 1] - g.y[i])
    x_prof, z_prof = d.sum(axis=(0, 1)), d.sum(axis=(1, 2))
    return float(r80), float((x_prof * g.x).sum() / x_prof.sum()), float((z_prof * g.z).sum() / z_prof.sum())


def test_mc_dose_on_exactly_the_raystation_grid_with_its_high_dose_region_in_place(tmp_path):
    folder = reference_folder("reference", tmp_path)
    (tps_path,) = folder.glob("RD*.dcm")
    tps = dcmread(tps_path)
    density, material = phantom_calibration(tmp_path)
    settings = dataclasses.replace(EngineSettings(), dose_grid="tps", threads=2, beam_models={"TR3": "generic"},
                                   ct_calibrations={"/".join(PHANTOM_SCANNER): (density, material)})
    result = compute_folder(folder, tmp_path / "out", primaries=PRIMARIES, shards=2, engine_settings=settings)
    mc = dcmread(result.rt_dose_path)

    # the same grid, value for value: a TPS can subtract the two doses voxel by voxel
    assert (mc.Rows, mc.Columns, mc.NumberOfFrames) == (tps.Rows, tps.Columns, tps.NumberOfFrames)
    assert [float(v) for v in mc.ImagePositionPatient] == [float(v) for v in tps.ImagePositionPatient]
    assert [float(v) for v in mc.PixelSpacing] == [float(v) for v in tps.PixelSpacing]
    tps_z = np.array([float(v) for v in tps.GridFrameOffsetVector])
    assert np.allclose([float(v) for v in mc.GridFrameOffsetVector], tps_z - tps_z[0])
    assert mc.FrameOfReferenceUID == tps.FrameOfReferenceUID
    assert mc.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == \
        tps.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID

    # RayStation's grid reaches into the air around the phantom, also where the beam enters (-y, gantry 0,
    # the External's surface at y = -95.9 mm): no dose there
    dose = dose_from_rtdose(mc)
    g, d = dose.grid, dose.values
    assert d[:, g.y < -96.0, :].max() == 0 and d[:, :, np.abs(g.x) > 111.5].max() == 0
    assert d[:, (g.y > -95.0) & (g.y < -80.0), :].max() > 0

    # the dose where RayStation has it: distal edge within 3 mm, lateral centre within 1.5 mm
    r80_mc, x_mc, z_mc = _landmarks(mc)
    r80_tps, x_tps, z_tps = _landmarks(tps)
    assert abs(r80_mc - r80_tps) <= 3.0, (r80_mc, r80_tps)
    assert abs(x_mc - x_tps) <= 1.5 and abs(z_mc - z_tps) <= 1.5, ((x_mc, z_mc), (x_tps, z_tps))
    assert result.merged.summary["body_voxels"] is not None  # the External contour kept the dose in the body
