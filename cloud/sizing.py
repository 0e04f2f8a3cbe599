"""Sizing and cost: how many shards a job should get, what it should take, what it costs.

Job time follows T(n) = alpha·p/n + beta·n + gamma (p primaries, n shards/nodes; Keyes et al. 2010):
alpha is seconds per primary, beta the overhead each node adds, gamma the constant part. The three
are fitted by least squares from past jobs (primaries, shards, actual seconds). The chooser picks
the number of shards that meets a deadline at the lowest cost, or the fastest run under a cost cap.
Cost is GHz·hours × price: n nodes × cores per node × GHz per core × hours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PRICE_PER_GHZ_HOUR = 0.029  # the price anchor of the original work, USD


@dataclass(frozen=True)
class TimeModel:
    alpha: float  # s per primary (on one node)
    beta: float  # s per node
    gamma: float  # s
    points: int = 0

    def predict(self, primaries: int, shards: int) -> float:
        return self.alpha * primaries / shards + self.beta * shards + self.gamma

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class CostModel:
    price_per_ghz_hour: float = PRICE_PER_GHZ_HOUR
    ghz_per_core: float = 2.5
    cores_per_node: int = 1

    def cost(self, shards: int, seconds: float) -> float:
        """Estimated cost of `shards` nodes busy for `seconds`."""
        return shards * self.cores_per_node * self.ghz_per_core * seconds / 3600.0 * self.price_per_ghz_hour


def fit(points: Iterable[tuple[float, float, float]]) -> TimeModel | None:
    """Least-squares alpha, beta, gamma from (primaries, shards, seconds); None without enough spread.

    The design matrix needs at least three points and columns p/n, n, 1 that are not collinear
    (for instance every past job with the same shard count cannot separate beta from gamma).
    """
    rows = [(float(p), float(n), float(t)) for p, n, t in points if n >= 1 and t > 0]
    if len(rows) < 3:
        return None
    a = np.array([[p / n, n, 1.0] for p, n, _t in rows])
    y = np.array([t for _p, _n, t in rows])
    if np.linalg.matrix_rank(a) < 3:
        return None
    (alpha, beta, gamma), *_ = np.linalg.lstsq(a, y, rcond=None)
    return TimeModel(float(alpha), float(beta), float(gamma), len(rows))


def optimal_shards(model: TimeModel, primaries: int) -> float:
    """The n that minimises T(n): sqrt(alpha·p/beta), unbounded when beta ≤ 0."""
    if model.beta <= 0:
        return math.inf
    return math.sqrt(max(model.alpha, 0.0) * primaries / model.beta)


@dataclass(frozen=True)
class Choice:
    shards: int
    predicted_s: float
    estimated_cost: float
    reason: str


def choose_shards(model: TimeModel, primaries: int, cost: CostModel, *, deadline_s: float = 0.0,
                  cost_cap: float = 0.0, min_shards: int = 1, max_shards: int = 64) -> Choice:
    """Shards for a deadline (cheapest n that meets it) or a cost cap (fastest n within it).

    With neither set, the fastest n. When nothing meets the deadline the fastest n is taken; when
    nothing fits the cap, the cheapest; the reason says which.
    """
    max_shards = max(min_shards, min(max_shards, primaries))
    options = [(n, model.predict(primaries, n)) for n in range(min_shards, max_shards + 1)]
    priced = [(n, t, cost.cost(n, t)) for n, t in options]
    fastest = min(priced, key=lambda o: (o[1], o[0]))
    if deadline_s > 0:
        meets = [o for o in priced if o[1] <= deadline_s]
        if meets:
            n, t, c = min(meets, key=lambda o: (o[2], o[0]))
            return Choice(n, t, c, f"cheapest shard count predicted to finish within {deadline_s:g} s")
        n, t, c = fastest
        return Choice(n, t, c, f"no shard count is predicted to finish within {deadline_s:g} s; fastest taken")
    if cost_cap > 0:
        within = [o for o in priced if o[2] <= cost_cap]
        if within:
            n, t, c = min(within, key=lambda o: (o[1], o[0]))
            return Choice(n, t, c, f"fastest shard count within the cost cap of {cost_cap:g}")
        n, t, c = min(priced, key=lambda o: (o[2], o[0]))
        return Choice(n, t, c, f"no shard count fits the cost cap of {cost_cap:g}; cheapest taken")
    n, t, c = fastest
    return Choice(n, t, c, "fastest predicted shard count")


def history_points(records: Iterable[Mapping[str, Any]]) -> list[tuple[float, float, float]]:
    """(primaries, shards, seconds) from job records that carry a finished `sizing` entry."""
    out = []
    for rec in records:
        s = rec.get("sizing") or {}
        if all(isinstance(s.get(k), int | float) for k in ("primaries", "shards", "actual_s")):
            out.append((float(s["primaries"]), float(s["shards"]), float(s["actual_s"])))
    return out


def plan_job(records: Iterable[Mapping[str, Any]], primaries: int, default_shards: int, cost: CostModel, *,
             deadline_s: float = 0.0, cost_cap: float = 0.0, max_shards: int = 64) -> dict[str, Any]:
    """The sizing record for a new job: shards to use, predicted time and cost, and why.

    Without a deadline or cap, or without enough history to fit the model, the configured shard
    count is used (and predicted when a model exists).
    """
    model = fit(history_points(records))
    record: dict[str, Any] = {"primaries": primaries, "model": model.as_dict() if model else None}
    if model is not None and (deadline_s > 0 or cost_cap > 0):
        choice = choose_shards(model, primaries, cost, deadline_s=deadline_s, cost_cap=cost_cap,
                               max_shards=max_shards)
        record.update(shards=choice.shards, predicted_s=round(choice.predicted_s, 3),
                      predicted_cost=round(choice.estimated_cost, 6), reason=choice.reason)
        return record
    record["shards"] = default_shards
    if model is not None:
        predicted = model.predict(primaries, default_shards)
        record.update(predicted_s=round(predicted, 3), predicted_cost=round(cost.cost(default_shards, predicted), 6))
    record["reason"] = "configured shard count" + ("" if model or not (deadline_s or cost_cap)
                                                   else " (too few past jobs to fit the time model)")
    return record


def finish_job(record: Mapping[str, Any], actual_s: float, cost: CostModel) -> dict[str, Any]:
    """The sizing record with the actual time and the estimated cost of what ran."""
    return {**record, "actual_s": round(actual_s, 3),
            "estimated_cost": round(cost.cost(int(record["shards"]), actual_s), 6),
            "price_per_ghz_hour": cost.price_per_ghz_hour}
