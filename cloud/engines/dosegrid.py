"""The dose grid (apart from the CT grid) and the body outline the dose is kept inside.

A clinic scores dose on a 2-3 mm grid, not on the CT's 0.5-1 mm voxels: per-voxel noise falls with
the voxel volume, and the RT Dose shrinks from hundreds of MB to a few. Three choices:

- ``uniform_grid(ct, mm)``: cubic voxels of ``mm`` covering the CT, centred on it, inside its outer
  edges (MCsquare scores only inside the CT);
- ``grid_from_rtdose(ds)``: exactly the grid of an RT Dose the TPS sent for the plan;
- the CT grid itself.

``choose_grid`` picks one of them for an engine's ``DoseOptions``. An engine that cannot score
apart from its transport grid (ompMC) transports on ``covering_grid`` (the dose grid's lattice
extended over the whole CT, so nothing outside the dose grid is missing from the transport) with the
CT averaged onto it (``average_onto``, per-axis overlap weights: the voxel's mean over its volume, as
EGSnrc's ctcreate resamples a CT to the dose voxels), then keeps the dose grid's part of its dose.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud.engines.base import BODY_MASK, DoseOptions
from cloud.errors import UnsupportedPlan
from cloud.grid import Grid

if TYPE_CHECKING:  # pydicom costs ~0.5 s to import; a worker only needs it for type hints
    from pydicom.dataset import Dataset

_BODY_NAMES = re.compile(r"^(external|body|outline|skin|ext|patient|body[ _-]?contour)$", re.IGNORECASE)
_TOL_MM = 1e-3


def uniform_grid(ct: Grid, spacing_mm: float) -> Grid:
    """Cubic voxels of ``spacing_mm`` centred on the CT, as many as fit inside its outer edges."""
    if spacing_mm <= 0:
        raise ValueError(f"dose grid spacing must be positive, got {spacing_mm}")
    shape, origin = [], []
    for n_ct, o_ct, d_ct in zip(ct.shape, ct.origin, ct.spacing, strict=True):
        n = max(1, int(math.floor(n_ct * d_ct / spacing_mm + 1e-6)))
        centre = o_ct + (n_ct - 1) * d_ct / 2.0
        shape.append(n)
        origin.append(round(centre - (n - 1) * spacing_mm / 2.0, 6))
    return Grid.regular(shape, origin, (spacing_mm, spacing_mm, spacing_mm))


def choose_grid(ct: Grid, options: DoseOptions) -> Grid | None:
    """The scoring grid for these options; None when it is the CT grid. UnsupportedPlan if the asked
    grid reaches outside the CT."""
    if options.grid is not None:
        check_inside(options.grid, ct)
        return None if same_grid(options.grid, ct) else options.grid
    if options.grid_mm <= 0:
        return None
    return uniform_grid(ct, options.grid_mm)


def covering_grid(dose: Grid, ct: Grid) -> tuple[Grid, tuple[int, int, int]]:
    """The dose grid's lattice extended (whole voxels) until it covers the CT, and where the dose
    grid starts in it ([z, y, x] index offsets). The dose grid lies inside the CT (check_inside)."""
    shape, origin, offset = [], [], []
    for n, o, s, (lo, hi), (lo_ct, hi_ct) in zip(dose.shape, dose.origin, dose.spacing, dose.extent(), ct.extent(),
                                                  strict=True):
        below = max(0, int(math.ceil((lo - lo_ct) / s - 1e-6)))
        above = max(0, int(math.ceil((hi_ct - hi) / s - 1e-6)))
        shape.append(n + below + above)
        origin.append(o - below * s)
        offset.append(below)
    return Grid.regular(shape, origin, dose.spacing), (offset[0], offset[1], offset[2])


def matter_box(volume: np.ndarray, ct: Grid, dose: Grid, hu_min: float, margin_mm: float = 5.0,
               worth: float = 0.8) -> tuple[tuple[slice, slice, slice], tuple[slice, slice, slice]] | None:
    """The part of the CT an engine needs to score ``dose``: (CT slices, dose-grid slices), [z, y, x].

    Every dose voxel that reaches within ``margin_mm`` of a CT voxel above ``hu_min`` is kept, and
    the CT voxels under those dose voxels (whole voxels, so the kept dose grid lies inside the kept
    CT). What is cut is air on every side of the patient, couch and mask (a 512x512 head CT is 3/4
    air). None when nothing is above ``hu_min`` or the cut would keep more than ``worth`` of the CT.
    """
    nz, ny, nx = volume.shape
    along_z, along_y, along_x = np.zeros(nz, bool), np.zeros(ny, bool), np.zeros(nx, bool)
    for k in range(nz):  # a slice at a time: no CT-sized mask
        dense = volume[k] > hu_min
        if dense.any():
            along_z[k] = True
            along_y |= dense.any(axis=1)
            along_x |= dense.any(axis=0)
    if not along_z.any():
        return None
    ct_cut, dose_cut = [], []
    for ct_axis, d, mask, dose_axis, dd in zip(ct.axes, ct.spacing, (along_z, along_y, along_x), dose.axes,
                                               dose.spacing, strict=True):
        idx = np.nonzero(mask)[0]
        lo, hi = ct_axis[idx[0]] - d / 2 - margin_mm, ct_axis[idx[-1]] + d / 2 + margin_mm
        keep = np.nonzero((dose_axis + dd / 2 > lo) & (dose_axis - dd / 2 < hi))[0]
        if keep.size == 0:
            return None  # the dose grid misses the patient along this axis: nothing to cut to
        first, last = int(keep[0]), int(keep[-1])
        edge0 = ct_axis[0] - d / 2
        c0 = max(0, int(math.floor((dose_axis[first] - dd / 2 - edge0) / d + 1e-6)))
        c1 = min(len(ct_axis), int(math.ceil((dose_axis[last] + dd / 2 - edge0) / d - 1e-6)))
        ct_cut.append(slice(c0, c1))
        dose_cut.append(slice(first, last + 1))
    kept = math.prod(s.stop - s.start for s in ct_cut)
    if kept > worth * nz * ny * nx:
        return None
    return (ct_cut[0], ct_cut[1], ct_cut[2]), (dose_cut[0], dose_cut[1], dose_cut[2])


def sub_grid(grid: Grid, box: Sequence[slice]) -> Grid:
    """The part of a regular grid that ``box`` ([z, y, x] slices) cuts out of it."""
    shape = [s.stop - s.start for s in box]
    origin = [float(a[s.start]) for a, s in zip(grid.axes, box, strict=True)]
    return Grid.regular(shape, origin, grid.spacing)


def _overlap(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """[i, j]: the fraction of destination interval i (edges ``dst``) covered by source interval j."""
    width = np.diff(dst)[:, None]
    cover = np.minimum(dst[1:, None], src[None, 1:]) - np.maximum(dst[:-1, None], src[None, :-1])
    return np.asarray(np.clip(cover, 0.0, None) / width)


def average_onto(volume: np.ndarray, src: Grid, dst: Grid, *, outside: float = 0.0,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The mean of ``transform(volume)`` (on ``src``) over each voxel of ``dst``, [z, y, x] float64.

    The part of a ``dst`` voxel outside ``src`` counts as ``outside``. A slice of the volume at a time
    (the transform too), so a CT is never copied whole.
    """
    wz, wy, wx = (_overlap(e_dst, e_src) for e_dst, e_src in zip(dst.voxel_edges(), src.voxel_edges(), strict=True))
    out = np.zeros(dst.shape, dtype=np.float64)
    for k in range(src.shape[0]):
        rows = np.nonzero(wz[:, k])[0]
        if rows.size == 0:
            continue
        plane = np.asarray(volume[k], dtype=np.float64)
        if transform is not None:
            plane = transform(plane)
        reduced = wy @ plane @ wx.T
        out[rows] += wz[rows, k][:, None, None] * reduced[None]
    covered = wz.sum(axis=1)[:, None, None] * wy.sum(axis=1)[None, :, None] * wx.sum(axis=1)[None, None, :]
    out += outside * (1.0 - np.clip(covered, 0.0, 1.0))
    return out


