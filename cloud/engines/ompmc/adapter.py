"""The ompMC adapter: photon and electron dose with ``ompmc`` (a C re-implementation of EGSnrc's
coupled photon-electron transport; GPL-3.0, an optional extra of this package).

What it computes today is a *water phantom beam*: one square field at a source-to-surface distance
onto a water phantom, scored on the central axis. That is what ``mcnode depth-dose`` runs, as shards
of a job like any other: ``prepare_water_phantom`` writes ``inputs.json`` (the beam and the geometry,
nothing else: the cross sections and spectra ship inside the ``ompmc`` wheel), and ``run_shard``
simulates it with the shard's seed in the worker process. RT Plans (photon or electron) are refused
by ``check_plan`` with the reason, so a job is REJECTED rather than computed wrongly.

``ompmc`` keeps global state (one calculation per process at a time) and is OpenMP-parallel inside
a calculation: shards run as separate worker processes, and the thread count is set through
``OMP_NUM_THREADS`` before ``ompmc`` is first imported in that process.

Geometry of a water phantom beam: the phantom surface is the plane z = 0 (cm) and depth runs along
+z, the beam axis; the point source sits ``ssd`` cm before the surface and the field (``field`` cm
square) is defined on the surface, as for an SSD setup. Laterally the phantom is ``lateral`` cm
wide, split into a central column of ``column`` cm (the scoring column), a ring to the field edge
and the rest: only the central column is kept, so the scoring grid is (nz, 1, 1).

Units: ``calc_cube`` returns Gy per unit incident fluence (cm^-2); the field's fluence per history
is 1 / field area at the surface, so the tally is Gy per history. Depth doses are normalised to
their maximum, so that convention matters only to whoever reads the tally.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud.engines.base import Engine, Grid, ShardInputs, Tally
from cloud.errors import EngineError, EngineUnavailable, UnsupportedPlan

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

NAME = "ompmc"
WATER = "H2O700ICRU"  # in the 700icru PEGS4 file ompmc uses by default
KIND_WATER_PHANTOM = "water_phantom"
# Co-60: the two gamma lines (1.173 and 1.332 MeV), equal intensity.
CO60_LINES_MEV = (1.1732, 1.3325)
# The photon spectra that ship with ompmc, by nominal MV (mohan6: Mohan et al. 1985, 6 MV Varian).
PHOTON_SPECTRA = {6.0: "mohan6"}
SECOND_SEED = 33  # Philox key word 2; word 1 is the shard's seed
BATCHES = 5


@dataclass(frozen=True)
class WaterPhantomBeam:
    """One square field on a water phantom (lengths in cm, energies in MeV).

    ``source`` is ``co60`` (the two Co-60 lines), ``mono`` (``energy_mev``, with ``particle``) or
    the name of a spectrum file shipped with ompmc (``mohan6``).
    """

    particle: str  # "photon" | "electron"
    source: str
    energy_mev: float = 0.0
    ssd: float = 100.0
    field: float = 10.0
    depth: float = 30.0
    dz: float = 0.25
    column: float = 2.0
    lateral: float = 40.0

    def __post_init__(self) -> None:
        if self.particle not in ("photon", "electron"):
            raise EngineError(f"particle must be photon or electron, not {self.particle!r}")
        if self.source == "mono" and not self.energy_mev > 0:
            raise EngineError("a monoenergetic beam needs a positive energy")
        for name in ("ssd", "field", "depth", "dz", "column", "lateral"):
            if not getattr(self, name) > 0:
                raise EngineError(f"{name} must be positive, got {getattr(self, name)}")
        if self.column > self.field:
            raise EngineError(f"scoring column ({self.column} cm) wider than the field ({self.field} cm)")
        if self.field >= self.lateral:
            raise EngineError(f"field ({self.field} cm) must be narrower than the phantom ({self.lateral} cm)")

    @property
    def n_depth(self) -> int:
        return int(round(self.depth / self.dz))


def _ompmc() -> Any:
    try:
        import ompmc  # noqa: PLC0415 - GPL-3.0 optional extra, imported only when this engine runs
    except ImportError as exc:
        raise EngineUnavailable("the ompmc engine needs the optional extra: pip install 'dicom-mc-node[photon]'") \
            from exc
    return ompmc


def prepare_water_phantom(beam: WaterPhantomBeam, work_dir: Path) -> ShardInputs:
    """Write the inputs of a water phantom beam; the grid is the central column, (nz, 1, 1)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if beam.source not in ("co60", "mono", *PHOTON_SPECTRA.values()):
        raise EngineError(f"unknown source {beam.source!r}")
    nz = beam.n_depth
    grid = Grid(shape=(nz, 1, 1), origin=(0.0, 0.0, 10.0 * beam.dz / 2),
                spacing=(10.0 * beam.column, 10.0 * beam.column, 10.0 * beam.dz))
    inputs = ShardInputs(root=work_dir, engine=NAME, grid=grid, protons_per_fraction=1.0, fractions=1,
                         extra={"kind": KIND_WATER_PHANTOM, "beam": asdict(beam)})
    inputs.save()
    return inputs


