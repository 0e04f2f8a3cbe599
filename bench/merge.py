"""Merge cost as the shard count grows (issue 14): the two-pass merge and the streaming merge for n = 1 .. 128.

The grid is a realistic dose grid: 150 x 200 x 200 voxels (z, y, x; 2.5 mm over 50 x 50 x 37.5 cm),
float32 dose per primary as the engine writes it, a smooth field with 1 % noise per shard. Eight
distinct tallies are made and reused (each with its own seed, as merge demands), so the machine's
memory does not limit n; the merge itself reads every tally twice (mean, then spread), as it would
with n distinct arrays. Also timed: opening one sealed-and-compressed tally (Tally.from_bytes), which
the pipeline does once per shard before merging, and its size.

Two ways, timed in the same run:

- two-pass (the merge before streaming, kept here as the peer): all n tallies in memory, the
  primaries-weighted mean, then the spread about it; it starts after the last shard ended;
- streaming (cloud.merge.StreamingMerge, what the node does now): each tally is added as its shard
  ends, while the others compute; after the last shard only that tally's opening and adding and the
  final division remain ("tail"). Also the per-tally cost of opening + adding on 1 and on
  MERGE_THREADS threads (all n arriving at once: the worst case, nothing left to overlap with), and
  the peak memory the streaming merge allocates (tracemalloc; numpy reports its arrays to it).

    .venv/bin/python bench/merge.py [--max-n 128]

Last stdout line: JSON with seconds per n for both, seconds per tally, decode seconds, and memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, today  # noqa: E402
from cloud.dispatch import MERGE_THREADS  # noqa: E402
from cloud.engines.base import Tally  # noqa: E402
from cloud.merge import MergedDose, StreamingMerge, summarize  # noqa: E402

GRID = (150, 200, 200)
DISTINCT = 8


def tallies(n: int, bases: list[np.ndarray]) -> list[Tally]:
    return [Tally(dose_per_primary=bases[i % len(bases)], primaries=10_000, seed=1000 + i, wall_s=1.0,
                  engine="mcsquare") for i in range(n)]


def two_pass(ts: list[Tally]) -> MergedDose:
    """The merge as it was before streaming (cloud.merge.merge up to issue 14's streaming change), with
    the same scaling to Gy and summary as the streaming merge's result."""
    primaries = np.array([t.primaries for t in ts], dtype=np.float64)
    weights = primaries / primaries.sum()
    mean = np.zeros(ts[0].dose_per_primary.shape, dtype=np.float64)
    for w, t in zip(weights, ts, strict=True):
        mean += w * t.dose_per_primary.astype(np.float64)
    acc = np.zeros_like(mean)
    for w, t in zip(weights, ts, strict=True):
        acc += (w * (t.dose_per_primary.astype(np.float64) - mean)) ** 2
    se = np.sqrt(acc * len(ts) / (len(ts) - 1)) if len(ts) > 1 else None
    per_fraction = mean * 1e9
    merged = MergedDose(per_fraction_gy=per_fraction, plan_gy=per_fraction * 30,
                        std_error_per_fraction_gy=None if se is None else se * 1e9, fractions=30, rbe=False,
                        primaries=int(primaries.sum()), shards=len(ts))
    merged.summary = summarize(merged)
    return merged


def streamed(ts: list[Tally]) -> tuple[float, float, StreamingMerge]:
    """Seconds adding all of ts, seconds for the result."""
    acc = StreamingMerge()
    start = time.perf_counter()
    for i, t in enumerate(ts):
        acc.add(t, index=i)
    added = time.perf_counter()
    acc.result(1e9, 30, expected_shards=len(ts))
    return added - start, time.perf_counter() - added, acc


def open_and_add(blobs: list[bytes], threads: int) -> float:
    """Seconds to open (Tally.from_bytes) and add len(blobs) tallies arriving at once on `threads`."""
    acc = StreamingMerge()

    def one(i: int) -> None:
        t = Tally.from_bytes(blobs[i % len(blobs)])
        acc.add(Tally(t.dose_per_primary, t.primaries, 1000 + i, 1.0), index=i)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, range(len(blobs) * 2)))
    return (time.perf_counter() - start) / (len(blobs) * 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in GRID), indexing="ij")
    field = np.exp(-(x ** 2 + y ** 2) * 8) * np.clip(1.2 - np.abs(z), 0, 1) * 1e-9
    bases = [(field * (1 + 0.01 * rng.standard_normal(GRID, dtype=np.float32))).astype(np.float32)
             for _ in range(DISTINCT)]
    blob = tallies(1, bases)[0].to_bytes()
    start = time.perf_counter()
    Tally.from_bytes(blob)
    decode_s = time.perf_counter() - start
    blobs = [t.to_bytes() for t in tallies(4, bases)]
    open_add = {str(k): round(open_and_add(blobs, k), 3) for k in sorted({1, MERGE_THREADS})}
    out: dict[str, float] = {}
    add_s: dict[str, float] = {}
    result_s: dict[str, float] = {}
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if n > args.max_n:
            break
        ts = tallies(n, bases)
        best = best_add = best_result = float("inf")
        for _ in range(2 if n <= 32 else 1):
            start = time.perf_counter()
            two_pass(ts)
            best = min(best, time.perf_counter() - start)
            added, result, _acc = streamed(ts)
            best_add, best_result = min(best_add, added), min(best_result, result)
        out[str(n)], add_s[str(n)], result_s[str(n)] = round(best, 3), round(best_add, 3), round(best_result, 3)
        print(f"  n={n:3d}  two-pass {best:.3f} s  ({best / n * 1000:.0f} ms per tally); streaming: adds "
              f"{best_add:.3f} s ({best_add / n * 1000:.0f} ms per tally), result {best_result:.3f} s", flush=True)
    del ts
    # what the streaming merge holds, whatever n: measured on the largest n, tallies made one at a time
    n_max = int(list(out)[-1])
    tracemalloc.start()
    acc = StreamingMerge()
    for i in range(n_max):
        acc.add(Tally(bases[i % len(bases)], 10_000, 1000 + i, 1.0), index=i)
    acc.result(1e9, 30, expected_shards=n_max)
    _now, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ns = [int(k) for k in out]
    slope, intercept = np.polyfit(ns, list(out.values()), 1)
    add_slope, _ = np.polyfit(ns, list(add_s.values()), 1)
    tail = decode_s + float(add_slope) + result_s[str(n_max)]
    result = {"grid": list(GRID), "voxels": int(np.prod(GRID)), "merge_s": out,
              "merge_s_per_tally": round(float(slope), 4), "merge_fixed_s": round(float(intercept), 3),
              "stream_add_s": add_s, "stream_add_s_per_tally": round(float(add_slope), 4),
              "stream_result_s": result_s,
              "stream_tail_s": round(tail, 3),
              "stream_open_add_s_per_tally_by_threads": open_add,
              "stream_peak_bytes": int(peak),
              "two_pass_bytes_at_max_n": int(bases[0].nbytes) * n_max,
              "decode_s_per_tally": round(decode_s, 3), "tally_bytes_sealed": len(blob),
              "tally_bytes_in_memory": int(bases[0].nbytes), "machine": machine(), "date": today()}
    print(f"machine: {machine()}; date {today()}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
