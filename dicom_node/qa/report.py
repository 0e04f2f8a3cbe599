"""The second-check report for a physicist: one self-contained HTML file and a PDF, verdict first.

Pictures (dose and gamma maps on axial, sagittal and coronal CT planes through the isocenter, DVH of
both doses, gamma histogram) are drawn once with matplotlib's object API (Figure objects, no pyplot:
no global backend or figure registry, so importing this module changes nothing and drawing is safe
on the second-check thread) and go into both documents: as
base64 PNG inside the HTML, as pages of the PDF (each drawn once; Pillow writes the PDF). The report
is for the clinic and shows the patient ID and plan label; nothing here is logged.

`encapsulated_pdf` wraps the PDF as a DICOM Encapsulated PDF for sending to a document archive.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.patches
import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage

from cloud.engines.base import UNCOMMISSIONED
from dicom_node.jobs.rtdose import new_instance
from dicom_node.qa.compare import Comparison, Volume, cumulative_dvh, resample

METRICS = ("mean", "D98", "D95", "D50", "D2")


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return (color[0] / 255.0, color[1] / 255.0, color[2] / 255.0)


def _slice(vol: np.ndarray, plane: str, idx: tuple[int, int, int]) -> np.ndarray:
    k, j, i = idx
    views: dict[str, np.ndarray] = {"axial": vol[k], "coronal": vol[:, j, :], "sagittal": vol[:, :, i]}
    return views[plane]


def _extent(axes: tuple[np.ndarray, ...], plane: str) -> list[float]:
    z, y, x = axes
    if plane == "axial":
        return [x[0], x[-1], y[-1], y[0]]
    if plane == "coronal":
        return [x[0], x[-1], z[0], z[-1]]
    return [y[0], y[-1], z[0], z[-1]]


def _overlay_ct(ax: Any, ct: np.ndarray | None, plane: str, idx: tuple[int, int, int], ext: list[float],
                origin: str) -> None:
    if ct is not None:
        ax.imshow(_slice(ct, plane, idx), cmap="gray", vmin=-400, vmax=600, extent=ext, origin=origin)


def _contours(ax: Any, cmp: Comparison, plane: str, idx: tuple[int, int, int], ext: list[float], origin: str
              ) -> None:
    """Every structure's outline on the plane, in its colour: one image of edge voxels (a contour() per
    structure and plane costs far more)."""
    from scipy.ndimage import binary_erosion

    overlay = None
    for name, mask in cmp.masks.items():
        m = _slice(mask, plane, idx)
        if not m.any() or m.all():
            continue
        edge = m & ~binary_erosion(m)
        if overlay is None:
            overlay = np.zeros((*m.shape, 4))
        overlay[edge] = (*_rgb(cmp.colors[name]), 1.0)
    if overlay is not None:
        ax.imshow(overlay, extent=ext, origin=origin, interpolation="nearest")


PLANES = ("axial", "coronal", "sagittal")


def _plane_label(plane: str, axes: tuple[np.ndarray, ...], idx: tuple[int, int, int]) -> str:
    z, y, x = axes
    k, j, i = idx
    return {"axial": f"axial z {z[k]:.1f} mm", "coronal": f"coronal y {y[j]:.1f} mm",
            "sagittal": f"sagittal x {x[i]:.1f} mm"}[plane]


def worst_failing_index(cmp: Comparison, criterion: str) -> tuple[tuple[int, int, int], str] | None:
    """The centre of the densest cluster of failing voxels (gamma > 1), or None when none fails."""
    from scipy.ndimage import uniform_filter

    g = cmp.gammas[criterion]
    failing = np.nan_to_num(g, nan=0.0) > 1.0
    if not failing.any():
        return None
    density = uniform_filter(failing.astype(np.float32) * np.nan_to_num(g, nan=0.0).astype(np.float32), size=5)
    density[~failing] = -1.0
    k, j, i = np.unravel_index(int(np.argmax(density)), density.shape)
    return (int(k), int(j), int(i)), "the densest cluster of failing voxels"


def gamma_maps_figure(cmp: Comparison, ct: np.ndarray | None, centre: tuple[int, int, int],
                      worst: tuple[tuple[int, int, int], str] | None, criterion: str) -> Figure:
    """Gamma on the three planes through the isocenter and, below, through the worst failing region."""
    rows = [("isocenter", centre)] + ([("worst failing region", worst[0])] if worst else [])
    fig = Figure(figsize=(15, 5.2 * len(rows)))
    axs = fig.subplots(len(rows), 3, squeeze=False)
    g = cmp.gammas[criterion]
    cap = float(cmp.numbers["method"]["max_gamma"])
    cmap = matplotlib.colormaps["RdYlGn_r"]
    for r, (what, idx) in enumerate(rows):
        for c, plane in enumerate(PLANES):
            ax = axs[r, c]
            ext = _extent(cmp.axes, plane)
            origin = "upper" if plane == "axial" else "lower"
            _overlay_ct(ax, ct, plane, idx, ext, origin)
            im = ax.imshow(np.ma.masked_invalid(_slice(g, plane, idx)), cmap=cmap, vmin=0, vmax=cap, extent=ext,
                           origin=origin, alpha=0.9)
            fail = np.nan_to_num(_slice(g, plane, idx), nan=0.0) > 1.0
            if fail.any() and not fail.all():
                ax.contour(fail.astype(float), levels=[0.5], colors=["k"], linewidths=0.6, extent=ext,
                           origin=origin)
            _contours(ax, cmp, plane, idx, ext, origin)
            ax.set_title(f"gamma {criterion} through the {what}\n{_plane_label(plane, cmp.axes, idx)}",
                         fontsize=10)
            ax.set_xlabel("mm")
            ax.locator_params(nbins=4)  # fewer tick labels: text layout is most of a figure's cost
    fig.suptitle(f"Gamma {criterion} (evaluated voxels only; black line: gamma = 1)", fontsize=12)
    fig.subplots_adjust(left=0.05, right=0.92, bottom=0.06, top=0.86 if len(rows) == 1 else 0.91, wspace=0.25,
                        hspace=0.3)
    fig.colorbar(im, cax=fig.add_axes((0.945, 0.1, 0.015, 0.8)), label="gamma")
    return fig


def dose_maps_figure(cmp: Comparison, ct: np.ndarray | None, centre: tuple[int, int, int]) -> Figure:
    """The axial plane through the isocenter: MC dose, TPS dose, TPS - MC (% of the normalisation)."""
    fig = Figure(figsize=(16, 5))
    axs = fig.subplots(1, 3)
    norm = cmp.normalisation_gy
    diff = np.where(cmp.region, 100.0 * (cmp.tps - cmp.mc) / norm, np.nan)
    plane = "axial"
    ext = _extent(cmp.axes, plane)
    for c, ax in enumerate(axs):
        _overlay_ct(ax, ct, plane, centre, ext, "upper")
        if c < 2:
            d = _slice(cmp.mc if c == 0 else cmp.tps, plane, centre)
            im = ax.imshow(np.ma.masked_less(d, cmp.threshold_gy), cmap="jet", vmin=0, vmax=1.1 * norm, alpha=0.6,
                           extent=ext, origin="upper")
            ax.set_title(f"{'MC' if c == 0 else 'TPS'} dose (Gy)", fontsize=10)
        else:
            im = ax.imshow(np.ma.masked_invalid(_slice(diff, plane, centre)), cmap="RdBu_r", vmin=-5, vmax=5,
                           extent=ext, origin="upper")
            ax.set_title(f"TPS - MC (% of {norm:.3g} Gy)", fontsize=10)
        _contours(ax, cmp, plane, centre, ext, "upper")
        ax.set_xlabel("mm")
        ax.locator_params(nbins=4)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"Doses through the isocenter, {_plane_label(plane, cmp.axes, centre)}", fontsize=12)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.12, top=0.9, wspace=0.3, hspace=0.45)
    return fig


def difference_histogram(cmp: Comparison) -> Figure:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    pct = 100.0 * (cmp.tps - cmp.mc)[cmp.region] / cmp.normalisation_gy
    if pct.size:
        lim = max(6.0, min(float(np.percentile(np.abs(pct), 99.5)) * 1.1, 30.0))
        ax.hist(np.clip(pct, -lim, lim), bins=np.linspace(-lim, lim, 121).tolist(), color="#4a6fa5")
        med = float(np.median(pct))
        ax.axvline(med, color="#b00020", linewidth=1.5, label=f"median {med:+.2f} %")
    for v in (-3, -2, 2, 3):
        ax.axvline(v, color="k", linestyle=":" if abs(v) == 2 else "--", linewidth=0.8)
    ax.set_xlabel(f"TPS - MC (% of {cmp.normalisation_gy:.4g} Gy)")
    ax.set_ylabel("voxels")
    ax.set_title("Dose difference in the evaluated region (dotted: +-2 %, dashed: +-3 %)")
    ax.legend()
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.12, top=0.9, wspace=0.3, hspace=0.45)
    return fig


def dvh_figure(cmp: Comparison) -> Figure:
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    top = max(float(cmp.mc[cmp.region].max()) if cmp.region.any() else 0.0,
              float(cmp.tps[cmp.region].max()) if cmp.region.any() else 0.0, cmp.normalisation_gy) * 1.08
    bins = np.linspace(0, top, 400)
    for name, mask in cmp.masks.items():
        if not mask.any():
            continue
        color = _rgb(cmp.colors[name])
        ax.plot(bins, cumulative_dvh(cmp.mc, mask, bins), color=color, label=f"{name} MC")
        ax.plot(bins, cumulative_dvh(cmp.tps, mask, bins), color=color, linestyle="--", label=f"{name} TPS")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_title("Cumulative DVH of every structure: MC (solid) and TPS (dashed)")
    ax.grid(alpha=0.3)
    if cmp.masks:
        ax.legend(fontsize=7, ncol=2)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.12, top=0.9, wspace=0.3, hspace=0.45)
    return fig


def gamma_histogram(cmp: Comparison) -> Figure:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for key, g in cmp.gammas.items():
        valid = g[np.isfinite(g)]
        top = max(2.0, float(valid.max()) if valid.size else 2.0)
        ax.hist(valid, bins=np.linspace(0, top, 61).tolist(), histtype="step", linewidth=1.5, label=key)
    ax.axvline(1.0, color="k", linestyle=":")
    ax.set_xlabel("gamma")
    ax.set_ylabel("voxels")
    ax.set_yscale("log")
    ax.set_title("Gamma histogram (evaluated voxels)")
    ax.legend()
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.12, top=0.9, wspace=0.3, hspace=0.45)
    return fig


@dataclass(frozen=True)
class BeamAxis:
    name: str
    isocenter: tuple[float, float, float]  # x, y, z mm
    direction: tuple[float, float, float]  # unit vector x, y, z (source to isocenter)
    gantry: float
    couch: float


def beam_axes(plan: Dataset | None) -> list[BeamAxis]:
    """Each treatment beam's central axis in DICOM patient coordinates (head-first supine assumed).

    IEC 61217: at gantry angle g the source is at (sin g, 0, cos g) in the fixed system (X lateral,
    Z up); the couch angle c turns the patient about the vertical axis. Head-first supine: patient
    x = IEC X, y = -IEC Z, z = IEC Y.
    """
    out: list[BeamAxis] = []
    if plan is None:
        return out
    for beam in plan.get("IonBeamSequence") or plan.get("BeamSequence") or []:
        if str(beam.get("TreatmentDeliveryType", "TREATMENT")).upper() != "TREATMENT":
            continue
        cps = beam.get("IonControlPointSequence") or beam.get("ControlPointSequence") or []
        if not cps or "IsocenterPosition" not in cps[0]:
            continue
        g = math.radians(float(cps[0].get("GantryAngle", 0.0) or 0.0))
        c = math.radians(float(cps[0].get("PatientSupportAngle", 0.0) or 0.0))
        vx, vy, vz = -math.sin(g), 0.0, -math.cos(g)
        tx, ty = math.cos(c) * vx + math.sin(c) * vy, -math.sin(c) * vx + math.cos(c) * vy
        iso = tuple(float(v) for v in cps[0].IsocenterPosition)
        out.append(BeamAxis(str(beam.get("BeamName", beam.get("BeamNumber", ""))), iso,  # type: ignore[arg-type]
                            (tx, -vz, ty), math.degrees(g), math.degrees(c)))
    return out


def _sample(vol: np.ndarray, axes: tuple[np.ndarray, ...], pts: np.ndarray, order: int = 1) -> np.ndarray:
    """Values of vol at points (N x 3, z y x mm), trilinear (order 1) or nearest (0); NaN outside."""
    from scipy.ndimage import map_coordinates

    idx = []
    inside = np.ones(len(pts), dtype=bool)
    for k, a in enumerate(axes):
        step = float(a[1] - a[0]) if len(a) > 1 else 1.0
        f = (pts[:, k] - a[0]) / step
        inside &= (f >= 0) & (f <= len(a) - 1)
        idx.append(f)
    out: np.ndarray = map_coordinates(vol.astype(np.float64), np.array(idx), order=order, mode="nearest")
    out[~inside] = np.nan
    return out


def depth_dose_figure(cmp: Comparison, beams: list[BeamAxis]) -> Figure | None:
    """MC and TPS dose along each beam's central axis, against depth from where the axis enters the body."""
    if not beams:
        return None
    n = len(beams)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(7.5 * cols, 4.2 * rows))
    axs = fig.subplots(rows, cols, squeeze=False)
    span = float(max(a[-1] - a[0] for a in cmp.axes))
    t = np.arange(-span, span, 0.5)
    for b, beam in enumerate(beams):
        ax = axs[b // cols, b % cols]
        x0, y0, z0 = beam.isocenter
        dx, dy, dz = beam.direction
        pts = np.column_stack([z0 + t * dz, y0 + t * dy, x0 + t * dx])
        body = _sample(cmp.body.astype(np.float32), cmp.axes, pts, order=0)
        entered = np.nonzero(np.nan_to_num(body) > 0.5)[0]
        start = t[entered[0]] if entered.size else t[0]
        mc = _sample(cmp.mc, cmp.axes, pts)
        tps = _sample(cmp.tps, cmp.axes, pts)
        keep = np.isfinite(mc) & np.isfinite(tps) & (t >= start)
        depth = t[keep] - start
        ax.plot(depth, mc[keep], color="#1f4e9c", label="MC")
        ax.plot(depth, tps[keep], color="#d2691e", linestyle="--", label="TPS")
        ax.axvline(-start, color="grey", linestyle=":", linewidth=0.8, label="isocenter")
        ax.set_xlabel("depth along the central axis from the body surface (mm)")
        ax.set_ylabel("dose (Gy)")
        ax.set_title(f"beam {beam.name}: gantry {beam.gantry:g}, couch {beam.couch:g}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for b in range(n, rows * cols):
        axs[b // cols, b % cols].axis("off")
    fig.suptitle("Depth-dose along each beam's central axis (through the isocenter)", fontsize=12)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.12, top=0.9, wspace=0.3, hspace=0.45)
    return fig


def _png(fig: Figure, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})  # speed over size
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


VERDICT_COLOURS = {"pass": "#1b7f2a", "fail": "#b00020", "inconclusive": "#b36b00"}


def _why(result: dict[str, Any]) -> str:
    return "; ".join(result["reasons"]) if result["reasons"] else "every criterion met"


def summary_lines(result: dict[str, Any], header: dict[str, str]) -> list[str]:
    """The numbers as plain text lines (the PDF's first page, and a readable log of the report)."""
    meth = result["method"]
    lines = [f"SECOND CHECK: {result['verdict'].upper()}", "Why: " + _why(result), ""]
    lines += [w.split(":")[0] for w in result.get("warnings", []) if w.startswith(UNCOMMISSIONED)][:1]
    unc = result.get("mc_uncertainty_percent")
    lines.append(f"MC statistical uncertainty: {'unknown' if unc is None else f'{unc:.2f} %'} "
                 f"({result.get('mc_uncertainty_source', '')}); the check needs <= "
                 f"{result.get('max_mc_uncertainty_percent', 0):g} %")
    lines.append(f"Normalisation: {meth['normalisation_source']}; low-dose threshold "
                 f"{meth['low_dose_threshold_percent']:g} % = {meth['low_dose_threshold_gy']:.4g} Gy; "
                 f"body: {meth['body']}")
    lines.append("")
    lines += [f"{k}: {v}" for k, v in header.items()]
    lines.append("")
    lines.append(f"{'gamma':<10} {'pass %':>8} {'required':>9} {'mean':>7} {'p95':>7} {'voxels':>9}")
    for key, g in result["gamma"].items():
        req = f">= {result['min_pass_rate_percent']:g}" if key in result["verdict_criteria"] else "report"
        lines.append(f"{key:<10} {_fmt(g.get('pass_rate_percent')):>8} {req:>9} {_fmt(g.get('mean_gamma')):>7} "
                     f"{_fmt(g.get('gamma_p95')):>7} {g.get('evaluated_voxels', 0):>9}")
    dd = result["dose_difference"]
    lines += ["", f"Dose difference TPS - MC (evaluated voxels, % of {meth['normalisation_gy']:g} Gy):",
              f"  median {_fmt(dd.get('median_percent'))} %, mean {_fmt(dd.get('mean_percent'))} %, "
              f"sd {_fmt(dd.get('sd_percent'))} %, 1st..99th pct {_fmt(dd.get('p1_percent'))}.."
              f"{_fmt(dd.get('p99_percent'))} %",
              f"  within 2 %: {_fmt(dd.get('within_2_percent'))} % of voxels, within 3 %: "
              f"{_fmt(dd.get('within_3_percent'))} %"]
    shift = result.get("shift")
    if shift:
        lines.append(f"  centre of dose TPS - MC: x {shift['x_mm']:+.2f}, y {shift['y_mm']:+.2f}, "
                     f"z {shift['z_mm']:+.2f} mm")
    lines += ["", f"{'structure':<14} {'vol cc':>9} {'':>4} {'mean':>8} {'D98':>8} {'D95':>8} {'D50':>8} {'D2':>8}"]
    for row in result["structures"]:
        for who in ("mc", "tps"):
            m = row[who]
            first = who == "mc"
            lines.append(f"{row['name'][:14] if first else '':<14} {_fmt(m['volume_cc']) if first else '':>9} "
                         f"{who.upper():>4} " + " ".join(f"{_fmt(m[k]):>8}" for k in METRICS))
    if result.get("warnings"):
        lines += ["", "Warnings:"] + [f"  - {w}" for w in result["warnings"]]
    lines += ["", "Method:", f"  reference: MC dose; evaluated: TPS dose; {meth['resample_method']}",
              f"  common grid: {meth['common_grid']}",
              f"  evaluated voxels: {meth['region']}",
              f"  gamma: {meth['gamma']}, lattice step DTA/{meth['interp_fraction']} refined, "
              f"capped at gamma {meth['max_gamma']}",
              f"  structures: {meth['rasterisation']}; {meth['dvh']}"]
    return lines


def _table(rows: list[list[str]], head: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _html(result: dict[str, Any], header: dict[str, str], images: list[tuple[str, str]]) -> str:
    verdict = result["verdict"]
    colour = VERDICT_COLOURS.get(verdict, "#444")
    gamma_rows = [[k, _fmt(g.get("pass_rate_percent")),
                   f">= {result['min_pass_rate_percent']:g} %" if k in result["verdict_criteria"] else "reported",
                   _fmt(g.get("mean_gamma")), _fmt(g.get("gamma_p95")), _fmt(g.get("max_gamma")),
                   str(g.get("evaluated_voxels", 0))] for k, g in result["gamma"].items()]
    dd = result["dose_difference"]
    dd_rows = [[k, _fmt(v)] for k, v in dd.items()]
    s_rows = []
    for row in result["structures"]:
        mc, tps = row["mc"], row["tps"]
        for k in METRICS:
            diff = (None if mc[k] is None or tps[k] is None or not mc[k]
                    else round(100.0 * (tps[k] - mc[k]) / mc[k], 2))
            s_rows.append([row["name"], _fmt(mc["volume_cc"]), k, _fmt(mc[k]), _fmt(tps[k]), _fmt(diff),
                           row.get("checks", {}).get(k, "")])
    meth = result["method"]
    unc = result.get("mc_uncertainty_percent")
    facts = [
        ["MC statistical uncertainty", f"{'unknown' if unc is None else f'{unc:.2f} %'} "
                                       f"({result.get('mc_uncertainty_source', '')}); needed <= "
                                       f"{result.get('max_mc_uncertainty_percent', 0):g} %"],
        ["Normalisation", str(meth["normalisation_source"])],
        ["Evaluated voxels", f"{result['coverage']['evaluated_voxels']}: {meth['region']}"],
        ["Body", str(meth["body"])],
        ["Low-dose threshold", f"{meth['low_dose_threshold_percent']:g} % = {meth['low_dose_threshold_gy']:.4g} Gy"],
    ]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Second check</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}",
        f".verdict{{font-size:2em;font-weight:bold;color:white;background:{colour};padding:.4em .8em}}",
        ".why{font-size:1.2em;margin:.6em 0 1em 0}img{max-width:100%}</style></head><body>",
        f"<div class='verdict'>SECOND CHECK: {verdict.upper()}</div>",
        *[f"<div class='verdict' style='background:#b00020'>{html.escape(UNCOMMISSIONED)}</div>"
          for w in result.get("warnings", [])[:1] if w.startswith(UNCOMMISSIONED)],
        "<p class='why'><b>Why:</b> " + html.escape(_why(result)) + "</p>",
        _table(gamma_rows, ["criterion", "pass rate %", "required", "mean", "95th pct", "max", "voxels"]),
        _table(facts, ["", ""]),
    ]
    for title, b64 in images:
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    parts += [
        "<h2>Plan and doses</h2>", _table([[k, v] for k, v in header.items()], ["", ""]),
        "<h2>Dose difference TPS - MC (evaluated voxels)</h2>", _table(dd_rows, ["statistic", "value"]),
        "<h2>Structures (Gy; diff in % of MC)</h2>",
        _table(s_rows, ["structure", "volume cc", "metric", "MC", "TPS", "diff %", "check"]),
    ]
    if result.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in result["warnings"])
                     + "</ul>")
    parts.append("<h2>Method</h2><ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>"
                                                for k, v in meth.items()) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def centre_index(cmp: Comparison, point_mm: tuple[float, float, float] | None) -> tuple[int, int, int]:
    """Voxel nearest the isocenter (x, y, z mm) when it lies on the grid, else the TPS maximum in the region."""
    z, y, x = cmp.axes
    if point_mm is not None:
        px, py, pz = point_mm
        if z[0] <= pz <= z[-1] and y[0] <= py <= y[-1] and x[0] <= px <= x[-1]:
            return (int(np.argmin(np.abs(z - pz))), int(np.argmin(np.abs(y - py))), int(np.argmin(np.abs(x - px))))
    k, j, i = np.unravel_index(int(np.argmax(np.where(cmp.region, cmp.tps, -np.inf))), cmp.tps.shape)
    return (int(k), int(j), int(i))


