"""Dose comparison on a common grid: grids from DICOM, trilinear resampling, gamma, statistics, DVH.

Everything here is plain arrays in and numbers out; the journal, files and policy live in
`dicom_node.qa.secondcheck`, the pictures in `dicom_node.qa.report`.

Conventions (stated again in every report):

- Arrays are indexed [z, y, x]; axes are voxel-centre coordinates in mm (DICOM patient
  coordinates), increasing. Only axis-aligned grids (ImageOrientationPatient 1,0,0,0,1,0) are read.
- The reference dose is the Monte Carlo dose; the evaluated dose is the TPS's. One of the two is
  interpolated trilinearly (scipy's RegularGridInterpolator) onto the other's grid; an evaluated
  voxel outside its own grid counts as 0 Gy, so a TPS grid that misses dose fails rather than hides it.
- Gamma is pymedphys.gamma, global: dose criterion in percent of the reference maximum; voxels whose
  reference dose is below the low-dose threshold (percent of the same maximum) are not evaluated.
- Structures are rasterised onto the common grid: a voxel belongs to a ROI when its centre lies
  inside the contour (matplotlib.path, even-odd rule for several contours on one plane) of the
  contour plane nearest to it, within half the contour plane spacing.
- D_p (the dose that the hottest p % of the volume receives) is the (100 - p)th percentile of the
  voxel doses in the structure, linear between voxels; every voxel has the same volume.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import NodeError

LOGGER = logging.getLogger(__name__)

DVH_POINTS = (98, 95, 50, 2)
INTERP_FRACTION = 10  # pymedphys's default: search step = distance criterion / 10
INTERP_ALGO = "pymedphys"


class ComparisonError(NodeError):
    """The two doses cannot be compared (units, orientation, grids apart); the message says why."""


@dataclass(frozen=True)
class Grid:
    """Values on a rectilinear grid: axes (z, y, x) in mm, increasing; values [z, y, x]."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    values: np.ndarray

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.z, self.y, self.x)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.mean(np.diff(a))) if len(a) > 1 else 0.0 for a in self.axes)  # type: ignore[return-value]

    @property
    def voxel_volume_cc(self) -> float:
        dz, dy, dx = self.spacing
        return abs(dz * dy * dx) / 1000.0

    def bounds(self) -> list[tuple[float, float]]:
        return [(float(a[0]), float(a[-1])) for a in self.axes]

    def describe(self) -> str:
        dz, dy, dx = self.spacing
        (z0, z1), (y0, y1), (x0, x1) = self.bounds()
        nz, ny, nx = self.values.shape
        return (f"{nx}x{ny}x{nz} voxels of {dx:.2f}x{dy:.2f}x{dz:.2f} mm, "
                f"x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f}, z {z0:.1f}..{z1:.1f} mm")


def _orientation_ok(ds: Dataset) -> None:
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    if not np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-4):
        raise ComparisonError(f"only axial grids with ImageOrientationPatient 1,0,0,0,1,0 are compared; got {iop}")


def _sorted_grid(z: np.ndarray, y: np.ndarray, x: np.ndarray, values: np.ndarray) -> Grid:
    """Flip any decreasing axis so that every axis increases."""
    for axis, coords in enumerate((z, y, x)):
        if len(coords) > 1 and coords[1] < coords[0]:
            values = np.flip(values, axis=axis)
    z, y, x = (np.sort(a) for a in (z, y, x))
    return Grid(z=z, y=y, x=x, values=np.ascontiguousarray(values))


def dose_from_rtdose(ds: Dataset, fractions: int | None = None) -> Grid:
    """The plan dose (Gy) of an RT Dose; a FRACTION dose is multiplied by `fractions`."""
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
    if summation == "FRACTION":
        if not fractions:
            raise ComparisonError("the TPS dose is per FRACTION and the plan has no NumberOfFractionsPlanned")
        dose = dose * fractions
    elif summation not in ("PLAN", "MULTI_PLAN"):
        raise ComparisonError(f"DoseSummationType {summation} is not a plan dose; send the plan sum")
    return _sorted_grid(z, y, x, dose)


def ct_from_datasets(cts: list[Dataset]) -> Grid:
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


