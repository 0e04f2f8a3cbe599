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
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import RTDoseStorage

from cloud.engines.base import UNCOMMISSIONED
from dicom_node.errors import NodeError, SendError
from dicom_node.intake.jobrecord import JobData, JobState, PublicData, Report
from dicom_node.intake.journal import Instance, Job, Journal
from dicom_node.jobs.queue_worker import QueueWorker
from dicom_node.net.scp import Received, uid_ref
from dicom_node.net.scu import send_paths
from dicom_node.qa.compare import (
    Comparison,
    ComparisonError,
    Volume,
    compare,
    ct_from_datasets,
    dose_from_rtdose,
    plan_dose,
    structures_from_rtstruct,
)
from dicom_node.qa.report import encapsulated_pdf, write_report
from dicom_node.settings import SecondCheckSettings, Settings, parse_criterion

LOGGER = logging.getLogger(__name__)

STEP = "secondcheck"
BEAM_SUMMATIONS = ("BEAM", "BEAM_SESSION")
RETRY_SCAN_SECONDS = 2.0


def plan_beam_numbers(plan: Dataset) -> list[int]:
    """The treatment beams of the plan's first fraction group (ReferencedBeamSequence), in order."""
    for fg in plan.get("FractionGroupSequence", []):
        return [int(b.ReferencedBeamNumber) for b in fg.get("ReferencedBeamSequence", [])
                if "ReferencedBeamNumber" in b]
    return []


def referenced_beam_numbers(dose: Dataset) -> list[int]:
    """The beams an RT Dose names (ReferencedRTPlanSequence > ReferencedFractionGroupSequence > beams)."""
    out = []
    for ref in dose.get("ReferencedRTPlanSequence", []):
        for fg in ref.get("ReferencedFractionGroupSequence", []):
            out += [int(b.ReferencedBeamNumber) for b in fg.get("ReferencedBeamSequence", [])
                    if "ReferencedBeamNumber" in b]
    return out


def report_dir(settings: Settings) -> Path:
    return settings.secondcheck.report_dir or settings.node.data_dir / "reports"


def decide(numbers: dict[str, Any], policy: SecondCheckSettings,
           mc_uncertainty_percent: float | None = None, uncertainty_source: str = "") -> dict[str, Any]:
    """The verdict from the numbers and the policy; adds per-structure checks to numbers' rows.

    "inconclusive" when the MC dose's own statistical uncertainty is unknown or above
    policy.max_mc_uncertainty_percent: its noise alone would fail tight criteria whatever the agreement,
    so neither pass nor fail would mean anything. The disagreements found are still listed.
    """
    reasons: list[str] = []
    verdict_keys = [f"{d:g}%/{r:g}mm" for d, r in (parse_criterion(c) for c in policy.criteria)]
    for key in verdict_keys:
        g = numbers["gamma"][key]
        rate = g.get("pass_rate_percent")
        if rate is None:
            reasons.append(f"gamma {key}: no voxel above the low-dose threshold inside the body")
        elif rate < policy.min_pass_rate_percent:
            reasons.append(f"gamma {key} pass rate {rate:.2f} % < {policy.min_pass_rate_percent:g} % "
                           f"({g['evaluated_voxels'] - g['passed_voxels']} of {g['evaluated_voxels']} voxels fail)")
    shift = numbers.get("shift")
    if policy.max_shift_mm and shift and shift["magnitude_mm"] > policy.max_shift_mm:
        reasons.append(f"the TPS dose is displaced from the MC dose by {shift['magnitude_mm']:.1f} mm "
                       f"(x {shift['x_mm']:+.1f}, y {shift['y_mm']:+.1f}, z {shift['z_mm']:+.1f} mm; dose-weighted "
                       f"centres inside the body) > {policy.max_shift_mm:g} mm")
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
    if reasons:
        reasons += [r for r in explain(numbers) if not any(r[:30] in x for x in reasons)]
    verdict = "fail" if reasons else "pass"
    limit = policy.max_mc_uncertainty_percent
    noise = None
    if mc_uncertainty_percent is None:
        noise = ("MC statistical uncertainty unknown (a single shard has no spread to measure it): "
                 "the MC noise could decide the result")
    elif mc_uncertainty_percent > limit:
        noise = (f"MC statistical uncertainty {mc_uncertainty_percent:.2f} % ({uncertainty_source}) is above "
                 f"the {limit:g} % the check needs: run the MC with more primaries")
    if noise is not None:
        verdict = "inconclusive"
        reasons = [noise, *reasons]
    return {"verdict": verdict, "reasons": reasons, "verdict_criteria": verdict_keys,
            "min_pass_rate_percent": policy.min_pass_rate_percent,
            "mc_uncertainty_percent": None if mc_uncertainty_percent is None else round(mc_uncertainty_percent, 3),
            "mc_uncertainty_source": uncertainty_source, "max_mc_uncertainty_percent": limit}


