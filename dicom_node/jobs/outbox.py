"""The outbox: RT Doses of MERGED jobs go to the TPS that sent the plan, until it says success.

The destination is `[[destinations]]` for the calling AE title that sent the plan. A failed send
(TPS down, refused, non-success status) is retried with exponential back-off (`outbox.retry_*`);
SENT is recorded only after the TPS answered 0x0000, so a dose is never sent again once accepted.
(If the node dies between the TPS's answer and the journal write, the dose goes once more with the
same SOP Instance UID, which a TPS treats as the same object.)
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from anonymizer.errors import AnonymizerError
from anonymizer.seal import unwrap_key
from dicom_node.errors import SendError
from dicom_node.intake.jobrecord import JobData, JobState, PublicData
from dicom_node.intake.journal import Job, Journal
from dicom_node.jobs.integrity import JobFiles, TamperedFile
from dicom_node.net.scu import send_paths
from dicom_node.settings import Settings, read_site_key

LOGGER = logging.getLogger(__name__)


class Outbox:
    def __init__(self, settings: Settings, journal: Journal, on_sent: Callable[[Job], None] | None = None) -> None:
        self.settings = settings
        self.journal = journal
        self._on_sent = on_sent
        self._site_key = read_site_key(settings)
        self._due: list[tuple[float, str, int]] = []  # (when, job id, attempt)
        self._cond = threading.Condition()
        self._stopping = False
        self._resend: set[str] = set()  # delivered jobs whose dose a person asked to send once more
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()
        for job in self.journal.jobs_in(JobState.MERGED):
            self.submit(job)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def submit(self, job: Job, delay: float = 0.0, attempt: int = 0) -> None:
        with self._cond:
            heapq.heappush(self._due, (time.monotonic() + delay, job.id, attempt))
            self._cond.notify_all()

    def resend(self, job: Job) -> None:
        """Send a delivered dose again (the TPS lost it), or a waiting one now instead of after its back-off."""
        with self._cond:
            if job.state in (JobState.SENT, JobState.VERIFIED):
                self._resend.add(job.id)
        self.submit(job)

    def pending(self) -> int:
        with self._cond:
            return len(self._due)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._due or self._due[0][0] > time.monotonic()):
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                _when, job_id, attempt = heapq.heappop(self._due)
            try:
                self._send(job_id, attempt)
            except Exception:  # noqa: BLE001 - the outbox thread must survive
                LOGGER.exception("outbox failed on job %s", job_id)

    def _check(self, job: Job, rtdose: Path) -> None:
        """The RT Dose must still be the file the pipeline wrote (jobs/integrity.py)."""
        folder = rtdose.parent
        key = unwrap_key(self._site_key, (folder / "data.key").read_bytes(), job.id)
        JobFiles(folder, key, job.id).read(rtdose.name)

    def _backoff(self, attempt: int) -> float:
        out = self.settings.outbox
        return float(min(out.retry_max_seconds, out.retry_initial_seconds * (2 ** attempt)))

    def _send(self, job_id: str, attempt: int) -> None:
        job = self.journal.job(job_id)
        with self._cond:
            again = job.id in self._resend and job.state in (JobState.SENT, JobState.VERIFIED)
        if job.state != JobState.MERGED and not again:
            return
        dest = self.settings.destination_for(job.calling_ae or "")
        if dest is None:
            reason = f"no [[destinations]] entry for calling AE title {job.calling_ae!r}; dose kept"
            if again:
                with self._cond:
                    self._resend.discard(job.id)
                self.journal.update_job_data(job.id, JobData(public=PublicData(last_send_error=reason)))
            else:
                self.journal.transition(job.id, JobState.MERGED, reason=reason)
            LOGGER.error("job %s: %s", job.id, reason)
            return
        rtdose = Path(job.data.rtdose)
        try:
            self._check(job, rtdose)
        except (TamperedFile, AnonymizerError, OSError) as exc:
            reason = f"MERGED: {exc}"
            self.journal.transition(job.id, JobState.FAILED, reason=reason, expect=JobState.MERGED,
                                    data=JobData(failed_in=JobState.MERGED))
            return
        try:
            failures = send_paths([rtdose], dest.host, dest.port, dest.ae_title,
                                  self.settings.node.ae_title)
        except SendError as exc:
            failures = [(Path(job.data.rtdose), str(exc))]
        if not failures and again:
            with self._cond:
                self._resend.discard(job.id)
            count = (job.data.public.resent or 0) + 1
            self.journal.update_job_data(job.id, JobData(public=PublicData(resent=count)))
            LOGGER.info("job %s: RT Dose sent again to %s", job.id, dest.ae_title)
            return
        if not failures:
            sent = self.journal.transition(job.id, JobState.SENT, expect=JobState.MERGED,
                                           data=JobData(sent_to=f"{dest.ae_title}@{dest.host}:{dest.port}"))
            LOGGER.info("job %s: RT Dose delivered to %s after %d attempt(s)", job.id, dest.ae_title, attempt + 1)
            if self._on_sent:
                self._on_sent(sent)
            return
        delay = self._backoff(attempt)
        why = failures[0][1]
        LOGGER.warning("job %s: sending to %s failed (%s); retry %d in %.0f s", job.id, dest.ae_title, why,
                       attempt + 1, delay)
        self.journal.update_job_data(job.id, JobData(public=PublicData(send_attempts=attempt + 1,
                                                                        last_send_error=why)))
        with self._cond:
            heapq.heappush(self._due, (time.monotonic() + delay, job.id, attempt + 1))
            self._cond.notify_all()
