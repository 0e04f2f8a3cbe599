"""The streaming merge (cloud.merge.StreamingMerge) gives the two-pass merge's dose and uncertainty, in
any order of arrival, and keeps no shard's tally once it is added."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from cloud.engines.base import Tally
from cloud.errors import MergeError
from cloud.merge import StreamingMerge, merge


def two_pass(tallies: list[Tally]) -> tuple[np.ndarray, np.ndarray]:
    """The merge as two passes (mean, then the spread about it), per primary; the spread's divisor
    1 - sum(w^2) makes the SE unbiased for shards of unequal sizes."""
    p = np.array([t.primaries for t in tallies], dtype=np.float64)
    w = p / p.sum()
    mean = sum(wi * t.dose_per_primary.astype(np.float64) for wi, t in zip(w, tallies, strict=True))
    acc = sum((wi * (t.dose_per_primary.astype(np.float64) - mean)) ** 2 for wi, t in zip(w, tallies, strict=True))
    return mean, np.sqrt(acc / (1.0 - (w ** 2).sum()))


def noisy_tallies(n: int, shape: tuple[int, int, int] = (12, 40, 50)) -> list[Tally]:
    rng = np.random.default_rng(3)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    field = (np.exp(-(x ** 2 + y ** 2) * 6) * np.clip(1.2 - np.abs(z), 0, 1) * 3e-9).astype(np.float32)
    out = []
    for i in range(n):
        primaries = int(rng.integers(500, 5000))  # unequal shards, as the waves make them
        noise = rng.standard_normal(shape).astype(np.float32) * np.float32(0.3 / np.sqrt(primaries))
        out.append(Tally(dose_per_primary=(field * (1 + noise)).astype(np.float32), primaries=primaries,
                         seed=1000 + i, wall_s=1.0))
    return out


@pytest.mark.parametrize("n", [2, 7, 33])
def test_streaming_merge_equals_the_two_pass_merge_in_any_order(n):
    ts = noisy_tallies(n)
    mean, se = two_pass(ts)
    body = np.zeros(ts[0].dose_per_primary.shape, dtype=bool)
    body[:, 5:35, 5:45] = True
    for order in (range(n), np.random.default_rng(n).permutation(n)):
        acc = StreamingMerge()
        for i in order:
            acc.add(ts[i], index=int(i))
        m = acc.result(1e9, 30, expected_shards=n, body=body)
        np.testing.assert_allclose(m.per_fraction_gy, np.where(body, mean, 0) * 1e9, rtol=1e-12, atol=0)
        assert m.std_error_per_fraction_gy is not None
        np.testing.assert_allclose(m.std_error_per_fraction_gy, np.where(body, se, 0) * 1e9, rtol=1e-9, atol=0)
        assert m.primaries == sum(t.primaries for t in ts) and m.shards == n
    plain = merge(ts, 1e9, 30, rbe=True, expected_shards=n)
    np.testing.assert_allclose(plain.per_fraction_gy, mean * 1.1e9, rtol=1e-12)


def test_streaming_merge_grows_by_waves_and_keeps_no_tally():
    ts = noisy_tallies(6)
    acc = StreamingMerge()
    for i, t in enumerate(ts[:3]):
        acc.add(t, index=i)
    first = acc.result(1e9, 1, expected_shards=3)
    np.testing.assert_allclose(first.per_fraction_gy, two_pass(ts[:3])[0] * 1e9, rtol=1e-12)
    with pytest.raises(MergeError, match="3 of 6"):
        acc.result(1e9, 1, expected_shards=6)
    extra = Tally(dose_per_primary=ts[3].dose_per_primary.copy(), primaries=ts[3].primaries, seed=ts[3].seed,
                  wall_s=1.0)
    alive = weakref.ref(extra.dose_per_primary)
    acc.add(extra, index=3)
    del extra
    gc.collect()
    assert alive() is None  # summed, not kept: memory does not grow with the shard count
    for i, t in enumerate(ts[4:], start=4):
        acc.add(t, index=i)
    second = acc.result(1e9, 1, expected_shards=6)
    np.testing.assert_allclose(second.std_error_per_fraction_gy, two_pass(ts)[1] * 1e9, rtol=1e-9)
    with pytest.raises(MergeError, match="twice"):
        acc.add(ts[0], index=0)
    with pytest.raises(MergeError, match="same seed"):
        acc.add(ts[0], index=9)


@pytest.mark.parametrize("primaries", [[50_000, 50_000, 1_200_000, 1_200_000],  # waves: 4 %, then the rest
                                       [50_000, 50_000, 2_400_000],
                                       [3_000] * 4])
def test_the_standard_error_is_unbiased_for_shards_of_any_size(primaries):
    """Shards with Var(d_i) = s^2 / p_i: over 20 000 independent voxels the mean estimated SE^2 is the true
    s^2 / sum(p) within 2 % (the n / (n - 1) factor, right for equal shards only, read the first case
    15 % low and the second 66 % low)."""
    rng = np.random.default_rng(7)
    shape, s = (1, 100, 200), 1.0
    acc = StreamingMerge()
    for i, p in enumerate(primaries):
        acc.add(Tally(dose_per_primary=1.0 + rng.normal(0.0, s / np.sqrt(p), shape), primaries=p, seed=i,
                      wall_s=0.0), index=i)
    m = acc.result(1.0, 1, expected_shards=len(primaries))
    assert m.std_error_per_fraction_gy is not None
    estimated = float(np.sqrt(np.mean(m.std_error_per_fraction_gy ** 2)))
    assert estimated == pytest.approx(s / np.sqrt(sum(primaries)), rel=0.02)
