"""A head plan to a target uncertainty: wall time, peak memory, our time over bare MCsquare's.

The phantom is a head (dicom_node.phantom.head_spec: 512 x 512 x 177 CT of 0.59 x 0.59 x 1.25 mm,
skull shell, BODY contour) with a 3-field plan (gantry 0, 90, 270). It goes through the node as a
clinic's would: C-STORE (our SCU) -> assemble -> anonymize + prepare (2.5 mm dose grid, body mask)
-> seal -> shards in waves on the local backend until the pooled uncertainty reaches the target ->
merge -> RT Dose. Bare MCsquare runs on the first job's own prepared inputs, with the total
primaries that job ran and every core: the engine alone, with no node around it.

Rounds are interleaved so that both see the same load on a shared machine: ours, bare, then bare,
ours (ABBA), ...; the overhead is the sum of our pipeline times over the sum of bare times, minus 1.

Memory: this script samples the process tree of each run every 0.5 s (/proc: the node's process
and every worker and MCsquare process under it) and reports the peak of the tree's summed RSS and
PSS, the node's own peak and the largest single process under it; getrusage figures as before.

    .venv/bin/python bench/dose.py [--target 2] [--first-primaries 100000] [--shards 2] [--rounds 2]

CPU seconds (getrusage of each run's process tree) are reported next to the wall times: on a
shared machine they compare the work done, whatever load each run met. `pipeline_cpu_overhead_share`
counts the node process's CPU from the job READY to its RT Dose written (what `ours_s` times), plus
the workers' and engines'; `cpu_overhead_share` counts the node process whole (with this script's
C-STORE sender and receiver in it).

Last line: {"ours_s", "bare_s", "overhead_share", "ours_cpu_s", "bare_cpu_s", "cpu_overhead_share",
"ours_pipeline_cpu_s", "pipeline_cpu_overhead_share", "rounds",
"peak_tree_rss_mb", "peak_tree_pss_mb", "peak_node_rss_mb", "peak_largest_child_rss_mb", "rtdose_mb", "primaries",
"waves", ...}.
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
import threading
import time
from pathlib import Path
from typing import Any

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
            assert node.pipeline is not None
            timings = node.pipeline.timings[job.id]
            pipeline_cpu = timings["process_cpu_at_merged"] - timings["process_cpu_at_seal"]
    (dose_path,) = receiver.received
    public = job.data.public
    kib = 1024.0
    return {"wall_s": wall, "stages": stages, "job_dir": str(work / "node" / "data" / "jobs" / job.id),
            "primaries": public.primaries, "waves": public.waves, "summary": public.summary,
            "target_met": public.uncertainty_target_met, "dose_grid": public.dose_grid,
            "rtdose_mb": dose_path.stat().st_size / 1e6, "shard_wall_s": public.shard_wall_s,
            "peak_node_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
            "peak_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
            # CPU seconds: the node process itself (receive, prepare, seal, merge, write, send) and
            # everything it waited for (the workers and, through them, MCsquare)
            "node_cpu_s": _cpu(resource.RUSAGE_SELF), "shards_cpu_s": _cpu(resource.RUSAGE_CHILDREN),
            # the node process's CPU from READY to the RT Dose written: prepare, seal, dispatch, merge,
            # write (node_cpu_s also holds this script's C-STORE sender, the node's receiving and sending)
            "node_pipeline_cpu_s": pipeline_cpu}


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _tree(pid: int) -> list[int]:
    """pid and every process under it, from the kernel's per-thread children lists (Linux)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:  # ended meanwhile
            continue
    return out


def _rss_pss(pid: int) -> tuple[int, int, str] | None:
    """(RSS, PSS) in bytes and the command name of one process; None when it has ended."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            fields = {k: v for k, _, v in (line.partition(":") for line in fh)}
        with open(f"/proc/{pid}/comm") as fh:
            name = fh.read().strip()
        return int(fields["Rss"].split()[0]) * 1024, int(fields["Pss"].split()[0]) * 1024, name
    except (OSError, KeyError, ValueError):
        return None


class TreeSampler:
    """Peak memory of a process and everything under it, sampled every `period` s in a thread.

    Read from /proc by hand (smaps_rollup, the kernel's children lists): psutil's children() scans
    every process on the machine, 15 ms a call on this shared host, which would load the run we measure.
    """

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid = pid
        self.period = period
        self.peak_rss = self.peak_pss = self.peak_root = self.peak_child = 0
        self.peak_child_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            for p in _tree(self.pid):
                info = _rss_pss(p)
                if info is None:
                    continue
                rss += info[0]
                pss += info[1]
                if p == self.pid:
                    self.peak_root = max(self.peak_root, info[0])
                elif info[0] > self.peak_child:
                    self.peak_child, self.peak_child_name = info[0], info[2]
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.period)

    def report(self) -> dict[str, object]:
        mb = 1e6
        return {"peak_tree_rss_mb": round(self.peak_rss / mb, 1), "peak_tree_pss_mb": round(self.peak_pss / mb, 1),
                "peak_node_rss_mb": round(self.peak_root / mb, 1),
                "peak_largest_child_rss_mb": round(self.peak_child / mb, 1),
                "largest_child": self.peak_child_name}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _ours(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One node run in a child process (fresh node, fresh job), its process tree sampled."""
    node_dir = Path(tempfile.mkdtemp(prefix="node-", dir=work))
    (node_dir / "study").symlink_to(work / "study", target_is_directory=True)
    load0 = _load()
    proc = subprocess.Popen([sys.executable, __file__, "--node-run", str(node_dir), "--target", str(args.target),
                             "--first-primaries", str(args.first_primaries), "--shards", str(args.shards),
                             "--max-primaries", str(args.max_primaries)], stdout=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid) as sampler:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"node run failed (exit {proc.returncode})")
    run: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    stages = run["stages"]
    run["pipeline_s"] = sum(stages[k] for k in ("anonymize+prepare", "seal", "dispatch+compute", "merge",
                                                "write+reidentify"))
    run["memory"] = sampler.report()
    run["load"] = [load0, _load()]
    return run