def explain(numbers: dict[str, Any]) -> list[str]:
    """What the disagreement looks like, in the terms a physicist checks first: scale or shift."""
    dd = numbers["dose_difference"]
    out = []
    ratio = dd.get("high_dose_ratio_percent")
    if ratio is not None and abs(ratio) >= 1.0:
        out.append(f"the TPS dose is {abs(ratio):.1f} % {'higher' if ratio > 0 else 'lower'} than the MC dose "
                   "in the high-dose region (median TPS/MC over voxels >= 50 % of the normalisation)")
    shift = numbers.get("shift")
    if shift and shift.get("magnitude_mm", 0) >= 1.0:
        out.append(f"the TPS dose is displaced from the MC dose by about {shift['magnitude_mm']:.1f} mm "
                   f"(x {shift['x_mm']:+.1f}, y {shift['y_mm']:+.1f}, z {shift['z_mm']:+.1f} mm; "
                   "centre of the high-dose region)")
    return out


def prescription_gy(plan: Dataset) -> float | None:
    """The largest target prescription dose of the plan's DoseReferenceSequence (Gy), if any."""
    doses = [float(r.TargetPrescriptionDose) for r in plan.get("DoseReferenceSequence", [])
             if str(r.get("DoseReferenceType", "")).upper() == "TARGET" and r.get("TargetPrescriptionDose")]
    return max(doses) if doses else None


def mc_uncertainty(summary: dict[str, Any] | None) -> tuple[float | None, str]:
    """The MC dose's relative statistical uncertainty (percent) from the merge summary, and what it is.

    Newer summaries carry the pooled relative SE over the body's voxels >= 50 % of the maximum
    ("uncertainty_percent"); older ones the mean relative SE over all voxels >= 50 % of the maximum.
    """
    summary = summary or {}
    if summary.get("uncertainty_percent") is not None:
        return float(summary["uncertainty_percent"]), "pooled relative SE, body voxels >= 50 % of max"
    if summary.get("mean_relative_uncertainty_high_dose") is not None:
        return (100.0 * float(summary["mean_relative_uncertainty_high_dose"]),
                "mean relative SE, voxels >= 50 % of max")
    return None, "not measured"


