"""Dose comparison on a common grid: grids from DICOM, trilinear resampling, gamma, statistics, DVH.

Everything here is plain arrays in and numbers out; the journal, files and policy live in
`dicom_node.qa.secondcheck`, the pictures in `dicom_node.qa.report`.

Conventions (stated again in every report):

- Arrays are indexed [z, y, x] on a `cloud.grid.Grid` (the product's one grid, axis order z, y, x):
  voxel-centre coordinates in mm (DICOM patient coordinates), increasing. Only axis-aligned grids
  (ImageOrientationPatient 1,0,0,0,1,0) are read.
- The reference dose of gamma is the Monte Carlo dose, the evaluated (searched) dose the TPS's. The
  common grid is the MC grid (default) or the TPS grid; the other dose is interpolated trilinearly
  onto it (the numbers of scipy's RegularGridInterpolator); gamma searches the TPS dose on its own grid.
- An MC dose is a mean over each voxel, with no dose in air (outside the body, CT voxels under about
  0.05 g/cm3). On an MC grid coarser than the TPS's (4 mm against RayStation's 2 mm), the TPS dose is
  averaged the same way for the dose-weighted centres, the dose difference, the DVHs and the report's
  maps (`box_average`: its trilinear interpolant on 2 points per TPS step across each MC voxel, zero
  where the MC scores nothing). Taken at the voxel centres instead, the unshifted dose's centre read
  1.0 mm off along the beam on the real 4 mm check (a skin voxel holds the mean over its tissue part
  in the MC, nearly the full dose at its centre in the TPS). The region and the normalisation, what
  gamma is computed on and against, still take the TPS dose at the voxel centres.
- Evaluated region: voxels of the common grid that lie inside both dose grids, inside the body (the
  External ROI: RTROIInterpretedType EXTERNAL, else a ROI named like BODY/External; else CT voxels
  above -500 HU) and where the TPS or the MC dose reaches the low-dose threshold. MC dose in air and
  outside the TPS grid is never compared.
- Normalisation (global gamma, dose difference in %): the TPS dose's maximum inside the body, or the
  plan's prescription (DoseReferenceSequence target prescription dose) when the policy asks for it.
  The low-dose threshold is a percentage of the same value.
- Gamma is computed by `dicom_node.qa.gamma` (a pruned search; pymedphys.gamma is the reference it is
  measured against in bench/secondcheck.py).
- Structures are rasterised onto the common grid: a voxel belongs to a ROI when its centre lies
  inside the contour (matplotlib.path, even-odd rule for several contours on one plane) of the
  contour plane nearest to it, within half the contour plane spacing.
- D_p (the dose that the hottest p % of the volume receives) is the (100 - p)th percentile of the
  voxel doses in the structure, linear between voxels; every voxel has the same volume.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from cloud.grid import Grid
from dicom_node.errors import NodeError
from dicom_node.qa.gamma import DEFAULT_INTERP_FRACTION, gamma_at_points

LOGGER = logging.getLogger(__name__)

DVH_POINTS = (98, 95, 50, 2)
BODY_HU = -500.0  # without an External ROI, the body is the CT above this (water 0, lung about -700..-800)
# the engines score no dose in CT voxels under 0.05 g/cm3 (DoseOptions.body_density_g_cm3): about -950 HU
AIR_HU = -950.0
EXTERNAL_NAMES = ("external", "body", "outline", "skin", "ext")
BOX_POINTS_MAX = 8  # points per axis that average a finer TPS dose over one MC voxel

Axes = tuple[np.ndarray, np.ndarray, np.ndarray]


class ComparisonError(NodeError):
    """The two doses cannot be compared (units, orientation, grids apart); the message says why."""


@dataclass(frozen=True)
class Volume:
    """Values on a grid: ``values[k, j, i]`` lies at (grid.z[k], grid.y[j], grid.x[i])."""

    grid: Grid
    values: np.ndarray

    def __post_init__(self) -> None:
        if self.values.shape != self.grid.shape:
            raise ComparisonError(f"values of shape {self.values.shape} on a grid of {self.grid.shape}")


def _orientation_ok(ds: Dataset) -> None:
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    if not np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-4):
        raise ComparisonError(f"only axial grids with ImageOrientationPatient 1,0,0,0,1,0 are compared; got {iop}")


def _sorted_grid(z: np.ndarray, y: np.ndarray, x: np.ndarray, values: np.ndarray) -> Volume:
    """Flip any decreasing axis so that every axis increases."""
    for axis, coords in enumerate((z, y, x)):
        if len(coords) > 1 and coords[1] < coords[0]:
            values = np.flip(values, axis=axis)
    z, y, x = (np.sort(a) for a in (z, y, x))
    return Volume(Grid(z=z, y=y, x=x), np.ascontiguousarray(values))


def dose_from_rtdose(ds: Dataset, fractions: int | None = None, *, beam: bool = False) -> Volume:
    """The plan dose (Gy) of an RT Dose; a FRACTION dose is multiplied by `fractions`.

    With `beam`, one beam's dose (DoseSummationType BEAM: all fractions, as RayStation and Eclipse export
    it; BEAM_SESSION: one fraction) is read as well; `plan_dose` sums them.
    """
    units = str(ds.get("DoseUnits", "")).upper()
    if units != "GY":
        raise ComparisonError(f"DoseUnits is {units or 'missing'!r}, not GY")
    summation = str(ds.get("DoseSummationType", "PLAN")).upper()
    _orientation_ok(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    offsets = [float(v) for v in ds.get("GridFrameOffsetVector", [0.0])] if frames > 1 else [0.0]
    if len(offsets) != frames:
        raise ComparisonError(f"GridFrameOffsetVector has {len(offsets)} values for {frames} frames")
    # PS3.3 C.8.8.3.2: relative offsets start at 0; otherwise they are absolute z positions.
    z = np.asarray(offsets) + (ipp[2] if offsets[0] == 0.0 else 0.0)
    y = ipp[1] + row_spacing * np.arange(rows)
    x = ipp[0] + col_spacing * np.arange(cols)
    pixels = ds.pixel_array.reshape(frames, rows, cols).astype(np.float64)
    dose = pixels * float(ds.get("DoseGridScaling", 1.0))
    per_fraction = ("FRACTION", "BEAM_SESSION") if beam else ("FRACTION",)
    if summation in per_fraction:
        if not fractions:
            raise ComparisonError(f"the TPS dose is per fraction ({summation}) and the plan has no "
                                  "NumberOfFractionsPlanned")
        dose = dose * fractions
    elif summation not in ("PLAN", "MULTI_PLAN") and not (beam and summation == "BEAM"):
        raise ComparisonError(f"DoseSummationType {summation} is not a plan dose; send the plan sum")
    return _sorted_grid(z, y, x, dose)


def plan_dose(doses: list[Dataset], fractions: int | None = None) -> Volume:
    """One plan dose from one RT Dose, or the sum of the per-beam RT Doses of every beam (same grid)."""
    if len(doses) == 1:
        return dose_from_rtdose(doses[0], fractions)
    grids = [dose_from_rtdose(ds, fractions, beam=True) for ds in doses]
    first = grids[0]
    total = first.values.copy()
    for g in grids[1:]:
        same = g.values.shape == first.values.shape and all(
            np.allclose(a, b, atol=1e-3) for a, b in zip(g.grid.axes, first.grid.axes, strict=True))
        if not same:
            raise ComparisonError(f"per-beam TPS doses on different grids cannot be summed: {first.grid.describe()}; "
                                  f"{g.grid.describe()}")
        total += g.values
    return Volume(first.grid, total)


def uniform_grid(volume: Volume) -> Volume:
    """The volume itself when evenly spaced on every axis, else resampled onto its smallest spacing."""
    axes = []
    changed = False
    for a in volume.grid.axes:
        steps = np.diff(a)
        if len(a) > 1 and np.max(np.abs(steps - steps.mean())) > 1e-3 * abs(steps.mean()):
            step = float(steps.min())
            a = np.arange(a[0], a[-1] + step / 2, step)
            changed = True
        axes.append(a)
    if not changed:
        return volume
    return Volume(Grid(axes[0], axes[1], axes[2]), resample(volume, (axes[0], axes[1], axes[2]), fill=0.0))


def ct_from_datasets(cts: list[Dataset]) -> Volume:
    """CT numbers (HU) as a grid, slices sorted by z."""
    cts = sorted(cts, key=lambda d: float(d.ImagePositionPatient[2]))
    first = cts[0]
    _orientation_ok(first)
    ipp = [float(v) for v in first.ImagePositionPatient]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    vol = np.stack([d.pixel_array.astype(np.float32) * float(d.get("RescaleSlope", 1))
                    + float(d.get("RescaleIntercept", 0)) for d in cts])
    z = np.array([float(d.ImagePositionPatient[2]) for d in cts])
    y = ipp[1] + row_spacing * np.arange(int(first.Rows))
    x = ipp[0] + col_spacing * np.arange(int(first.Columns))
    return _sorted_grid(z, y, x, vol)


def overlap_fraction(a: Grid, b: Grid) -> float:
    """Share of a's bounding box that lies inside b's (0 when they do not overlap)."""
    share = 1.0
    for (a0, a1), (b0, b1) in zip(a.bounds(), b.bounds(), strict=True):
        length = a1 - a0
        inter = min(a1, b1) - max(a0, b0)
        if inter < 0 or (length == 0 and inter < 0):
            return 0.0
        share *= inter / length if length > 0 else 1.0
    return share


def _axis_weights(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each dst coordinate: the src index below it, the weight of the one above, and whether it is inside."""
    if len(src) == 1:  # a single plane: a thickness of one voxel-width around it (nearest)
        inside = np.abs(dst - src[0]) <= 0.5 + 1e-9
        return np.zeros(len(dst), dtype=np.intp), np.zeros(len(dst)), inside
    inside = (dst >= src[0] - 1e-9) & (dst <= src[-1] + 1e-9)
    idx = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, len(src) - 2)
    w = np.clip((dst - src[idx]) / (src[idx + 1] - src[idx]), 0.0, 1.0)
    return idx, w, inside


