"""Merge shard tallies into one dose in Gy, with a per-voxel statistical uncertainty.

Every shard simulates the whole plan with its own seed, so the shards are independent estimates of
the same dose per primary. The merged dose is their primaries-weighted mean; with n >= 2 shards the
standard error of that mean comes from the spread between shards (batch method):

    w_i = p_i / sum(p),   mean = sum(w_i d_i),   SE^2 = n / (n - 1) * sum(w_i^2 (d_i - mean)^2)

which for equal shards is the familiar sum((d_i - mean)^2) / (n (n - 1)). Dose per primary (Gy) x
protons per fraction gives Gy per fraction; x fractions gives the plan total; x 1.1 when RBE
weighting is asked for (DoseType EFFECTIVE). A partial set of shards is refused, never merged.

Outside the body (a mask on the dose grid, from the structure set's External contour) the dose is
0, as a TPS shows it: a noisy voxel in the air must not become the maximum. The uncertainty
reported is the pooled relative standard error over the voxels inside the body at or above 50 % of
the maximum, sqrt(sum SE^2 / sum d^2): one number that falls as 1/sqrt(primaries) and that a handful
of low-dose voxels cannot dominate (a mean of per-voxel ratios can be).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud.engines.base import Tally
from cloud.errors import MergeError

RBE_PROTON = 1.1
HIGH_DOSE_FRACTION = 0.5


@dataclass
class MergedDose:
    """Dose on the scoring grid, [z, y, x], float64 Gy; 0 outside the body when a mask was given."""

    per_fraction_gy: np.ndarray
    plan_gy: np.ndarray
    std_error_per_fraction_gy: np.ndarray | None  # None with a single shard (no spread to measure)
    fractions: int
    rbe: bool
    primaries: int
    shards: int
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def dose_type(self) -> str:
        return "EFFECTIVE" if self.rbe else "PHYSICAL"

    @property
    def std_error_plan_gy(self) -> np.ndarray | None:
        return None if self.std_error_per_fraction_gy is None else self.std_error_per_fraction_gy * self.fractions


def merge(tallies: Sequence[Tally], protons_per_fraction: float, fractions: int, rbe: bool = False, *,
          expected_shards: int, expected_primaries: int | None = None, body: np.ndarray | None = None
          ) -> MergedDose:
    """Merge all shards of one job; MergeError if any is missing, duplicated or from another grid."""
    if len(tallies) != expected_shards:
        raise MergeError(f"{len(tallies)} of {expected_shards} shards present; refusing to merge a partial set")
    if not tallies:
        raise MergeError("no shards to merge")
    seeds = [t.seed for t in tallies]
    if len(set(seeds)) != len(seeds):
        raise MergeError(f"shards with the same seed are not independent: seeds {sorted(seeds)}")
    shapes = {t.dose_per_primary.shape for t in tallies}
    if len(shapes) != 1:
        raise MergeError(f"shards on different grids: {sorted(shapes)}")
    primaries = np.array([t.primaries for t in tallies], dtype=np.float64)
    if np.any(primaries <= 0):
        raise MergeError("a shard reports no primaries")
    total = int(primaries.sum())
    if expected_primaries is not None and total != expected_primaries:
        raise MergeError(f"shards hold {total} primaries, expected {expected_primaries}")
    if body is not None and body.shape != next(iter(shapes)):
        raise MergeError(f"body mask {body.shape} is not on the dose grid {next(iter(shapes))}")
    if protons_per_fraction <= 0 or fractions <= 0:
        raise MergeError(f"protons per fraction ({protons_per_fraction}) and fractions ({fractions}) must be positive")

    weights = primaries / primaries.sum()
    mean = np.zeros(next(iter(shapes)), dtype=np.float64)
    for w, t in zip(weights, tallies, strict=True):
        mean += w * t.dose_per_primary.astype(np.float64)
    n = len(tallies)
    se: np.ndarray | None = None
    if n >= 2:
        acc = np.zeros_like(mean)
        for w, t in zip(weights, tallies, strict=True):
            acc += (w * (t.dose_per_primary.astype(np.float64) - mean)) ** 2
        se = np.sqrt(acc * n / (n - 1))
    if body is not None:
        mean[~body] = 0.0
        if se is not None:
            se[~body] = 0.0

    scale = protons_per_fraction * (RBE_PROTON if rbe else 1.0)
    per_fraction = mean * scale
    se_fraction = None if se is None else se * scale
    merged = MergedDose(per_fraction_gy=per_fraction, plan_gy=per_fraction * fractions,
                        std_error_per_fraction_gy=se_fraction, fractions=fractions, rbe=rbe, primaries=total,
                        shards=n)
    merged.summary = summarize(merged, body)
    return merged


def pooled_relative_se(dose: np.ndarray, se: np.ndarray, region: np.ndarray) -> float | None:
    """sqrt(sum SE^2 / sum d^2) over ``region``; None when the region holds no dose."""
    d = dose[region]
    total = float(np.sum(d * d))
    if total <= 0:
        return None
    return float(np.sqrt(np.sum(se[region] ** 2) / total))


def summarize(merged: MergedDose, body: np.ndarray | None = None) -> dict[str, Any]:
    """Max dose and the pooled relative SE over the body's voxels at or above 50 % of the max."""
    d = merged.per_fraction_gy
    dmax = float(d.max()) if d.size else 0.0
    out: dict[str, Any] = {
        "max_dose_per_fraction_gy": dmax,
        "max_dose_plan_gy": dmax * merged.fractions,
        "fractions": merged.fractions,
        "dose_type": merged.dose_type,
        "primaries": merged.primaries,
        "shards": merged.shards,
        "uncertainty_percent": None,
        "high_dose_voxels": 0,
        "body_voxels": int(body.sum()) if body is not None else None,
    }
    if dmax > 0:
        mask = d >= HIGH_DOSE_FRACTION * dmax  # outside the body d is 0 already
        out["high_dose_voxels"] = int(mask.sum())
        if merged.std_error_per_fraction_gy is not None:
            rel = pooled_relative_se(d, merged.std_error_per_fraction_gy, mask)
            out["uncertainty_percent"] = None if rel is None else 100.0 * rel
    return out
