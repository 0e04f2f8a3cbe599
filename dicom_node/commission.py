"""`mcnode commission`: fit a machine's absolute calibration (protons per MU against energy) to doses
the clinic trusts, and write it as a BDL whose header says what it was fitted from.

Two kinds of reference:

* **Reference plans** (``--reference DIR``): each DIR holds one RT Ion Plan, its CT and the RT Dose
  the clinic trusts for it (the TPS's dose of a plan in a phantom, or a measured dose exported as RT
  Dose). The plan is computed with the base model; the MC dose D (Gy) and the reference R are
  compared in the reference's high-dose region H = {R > 50 % of max R} (R trilinearly resampled
  onto the MC grid). Dose is linear in the protons per MU, so the fitted model is the base model
  times a factor k(E):

  - the plan's energy layers are split into ``groups`` contiguous energy bands of equal MU, each
    band simulated on its own (same primaries per band), D = sum_g D_g;
  - one band: k = sum_H R / sum_H D (ratio of sums: the mean dose level in the region, insensitive
    to the MC's per-voxel noise); several: k_g by non-negative least squares of sum_g k_g D_g
    against R over H;
  - each k_g sits at its band's MU-weighted mean energy; k(E) is linear between those energies (over
    every reference) and constant beyond them. The base model's *shape* of protons per MU against
    energy (for the generic model, the monitor chamber's response ~ 1/stopping power in air) is
    kept; the fit sets its level per energy band, which is what vendors' MU conventions change.
  - The written BDL covers only the energies the references span (the base model's rows that
    bracket them): a plan with an energy outside is refused, not extrapolated.

* **A measured table** (``--measured CSV``): integral depth dose (IDD) per MU at 2 cm depth in
  water, one row per energy, as a large-area (Bragg peak) chamber measures it for a single spot:
  columns ``energy_MeV`` and ``idd_2cm_Gy_mm2_per_MU`` (dose integrated over the plane
  perpendicular to the beam at 2 cm depth, Gy·mm² per MU). For each energy the MC computes the IDD
  of one proton at 2 cm depth in a 24 x 24 cm water slab (gantry 0; the integral over the whole
  plane does not depend on spot size or divergence); protons per MU = measured / simulated. k(E)
  is interpolated between the table's energies as above.

The residual per reference (MC over reference in H after the fit, and the RMS of the voxel-wise
relative difference in H) is printed and written into the BDL's header with the SHA-256 of every
input file and the date.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, RTDoseStorage

from cloud.engines import get_engine
from cloud.engines.base import GENERIC_MODEL, ShardInputs
from cloud.engines.mcsquare.adapter import generic_beam_model_path
from cloud.engines.mcsquare.bdl import BeamModel, read_bdl
from cloud.merge import merge
from dicom_node.errors import NodeError
from dicom_node.jobs.ctcal import choose_ct_calibration
from dicom_node.net import uids
from dicom_node.qa.compare import Volume, dose_from_rtdose, resample

LOGGER = logging.getLogger(__name__)

HIGH_DOSE_FRACTION = 0.5
IDD_DEPTH_MM = 20.0
CSV_COLUMNS = ("energy_MeV", "idd_2cm_Gy_mm2_per_MU")
# Gy per (MeV/g): 1.602e-13 J/MeV * 1000 g/kg
_MEV_PER_G_TO_GY = 1.602176634e-10


class CommissionError(NodeError):
    """The references cannot be used for a fit (missing files, no overlap, nothing above threshold)."""


@dataclasses.dataclass
class Reference:
    folder: Path
    plan: Dataset
    cts: list[Dataset]
    dose: Dataset
    files: list[Path]

    @property
    def label(self) -> str:
        return self.folder.name


@dataclasses.dataclass
class BandFit:
    energy_mev: float  # MU-weighted mean energy of the band
    lo_mev: float
    hi_mev: float
    factor: float


@dataclasses.dataclass
class ReferenceResult:
    label: str
    bands: list[BandFit]
    ratio_before: float  # MC (base model) / reference, sums over the high-dose region
    ratio_after: float  # the same with the fitted model
    rms_percent: float  # RMS of (MC - ref) / ref over the high-dose region, fitted model
    voxels: int
    energy_range: tuple[float, float]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_reference(folder: Path) -> Reference:
    """One plan, its CT and one RT Dose from a folder; CommissionError says what is missing."""
    plans: list[Dataset] = []
    cts: list[Dataset] = []
    doses: list[Dataset] = []
    files: list[Path] = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        cls = str(ds.get("SOPClassUID", ""))
        if cls in uids.PLAN_CLASSES:
            plans.append(ds)
        elif cls == CTImageStorage:
            cts.append(ds)
        elif cls == RTDoseStorage:
            doses.append(ds)
        else:
            continue
        files.append(path)
    if len(plans) != 1 or len(doses) != 1 or not cts:
        raise CommissionError(f"{folder}: expected one plan, one RT Dose and a CT; found {len(plans)} plan(s), "
                              f"{len(doses)} RT Dose(s), {len(cts)} CT slice(s)")
    return Reference(Path(folder), plans[0], cts, doses[0], files)


def _machine(plan: Dataset) -> str:
    names = {str(b.get("TreatmentMachineName", "")) for b in plan.get("IonBeamSequence", [])}
    if len(names) != 1:
        raise CommissionError(f"plan uses {len(names)} treatment machines; expected one")
    return names.pop()


def _layer_energies(plan: Dataset) -> list[tuple[float, float]]:
    """(energy, MU) of every layer with a positive weight, over every treatment beam."""
    from cloud.engines.mcsquare.ionplan import read_ion_plan

    return [(layer.energy_mev, float(layer.mu.sum())) for beam in read_ion_plan(plan).beams for layer in beam.layers]


def energy_bands(plan: Dataset, groups: int) -> list[tuple[float, float, float]]:
    """``groups`` contiguous energy bands of about equal MU: (lo, hi, MU-weighted mean energy)."""
    layers = sorted(_layer_energies(plan))
    energies = sorted({e for e, _ in layers})
    mu_by_e = {e: sum(m for x, m in layers if x == e) for e in energies}
    groups = max(1, min(groups, len(energies)))
    cumulative = np.cumsum([mu_by_e[e] for e in energies])
    total = cumulative[-1]
    bands: list[list[float]] = [[] for _ in range(groups)]
    for e, c in zip(energies, cumulative, strict=True):
        g = min(groups - 1, int((c - 0.5 * mu_by_e[e]) / total * groups))
        bands[g].append(e)
    out = []
    for band in (b for b in bands if b):
        mu = sum(mu_by_e[e] for e in band)
        out.append((min(band), max(band), sum(e * mu_by_e[e] for e in band) / mu))
    return out


def _only_band(plan: Dataset, lo: float, hi: float) -> Dataset:
    """A copy of the plan whose spots outside [lo, hi] MeV have weight 0 (the MU of the rest unchanged)."""
    out = copy.deepcopy(plan)
    for beam in out.IonBeamSequence:
        energy = None
        for cp in beam.IonControlPointSequence:
            if "NominalBeamEnergy" in cp:
                energy = float(cp.NominalBeamEnergy)
            if energy is not None and not lo - 1e-6 <= energy <= hi + 1e-6 and "ScanSpotMetersetWeights" in cp:
                n = len(np.atleast_1d(np.asarray(cp.ScanSpotMetersetWeights, dtype=float)))
                cp.ScanSpotMetersetWeights = [0.0] * n if n > 1 else 0.0
    return out


def simulate(datasets: list[Dataset], machine: str, base: Path | str, work: Path, primaries: int, seed: int,
             threads: int, ct_calibrations: Mapping[str, Sequence[Path]] | None = None
             ) -> tuple[np.ndarray, ShardInputs]:
    """The plan dose (Gy) with the base model, on the engine's grid, and the prepared inputs.

    The CT's HU tables are chosen as the node chooses them (``[engine] ct_calibrations``).
    """
    engine = get_engine("mcsquare")
    cts = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == CTImageStorage]
    calibration = choose_ct_calibration(cts, ct_calibrations or {})
    inputs = engine.prepare(datasets, work, beam_models={machine: base}, ct_calibration=calibration.for_engine())
    tally = engine.run_shard(inputs, primaries, seed, threads)
    merged = merge([tally], inputs.protons_per_fraction, inputs.fractions, expected_shards=1)
    return merged.plan_gy.astype(np.float64), inputs


def compare_region(mc: np.ndarray, axes: tuple[np.ndarray, np.ndarray, np.ndarray], reference: Volume
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(reference on the MC grid, mask of its high-dose region); CommissionError when they do not meet."""
    ref = resample(reference, axes, fill=np.nan)
    finite = np.isfinite(ref)
    if not finite.any():
        raise CommissionError("the reference dose does not overlap the MC grid")
    peak = float(np.nanmax(ref))
    mask = finite & (ref > HIGH_DOSE_FRACTION * peak)
    if mask.sum() < 10:
        raise CommissionError("fewer than 10 voxels above 50 % of the reference maximum on the MC grid")
    return np.where(finite, ref, 0.0), mask


