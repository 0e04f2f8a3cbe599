"""The dose over the CT in three planes through the isocenter, with isodose lines and structures.

Drawn with matplotlib's object API (no pyplot state, so the web server's threads can draw) into a
PNG that is kept in the job folder (`jobs/JOB/web/dose.png`) and drawn again only when the RT Dose
file is newer. The grids come from the second check's readers (`dicom_node.qa.compare`), so the
page and the report place doses and contours the same way.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from pydicom import dcmread

from dicom_node.qa.compare import ct_from_datasets, dose_from_rtdose, rasterise, resample, structures_from_rtstruct
from dicom_node.qa.report import _extent, _rgb, _slice

ISODOSE_PERCENT = (20, 50, 80, 95, 100)
ISODOSE_COLOURS = ("#2b83ba", "#66c2a5", "#fdae61", "#f46d43", "#d7191c")
_DRAW = threading.Lock()


def _isocenter(plan_path: str | None) -> tuple[float, float, float] | None:
    if not plan_path:
        return None
    try:
        plan = dcmread(plan_path, stop_before_pixels=True)
    except OSError:
        return None
    for beam in plan.get("IonBeamSequence") or plan.get("BeamSequence") or []:
        cps = beam.get("IonControlPointSequence") or beam.get("ControlPointSequence") or []
        if cps and "IsocenterPosition" in cps[0]:
            x, y, z = (float(v) for v in cps[0].IsocenterPosition)
            return (x, y, z)
    return None


def dose_planes_png(ct_paths: list[str], dose_path: str, structure_set: str | None = None,
                    plan_path: str | None = None) -> bytes:
    """PNG bytes: axial, coronal and sagittal planes through the isocenter (else the dose maximum)."""
    dose = dose_from_rtdose(dcmread(dose_path))
    axes = dose.grid.axes
    ct = resample(ct_from_datasets([dcmread(p) for p in ct_paths]), axes, fill=-1000.0) if ct_paths else None
    z, y, x = axes
    iso = _isocenter(plan_path)
    if iso is not None and z[0] <= iso[2] <= z[-1] and y[0] <= iso[1] <= y[-1] and x[0] <= iso[0] <= x[-1]:
        centre = (int(np.argmin(np.abs(z - iso[2]))), int(np.argmin(np.abs(y - iso[1]))),
                  int(np.argmin(np.abs(x - iso[0]))))
    else:
        mk, mj, mi = np.unravel_index(int(np.argmax(dose.values)), dose.values.shape)
        centre = (int(mk), int(mj), int(mi))
    masks = []
    if structure_set:
        for s in structures_from_rtstruct(dcmread(structure_set)):
            masks.append((s.name, _rgb(s.color), rasterise(s, axes)))
    dmax = float(dose.values.max()) or 1.0
    fig = Figure(figsize=(15, 5.2), dpi=80)
    subplots = fig.subplots(1, 3)
    image = None
    for ax, plane in zip(subplots, ("axial", "coronal", "sagittal"), strict=True):
        ext = _extent(axes, plane)
        origin = "upper" if plane == "axial" else "lower"
        if ct is not None:
            ax.imshow(_slice(ct, plane, centre), cmap="gray", vmin=-400, vmax=600, extent=ext, origin=origin)
        d = _slice(dose.values, plane, centre)
        image = ax.imshow(np.ma.masked_less(d, 0.05 * dmax), cmap="jet", vmin=0, vmax=dmax, alpha=0.45,
                          extent=ext, origin=origin)
        if d.max() >= ISODOSE_PERCENT[0] / 100.0 * dmax:
            ax.contour(d, levels=[p / 100.0 * dmax for p in ISODOSE_PERCENT], colors=ISODOSE_COLOURS,
                       linewidths=1.0, extent=ext, origin=origin)
        for _name, colour, mask in masks:
            m = _slice(mask, plane, centre)
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors=[colour], linewidths=1.6, linestyles="--",
                           extent=ext, origin=origin)
        k, j, i = centre
        where = {"axial": f"z = {z[k]:.1f} mm", "coronal": f"y = {y[j]:.1f} mm", "sagittal": f"x = {x[i]:.1f} mm"}
        ax.set_title(f"{plane}, {where[plane]}")
        ax.set_xlabel("mm")
    handles = [Line2D([], [], color=c, label=f"{p} %") for p, c in zip(ISODOSE_PERCENT, ISODOSE_COLOURS, strict=True)]
    handles += [Line2D([], [], color=colour, linestyle="--", label=name) for name, colour, _m in masks]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9,
               title=f"isodose lines in % of the maximum {dmax:.3g} Gy; structures dashed")
    if image is not None:
        fig.colorbar(image, ax=list(subplots), fraction=0.02, pad=0.01, label="dose per plan (Gy)")
    fig.subplots_adjust(left=0.04, right=0.9, top=0.93, bottom=0.22, wspace=0.25)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def cached_dose_png(job_dir: Path, ct_paths: list[str], dose_path: str, structure_set: str | None,
                    plan_path: str | None) -> Path:
    """The job's dose picture, drawn when missing or older than its RT Dose."""
    out = job_dir / "web" / "dose.png"
    with _DRAW:
        if not out.is_file() or out.stat().st_mtime < Path(dose_path).stat().st_mtime:
            png = dose_planes_png(ct_paths, dose_path, structure_set, plan_path)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(png)
            tmp.replace(out)
    return out
