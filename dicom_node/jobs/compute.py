"""Offline dose computation: a folder with plan + CT (+ structure set) in, one RT Dose file out.

The same steps the node's pipeline takes, without network, anonymization or remote workers: pick
the engine, prepare its inputs, run the shards here one after another (each uses ``threads``
threads; the engine parallelises inside a shard), merge, write the RT Dose.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, RTDoseStorage

from cloud.dispatch import split_primaries
from cloud.engines import engine_name_for, get_engine
from cloud.engines.base import DoseOptions, Tally
from cloud.engines.dosegrid import grid_from_rtdose
from cloud.errors import DispatchError, EngineError, MergeError, UnsupportedPlan
from cloud.merge import MergedDose, merge
from dicom_node.errors import NodeError, PlanRejected
from dicom_node.jobs.ctcal import choose_ct_calibration
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


def dose_options(settings: EngineSettings, tps_dose: Dataset | None = None) -> tuple[DoseOptions, str]:
    """The engine's dose options from the settings, and a line saying which grid was chosen.

    With ``dose_grid = "tps"`` and a TPS RT Dose for the plan, its grid exactly; without one, the
    uniform grid (the line says so). UnsupportedPlan if the TPS grid cannot be used (not axial...).
    """
    common = {"dose_to_water": settings.dose_to_water, "body_density_g_cm3": settings.body_density_g_cm3}
    if settings.dose_grid == "ct":
        return DoseOptions(grid_mm=0.0, **common), "dose grid: the CT's"
    if settings.dose_grid == "tps" and tps_dose is not None:
        grid = grid_from_rtdose(tps_dose)
        return DoseOptions(grid=grid, **common), "dose grid: the TPS dose's ({} x {} x {} voxels of {} mm)".format(
            grid.shape[2], grid.shape[1], grid.shape[0], "x".join(f"{v:g}" for v in grid.spacing))
    note = f"dose grid: uniform {settings.dose_grid_mm:g} mm"
    if settings.dose_grid == "tps":
        note += " (no TPS dose for the plan had arrived)"
    return DoseOptions(grid_mm=settings.dose_grid_mm, **common), note


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
    datasets = []
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
    plans = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) in uids.PLAN_CLASSES]
    if len(plans) != 1:
        raise PlanRejected(f"{in_dir}: expected one RT (Ion) Plan, found {len(plans)}")
    plan = plans[0]
    engine = get_engine(engine_name_for(plan, settings.name))
    try:
        engine.check_plan(plan, beam_models=settings.beam_models)
        counts = split_primaries(primaries, shards)
        cts = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == CTImageStorage]
        calibration = choose_ct_calibration(cts, settings.ct_calibrations)
        options, grid_note = dose_options(settings, tps_dose_in(datasets, str(plan.SOPInstanceUID)))
        LOGGER.info("%s", grid_note)
        with tempfile.TemporaryDirectory(prefix="mcnode-compute-") as tmp:
            inputs = engine.prepare(datasets, Path(tmp) / "inputs", beam_models=settings.beam_models,
                                    ct_calibration=calibration.for_engine(), dose=options)
            body = inputs.body_mask()
            for warning in inputs.warnings:
                LOGGER.warning("%s", warning)
            tallies = []
            for i, n in enumerate(counts):
                tally = engine.run_shard(inputs, n, seed + i, settings.threads)
                LOGGER.info("shard %d/%d: %d primaries in %.1f s", i + 1, shards, n, tally.wall_s)
                tallies.append(tally)
        rbe = settings.rbe and engine.name == "mcsquare"  # RBE 1.1 is for protons only
        merged = merge(tallies, inputs.protons_per_fraction, inputs.fractions, rbe,
                       expected_shards=shards, expected_primaries=primaries, body=body)
    except UnsupportedPlan as exc:
        raise PlanRejected(str(exc)) from exc
    except (EngineError, MergeError, DispatchError) as exc:
        raise ComputeError(f"dose computation failed: {exc}") from exc
    cts = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == CTImageStorage
           and ds.get("FrameOfReferenceUID") == plan.get("FrameOfReferenceUID")]
    del datasets
    notes = [f"beam model {inputs.extra.get('beam_model', '?')}", f"CT calibration {calibration.description}",
             *dose_notes(merged.summary)]
    rd = write_rt_dose(merged, inputs.scoring_grid, ct_slices_sorted(cts)[0], plan, notes=notes,
                       dose_to_water=inputs.dose_to_water, uncommissioned=not inputs.commissioned)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"RD_{plan.SOPInstanceUID}.dcm"
    rd.save_as(path, enforce_file_format=True)
    return ComputeResult(rt_dose_path=path, merged=merged, warnings=inputs.warnings, tallies=tallies)
