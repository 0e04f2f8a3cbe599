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

from cloud.dispatch import split_primaries
from cloud.engines import engine_name_for, get_engine
from cloud.engines.base import Tally
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
        cts = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == uids.CT_IMAGE]
        calibration = choose_ct_calibration(cts, settings.ct_calibrations)
        with tempfile.TemporaryDirectory(prefix="mcnode-compute-") as tmp:
            inputs = engine.prepare(datasets, Path(tmp) / "inputs", beam_models=settings.beam_models,
                                    ct_calibration=calibration.for_engine())
            for warning in inputs.warnings:
                LOGGER.warning("%s", warning)
            tallies = []
            for i, n in enumerate(counts):
                tally = engine.run_shard(inputs, n, seed + i, settings.threads)
                LOGGER.info("shard %d/%d: %d primaries in %.1f s", i + 1, shards, n, tally.wall_s)
                tallies.append(tally)
        rbe = settings.rbe and engine.name == "mcsquare"  # RBE 1.1 is for protons only
        merged = merge(tallies, inputs.protons_per_fraction, inputs.fractions, rbe,
                       expected_shards=shards, expected_primaries=primaries)
    except UnsupportedPlan as exc:
        raise PlanRejected(str(exc)) from exc
    except (EngineError, MergeError, DispatchError) as exc:
        raise ComputeError(f"dose computation failed: {exc}") from exc
    cts = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == uids.CT_IMAGE
           and ds.get("FrameOfReferenceUID") == plan.get("FrameOfReferenceUID")]
    rd = write_rt_dose(merged, cts, plan, notes=[f"beam model {inputs.extra.get('beam_model', '?')}",
                                                 f"CT calibration {calibration.description}"],
                       uncommissioned=not inputs.commissioned)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"RD_{plan.SOPInstanceUID}.dcm"
    rd.save_as(path, enforce_file_format=True)
    return ComputeResult(rt_dose_path=path, merged=merged, warnings=inputs.warnings, tallies=tallies)