def write_report(out_dir: Path, cmp: Comparison, result: dict[str, Any], header: dict[str, str],
                 ct: Volume | None = None, plan: Dataset | None = None) -> tuple[Path, Path]:
    """Write secondcheck.html and secondcheck.pdf into out_dir; return their paths."""
    # no label is math; matplotlib's mathtext parser otherwise costs seconds on the first figure
    with matplotlib.rc_context({"text.parse_math": False}):
        return _write_report(out_dir, cmp, result, header, ct, plan)


def _write_report(out_dir: Path, cmp: Comparison, result: dict[str, Any], header: dict[str, str],
                  ct: Volume | None, plan: Dataset | None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    ct_vol = resample(ct, cmp.axes, fill=-1000.0) if ct is not None else None
    beams = beam_axes(plan)
    centre = centre_index(cmp, beams[0].isocenter if beams else None)
    criterion = result["verdict_criteria"][0] if result["verdict_criteria"] else next(iter(cmp.gammas))
    worst = worst_failing_index(cmp, criterion)
    figs: list[tuple[str, Figure]] = [
        (f"Gamma {criterion} through the isocenter" + (" and the worst failing region" if worst else ""),
         gamma_maps_figure(cmp, ct_vol, centre, worst, criterion)),
        ("Dose difference histogram", difference_histogram(cmp)),
    ]
    depth = depth_dose_figure(cmp, beams)
    if depth is not None:
        figs.append(("Depth-dose along each beam's central axis", depth))
    figs += [("Dose-volume histograms, MC and TPS", dvh_figure(cmp)),
             ("Doses and their difference through the isocenter", dose_maps_figure(cmp, ct_vol, centre)),
             ("Gamma histogram", gamma_histogram(cmp))]
    # each figure is drawn once, as PNG: into the HTML and, as pages, into the PDF
    pngs = [(title, _png(fig)) for title, fig in figs]
    images = [(title, base64.b64encode(png).decode("ascii")) for title, png in pngs]
    html_path = out_dir / "secondcheck.html"
    html_path.write_text(_html(result, header, images), encoding="utf-8")
    pdf_path = out_dir / "secondcheck.pdf"
    first = _first_page(result, header)
    pages = [Image.open(io.BytesIO(png)).convert("RGB") for png in (first, *(p for _t, p in pngs))]
    pages[0].save(pdf_path, "PDF", resolution=150.0, save_all=True, append_images=pages[1:],
                  title="Dose second check", creationDate=datetime.now().strftime("D:%Y%m%d%H%M%S"))
    return html_path, pdf_path


def _first_page(result: dict[str, Any], header: dict[str, str]) -> bytes:
    """The PDF's first page (A4): the verdict in its colour, the reason, then the numbers."""
    page = Figure(figsize=(8.27, 11.69))
    colour = VERDICT_COLOURS.get(result["verdict"], "#444")
    lines = summary_lines(result, header)
    page.patches.append(matplotlib.patches.Rectangle((0.04, 0.935), 0.92, 0.05, transform=page.transFigure,
                                                     color=colour, figure=page))
    page.text(0.06, 0.96, lines[0], fontsize=20, weight="bold", color="white", va="center")
    why = textwrap.fill(lines[1], 95)
    page.text(0.05, 0.92, why, fontsize=9, weight="bold", va="top")
    body = [textwrap.shorten(x, 150) if len(x) > 150 else x for x in lines[2:]]
    page.text(0.05, 0.92 - 0.015 * (why.count("\n") + 2), "\n".join(body), fontsize=6, family="monospace",
              va="top")
    return _png(page, dpi=150)


def encapsulated_pdf(pdf: bytes, source: Dataset, title: str = "Dose second check") -> Dataset:
    """A DICOM Encapsulated PDF in the patient and study of `source` (the plan), in a new series."""
    ds = new_instance(EncapsulatedPDFStorage, source, series_number=901)
    now = datetime.now()
    ds.Modality = "DOC"
    ds.SeriesDescription = title
    ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds
