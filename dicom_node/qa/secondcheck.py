"""The automatic second check: match a TPS RT Dose to its job, compare, decide, record, report.

Matching: a TPS RT Dose names its plan in ReferencedRTPlanSequence (journaled by the SCP as refs of
kind "plan"). It may arrive with the plan or at any time later. The comparison runs once the MC dose
has been delivered (SENT): either when the outbox records SENT (the TPS dose is already here) or
when the TPS dose arrives (the job is already SENT). A job then reaches VERIFIED with verdict
"pass" or "fail", or FAILED with the reason the doses cannot be compared (units, grids apart, ...).
A newer TPS dose for the same plan is compared again (VERIFIED → VERIFIED, or FAILED → VERIFIED).

The work runs on its own thread fed by a queue: gamma takes seconds to minutes and must hold up
neither the SCP, the assembler nor the outbox. Logs name job ids only.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from cloud.engines.base import UNCOMMISSIONED
from dicom_node.errors import NodeError, SendError
from dicom_node.intake.jobrecord import JobData, JobState, PublicData, Report
from dicom_node.intake.journal import Instance, Job, Journal
from dicom_node.jobs.queue_worker import QueueWorker
from dicom_node.net import uids
from dicom_node.net.scp import Received, uid_ref
from dicom_node.net.scu import send_paths
from dicom_node.qa.compare import (
    Comparison,
    ComparisonError,
    compare,
    ct_from_datasets,
    dose_from_rtdose,
    structures_from_rtstruct,
)
from dicom_node.qa.report import encapsulated_pdf, write_report
from dicom_node.settings import SecondCheckSettings, Settings, parse_criterion

LOGGER = logging.getLogger(__name__)

STEP = "secondcheck"
RETRY_SCAN_SECONDS = 2.0


def report_dir(settings: Settings) -> Path:
    return settings.secondcheck.report_dir or settings.node.data_dir / "reports"


def decide(numbers: dict[str, Any], policy: SecondCheckSettings) -> dict[str, Any]:
    """The verdict from the numbers and the policy; adds per-structure checks to numbers' rows."""
    reasons: list[str] = []
    verdict_keys = [f"{d:g}%/{r:g}mm" for d, r in (parse_criterion(c) for c in policy.criteria)]
    for key in verdict_keys:
        rate = numbers["gamma"][key].get("pass_rate_percent")
        if rate is None:
            reasons.append(f"gamma {key}: no voxel above the low-dose threshold")
        elif rate < policy.min_pass_rate_percent:
            reasons.append(f"gamma {key} pass rate {rate:.2f} % < {policy.min_pass_rate_percent:g} %")
    tolerances = policy.structure_tolerances
    for row in numbers["structures"]:
        tol = tolerances.get(row["name"], tolerances.get("*"))
        if tol is None:
            continue
        checks = {}
        for metric in policy.structure_metrics:
            mc, tps = row["mc"][metric], row["tps"][metric]
            if mc is None or tps is None:
                continue
            diff = 100.0 * (tps - mc) / mc if mc else (0.0 if tps == mc else float("inf"))
            ok = abs(diff) <= tol
            checks[metric] = f"{'ok' if ok else 'FAIL'} (|{diff:.2f}| {'<=' if ok else '>'} {tol:g} %)"
            if not ok:
                reasons.append(f"{row['name']} {metric}: TPS differs from MC by {diff:+.2f} % (tolerance {tol:g} %)")
        row["checks"] = checks
    return {"verdict": "fail" if reasons else "pass", "reasons": reasons, "verdict_criteria": verdict_keys,
            "min_pass_rate_percent": policy.min_pass_rate_percent}


