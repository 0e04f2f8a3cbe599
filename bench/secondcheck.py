"""Second-check speed and gamma pass rates on a real plan, against pymedphys on the same grids.

The case: the RayStation 12 export in tests/data/realdata/raystation12_tr3/reference (plan, structure
set with its External, RayStation's own RT Dose on a 2 mm grid, 113x110x113). Its CT is not part of
the export: the phantom CT is rebuilt from the External contour on the structure set's CT UIDs
(tests/realdata.py: 2 mm pixels, 5 mm slices, 134x122x61 voxels with air around the body), which is
the MC scoring grid.
The "MC" dose is RayStation's dose on that grid (its mean over each CT voxel, as an MC engine scores it;
before 2026-11-25 its value at the voxel centres) with Monte Carlo-like noise: a relative standard error
of NOISE at the maximum growing as 1/sqrt(dose), and noise spikes in the air around the body (1 % of
the air voxels, up to about 1.5x the maximum), as an MC dose has them. Noise levels 1 %, 2 % (the
default limit) and 6 % (a far too short MC run); also the TPS dose scaled by 4 % and shifted 3 mm.

- check: the whole second check as the node runs it, `run_comparison` (RT Dose decoding, resampling,
  body and structure masks, gamma at every criterion of the default policy, DVH metrics) and
  `write_report` (HTML and PDF), timed with its parts.
- pymedphys: `pymedphys.gamma` on the same grids and the same evaluated voxels (reference = the MC
  dose on its grid, set below the cut-off outside the evaluated region; evaluation = the TPS dose on
  its own grid), the same normalisation and max_gamma, interp_fraction 10 (its default), for the 1 %
  and 2 % noise cases (with more noise or a scaled dose it takes many minutes).

numba compiles both searches on first use: one small warm-up call each, outside the timings. Besides
wall seconds, the CPU seconds of the check (all threads of the process): on a shared machine the wall
time depends on the other load; on an idle 2-core machine the check's wall time is at most its CPU time
(the report is single-threaded, the gamma search uses both cores).

    .venv/bin/python bench/secondcheck.py

Last line: {"check_s": {...}, "pass_rates": {...}, "pymedphys": {...}, ...}
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, today  # noqa: E402
from dicom_node.qa.compare import dose_from_rtdose  # noqa: E402
from dicom_node.qa.gamma import gamma_at_points  # noqa: E402
from dicom_node.qa.report import write_report  # noqa: E402
from dicom_node.qa.secondcheck import run_comparison  # noqa: E402
from dicom_node.settings import SecondCheckSettings, parse_criterion  # noqa: E402
from tests.realdata import noisy_mc_dose, scaled_dose, second_check_case, shifted_dose  # noqa: E402

POLICY = SecondCheckSettings()


def pymedphys_rates(cmp, tps_ds, criteria, max_gamma):
    import pymedphys

    tps = dose_from_rtdose(tps_ds, 1)
    ref = np.where(cmp.region, cmp.mc, -1.0)  # outside the region below the 0 % cut-off: not evaluated
    out = {}
    for dose_pct, dist in criteria:
        start = time.perf_counter()
        g = pymedphys.gamma(cmp.axes, ref, tps.grid.axes, tps.values, dose_pct, dist, lower_percent_dose_cutoff=0.0,
                            interp_fraction=10, max_gamma=max_gamma, local_gamma=False,
                            global_normalisation=cmp.normalisation_gy)
        values = g[cmp.region]
        out[f"{dose_pct:g}%/{dist:g}mm"] = {
            "pass_rate_percent": round(100.0 * float(np.count_nonzero(values <= 1.0)) / values.size, 3),
            "seconds": round(time.perf_counter() - start, 2)}
    return out


def main() -> None:
    logging.disable(logging.INFO)  # pymedphys's chatter on the root logger
    work = tempfile.TemporaryDirectory()
    case = second_check_case(Path(work.name))
    rs, rp, rd, ct = case.rs, case.rp, case.rd, case.ct
    criteria = list(dict.fromkeys(parse_criterion(c) for c in (*POLICY.criteria, *POLICY.report_criteria)))
    # warm-up: numba compiles the gamma search (ours) and pymedphys's interpolator once per process
    axes = (np.arange(5.0), np.arange(5.0), np.arange(5.0))
    gamma_at_points(np.zeros((1, 3)), np.ones(1), axes, np.ones((5, 5, 5)), 0.1, 2.0)
    import pymedphys

    pymedphys.gamma(axes, np.ones((5, 5, 5)), axes, np.ones((5, 5, 5)), 3, 3)

    shifted, scaled = shifted_dose(rd, 3.0), scaled_dose(rd, 1.04)
    cases = [("noise 1 %", 0.01, rd, True), ("noise 2 %", 0.02, rd, True), ("noise 6 %", 0.06, rd, False),
             ("scaled 4 %, noise 1 %", 0.01, scaled, False), ("shifted 3 mm, noise 1 %", 0.01, shifted, False)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, noise, tps_ds, with_pymedphys in cases:
            mc, _dose = noisy_mc_dose(case, noise, seed=7, air_spike=0.5)
            cpu0 = time.process_time()
            start = time.perf_counter()
            cmp, result = run_comparison(mc, tps_ds, POLICY, rs, 1, ct=ct, plan=rp,
                                         summary={"uncertainty_percent": 100.0 * noise})
            compared = time.perf_counter() - start
            t0 = time.perf_counter()
            write_report(Path(tmp) / name.replace(" ", "_"), cmp, result, {"Plan": str(rp.RTPlanLabel)}, ct=ct,
                         plan=rp)
            report_s = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            row = {
                "case": name, "check_s": round(compared + report_s, 2), "check_cpu_s": round(cpu, 2),
                "compare_s": round(compared, 2),
                "report_s": round(report_s, 2),
                "gamma_s": {k: g["seconds"] for k, g in result["gamma"].items()},
                "parts_s": result["seconds"],
                "evaluated_voxels": result["coverage"]["evaluated_voxels"],
                "verdict": result["verdict"],
                "pass_rates": {k: g["pass_rate_percent"] for k, g in result["gamma"].items()},
            }
            if with_pymedphys:
                row["pymedphys"] = pymedphys_rates(cmp, tps_ds, criteria, POLICY.max_gamma)
                row["pass_rate_difference_pp"] = {
                    k: round(row["pass_rates"][k] - v["pass_rate_percent"], 3) for k, v in row["pymedphys"].items()}
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    out = {
        "cases": results,
        "max_check_s": max(r["check_s"] for r in results),
        "max_check_cpu_s": max(r["check_cpu_s"] for r in results),
        "mc_grid": list(ct.values.shape), "tps_grid": list(dose_from_rtdose(rd).values.shape),
        "criteria": [f"{d:g}%/{r:g}mm" for d, r in criteria], "max_gamma": POLICY.max_gamma,
        "pymedphys_version": pymedphys.__version__, "machine": machine(), "date": today(),
    }
    work.cleanup()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
