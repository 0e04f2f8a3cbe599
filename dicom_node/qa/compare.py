"""Dose comparison on a common grid: grids from DICOM, trilinear resampling, gamma, statistics, DVH.

Everything here is plain arrays in and numbers out; the journal, files and policy live in
`dicom_node.qa.secondcheck`, the pictures in `dicom_node.qa.report`.

Conventions (stated again in every report):

- Arrays are indexed [z, y, x] on a `cloud.grid.Grid` (the product's one grid, axis order z, y, x):
  voxel-centre coordinates in mm (DICOM patient coordinates), increasing. Only axis-aligned grids
  (ImageOrientationPatient 1,0,0,0,1,0) are read.
- The reference dose of gamma is the Monte Carlo dose, the evaluated (searched) dose the TPS's. The
  common grid is the MC grid (default) or the TPS grid; the other dose is interpolated trilinearly
  onto it (scipy's RegularGridInterpolator) for the dose difference and the DVHs; gamma searches the
  TPS dose on its own grid.
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
import time
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
EXTERNAL_NAMES = ("external", "body", "outline", "skin", "ext")


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
    value says the dose sits elsewhere, not that it is higher.
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


def body_mask(axes: tuple[np.ndarray, np.ndarray, np.ndarray], structures: list[Structure],
              ct: Volume | None) -> tuple[np.ndarray, str]:
    """Where the patient is on the grid `axes`, and how that was found (for the report)."""
    body = find_body(structures)
    if body is not None:
        mask = rasterise(body, axes)
        if mask.any():
            kind = "type EXTERNAL" if body.roi_type == "EXTERNAL" else "named like an External"
            return mask, f"ROI {body.name!r} ({kind})"
    if ct is not None:
        hu = resample(ct, axes, fill=-1000.0)
        mask = hu > BODY_HU
        if mask.any():
            return mask, f"CT above {BODY_HU:g} HU (no External ROI)"
    shape = tuple(len(a) for a in axes)
    return np.ones(shape, dtype=bool), "whole grid (no External ROI, no CT)"


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
    if resample_direction == "tps_to_mc":
        axes, common = mc.grid.axes, mc.grid
        ref = mc.values
        tps_on = resample(tps, axes)
        both = ~np.isnan(tps_on)
        ev = np.where(both, tps_on, 0.0)
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
    body, body_source = body_mask(axes, structures, ct)
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
        "seconds": {"resample": round(resample_s, 3), "region": round(region_s, 3), "dvh": round(dvh_s, 3)},
        "gamma": gamma_numbers,
        "shift": shift,
        "dose_difference": dose_difference_stats(ref, ev, region, norm),
        "structures": rows,
    }
    return Comparison(axes=axes, mc=ref, tps=ev, region=region, body=body, gammas=gammas, masks=masks,
                      colors=colors, numbers=numbers, normalisation_gy=norm, threshold_gy=threshold)
