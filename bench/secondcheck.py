"""Second-check speed: gamma 3%/3mm of a 2 mm dose grid of the demo phantom, ours vs pymedphys direct.

The demo phantom (`dicom_node.demo.DEMO_SPEC`) at 2 mm spacing gives a 120x120x75 grid. The doses are
analytic, shaped like the demo's single anterior proton field: a cylinder of radius 25 mm along y
with a 4 mm lateral penumbra, an entrance plateau at 60 % rising to a flat spread-out Bragg peak over
the target and a 2 mm distal fall-off; 60 Gy maximum. The "MC" dose carries 1 % Gaussian noise
(seeded); the "TPS" dose is the noiseless shape 1 % higher and 1 mm to the patient's left, on a
2.5 mm grid offset by half a voxel, so resampling is real work.

- ours: `dicom_node.qa.compare.compare` with the 3%/3mm criterion and the default policy (global, 10 %
  low-dose threshold, max_gamma 2, interp_fraction 10): trilinear resampling of the TPS dose onto the
  MC grid, gamma, dose-difference statistics, and the phantom's BODY and PTV rasterised with their DVH
  metrics.
- pymedphys: `pymedphys.gamma` called directly on the two native grids with the same options (it
  interpolates the TPS dose itself).

numba is warmed up first; 3 alternating rounds, the median counts.

    .venv/bin/python bench/secondcheck.py

Last line: {"ours_s": ..., "pymedphys_s": ..., "ratio": ..., ...}
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import erfc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, today  # noqa: E402
from dicom_node.demo import DEMO_SPEC  # noqa: E402
from dicom_node.phantom import build_study  # noqa: E402
from dicom_node.qa.compare import Grid, compare, ct_from_datasets, structures_from_rtstruct  # noqa: E402

ROUNDS = 3


def field_dose(z: np.ndarray, y: np.ndarray, x: np.ndarray, shift_x: float = 0.0) -> np.ndarray:
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    r = np.sqrt((xx - shift_x) ** 2 + zz**2)
    lateral = 0.5 * erfc((r - 25.0) / (np.sqrt(2.0) * 4.0))
    depth = (0.6 + 0.4 * np.clip((yy + 90.0) / 65.0, 0.0, 1.0)) * 0.5 * erfc((yy - 25.0) / (np.sqrt(2.0) * 2.0))
    depth = np.where(yy >= -90.0, depth, 0.0)
    return 60.0 * lateral * depth


def main() -> None:
    spec = dataclasses.replace(DEMO_SPEC, spacing_mm=(2.0, 2.0, 2.0))
    study = build_study(spec)
    ct = ct_from_datasets(study.ct)
    rng = np.random.default_rng(7)
    clean = field_dose(ct.z, ct.y, ct.x)
    mc = Grid(ct.z, ct.y, ct.x, clean * (1.0 + 0.01 * rng.standard_normal(clean.shape)))
    tz, ty, tx = (np.arange(a[0] - 1.25, a[-1] + 2.5, 2.5) for a in ct.axes)
    tps = Grid(tz, ty, tx, 1.01 * field_dose(tz, ty, tx, shift_x=1.0))
    structures = structures_from_rtstruct(study.rtstruct)
    above = int(np.count_nonzero(mc.values >= 0.1 * mc.values.max()))
    print(f"MC grid {mc.describe()}; {above} voxels above 10 %; TPS grid {tps.describe()}", file=sys.stderr)

    import pymedphys

    def ours():
        return compare(mc, tps, [(3.0, 3.0)], low_dose_percent=10.0, max_gamma=2.0, structures=structures)

    def direct():
        return pymedphys.gamma(mc.axes, mc.values, tps.axes, tps.values, 3.0, 3.0, lower_percent_dose_cutoff=10.0,
                               interp_fraction=10, max_gamma=2.0, local_gamma=False,
                               global_normalisation=float(mc.values.max()))

    # numba compiles pymedphys's interpolator on first use: warm it up outside the timings.
    small = Grid(ct.z[:5], ct.y[:5], ct.x[:5], np.ones((5, 5, 5)))
    compare(small, small, [(3.0, 3.0)])
    times: dict[str, list[float]] = {"ours": [], "direct": []}
    for _round in range(ROUNDS):  # alternate, median counts
        start = time.perf_counter()
        cmp = ours()
        times["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        g = direct()
        times["direct"].append(time.perf_counter() - start)
    ours_s, direct_s = (statistics.median(times[k]) for k in ("ours", "direct"))
    ours_rate = cmp.numbers["gamma"]["3%/3mm"]["pass_rate_percent"]
    valid = g[np.isfinite(g)]
    direct_rate = round(100.0 * np.count_nonzero(valid <= 1.0) / valid.size, 3)
    result = {
        "ours_s": round(ours_s, 2), "pymedphys_s": round(direct_s, 2), "ratio": round(ours_s / direct_s, 3),
        "ours_gamma_s": cmp.numbers["gamma"]["3%/3mm"]["seconds"], "ours_resample_s": cmp.numbers["resample_seconds"],
        "rounds": ROUNDS, "ours_pass_rate": ours_rate, "pymedphys_pass_rate": direct_rate,
        "evaluated_voxels": cmp.numbers["gamma"]["3%/3mm"]["evaluated_voxels"],
        "grid": list(mc.values.shape), "pymedphys": pymedphys.__version__, "machine": machine(), "date": today(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