def fit_reference(ref: Reference, base: Path | str, work: Path, primaries: int, groups: int, threads: int,
                  seed: int = 1, ct_calibrations: Mapping[str, Sequence[Path]] | None = None) -> ReferenceResult:
    machine = _machine(ref.plan)
    bands = energy_bands(ref.plan, groups)
    per_band = max(1000, primaries // len(bands))
    doses: list[np.ndarray] = []
    axes = None
    for i, (lo, hi, _mean) in enumerate(bands):
        plan = _only_band(ref.plan, lo, hi) if len(bands) > 1 else ref.plan
        dose, inputs = simulate([plan, *ref.cts], machine, base, work / f"band{i}", per_band, seed + i, threads,
                                ct_calibrations)
        doses.append(dose)
        axes = inputs.grid.axes
    assert axes is not None
    reference = dose_from_rtdose(ref.dose, _fractions(ref.plan))
    r, mask = compare_region(np.sum(doses, axis=0), axes, reference)
    rv = r[mask]
    dv = np.stack([d[mask] for d in doses], axis=1)
    if len(bands) == 1:
        factors = np.array([rv.sum() / dv[:, 0].sum()])
    else:
        from scipy.optimize import nnls

        factors, _ = nnls(dv, rv)
        if not np.all(factors > 0):
            raise CommissionError(f"{ref.label}: an energy band got no weight in the fit ({factors}); use fewer "
                                  "--groups")
    fitted = dv @ factors
    energies = [e for e, _ in _layer_energies(ref.plan)]
    return ReferenceResult(
        label=ref.label,
        bands=[BandFit(mean, lo, hi, float(k)) for (lo, hi, mean), k in zip(bands, factors, strict=True)],
        ratio_before=float(dv.sum() / rv.sum()), ratio_after=float(fitted.sum() / rv.sum()),
        rms_percent=float(100 * np.sqrt(np.mean(((fitted - rv) / rv) ** 2))), voxels=int(mask.sum()),
        energy_range=(min(energies), max(energies)))


def _fractions(plan: Dataset) -> int | None:
    for fg in plan.get("FractionGroupSequence", []):
        return int(fg.get("NumberOfFractionsPlanned", 0) or 0) or None
    return None


def check_reference(ref: Reference, bdl: Path, work: Path, primaries: int, threads: int, seed: int = 7,
                    ct_calibrations: Mapping[str, Sequence[Path]] | None = None) -> tuple[float, float, int]:
    """(MC/reference over the high-dose region, RMS %, voxels) for a plan computed with the BDL ``bdl``."""
    dose, inputs = simulate([ref.plan, *ref.cts], _machine(ref.plan), bdl, work, primaries, seed, threads,
                            ct_calibrations)
    r, mask = compare_region(dose, inputs.grid.axes, dose_from_rtdose(ref.dose, _fractions(ref.plan)))
    rv, dv = r[mask], dose[mask]
    return float(dv.sum() / rv.sum()), float(100 * np.sqrt(np.mean(((dv - rv) / rv) ** 2))), int(mask.sum())


# --- a measured table ------------------------------------------------------------------------


def read_measured(path: Path) -> list[tuple[float, float]]:
    """(energy MeV, IDD at 2 cm in Gy·mm² per MU) rows of the CSV; CommissionError names a bad row."""
    try:
        with Path(path).open(newline="") as fh:
            reader = csv.DictReader(row for row in fh if row.strip() and not row.lstrip().startswith("#"))
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise CommissionError(f"{path}: missing column(s) {', '.join(missing)}; expected "
                                      f"{','.join(CSV_COLUMNS)}")
            rows = []
            for n, row in enumerate(reader, start=2):
                try:
                    e, idd = float(row[CSV_COLUMNS[0]]), float(row[CSV_COLUMNS[1]])
                except (TypeError, ValueError):
                    raise CommissionError(f"{path}, line {n}: not two numbers: {row}") from None
                if e <= 0 or idd <= 0 or not math.isfinite(e + idd):
                    raise CommissionError(f"{path}, line {n}: energy and IDD must be positive")
                rows.append((e, idd))
    except OSError as exc:
        raise CommissionError(f"{path}: {exc}") from exc
    if not rows:
        raise CommissionError(f"{path}: no rows")
    return sorted(rows)


def simulated_idd_per_proton(energy_mev: float, base: Path | str, work: Path, primaries: int, threads: int,
                             seed: int = 1) -> float:
    """IDD (Gy·mm² per proton) at 2 cm depth in water of one spot, by the engine with the base model."""
    from dicom_node.phantom import PhantomSpec, Spot, build_study

    depth_box = 60.0
    spec = PhantomSpec(size_mm=(240.0, 64.0, 240.0), spacing_mm=(4.0, 2.0, 4.0), water_box_mm=(240.0, depth_box, 240.0),
                       bone_slab_thickness_mm=0.0, fractions=1, machine_name="COMMISSION",
                       spots=(Spot(0.0, 0.0, energy_mev, 1.0),))
    study = build_study(spec)
    engine = get_engine("mcsquare")
    inputs = engine.prepare(study.all(), work, beam_models={"COMMISSION": base})
    tally = engine.run_shard(inputs, primaries, seed, threads)
    grid = inputs.grid
    y = grid.y
    surface = -depth_box / 2.0  # gantry 0 enters from -y
    iy = int(np.argmin(np.abs(y - (surface + IDD_DEPTH_MM))))
    dz, _dy, dx = grid.spacing
    return float(tally.dose_per_primary[:, iy, :].astype(np.float64).sum() * dx * dz)


# --- the BDL ---------------------------------------------------------------------------------


def factor_curve(points: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (energy, factor) knots; knots closer than 0.5 MeV are averaged."""
    pts = sorted(points)
    merged: list[list[float]] = []
    for e, k in pts:
        if merged and abs(e - merged[-1][0]) < 0.5:
            merged[-1] = [(merged[-1][0] + e) / 2, (merged[-1][1] + k) / 2]
        else:
            merged.append([e, k])
    arr = np.array(merged)
    return arr[:, 0], arr[:, 1]


def commissioned_bdl_text(base: BeamModel, knots: tuple[np.ndarray, np.ndarray], span: tuple[float, float],
                          header: list[str]) -> str:
    """The base BDL with ProtonsMU x k(E), its energy rows cut to those bracketing ``span``, ``header`` on top."""
    lines = base.path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().lower().startswith("nominalenergy"))
    energies = base.energies
    lo_i = max(0, int(np.searchsorted(energies, span[0] + 1e-9, side="right")) - 1)
    hi_i = min(len(energies) - 1, int(np.searchsorted(energies, span[1] - 1e-9, side="left")))
    keep_lo, keep_hi = energies[lo_i], energies[hi_i]
    rows = []
    for line in lines[start + 1:]:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        values = line.split()
        e = float(values[0])
        if not keep_lo - 1e-6 <= e <= keep_hi + 1e-6:
            continue
        k = float(np.interp(e, *knots))
        values[3] = f"{float(values[3]) * k:.1f}"
        rows.append(" \t ".join(values))
    body = lines[1:start + 1]
    for i, line in enumerate(body):
        if line.strip().endswith("energies") and line.split()[0].isdigit():
            body[i] = f"{len(rows)} energies"
    comments = [f"# {h}" for h in header]
    return "\n".join([lines[0], *comments, *body, *rows]) + "\n"


def commission(references: Sequence[Path], out: Path, *, base: Path | None = None, measured: Path | None = None,
               primaries: int = 200_000, groups: int = 1, threads: int = 0,
               ct_calibrations: Mapping[str, Sequence[Path]] | None = None,
               echo: Callable[[str], None] = print) -> list[ReferenceResult]:
    """Fit, write the BDL to ``out``, print the residual per reference; the results."""
    if not references and measured is None:
        raise CommissionError("give at least one --reference DIR or --measured CSV")
    base_path = Path(base) if base else generic_beam_model_path()
    base_model = read_bdl(base_path)
    base_choice: Path | str = base_path if base else GENERIC_MODEL
    header = [f"Commissioned by mcnode commission on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
              f"base model: {base_path.name} sha256 {_sha(base_path)}",
              f"fit: protons per MU = base x k(E); k from the dose above {100 * HIGH_DOSE_FRACTION:g} % of each "
              "reference's maximum; linear in E between knots, constant beyond"]
    knots: list[tuple[float, float]] = []
    spans: list[float] = []
    results: list[ReferenceResult] = []
    with tempfile.TemporaryDirectory(prefix="mcnode-commission-") as tmp:
        for i, folder in enumerate(references):
            ref = load_reference(folder)
            header.append(f"reference {ref.label}: " + ", ".join(f"{p.name} sha256 {_sha(p)[:16]}"
                                                                 for p in ref.files if not p.name.startswith("CT")))
            if any(p.name.startswith("CT") for p in ref.files):
                digest = hashlib.sha256(b"".join(_sha(p).encode() for p in ref.files if p.name.startswith("CT")))
                header.append(f"  CT: {len(ref.cts)} slices, sha256 of their sha256s {digest.hexdigest()[:16]}")
            res = fit_reference(ref, base_choice, Path(tmp) / f"ref{i}", primaries, groups, threads,
                                ct_calibrations=ct_calibrations)
            results.append(res)
            knots += [(b.energy_mev, b.factor) for b in res.bands]
            spans += list(res.energy_range)
            bands = "; ".join(f"{b.lo_mev:g}-{b.hi_mev:g} MeV (mean {b.energy_mev:.1f}): k = {b.factor:.4f}"
                              for b in res.bands)
            line = (f"{res.label}: MC/reference over {res.voxels} voxels > 50 % of max: base {res.ratio_before:.4f}, "
                    f"fitted {res.ratio_after:.4f} (residual {100 * (res.ratio_after - 1):+.2f} %, "
                    f"RMS {res.rms_percent:.1f} %); {bands}")
            header.append("  " + line)
            echo(line)
        if measured is not None:
            rows = read_measured(measured)
            header.append(f"measured IDD table {Path(measured).name} sha256 {_sha(Path(measured))}: columns "
                          f"{','.join(CSV_COLUMNS)} (IDD at {IDD_DEPTH_MM:g} mm depth in water)")
            for j, (e, idd) in enumerate(rows):
                if not base_model.covers(e):
                    raise CommissionError(f"{measured}: energy {e:g} MeV outside the base model "
                                          f"({base_model.energies[0]:g}-{base_model.energies[-1]:g} MeV)")
                per_proton = simulated_idd_per_proton(e, base_choice, Path(tmp) / f"idd{j}", primaries, threads)
                n_fit = idd / per_proton
                k = n_fit / base_model.protons_for(e, 1.0)
                knots.append((e, k))
                spans += [e]
                line = (f"{e:g} MeV: measured {idd:.4g} Gy mm2/MU, MC {per_proton:.4g} Gy mm2/proton -> "
                        f"{n_fit:.4g} protons/MU (k = {k:.4f})")
                header.append("  " + line)
                echo(line)
    curve = factor_curve(knots)
    span = (min(spans), max(spans))
    header.append(f"energies kept: the base rows bracketing {span[0]:g}-{span[1]:g} MeV (no extrapolation)")
    text = commissioned_bdl_text(base_model, curve, span, header)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    read_bdl(out)  # what we wrote must read back
    echo(f"wrote {out}")
    return results
