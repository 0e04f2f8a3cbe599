"""The compute steps, shared by the node's pipeline and the offline `mcnode compute`.

    check_plan      -> the engine, after it accepted the plan (UnsupportedPlan with the reason)
    ct_calibration  -> the site's CT tables for this scanner (chosen on the original CT: the
                       scanner's name does not survive de-identification)
    dose_options    -> the dose grid and the body/water options
    prepare         -> the engine's inputs folder (beam models from [engine] beam_models)
    merge_dose      -> all shards' tallies (or a StreamingMerge of them) as one dose (refuses a partial
                       set; RBE for protons only)
    rt_dose         -> the RT Dose dataset on the dose grid, saying which model, tables and noise

The pipeline runs them around de-identification, sealing and dispatch to a backend
(`dicom_node.jobs.pipeline`); `compute_folder` runs them on a folder of plan + CT (+ structure
set), without network, anonymization or remote workers: the shards run here one after another
(each uses ``threads`` threads; the engine parallelises inside a shard).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, RTDoseStorage

from cloud.dispatch import split_primaries
from cloud.engines import engine_name_for, get_engine
from cloud.engines.base import DoseOptions, Engine, ShardInputs, Tally
from cloud.engines.dosegrid import grid_from_rtdose
from cloud.errors import DispatchError, EngineError, MergeError, UnsupportedPlan
from cloud.merge import MergedDose, StreamingMerge, merge
from dicom_node.errors import NodeError, PlanRejected
from dicom_node.jobs.ctcal import CtCalibration, choose_ct_calibration
from dicom_node.jobs.rtdose import write_rt_dose
from dicom_node.net import uids
from dicom_node.settings import EngineSettings

LOGGER = logging.getLogger(__name__)


class ComputeError(NodeError):
    """The engine failed for a reason that may go away on a retry (not a rejection)."""


@dataclass
class ComputeResult:
    rt_dose_path: Path
    merged: MergedDose
    warnings: tuple[str, ...] = ()
    tallies: list[Tally] = field(default_factory=list)


def plan_of(datasets: Sequence[Dataset]) -> Dataset:
    """The one RT (Ion) Plan among the datasets; PlanRejected when there is none or several."""
    plans = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) in uids.PLAN_CLASSES]
    if len(plans) != 1:
        raise PlanRejected(f"expected one RT (Ion) Plan, found {len(plans)}")
    return plans[0]


def check_plan(datasets: Sequence[Dataset], settings: EngineSettings) -> Engine:
    """The engine for the plan (photon plans go to the photon engine), after it accepted the plan."""
    plan = plan_of(datasets)
    engine = get_engine(engine_name_for(plan, settings.name))
    engine.check_plan(plan, beam_models=settings.beam_models)
    return engine


def ct_calibration(datasets: Sequence[Dataset], settings: EngineSettings) -> CtCalibration:
    """The CT calibration tables for the scanner of the CT among `datasets` (the original, named CT)."""
    return choose_ct_calibration([ds for ds in datasets if str(ds.get("SOPClassUID", "")) == CTImageStorage],
                                 settings.ct_calibrations)


def prepare(engine: Engine, datasets: list[Dataset], work_dir: Path, settings: EngineSettings,
            calibration: CtCalibration, options: DoseOptions) -> ShardInputs:
    """The engine's inputs for plan + CT (+ structure set), with the site's beam models and CT tables."""
    return engine.prepare(datasets, work_dir, beam_models=dict(settings.beam_models),
                          ct_calibration=calibration.for_engine(), dose=options)


def calibration_text(engine: Engine, calibration: CtCalibration, inputs: ShardInputs) -> str:
    """The CT calibration the clinic sees: the site's tables by scanner key, or the engine's own (the
    photon engine converts the CT with its own table)."""
    return calibration.description if engine.name == "mcsquare" else inputs.ct_calibration


def merge_dose(tallies: Sequence[Tally] | StreamingMerge, inputs: ShardInputs, settings: EngineSettings, *,
               expected_shards: int, expected_primaries: int | None = None, body: np.ndarray | None = None
               ) -> MergedDose:
    """Every shard's tally (or their running sums, summed as they arrived) as one plan dose (RBE 1.1 when
    [engine] rbe, for protons only); MergeError on a partial set."""
    rbe = settings.rbe and inputs.engine == "mcsquare"
    if isinstance(tallies, StreamingMerge):
        return tallies.result(inputs.protons_per_fraction, inputs.fractions, rbe, expected_shards=expected_shards,
                              expected_primaries=expected_primaries, body=body)
    return merge(tallies, inputs.protons_per_fraction, inputs.fractions, rbe, expected_shards=expected_shards,
                 expected_primaries=expected_primaries, body=body)


def rt_dose(merged: MergedDose, inputs: ShardInputs, reference_ct: Dataset, plan: Dataset, calibration: str, *,
            notes: Sequence[str] = (), marks: Sequence[str] = ()) -> Dataset:
    """The RT Dose on the dose grid; it names the beam model, CT tables and uncertainty (then `notes`), and
    is marked when the model is uncommissioned (and with `marks`)."""
    all_notes = [f"beam model {inputs.extra.get('beam_model', '?')}", f"CT calibration {calibration}",
                 *dose_notes(merged.summary), *notes]
    return write_rt_dose(merged, inputs.scoring_grid, reference_ct, plan, notes=all_notes, marks=marks,
                         dose_to_water=inputs.dose_to_water, uncommissioned=not inputs.commissioned)


def dose_options(settings: EngineSettings, tps_dose: Dataset | None = None) -> tuple[DoseOptions, str]:
    """The engine's dose options from the settings, and a line saying which grid was chosen.

    With ``dose_grid = "tps"`` and a TPS RT Dose for the plan, its grid exactly; without one, the
    uniform grid (the line says so). UnsupportedPlan if the TPS grid cannot be used (not axial...).
    """
    water, density = settings.dose_to_water, settings.body_density_g_cm3
    if settings.dose_grid == "ct":
        return DoseOptions(grid_mm=0.0, dose_to_water=water, body_density_g_cm3=density), "dose grid: the CT's"
    if settings.dose_grid == "tps" and tps_dose is not None:
        grid = grid_from_rtdose(tps_dose)
        note = "dose grid: the TPS dose's ({} x {} x {} voxels of {} mm)".format(
            grid.shape[2], grid.shape[1], grid.shape[0], "x".join(f"{v:g}" for v in grid.spacing[::-1]))
        return DoseOptions(grid=grid, dose_to_water=water, body_density_g_cm3=density), note
    note = f"dose grid: uniform {settings.dose_grid_mm:g} mm"
    if settings.dose_grid == "tps":
        note += " (no TPS dose for the plan had arrived)"
    return DoseOptions(grid_mm=settings.dose_grid_mm, dose_to_water=water, body_density_g_cm3=density), note


def dose_notes(summary: dict[str, object]) -> list[str]:
    """RT Dose notes (ImageComments): the uncertainty reached."""
    notes = []
    unc = summary.get("uncertainty_percent")
    if unc is not None:
        notes.append(f"uncertainty {float(unc):.2f} % (pooled relative SE, body voxels >= 50 % of max)")  # type: ignore[arg-type]
    return notes


def tps_dose_in(datasets: list[Dataset], plan_uid: str) -> Dataset | None:
    """An RT Dose among ``datasets`` that names the plan (the TPS's own), else None."""
    for ds in datasets:
        if str(ds.get("SOPClassUID", "")) != RTDoseStorage:
            continue
        refs = [str(r.get("ReferencedSOPInstanceUID", "")) for r in ds.get("ReferencedRTPlanSequence", [])]
        if plan_uid in refs:
            return ds
    return None


def ct_slices_sorted(cts: list[Dataset]) -> list[Dataset]:
    return sorted(cts, key=lambda ds: float(ds.ImagePositionPatient[2]))


def read_folder(in_dir: Path) -> list[Dataset]:
    """Every DICOM file under in_dir (files that are not DICOM are skipped)."""
    datasets: list[Dataset] = []
    for path in sorted(p for p in Path(in_dir).rglob("*") if p.is_file()):
        try:
            datasets.append(dcmread(path))
        except (InvalidDicomError, OSError):
            LOGGER.debug("skipping %s: not DICOM", path.name)
    return datasets


def compute_folder(in_dir: Path, out_dir: Path, *, primaries: int, shards: int,
                   engine_settings: EngineSettings | None = None, seed: int = 0) -> ComputeResult:
    """Compute the plan found in in_dir; write RD_<plan>.dcm into out_dir. PlanRejected if impossible."""
    settings = engine_settings or EngineSettings()
    datasets = read_folder(in_dir)
    try:
        plan = plan_of(datasets)
    except PlanRejected as exc:
        raise PlanRejected(f"{in_dir}: {exc}") from None
    try:
        engine = check_plan(datasets, settings)
        counts = split_primaries(primaries, shards)
        calibration = ct_calibration(datasets, settings)
        options, grid_note = dose_options(settings, tps_dose_in(datasets, str(plan.SOPInstanceUID)))
        LOGGER.info("%s", grid_note)
        with tempfile.TemporaryDirectory(prefix="mcnode-compute-") as tmp:
            inputs = prepare(engine, datasets, Path(tmp) / "inputs", settings, calibration, options)
            body = inputs.body_mask()
            for warning in inputs.warnings:
                LOGGER.warning("%s", warning)
            tallies = []
            for i, n in enumerate(counts):
                tally = engine.run_shard(inputs, n, seed + i, settings.threads)
                LOGGER.info("shard %d/%d: %d primaries in %.1f s", i + 1, shards, n, tally.wall_s)
                tallies.append(tally)
        merged = merge_dose(tallies, inputs, settings, expected_shards=shards, expected_primaries=primaries,
                            body=body)
    except UnsupportedPlan as exc:
        raise PlanRejected(str(exc)) from exc
    except (EngineError, MergeError, DispatchError) as exc:
        raise ComputeError(f"dose computation failed: {exc}") from exc
    cts = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == CTImageStorage
           and ds.get("FrameOfReferenceUID") == plan.get("FrameOfReferenceUID")]
    del datasets
    rd = rt_dose(merged, inputs, ct_slices_sorted(cts)[0], plan, calibration_text(engine, calibration, inputs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"RD_{plan.SOPInstanceUID}.dcm"
    rd.save_as(path, enforce_file_format=True)
    return ComputeResult(rt_dose_path=path, merged=merged, warnings=inputs.warnings, tallies=tallies)