def _bare(inputs_dir: Path, primaries: int) -> dict[str, Any]:
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
        load0, cpu0 = _load(), _cpu(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(binary), config.name], cwd=scratch, stdout=subprocess.DEVNULL,
                                env={**os.environ, "MCsquare_Materials_Dir": str(materials)})
        with TreeSampler(proc.pid) as sampler:
            proc.wait()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"bare MCsquare failed (exit {proc.returncode})")
        return {"bare_s": wall, "bare_cpu_s": _cpu(resource.RUSAGE_CHILDREN) - cpu0,
                "peak_rss_mb": round(sampler.peak_root / 1e6, 1), "load": [load0, _load()]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=2.0, help="target uncertainty, percent")
    ap.add_argument("--first-primaries", type=int, default=100_000, help="primaries of the first wave")
    ap.add_argument("--max-primaries", type=int, default=20_000_000)
    ap.add_argument("--shards", type=int, default=2, help="shards per wave")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (ours, bare), in ABBA order")
    ap.add_argument("--node-run", type=Path, help=argparse.SUPPRESS)  # internal: the measured child
    args = ap.parse_args()
    if args.node_run:
        print(json.dumps(_node_run(args.node_run, args.target, args.first_primaries, args.shards,
                                   args.max_primaries)))
        return 0
    ours: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-dose-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from bench.dose import "
                        "_write_phantom; from pathlib import Path; _write_phantom(Path(sys.argv[2]))",
                        str(ROOT), str(work / "study")], check=True)
        print(f"phantom written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for r in range(args.rounds):
            order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")
            for what in order:  # round 1 starts with ours: bare runs on the first job's inputs
                if what == "ours":
                    ours.append(_ours(work, args))
                    last, took = ours[-1], ours[-1]["pipeline_s"]
                else:
                    bare.append(_bare(Path(ours[0]["job_dir"]) / "inputs", int(ours[0]["primaries"])))
                    last, took = bare[-1], bare[-1]["bare_s"]
                print(f"round {r + 1}: {what} {took:.1f} s (load {last['load'][0]} -> {last['load'][1]})",
                      file=sys.stderr)
                print(json.dumps({"round": r + 1, what: {k: v for k, v in last.items() if k != "stages"}}),
                      file=sys.stderr)  # the raw figures, kept should a later round fail
    run = ours[0]
    stages = run["stages"]
    ours_s, bare_s = sum(o["pipeline_s"] for o in ours), sum(b["bare_s"] for b in bare)
    ours_cpu = sum(o["node_cpu_s"] + o["shards_cpu_s"] for o in ours)
    ours_pipeline_cpu = sum(o["node_pipeline_cpu_s"] + o["shards_cpu_s"] for o in ours)
    bare_cpu = sum(b["bare_cpu_s"] for b in bare)
    cores = os.cpu_count() or 1
    peaks = {k: max(o["memory"][k] for o in ours) for k in ("peak_tree_rss_mb", "peak_tree_pss_mb",
                                                             "peak_node_rss_mb", "peak_largest_child_rss_mb")}
    result = {
        "ours_s": round(ours_s, 2),
        "bare_s": round(bare_s, 2),
        "overhead_share": round(ours_s / bare_s - 1, 4),
        # CPU seconds do not depend on how many other processes share the cores: on a loaded machine
        # they compare the work done, where the wall times also compare the load each run met
        "ours_cpu_s": round(ours_cpu, 1),
        "bare_cpu_s": round(bare_cpu, 1),
        "cpu_overhead_share": round(ours_cpu / bare_cpu - 1, 4),
        # the same with the node's CPU counted over the pipeline only (as ours_s counts its wall time)
        "ours_pipeline_cpu_s": round(ours_pipeline_cpu, 1),
        "pipeline_cpu_overhead_share": round(ours_pipeline_cpu / bare_cpu - 1, 4),
        "rounds": [{"ours_s": round(o["pipeline_s"], 2), "bare_s": round(b["bare_s"], 2), "primaries": o["primaries"],
                    "node_cpu_s": round(o["node_cpu_s"], 1), "shards_cpu_s": round(o["shards_cpu_s"], 1),
                    "node_pipeline_cpu_s": round(o["node_pipeline_cpu_s"], 1),
                    "bare_cpu_s": round(b["bare_cpu_s"], 1), "shard_wall_s": o["shard_wall_s"],
                    "load_ours": o["load"], "load_bare": b["load"]} for o, b in zip(ours, bare, strict=True)],
        "peak_node_maxrss_mb": round(max(o["peak_node_mb"] for o in ours), 1),
        **peaks,
        "largest_child": run["memory"]["largest_child"],
        "bare_peak_rss_mb": max(b["peak_rss_mb"] for b in bare),
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
    if any(o["primaries"] != run["primaries"] for o in ours):
        print(f"  note: the rounds ran {[o['primaries'] for o in ours]} primaries; bare ran {run['primaries']}",
              file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
