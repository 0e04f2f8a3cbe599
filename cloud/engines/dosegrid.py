"""The dose grid (apart from the CT grid) and the body outline the dose is kept inside.

A clinic scores dose on a 2-3 mm grid, not on the CT's 0.5-1 mm voxels: per-voxel noise falls with
the voxel volume, and the RT Dose shrinks from hundreds of MB to a few. Three choices:

- ``uniform_grid(ct, mm)``: cubic voxels of ``mm`` covering the CT, centred on it, inside its outer
  edges (MCsquare scores only inside the CT);
- ``grid_from_rtdose(ds)``: exactly the grid of an RT Dose the TPS sent for the plan;
- the CT grid itself.

The body: the structure set's External contour (RTROIInterpretedType EXTERNAL, else a ROI named
like BODY/External/Outline/Skin), on top of MCsquare's density segmentation (air CT voxels score
nothing; the engine adapter turns it on), rasterised on the dose grid with ``matplotlib.path`` (voxel centre
inside the polygon of the nearest contour plane, even-odd for holes). matplotlib is already a
dependency (the report draws with it) and its point-in-polygon test is exact for the voxel centres;
``skimage.draw.polygon`` would do the same but would add scikit-image for one function.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud.engines.base import Grid
from cloud.errors import UnsupportedPlan

if TYPE_CHECKING:  # pydicom costs ~0.5 s to import; a worker only needs it for type hints
    from pydicom.dataset import Dataset

_BODY_NAMES = re.compile(r"^(external|body|outline|skin|ext|patient|body[ _-]?contour)$", re.IGNORECASE)
_TOL_MM = 1e-3


def uniform_grid(ct: Grid, spacing_mm: float) -> Grid:
    """Cubic voxels of ``spacing_mm`` centred on the CT, as many as fit inside its outer edges."""
    if spacing_mm <= 0:
        raise ValueError(f"dose grid spacing must be positive, got {spacing_mm}")
    shape_xyz, origin = [], []
    for i in range(3):
        n_ct = ct.shape[2 - i]
        extent = n_ct * ct.spacing[i]
        n = max(1, int(math.floor(extent / spacing_mm + 1e-6)))
        centre = ct.origin[i] + (n_ct - 1) * ct.spacing[i] / 2.0
        shape_xyz.append(n)
        origin.append(round(centre - (n - 1) * spacing_mm / 2.0, 6))
    return Grid(shape=(shape_xyz[2], shape_xyz[1], shape_xyz[0]), origin=(origin[0], origin[1], origin[2]),
                spacing=(spacing_mm, spacing_mm, spacing_mm))


def grid_from_rtdose(ds: Dataset) -> Grid:
    """The geometry of an RT Dose; UnsupportedPlan if it is not an axial grid with even slice steps."""
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    if not np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-4):
        raise UnsupportedPlan(f"the TPS dose grid is not axial (ImageOrientationPatient {iop})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    offsets = np.array([float(v) for v in ds.get("GridFrameOffsetVector", [0.0])] if frames > 1 else [0.0])
    if len(offsets) != frames:
        raise UnsupportedPlan(f"the TPS dose has {len(offsets)} GridFrameOffsetVector values for {frames} frames")
    z = offsets + (ipp[2] if offsets[0] == 0.0 else 0.0)  # PS3.3 C.8.8.3.2: relative if the first is 0
    if frames > 1:
        steps = np.diff(z)
        if steps.min() <= 0 or steps.max() - steps.min() > 10 * _TOL_MM:
            raise UnsupportedPlan("the TPS dose grid's frames are not equally spaced in increasing z")
        dz = float(steps.mean())
    else:
        dz = float(ds.get("SliceThickness", row_spacing) or row_spacing)
    return Grid(shape=(frames, int(ds.Rows), int(ds.Columns)), origin=(ipp[0], ipp[1], float(z[0])),
                spacing=(col_spacing, row_spacing, dz))


def check_inside(dose: Grid, ct: Grid) -> None:
    """UnsupportedPlan unless every dose voxel lies inside the CT's outer edges."""
    for i, name in enumerate("xyz"):
        lo_ct = ct.origin[i] - ct.spacing[i] / 2.0
        hi_ct = ct.origin[i] + (ct.shape[2 - i] - 0.5) * ct.spacing[i]
        lo = dose.origin[i] - dose.spacing[i] / 2.0
        hi = dose.origin[i] + (dose.shape[2 - i] - 0.5) * dose.spacing[i]
        if lo < lo_ct - 0.01 or hi > hi_ct + 0.01:
            raise UnsupportedPlan(f"the dose grid reaches outside the CT along {name} "
                                  f"({lo:.1f}..{hi:.1f} mm, CT {lo_ct:.1f}..{hi_ct:.1f} mm)")