def resample(src: Grid, onto: tuple[np.ndarray, np.ndarray, np.ndarray], fill: float = np.nan) -> np.ndarray:
    """src's values interpolated trilinearly at every voxel centre of the grid `onto` (z, y, x).

    Points outside src's grid get `fill`. Done one plane at a time to keep memory flat on CT-sized grids.
    """
    from scipy.interpolate import RegularGridInterpolator

    axes = []
    values = src.values
    for axis, coords in enumerate(src.axes):
        if len(coords) == 1:  # a single plane: give it a thickness of one voxel-width (nearest)
            coords = np.array([coords[0] - 0.5, coords[0] + 0.5])
            values = np.repeat(values, 2, axis=axis)
        axes.append(coords)
    interp = RegularGridInterpolator(tuple(axes), values, method="linear", bounds_error=False, fill_value=fill)
    z, y, x = onto
    yy, xx = np.meshgrid(y, x, indexing="ij")
    out = np.empty((len(z), len(y), len(x)), dtype=np.float64)
    for k, zk in enumerate(z):
        pts = np.column_stack([np.full(yy.size, zk), yy.ravel(), xx.ravel()])
        out[k] = interp(pts).reshape(yy.shape)
    return out


def gamma(axes: tuple[np.ndarray, np.ndarray, np.ndarray], reference: np.ndarray, evaluated: np.ndarray,
          dose_percent: float, distance_mm: float, low_dose_percent: float = 10.0,
          max_gamma: float | None = 2.0) -> np.ndarray:
    """Global 3D gamma of `evaluated` against `reference` (same grid); NaN where not evaluated."""
    import pymedphys

    return np.asarray(pymedphys.gamma(
        axes, reference, axes, evaluated, dose_percent, distance_mm,
        lower_percent_dose_cutoff=low_dose_percent, interp_fraction=INTERP_FRACTION, max_gamma=max_gamma,
        local_gamma=False, global_normalisation=float(np.max(reference)), skip_once_passed=False,
        interp_algo=INTERP_ALGO,
    ))


def gamma_summary(g: np.ndarray, max_gamma: float | None) -> dict[str, Any]:
    valid = g[np.isfinite(g)]
    n = int(valid.size)
    if n == 0:
        return {"evaluated_voxels": 0, "pass_rate_percent": None}
    return {
        "evaluated_voxels": n,
        "pass_rate_percent": round(100.0 * float(np.count_nonzero(valid <= 1.0)) / n, 3),
        "mean_gamma": round(float(valid.mean()), 4),
        "gamma_p95": round(float(np.percentile(valid, 95)), 4),
        "max_gamma": round(float(valid.max()), 4),
        "capped_at": max_gamma,
    }


def dose_difference_stats(reference: np.ndarray, evaluated: np.ndarray, low_dose_percent: float) -> dict[str, Any]:
    """evaluated - reference over voxels with reference >= threshold; Gy and % of the reference maximum."""
    dmax = float(reference.max())
    mask = reference >= dmax * low_dose_percent / 100.0
    diff = (evaluated - reference)[mask]
    pct = 100.0 * diff / dmax if dmax > 0 else diff * 0
    if diff.size == 0:
        return {"voxels": 0}
    return {
        "voxels": int(diff.size),
        "reference_max_gy": round(dmax, 5),
        "evaluated_max_gy": round(float(evaluated.max()), 5),
        "mean_gy": round(float(diff.mean()), 5),
        "sd_gy": round(float(diff.std()), 5),
        "mean_percent": round(float(pct.mean()), 3),
        "sd_percent": round(float(pct.std()), 3),
        "p1_percent": round(float(np.percentile(pct, 1)), 3),
        "p99_percent": round(float(np.percentile(pct, 99)), 3),
        "max_abs_percent": round(float(np.abs(pct).max()), 3),
        "within_2_percent": round(100.0 * float(np.mean(np.abs(pct) <= 2.0)), 3),
        "within_3_percent": round(100.0 * float(np.mean(np.abs(pct) <= 3.0)), 3),
    }


# --- structures ---------------------------------------------------------------------------


@dataclass
class Structure:
    name: str
    color: tuple[int, int, int]
    # contour plane z (mm) -> polygons [(x, y) arrays]
    planes: dict[float, list[np.ndarray]] = field(default_factory=dict)


