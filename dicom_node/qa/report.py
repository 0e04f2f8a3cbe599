"""The second-check report for a physicist: one self-contained HTML file and a PDF, verdict first.

Pictures (dose and gamma maps on axial, sagittal and coronal CT planes through the isocenter, DVH of
both doses, gamma histogram) are drawn once with matplotlib (Agg) and go into both documents: as
base64 PNG inside the HTML, as pages of the PDF (PdfPages). The report is for the clinic and shows
the patient ID and plan label; nothing here is logged.

`encapsulated_pdf` wraps the PDF as a DICOM Encapsulated PDF for sending to a document archive.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from cloud.engines.base import UNCOMMISSIONED  # noqa: E402
from dicom_node.jobs.rtdose import new_instance  # noqa: E402
from dicom_node.qa.compare import Comparison, Grid, cumulative_dvh, resample  # noqa: E402

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
METRICS = ("mean", "D98", "D95", "D50", "D2")


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return (color[0] / 255.0, color[1] / 255.0, color[2] / 255.0)


def _slice(vol: np.ndarray, plane: str, idx: tuple[int, int, int]) -> np.ndarray:
    k, j, i = idx
    return {"axial": vol[k], "coronal": vol[:, j, :], "sagittal": vol[:, :, i]}[plane]


def _extent(axes: tuple[np.ndarray, ...], plane: str) -> list[float]:
    z, y, x = axes
    if plane == "axial":
        return [x[0], x[-1], y[-1], y[0]]
    if plane == "coronal":
        return [x[0], x[-1], z[0], z[-1]]
    return [y[0], y[-1], z[0], z[-1]]


def maps_figure(cmp: Comparison, ct: np.ndarray | None, centre: tuple[int, int, int], criterion: str) -> Figure:
    """Rows: axial, coronal, sagittal; columns: MC dose, TPS dose, TPS - MC, gamma."""
    fig, axs = plt.subplots(3, 4, figsize=(15, 11))
    dmax = float(cmp.mc.max())
    threshold = dmax * cmp.numbers["method"]["low_dose_threshold_percent"] / 100.0
    g = cmp.gammas[criterion]
    diff = cmp.tps - cmp.mc
    lim = max(float(np.abs(diff[cmp.mc >= threshold]).max()) if np.any(cmp.mc >= threshold) else 1e-6, 1e-6)
    for r, plane in enumerate(("axial", "coronal", "sagittal")):
        ext = _extent(cmp.axes, plane)
        origin = "upper" if plane == "axial" else "lower"
        for c in range(4):
            ax = axs[r, c]
            if ct is not None:
                ax.imshow(_slice(ct, plane, centre), cmap="gray", vmin=-400, vmax=600, extent=ext, origin=origin)
            if c in (0, 1):
                d = _slice(cmp.mc if c == 0 else cmp.tps, plane, centre)
                im = ax.imshow(np.ma.masked_less(d, threshold), cmap="jet", vmin=0, vmax=dmax, alpha=0.6,
                               extent=ext, origin=origin)
                ax.set_title(f"{'MC' if c == 0 else 'TPS'} dose, {plane}")
            elif c == 2:
                d = _slice(np.where(cmp.mc >= threshold, diff, np.nan), plane, centre)
                im = ax.imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim, extent=ext, origin=origin)
                ax.set_title(f"TPS - MC (Gy), {plane}")
            else:
                im = ax.imshow(_slice(g, plane, centre), cmap="RdYlGn_r", vmin=0, vmax=2, extent=ext, origin=origin)
                ax.set_title(f"gamma {criterion}, {plane}")
            for name, mask in cmp.masks.items():
                m = _slice(mask, plane, centre)
                if m.any() and ct is not None:
                    ax.contour(m.astype(float), levels=[0.5], colors=[_rgb(cmp.colors[name])], linewidths=0.8,
                               extent=ext, origin=origin)
            ax.set_xlabel("mm")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    return fig


def dvh_figure(cmp: Comparison) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 5))
    top = max(float(cmp.mc.max()), float(cmp.tps.max())) * 1.05
    bins = np.linspace(0, top, 400)
    for name, mask in cmp.masks.items():
        color = _rgb(cmp.colors[name])
        ax.plot(bins, cumulative_dvh(cmp.mc, mask, bins), color=color, label=f"{name} MC")
        ax.plot(bins, cumulative_dvh(cmp.tps, mask, bins), color=color, linestyle="--", label=f"{name} TPS")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_title("Cumulative DVH: MC (solid) and TPS (dashed)")
    ax.grid(alpha=0.3)
    if cmp.masks:
        ax.legend()
    fig.tight_layout()
    return fig


def gamma_histogram(cmp: Comparison) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, g in cmp.gammas.items():
        valid = g[np.isfinite(g)]
        top = max(2.0, float(valid.max()) if valid.size else 2.0)
        ax.hist(valid, bins=np.linspace(0, top, 61), histtype="step", linewidth=1.5, label=key)
    ax.axvline(1.0, color="k", linestyle=":")
    ax.set_xlabel("gamma")
    ax.set_ylabel("voxels")
    ax.set_yscale("log")
    ax.set_title("Gamma histogram (voxels above the low-dose threshold)")
    ax.legend()
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def summary_lines(result: dict[str, Any], header: dict[str, str]) -> list[str]:
    """The numbers as plain text lines (the PDF's first page, and a readable log of the report)."""
    lines = [f"SECOND CHECK: {result['verdict'].upper()}", ""]
    lines += [w.split(":")[0] for w in result.get("warnings", []) if w.startswith(UNCOMMISSIONED)][:1]
    lines += [f"{k}: {v}" for k, v in header.items()]
    lines += ["", "Why: " + ("; ".join(result["reasons"]) if result["reasons"] else "every criterion met"), ""]
    lines.append(f"{'gamma':<10} {'pass %':>8} {'required':>9} {'mean':>7} {'p95':>7} {'voxels':>9}")
    for key, g in result["gamma"].items():
        req = f">= {result['min_pass_rate_percent']:g}" if key in result["verdict_criteria"] else "report"
        lines.append(f"{key:<10} {_fmt(g.get('pass_rate_percent')):>8} {req:>9} {_fmt(g.get('mean_gamma')):>7} "
                     f"{_fmt(g.get('gamma_p95')):>7} {g.get('evaluated_voxels', 0):>9}")
    dd = result["dose_difference"]
    lines += ["", "Dose difference TPS - MC (voxels >= threshold, % of MC max):",
              f"  mean {_fmt(dd.get('mean_percent'))} %, sd {_fmt(dd.get('sd_percent'))} %, "
              f"1st..99th pct {_fmt(dd.get('p1_percent'))}..{_fmt(dd.get('p99_percent'))} %, "
              f"max |diff| {_fmt(dd.get('max_abs_percent'))} %",
              f"  within 2 %: {_fmt(dd.get('within_2_percent'))} % of voxels, within 3 %: "
              f"{_fmt(dd.get('within_3_percent'))} %", "",
              f"{'structure':<12} {'vol cc':>8} {'':>4} {'mean':>8} {'D98':>8} {'D95':>8} {'D50':>8} {'D2':>8}"]
    for row in result["structures"]:
        for who in ("mc", "tps"):
            m = row[who]
            first = who == "mc"
            lines.append(f"{row['name'] if first else '':<12} {_fmt(m['volume_cc']) if first else '':>8} "
                         f"{who.upper():>4} " + " ".join(f"{_fmt(m[k]):>8}" for k in METRICS))
    if result.get("warnings"):
        lines += ["", "Warnings:"] + [f"  - {w}" for w in result["warnings"]]
    meth = result["method"]
    lines += ["", "Method:", f"  reference: MC dose; evaluated: TPS dose; {meth['resample_method']}",
              f"  common grid: {meth['common_grid']}",
              f"  gamma: {meth['gamma']}, normalised to the MC maximum {meth['normalisation_gy']} Gy, low-dose "
              f"threshold {meth['low_dose_threshold_percent']:g} %, interp_fraction {meth['interp_fraction']}, "
              f"search capped at gamma {meth['max_gamma']}",
              f"  structures: {meth['rasterisation']}; {meth['dvh']}"]
    return lines


def _table(rows: list[list[str]], head: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _html(result: dict[str, Any], header: dict[str, str], images: list[tuple[str, str]]) -> str:
    verdict = result["verdict"]
    colour = "#1b7f2a" if verdict == "pass" else "#b00020"
    gamma_rows = [[k, _fmt(g.get("pass_rate_percent")),
                   f">= {result['min_pass_rate_percent']:g} %" if k in result["verdict_criteria"] else "reported",
                   _fmt(g.get("mean_gamma")), _fmt(g.get("gamma_p95")), _fmt(g.get("max_gamma")),
                   str(g.get("evaluated_voxels", 0))] for k, g in result["gamma"].items()]
    dd = result["dose_difference"]
    dd_rows = [[k, _fmt(v)] for k, v in dd.items()]
    s_rows = []
    for row in result["structures"]:
        mc, tps = row["mc"], row["tps"]
        for k in ("mean", "D98", "D95", "D50", "D2"):
            diff = (None if mc[k] is None or tps[k] is None or not mc[k]
                    else round(100.0 * (tps[k] - mc[k]) / mc[k], 2))
            s_rows.append([row["name"], _fmt(mc["volume_cc"]), k, _fmt(mc[k]), _fmt(tps[k]), _fmt(diff),
                           row.get("checks", {}).get(k, "")])
    meth = result["method"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Second check</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}",
        f".verdict{{font-size:2em;font-weight:bold;color:white;background:{colour};padding:.4em .8em}}",
        "img{max-width:100%}</style></head><body>",
        f"<div class='verdict'>SECOND CHECK: {verdict.upper()}</div>",
        *[f"<div class='verdict' style='background:#b00020'>{html.escape(UNCOMMISSIONED)}</div>"
          for w in result.get("warnings", [])[:1] if w.startswith(UNCOMMISSIONED)],
        "<p><b>Why:</b> " + html.escape("; ".join(result["reasons"]) or "every criterion met") + "</p>",
        _table([[k, v] for k, v in header.items()], ["", ""]),
        "<h2>Gamma (global)</h2>",
        _table(gamma_rows, ["criterion", "pass rate %", "required", "mean", "95th pct", "max", "voxels"]),
        "<h2>Dose difference TPS - MC (voxels above the threshold)</h2>", _table(dd_rows, ["statistic", "value"]),
        "<h2>Structures (Gy; diff in % of MC)</h2>",
        _table(s_rows, ["structure", "volume cc", "metric", "MC", "TPS", "diff %", "check"]),
    ]
    if result.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in result["warnings"])
                     + "</ul>")
    parts.append("<h2>Method</h2><ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>"
                                                for k, v in meth.items()) + "</ul>")
    for title, b64 in images:
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def centre_index(cmp: Comparison, point_mm: tuple[float, float, float] | None) -> tuple[int, int, int]:
    """Voxel nearest the isocenter (x, y, z mm) when it lies on the grid, else the MC maximum."""
    z, y, x = cmp.axes
    if point_mm is not None:
        px, py, pz = point_mm
        if z[0] <= pz <= z[-1] and y[0] <= py <= y[-1] and x[0] <= px <= x[-1]:
            return (int(np.argmin(np.abs(z - pz))), int(np.argmin(np.abs(y - py))), int(np.argmin(np.abs(x - px))))
    k, j, i = np.unravel_index(int(np.argmax(cmp.mc)), cmp.mc.shape)
    return (int(k), int(j), int(i))