def run_comparison(mc_ds: Any, tps_ds: Any, policy: SecondCheckSettings, rtstruct: Any = None,
                   fractions: int | None = None) -> tuple[Comparison, dict[str, Any]]:
    """Compare two RT Dose data sets under the policy; the result dict is what the journal stores."""
    warnings = []
    marks = f"{mc_ds.get('SeriesDescription', '')} {mc_ds.get('DoseComment', '')}"
    if UNCOMMISSIONED in marks:  # the MC dose says so itself; the report says it first
        warnings.append(f"{UNCOMMISSIONED}: the MC dose was computed with a beam model nobody commissioned "
                        "(engine.beam_models maps the machine to the generic model); its absolute dose is not "
                        "calibrated")
    for_mc, for_tps = mc_ds.get("FrameOfReferenceUID"), tps_ds.get("FrameOfReferenceUID")
    if for_mc and for_tps and for_mc != for_tps:
        raise ComparisonError("the TPS dose and the MC dose are in different frames of reference")
    type_mc, type_tps = str(mc_ds.get("DoseType", "")), str(tps_ds.get("DoseType", ""))
    if type_mc and type_tps and type_mc != type_tps:
        warnings.append(f"DoseType differs: TPS {type_tps}, MC {type_mc} (engine.rbe sets the MC's)")
    mc = dose_from_rtdose(mc_ds, fractions)
    tps = dose_from_rtdose(tps_ds, fractions)
    criteria = [parse_criterion(c) for c in (*policy.criteria, *policy.report_criteria)]
    criteria = list(dict.fromkeys(criteria))
    structures = structures_from_rtstruct(rtstruct) if rtstruct is not None else []
    cmp = compare(mc, tps, criteria, low_dose_percent=policy.low_dose_threshold_percent,
                  max_gamma=policy.max_gamma, resample_direction=policy.resample, structures=structures)
    numbers = cmp.numbers
    if numbers["coverage"]["threshold_voxels_outside_other_grid"]:
        warnings.append(f"{numbers['coverage']['threshold_voxels_outside_other_grid']} voxels above the threshold "
                        "lie outside the other dose's grid and count as 0 Gy there")
    result = {**decide(numbers, policy), **numbers, "warnings": warnings}
    return cmp, result