def resample(src: Volume, onto: tuple[np.ndarray, np.ndarray, np.ndarray], fill: float = np.nan) -> np.ndarray:
    """src's values interpolated trilinearly at every voxel centre of the grid `onto` (z, y, x).

    Points outside src's grid get `fill`. Trilinear interpolation on a rectilinear grid is separable:
    linear along x, then y, then z (the same numbers as scipy's RegularGridInterpolator, a few times faster).
    """
    values = np.asarray(src.values, dtype=np.float64)
    inside_all = []
    for axis, (coords, target) in enumerate(zip(src.grid.axes, onto, strict=True)):
        idx, w, inside = _axis_weights(np.asarray(coords, dtype=np.float64), np.asarray(target, dtype=np.float64))
        shape = [1, 1, 1]
        shape[axis] = len(target)
        w = w.reshape(shape)
        upper = np.minimum(idx + 1, values.shape[axis] - 1)
        values = np.take(values, idx, axis=axis) * (1.0 - w) + np.take(values, upper, axis=axis) * w
        inside_all.append(inside)
    iz, iy, ix = inside_all
    outside = ~(iz[:, None, None] & iy[None, :, None] & ix[None, None, :])
    if outside.any():
        values[outside] = fill
    return values


def _edges(centres: np.ndarray) -> np.ndarray:
    """Voxel boundaries along one axis: halfway between centres, half a step beyond the outer ones."""
    c = np.asarray(centres, dtype=np.float64)
    if len(c) == 1:
        return np.array([c[0], c[0]])
    mid = (c[1:] + c[:-1]) / 2.0
    return np.concatenate([[2.0 * c[0] - mid[0]], mid, [2.0 * c[-1] - mid[-1]]])


