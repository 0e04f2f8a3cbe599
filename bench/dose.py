"""A head plan to a target uncertainty: wall time, peak memory, our time over bare MCsquare's.

The phantom is a head (dicom_node.phantom.head_spec: 512 x 512 x 177 CT of 0.59 x 0.59 x 1.25 mm,
skull shell, BODY contour) with a 3-field plan (gantry 0, 90, 270). It goes through the node as a
clinic's would: C-STORE (our SCU) -> assemble -> anonymize + prepare (2.5 mm dose grid, body mask)
-> seal -> shards in waves on the local backend until the pooled uncertainty reaches the target ->
merge -> RT Dose. Then bare MCsquare runs once, on the job's own prepared inputs, with the total
primaries the job ran and every core: the engine alone, with no node around it.

Memory: the node runs in a child process of this script; its peak is getrusage(RUSAGE_SELF).ru_maxrss
there plus RUSAGE_CHILDREN's (the largest shard worker or MCsquare process it waited for).

    .venv/bin/python bench/dose.py [--target 2] [--first-primaries 100000] [--shards 2]

Last line: {"wall_s", "pipeline_s", "bare_s", "overhead_share", "peak_node_mb", "peak_children_mb",
"rtdose_mb", "primaries", "waves", "uncertainty_percent", "primaries_per_s_per_core"}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, today  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _write_phantom(out: Path) -> None:
    from dicom_node.phantom import build_study, head_spec, write_study

    write_study(build_study(head_spec()), out)


def _node_run(work: Path, target: float, first: int, shards: int, max_primaries: int) -> dict[str, object]:
    """In a child process: the node computes the head plan; what it measured, as a dict."""
    from dicom_node.demo import stage_seconds, wait_for_state
    from dicom_node.intake.jobrecord import JobState
    from dicom_node.jobs.node import Node
    from dicom_node.net.dose_receiver import DoseReceiver
    from dicom_node.net.scu import send_paths
    from dicom_node.phantom import head_spec
    from dicom_node.settings import GENERIC_BEAM_MODEL, Destination, init_config_dir, load_settings

    files = sorted((work / "study").iterdir())
    with DoseReceiver(work / "tps", ae_title="TPS") as receiver:
        base = load_settings(init_config_dir(work / "node", port=0))
        settings = dataclasses.replace(
            base, trigger=dataclasses.replace(base.trigger, stable_seconds=2.0),
            engine=dataclasses.replace(base.engine, primaries=first, target_uncertainty_percent=target,
                                       max_primaries=max_primaries, dose_grid_mm=2.5,
                                       beam_models={head_spec().machine_name: GENERIC_BEAM_MODEL}),
            cloud=dataclasses.replace(base.cloud, shards=shards),
            destinations=(Destination(calling_ae_title="TPS", ae_title="TPS", host="127.0.0.1",
                                      port=receiver.port),))
        with Node(settings) as node:
            t0 = time.perf_counter()
            failures = send_paths(files, "127.0.0.1", int(node.port or 0), settings.node.ae_title, "TPS")
            send_s = time.perf_counter() - t0
            if failures:
                raise RuntimeError(f"{len(failures)} files not accepted: {failures[0][1]}")
            job = wait_for_state(node, (JobState.SENT, JobState.REJECTED, JobState.FAILED), timeout=3600)
            wall = time.perf_counter() - t0
            if job.state != JobState.SENT:
                raise RuntimeError(f"job ended {job.state}: {job.reason}")
            stages = stage_seconds(node, job, send_s)
    (dose_path,) = receiver.received
    public = job.data.public
    kib = 1024.0
    return {"wall_s": wall, "stages": stages, "job_dir": str(work / "node" / "data" / "jobs" / job.id),
            "primaries": public.primaries, "waves": public.waves, "summary": public.summary,
            "target_met": public.uncertainty_target_met, "dose_grid": public.dose_grid,
            "rtdose_mb": dose_path.stat().st_size / 1e6,
            "peak_node_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
            "peak_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib}


def _bare(inputs_dir: Path, primaries: int) -> float:
    """Bare MCsquare on the job's prepared inputs: one run, every core, the job's config keys."""
    import shutil

    from cloud.engines.base import ShardInputs
    from cloud.engines.mcsquare.adapter import MCsquareEngine, mcsquare_binary, write_config

    binary, materials = mcsquare_binary()
    inputs = ShardInputs.load(inputs_dir)
    scratch = Path(tempfile.mkdtemp(prefix="mcsq-bare-"))  # short path: MCsquare fails on long ones
    try:
        (scratch / "in").symlink_to(inputs_dir.resolve(), target_is_directory=True)
        (scratch / "Outputs").mkdir()
        config = write_config(inputs_dir, scratch / "Outputs", primaries, 99, 0, relative=True,
                              extra=MCsquareEngine._config_keys(inputs))
        t0 = time.perf_counter()
        subprocess.run([str(binary), config.name], cwd=scratch, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "MCsquare_Materials_Dir": str(materials)})
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=2.0, help="target uncertainty, percent")
    ap.add_argument("--first-primaries", type=int, default=100_000, help="primaries of the first wave")
    ap.add_argument("--max-primaries", type=int, default=20_000_000)
    ap.add_argument("--shards", type=int, default=2, help="shards per wave")
    ap.add_argument("--node-run", type=Path, help=argparse.SUPPRESS)  # internal: the measured child
    args = ap.parse_args()
    if args.node_run:
        print(json.dumps(_node_run(args.node_run, args.target, args.first_primaries, args.shards,
                                   args.max_primaries)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-dose-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from bench.dose import "
                        "_write_phantom; from pathlib import Path; _write_phantom(Path(sys.argv[2]))",
                        str(ROOT), str(work / "study")], check=True)
        print(f"phantom written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--node-run", str(work), "--target", str(args.target),
                                "--first-primaries", str(args.first_primaries), "--shards", str(args.shards),
                                "--max-primaries", str(args.max_primaries)],
                               check=True, stdout=subprocess.PIPE, text=True)
        run = json.loads(child.stdout.strip().splitlines()[-1])
        bare_s = _bare(Path(run["job_dir"]) / "inputs", int(run["primaries"]))
    stages = run["stages"]
    pipeline_s = sum(stages[k] for k in ("anonymize+prepare", "seal", "dispatch+compute", "merge",
                                         "write+reidentify"))
    cores = os.cpu_count() or 1
    result = {
        "wall_s": round(run["wall_s"], 2),
        "pipeline_s": round(pipeline_s, 2),
        "bare_s": round(bare_s, 2),
        "overhead_share": round((pipeline_s - bare_s) / bare_s, 4),
        "peak_node_mb": round(run["peak_node_mb"], 1),
        "peak_children_mb": round(run["peak_children_mb"], 1),
        "rtdose_mb": round(run["rtdose_mb"], 2),
        "primaries": run["primaries"],
        "waves": [w["uncertainty_percent"] for w in run["waves"]],
        "target_met": run["target_met"],
        "uncertainty_percent": round(run["summary"]["uncertainty_percent"], 3),
        "primaries_per_s_per_core": round(run["primaries"] / stages["dispatch+compute"] / cores, 1),
    }
    print(f"{machine()}; {today()}; head phantom 512x512x177 (0.59 x 0.59 x 1.25 mm), 3 fields; dose grid "
          f"{run['dose_grid']['shape_xyz']} of {run['dose_grid']['spacing_mm']} mm", file=sys.stderr)
    for k, v in stages.items():
        print(f"  {k:<20} {v:8.2f} s", file=sys.stderr)
    for w in run["waves"]:
        print(f"  wave {w['wave']}: {w['shards']} shards, {w['primaries']} primaries -> "
              f"{w['uncertainty_percent']} %", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
