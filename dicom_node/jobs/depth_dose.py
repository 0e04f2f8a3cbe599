"""`mcnode depth-dose`: the central-axis depth dose of one beam in a water phantom, run as a job.

BEAM is ``co60`` (the Co-60 gamma lines), ``e<MeV>`` (monoenergetic electrons, e.g. ``e10``),
``x<MV>`` (a bremsstrahlung spectrum shipped with ompMC: ``x6``) or ``p<MeV>`` (protons, MCsquare).
Photons and electrons run on the ompmc engine, protons on MCsquare; either way the job goes the way
every job goes: the engine's inputs are sealed into a bundle with a fresh data key, split into
shards with their own seeds, run as worker processes on the local backend (``cloud.dispatch``),
merged (``cloud.merge``: the spread between shards gives the uncertainty), and only then reduced to
the central axis.

Output: ``depth_dose.csv`` with ``depth_cm``, ``dose_percent`` (percent of the maximum: for
photons and electrons a parabola fitted around the highest points, see ``peak_value``) and
``uncertainty_percent`` (one standard error, in the same percent-of-maximum units), and
``depth_dose.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anonymizer.seal import new_data_key
from cloud.backends.local import LocalBackend
from cloud.bundle import make_bundle
from cloud.dispatch import dispatch, plan_tasks
from cloud.engines.base import ShardInputs, Tally
from cloud.errors import CloudError
from cloud.merge import merge
from dicom_node.errors import ConfigError, NodeError

LOGGER = logging.getLogger(__name__)

CSV_NAME = "depth_dose.csv"
PNG_NAME = "depth_dose.png"
PHOTON_SPECTRA_MV = {6.0: "mohan6"}  # x<MV> -> spectrum file shipped with ompmc


@dataclass(frozen=True)
class BeamChoice:
    """A parsed BEAM argument with the setup defaults for its kind (lengths in cm)."""

    kind: str  # co60 | electron | photon | proton
    energy: float  # MeV (electrons, protons), MV (photons), 0 for Co-60
    label: str
    ssd: float
    field: float
    depth: float
    dz: float
    histories: int
    spectrum: str = ""  # photons: a spectrum other than the one x<MV> names


def parse_beam(text: str) -> BeamChoice:
    """``co60``, ``e<MeV>``, ``x<MV>`` or ``p<MeV>``; ConfigError naming what is wrong otherwise."""
    t = text.strip().lower()
    if t in ("co60", "co-60", "cobalt"):
        return BeamChoice("co60", 0.0, "Co-60", ssd=80.0, field=10.0, depth=25.0, dz=0.25, histories=400_000)
    m = re.fullmatch(r"([exp])(\d+(?:\.\d+)?)", t)
    if not m:
        raise ConfigError(f"BEAM {text!r}: expected co60, e<MeV> (e10), x<MV> (x6) or p<MeV> (p150)")
    letter, value = m.group(1), float(m.group(2))
    if letter == "e":
        if not 1.0 <= value <= 50.0:
            raise ConfigError(f"BEAM {text!r}: electron energy must be 1-50 MeV")
        # depth to about 1.5 practical ranges (Rp ~ E/2 cm in water)
        return BeamChoice("electron", value, f"{value:g} MeV electrons", ssd=100.0, field=10.0,
                          depth=round(max(2.0, 0.75 * value), 1), dz=0.1 if value <= 15 else 0.2,
                          histories=100_000)
    if letter == "x":
        if value not in PHOTON_SPECTRA_MV:
            known = ", ".join(f"x{mv:g}" for mv in PHOTON_SPECTRA_MV)
            raise ConfigError(f"BEAM {text!r}: no {value:g} MV spectrum ships with ompMC (known: {known})")
        return BeamChoice("photon", value, f"{value:g} MV photons ({PHOTON_SPECTRA_MV[value]})", ssd=100.0,
                          field=10.0, depth=30.0, dz=0.25, histories=400_000)
    if not 70.0 <= value <= 230.0:
        raise ConfigError(f"BEAM {text!r}: proton energy must be within the beam model's 70-230 MeV")
    return BeamChoice("proton", value, f"{value:g} MeV protons", ssd=100.0, field=10.0,
                      depth=round(1.25 * 0.0022 * value**1.77 + 2.0, 1), dz=0.2, histories=200_000)


@dataclass
class DepthDose:
    """A central-axis depth dose: depth (cm), dose and its standard error in percent of the maximum."""

    beam: str
    depth_cm: np.ndarray
    dose_percent: np.ndarray
    uncertainty_percent: np.ndarray
    histories: int
    shards: int
    setup: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def at(self, depth_cm: float) -> float:
        """Percent depth dose at a depth, linearly interpolated."""
        return float(np.interp(depth_cm, self.depth_cm, self.dose_percent))

    def fitted_at(self, depth_cm: float, half_width_cm: float = 1.0) -> float:
        """Percent depth dose at a depth from a straight line fitted to the bins within ±half_width_cm:
        several bins' statistics instead of two (for slowly varying parts of a curve)."""
        sel = np.abs(self.depth_cm - depth_cm) <= half_width_cm + 1e-9
        if np.count_nonzero(sel) < 3:
            return self.at(depth_cm)
        slope, intercept = np.polyfit(self.depth_cm[sel], self.dose_percent[sel], 1)
        return float(slope * depth_cm + intercept)

    @property
    def dmax_cm(self) -> float:
        return float(self.depth_cm[int(np.argmax(self.dose_percent))])

    def depth_at_percent(self, percent: float) -> float:
        """First depth beyond the maximum where the dose falls to `percent` (R50 for 50), interpolated."""
        i0 = int(np.argmax(self.dose_percent))
        d, z = self.dose_percent[i0:], self.depth_cm[i0:]
        below = np.nonzero(d < percent)[0]
        if below.size == 0:
            raise NodeError(f"the dose never falls below {percent:g} % within {self.depth_cm[-1]:g} cm")
        j = int(below[0])
        return float(np.interp(percent, [d[j], d[j - 1]], [z[j], z[j - 1]]))

    def describe(self) -> str:
        """One line: the setup and the numbers a physicist checks first for this kind of beam."""
        parts = [f"{self.beam}: {self.histories} histories in {self.shards} shards, {self.wall_s:.1f} s",
                 f"d_max {self.dmax_cm:.2f} cm"]
        kind = self.setup.get("kind")
        try:
            if kind == "electron":
                parts += [f"R50 {self.depth_at_percent(50.0):.2f} cm", f"Rp {self.practical_range_cm():.2f} cm"]
            elif kind == "proton":
                parts.append(f"R80 {self.depth_at_percent(80.0):.2f} cm")
            else:
                parts += [f"PDD(5 cm) {self.fitted_at(5.0):.1f} %", f"PDD(10 cm) {self.fitted_at(10.0):.1f} %"]
        except NodeError as exc:
            parts.append(str(exc))
        return "; ".join(parts)

    def practical_range_cm(self) -> float:
        """Rp (electrons): where the tangent to the falling edge meets the bremsstrahlung background.

        The tangent is a straight-line fit to the points between 70 % and 30 % on the falling edge (the
        steepest part, less noisy than a derivative); the background is the mean dose over the last
        fifth of the depths, which lie beyond Rp for the phantom depths chosen by ``parse_beam``.
        """
        i0 = int(np.argmax(self.dose_percent))
        d, z = self.dose_percent[i0:], self.depth_cm[i0:]
        first_below = int(np.nonzero(d < 30.0)[0][0]) if np.any(d < 30.0) else len(d)
        edge = [k for k in range(first_below) if 30.0 <= d[k] <= 70.0]
        if len(edge) < 2:
            raise NodeError("too few points on the falling edge to fit the practical range")
        slope, intercept = np.polyfit(z[edge], d[edge], 1)
        background = float(np.mean(self.dose_percent[-max(2, len(self.dose_percent) // 5):]))
        return float((background - intercept) / slope)


def _prepare(choice: BeamChoice, work: Path, field_cm: float, ssd_cm: float) -> tuple[ShardInputs, dict[str, Any]]:
    setup: dict[str, Any] = {"beam": choice.label, "kind": choice.kind, "field_cm": field_cm, "ssd_cm": ssd_cm}
    if choice.kind == "proton":
        from dicom_node.jobs.proton_depth_dose import prepare_proton_phantom

        inputs, extra = prepare_proton_phantom(choice.energy, field_cm, choice.depth, work / "inputs")
        setup.update(extra)
        return inputs, setup
    from cloud.engines.ompmc.adapter import WaterPhantomBeam, prepare_water_phantom

    if choice.kind == "co60":
        particle, source = "photon", "co60"
    elif choice.kind == "electron":
        particle, source = "electron", "mono"
    else:
        particle, source = "photon", choice.spectrum or PHOTON_SPECTRA_MV[choice.energy]
    # the scoring column: a third of the field, at most 3 cm (flat to well under 1 % on the axis)
    beam = WaterPhantomBeam(particle, source, choice.energy if source == "mono" else 0.0, ssd=ssd_cm,
                            field=field_cm, depth=choice.depth, dz=choice.dz, column=min(3.0, field_cm / 3.0),
                            lateral=max(40.0, field_cm + 20.0))
    setup.update({"engine": "ompmc", "scoring_column_cm": beam.column, "dz_cm": beam.dz})
    return prepare_water_phantom(beam, work / "inputs"), setup


def _on_axis(inputs: ShardInputs, tallies: list[Tally], setup: dict[str, Any]) -> tuple[np.ndarray, list[Tally]]:
    """Depths (cm) and each shard reduced to the central axis, (nz, 1, 1), ready for the merge.

    Reducing before merging lets the spread between shards speak for the axis values themselves
    (for MCsquare: the mean over the central column), not for single voxels.
    """
    if inputs.engine == "mcsquare":
        from dicom_node.jobs.proton_depth_dose import central_axis_tally, depths_cm

        return depths_cm(inputs, setup), [central_axis_tally(inputs, t, setup) for t in tallies]
    z = inputs.grid.z / 10.0
    return z, tallies


def run_depth_dose(beam: str, out_dir: Path, *, field_cm: float | None = None, ssd_cm: float | None = None,
                   histories: int | None = None, shards: int = 4, workers: int | None = None,
                   spectrum: str | None = None) -> DepthDose:
    """Compute, write DIR/depth_dose.csv and DIR/depth_dose.png, and return the depth dose.

    ``spectrum`` (photons only) replaces the spectrum ``x<MV>`` names with another one shipped with
    ompMC (what a photon beam model names).
    """
    choice = parse_beam(beam)
    if spectrum is not None:
        if choice.kind != "photon":
            raise ConfigError("a spectrum can only be given for x<MV> photon beams")
        choice = dataclasses.replace(choice, label=f"{choice.energy:g} MV photons ({spectrum})",
                                     spectrum=spectrum)
    field_cm = choice.field if field_cm is None else float(field_cm)
    ssd_cm = choice.ssd if ssd_cm is None else float(ssd_cm)
    histories = choice.histories if histories is None else int(histories)
    if not 0.5 <= field_cm <= 30.0:
        raise ConfigError(f"--field {field_cm:g}: expected 0.5-30 cm")
    if not 50.0 <= ssd_cm <= 200.0:
        raise ConfigError(f"--ssd {ssd_cm:g}: expected 50-200 cm")
    if shards < 2:
        raise ConfigError("--shards must be at least 2: the uncertainty comes from the spread between shards")
    if histories < shards:
        raise ConfigError(f"--histories ({histories}) must be at least --shards ({shards})")
    job_id = f"dd-{secrets.token_hex(4)}"
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"mcnode-{job_id}-") as tmp:
            work = Path(tmp)
            inputs, setup = _prepare(choice, work, field_cm, ssd_cm)
            key = new_data_key()
            bundle = make_bundle(work / "bundle.sealed", key, job_id, {"inputs": inputs.root},
                                 {"engine": inputs.engine, "files": []})
            tasks = plan_tasks(job_id, shards, histories, bundle.as_uri(), (work / "results").as_uri())
            LOGGER.info("depth dose %s (job %s): %d histories in %d shards on the %s engine", choice.label, job_id,
                        histories, shards, inputs.engine)
            tallies = [Tally.from_bytes(b) for b in dispatch(tasks, key, LocalBackend(
                max_workers=workers or os.cpu_count() or 1))]  # side by side, one core each, unless told
            z, axis_tallies = _on_axis(inputs, tallies, setup)
            merged = merge(axis_tallies, inputs.protons_per_fraction, inputs.fractions, expected_shards=shards,
                           expected_primaries=histories)
            assert merged.std_error_per_fraction_gy is not None  # shards >= 2
            dose, se = merged.per_fraction_gy[:, 0, 0], merged.std_error_per_fraction_gy[:, 0, 0]
    except CloudError as exc:
        raise NodeError(f"depth dose {choice.label}: {exc}") from exc
    # a Bragg peak is too sharp for a parabola (and its dose is high, so its bins are precise)
    # (the parabola spans about ±0.5 cm: at least 2 bins either side)
    step = float(z[1] - z[0]) if len(z) > 1 else 1.0
    dmax = float(np.max(dose)) if choice.kind == "proton" else peak_value(dose, max(2, int(round(0.5 / step))))
    if not dmax > 0:
        raise NodeError(f"depth dose {choice.label}: no dose on the central axis")
    result = DepthDose(beam=choice.label, depth_cm=z, dose_percent=100.0 * dose / dmax,
                       uncertainty_percent=100.0 * se / dmax, histories=histories, shards=shards, setup=setup,
                       wall_s=time.perf_counter() - start)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(result, out_dir / CSV_NAME)
    write_png(result, out_dir / PNG_NAME)
    return result


def peak_value(dose: np.ndarray, half_window: int = 2) -> float:
    """The maximum of a depth dose, read from a parabola fitted around its highest point.

    Normalising to the single highest bin would let one noisy bin set the scale (and bias every
    percentage low); the parabola through the 2 x ``half_window`` + 1 bins around the highest bin of
    the 3-bin running mean uses their statistics. Its vertex is used when it lies inside that window
    and the parabola opens downwards; otherwise the running mean's maximum.
    """
    d = np.asarray(dose, dtype=np.float64)
    if d.size < 2 * half_window + 1:
        return float(d.max())
    smooth = np.convolve(d, np.ones(3) / 3.0, mode="same")
    smooth[0], smooth[-1] = d[0], d[-1]
    i = int(np.clip(np.argmax(smooth), half_window, d.size - 1 - half_window))
    x = np.arange(i - half_window, i + half_window + 1, dtype=np.float64)
    a, b, c = np.polyfit(x - i, d[i - half_window:i + half_window + 1], 2)
    if a < 0 and abs(-b / (2 * a)) <= half_window:
        xv = -b / (2 * a)
        return float(a * xv * xv + b * xv + c)
    return float(smooth[i])


def write_csv(result: DepthDose, path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["depth_cm", "dose_percent", "uncertainty_percent"])
        for z, d, u in zip(result.depth_cm, result.dose_percent, result.uncertainty_percent, strict=True):
            w.writerow([f"{z:.4f}", f"{d:.3f}", f"{u:.3f}"])
    return path


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three columns of a depth_dose.csv."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = [np.array([float(r[k]) for r in rows]) for k in ("depth_cm", "dose_percent", "uncertainty_percent")]
    return cols[0], cols[1], cols[2]


def write_png(result: DepthDose, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.fill_between(result.depth_cm, result.dose_percent - 2 * result.uncertainty_percent,
                    result.dose_percent + 2 * result.uncertainty_percent, color="tab:blue", alpha=0.25,
                    label="±2 standard errors")
    ax.plot(result.depth_cm, result.dose_percent, color="tab:blue", lw=1.5, label="Monte Carlo")
    s = result.setup
    where = f"SSD {s['ssd_cm']:g} cm, " if "ssd_cm" in s and not s.get("engine") == "mcsquare" else ""
    ax.set_title(f"{result.beam}: {where}{s.get('field_cm', 0):g}x{s.get('field_cm', 0):g} cm², water")
    ax.set_xlabel("depth (cm)")
    ax.set_ylabel("dose (% of maximum)")
    ax.set_xlim(0, float(result.depth_cm[-1]))
    ax.set_ylim(0, 110)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.text(0.01, 0.02, f"{result.histories:,} histories, {result.shards} shards; d_max {result.dmax_cm:.2f} cm",
            transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
