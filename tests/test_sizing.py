"""Sizing: the time model is fitted from past jobs and the shard count chosen for a deadline or cost cap."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.sizing import CostModel, TimeModel, choose_shards, finish_job, fit, history_points, plan_job

TRUE = TimeModel(alpha=2e-4, beta=0.5, gamma=12.0)


def synthetic(noise: float = 0.0, seed: int = 7) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(seed)
    pts = []
    for p in (1e5, 5e5, 1e6, 4e6):
        for n in (1, 2, 4, 8, 16, 32):
            pts.append((p, n, TRUE.predict(int(p), n) * (1 + noise * rng.standard_normal())))
    return pts


def test_fit_recovers_known_alpha_beta_gamma():
    model = fit(synthetic())
    assert model is not None
    assert model.alpha == pytest.approx(TRUE.alpha, rel=1e-9)
    assert model.beta == pytest.approx(TRUE.beta, rel=1e-9)
    assert model.gamma == pytest.approx(TRUE.gamma, rel=1e-9)
    noisy = fit(synthetic(noise=0.01))
    assert noisy is not None and noisy.alpha == pytest.approx(TRUE.alpha, rel=0.05)
    assert noisy.beta == pytest.approx(TRUE.beta, rel=0.2)


def test_fit_refuses_what_it_cannot_separate():
    assert fit([(1e6, 4, 100.0), (1e6, 4, 101.0)]) is None  # too few points
    assert fit([(p, 4, 10.0 + p * 1e-4) for p in (1e5, 2e5, 3e5, 4e5)]) is None  # one shard count only


def test_deadline_takes_the_cheapest_count_that_meets_it():
    cost = CostModel(price_per_ghz_hour=0.029, ghz_per_core=2.5, cores_per_node=1)
    p = 4_000_000  # alpha*p = 800 s of work
    # T(n) = 800/n + 0.5 n + 12; T(20) = 62, T(19) = 63.6: 20 is the fewest (and cheapest) under 62.5 s
    choice = choose_shards(TRUE, p, cost, deadline_s=62.5, max_shards=64)
    assert choice.shards == 20 and choice.predicted_s <= 62.5
    # the fastest possible is at sqrt(alpha p / beta) = 40; an impossible deadline takes that
    impossible = choose_shards(TRUE, p, cost, deadline_s=10, max_shards=64)
    assert impossible.shards == 40 and "fastest" in impossible.reason


def test_cost_cap_takes_the_fastest_count_within_it():
    cost = CostModel(price_per_ghz_hour=0.029, ghz_per_core=2.5, cores_per_node=1)
    p = 4_000_000
    # cost(n) = n * 2.5 * T(n) / 3600 * 0.029, growing with n here
    cap = cost.cost(10, TRUE.predict(p, 10)) + 1e-9
    choice = choose_shards(TRUE, p, cost, cost_cap=cap, max_shards=64)
    assert choice.shards == 10 and choice.estimated_cost <= cap
    assert choose_shards(TRUE, p, cost, cost_cap=1e-9).reason.startswith("no shard count fits")


def test_plan_job_uses_history_and_records_actual_and_cost():
    cost = CostModel()
    records = [{"sizing": {"primaries": p, "shards": n, "actual_s": t}} for p, n, t in synthetic()]
    records.append({"summary": {}})  # jobs without a sizing record are ignored
    assert len(history_points(records)) == len(synthetic())
    plan = plan_job(records, 4_000_000, 4, cost, deadline_s=62.5)
    assert plan["shards"] == 20 and plan["predicted_s"] == pytest.approx(62.0)
    done = finish_job(plan, 61.0, cost)
    assert done["actual_s"] == 61.0
    assert done["estimated_cost"] == pytest.approx(20 * 2.5 * 61.0 / 3600 * 0.029, abs=1e-6)
    # without history: the configured count, and it says why
    fallback = plan_job([], 1_000_000, 4, cost, deadline_s=100)
    assert fallback["shards"] == 4 and "too few past jobs" in fallback["reason"]
