"""The ompMC adapter: photon and electron dose with ``ompmc`` (a C re-implementation of EGSnrc's
coupled photon-electron transport; GPL-3.0, an optional extra of this package).

Two kinds of input, both run as shards of a job like any other (``inputs.json`` says which):

- A photon RT Plan on its CT (``photonplan`` reads it and refuses what is not modelled, naming the
  element; ``photon`` holds the beam model, HU calibration, IEC geometry and beamlets). The
  treatment machine must be mapped in ``[engine] beam_models`` to a photon model file or to
  "generic" (uncommissioned: the dose says so). Electron plans are refused. The dose is scored on
  the dose grid of ``DoseOptions`` (``dosegrid.choose_grid``, as for protons), 0 below the body's
  density threshold, with the structure set's External contour written as the body mask.
- A *water phantom beam*: one square field at a source-to-surface distance onto a water phantom,
  scored on the central axis: what ``mcnode depth-dose`` runs. ``prepare_water_phantom`` writes
  only the beam and the geometry (cross sections and spectra ship inside the ``ompmc`` wheel).

``ompmc`` keeps global state (one calculation per process at a time) and is OpenMP-parallel inside
a calculation: shards run as separate worker processes, and the thread count is set through
``OMP_NUM_THREADS`` before ``ompmc`` is first imported in that process. Nothing here imports
``ompmc`` at module level: ``check_plan`` only looks for it.

Geometry of a water phantom beam: the phantom surface is the plane z = 0 (cm) and depth runs along
+z, the beam axis; the point source sits ``ssd`` cm before the surface and the field (``field`` cm
square) is defined on the surface, as for an SSD setup. Laterally the phantom is ``lateral`` cm
wide, split into a central column of ``column`` cm (the scoring column), a ring to the field edge
and the rest: only the central column is kept, so the scoring grid is (nz, 1, 1).

Units: ``calc_cube`` returns Gy per unit incident fluence (cm^-2); the field's fluence per history
is 1 / field area at the surface, so the water-phantom tally is Gy per history (depth doses are
normalised to their maximum, so that convention matters only to whoever reads the tally). A photon
plan's tally is the dose for beamlet weights summing to 1; ``protons_per_fraction`` (the merge's
scale) is then the total weight x Gy per unit weight from the beam model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud.engines.base import (
    UNCOMMISSIONED,
    DoseOptions,
    Engine,
    ShardInputs,
    mapped_model,
    one_plan,
)
from cloud.errors import EngineError, EngineUnavailable, UnsupportedPlan
from cloud.grid import Grid

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

NAME = "ompmc"
WATER = "H2O700ICRU"  # in the 700icru PEGS4 file ompmc uses by default
KIND_WATER_PHANTOM = "water_phantom"
# Co-60: the two gamma lines (1.173 and 1.332 MeV), equal intensity.
CO60_LINES_MEV = (1.1732, 1.3325)
# The photon spectra that ship with ompmc, by nominal MV (mohan6: Mohan et al. 1985, 6 MV Varian).
PHOTON_SPECTRA = {6.0: "mohan6"}
# Every megavoltage spectrum in the ompmc wheel (a model names one: inputs carry names, not files, so a
# worker anywhere finds the same spectrum in its own installation).
SHIPPED_SPECTRA = ("mohan6", "var_6MV")
SECOND_SEED = 33  # Philox key word 2; word 1 is the shard's seed
BATCHES = 5
# A plan's shards need no batch uncertainty from ompMC (the spread between shards gives it), and
# fewer batches let fewer histories reach every beamlet (photon.min_histories).
PLAN_BATCHES = 2


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
    if beam.source not in ("co60", "mono", *SHIPPED_SPECTRA):
        raise EngineError(f"unknown source {beam.source!r} (spectra: {', '.join(SHIPPED_SPECTRA)})")
    nz = beam.n_depth
    grid = Grid.regular((nz, 1, 1), origin=(10.0 * beam.dz / 2, 0.0, 0.0),
                        spacing=(10.0 * beam.dz, 10.0 * beam.column, 10.0 * beam.column))
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


KIND_PHOTON_PLAN = "photon_plan"


def photon_models_for(plan: Any, beam_models: Mapping[str, Path | str] | None) -> tuple[Any, Any, bool]:
    """(the machine's photon beam model, the energy's model, commissioned); UnsupportedPlan otherwise."""
    from cloud.engines.ompmc.photon import read_photon_model

    model = read_photon_model(mapped_model(plan.machines, beam_models, beams="PHOTON", model_file="photon model file"))
    energies = {b.energy_mv for b in plan.beams}
    if len(energies) > 1:
        raise UnsupportedPlan(f"beams of several energies ({', '.join(f'{e:g} MV' for e in sorted(energies))}) "
                              "in one plan are not computed yet")
    energy = model.for_energy(plan.beams[0].energy_mv, plan.beams[0].name)
    if energy.engine_dose_ref is None or not energy.engine_dose_ref > 0:
        raise UnsupportedPlan(f"photon beam model {model.name}: {plan.beams[0].energy_mv:g} MV has no engine_dose_ref "
                              "(run reference_engine_dose for it): no absolute dose")
    return model, energy, model.commissioned


def _photon_warning(machine: str) -> str:
    return (f"{UNCOMMISSIONED}: machine {machine!r} is mapped to the generic photon beam model; absolute dose "
            "rests on its 1 cGy/MU definition, not on commissioning")


class OmpmcEngine(Engine):
    """Photon RT Plans (static and step-and-shoot) on the CT, and water-phantom depth doses."""

    name = NAME

    def check_plan(self, plan: Dataset, *, beam_models: Mapping[str, Path | str] | None = None) -> tuple[str, ...]:
        import importlib.util

        from cloud.engines.ompmc.photonplan import read_photon_plan

        photon = read_photon_plan(plan)
        _model, _energy, commissioned = photon_models_for(photon, beam_models)
        if importlib.util.find_spec("ompmc") is None:  # found without importing it
            raise UnsupportedPlan("photon plans need the optional ompmc engine: pip install 'dicom-mc-node[photon]'")
        return () if commissioned else (_photon_warning(photon.machines[0]),)

    def prepare(self, datasets: list[Dataset], work_dir: Path, *,
                beam_models: Mapping[str, Path | str] | None = None,
                ct_calibration: tuple[str, Path, Path] | None = None, dose: DoseOptions | None = None) -> ShardInputs:
        from cloud.engines import dosegrid
        from cloud.engines.ct import ct_grid, ct_slices, ct_volume
        from cloud.engines.ompmc.photon import (
            BEAMLETS_FILE,
            GEOMETRY_FILE,
            min_histories,
            transport_density,
            write_beamlets,
            write_geometry,
        )
        from cloud.engines.ompmc.photonplan import read_photon_plan

        plan = read_photon_plan(one_plan(datasets, "RT Plan"))
        model, energy, commissioned = photon_models_for(plan, beam_models)
        options = dose or DoseOptions()
        slices = ct_slices(datasets, plan.frame_of_reference_uid)
        dose_grid = dosegrid.choose_grid(ct_grid(slices), options)  # refused before anything is written
        volume, grid = ct_volume(slices)
        # ompMC scores on its transport grid: with a dose grid, transport on that grid's lattice over the
        # whole CT (the CT averaged onto it) and keep the dose grid's part
        transport, offset = (grid, (0, 0, 0)) if dose_grid is None else dosegrid.covering_grid(dose_grid, grid)
        work_dir.mkdir(parents=True, exist_ok=True)
        write_geometry(transport_density(volume, grid, None if dose_grid is None else transport), transport,
                       work_dir / GEOMETRY_FILE)
        del volume  # the geometry is on disk now
        extra_out = dosegrid.write_body(datasets, dose_grid or grid, plan.frame_of_reference_uid, work_dir, options)
        total_weight, left_out = write_beamlets(plan, model.beamlet_mm, work_dir / BEAMLETS_FILE)
        with np.load(work_dir / BEAMLETS_FILE) as written:  # a shard with fewer runs without some beamlets
            min_per_shard = min_histories(written["weights"], PLAN_BATCHES)
        assert energy.engine_dose_ref is not None
        gy_per_unit = total_weight * energy.gy_per_mu_ref / energy.engine_dose_ref
        warnings = [] if commissioned else [_photon_warning(plan.machines[0])]
        if left_out > 0:  # said where the dose is shown, not only recorded in the job's inputs
            warnings.append(f"{100.0 * left_out:.3g} % of the plan's fluence (its weakest beamlets) not simulated")
        if options.dose_to_water:
            warnings.append("dose to medium: the photon engine has no dose-to-water conversion "
                            "([engine] dose_to_water applies to protons)")
        inputs = ShardInputs(root=work_dir, engine=NAME, grid=grid, protons_per_fraction=gy_per_unit,
                             fractions=plan.fractions, plan_uid=plan.sop_instance_uid,
                             frame_of_reference_uid=plan.frame_of_reference_uid, machines=plan.machines,
                             warnings=tuple(warnings), commissioned=commissioned, ct_calibration="photon built-in",
                             extra={"kind": KIND_PHOTON_PLAN, "spectrum": energy.spectrum, "beam_model": model.name,
                                    "beams": len(plan.dicom_beams), "total_mu": sum(b.mu for b in plan.beams),
                                    "transport_grid": transport.to_json(), "dose_offset": list(offset),
                                    "fluence_left_out_percent": round(100.0 * left_out, 4),
                                    "min_primaries_per_shard": min_per_shard,
                                    **extra_out},
                             dose_grid=dose_grid)
        inputs.save()
        return inputs

    def simulate(self, inputs: ShardInputs, primaries: int, seed: int,
                 threads: int) -> tuple[np.ndarray, dict[str, Any]]:
        kind = inputs.extra.get("kind")
        if kind not in (KIND_WATER_PHANTOM, KIND_PHOTON_PLAN):
            raise EngineError(f"{inputs.root}: not an ompmc input (kind {kind!r})")
        if threads > 0:  # read by OpenMP when ompmc is first loaded in this (worker) process
            os.environ["OMP_NUM_THREADS"] = str(threads)
        if kind == KIND_PHOTON_PLAN:
            return self._run_photon_plan(inputs, primaries, seed), {}
        beam = WaterPhantomBeam(**inputs.extra["beam"])
        axis, rel = run_water_phantom(beam, primaries, seed)
        if axis.shape != (inputs.grid.shape[0],):
            raise EngineError(f"ompmc returned {axis.shape[0]} depths, expected {inputs.grid.shape[0]}")
        return axis.reshape(inputs.grid.shape).astype(np.float64), {"ompmc_relative_uncertainty_at_max": rel}

    @staticmethod
    def _run_photon_plan(inputs: ShardInputs, primaries: int, seed: int) -> np.ndarray:
        """The plan's dose on the scoring grid: the transport grid's dose, cut to the dose grid, 0 where
        the density is below the body threshold (no dose in air, as MCsquare's segmentation)."""
        from cloud.engines.ompmc.photon import GEOMETRY_FILE, geometry_density, run_forward

        transport = Grid.from_json(inputs.extra.get("transport_grid") or inputs.grid.to_json())
        dose = run_forward(_ompmc(), inputs.root, str(inputs.extra["spectrum"]), primaries, seed, SECOND_SEED,
                           PLAN_BATCHES)
        if dose.shape != transport.shape:
            raise EngineError(f"ompmc dose grid {dose.shape} differs from the transport grid {transport.shape}")
        density = geometry_density(inputs.root / GEOMETRY_FILE)
        oz, oy, ox = (int(v) for v in inputs.extra.get("dose_offset", (0, 0, 0)))
        nz, ny, nx = inputs.scoring_grid.shape
        cut = (slice(oz, oz + nz), slice(oy, oy + ny), slice(ox, ox + nx))
        dose, density = dose[cut], density[cut]
        if dose.shape != inputs.scoring_grid.shape:
            raise EngineError(f"{inputs.root}: the dose grid {inputs.scoring_grid.shape} does not fit in the "
                              f"transport grid {transport.shape} at {oz, oy, ox}")
        threshold = inputs.extra.get("body_density_g_cm3")
        if threshold is not None:
            dose = np.where(density >= float(threshold), dose, 0.0)
        return dose.astype(np.float32)
