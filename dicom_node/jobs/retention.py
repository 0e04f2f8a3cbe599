"""Retention: what a job used is removed `retention.days` after the job ended.

Ended means SENT, VERIFIED or REJECTED; nothing of a job in any other state (FAILED included: it
may be retried) is touched. For an ended job past retention this removes its received originals
(spool files and their journal rows) unless another job still uses them, its job folder, its
second-check reports and its vault entry (overwritten, then unlinked). The job's journal rows stay,
marked `purged`, so `mcnode jobs` keeps the history.

Received instances that no job uses (a CT series whose plan never came, a TPS dose of a plan never
received) are removed too once they are `retention.days` old: nothing else would ever remove them.

`mcnode purge -c FILE [--dry-run]` runs it once; the serving node runs it every
`retention.check_every_minutes`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom.uid import RTDoseStorage

from anonymizer.vault import Vault
from dicom_node.intake.jobrecord import JobData, PublicData
from dicom_node.intake.journal import FINAL_STATES, Job, Journal
from dicom_node.settings import Settings, read_site_key

LOGGER = logging.getLogger(__name__)
DAY_SECONDS = 86400.0


@dataclass
class Purged:
    """What purging one job removes (or would remove, in a dry run)."""

    job_id: str
    state: str
    ended: str
    files: list[Path] = field(default_factory=list)       # received originals
    folders: list[Path] = field(default_factory=list)     # job folder, reports
    vault: bool = False
    instance_uids: list[str] = field(default_factory=list)
    bytes: int = 0
    orphans: bool = False  # received instances no job uses, not a job

    def add_files(self, paths: list[str]) -> None:
        """Received files to remove: those still there, with their size."""
        for path in paths:
            file = Path(path)
            if file.exists():
                self.files.append(file)
                self.bytes += file.stat().st_size

    def describe(self) -> str:
        if self.orphans:
            return (f"{len(self.files)} received file(s) no job uses, the newest received {self.ended}; "
                    f"{self.bytes / 1e6:.1f} MB")
        return (f"job {self.job_id} ({self.state}, ended {self.ended}): {len(self.files)} received file(s), "
                f"{len(self.folders)} folder(s){', vault entry' if self.vault else ''}; "
                f"{self.bytes / 1e6:.1f} MB")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _used_files(job: Job) -> set[str]:
    return {p for p in (job.data.plan, job.data.structure_set, *job.data.ct) if p}


def plan_purge(settings: Settings, journal: Journal, now: float | None = None) -> list[Purged]:
    """The ended jobs past retention and what removing each of them takes."""
    days = settings.retention.days
    if days <= 0:
        return []
    now = time.time() if now is None else now
    cutoff = now - days * DAY_SECONDS
    jobs = journal.all_jobs()
    expired = [j for j in jobs if j.state in FINAL_STATES and j.updated < cutoff and not j.data.public.purged]
    expired_ids = {j.id for j in expired}
    kept = [j for j in jobs if j.id not in expired_ids and not j.data.public.purged]
    kept_files = set().union(*(_used_files(j) for j in kept)) if kept else set()
    kept_plans = {j.plan_uid for j in kept}
    data_dir = settings.node.data_dir
    reports = settings.secondcheck.report_dir or data_dir / "reports"
    vault_dir = data_dir / "vault"
    out: list[Purged] = []
    for job in expired:
        item = Purged(job.id, str(job.state), datetime.fromtimestamp(job.updated, UTC).strftime("%Y-%m-%d %H:%M"))
        files = _used_files(job)
        if job.plan_uid not in kept_plans:  # the plan (also when refused before assembly) and the
            plan = journal.instance(job.plan_uid)  # TPS's own doses of it (second check) go with it
            files |= {plan.path} if plan is not None else set()
            files |= {d.path for d in journal.referencing(job.plan_uid, "plan") if d.sop_class_uid == RTDoseStorage}
        item.add_files(sorted(files - kept_files))  # a file a kept job uses (a resent plan's CT) stays
        item.instance_uids = [i.sop_instance_uid for i in journal.instances_at(files - kept_files)]
        for folder in (data_dir / "jobs" / job.id, reports / job.id):
            if folder.exists():
                item.folders.append(folder)
                item.bytes += _size(folder)
        item.vault = (vault_dir / f"{job.id}.vault").exists()
        out.append(item)
    orphans = _orphans(journal, jobs, cutoff)
    if orphans is not None:
        out.append(orphans)
    return out


def _orphans(journal: Journal, jobs: list[Job], cutoff: float) -> Purged | None:
    """Instances received before `cutoff` that no job uses: not a job's plan, structure set or CT, not
    a TPS dose of a job's plan, not of the patient of a job still being assembled (its CT may be
    among them). Purged jobs' files are already gone."""
    used: set[str] = set().union(*(_used_files(j) for j in jobs)) if jobs else set()
    plans = {j.plan_uid for j in jobs}
    waiting = {j.plan_uid for j in jobs if j.state not in FINAL_STATES and not j.data.ct}
    patients = {p.patient_key for uid in waiting if (p := journal.instance(uid)) is not None}
    lone = [i for i in journal.instances_received_before(cutoff)
            if i.path not in used and i.sop_instance_uid not in plans and i.patient_key not in patients
            and not (i.sop_class_uid == RTDoseStorage and set(journal.refs(i.sop_instance_uid, "plan")) & plans)]
    if not lone:
        return None
    newest = max(i.received for i in lone)
    item = Purged("-", "no job", datetime.fromtimestamp(newest, UTC).strftime("%Y-%m-%d %H:%M"), orphans=True)
    item.add_files([i.path for i in lone])
    item.instance_uids = [i.sop_instance_uid for i in lone]
    return item


def purge(settings: Settings, journal: Journal, *, dry_run: bool = False, now: float | None = None) -> list[Purged]:
    """Remove what ended jobs past retention used; return what was (or, dry run, would be) removed."""
    items = plan_purge(settings, journal, now)
    if dry_run or not items:
        return items
    vault = Vault(settings.node.data_dir / "vault", read_site_key(settings))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    for item in items:
        for file in item.files:
            file.unlink(missing_ok=True)
        for folder in item.folders:
            shutil.rmtree(folder, ignore_errors=True)
        if item.vault:
            vault.destroy(item.job_id)
        journal.remove_instances(item.instance_uids)
        if not item.orphans:
            journal.update_job_data(item.job_id, JobData(public=PublicData(purged=stamp)))
        LOGGER.info("retention: removed %s", item.describe())
    return items


class RetentionWorker:
    """Runs `purge` at start and every `retention.check_every_minutes` in a background thread."""

    def __init__(self, settings: Settings, journal: Journal) -> None:
        self.settings = settings
        self.journal = journal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        if self.settings.retention.days > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = self.settings.retention.check_every_minutes * 60
        while True:
            try:
                purge(self.settings, self.journal)
            except Exception as exc:  # noqa: BLE001 - retention must not stop the node; it tries again later
                LOGGER.error("retention: purge failed: %s: %s", type(exc).__name__, exc)
            if self._stop.wait(interval):
                return
