"""Engine overhead: the bare MCsquare run vs our adapter end to end, on the same inputs.

Bare: the MCsquare binary on a prepared input folder (only the subprocess is timed).
Ours: plan + CT datasets in memory -> prepare (CT, tables, BDL, plan written) -> run_shard (config,
run, read Dose.mhd, convert to Gy per primary) -> merge (scale to Gy). One shard each, same seed.
Last stdout line: {"bare_s", "ours_s", "overhead_share", "primaries_per_s_per_core"}.

    python bench/engine.py [--primaries 1000000] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.engines import get_engine  # noqa: E402
from cloud.engines.mcsquare.adapter import mcsquare_binary, write_config  # noqa: E402
from cloud.merge import merge  # noqa: E402
from dicom_node.phantom import PhantomSpec, Spot, build_study  # noqa: E402

# 200 MeV pencil beam in water, 100 x 150 x 100 voxels of 2 mm (the case in REFERENCE.md).
SPEC = PhantomSpec(size_mm=(200.0, 300.0, 200.0), spacing_mm=(2.0, 2.0, 2.0), water_box_mm=(200.0, 280.0, 200.0),
                   bone_slab_thickness_mm=0.0, fractions=1, spots=(Spot(0.0, 0.0, 200.0, 1.0),))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--primaries", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating bare/ours pairs; medians reported")
    args = parser.parse_args()
    engine = get_engine("mcsquare")
    binary, materials = mcsquare_binary()
    datasets = build_study(SPEC).all()
    models = {SPEC.machine_name: "generic"}  # the phantom's machine, uncommissioned model
    seed = 1
    bare_runs: list[float] = []
    ours_runs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        root = Path(tmp)
        # Bare: inputs prepared beforehand, only MCsquare itself is timed.
        bare_inputs = engine.prepare(datasets, root / "bare", beam_models=models)
        # MCsquare's own run time varies by ±20 % on a shared VM: alternate the two and take medians.
        for repeat in range(args.repeats):
            out = root / f"bare-run-{repeat}" / "Outputs"
            out.mkdir(parents=True)
            config = write_config(bare_inputs.root, out, args.primaries, seed, args.threads)
            t0 = time.perf_counter()
            subprocess.run([str(binary), config.name], cwd=config.parent, check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "MCsquare_Materials_Dir": str(materials)})
            bare_runs.append(time.perf_counter() - t0)
            # Ours: from datasets to a merged dose in Gy.
            t0 = time.perf_counter()
            inputs = engine.prepare(datasets, root / f"ours-{repeat}", beam_models=models)
            tally = engine.run_shard(inputs, args.primaries, seed, args.threads)
            merged = merge([tally], inputs.protons_per_fraction, inputs.fractions, expected_shards=1)
            ours_runs.append(time.perf_counter() - t0)
            print(f"repeat {repeat + 1}: bare {bare_runs[-1]:.2f} s, ours {ours_runs[-1]:.2f} s", file=sys.stderr)
    bare_s, ours_s = statistics.median(bare_runs), statistics.median(ours_runs)
    cores = args.threads or os.cpu_count() or 1
    result = {
        "bare_s": round(bare_s, 3),
        "ours_s": round(ours_s, 3),
        "overhead_share": round((ours_s - bare_s) / bare_s, 4),
        "primaries_per_s_per_core": round(args.primaries / ours_s / cores, 1),
    }
    print(f"machine: {machine()}; date {datetime.now(UTC):%Y-%m-%d}; binary {binary.name}", file=sys.stderr)
    print(f"{args.primaries} primaries, 200 MeV pencil beam, {SPEC.size_mm} mm at {SPEC.spacing_mm} mm, "
          f"threads {args.threads or 'all'}; max dose {merged.summary['max_dose_per_fraction_gy']:.3g} Gy",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