def run_comparison(mc_ds: Any, tps_doses: Any, policy: SecondCheckSettings, rtstruct: Any = None,
                   fractions: int | None = None, *, ct: Volume | None = None, plan: Any = None,
                   summary: dict[str, Any] | None = None) -> tuple[Comparison, dict[str, Any]]:
    """Compare the MC RT Dose with the TPS RT Dose(s) under the policy; the result is what the journal stores.

    `tps_doses`: one RT Dose of the plan, or the per-beam RT Doses of every beam (summed).
    """
    tps_list = list(tps_doses) if isinstance(tps_doses, list | tuple) else [tps_doses]
    warnings = []
    marks = f"{mc_ds.get('SeriesDescription', '')} {mc_ds.get('DoseComment', '')}"
    if UNCOMMISSIONED in marks:  # the MC dose says so itself; the report says it first
        warnings.append(f"{UNCOMMISSIONED}: the MC dose was computed with a beam model nobody commissioned "
                        "(engine.beam_models maps the machine to the generic model); its absolute dose is not "
                        "calibrated")
    for_mc = mc_ds.get("FrameOfReferenceUID")
    for tps_ds in tps_list:
        for_tps = tps_ds.get("FrameOfReferenceUID")
        if for_mc and for_tps and for_mc != for_tps:
            raise ComparisonError("the TPS dose and the MC dose are in different frames of reference")
    type_mc, type_tps = str(mc_ds.get("DoseType", "")), str(tps_list[0].get("DoseType", ""))
    if type_mc and type_tps and type_mc != type_tps:
        warnings.append(f"DoseType differs: TPS {type_tps}, MC {type_mc} (engine.rbe sets the MC's)")
    mc = dose_from_rtdose(mc_ds, fractions)
    tps = plan_dose(tps_list, fractions)
    criteria = [parse_criterion(c) for c in (*policy.criteria, *policy.report_criteria)]
    criteria = list(dict.fromkeys(criteria))
    structures = structures_from_rtstruct(rtstruct) if rtstruct is not None else []
    rx = None
    if policy.normalisation == "prescription":
        rx = prescription_gy(plan) if plan is not None else None
        if rx is None:
            warnings.append("normalisation = prescription, but the plan has no target prescription dose "
                            "(DoseReferenceSequence): normalised to the TPS maximum inside the body")
    cmp = compare(mc, tps, criteria, low_dose_percent=policy.low_dose_threshold_percent,
                  max_gamma=policy.max_gamma, resample_direction=policy.resample, structures=structures,
                  ct=ct, prescription_gy=rx)
    numbers = cmp.numbers
    if len(tps_list) > 1:
        numbers["method"]["tps_dose"] = f"sum of {len(tps_list)} per-beam RT Doses (DoseSummationType BEAM)"
    cov = numbers["coverage"]
    if cov["body_voxels_outside_other_grid"]:
        warnings.append(f"{cov['body_voxels_outside_other_grid']} voxels inside the body lie outside one of the "
                        "two dose grids and are not compared")
    if "body" in numbers["method"] and numbers["method"]["body"].startswith("whole grid"):
        warnings.append("no body contour and no CT: MC dose in air may be compared")
    unc, source = mc_uncertainty(summary)
    result = {**decide(numbers, policy, unc, source), **numbers, "warnings": warnings}
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
        if received.instance.sop_class_uid != RTDoseStorage:
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

    def _tps_doses(self, job: Job) -> list[Instance] | None:
        """The TPS RT Dose(s) to compare with: the newest plan dose, or one newest per-beam dose per beam.

        Per-beam doses (DoseSummationType BEAM or BEAM_SESSION) are summed once every beam of the plan's
        fraction group has one; until then None (the job waits for the rest; each arrival queues it again).
        Our own MC dose and doses of another patient never count.
        """
        plan = self.journal.instance(job.plan_uid)
        mc_uid = None
        if job.data.rtdose:
            mc_uid = str(dcmread(job.data.rtdose, stop_before_pixels=True).SOPInstanceUID)
        doses = [d for d in self.journal.referencing(job.plan_uid, "plan")
                 if d.sop_class_uid == RTDoseStorage and d.sop_instance_uid != mc_uid
                 and (plan is None or d.patient_key == plan.patient_key)]
        if not doses:
            return None
        headers = {d.sop_instance_uid: dcmread(d.path, stop_before_pixels=True) for d in doses}
        newest = doses[-1]
        if str(headers[newest.sop_instance_uid].get("DoseSummationType", "PLAN")).upper() not in BEAM_SUMMATIONS:
            return [newest]
        wanted = plan_beam_numbers(dcmread(job.data.plan, stop_before_pixels=True))
        per_beam: dict[Any, Instance] = {}
        for d in doses:
            ds = headers[d.sop_instance_uid]
            if str(ds.get("DoseSummationType", "")).upper() not in BEAM_SUMMATIONS:
                continue
            numbers = referenced_beam_numbers(ds)
            key: Any = numbers[0] if len(numbers) == 1 else d.sop_instance_uid
            per_beam[key] = d  # a later export of the same beam replaces the earlier one
        if wanted and all(isinstance(k, int) for k in per_beam):
            missing = [b for b in wanted if b not in per_beam]
            if missing:
                LOGGER.info("job %s: %d of %d per-beam TPS doses here; waiting for beams %s", job.id,
                            len(wanted) - len(missing), len(wanted), ", ".join(map(str, missing)))
                return None
            return [per_beam[b] for b in wanted]
        if len(per_beam) < max(len(wanted), 1):
            LOGGER.info("job %s: %d of %d per-beam TPS doses here; waiting", job.id, len(per_beam), len(wanted))
            return None
        return sorted(per_beam.values(), key=lambda d: d.sop_instance_uid)[-max(len(wanted), 1):]

    def process(self, job_id: str) -> Job | None:
        job = self.journal.job(job_id)
        if not self.policy.enabled:
            return None
        if job.state == JobState.FAILED and job.data.failed_step != STEP:
            return None
        if job.state not in (JobState.SENT, JobState.VERIFIED, JobState.FAILED):
            return None  # the MC dose is not delivered yet; the outbox submits the job at SENT
        doses = self._tps_doses(job)
        if not doses:
            return None
        dose_key = ",".join(d.sop_instance_uid for d in doses)
        if job.state != JobState.SENT and job.data.tps_dose_uid == dose_key:
            return None
        LOGGER.info("job %s: second check against %s", job.id,
                    f"TPS dose {uid_ref(doses[0].sop_instance_uid)}" if len(doses) == 1
                    else f"the sum of {len(doses)} per-beam TPS doses")
        start, start_cpu = time.perf_counter(), time.thread_time()  # the check runs on this thread only
        try:
            cmp, result, header, ct, plan = self._compare(job, doses)
            folder = report_dir(self.settings) / job.id
            html, pdf = write_report(folder, cmp, result, header, ct=ct, plan=plan)
        except (ComparisonError, InvalidDicomError, AttributeError, KeyError, ValueError, OSError) as exc:
            reason = f"second check: {exc}"
            LOGGER.warning("job %s: %s", job.id, reason)
            return self.journal.transition(job.id, JobState.FAILED, reason=reason, data=JobData(
                failed_in=JobState.SENT, failed_step=STEP, tps_dose_uid=dose_key))
        seconds = round(time.perf_counter() - start, 2)
        cpu_seconds = round(time.thread_time() - start_cpu, 2)
        result["seconds"]["total"] = seconds
        result["seconds"]["cpu"] = cpu_seconds
        public = PublicData(verdict=result["verdict"],
                            gamma_pass_rates={k: g["pass_rate_percent"] for k, g in result["gamma"].items()},
                            secondcheck_seconds=seconds)
        verified = self.journal.transition(job.id, JobState.VERIFIED, reason=None if result["verdict"] == "pass"
                                           else "; ".join(result["reasons"]), data=JobData(
            tps_dose_uid=dose_key, secondcheck=result, report=Report(html=str(html), pdf=str(pdf)),
            public=public), clear=("failed_step",))
        LOGGER.info("job %s: second check %s in %.1f s (%.1f s CPU)", job.id, result["verdict"], seconds, cpu_seconds)
        self._send_report(verified, pdf, plan)
        return verified

    def _compare(self, job: Job, doses: list[Instance]) -> tuple[Comparison, dict[str, Any], dict[str, str],
                                                                 Volume | None, Any]:
        mc_ds = dcmread(job.data.rtdose)
        tps_list = [dcmread(d.path) for d in doses]
        plan = dcmread(job.data.plan, stop_before_pixels=True)
        fractions = None
        for fg in plan.get("FractionGroupSequence", []):
            fractions = int(fg.get("NumberOfFractionsPlanned", 0) or 0) or None
            break
        rtstruct = dcmread(job.data.structure_set) if job.data.structure_set else None
        ct = ct_from_datasets([dcmread(p) for p in job.data.ct]) if job.data.ct else None
        cmp, result = run_comparison(mc_ds, tps_list, self.policy, rtstruct, fractions, ct=ct, plan=plan,
                                     summary=job.data.public.summary)
        first = tps_list[0]
        tps_text = (f"{first.get('Manufacturer', '')} {first.get('SeriesDescription', '')} "
                    f"({first.SOPInstanceUID}), {first.get('DoseType', '')}")
        if len(tps_list) > 1:
            tps_text = (f"sum of {len(tps_list)} per-beam RT Doses: {first.get('Manufacturer', '')}, "
                        + ", ".join(str(d.SOPInstanceUID) for d in tps_list))
        header = {
            "Patient ID": str(plan.get("PatientID", "")),
            "Plan": f"{plan.get('RTPlanLabel', '')} ({plan.SOPInstanceUID})",
            "Job": job.id,
            "TPS dose": tps_text,
            "MC dose": f"{mc_ds.get('DoseComment', '')} ({mc_ds.SOPInstanceUID}), {mc_ds.get('DoseType', '')}",
            "MC inputs": str(mc_ds.get("ImageComments", "")),
            "Compared": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "Policy": f"{', '.join(result['verdict_criteria'])} >= {self.policy.min_pass_rate_percent:g} %; "
                      f"MC uncertainty <= {self.policy.max_mc_uncertainty_percent:g} %"
                      + (f"; structure tolerances {self.policy.structure_tolerances} on "
                         f"{', '.join(self.policy.structure_metrics)}" if self.policy.structure_tolerances else ""),
        }
        return cmp, result, header, ct, plan

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

