"""What every Monte Carlo engine provides, and the two plain objects that travel between machines.

    prepare(datasets, work_dir, ...)  -> ShardInputs   on the clinic node (or the first worker)
    run_shard(inputs, primaries, seed, threads) -> Tally   on any worker, once per shard
    cloud.merge.merge(tallies, ...)   -> MergedDose    wherever the tallies meet

``ShardInputs`` is a folder holding every file the engine needs plus ``inputs.json`` (grid
geometry, protons per fraction, fractions, warnings), so it can be tarred into a job bundle and run
elsewhere. ``Tally`` is the result of one shard: dose per primary in Gy on the scoring grid (the
dose grid, else the CT grid), indexed [z, y, x] with z ascending like every `cloud.grid.Grid`, serialised
as npz for transport.
"""

from __future__ import annotations

import io
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud.errors import EngineError, UnsupportedPlan
from cloud.grid import Grid

if TYPE_CHECKING:  # pydicom costs ~0.5 s to import; a worker only needs it for type hints
    from pydicom.dataset import Dataset

INPUTS_JSON = "inputs.json"
BODY_MASK = "body_mask.npy"
FORMAT_VERSION = 2  # 2: grids in (z, y, x) order (cloud.grid); 1 (x first) is still read
READABLE_FORMATS = (1, 2)
# What every dose computed with a beam model nobody commissioned says about itself (RT Dose
# SeriesDescription and DoseComment, the second-check report, the job's warnings).
UNCOMMISSIONED = "UNCOMMISSIONED BEAM MODEL - NOT FOR CLINICAL USE"
# engine.beam_models value that chooses an engine's built-in, uncommissioned model explicitly.
GENERIC_MODEL = "generic"


@dataclass(frozen=True)
class DoseOptions:
    """How the dose is scored: on which grid, to medium or to water, and where the body ends.

    ``grid`` (an exact grid, e.g. the TPS's) wins over ``grid_mm`` (cubic voxels covering the CT;
    0 = the CT grid itself). Without an External contour in the structure set, voxels below
    ``body_density_g_cm3`` count as outside the body (the engine's own density segmentation).
    """

    grid_mm: float = 0.0
    grid: Grid | None = None
    dose_to_water: bool = False
    body_density_g_cm3: float = 0.05


