"""Photon engine speed and the cost of distributing it (issue 15): ompMC called directly against our run.

The case: a 10 x 10 cm 6 MV field (100 MU, gantry 0, 5 mm beamlets) on the 20 cm water cube of the
photon tests (a 24 x 24 x 20 cm CT of 5 mm voxels), dose on the CT's grid, the generic beam model.

- ``direct``: one process that imports ompmc and calls ``calc_forward`` on the geometry and beamlets
  our ``prepare`` wrote (the same arrays, the same spectrum, 2 batches), with ``--shards`` OpenMP
  threads. Timed twice: the process as a whole (start, import, data, run) and the ``calc_forward``
  call alone. A one-thread run of a quarter of the histories gives histories/s/core.
- ``ours``: the plan as a job: ``prepare`` from the DICOM datasets in memory, the inputs sealed into a
  bundle with a fresh data key, ``--shards`` shards with their own seeds run as worker processes on the
  local backend (one thread each), merged (pooled uncertainty from the shards' spread, body mask) and
  written as an RT Dose.

Both run the same histories in the same run of this script, alternating ``--repeats`` times; medians
are reported. The overhead ratio is ours / direct (whole process).

    .venv/bin/python bench/photon.py [--histories 100000] [--shards 2] [--repeats 2]

Last stdout line: JSON with histories_per_s_per_core, direct_s, direct_calc_s, ours_s,
overhead_ratio, uncertainty_percent, machine, date.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anonymizer.seal import new_data_key  # noqa: E402
from bench._common import machine, today  # noqa: E402
from cloud.backends.local import LocalBackend  # noqa: E402
from cloud.bundle import make_bundle  # noqa: E402
from cloud.dispatch import dispatch, plan_tasks  # noqa: E402
from cloud.engines import get_engine  # noqa: E402
from cloud.engines.base import DoseOptions, Tally  # noqa: E402
from cloud.merge import merge  # noqa: E402
from dicom_node.jobs.compute import ct_slices_sorted, rt_dose  # noqa: E402
from tests.photon_plans import MACHINE, photon_plan, water_study  # noqa: E402

# The direct run: nothing of this project, only ompmc and numpy, on the files prepare wrote.
DIRECT = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import ompmc
root, histories, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = np.load(root + "/photon_geometry.npz")
media = ["AIR700ICRU", "LUNG700ICRU", "H2O700ICRU", "ICRPBONE700ICRU"]
geometry = ompmc.Geometry(g["x"], g["y"], g["z"], media,
                          np.asfortranarray(g["density"].astype(np.float64).transpose(2, 1, 0)),
                          np.asfortranarray(g["medium"].astype(np.int32).transpose(2, 1, 0)))
b = np.load(root + "/photon_beamlets.npz")
source = ompmc.BeamletSource(b["i_beam"], b["source"], b["corner"], b["side1"], b["side2"])
spectrum = ompmc.Spectrum.from_file(str(ompmc.data_path() / "spectra" / "mohan6.spectrum"))
t1 = time.perf_counter()
dose, unc = ompmc.calc_forward(geometry, source, b["weights"], spectrum, ompmc.Physics(seeds=(seed, 33)),
                               n_histories=histories, n_batches=2)
t2 = time.perf_counter()
print(json.dumps({"calc_s": t2 - t1, "max": float(np.max(dose))}))
"""


def direct(root: Path, histories: int, threads: int, seed: int = 1) -> tuple[float, float]:
    """(whole process wall s, calc_forward wall s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DIRECT, str(root), str(histories), str(seed)], env=env,
                          capture_output=True, text=True, check=True, timeout=3600)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return wall, float(result["calc_s"])


def ours(datasets: list[Any], histories: int, shards: int, work: Path) -> tuple[float, dict[str, Any]]:
    """Wall seconds of the plan as a distributed job, and its merged summary."""
    engine = get_engine("ompmc")
    plan = next(ds for ds in datasets if "BeamSequence" in ds)
    start = time.perf_counter()
    inputs = engine.prepare(datasets, work / "inputs", beam_models={MACHINE: "generic"},
                            dose=DoseOptions(grid_mm=0.0))
    key, job_id = new_data_key(), f"bench-{secrets.token_hex(4)}"
    bundle = make_bundle(work / "bundle.sealed", key, job_id, {"inputs": inputs.root},
                         {"engine": inputs.engine, "files": []})
    tasks = plan_tasks(job_id, shards, histories, bundle.as_uri(), (work / "results").as_uri())
    tallies = [Tally.from_bytes(b) for b in dispatch(tasks, key, LocalBackend(max_workers=shards))]
    merged = merge(tallies, inputs.protons_per_fraction, inputs.fractions, expected_shards=shards,
                   expected_primaries=histories, body=inputs.body_mask())
    cts = ct_slices_sorted([ds for ds in datasets if ds.get("Modality") == "CT"])
    rt_dose(merged, inputs, cts[0], plan, inputs.ct_calibration).save_as(work / "RD.dcm", enforce_file_format=True)
    return time.perf_counter() - start, merged.summary


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--histories", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating direct/ours pairs; medians reported")
    args = parser.parse_args()
    study = water_study()
    plan = photon_plan(study, gantry=0.0, segments=((100.0, (-50.0, 50.0), (-50.0, 50.0), None),))
    datasets = [*study.ct, study.rtstruct, plan]
    direct_runs: list[tuple[float, float]] = []
    ours_runs: list[float] = []
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-photon-") as tmp:
        tmp_path = Path(tmp)
        prepared = get_engine("ompmc").prepare(datasets, tmp_path / "prepared", beam_models={MACHINE: "generic"},
                                               dose=DoseOptions(grid_mm=0.0))
        single_h = max(args.histories // 4, 1)
        single_wall, single_calc = direct(prepared.root, single_h, 1)
        per_core = single_h / single_calc
        print(f"one thread: {single_h} histories, calc_forward {single_calc:.2f} s ({per_core:.0f}/s/core), "
              f"process {single_wall:.2f} s", flush=True)
        for r in range(args.repeats):
            d = direct(prepared.root, args.histories, args.shards)
            direct_runs.append(d)
            o, summary = ours(datasets, args.histories, args.shards, tmp_path / f"ours-{r}")
            ours_runs.append(o)
            print(f"round {r + 1}: direct {d[0]:.2f} s (calc_forward {d[1]:.2f} s), ours {o:.2f} s", flush=True)
    direct_s = statistics.median(w for w, _c in direct_runs)
    direct_calc_s = statistics.median(c for _w, c in direct_runs)
    ours_s = statistics.median(ours_runs)
    print(json.dumps({
        "histories": args.histories, "shards": args.shards,
        "histories_per_s_per_core": round(per_core, 1),
        "direct_s": round(direct_s, 3), "direct_calc_s": round(direct_calc_s, 3), "ours_s": round(ours_s, 3),
        "overhead_ratio": round(ours_s / direct_s, 3),
        "uncertainty_percent": None if summary.get("uncertainty_percent") is None
        else round(float(summary["uncertainty_percent"]), 2),
        "rounds": {"direct_s": [round(w, 2) for w, _c in direct_runs], "ours_s": [round(o, 2) for o in ours_runs]},
        "machine": machine(), "date": today(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