def same_grid(a: Grid, b: Grid) -> bool:
    return a.shape == b.shape and np.allclose(a.origin, b.origin, atol=_TOL_MM) and np.allclose(
        a.spacing, b.spacing, atol=_TOL_MM)


# --- the body outline --------------------------------------------------------------------------


def body_roi(rtstruct: Dataset) -> tuple[int, str] | None:
    """(ROI number, name) of the External contour: interpreted type EXTERNAL, else a body-like name."""
    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in rtstruct.get("StructureSetROISequence", [])}
    with_contours = {int(c.ReferencedROINumber) for c in rtstruct.get("ROIContourSequence", [])
                     if c.get("ContourSequence")}
    for obs in rtstruct.get("RTROIObservationsSequence", []):
        number = int(obs.ReferencedROINumber)
        if str(obs.get("RTROIInterpretedType", "")).upper() == "EXTERNAL" and number in with_contours:
            return number, names.get(number, "")
    for number, name in names.items():
        if _BODY_NAMES.match(name.strip()) and number in with_contours:
            return number, name
    return None


def contour_planes(rtstruct: Dataset, roi_number: int) -> dict[float, list[np.ndarray]]:
    """Closed planar contours of one ROI: plane z (mm) -> polygons as (n, 2) arrays of x, y."""
    planes: dict[float, list[np.ndarray]] = {}
    for roi in rtstruct.get("ROIContourSequence", []):
        if int(roi.ReferencedROINumber) != roi_number:
            continue
        for c in roi.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                continue
            pts = np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3)
            if len(pts) >= 3:
                planes.setdefault(round(float(pts[0, 2]), 3), []).append(pts[:, :2])
    return planes


def rasterise_planes(planes: dict[float, list[np.ndarray]], z: np.ndarray, y: np.ndarray,
                     x: np.ndarray) -> np.ndarray:
    """Boolean mask [z, y, x]: voxel centre inside the nearest contour plane's polygons (even-odd).

    A dose slice farther than half the contour spacing from every plane (beyond the first or last
    contour) is outside.
    """
    from matplotlib.path import Path as MplPath

    mask = np.zeros((len(z), len(y), len(x)), dtype=bool)
    if not planes:
        return mask
    zs = np.array(sorted(planes))
    step = float(np.median(np.diff(zs))) if len(zs) > 1 else (float(np.mean(np.diff(z))) if len(z) > 1 else 1.0)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    centres = np.column_stack([xx.ravel(), yy.ravel()])
    cache: dict[float, np.ndarray] = {}
    for k, zk in enumerate(z):
        nearest = float(zs[np.argmin(np.abs(zs - zk))])
        if abs(nearest - zk) > step / 2.0 + 1e-6:
            continue
        if nearest not in cache:
            plane = np.zeros(yy.size, dtype=bool)
            for poly in planes[nearest]:
                plane ^= MplPath(poly).contains_points(centres)
            cache[nearest] = plane.reshape(yy.shape)
        mask[k] = cache[nearest]
    return mask


def body_mask(datasets: Sequence[Dataset], grid: Grid, frame_of_reference_uid: str = ""
              ) -> tuple[np.ndarray, str] | None:
    """(mask on ``grid``, ROI name) from the first structure set with an External contour, else None."""
    for ds in datasets:
        if "ROIContourSequence" not in ds:
            continue
        if frame_of_reference_uid and _structure_set_for(ds) not in ("", frame_of_reference_uid):
            continue
        found = body_roi(ds)
        if found is None:
            continue
        number, name = found
        mask = rasterise_planes(contour_planes(ds, number), grid.axis(2), grid.axis(1), grid.axis(0))
        if mask.any():
            return mask, name
    return None


def _structure_set_for(ds: Dataset) -> str:
    for item in ds.get("ReferencedFrameOfReferenceSequence", []):
        return str(item.get("FrameOfReferenceUID", ""))
    return ""


def describe(grid: Grid) -> dict[str, Any]:
    nz, ny, nx = grid.shape
    return {"shape_xyz": [nx, ny, nz], "spacing_mm": [round(s, 4) for s in grid.spacing],
            "origin_mm": [round(o, 3) for o in grid.origin]}