def write_report(out_dir: Path, cmp: Comparison, result: dict[str, Any], header: dict[str, str],
                 ct: Grid | None = None, isocenter_mm: tuple[float, float, float] | None = None) -> tuple[Path, Path]:
    """Write secondcheck.html and secondcheck.pdf into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ct_vol = resample(ct, cmp.axes, fill=-1000.0) if ct is not None else None
    centre = centre_index(cmp, isocenter_mm)
    criterion = result["verdict_criteria"][0] if result["verdict_criteria"] else next(iter(cmp.gammas))
    figs = [("Dose and gamma maps through the isocenter", maps_figure(cmp, ct_vol, centre, criterion)),
            ("Dose-volume histograms", dvh_figure(cmp)), ("Gamma histogram", gamma_histogram(cmp))]
    images = [(title, _png(fig)) for title, fig in figs]
    html_path = out_dir / "secondcheck.html"
    html_path.write_text(_html(result, header, images), encoding="utf-8")
    pdf_path = out_dir / "secondcheck.pdf"
    with PdfPages(pdf_path) as pdf:
        page = plt.figure(figsize=(8.27, 11.69))
        colour = "#1b7f2a" if result["verdict"] == "pass" else "#b00020"
        lines = summary_lines(result, header)
        page.text(0.05, 0.96, lines[0], fontsize=20, weight="bold", color=colour, va="top")
        page.text(0.05, 0.92, "\n".join(lines[1:]), fontsize=6.5, family="monospace", va="top", wrap=True)
        pdf.savefig(page)
        plt.close(page)
        for _title, fig in figs:
            pdf.savefig(fig)
        info = pdf.infodict()
        info["Title"] = "Dose second check"
        info["CreationDate"] = datetime.now()
    for _title, fig in figs:
        plt.close(fig)
    return html_path, pdf_path


def encapsulated_pdf(pdf: bytes, source: Dataset, title: str = "Dose second check") -> Dataset:
    """A DICOM Encapsulated PDF in the patient and study of `source` (the plan), in a new series."""
    ds = new_instance(ENCAPSULATED_PDF, source, series_number=901)
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
