"""The gamma search (dicom_node.qa.gamma) against a brute-force minimum on small 3D grids.

Brute force: for each reference point, the evaluated dose (scipy's trilinear RegularGridInterpolator)
on every offset of a 0.2 mm lattice inside the sphere of radius max_gamma x DTA, and the smallest
sqrt(|offset|^2/DTA^2 + dose difference^2/dD^2); then, because 0.2 mm is coarse where the dose
is steep, a continuous minimisation (scipy Nelder-Mead) from the three best lattice points. The doses
are smooth bumps plus voxel noise (a noisy reference as a Monte Carlo dose is), shifted and scaled, so
points pass, fail and hit the cap.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import RegularGridInterpolator
from scipy.optimize import minimize

from dicom_node.qa.gamma import gamma_at_points

DTA = 2.0
DOSE_GY = 0.6  # 3 % of 20 Gy
CAP = 1.5


def _axes(n: int, step: float, start: float) -> np.ndarray:
    return start + step * np.arange(n)


def _bump(z, y, x, shift=0.0):
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return 20.0 * np.exp(-(((xx - shift) / 6.0) ** 2 + (yy / 5.0) ** 2 + (zz / 7.0) ** 2) / 2.0)


def brute_force(points, ref, axes, values, dose_gy, dta, cap, step=0.2):
    interp = RegularGridInterpolator(axes, values, bounds_error=False, fill_value=np.nan)
    r = np.arange(-cap * dta, cap * dta + 1e-9, step)
    oz, oy, ox = np.meshgrid(r, r, r, indexing="ij")
    off = np.column_stack([oz.ravel(), oy.ravel(), ox.ravel()])
    dist = np.sqrt((off**2).sum(axis=1))
    off, dist = off[dist <= cap * dta], dist[dist <= cap * dta]
    out = []
    for p, d in zip(points, ref, strict=True):
        v = interp(p + off)
        g2 = (dist / dta) ** 2 + ((v - d) / dose_gy) ** 2

        def gamma2(o, p=p, d=d):
            o = np.asarray(o)
            if np.sqrt(o @ o) > cap * dta:
                return np.inf
            val = interp(p + o)[0]
            return np.inf if np.isnan(val) else float(o @ o / dta**2 + ((val - d) / dose_gy) ** 2)

        best = float(np.nanmin(g2))
        for start in np.argsort(np.nan_to_num(g2, nan=np.inf))[:3]:
            res = minimize(gamma2, off[start], method="Nelder-Mead",
                           options={"xatol": 1e-5, "fatol": 1e-9, "initial_simplex": off[start] + 0.05 * np.vstack(
                               [np.zeros(3), np.eye(3)])})
            best = min(best, float(res.fun))
        out.append(min(float(np.sqrt(best)), cap))
    return np.array(out)


@pytest.mark.parametrize("shift,scale", [(1.5, 1.0), (-4.0, 1.06)])
def test_gamma_matches_brute_force(shift, scale):
    rng = np.random.default_rng(11)
    # evaluated: a 2 mm grid; reference points: off the evaluated grid's nodes, noisy like an MC dose
    ez, ey, ex = _axes(13, 2.0, -12.0), _axes(13, 2.0, -12.0), _axes(15, 2.0, -14.0)
    evaluated = scale * _bump(ez, ey, ex, shift)
    pts = np.column_stack([rng.uniform(-8, 8, 30), rng.uniform(-8, 8, 30), rng.uniform(-9, 9, 30)])
    clean = RegularGridInterpolator((ez, ey, ex), _bump(ez, ey, ex))(pts)
    ref = clean * (1.0 + 0.02 * rng.standard_normal(len(pts)))
    got = gamma_at_points(pts, ref, (ez, ey, ex), evaluated, DOSE_GY, DTA, max_gamma=CAP)
    want = brute_force(pts, ref, (ez, ey, ex), evaluated, DOSE_GY, DTA, CAP)
    # both evaluate gamma at real points (upper bounds of the true minimum); they agree to 0.01
    assert np.max(np.abs(got - want)) < 0.01, np.max(np.abs(got - want))
    assert np.all(got <= CAP) and np.all(got >= 0)
    assert np.mean(got > 0.3) > 0.2  # not a comparison of zeros
    if abs(shift) > DTA:
        assert np.any(got > 1.0)  # a shift beyond the DTA fails somewhere


def test_points_outside_the_evaluated_grid_get_the_cap_and_identical_doses_zero():
    ez = ey = ex = _axes(9, 2.0, -8.0)
    values = _bump(ez, ey, ex)
    on_nodes = np.array([[0.0, 0.0, 0.0], [2.0, -4.0, 6.0]])
    ref = np.array([values[4, 4, 4], values[5, 2, 7]])
    np.testing.assert_allclose(gamma_at_points(on_nodes, ref, (ez, ey, ex), values, DOSE_GY, DTA), 0.0, atol=1e-12)
    far = np.array([[0.0, 0.0, 100.0]])
    assert gamma_at_points(far, np.array([10.0]), (ez, ey, ex), values, DOSE_GY, DTA, max_gamma=2.0)[0] == 2.0
    with pytest.raises(ValueError, match="evenly spaced"):
        gamma_at_points(on_nodes, ref, (ez, ey, np.array([0, 1, 3, 4, 5, 6, 7, 8, 9.0])), values, DOSE_GY, DTA)