def points_per_axis(src: Grid, onto: Grid, most: int = BOX_POINTS_MAX) -> tuple[int, int, int]:
    """How many points along each axis average the src dose over one voxel of `onto`.

    One (the voxel centre) where `onto`'s voxels are no wider than src's steps; else at least two points
    per src step across the voxel (the trilinear interpolant is linear between src planes, so the
    midpoint rule on that many points is close to its integral), at most `most`.
    """
    out = []
    for a_src, a_dst in zip(src.axes, onto.axes, strict=True):
        if len(a_src) < 2 or len(a_dst) < 2:
            out.append(1)
            continue
        step_src = float(np.min(np.diff(a_src)))
        width = float(np.max(np.diff(_edges(a_dst))))
        out.append(1 if width <= step_src * (1.0 + 1e-6) else min(most, math.ceil(2.0 * width / step_src - 1e-6)))
    return out[0], out[1], out[2]


def _cell_means(v: np.ndarray) -> np.ndarray:
    """[k, a, j, b, i, c] -> [k, j, i]: the mean over a, b, c of the values that are not NaN (NaN if none)."""
    valid = ~np.isnan(v)
    if valid.all():
        return np.asarray(v.mean(axis=5).mean(axis=3).mean(axis=1))
    count = valid.sum(axis=5).sum(axis=3).sum(axis=1)
    total = np.where(valid, v, 0.0).sum(axis=5).sum(axis=3).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def box_average(src: Volume, onto: Grid, within: Callable[[Axes], np.ndarray] | None = None,
                points: tuple[int, int, int] | None = None, chunk_points: int = 1_000_000,
                known: np.ndarray | None = None) -> np.ndarray:
    """The mean of src's trilinear interpolant over each voxel of `onto` (NaN where its centre is outside src).

    The mean is taken on n_z x n_y x n_x evenly spread points in each voxel (`points_per_axis`), the
    midpoint rule: a dose that a Monte Carlo engine scores in a voxel is its mean over the voxel, so a
    finer TPS dose is compared like with like only once it is averaged the same way. With `within` (a mask
    on any grid of points), each point's dose is weighted by the share of its cell inside it (looked at on
    2 x 2 x 2 points), as the MC scores no dose outside the body, and the interpolant is weighted by
    src's points where it is `known` (a mask on src's grid; default: `within` there) only (normalised
    convolution: a TPS dose is zero at its points outside the body, which would otherwise pull the dose
    down between the last point inside and the surface). Points outside src's grid are left out of the
    mean. A few planes of `onto` at a time, so the points never take more than `chunk_points` values.
    """
    nz, ny, nx = points or points_per_axis(src.grid, onto)
    sub_axes = []
    for a, n in zip(onto.axes, (nz, ny, nx), strict=True):
        e = _edges(a)
        frac = (np.arange(n) + 0.5) / n
        sub_axes.append(a[:, None] if n == 1 else e[:-1, None] + (e[1:] - e[:-1])[:, None] * frac[None, :])
    sz, sy, sx = (s.ravel() for s in sub_axes)
    # the body is looked at on twice as fine points (a fraction of each point's cell inside it): where it
    # cuts a voxel matters as much as the dose there
    half = []
    for a, n in zip(onto.axes, (nz, ny, nx), strict=True):
        e = _edges(a)
        frac = (np.arange(2 * n) + 0.5) / (2 * n)
        half.append((e[:-1, None] + (e[1:] - e[:-1])[:, None] * frac[None, :]).ravel())
    hz, hy, hx = half
    weights = weighted = None
    if within is not None:
        inside_src = (within(src.grid.axes) if known is None else known).astype(np.float64)
        weights = Volume(src.grid, inside_src)
        weighted = Volume(src.grid, np.asarray(src.values, dtype=np.float64) * inside_src)
    ny_all, nx_all = len(onto.y), len(onto.x)
    out = np.empty(onto.shape, dtype=np.float64)
    planes = max(1, chunk_points // max(1, nz * len(sy) * len(sx)))
    for k0 in range(0, len(onto.z), planes):
        k1 = min(len(onto.z), k0 + planes)
        axes_k = (sz[k0 * nz:k1 * nz], sy, sx)
        if weights is None or weighted is None or within is None:
            v = resample(src, axes_k)
        else:
            w = resample(weights, axes_k)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = np.where(w > 0, resample(weighted, axes_k) / w, 0.0)  # NaN stays NaN outside src
            v[np.isnan(w)] = np.nan
            cells = within((hz[2 * k0 * nz:2 * k1 * nz], hy, hx)).view(np.uint8).reshape(
                (k1 - k0) * nz, 2, ny_all * ny, 2, nx_all * nx, 2)
            share = np.zeros(v.shape, dtype=np.uint8)
            for pz in (0, 1):  # the 2 x 2 x 2 points of each cell, added slice by slice (fast, unlike a
                for py in (0, 1):  # sum over three strided axes)
                    for px in (0, 1):
                        share += cells[:, pz, :, py, :, px]
            v *= share / 8.0
        out[k0:k1] = _cell_means(v.reshape(k1 - k0, nz, ny_all, ny, nx_all, nx))
    centre_inside = ~np.isnan(resample(src, onto.axes))
    out[~centre_inside] = np.nan
    return out


def dose_support(mc: Volume, tps: Volume) -> tuple[slice, slice, slice]:
    """The index ranges of the MC grid outside which both doses are zero (the MC's voxels, the TPS's
    interpolant averaged over them): the box where averaging the TPS dose can change anything."""
    out = []
    for axis, (a_mc, a_tps) in enumerate(zip(mc.grid.axes, tps.grid.axes, strict=True)):
        others = tuple(j for j in range(3) if j != axis)
        e = _edges(a_mc)
        lo, hi = np.inf, -np.inf
        on_mc = np.nonzero(np.any(np.asarray(mc.values) > 0, axis=others))[0]
        if on_mc.size:
            lo, hi = e[on_mc[0]], e[on_mc[-1] + 1]
        on_tps = np.nonzero(np.any(np.asarray(tps.values) > 0, axis=others))[0]
        if on_tps.size:  # the interpolant reaches one TPS step beyond its last point with dose
            step = float(np.max(np.diff(a_tps))) if len(a_tps) > 1 else 0.0
            lo = min(lo, float(a_tps[on_tps[0]]) - step)
            hi = max(hi, float(a_tps[on_tps[-1]]) + step)
        first = int(np.searchsorted(e, lo, side="right")) - 1  # the voxel that holds lo, and the one that holds hi
        last = int(np.searchsorted(e, hi, side="left"))
        out.append(slice(max(0, first), max(max(0, first), min(len(a_mc), last))))
    return out[0], out[1], out[2]


def gamma_summary(g: np.ndarray, max_gamma: float | None) -> dict[str, Any]:
    valid = g[np.isfinite(g)]
    n = int(valid.size)
    if n == 0:
        return {"evaluated_voxels": 0, "passed_voxels": 0, "pass_rate_percent": None}
    passed = int(np.count_nonzero(valid <= 1.0))
    return {
        "evaluated_voxels": n,
        "passed_voxels": passed,
        "pass_rate_percent": round(100.0 * passed / n, 3),
        "mean_gamma": round(float(valid.mean()), 4),
        "gamma_p95": round(float(np.percentile(valid, 95)), 4),
        "max_gamma": round(float(valid.max()), 4),
        "capped_at": max_gamma,
    }


def dose_difference_stats(reference: np.ndarray, evaluated: np.ndarray, region: np.ndarray,
                          normalisation_gy: float) -> dict[str, Any]:
    """evaluated - reference over the region; Gy and % of the normalisation dose."""
    diff = (evaluated - reference)[region]
    if diff.size == 0:
        return {"voxels": 0}
    pct = 100.0 * diff / normalisation_gy
    high = region & (reference >= 0.5 * normalisation_gy) & (evaluated >= 0.5 * normalisation_gy)
    ratio = (evaluated[high] / reference[high]) if high.any() else None
    return {
        "voxels": int(diff.size),
        "normalisation_gy": round(normalisation_gy, 5),
        "reference_max_gy": round(float(reference[region].max()), 5),
        "evaluated_max_gy": round(float(evaluated[region].max()), 5),
        "mean_gy": round(float(diff.mean()), 5),
        "sd_gy": round(float(diff.std()), 5),
        "mean_percent": round(float(pct.mean()), 3),
        "median_percent": round(float(np.median(pct)), 3),
        "sd_percent": round(float(pct.std()), 3),
        "p1_percent": round(float(np.percentile(pct, 1)), 3),
        "p99_percent": round(float(np.percentile(pct, 99)), 3),
        "max_abs_percent": round(float(np.abs(pct).max()), 3),
        "within_2_percent": round(100.0 * float(np.mean(np.abs(pct) <= 2.0)), 3),
        "within_3_percent": round(100.0 * float(np.mean(np.abs(pct) <= 3.0)), 3),
        "high_dose_ratio_percent": None if ratio is None else round(100.0 * (float(np.median(ratio)) - 1.0), 3),
    }


# --- structures ---------------------------------------------------------------------------


@dataclass
class Structure:
    name: str
    color: tuple[int, int, int]
    # contour plane z (mm) -> polygons [(x, y) arrays]
    planes: dict[float, list[np.ndarray]] = field(default_factory=dict)
    roi_type: str = ""  # RTROIInterpretedType: EXTERNAL, PTV, ORGAN, ...


def structures_from_rtstruct(ds: Dataset) -> list[Structure]:
    names = {int(r.ROINumber): str(r.get("ROIName", f"ROI {r.ROINumber}"))
             for r in ds.get("StructureSetROISequence", [])}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "")).upper()
             for o in ds.get("RTROIObservationsSequence", []) if "ReferencedROINumber" in o}
    out = []
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        color = tuple(int(c) for c in roi.get("ROIDisplayColor", [255, 255, 0]))
        s = Structure(names.get(number, f"ROI {number}"), color, roi_type=types.get(number, ""))  # type: ignore[arg-type]
        for c in roi.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                continue
            pts = np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3)
            if len(pts) < 3:
                continue
            z = round(float(pts[0, 2]), 3)
            s.planes.setdefault(z, []).append(pts[:, :2])
        if s.planes:
            out.append(s)
    return out


