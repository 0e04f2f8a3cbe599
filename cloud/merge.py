"""Merge shard tallies into one dose in Gy, with a per-voxel statistical uncertainty.

Every shard simulates the whole plan with its own seed, so the shards are independent estimates of
the same dose per primary. The merged dose is their primaries-weighted mean; with n >= 2 shards the
standard error of that mean comes from the spread between shards (batch method):

    w_i = p_i / sum(p),   mean = sum(w_i d_i),   SE^2 = sum(w_i^2 (d_i - mean)^2) / (1 - sum(w_i^2))

which for equal shards (sum w_i^2 = 1/n) is the familiar sum((d_i - mean)^2) / (n (n - 1)). With
Var(d_i) = s^2 / p_i, E[sum w_i^2 (d_i - mean)^2] = (1 - sum w_i^2) s^2 / sum(p), so the estimate is
unbiased for shards of any sizes, as waves make them (100 000 primaries, then millions). The factor
n / (n - 1) instead, right only for equal shards, read 15 % low for a first wave of 4 % of the
primaries in two shards and a second wave in two (tests/test_merge_stream.py). Dose per primary (Gy) x
protons per fraction gives Gy per fraction; x fractions gives the plan total; x 1.1 when RBE
weighting is asked for (DoseType EFFECTIVE). A partial set of shards is refused, never merged.

Outside the body (a mask on the dose grid, from the structure set's External contour) the dose is
0, as a TPS shows it: a noisy voxel in the air must not become the maximum. The uncertainty
reported is the pooled relative standard error over the voxels inside the body at or above 50 % of
the maximum, sqrt(sum SE^2 / sum d^2): one number that falls as 1/sqrt(primaries) and that a handful
of low-dose voxels cannot dominate (a mean of per-voxel ratios can be).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud.engines.base import Tally
from cloud.errors import MergeError

RBE_PROTON = 1.1
HIGH_DOSE_FRACTION = 0.5
CHUNK_VOXELS = 1 << 18  # voxels summed at a time by StreamingMerge.add (2 MB of float64 scratch)


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


class StreamingMerge:
    """Shards' tallies summed as they arrive, so a job's merge runs while its other shards compute and
    its memory stays a few grids whatever the shard count (issue 14: the node used to hold all n tallies
    and read them twice after the last one arrived).

    With p_i a shard's primaries and P their sum, the batch estimator above needs only running sums:
    mean = sum(p_i d_i) / P and sum(p_i^2 (d_i - mean)^2) = A - 2 m B + m^2 C with A = sum(p_i^2 x_i^2),
    B = sum(p_i^2 x_i), C = sum(p_i^2). The sums are taken on x_i = d_i - d_ref, each shard's
    difference from the first tally that arrived (the "shifted data" form): the x_i are noise-sized, so
    A - 2 m B + m^2 C does not cancel catastrophically, and the result equals the two-pass merge to
    float64 rounding (tests/test_merge_stream.py). It holds three float64 grids and the first tally (28 bytes a
    voxel), whatever the number of shards; `add` is thread-safe.
    A shard index or seed seen twice, a grid of another shape or a shard without primaries is refused.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seeds: dict[int, int] = {}          # shard index -> seed
        self.wall_s: dict[int, float] = {}       # shard index -> the worker's wall time
        self._primaries: list[int] = []
        self._ref: np.ndarray | None = None      # the first tally (float32, as the engine wrote it)
        self._s1 = self._a = self._b = np.zeros(0)
        self._c = 0.0

    def __contains__(self, index: int) -> bool:
        return index in self.seeds

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def primaries(self) -> int:
        return sum(self._primaries)

    def add(self, tally: Tally, index: int | None = None) -> None:
        """Add one shard (`index`: its shard number; default the next)."""
        d = tally.dose_per_primary
        with self._lock:
            index = len(self.seeds) if index is None else index
            if index in self.seeds:
                raise MergeError(f"shard {index} merged twice")
            if tally.seed in self.seeds.values():
                raise MergeError(f"shards with the same seed are not independent: seed {tally.seed} twice")
            if tally.primaries <= 0:
                raise MergeError("a shard reports no primaries")
            if self._ref is None:
                self._ref = np.array(d, copy=True)
                self._s1, self._a, self._b = (np.zeros(d.shape, dtype=np.float64) for _ in range(3))
            elif d.shape != self._ref.shape:
                raise MergeError(f"shards on different grids: {sorted({d.shape, self._ref.shape})}")
            p = float(tally.primaries)
            ref, s1, a, b = (arr.reshape(-1) for arr in (self._ref, self._s1, self._a, self._b))
            flat = d.reshape(-1)
            for lo in range(0, flat.size, CHUNK_VOXELS):  # a slab at a time: its scratch stays in cache
                hi = lo + CHUNK_VOXELS
                x = np.subtract(flat[lo:hi], ref[lo:hi], dtype=np.float64)
                x *= p                  # p x
                s1[lo:hi] += x
                a[lo:hi] += x * x       # p^2 x^2
                x *= p                  # p^2 x
                b[lo:hi] += x
            self._c += p * p
            self.seeds[index] = tally.seed
            self.wall_s[index] = tally.wall_s
            self._primaries.append(tally.primaries)

    def result(self, protons_per_fraction: float, fractions: int, rbe: bool = False, *, expected_shards: int,
               expected_primaries: int | None = None, body: np.ndarray | None = None) -> MergedDose:
        """The merged dose of the shards added so far (more may be added after: waves)."""
        with self._lock:
            n = len(self.seeds)
            if n != expected_shards:
                raise MergeError(f"{n} of {expected_shards} shards present; refusing to merge a partial set")
            if self._ref is None:
                raise MergeError("no shards to merge")
            total = self.primaries
            if expected_primaries is not None and total != expected_primaries:
                raise MergeError(f"shards hold {total} primaries, expected {expected_primaries}")
            if body is not None and body.shape != self._ref.shape:
                raise MergeError(f"body mask {body.shape} is not on the dose grid {self._ref.shape}")
            if protons_per_fraction <= 0 or fractions <= 0:
                raise MergeError(f"protons per fraction ({protons_per_fraction}) and fractions ({fractions}) "
                                 "must be positive")
            big_p = float(total)
            unbias = big_p * big_p - self._c  # P^2 (1 - sum w_i^2): SE^2 = sum p_i^2 (x_i - m)^2 / this
            mean = np.empty(self._ref.shape, dtype=np.float64)
            se: np.ndarray | None = None if n < 2 else np.empty_like(mean)
            ref, s1, a, b = (arr.reshape(-1) for arr in (self._ref, self._s1, self._a, self._b))
            out_mean, out_se = mean.reshape(-1), None if se is None else se.reshape(-1)
            for lo in range(0, ref.size, CHUNK_VOXELS):
                hi = lo + CHUNK_VOXELS
                m = s1[lo:hi] / big_p                      # mean of the x_i
                if out_se is not None:
                    spread = a[lo:hi] - (2.0 * m) * b[lo:hi]
                    spread += (m * m) * self._c            # sum p_i^2 (x_i - m)^2
                    np.maximum(spread, 0.0, out=spread)   # rounding below zero
                    np.sqrt(spread / unbias, out=out_se[lo:hi])
                np.add(m, ref[lo:hi], out=out_mean[lo:hi])
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


def merge(tallies: Sequence[Tally], protons_per_fraction: float, fractions: int, rbe: bool = False, *,
          expected_shards: int, expected_primaries: int | None = None, body: np.ndarray | None = None
          ) -> MergedDose:
    """Merge all shards of one job; MergeError if any is missing, duplicated or from another grid."""
    if len(tallies) != expected_shards:
        raise MergeError(f"{len(tallies)} of {expected_shards} shards present; refusing to merge a partial set")
    acc = StreamingMerge()
    for tally in tallies:
        acc.add(tally)
    return acc.result(protons_per_fraction, fractions, rbe, expected_shards=expected_shards,
                      expected_primaries=expected_primaries, body=body)


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
