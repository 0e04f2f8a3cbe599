"""The assembler decides when a plan's inputs are complete (DESIGN.md at the repository root, "Assembly").

DICOM has no "study complete" signal, so a plan is READY when its references resolve:
RT (Ion) Plan → ReferencedStructureSetSequence → RT Struct → ContourImageSequence → CT instances.
Without a (received) structure set, the CT series that shares the plan's FrameOfReferenceUID and
patient is used once no instance of it has arrived for `trigger.stable_seconds`. A plan that is
still incomplete `trigger.timeout_seconds` after it arrived is REJECTED with the reason.

All decisions run on one thread that reads a queue: the C-STORE handler and the timers only post
to it, so handlers stay fast and no two evaluations race.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import CTImageStorage, RTStructureSetStorage

from cloud.errors import UnsupportedPlan
from dicom_node.intake.checks import InputCheck
from dicom_node.intake.jobrecord import JobData, JobState, PublicData
from dicom_node.intake.journal import Instance, Job, Journal
from dicom_node.jobs.queue_worker import QueueWorker
from dicom_node.net import uids
from dicom_node.net.scp import Received
from dicom_node.settings import TriggerSettings

LOGGER = logging.getLogger(__name__)



class Assembler:
    """``check`` (when given) asks the engine about each plan on arrival and each CT once assembled."""

    def __init__(self, journal: Journal, trigger: TriggerSettings,
                 on_ready: Callable[[Job], None] | None = None, check: InputCheck | None = None) -> None:
        self.journal = journal
        self.trigger = trigger
        self.check = check
        self._on_ready = [on_ready] if on_ready else []
        self._worker = QueueWorker("assembler", self._handle)
        self._scheduler = BackgroundScheduler(timezone="UTC")

    def add_ready_listener(self, callback: Callable[[Job], None]) -> None:
        self._on_ready.append(callback)

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._scheduler.start()
        self._worker.start()
        # Resume after a restart: every job still receiving is checked again (the config may have
        # changed), evaluated again and gets its timeout.
        for job in self.journal.jobs_in(JobState.RECEIVING):
            self._schedule_timeout(job)
            self._worker.put(("resume", job.id))

    def stop(self) -> None:
        self._worker.stop(timeout=10)
        self._scheduler.shutdown(wait=False)

    def notify(self, received: Received) -> None:
        """Called by the C-STORE handler after an instance is spooled and journaled."""
        self._worker.put(("instance", received))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """For tests and tools: wait until every posted event has been handled."""
        return self._worker.wait_idle(timeout)

    # --- the assembler thread -----------------------------------------------------------

    def _handle(self, item: tuple[str, object]) -> None:
        kind, payload = item
        if kind == "instance":
            self._on_instance(payload)  # type: ignore[arg-type]
        elif kind == "job":
            self._evaluate(self.journal.job(str(payload)), from_timer=False)
        elif kind == "resume":
            job = self.journal.job(str(payload))
            plan = self.journal.instance(job.plan_uid)
            if job.state == JobState.RECEIVING and plan is not None and not self._plan_refused(job, plan):
                self._evaluate(job, from_timer=False)
        elif kind == "stable":
            self._evaluate(self.journal.job(str(payload)), from_timer=True)
        elif kind == "timeout":
            self._on_timeout(str(payload))

    def _on_instance(self, received: Received) -> None:
        inst = received.instance
        if inst.sop_class_uid in uids.PLAN_CLASSES:
            job = self.journal.create_job(inst.sop_instance_uid, inst.calling_ae)
            if job.state == JobState.RECEIVING and self._plan_refused(job, inst):
                return
            if job.state == JobState.RECEIVING:
                self._schedule_timeout(job)
                self._evaluate(job, from_timer=False)
            return
        # Any other instance may complete one or more waiting plans of the same patient.
        for job in self.journal.jobs_in(JobState.RECEIVING):
            plan = self.journal.instance(job.plan_uid)
            if plan is None or plan.patient_key != inst.patient_key:
                continue
            if plan.study_uid == inst.study_uid or (plan.for_uid and plan.for_uid == inst.for_uid):
                self._evaluate(job, from_timer=False)

    def _plan_refused(self, job: Job, plan: Instance) -> bool:
        """Ask the engine about the plan now: REJECTED at once with the reason, before any CT is awaited."""
        if self.check is None:
            return False
        try:
            self.check.sender(job.calling_ae)
            warnings = self.check.plan(plan.path)
        except UnsupportedPlan as exc:
            self._reject(job.id, str(exc))
            return True
        if warnings:
            self.journal.update_job_data(job.id, JobData(public=PublicData(warnings=list(warnings))))
        return False

    def _reject(self, job_id: str, reason: str) -> None:
        self._cancel_timers(job_id)
        self.journal.transition(job_id, JobState.REJECTED, reason=reason, expect=JobState.RECEIVING)
        LOGGER.warning("job %s REJECTED: %s", job_id, reason)

    def _schedule(self, kind: str, job_id: str, when: float) -> None:
        run_date = datetime.fromtimestamp(max(when, time.time()), tz=UTC)
        self._scheduler.add_job(self._worker.put, "date", run_date=run_date, args=[(kind, job_id)],
                                id=f"{kind}:{job_id}", replace_existing=True, misfire_grace_time=None)

    def _schedule_timeout(self, job: Job) -> None:
        self._schedule("timeout", job.id, job.created + self.trigger.timeout_seconds)

    def _cancel_timers(self, job_id: str) -> None:
        for kind in ("stable", "timeout"):
            job = self._scheduler.get_job(f"{kind}:{job_id}")
            if job is not None:
                job.remove()

    # --- the rules ----------------------------------------------------------------------

    def _evaluate(self, job: Job, from_timer: bool) -> None:
        if job.state != JobState.RECEIVING:
            return
        plan = self.journal.instance(job.plan_uid)
        if plan is None:  # pragma: no cover - a job is only created for a stored plan
            return
        ct, note, waiting = self._ct_by_structure_set(plan)
        if ct is None and not waiting:
            ct, note = self._ct_by_frame_of_reference(plan, job)
        if ct is None:
            return
        if self.check is not None:
            try:
                self.check.ct([i.path for i in ct])
            except UnsupportedPlan as exc:
                self._reject(job.id, str(exc))
                return
        data = JobData(plan=plan.path, structure_set=self._structure_set(plan, ct), ct=[i.path for i in ct],
                       public=PublicData(ct_slices=len(ct), assembly=note))
        self._cancel_timers(job.id)
        ready = self.journal.transition(job.id, JobState.READY, data=data, expect=JobState.RECEIVING)
        LOGGER.info("job %s READY: %d CT slices (%s)", job.id, len(ct), note)
        for callback in self._on_ready:
            callback(ready)

    def _structure_set(self, plan: Instance, ct: list[Instance]) -> str | None:
        """The plan's structure set when received; else (fallback assembly) the one drawn on this CT series.

        A plan that names a structure set we never got (a common export mix-up) still has its body
        contour and structures in the structure set whose contours reference this CT: keep that one.
        """
        named = self.journal.refs(plan.sop_instance_uid, "structure_set")
        for uid in named:
            inst = self.journal.instance(uid)
            if inst is not None and inst.patient_key == plan.patient_key:
                return inst.path
        ct_uids = {i.sop_instance_uid for i in ct}
        best: tuple[int, float, str] | None = None
        for ss in self.journal.instances_where(for_uid=plan.for_uid, sop_class_uid=RTStructureSetStorage):
            if ss.patient_key != plan.patient_key:
                continue
            shared = len(ct_uids.intersection(self.journal.refs(ss.sop_instance_uid, "image")))
            if shared and (best is None or (shared, ss.received) > best[:2]):
                best = (shared, ss.received, ss.path)
        return best[2] if best else None

    def _ct_by_structure_set(self, plan: Instance) -> tuple[list[Instance] | None, str, bool]:
        """The CT the received structure set names; (None, '', True) while some of it is missing."""
        for ss_uid in self.journal.refs(plan.sop_instance_uid, "structure_set"):
            ss = self.journal.instance(ss_uid)
            if ss is None or ss.patient_key != plan.patient_key:
                continue
            images = self.journal.refs(ss_uid, "image")
            if not images:
                continue
            present = self.journal.present(images)
            if len(present) < len(images):
                return None, "", True
            ct = [self.journal.instance(u) for u in images]
            return ([i for i in ct if i is not None and i.sop_class_uid == CTImageStorage],
                    "structure set references", False)
        return None, "", False

    def _ct_by_frame_of_reference(self, plan: Instance, job: Job) -> tuple[list[Instance] | None, str]:
        if not plan.for_uid:
            return None, ""
        candidates = [i for i in self.journal.instances_where(for_uid=plan.for_uid, sop_class_uid=CTImageStorage)
                      if i.patient_key == plan.patient_key]
        if not candidates:
            return None, ""
        by_series: dict[str, list[Instance]] = {}
        for inst in candidates:
            by_series.setdefault(inst.series_uid, []).append(inst)
        series = max(by_series.values(), key=len)
        last = max(i.received for i in series)
        stable_at = last + self.trigger.stable_seconds
        if time.time() < stable_at:
            self._schedule("stable", job.id, stable_at)
            return None, ""
        note = f"CT series of the plan's frame of reference, stable for {self.trigger.stable_seconds:g} s"
        if len(by_series) > 1:
            note += f" (largest of {len(by_series)} series)"
        return series, note

    def _on_timeout(self, job_id: str) -> None:
        job = self.journal.job(job_id)
        if job.state != JobState.RECEIVING:
            return
        # One last look: the data may have become complete just now.
        self._evaluate(job, from_timer=True)
        job = self.journal.job(job_id)
        if job.state != JobState.RECEIVING:
            return
        reason = self._why_incomplete(job)
        self._cancel_timers(job_id)
        self.journal.transition(job_id, JobState.REJECTED, reason=reason, expect=JobState.RECEIVING)

    def _why_incomplete(self, job: Job) -> str:
        waited = f"after {self.trigger.timeout_seconds:g} s"
        plan = self.journal.instance(job.plan_uid)
        assert plan is not None
        for ss_uid in self.journal.refs(plan.sop_instance_uid, "structure_set"):
            if self.journal.instance(ss_uid) is not None:
                images = self.journal.refs(ss_uid, "image")
                missing = len(images) - len(self.journal.present(images))
                return (f"CT incomplete {waited}: {missing} of {len(images)} slices "
                        "referenced by the structure set missing")
        if not plan.for_uid:
            return f"plan has no FrameOfReferenceUID and no structure set arrived {waited}"
        return f"no CT series with the plan's frame of reference arrived {waited}"
