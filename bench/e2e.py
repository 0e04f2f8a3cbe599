"""End to end: seconds per stage for a phantom study through the node, and the node's own overhead.

A 150-slice CT (120x120 at 2 mm) goes phantom → C-STORE (dcmtk storescu, as a TPS) → assemble →
anonymize + prepare → seal → dispatch + compute (local backend) → merge → write + re-identify →
C-STORE back to a receiver.
Overhead is everything but the engine's own compute time (sum of the shards' MCsquare wall time
divided by how many ran at once).

    .venv/bin/python bench/e2e.py [--primaries 100000] [--shards 2]

Last line: {"stages": {...}, "total_s": ..., "overhead_s": ..., "compute_s": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, today  # noqa: E402
from dicom_node.demo import run_study  # noqa: E402
from dicom_node.phantom import PhantomSpec  # noqa: E402

SPEC = PhantomSpec(size_mm=(240.0, 240.0, 300.0), spacing_mm=(2.0, 2.0, 2.0), water_box_mm=(180.0, 180.0, 240.0),
                   target_radius_mm=25.0, energy_layers=5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--primaries", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        run, study = run_study(SPEC, Path(tmp) / "run", args.primaries, args.shards, echo=False, sender="storescu")
        engine_s = [float(t) for t in run.job.data.public.shard_wall_s or []]
    concurrent = min(args.shards, os.cpu_count() or 1)
    compute_engine = sum(engine_s) / concurrent if engine_s else run.stages["dispatch+compute"]
    stages = {k: round(v, 3) for k, v in run.stages.items()}
    total = sum(run.stages.values())
    overhead = total - compute_engine
    print(f"{len(study.ct)} CT slices, {args.primaries} primaries in {args.shards} shards; {machine()}; {today()}",
          file=sys.stderr)
    for k, v in stages.items():
        print(f"  {k:<20} {v:8.2f} s", file=sys.stderr)
    print(json.dumps({"stages": stages, "total_s": round(total, 3), "overhead_s": round(overhead, 3),
                      "compute_s": round(compute_engine, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