def find_body(structures: list[Structure]) -> Structure | None:
    """The External ROI: RTROIInterpretedType EXTERNAL, else the first named like External/BODY."""
    for s in structures:
        if s.roi_type == "EXTERNAL":
            return s
    for s in structures:
        if s.name.strip().lower() in EXTERNAL_NAMES:
            return s
    return None


def rasterise(structure: Structure, axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Boolean mask [z, y, x]: voxel centre inside the nearest contour plane's polygons (even-odd)."""
    from matplotlib.path import Path as MplPath

    z, y, x = axes
    mask = np.zeros((len(z), len(y), len(x)), dtype=bool)
    planes = np.array(sorted(structure.planes))
    step = float(np.median(np.diff(planes))) if len(planes) > 1 else (
        float(np.mean(np.diff(z))) if len(z) > 1 else 1.0)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    centres = np.column_stack([xx.ravel(), yy.ravel()])
    cache: dict[float, np.ndarray] = {}
    for k, zk in enumerate(z):
        nearest = planes[np.argmin(np.abs(planes - zk))]
        if abs(nearest - zk) > step / 2.0 + 1e-6:
            continue
        if nearest not in cache:
            plane = np.zeros(yy.size, dtype=bool)
            for poly in structure.planes[float(nearest)]:
                inside = MplPath(poly).contains_points(centres)
                plane ^= inside
            cache[nearest] = plane.reshape(yy.shape)
        mask[k] = cache[nearest]
    return mask


def dvh_metrics(dose: np.ndarray, mask: np.ndarray, voxel_volume_cc: float) -> dict[str, float | None]:
    values = dose[mask]
    out: dict[str, float | None] = {"volume_cc": round(float(values.size) * voxel_volume_cc, 4)}
    if values.size == 0:
        out.update({"mean": None, **{f"D{p}": None for p in DVH_POINTS}})
        return out
    out["mean"] = round(float(values.mean()), 5)
    for p in DVH_POINTS:
        out[f"D{p}"] = round(float(np.percentile(values, 100 - p)), 5)
    return out


def cumulative_dvh(dose: np.ndarray, mask: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Percent of the structure's volume receiving at least each dose in `bins`."""
    values = np.sort(dose[mask])
    if values.size == 0:
        return np.zeros_like(bins)
    return np.asarray(100.0 * (values.size - np.searchsorted(values, bins, side="left")) / values.size)


# --- the whole comparison ----------------------------------------------------------------


@dataclass
class Comparison:
    """Both doses on the common grid, the gamma maps and every number the report and journal need."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    mc: np.ndarray
    tps: np.ndarray
    region: np.ndarray  # the evaluated voxels
    body: np.ndarray
    gammas: dict[str, np.ndarray]  # NaN outside the region
    masks: dict[str, np.ndarray]
    colors: dict[str, tuple[int, int, int]]
    numbers: dict[str, Any]
    normalisation_gy: float = 0.0
    threshold_gy: float = 0.0


def centroid_shift(axes: tuple[np.ndarray, np.ndarray, np.ndarray], mc: np.ndarray, tps: np.ndarray,
                   inside: np.ndarray) -> dict[str, float] | None:
    """Dose-weighted centre of the TPS dose minus that of the MC dose (mm), inside the body.

    The same voxels weigh both doses, so a dose scaled by any factor has the same centre: a non-zero
    value says the dose sits elsewhere, not that it is higher. Both must be voxel means on a coarse MC
    grid (`box_average`), or the grid alone moves the centres apart.
    """
    centres = []
    for dose in (mc, tps):
        w = np.where(inside, np.clip(dose, 0.0, None), 0.0)
        total = float(w.sum())
        if total <= 0:
            return None
        centres.append([float(np.sum(w.sum(axis=tuple(j for j in range(3) if j != k)) * a)) / total
                        for k, a in enumerate(axes)])
    dz, dy, dx = (t - m for t, m in zip(centres[1], centres[0], strict=True))
    return {"x_mm": round(dx, 3), "y_mm": round(dy, 3), "z_mm": round(dz, 3),
            "magnitude_mm": round(float(np.sqrt(dx * dx + dy * dy + dz * dz)), 3)}


def body_rule(axes: Axes, structures: list[Structure], ct: Volume | None
              ) -> tuple[Callable[[Axes], np.ndarray] | None, str]:
    """How to tell where the patient is at any points (a mask on a grid of them; None: everywhere), chosen
    on the grid `axes`, and how (for the report): the External ROI, else the CT above BODY_HU."""
    body = find_body(structures)
    if body is not None and rasterise(body, axes).any():
        kind = "type EXTERNAL" if body.roi_type == "EXTERNAL" else "named like an External"
        return (lambda a: rasterise(body, a)), f"ROI {body.name!r} ({kind})"
    if ct is not None and (resample(ct, axes, fill=-1000.0) > BODY_HU).any():
        return (lambda a: resample(ct, a, fill=-1000.0) > BODY_HU), f"CT above {BODY_HU:g} HU (no External ROI)"
    return None, "whole grid (no External ROI, no CT)"


def nearest(src: Volume, onto: Axes, fill: float | bool) -> np.ndarray:
    """src's value of the voxel each point of the grid `onto` lies in (`fill` outside src's voxels)."""
    out = np.asarray(src.values)
    for axis, (coords, target) in enumerate(zip(src.grid.axes, onto, strict=True)):
        e = _edges(coords)
        t = np.asarray(target, dtype=np.float64)
        index = np.clip(np.searchsorted(e, t, side="right") - 1, 0, len(coords) - 1)
        out = np.take(out, index, axis=axis)  # one axis at a time: a gather, far cheaper than np.ix_
        outside = (t < e[0]) | (t > e[-1])
        if outside.any():
            out = out.copy() if out.base is not None else out
            np.moveaxis(out, axis, 0)[outside] = fill
    return out


def scored_rule(rule: Callable[[Axes], np.ndarray] | None, ct: Volume | None
                ) -> Callable[[Axes], np.ndarray] | None:
    """Where an MC engine scores dose: inside the body and, with a CT, in its voxels above AIR_HU."""
    if ct is None:
        return rule
    dense = Volume(ct.grid, np.asarray(ct.values) > AIR_HU)

    def scored(a: Axes) -> np.ndarray:
        inside = nearest(dense, a, fill=False)
        return inside if rule is None else inside & rule(a)

    return scored


def body_mask(axes: Axes, structures: list[Structure], ct: Volume | None) -> tuple[np.ndarray, str]:
    """Where the patient is on the grid `axes`, and how that was found (for the report)."""
    rule, source = body_rule(axes, structures, ct)
    if rule is None:
        return np.ones(tuple(len(a) for a in axes), dtype=bool), source
    return rule(axes), source


def compare(mc: Volume, tps: Volume, criteria: list[tuple[float, float]], *, low_dose_percent: float = 10.0,
            max_gamma: float = 2.0, resample_direction: str = "tps_to_mc",
            structures: list[Structure] | None = None, ct: Volume | None = None,
            prescription_gy: float | None = None) -> Comparison:
    """Compare the TPS dose (evaluated) with the MC dose (reference) on one grid, inside the body.

    Normalisation: `prescription_gy` when given, else the TPS dose's maximum inside the body.
    """
    if float(mc.values.max()) <= 0:
        raise ComparisonError("the MC dose is zero everywhere")
    share = overlap_fraction(mc.grid, tps.grid)
    if share <= 0:
        raise ComparisonError(f"dose grids do not overlap: MC {mc.grid.describe()}; TPS {tps.grid.describe()}")
    structures = structures or []
    start = time.perf_counter()
    box_points = (1, 1, 1)
    if resample_direction == "tps_to_mc":
        axes, common = mc.grid.axes, mc.grid
        ref = mc.values
        tps_on = resample(tps, axes)
        both = ~np.isnan(tps_on)
        ev = np.where(both, tps_on, 0.0)
        box_points = points_per_axis(tps.grid, mc.grid)
        method = "TPS dose interpolated trilinearly onto the MC grid"
    elif resample_direction == "mc_to_tps":
        axes, common = tps.grid.axes, tps.grid
        mc_on = resample(mc, axes)
        both = ~np.isnan(mc_on)
        ref = np.where(both, mc_on, 0.0)
        ev = tps.values
        method = "MC dose interpolated trilinearly onto the TPS grid"
    else:
        raise ComparisonError(f"unknown resample direction {resample_direction!r}")
    resample_s = time.perf_counter() - start
    start = time.perf_counter()
    rule, body_source = body_rule(axes, structures, ct)
    body = np.ones(ref.shape, dtype=bool) if rule is None else rule(axes)
    inside = body & both
    if not inside.any():
        raise ComparisonError(f"no voxel lies inside the body ({body_source}) and both dose grids")
    tps_max_body = float(ev[inside].max())
    if prescription_gy:
        norm, norm_source = float(prescription_gy), f"prescription {prescription_gy:g} Gy"
    else:
        norm, norm_source = tps_max_body, f"TPS maximum inside the body {tps_max_body:.4g} Gy"
    if norm <= 0:
        raise ComparisonError("the TPS dose is zero everywhere inside the body")
    threshold = norm * low_dose_percent / 100.0
    region = inside & ((ev >= threshold) | (ref >= threshold))
    n_region = int(np.count_nonzero(region))
    mc_outside = ref[~body]
    region_s = time.perf_counter() - start
    # Region and normalisation (what gamma is computed on and against) take the TPS dose at the voxel
    # centres. The centres, the dose difference, the DVHs and the report's maps compare it with the MC's
    # voxel means: on an MC grid coarser than the TPS's, the TPS dose averaged over each MC voxel too.
    box_s = 0.0
    if box_points != (1, 1, 1):
        t0 = time.perf_counter()
        # only where either dose is not zero: elsewhere the mean and the centre value are both 0
        box = dose_support(mc, tps)
        zs, ys, xs = (a[b] for a, b in zip(axes, box, strict=True))
        if zs.size and ys.size and xs.size:
            part = box_average(tps, Grid(zs, ys, xs), scored_rule(rule, ct), box_points,
                               known=None if rule is None else rule(tps.grid.axes))
            ev[box] = np.where(both[box], np.nan_to_num(part, nan=0.0), 0.0)
        box_s = time.perf_counter() - t0
        nz, ny, nx = box_points
        method = (f"TPS dose averaged over each MC voxel ({nx}x{ny}x{nz} points of its trilinear interpolant, "
                  "zero outside the body and in the CT's air) for the centres, dose difference, DVHs and maps; "
                  "interpolated trilinearly at the voxel centres for the region and normalisation")
    shift = centroid_shift(axes, ref, ev, inside)
    searched = uniform_grid(tps)
    z, y, x = axes
    kk, jj, ii = np.nonzero(region)
    points = np.column_stack([z[kk], y[jj], x[ii]])
    ref_points = ref[region]
    gammas: dict[str, np.ndarray] = {}
    gamma_numbers: dict[str, Any] = {}
    for dose_pct, dist_mm in criteria:
        key = f"{dose_pct:g}%/{dist_mm:g}mm"
        t0 = time.perf_counter()
        values = gamma_at_points(points, ref_points, searched.grid.axes, searched.values, dose_pct / 100.0 * norm,
                                 dist_mm, max_gamma=max_gamma)
        g = np.full(ref.shape, np.nan)
        g[region] = values
        gammas[key] = g
        gamma_numbers[key] = {**gamma_summary(g, max_gamma), "seconds": round(time.perf_counter() - t0, 3)}
    start = time.perf_counter()
    masks: dict[str, np.ndarray] = {}
    colors: dict[str, tuple[int, int, int]] = {}
    rows = []
    for s in structures:
        mask = rasterise(s, axes) & both
        masks[s.name] = mask
        colors[s.name] = s.color
        rows.append({"name": s.name, "type": s.roi_type, "mc": dvh_metrics(ref, mask, common.voxel_volume_cm3),
                     "tps": dvh_metrics(ev, mask, common.voxel_volume_cm3)})
    dvh_s = time.perf_counter() - start
    numbers = {
        "method": {
            "reference": "MC", "evaluated": "TPS", "resample": resample_direction, "resample_method": method,
            "common_grid": common.describe(), "mc_grid": mc.grid.describe(), "tps_grid": tps.grid.describe(),
            "gamma": "global 3D, pruned search (dicom_node.qa.gamma), TPS dose searched on its own grid",
            "normalisation": "prescription" if prescription_gy else "tps_max_in_body",
            "normalisation_source": norm_source, "normalisation_gy": round(norm, 5),
            "low_dose_threshold_percent": low_dose_percent, "low_dose_threshold_gy": round(threshold, 5),
            "body": body_source,
            "region": "inside the body, inside both dose grids, TPS or MC dose >= the low-dose threshold",
            "interp_fraction": DEFAULT_INTERP_FRACTION, "max_gamma": max_gamma,
            "rasterisation": "voxel centre in contour (matplotlib.path, even-odd), nearest contour plane",
            "dvh": "D_p = (100-p)th percentile of voxel doses in the structure (inside both grids)",
        },
        "coverage": {
            "overlap_of_mc_box_percent": round(100.0 * share, 3),
            "evaluated_voxels": n_region,
            "body_voxels": int(np.count_nonzero(body)),
            "body_voxels_outside_other_grid": int(np.count_nonzero(body & ~both)),
            "mc_max_outside_body_gy": round(float(mc_outside.max()), 5) if mc_outside.size else None,
        },
        "seconds": {"resample": round(resample_s, 3), "region": round(region_s, 3), "box_average": round(box_s, 3),
                    "dvh": round(dvh_s, 3)},
        "gamma": gamma_numbers,
        "shift": shift,
        "dose_difference": dose_difference_stats(ref, ev, region, norm),
        "structures": rows,
    }
    return Comparison(axes=axes, mc=ref, tps=ev, region=region, body=body, gammas=gammas, masks=masks,
                      colors=colors, numbers=numbers, normalisation_gy=norm, threshold_gy=threshold)