def structures_from_rtstruct(ds: Dataset) -> list[Structure]:
    names = {int(r.ROINumber): str(r.get("ROIName", f"ROI {r.ROINumber}"))
             for r in ds.get("StructureSetROISequence", [])}
    out = []
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        color = tuple(int(c) for c in roi.get("ROIDisplayColor", [255, 255, 0]))
        s = Structure(names.get(number, f"ROI {number}"), color)  # type: ignore[arg-type]
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
    return 100.0 * (values.size - np.searchsorted(values, bins, side="left")) / values.size


# --- the whole comparison ----------------------------------------------------------------


@dataclass
class Comparison:
    """Both doses on the common grid, the gamma maps and every number the report and journal need."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    mc: np.ndarray
    tps: np.ndarray
    gammas: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    colors: dict[str, tuple[int, int, int]]
    numbers: dict[str, Any]


def compare(mc: Grid, tps: Grid, criteria: list[tuple[float, float]], *, low_dose_percent: float = 10.0,
            max_gamma: float | None = 2.0, resample_direction: str = "tps_to_mc",
            structures: list[Structure] | None = None) -> Comparison:
    """Compare the TPS dose (evaluated) with the MC dose (reference) on one grid."""
    if float(mc.values.max()) <= 0:
        raise ComparisonError("the MC dose is zero everywhere")
    share = overlap_fraction(mc, tps)
    if share <= 0:
        raise ComparisonError(f"dose grids do not overlap: MC {mc.describe()}; TPS {tps.describe()}")
    start = time.perf_counter()
    if resample_direction == "tps_to_mc":
        axes = mc.axes
        ref = mc.values
        tps_on = resample(tps, axes)
        outside = np.isnan(tps_on)
        ev = np.where(outside, 0.0, tps_on)
        common, method = mc, "TPS dose interpolated trilinearly onto the MC grid"
    elif resample_direction == "mc_to_tps":
        axes = tps.axes
        mc_on = resample(mc, axes)
        ref = np.where(np.isnan(mc_on), 0.0, mc_on)
        ev = tps.values
        outside = np.isnan(mc_on)
        common, method = tps, "MC dose interpolated trilinearly onto the TPS grid"
    else:
        raise ComparisonError(f"unknown resample direction {resample_direction!r}")
    resample_s = time.perf_counter() - start
    threshold = float(ref.max()) * low_dose_percent / 100.0
    considered = ref >= threshold
    uncovered = int(np.count_nonzero(considered & outside))
    gammas: dict[str, np.ndarray] = {}
    gamma_numbers: dict[str, Any] = {}
    for dose_pct, dist_mm in criteria:
        key = f"{dose_pct:g}%/{dist_mm:g}mm"
        t0 = time.perf_counter()
        g = gamma(axes, ref, ev, dose_pct, dist_mm, low_dose_percent, max_gamma)
        gammas[key] = g
        gamma_numbers[key] = {**gamma_summary(g, max_gamma), "seconds": round(time.perf_counter() - t0, 3)}
    masks: dict[str, np.ndarray] = {}
    colors: dict[str, tuple[int, int, int]] = {}
    rows = []
    for s in structures or []:
        mask = rasterise(s, axes)
        masks[s.name] = mask
        colors[s.name] = s.color
        rows.append({"name": s.name, "mc": dvh_metrics(ref, mask, common.voxel_volume_cc),
                     "tps": dvh_metrics(ev, mask, common.voxel_volume_cc)})
    numbers = {
        "method": {
            "reference": "MC", "evaluated": "TPS", "resample": resample_direction, "resample_method": method,
            "common_grid": common.describe(), "mc_grid": mc.describe(), "tps_grid": tps.describe(),
            "gamma": "global, pymedphys.gamma", "normalisation_gy": round(float(ref.max()), 5),
            "low_dose_threshold_percent": low_dose_percent, "interp_fraction": INTERP_FRACTION,
            "max_gamma": max_gamma,
            "rasterisation": "voxel centre in contour (matplotlib.path, even-odd), nearest contour plane",
            "dvh": "D_p = (100-p)th percentile of voxel doses in the structure",
        },
        "coverage": {"overlap_of_mc_box_percent": round(100.0 * share, 3),
                     "threshold_voxels_outside_other_grid": uncovered},
        "resample_seconds": round(resample_s, 3),
        "gamma": gamma_numbers,
        "dose_difference": dose_difference_stats(ref, ev, low_dose_percent),
        "structures": rows,
    }
    return Comparison(axes=axes, mc=ref, tps=ev, gammas=gammas, masks=masks, colors=colors, numbers=numbers)
