"""Merge cost as the shard count grows (issue 14): cloud.merge.merge for n = 1 .. 128 tallies.

The grid is a realistic dose grid: 150 x 200 x 200 voxels (z, y, x; 2.5 mm over 50 x 50 x 37.5 cm),
float32 dose per primary as the engine writes it, a smooth field with 1 % noise per shard. Eight
distinct tallies are made and reused (each with its own seed, as merge demands), so the machine's
memory does not limit n; the merge itself reads every tally twice (mean, then spread), as it would
with n distinct arrays. Also timed: opening one sealed-and-compressed tally (Tally.from_bytes), which
the pipeline does once per shard before merging, and its size.

    .venv/bin/python bench/merge.py [--max-n 128]

Last stdout line: JSON with merge seconds per n, seconds per tally, decode seconds and the bytes one
tally holds in memory (the node holds all n at once today).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, today  # noqa: E402
from cloud.engines.base import Tally  # noqa: E402
from cloud.merge import merge  # noqa: E402

GRID = (150, 200, 200)
DISTINCT = 8


def tallies(n: int, bases: list[np.ndarray]) -> list[Tally]:
    return [Tally(dose_per_primary=bases[i % len(bases)], primaries=10_000, seed=1000 + i, wall_s=1.0,
                  engine="mcsquare") for i in range(n)]


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
    out: dict[str, float] = {}
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if n > args.max_n:
            break
        ts = tallies(n, bases)
        best = float("inf")
        for _ in range(2 if n <= 32 else 1):
            start = time.perf_counter()
            merge(ts, protons_per_fraction=1e9, fractions=30, expected_shards=n)
            best = min(best, time.perf_counter() - start)
        out[str(n)] = round(best, 3)
        print(f"  n={n:3d}  merge {best:.3f} s  ({best / n * 1000:.0f} ms per tally)", flush=True)
    ns = [int(k) for k in out]
    slope, intercept = np.polyfit(ns, list(out.values()), 1)
    result = {"grid": list(GRID), "voxels": int(np.prod(GRID)), "merge_s": out,
              "merge_s_per_tally": round(float(slope), 4), "merge_fixed_s": round(float(intercept), 3),
              "decode_s_per_tally": round(decode_s, 3), "tally_bytes_sealed": len(blob),
              "tally_bytes_in_memory": int(bases[0].nbytes), "machine": machine(), "date": today()}
    print(f"machine: {machine()}; date {today()}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