def _bounds(beam: WaterPhantomBeam) -> tuple[np.ndarray, np.ndarray]:
    """Lateral bounds (column, ring to the field edge, rest) and depth bounds, in cm."""
    c, f, w = beam.column / 2, beam.field / 2, beam.lateral / 2
    inner = [-c, c] if f - c < 1e-6 else [-f, -c, c, f]
    lateral = np.array([-w, *inner, w], dtype=np.float64)
    depth = beam.dz * np.arange(beam.n_depth + 1, dtype=np.float64)
    return lateral, depth


def _spectrum(ompmc: Any, beam: WaterPhantomBeam) -> Any:
    if beam.source == "mono":
        return ompmc.Spectrum.monoenergetic(beam.energy_mev)
    if beam.source == "co60":
        lo, hi = CO60_LINES_MEV
        # narrow bins around each line (upper edges), nothing between them
        return ompmc.Spectrum.from_histogram([lo + 0.001, hi - 0.001, hi + 0.001], [1.0, 0.0, 1.0],
                                             e_min=lo - 0.001)
    path = Path(ompmc.data_path()) / "spectra" / f"{beam.source}.spectrum"
    if not path.is_file():
        raise EngineUnavailable(f"the ompmc installation has no spectrum {beam.source!r}")
    return ompmc.Spectrum.from_file(str(path))


def run_water_phantom(beam: WaterPhantomBeam, histories: int, seed: int) -> tuple[np.ndarray, float]:
    """Central-axis dose (Gy per history, [z]) and ompMC's own relative uncertainty at its maximum."""
    ompmc = _ompmc()
    lateral, depth = _bounds(beam)
    shape = (len(lateral) - 1, len(lateral) - 1, len(depth) - 1)
    density = np.ones(shape, dtype=np.float64, order="F")
    material = np.ones(shape, dtype=np.int32, order="F")
    geometry = ompmc.Geometry(lateral, lateral, depth, [WATER], density, material)
    half = beam.field / 2
    source = ompmc.CollimatedSource(ssd=beam.ssd, x_min=-half, x_max=half, y_min=-half, y_max=half)
    physics = ompmc.Physics(seeds=(int(seed), SECOND_SEED))
    dose, unc = ompmc.calc_cube(geometry, source, _spectrum(ompmc, beam), physics, n_histories=int(histories),
                                n_batches=BATCHES, charge=-1 if beam.particle == "electron" else 0)
    mid = (len(lateral) - 1) // 2
    axis = np.asarray(dose)[mid, mid, :] / (beam.field * beam.field)
    rel = float(np.asarray(unc)[mid, mid, int(np.argmax(axis))])
    return axis, rel


class OmpmcEngine(Engine):
    name = NAME

    def check_plan(self, plan: Dataset, *, beam_models: Mapping[str, Path | str] | None = None) -> tuple[str, ...]:
        raise UnsupportedPlan("the ompmc engine does not compute RT Plans yet (it runs water-phantom depth "
                              "doses: mcnode depth-dose); photon and electron plans are refused")

    def prepare(self, datasets: list[Dataset], work_dir: Path, *,
                beam_models: Mapping[str, Path | str] | None = None,
                ct_calibration: tuple[str, Path, Path] | None = None) -> ShardInputs:
        plans = [ds for ds in datasets if "BeamSequence" in ds or "IonBeamSequence" in ds]
        self.check_plan(plans[0] if plans else datasets[0])
        raise AssertionError("unreachable")  # pragma: no cover

    def run_shard(self, inputs: ShardInputs, primaries: int, seed: int, threads: int = 0) -> Tally:
        if primaries <= 0:
            raise EngineError(f"primaries must be positive, got {primaries}")
        if seed < 0:
            raise EngineError(f"seed must be 0 or more, got {seed}")
        if inputs.extra.get("kind") != KIND_WATER_PHANTOM:
            raise EngineError(f"{inputs.root}: not an ompmc input (kind {inputs.extra.get('kind')!r})")
        beam = WaterPhantomBeam(**inputs.extra["beam"])
        if threads > 0:  # read by OpenMP when ompmc is first loaded in this (worker) process
            os.environ["OMP_NUM_THREADS"] = str(threads)
        t0 = time.perf_counter()
        axis, rel = run_water_phantom(beam, primaries, seed)
        if axis.shape != (inputs.grid.shape[0],):
            raise EngineError(f"ompmc returned {axis.shape[0]} depths, expected {inputs.grid.shape[0]}")
        return Tally(dose_per_primary=axis.reshape(inputs.grid.shape).astype(np.float64), primaries=primaries,
                     seed=seed, wall_s=time.perf_counter() - t0, engine=NAME,
                     extra={"ompmc_relative_uncertainty_at_max": rel})