def grid_from_rtdose(ds: Dataset) -> Grid:
    """The geometry of an RT Dose; UnsupportedPlan if it is not an axial grid with even slice steps."""
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    if not np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-4):
        raise UnsupportedPlan(f"the TPS dose grid is not axial (ImageOrientationPatient {iop})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    x0, y0 = (float(v) for v in ds.ImagePositionPatient[:2])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    offsets = np.array([float(v) for v in ds.get("GridFrameOffsetVector", [0.0])] if frames > 1 else [0.0])
    if len(offsets) != frames:
        raise UnsupportedPlan(f"the TPS dose has {len(offsets)} GridFrameOffsetVector values for {frames} frames")
    z = offsets + (float(ds.ImagePositionPatient[2]) if offsets[0] == 0.0 else 0.0)  # PS3.3 C.8.8.3.2
    if frames > 1:
        steps = np.diff(z)
        if steps.min() <= 0 or steps.max() - steps.min() > 10 * _TOL_MM:
            raise UnsupportedPlan("the TPS dose grid's frames are not equally spaced in increasing z")
        dz = float(steps.mean())
    else:
        dz = float(ds.get("SliceThickness", row_spacing) or row_spacing)
    return Grid.regular((frames, int(ds.Rows), int(ds.Columns)), origin=(float(z[0]), y0, x0),
                        spacing=(dz, row_spacing, col_spacing))


def check_inside(dose: Grid, ct: Grid) -> None:
    """UnsupportedPlan unless every dose voxel lies inside the CT's outer edges."""
    for name, (lo, hi), (lo_ct, hi_ct) in zip("zyx", dose.extent(), ct.extent(), strict=True):
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
        mask = rasterise_planes(contour_planes(ds, number), *grid.axes)
        if mask.any():
            return mask, name
    return None


def write_body(datasets: Sequence[Dataset], grid: Grid, frame_of_reference_uid: str, work_dir: Path,
               options: DoseOptions) -> dict[str, object]:
    """Rasterise the External contour on the scoring grid into ``work_dir/BODY_MASK`` (when there is
    one); the ShardInputs.extra entries that say which body the dose is kept inside."""
    extra: dict[str, object] = {"body_density_g_cm3": options.body_density_g_cm3}
    body = body_mask(datasets, grid, frame_of_reference_uid)
    if body is not None:
        np.save(work_dir / BODY_MASK, body[0], allow_pickle=False)
        extra["body"] = f"structure {body[1]!r}"
    else:
        extra["body"] = f"density >= {options.body_density_g_cm3:g} g/cm3"
    return extra


def _structure_set_for(ds: Dataset) -> str:
    for item in ds.get("ReferencedFrameOfReferenceSequence", []):
        return str(item.get("FrameOfReferenceUID", ""))
    return ""


def describe(grid: Grid) -> dict[str, Any]:
    """The grid as the job record keeps it: x first, like a DICOM point (journals written before the one
    axis order read the same)."""
    return {"shape_xyz": list(grid.shape[::-1]), "spacing_mm": [round(s, 4) for s in grid.spacing[::-1]],
            "origin_mm": [round(o, 3) for o in grid.origin[::-1]]}