@dataclass(frozen=True)
class ShardInputs:
    """A prepared folder that ``Engine.run_shard`` can run anywhere, plus what merging needs.

    ``protons_per_fraction`` is Σ over spots of MU × protons per MU(E): multiplying a dose per
    primary (Gy) by it gives Gy per fraction.
    """

    root: Path
    engine: str
    grid: Grid
    protons_per_fraction: float
    fractions: int
    plan_uid: str = ""
    frame_of_reference_uid: str = ""
    machines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # False when the absolute dose rests on an uncommissioned beam model (see UNCOMMISSIONED).
    commissioned: bool = True
    # Which HU->density/material calibration converted the CT ("built-in" or the scanner's key).
    ct_calibration: str = "built-in"
    # The grid the dose is scored on; None: the CT grid.
    dose_grid: Grid | None = None
    # MCsquare's dose-to-water conversion (post-processing); False: dose to medium.
    dose_to_water: bool = False

    @property
    def scoring_grid(self) -> Grid:
        """The grid every tally of these inputs is on: the dose grid, else the CT grid."""
        return self.dose_grid or self.grid

    @property
    def has_body_mask(self) -> bool:
        """Whether prepare wrote a body mask (recorded in inputs.json, so a missing file is an error)."""
        return str(self.extra.get("body", "")).startswith("structure")

    def body_mask(self, content: bytes | None = None) -> np.ndarray | None:
        """Voxels of the scoring grid inside the body (``BODY_MASK``), or None when no outline was given.

        `content`: the file's bytes when the caller has already read (and checked) them.
        """
        path = self.root / BODY_MASK
        if content is None and not path.is_file():
            return None
        try:
            mask: np.ndarray = np.load(io.BytesIO(content) if content is not None else path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise EngineError(f"{path}: not a body mask ({exc})") from exc
        if mask.shape != self.scoring_grid.shape or mask.dtype != np.bool_:
            raise EngineError(f"{path}: a {mask.dtype} {mask.shape} mask for a {self.scoring_grid.shape} dose grid")
        return mask

    def save(self) -> Path:
        data = {
            "format": FORMAT_VERSION,
            "engine": self.engine,
            "grid": self.grid.to_json(),
            "protons_per_fraction": self.protons_per_fraction,
            "fractions": self.fractions,
            "plan_uid": self.plan_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "machines": list(self.machines),
            "warnings": list(self.warnings),
            "extra": self.extra,
            "commissioned": self.commissioned,
            "ct_calibration": self.ct_calibration,
            "dose_grid": self.dose_grid.to_json() if self.dose_grid else None,
            "dose_to_water": self.dose_to_water,
        }
        path = self.root / INPUTS_JSON
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, root: Path | str, text: bytes | str | None = None) -> ShardInputs:
        """Open a prepared folder (for instance after unpacking a bundle on a worker).

        `text`: the content of its inputs.json when the caller has already read (and checked) it.
        """
        root = Path(root)
        try:
            data = json.loads(text if text is not None else (root / INPUTS_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"{root}: not a prepared engine input folder ({exc})") from exc
        if data.get("format") not in READABLE_FORMATS:
            raise EngineError(f"{root / INPUTS_JSON}: unknown format {data.get('format')!r}")
        return cls(root=root, engine=data["engine"], grid=Grid.from_json(data["grid"]),
                   protons_per_fraction=float(data["protons_per_fraction"]), fractions=int(data["fractions"]),
                   plan_uid=data.get("plan_uid", ""), frame_of_reference_uid=data.get("frame_of_reference_uid", ""),
                   machines=tuple(data.get("machines", ())), warnings=tuple(data.get("warnings", ())),
                   extra=dict(data.get("extra", {})), commissioned=bool(data.get("commissioned", True)),
                   ct_calibration=str(data.get("ct_calibration", "built-in")),
                   dose_grid=Grid.from_json(data["dose_grid"]) if data.get("dose_grid") else None,
                   dose_to_water=bool(data.get("dose_to_water", False)))


@dataclass
class Tally:
    """One shard's result: dose per simulated primary (Gy) on the scoring grid, indexed [z, y, x]."""

    dose_per_primary: np.ndarray
    primaries: int
    seed: int
    wall_s: float
    engine: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = {"primaries": self.primaries, "seed": self.seed, "wall_s": self.wall_s, "engine": self.engine,
                "extra": self.extra}
        np.savez_compressed(buf, dose_per_primary=self.dose_per_primary,
                            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Tally:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                dose = npz["dose_per_primary"]
                meta = json.loads(npz["meta"].tobytes().decode())
        except (OSError, ValueError, KeyError) as exc:
            raise EngineError(f"not a tally ({exc})") from exc
        return cls(dose_per_primary=dose, primaries=int(meta["primaries"]), seed=int(meta["seed"]),
                   wall_s=float(meta["wall_s"]), engine=meta.get("engine", ""), extra=meta.get("extra", {}))

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["dose_per_primary"] = f"{self.dose_per_primary.dtype}{list(self.dose_per_primary.shape)}"
        return d


class Engine(ABC):
    """A Monte Carlo dose engine. Subclasses register themselves by ``name`` in cloud.engines."""

    name: str = ""

    @abstractmethod
    def check_plan(self, plan: Dataset, *, beam_models: Mapping[str, Path | str] | None = None) -> tuple[str, ...]:
        """Can this engine compute this plan? Cheap (the plan alone, no CT): called when the plan arrives.

        Raise UnsupportedPlan with the reason users see if it never can: wrong modality or delivery,
        a malformed plan, a machine with no entry in ``beam_models`` (TreatmentMachineName -> model
        file, or GENERIC_MODEL), an energy or accessory the machine's model does not have. Return
        the warnings a computed dose would carry (an uncommissioned model says UNCOMMISSIONED).
        """

    def check_ct(self, slices: list[Dataset]) -> None:
        """Raise UnsupportedPlan if this CT series (headers suffice) cannot be computed on: tilt, gaps."""
        from cloud.engines.ct import ct_grid

        ct_grid(slices)

    @abstractmethod
    def prepare(self, datasets: list[Dataset], work_dir: Path, *,
                beam_models: Mapping[str, Path | str] | None = None,
                ct_calibration: tuple[str, Path, Path] | None = None, dose: DoseOptions | None = None) -> ShardInputs:
        """Write every input the engine needs into ``work_dir`` from plan + CT (+ structure set).

        ``ct_calibration`` is (name, HU->density file, HU->material file); None = the built-in tables.
        ``dose``: the dose grid, dose to water, the body threshold (DoseOptions; None = its defaults).
        """

    def run_shard(self, inputs: ShardInputs, primaries: int, seed: int, threads: int = 0) -> Tally:
        """Simulate ``primaries`` histories of the whole plan with ``seed`` (threads 0 = all cores).

        The same for every engine: the arguments checked, ``simulate`` timed, its dose checked to lie
        on the scoring grid, the tally made.
        """
        if primaries <= 0:
            raise EngineError(f"primaries must be positive, got {primaries}")
        if seed < 0:
            raise EngineError(f"seed must be 0 or more, got {seed}")
        t0 = time.perf_counter()
        dose, extra = self.simulate(inputs, primaries, seed, threads)
        if dose.shape != inputs.scoring_grid.shape:
            raise EngineError(f"{self.name}: a dose of shape {dose.shape} for the scoring grid "
                              f"{inputs.scoring_grid.shape}")
        return Tally(dose_per_primary=dose, primaries=primaries, seed=seed, wall_s=time.perf_counter() - t0,
                     engine=self.name, extra=extra)

    @abstractmethod
    def simulate(self, inputs: ShardInputs, primaries: int, seed: int,
                 threads: int) -> tuple[np.ndarray, dict[str, Any]]:
        """One shard's dose per primary (Gy) on ``inputs.scoring_grid`` ([z, y, x]), and what else its
        tally records (``Tally.extra``). Called by ``run_shard``, which has checked the arguments."""


def one_plan(datasets: list[Dataset], what: str = "RT (Ion) Plan") -> Dataset:
    """The one plan (RT Plan or RT Ion Plan) among an engine's inputs; UnsupportedPlan otherwise."""
    plans = [ds for ds in datasets if "IonBeamSequence" in ds or "BeamSequence" in ds]
    if len(plans) != 1:
        raise UnsupportedPlan(f"expected one {what} among the inputs, found {len(plans)}")
    return plans[0]


def mapped_model(machines: tuple[str, ...], beam_models: Mapping[str, Path | str] | None, *, beams: str = "",
                 model_file: str = "beam model file") -> Path | str:
    """What ``[engine] beam_models`` maps the plan's one treatment machine to: a model file or GENERIC_MODEL.

    UnsupportedPlan when the beams use several machines or the machine is not mapped (``beams`` names
    the kind of beams in that message, ``model_file`` what a commissioned model is).
    """
    if len(machines) > 1:
        raise UnsupportedPlan(f"beams on more than one treatment machine ({', '.join(machines)})")
    machine = machines[0]
    models = dict(beam_models or {})
    if machine not in models:
        known = ", ".join(sorted(models)) or "none"
        raise UnsupportedPlan(f"{beams + ' beams: ' if beams else ''}treatment machine "
                              f"{machine or '(no TreatmentMachineName)'!r} has no beam model: add it to [engine] "
                              f"beam_models (a commissioned {model_file}, or \"{GENERIC_MODEL}\" for the "
                              f"uncommissioned model; machines mapped: {known})")
    return models[machine]