class SecondCheck:
    def __init__(self, settings: Settings, journal: Journal) -> None:
        self.settings = settings
        self.policy = settings.secondcheck
        self.journal = journal
        self._worker = QueueWorker("secondcheck", lambda job_id: self.process(str(job_id)),
                                   on_idle=self._pick_up_retries, idle_seconds=RETRY_SCAN_SECONDS)

    # --- life cycle and triggers ----------------------------------------------------------

    def start(self) -> None:
        self._worker.start()
        for job in self.journal.jobs_in(JobState.SENT, JobState.FAILED):
            self._worker.put(job.id)

    def stop(self) -> None:
        self._worker.stop(timeout=30)

    def submit(self, job: Job) -> None:
        """The outbox recorded SENT: compare if the TPS dose is already here."""
        self._worker.put(job.id)

    def notify(self, received: Received) -> None:
        """An instance was stored; a TPS RT Dose queues its plan's job."""
        if received.instance.sop_class_uid != uids.RT_DOSE:
            return
        for kind, plan_uid in received.refs:
            if kind == "plan":
                job = self.journal.job_for_plan(plan_uid)
                if job is not None:
                    self._worker.put(job.id)

    def wait_idle(self, timeout: float = 300) -> bool:
        return self._worker.wait_idle(timeout)

    def _pick_up_retries(self) -> None:
        """Second checks put back to SENT from outside (`mcnode retry`) are taken up here."""
        for job in self.journal.jobs_in(JobState.SENT):
            if job.data.failed_step == STEP:
                self._worker.put(job.id)

    # --- one job ---------------------------------------------------------------------------

    def _tps_dose(self, job: Job) -> Instance | None:
        """The newest RT Dose from the TPS that names this plan (not our own MC dose), same patient."""
        plan = self.journal.instance(job.plan_uid)
        mc_uid = None
        if job.data.rtdose:
            mc_uid = str(dcmread(job.data.rtdose, stop_before_pixels=True).SOPInstanceUID)
        doses = [d for d in self.journal.referencing(job.plan_uid, "plan")
                 if d.sop_class_uid == uids.RT_DOSE and d.sop_instance_uid != mc_uid
                 and (plan is None or d.patient_key == plan.patient_key)]
        return doses[-1] if doses else None

    def process(self, job_id: str) -> Job | None:
        job = self.journal.job(job_id)
        if not self.policy.enabled:
            return None
        if job.state == JobState.FAILED and job.data.failed_step != STEP:
            return None
        if job.state not in (JobState.SENT, JobState.VERIFIED, JobState.FAILED):
            return None  # the MC dose is not delivered yet; the outbox submits the job at SENT
        dose = self._tps_dose(job)
        if dose is None or (job.state != JobState.SENT and job.data.tps_dose_uid == dose.sop_instance_uid):
            return None
        LOGGER.info("job %s: second check against TPS dose %s", job.id, uid_ref(dose.sop_instance_uid))
        start = time.perf_counter()
        try:
            cmp, result, header, ct, iso, plan = self._compare(job, dose)
            folder = report_dir(self.settings) / job.id
            html, pdf = write_report(folder, cmp, result, header, ct=ct, isocenter_mm=iso)
        except (ComparisonError, InvalidDicomError, AttributeError, KeyError, ValueError, OSError) as exc:
            reason = f"second check: {exc}"
            LOGGER.warning("job %s: %s", job.id, reason)
            return self.journal.transition(job.id, JobState.FAILED, reason=reason, data=JobData(
                failed_in=JobState.SENT, failed_step=STEP, tps_dose_uid=dose.sop_instance_uid))
        seconds = round(time.perf_counter() - start, 2)
        public = PublicData(verdict=result["verdict"],
                            gamma_pass_rates={k: g["pass_rate_percent"] for k, g in result["gamma"].items()},
                            secondcheck_seconds=seconds)
        verified = self.journal.transition(job.id, JobState.VERIFIED, reason=None if result["verdict"] == "pass"
                                           else "; ".join(result["reasons"]), data=JobData(
            tps_dose_uid=dose.sop_instance_uid, secondcheck=result, report=Report(html=str(html), pdf=str(pdf)),
            public=public), clear=("failed_step",))
        LOGGER.info("job %s: second check %s in %.1f s", job.id, result["verdict"], seconds)
        self._send_report(verified, pdf, plan)
        return verified

    def _compare(self, job: Job, dose: Instance) -> tuple[Comparison, dict[str, Any], dict[str, str], Any,
                                                          tuple[float, float, float] | None, Any]:
        mc_ds = dcmread(job.data.rtdose)
        tps_ds = dcmread(dose.path)
        plan = dcmread(job.data.plan, stop_before_pixels=True)
        fractions = None
        for fg in plan.get("FractionGroupSequence", []):
            fractions = int(fg.get("NumberOfFractionsPlanned", 0) or 0) or None
            break
        rtstruct = dcmread(job.data.structure_set) if job.data.structure_set else None
        cmp, result = run_comparison(mc_ds, tps_ds, self.policy, rtstruct, fractions)
        ct = ct_from_datasets([dcmread(p) for p in job.data.ct]) if job.data.ct else None
        iso = None
        beams = plan.get("IonBeamSequence") or plan.get("BeamSequence") or []
        if beams:
            cps = beams[0].get("IonControlPointSequence") or beams[0].get("ControlPointSequence") or []
            if cps and "IsocenterPosition" in cps[0]:
                x, y, z = (float(v) for v in cps[0].IsocenterPosition)
                iso = (x, y, z)
        header = {
            "Patient ID": str(plan.get("PatientID", "")),
            "Plan": f"{plan.get('RTPlanLabel', '')} ({plan.SOPInstanceUID})",
            "Job": job.id,
            "TPS dose": f"{tps_ds.get('Manufacturer', '')} {tps_ds.get('SeriesDescription', '')} "
                        f"({tps_ds.SOPInstanceUID}), {tps_ds.get('DoseType', '')}",
            "MC dose": f"{mc_ds.get('DoseComment', '')} ({mc_ds.SOPInstanceUID}), {mc_ds.get('DoseType', '')}",
            "MC inputs": str(mc_ds.get("ImageComments", "")),
            "Compared": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "Policy": f"{', '.join(result['verdict_criteria'])} >= {self.policy.min_pass_rate_percent:g} %"
                      + (f"; structure tolerances {self.policy.structure_tolerances} on "
                         f"{', '.join(self.policy.structure_metrics)}" if self.policy.structure_tolerances else ""),
        }
        return cmp, result, header, ct, iso, plan

    def _send_report(self, job: Job, pdf: Path, plan: Any) -> None:
        policy = self.policy
        if not policy.report_ae_title:
            return
        doc = encapsulated_pdf(pdf.read_bytes(), plan)
        path = pdf.with_suffix(".dcm")
        doc.save_as(path, enforce_file_format=True)
        try:
            failures = send_paths([path], policy.report_host, policy.report_port, policy.report_ae_title,
                                  self.settings.node.ae_title)
        except (SendError, NodeError) as exc:
            failures = [(path, str(exc))]
        outcome = (f"sent to {policy.report_ae_title}@{policy.report_host}:{policy.report_port}" if not failures
                   else f"not sent: {failures[0][1]}")
        LOGGER.info("job %s: report PDF %s", job.id, outcome)
        self.journal.update_job_data(job.id, JobData(public=PublicData(report_pdf=outcome)))

