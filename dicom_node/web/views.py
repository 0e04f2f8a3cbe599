"""What the pages show, computed from the journal, the vault and the job folder (no HTTP here).

`job_rows` starts from `Journal.list_jobs()` -- the very rows `mcnode jobs --json` and `/api/jobs`
return -- and adds what only the page shows: the patient and plan re-identified through the vault,
seconds per stage from the journal's transitions, and short texts for progress, cost and verdict.
Identity goes into the page and nowhere else: nothing here logs it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from anonymizer.errors import VaultError
from anonymizer.vault import Vault
from dicom_node.intake.jobrecord import TRANSITIONS, JobState
from dicom_node.intake.journal import Job, Journal
from dicom_node.net import uids
from dicom_node.settings import Settings

LOGGER = logging.getLogger(__name__)

RECEIVING, READY, SEALED, RUNNING = JobState.RECEIVING, JobState.READY, JobState.SEALED, JobState.RUNNING
MERGED, SENT, VERIFIED, FAILED = JobState.MERGED, JobState.SENT, JobState.VERIFIED, JobState.FAILED

# What happens between two recorded states, for the timings table.
STAGE_NAMES = {
    (RECEIVING, READY): "receive + assemble",
    (READY, SEALED): "anonymize + seal",
    (SEALED, RUNNING): "start",
    (RUNNING, MERGED): "compute + merge",
    (MERGED, SENT): "send to TPS",
    (SENT, VERIFIED): "second check",
}
# States from which the page offers each action.
CAN_RETRY = (FAILED,)
CAN_RESEND = (MERGED, SENT, VERIFIED)


@dataclass(frozen=True)
class Identity:
    patient_id: str
    patient_name: str
    plan_label: str




class Identities:
    """Patient and plan of a job, for the page only: the patient from the vault, the label from the plan.

    The vault holds the patient module of every job past READY; the plan label is read from the plan
    as received (the anonymized copy carries a dummy label). Before the vault has a record (a job still
    assembling) the plan as received gives both.
    """

    def __init__(self, vault: Vault, journal: Journal) -> None:
        self.vault = vault
        self.journal = journal
        self._cache: dict[str, Identity] = {}
        self._lock = threading.Lock()

    def of(self, job: Job) -> Identity:
        with self._lock:
            if job.id in self._cache:
                return self._cache[job.id]
        plan_path: str | None = job.data.plan
        if not plan_path:
            inst = self.journal.instance(job.plan_uid)
            plan_path = inst.path if inst else None
        patient_id = patient_name = label = ""
        if plan_path:
            try:
                plan = dcmread(plan_path, stop_before_pixels=True,
                               specific_tags=["PatientID", "PatientName", "RTPlanLabel"])
                patient_id, patient_name = str(plan.get("PatientID", "")), str(plan.get("PatientName", ""))
                label = str(plan.get("RTPlanLabel", ""))
            except (OSError, InvalidDicomError):
                pass
        from_vault = False
        try:
            record = self.vault.load(job.id)
            patient_id = record.patient.get("PatientID", patient_id)
            patient_name = record.patient.get("PatientName", patient_name)
            from_vault = True
        except VaultError:
            pass  # no record yet (the job has not been sealed) or none any more
        ident = Identity(patient_id or "?", patient_name.replace("^", " ").strip(), label or "?")
        if from_vault:
            with self._lock:
                self._cache[job.id] = ident
        return ident


def _parse_day(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None


def stage_timings(history: list[tuple[JobState, str | None, float]]) -> list[dict[str, Any]]:
    """Seconds between consecutive transitions, named by what the node does in between."""
    out = []
    for (prev, _r, t0), (state, _r2, t1) in zip(history, history[1:], strict=False):
        out.append({"stage": STAGE_NAMES.get((prev, state), f"{prev} → {state}"), "from": str(prev), "to": str(state),
                    "seconds": round(t1 - t0, 2)})
    return out


def _money(value: Any) -> str:
    return f"${float(value):.4f}" if isinstance(value, int | float) else ""


def decorate(row: dict[str, Any], job: Job, ident: Identity, history: list[tuple[JobState, str | None, float]]
             ) -> dict[str, Any]:
    """A `list_jobs` row plus what the page shows about it."""
    sizing = row.get("sizing") or {}
    summary = row.get("summary") or {}
    # waves (engine.target_uncertainty_percent): each finished wave records the uncertainty reached so far
    waves = [w for w in row.get("waves") or [] if isinstance(w, dict)]
    measured = [w["uncertainty_percent"] for w in waves if isinstance(w.get("uncertainty_percent"), int | float)]
    unc = summary.get("uncertainty_percent")
    if not isinstance(unc, int | float) and measured:
        unc = measured[-1]
    progress = []
    if row.get("shards_total"):
        progress.append(f"shards {row['shards_done']}/{row['shards_total']}")
    if len(waves) > 1 or (waves and row.get("uncertainty_target_met") is not None):
        progress.append(f"wave {len(waves)}")
    if isinstance(unc, int | float):
        met = row.get("uncertainty_target_met")
        progress.append(f"uncertainty {float(unc):.2f} %" + ("" if met is None else
                                                               " (target met)" if met else " (above target)"))
    retry = row.get("retry") or {}
    if isinstance(retry, dict) and isinstance(retry.get("kept_shards"), int) and retry.get("shards"):
        progress.append(f"retry kept {retry['kept_shards']} of {retry['shards']} shards")  # the rest ran again
    rates = row.get("gamma_pass_rates") or {}
    timings = stage_timings(history)
    return {
        **row,
        "patient_id": ident.patient_id, "patient_name": ident.patient_name, "plan_label": ident.plan_label,
        "progress_text": ", ".join(progress),
        "progress_fraction": (row["shards_done"] / row["shards_total"]) if row.get("shards_total") else None,
        "timings": timings,
        "elapsed_s": round(history[-1][2] - history[0][2], 1) if history else None,
        "cost_estimate": _money(sizing.get("predicted_cost")),
        "cost_actual": _money(sizing.get("estimated_cost")),
        "rates_text": ", ".join(f"{k} {float(v):.1f} %" for k, v in rates.items() if v is not None),
        "can_retry": job.state in CAN_RETRY,
        "can_cancel": JobState.CANCELLED in TRANSITIONS[job.state],
        "can_resend": job.state in CAN_RESEND and bool(job.data.rtdose),
        "has_dose": bool(job.data.rtdose) and Path(job.data.rtdose).is_file(),
    }


def job_rows(journal: Journal, identities: Identities, state: str | None = None, day_from: str | None = None,
             day_to: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Rows of the jobs page, newest first, filtered by state and by the day the job was created (UTC)."""
    start, end = _parse_day(day_from), _parse_day(day_to)
    out = []
    for row in reversed(journal.list_jobs()):
        if state and row["state"] != state:
            continue
        created = datetime.strptime(row["created"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        if (start and created < start) or (end and created.date() > end.date()):
            continue
        job = journal.job(row["id"])
        out.append(decorate(row, job, identities.of(job), journal.history(job.id)))
        if len(out) >= limit:
            break
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def manifest(settings: Settings, job: Job) -> dict[str, Any]:
    """What left the building for this job, and what it was made from.

    ``sealed``: the files sealed into the bundle (the engine's inputs; none of them DICOM), as recorded
    when it was sealed; ``files``: the de-identified DICOM the inputs were made from, which stay on this
    node (jobs sealed before the bundle left DICOM out have no ``sealed`` list: theirs went too)."""
    folder = settings.node.data_dir / "jobs" / job.id
    anon = folder / "anonymized"
    files = []
    for name in job.data.anonymized:
        path = anon / name
        entry: dict[str, Any] = {"name": name, "bytes": path.stat().st_size if path.is_file() else None}
        try:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["SOPClassUID", "PatientID", "PatientName", "PatientIdentityRemoved",
                                        "DeidentificationMethod"])
            entry.update(kind=uids.SHORT_NAMES.get(str(ds.get("SOPClassUID", "")), "?"),
                         patient_id=str(ds.get("PatientID", "")), patient_name=str(ds.get("PatientName", "")),
                         identity_removed=str(ds.get("PatientIdentityRemoved", "")),
                         method=str(ds.get("DeidentificationMethod", "")))
        except (OSError, InvalidDicomError):
            entry.update(kind="(missing)")
        files.append(entry)
    bundle = folder / "bundle.sealed"
    kinds: dict[str, int] = {}
    for f in files:
        kinds[f.get("kind", "?")] = kinds.get(f.get("kind", "?"), 0) + 1
    sealed = [{"name": str(n), "bytes": int(b)} for n, b in job.data.public.bundle_files or []]
    return {"files": files, "kinds": kinds, "sealed": sealed,
            "bundle_bytes": bundle.stat().st_size if bundle.is_file() else None,
            "backend": settings.cloud.backend}


def job_detail(settings: Settings, journal: Journal, identities: Identities, job_id: str) -> dict[str, Any]:
    job = journal.job(job_id)
    row = next((r for r in journal.list_jobs() if r["id"] == job_id), None) or {"id": job_id}
    history = journal.history(job_id)
    view = decorate(row, job, identities.of(job), history)
    public, check, report = job.data.public, job.data.secondcheck or {}, job.data.report
    warnings = list(public.warnings or [])
    warnings += [f"second check: {w}" for w in check.get("warnings", [])]
    view.update(
        transitions=[{"state": str(s), "reason": r or "", "at": _iso(t)} for s, r, t in history],
        warnings=warnings,
        manifest=manifest(settings, job),
        has_report=report is not None and Path(report.html).is_file(),
        has_report_pdf=report is not None and Path(report.pdf).is_file(),
        secondcheck_reasons=check.get("reasons", []),
        sent_to=job.data.sent_to,
        summary=public.summary or {},
        sizing=public.sizing or {},
    )
    return view
