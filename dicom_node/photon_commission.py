"""`mcnode commission-photon`: a photon beam model for one linac energy, checked against the clinic's
measured depth dose and anchored to its output calibration.

What the clinic gives: the energy (MV), which spectrum shipped with ompMC stands for its beam, the
absolute output at its reference conditions (Gy per MU at ``ref_depth`` on the axis of a
``ref_field`` square field at SSD ``ref_ssd``; e.g. 0.01 Gy/MU at d_max, 10x10 cm, SSD 100 cm after
a TG-51 / TRS-398 calibration), and a measured central-axis depth dose for the reference field
(CSV with ``depth_cm`` and ``dose_percent``, the format ``mcnode depth-dose`` writes).

What it does: computes the spectrum's depth dose in water for the reference field (``mcnode
depth-dose`` machinery: shards on the local backend) and compares it with the measurement at 5, 10
and 20 cm, in shape (``compare_pdd``); if any differs by more than ``tolerance`` percentage points the spectrum does not
describe this machine and nothing is written. Otherwise it computes ``engine_dose_ref`` (what the
plan machinery gives for 1 MU at the reference point, ``reference_engine_dose``) and writes the
model JSON with the comparison, the measured file's SHA-256, the histories and the date.

What it does not do: fit a spectrum, model head scatter or leaf transmission; the output is
anchored at one field size (no output factors). Those limits are written into the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from dicom_node.errors import ConfigError, NodeError
from dicom_node.jobs.depth_dose import DepthDose, read_csv, run_depth_dose

LOGGER = logging.getLogger(__name__)

CHECK_DEPTHS_CM = (5.0, 10.0, 20.0)


@dataclass(frozen=True)
class PddComparison:
    depth_cm: float
    measured: float
    computed: float

    @property
    def difference(self) -> float:
        return self.computed - self.measured


def compare_pdd(computed: DepthDose, measured_csv: Path) -> list[PddComparison]:
    """Measured (interpolated) and computed PDD at the check depths, compared in shape.

    The computed values are straight-line fits over ±1 cm, scaled by the least-squares factor onto
    the measured ones: each curve is normalised to its own maximum, and the maximum of a Monte Carlo
    curve carries its noise, which would otherwise count as a difference at every depth.
    """
    try:
        z, d, _u = read_csv(measured_csv)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{measured_csv}: not a depth-dose CSV with depth_cm and dose_percent ({exc})") from exc
    if z.size < 2 or z.max() < max(CHECK_DEPTHS_CM):
        raise ConfigError(f"{measured_csv}: the measured depth dose must reach {max(CHECK_DEPTHS_CM):g} cm")
    d = 100.0 * d / d.max()
    m = np.array([float(np.interp(depth, z, d)) for depth in CHECK_DEPTHS_CM])
    c = np.array([computed.fitted_at(depth) for depth in CHECK_DEPTHS_CM])
    scale = float(np.dot(m, c) / np.dot(c, c))
    return [PddComparison(depth, float(mi), float(scale * ci)) for depth, mi, ci in zip(CHECK_DEPTHS_CM, m, c,
                                                                                       strict=True)]


def _reference_dose_in_a_worker(energy: dict[str, float | str], beamlet_mm: float, histories: int,
                                seed: int) -> tuple[float, float]:
    """reference_engine_dose in a process of its own (ompMC keeps global state)."""
    code = ("import json, sys\n"
            "from cloud.engines.ompmc.photon import EnergyModel, reference_engine_dose\n"
            "a = json.loads(sys.argv[1])\n"
            "d, u = reference_engine_dose(EnergyModel(engine_dose_ref=None, **a['energy']), a['beamlet_mm'],"
            " a['histories'], a['seed'])\n"
            "print(json.dumps([d, u]))\n")
    arg = json.dumps({"energy": energy, "beamlet_mm": beamlet_mm, "histories": histories, "seed": seed})
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NodeError(f"reference dose failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else '?'}")
    dose, rel = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(dose), float(rel)


def commission_photon(out: Path, *, energy_mv: float, spectrum: str, gy_per_mu: float, measured: Path,
                      ref_depth_cm: float = 1.5, ref_field_cm: float = 10.0, ref_ssd_cm: float = 100.0,
                      tolerance: float = 2.0, histories: int = 400_000, shards: int = 4,
                      beamlet_mm: float = 5.0) -> dict[str, object]:
    """Check the spectrum against the measured PDD, compute the reference dose, write the model JSON."""
    from cloud.engines.ompmc.adapter import SHIPPED_SPECTRA

    if spectrum not in SHIPPED_SPECTRA:
        raise ConfigError(f"--spectrum {spectrum!r}: must be one of the spectra shipped with ompmc "
                          f"({', '.join(SHIPPED_SPECTRA)})")
    if not gy_per_mu > 0:
        raise ConfigError("--gy-per-mu must be positive")
    with tempfile.TemporaryDirectory(prefix="mcnode-commission-photon-") as tmp:
        # the depth-dose phantom takes the MV only to name defaults; any x<MV> beam with this spectrum
        computed = run_depth_dose("x6", Path(tmp), field_cm=ref_field_cm, ssd_cm=ref_ssd_cm, histories=histories,
                                  shards=shards, spectrum=spectrum)
    rows = compare_pdd(computed, measured)
    for r in rows:
        LOGGER.info("PDD(%g cm): measured %.1f %%, computed %.1f %% (%+.1f)", r.depth_cm, r.measured, r.computed,
                    r.difference)
    worst = max(rows, key=lambda r: abs(r.difference))
    if abs(worst.difference) > tolerance:
        raise NodeError(f"spectrum {spectrum!r} does not describe this beam: PDD({worst.depth_cm:g} cm) computed "
                        f"{worst.computed:.1f} % against {worst.measured:.1f} % measured ({worst.difference:+.1f} "
                        f"points; tolerance {tolerance:g}); no model written")
    energy: dict[str, float | str] = {"spectrum": spectrum, "gy_per_mu_ref": gy_per_mu, "ref_ssd_cm": ref_ssd_cm,
              "ref_field_cm": ref_field_cm, "ref_depth_cm": ref_depth_cm}
    dose_ref, rel = _reference_dose_in_a_worker(energy, beamlet_mm, histories, seed=1)
    model = {
        "description": (f"Photon beam model commissioned {datetime.now(UTC):%Y-%m-%d}: spectrum {spectrum} checked "
                        f"against the measured PDD, output {gy_per_mu:g} Gy/MU at {ref_depth_cm:g} cm, "
                        f"{ref_field_cm:g}x{ref_field_cm:g} cm, SSD {ref_ssd_cm:g} cm. Not modelled: head scatter, "
                        "output factors other than the reference field, jaw and leaf transmission."),
        "beamlet_mm": beamlet_mm,
        "energies": {f"{energy_mv:g}": {**energy, "engine_dose_ref": dose_ref}},
        "commissioning": {
            "measured_pdd": measured.name,
            "measured_pdd_sha256": hashlib.sha256(measured.read_bytes()).hexdigest(),
            "pdd_check": [{"depth_cm": r.depth_cm, "measured": round(r.measured, 2), "computed": round(r.computed, 2)}
                          for r in rows],
            "tolerance_points": tolerance,
            "histories": histories,
            "engine_dose_ref_relative_uncertainty": round(rel, 5),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(model, indent=2) + "\n")
    return model
