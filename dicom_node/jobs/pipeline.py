"""The pipeline drives READY jobs through SEALED → RUNNING → MERGED, then hands them to the outbox.

Each step reads the job's state from the journal, does its work, and records the next state; a step
that is interrupted (crash, SIGKILL, restart) is simply done again from the last recorded state:

- READY   → de-identify (identity to the vault), prepare engine inputs, seal the bundle → SEALED
            (a job put back by `mcnode retry` after failing while RUNNING keeps its job folder when
            everything in it still verifies: its finished shards are re-attached, only the missing run)
- SEALED  → RUNNING is recorded *before* any shard starts
- RUNNING → dispatch the shards that have no verified result yet (re-attach), merge (each tally is
            summed as its shard ends, while the others compute), write the RT Dose from the
            anonymized data, re-identify it through the vault → MERGED
- MERGED  → the outbox sends it; SENT only after the TPS answered success

Errors are sorted at this boundary: a plan the engine can never compute is REJECTED with the
reason, anything else FAILED with the reason (a retry starts from the state it failed in).

Up to `[cloud] max_concurrent_jobs` jobs are worked on at once, one thread each, taken from the
queue by priority (the sender's `[[destinations]] priority`: interactive, normal, batch), then in
order of arrival. Their shards share the backend's workers through one FairShare
(cloud.backends.share: equal shares per priority class, no pre-emption). A job recorded CANCELLED
(`mcnode cancel`, from any process) has its running shards stopped within CANCEL_POLL_SECONDS and
whatever its step was doing is dropped.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import hashlib
import heapq
import itertools
import json
import logging
import os
import shutil
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, RTDoseStorage

from anonymizer.deidentify import deidentify_job
from anonymizer.errors import AnonymizerError
from anonymizer.seal import new_data_key, open_stream, unwrap_key, wrap_key
from anonymizer.vault import Vault, reidentify
from cloud.backends import get_backend
from cloud.backends.base import Backend
from cloud.backends.share import PRIORITIES, FairShare
from cloud.bundle import BUNDLE_PART, make_bundle
from cloud.dispatch import dispatch_merged, plan_tasks, primaries_for_target
from cloud.engines import dosegrid
from cloud.engines.base import BODY_MASK, INPUTS_JSON, ShardInputs
from cloud.errors import Cancelled, CloudError, UnsupportedPlan
from cloud.merge import StreamingMerge
from cloud.sizing import CostModel, finish_job, plan_job
from dicom_node.errors import JournalError, NodeError, PlanRejected
from dicom_node.intake.jobrecord import JobData, JobState, PublicData
from dicom_node.intake.journal import Job, Journal
from dicom_node.jobs.compute import (
    calibration_text,
    check_plan,
    ct_calibration,
    dose_options,
    merge_dose,
    prepare,
    rt_dose,
)
from dicom_node.jobs.integrity import JobFiles
from dicom_node.jobs.rtdose import UNCERTAINTY_ABOVE_TARGET
from dicom_node.net import uids
from dicom_node.settings import Settings, mc_target_uncertainty_percent, read_site_key

LOGGER = logging.getLogger(__name__)

# How often an idle pipeline looks for jobs put back by `mcnode retry` from another process.
RETRY_SCAN_SECONDS = 5.0
# A job whose failure could not even be written to the journal (disk full) waits this long.
PARK_SECONDS = 60.0
# In a job folder: what the bundle was sealed under (a digest of the engine settings, the beam model and
# CT calibration files, the TPS dose the grid may follow, the originals); a retry keeps the folder only
# when sealing now would be done under the same.
SEAL_RECORD = "seal.json"


def describe_error(exc: BaseException, data_dir: Path) -> str:
    """One line for a job's reason: an OSError by its meaning and the file inside data_dir, no traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            text = f"disk full ({exc.strerror})"
        if exc.filename:
            name = Path(str(exc.filename))
            try:
                name = name.resolve().relative_to(Path(data_dir).resolve())
            except ValueError:
                name = Path(name.name)
            text += f" writing {name}" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f": {name}"
        return text
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, (CloudError, AnonymizerError, NodeError)):
        text = f"internal error {type(exc).__name__}: {text}"
    return " ".join(text.split())
# How often the journal is asked whether a job being computed was cancelled (by another process).
CANCEL_POLL_SECONDS = 1.0


def _load(paths: list[str]) -> list[Dataset]:
    return [dcmread(p) for p in paths]


def _writer_needs(names: list[str]) -> list[str]:
    """Of the de-identified copies (named ``NNNNN_KIND.dcm``), the plan and the first CT image: what
    the RT Dose writer reads. A name of another form is kept (read) rather than guessed about."""
    plans = {uids.SHORT_NAMES[c] for c in uids.PLAN_CLASSES}
    ct = uids.SHORT_NAMES[CTImageStorage]
    kinds = [n.rsplit(".", 1)[0].partition("_")[2] for n in names]
    first_ct = next((n for n, k in zip(names, kinds, strict=True) if k == ct), None)
    return [n for n, k in zip(names, kinds, strict=True)
            if k in plans or n == first_ct or (k != ct and k not in uids.SHORT_NAMES.values())]


def give_back_memory() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim) after a CT has been read.

    The node reads a CT of hundreds of MB while preparing a job; once the inputs are written the
    datasets are gone, but glibc keeps their pages in the process, so the node stayed at ~450 MB
    while the engine's own process held the CT (BENCHMARKS.md, head plan). Elsewhere a no-op.
    """
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


class Pipeline:
    def __init__(self, settings: Settings, journal: Journal, on_merged: Any = None) -> None:
        self.settings = settings
        self.journal = journal
        self.site_key = read_site_key(settings)
        data_dir = settings.node.data_dir
        self.vault = Vault(data_dir / "vault", self.site_key)
        self.jobs_dir = data_dir / "jobs"
        # local workers open bundles here (one folder each); emptied at start: nothing in it survives a restart
        self.work_dir = data_dir / "work"
        self._on_merged = on_merged
        self.timings: dict[str, dict[str, float]] = {}
        self.concurrent = settings.cloud.concurrent_jobs()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queued: set[str] = set()                       # waiting or being worked on
        self._parked: dict[str, float] = {}  # job id -> when to try again (its failure could not be recorded)
        self._heap: list[tuple[int, int, str]] = []          # (priority rank, arrival, job id)
        self._arrival = itertools.count()
        self._active: dict[str, Backend | None] = {}         # jobs being worked on -> their backend
        self._share: FairShare | None = None
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, name=f"pipeline-{i}", daemon=True)
                         for i in range(self.concurrent)]
        self._watcher = threading.Thread(target=self._watch, name="pipeline-cancel", daemon=True)

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._clean_work_dir()
        for thread in [*self._threads, self._watcher]:
            thread.start()
        for job in self.journal.jobs_in(JobState.READY, JobState.SEALED, JobState.RUNNING, JobState.MERGED):
            self.submit(job)

    def _clean_work_dir(self) -> None:
        """Remove what workers of an earlier run left (a node or worker killed outright)."""
        if self.work_dir.is_dir():
            for entry in self.work_dir.iterdir():
                LOGGER.info("removing %s left by an earlier run", entry.relative_to(self.work_dir.parent))
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.work_dir.chmod(0o700)  # opened bundles: readable by the node's user only

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            backends = [b for b in self._active.values() if b is not None]
            self._cond.notify_all()
        for backend in backends:
            backend.cancel()  # the jobs stay RUNNING and resume on the next start
        for thread in [*self._threads, self._watcher]:
            if thread.is_alive():
                thread.join(timeout=5)
        if self.settings.cloud.backend == "ssh":
            from cloud.backends.ssh import POOL

            POOL.close_idle()

    def priority(self, job: Job) -> str:
        """interactive | normal | batch: the `priority` of the destination of the AE title that sent the plan."""
        dest = self.settings.destination_for(job.calling_ae or "")
        return dest.priority if dest is not None else "normal"

    def submit(self, job: Job) -> None:
        with self._cond:
            if job.id in self._queued:
                return
            self._queued.add(job.id)
            heapq.heappush(self._heap, (PRIORITIES[self.priority(job)], next(self._arrival), job.id))
            self._cond.notify()

    def cancel(self, job_id: str) -> None:
        """The job was recorded CANCELLED: stop its shards now if they are running here."""
        with self._lock:
            backend = self._active.get(job_id)
        if backend is not None:
            backend.cancel()

    def _pick_up_retries(self) -> None:
        """Jobs put back into a pipeline state from outside (`mcnode retry`) are taken up here."""
        now = time.monotonic()
        for job in self.journal.jobs_in(JobState.READY, JobState.SEALED, JobState.RUNNING):
            with self._lock:
                if self._parked.get(job.id, 0) > now:
                    continue
                self._parked.pop(job.id, None)
            self.submit(job)

    def wait_idle(self, timeout: float = 600) -> bool:
        """For tests and tools: wait until no job is waiting or being worked on."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        """One of `concurrent` threads: take the most urgent waiting job, advance it, repeat."""
        while True:
            with self._cond:
                if not self._heap and not self._stopping:
                    self._cond.wait(RETRY_SCAN_SECONDS)
                if self._stopping:
                    return
                if not self._heap:
                    idle = not self._active
                    job_id = None
                else:
                    _rank, _seq, job_id = heapq.heappop(self._heap)
                    self._active[job_id] = None
            if job_id is None:
                if idle:
                    self._scan_for_retries()
                continue
            try:
                self.process(job_id)
            except Exception as exc:  # noqa: BLE001 - one job's bug must not stop the thread
                LOGGER.exception("pipeline failed on job %s", job_id)
                self._fail_unexpected(job_id, exc)
            finally:
                with self._cond:
                    self._active.pop(job_id, None)
                    self._queued.discard(job_id)
                    self._cond.notify_all()

    def _scan_for_retries(self) -> None:
        try:
            self._pick_up_retries()
        except Exception:  # noqa: BLE001 - the thread must survive
            LOGGER.exception("pipeline: idle check failed")

    def _watch(self) -> None:
        """Stop the shards of jobs cancelled from another process (`mcnode cancel`)."""
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._cond.wait(CANCEL_POLL_SECONDS)
                if self._stopping:
                    return
                running = [(jid, b) for jid, b in self._active.items() if b is not None]
            for job_id, backend in running:
                try:
                    if self.journal.job(job_id).state == JobState.CANCELLED:
                        LOGGER.info("job %s was cancelled: stopping its shards", job_id)
                        backend.cancel()
                except JournalError as exc:
                    LOGGER.warning("pipeline: cannot read job %s: %s", job_id, exc)

    def _fail_unexpected(self, job_id: str, exc: Exception) -> None:
        """An unexpected error: FAILED with its type, so the job is not taken up again in a loop."""
        try:
            job = self.journal.job(job_id)
            if job.state in (JobState.READY, JobState.SEALED, JobState.RUNNING):
                self._fail(job, job.state, exc)
        except Exception as again:  # noqa: BLE001 - nothing more to do than the log line already written
            LOGGER.error("could not record the failure of job %s: %s", job_id, again)

    # --- steps --------------------------------------------------------------------------

    def process(self, job_id: str, until: str | None = None) -> Job:
        """Advance one job as far as the pipeline takes it (or until it reaches state `until`)."""
        job = self.journal.job(job_id)
        steps = {JobState.READY: self._seal, JobState.SEALED: self._start_running, JobState.RUNNING: self._compute}
        while job.state in steps and job.state != until:
            before = job.state
            try:
                job = steps[job.state](job)
            except Cancelled:
                if self._cancelled(job.id):
                    LOGGER.info("job %s: cancelled while %s; its shards were stopped", job.id, before)
                else:
                    LOGGER.info("job %s: stopped while %s; it resumes on the next start", job.id, before)
                return job
            except (UnsupportedPlan, PlanRejected) as exc:
                if self._cancelled(job.id):
                    return self.journal.job(job.id)
                job = self.journal.transition(job.id, JobState.REJECTED, reason=str(exc))
            except (CloudError, AnonymizerError, NodeError, OSError) as exc:
                if isinstance(exc, JournalError) and self._cancelled(job.id):  # cancelled while the step worked
                    LOGGER.info("job %s: cancelled while %s; the step's result is dropped", job.id, before)
                    return self.journal.job(job.id)
                job = self._fail(job, before, exc)
                if job.state == before:
                    return job  # not even the failure could be recorded: parked, tried again later
            if job.state == before:  # pragma: no cover - a step must move the job
                break
        if job.state == JobState.MERGED and self._on_merged is not None:
            self._on_merged(job)
        return job

    def _cancelled(self, job_id: str) -> bool:
        try:
            return self.journal.job(job_id).state == JobState.CANCELLED
        except JournalError:
            return False

    def _fail(self, job: Job, step: JobState, exc: Exception) -> Job:
        """FAILED with a one-line reason; when the journal cannot record even that (full disk), park the job."""
        if step == JobState.READY:
            # a half-written job folder is useless (sealing starts afresh) and may be what filled the disk
            shutil.rmtree(self.job_dir(job.id), ignore_errors=True)
        reason = f"{step}: {describe_error(exc, self.settings.node.data_dir)}"
        try:
            failed = self.journal.transition(job.id, JobState.FAILED, reason=reason, data=JobData(failed_in=step))
        except JournalError as journal_exc:
            with self._lock:
                self._parked[job.id] = time.monotonic() + PARK_SECONDS
            LOGGER.error("job %s: %s; and the failure cannot be recorded (%s); trying the job again in %.0f s",
                         job.id, reason, journal_exc, PARK_SECONDS)
            return job
        if isinstance(exc, OSError) or not isinstance(exc, (CloudError, AnonymizerError, NodeError)):
            LOGGER.debug("job %s: %s", job.id, reason, exc_info=exc)
        return failed

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _timed(self, job_id: str, stage: str, start: float) -> None:
        self.timings.setdefault(job_id, {})[stage] = time.perf_counter() - start

    def _seal(self, job: Job) -> Job:
        start = time.perf_counter()
        # the node process's CPU seconds from here to the RT Dose written (bench/dose.py compares them)
        self.timings.setdefault(job.id, {})["process_cpu_at_seal"] = time.process_time()
        if job.data.failed_in in (JobState.SEALED, JobState.RUNNING):  # put back by `mcnode retry`
            kept = self._keep_sealed(job)
            if kept is not None:
                self._timed(job.id, "seal", start)
                return kept
        folder = self.job_dir(job.id)
        if folder.exists():
            shutil.rmtree(folder)  # a half-finished earlier attempt
        paths = [job.data.plan, *([job.data.structure_set] if job.data.structure_set else []), *job.data.ct]
        datasets = _load(paths)
        engine = check_plan(datasets, self.settings.engine)
        calibration = ct_calibration(datasets, self.settings.engine)  # before de-identification
        anonymized, record = deidentify_job(datasets, self.site_key, job.id)
        self.vault.store(job.id, record)
        anon_dir = folder / "anonymized"
        anon_dir.mkdir(parents=True)
        names = []
        for i, ds in enumerate(anonymized):
            kind = uids.SHORT_NAMES.get(str(ds.SOPClassUID), "OBJ")
            name = f"{i:05d}_{kind}.dcm"
            ds.save_as(anon_dir / name, enforce_file_format=True)
            names.append(name)
        tps_dose = self._tps_dose(job)
        options, grid_note = dose_options(self.settings.engine, tps_dose)
        LOGGER.info("job %s: %s", job.id, grid_note)
        inputs = prepare(engine, anonymized, folder / "inputs", self.settings.engine, calibration, options)
        del datasets, anonymized  # the CT is in the inputs now; the node keeps no CT-sized copy
        give_back_memory()  # ... nor the memory it read the CT into, while an engine holds the CT
        self._timed(job.id, "anonymize_prepare", start)
        start = time.perf_counter()
        key = new_data_key()
        (folder / "data.key").write_bytes(wrap_key(self.site_key, key, job.id))
        make_bundle(folder / "bundle.sealed", key, job.id, {"inputs": inputs.root}, {"engine": engine.name})
        (folder / SEAL_RECORD).write_text(json.dumps({"fingerprint": self._seal_fingerprint(job, tps_dose)}))
        # what the merge and the RT Dose writer read back later is authenticated (jobs/integrity.py);
        # recorded last: a folder whose record is complete was sealed to the end (a retry may keep it)
        JobFiles(folder, key, job.id).record(f"inputs/{INPUTS_JSON}", *(f"anonymized/{n}" for n in names),
                                             *([f"inputs/{BODY_MASK}"] if inputs.has_body_mask else []),
                                             SEAL_RECORD)
        sealed_files = [[f"inputs/{p.relative_to(inputs.root).as_posix()}", p.stat().st_size]
                        for p in sorted(inputs.root.rglob("*")) if p.is_file()]
        self._timed(job.id, "seal", start)
        public = PublicData(warnings=list(inputs.warnings) if inputs.warnings else None,
                            beam_model=str(inputs.extra.get("beam_model", "")), commissioned=inputs.commissioned,
                            ct_calibration=calibration_text(engine, calibration, inputs),
                            dose_grid={**dosegrid.describe(inputs.scoring_grid), "note": grid_note,
                                       "body": inputs.extra.get("body"),
                                       "quantity": "dose to water" if inputs.dose_to_water else "dose to medium"},
                            bundle_files=sealed_files)
        return self.journal.transition(job.id, JobState.SEALED, data=JobData(public=public, anonymized=names))

    def _seal_fingerprint(self, job: Job, tps: Dataset | None) -> str:
        """A digest of everything besides the originals' bytes that sealing this job depends on (`tps`: the
        TPS dose whose grid the dose grid may follow)."""
        eng = self.settings.engine
        digest = hashlib.sha256(repr(eng).encode())
        for path in [*eng.beam_models.values(), *(p for paths in eng.ct_calibrations.values() for p in paths)]:
            digest.update(b"\0" + str(path).encode() + b"\0")
            if Path(path).is_file():
                digest.update(Path(path).read_bytes())
        digest.update(b"\0tps\0" + (str(tps.SOPInstanceUID).encode() if tps is not None else b""))
        originals = [job.data.plan, job.data.structure_set or "", *job.data.ct]
        digest.update(b"\0originals\0" + "\0".join(originals).encode())
        return digest.hexdigest()

    def _keep_sealed(self, job: Job) -> Job | None:
        """SEALED again without sealing, for a job `mcnode retry` put back after it failed while RUNNING.

        Its job folder is kept when everything in it still verifies: the wrapped data key opens with the
        site key, every job file matches its MAC, the bundle opens with the job's key, the vault holds
        the job's identity, and it was sealed under the settings sealing would use now. Then RUNNING
        re-attaches to the shard results that open with the job's key (cloud.dispatch) and runs only
        the missing shards of the recorded waves. None (sealed again from the originals) otherwise.
        """
        why = self._not_reusable(job)
        if why is not None:
            LOGGER.warning("job %s: retry: sealing again from the received originals (%s)", job.id, why)
            self.journal.update_job_data(job.id, JobData(public=PublicData(
                retry={"resealed": why, "kept_shards": 0})))
            return None
        LOGGER.info("job %s: retry: the sealed job folder verifies; the shards of the failed run that "
                    "verify are kept", job.id)
        return self.journal.transition(job.id, JobState.SEALED, data=JobData(public=PublicData(
            retry={"reused_seal": True})))

    def _not_reusable(self, job: Job) -> str | None:
        """Why the job folder cannot be kept (None: it can)."""
        folder = self.job_dir(job.id)
        if not (folder / "bundle.sealed").is_file():
            return "the job folder has no sealed bundle"
        try:
            key = unwrap_key(self.site_key, (folder / "data.key").read_bytes(), job.id)
            files = JobFiles(folder, key, job.id)
            recorded = files.names()
            needed = [f"inputs/{INPUTS_JSON}", SEAL_RECORD, *(f"anonymized/{n}" for n in job.data.anonymized)]
            missing = [n for n in needed if n not in recorded]
            if missing or not job.data.anonymized:
                return f"the job folder lacks {', '.join(missing) or 'its anonymized files'}"
            for name in recorded:
                files.read(name)  # TamperedFile when changed
            seal = json.loads(files.read(SEAL_RECORD))
            if seal.get("fingerprint") != self._seal_fingerprint(job, self._tps_dose(job)):
                return ("the engine settings, a beam model or CT calibration file, or the TPS dose changed "
                        "since it was sealed")
            self.vault.load(job.id)
            with (folder / "bundle.sealed").open("rb") as fin, open(os.devnull, "wb") as sink:
                open_stream(fin, sink, key, job.id, BUNDLE_PART)  # every chunk authenticated
        except (CloudError, AnonymizerError, NodeError, OSError, ValueError) as exc:
            return describe_error(exc, self.settings.node.data_dir)
        return None

    def _tps_dose(self, job: Job) -> Dataset | None:
        """The newest RT Dose the TPS sent for this plan (same patient), header only; None if none yet."""
        plan = self.journal.instance(job.plan_uid)
        doses = [d for d in self.journal.referencing(job.plan_uid, "plan") if d.sop_class_uid == RTDoseStorage
                 and (plan is None or d.patient_key == plan.patient_key)]
        if not doses:
            return None
        return dcmread(doses[-1].path, stop_before_pixels=True)

    def _start_running(self, job: Job) -> Job:
        return self.journal.transition(job.id, JobState.RUNNING, expect=JobState.SEALED)

    def _backend_for(self, job: Job) -> Backend:
        """A backend for this job's run, sharing the workers with the other jobs running now."""
        cloud = self.settings.cloud
        options = cloud.backend_options()
        if cloud.backend == "local":
            options["work_dir"] = self.work_dir
        backend = get_backend(cloud.backend, **options)
        backend.priority = self.priority(job)
        with self._lock:
            if self.concurrent > 1:
                if self._share is None:
                    self._share = FairShare(backend.workers())
                backend.share = self._share
            self._active[job.id] = backend
            stopping = self._stopping
        if stopping or self.journal.job(job.id).state == JobState.CANCELLED:
            backend.cancel()
        return backend

    def _compute(self, job: Job) -> Job:
        """Run the shards in waves until the uncertainty target is met (or max_primaries), merge, write.

        Without a target there is one wave of ``engine.primaries``. With one, each wave is merged with
        all before it and the pooled uncertainty estimated; the next wave's primaries follow from the
        1/sqrt(N) law. Every wave is recorded before its shards start, so a resumed job re-attaches to
        the shards already done and runs the same waves.
        """
        folder = self.job_dir(job.id)
        key = unwrap_key(self.site_key, (folder / "data.key").read_bytes(), job.id)
        # read (and authenticate) what the merge and the RT Dose writer need before any shard runs
        files = JobFiles(folder, key, job.id)
        inputs = ShardInputs.load(folder / "inputs", files.read(f"inputs/{INPUTS_JSON}"))
        # headers only, of the plan and one CT image: the RT Dose writer needs their patient, study and
        # frame (reading and authenticating all of a 512x512 CT's copies cost 0.3 s before any shard ran)
        anon = [dcmread(BytesIO(files.read(f"anonymized/{n}")), stop_before_pixels=True)
                for n in _writer_needs(job.data.anonymized)]
        body = None
        if inputs.has_body_mask:
            body = inputs.body_mask(files.read(f"inputs/{BODY_MASK}"))
        cloud = self.settings.cloud
        eng = self.settings.engine
        sz = cloud.sizing
        cost = CostModel(sz.price_per_ghz_hour, sz.ghz_per_core, sz.cores_per_worker)
        # chosen once per job and recorded before any shard starts, so a resumed job keeps its shard count
        sizing = job.data.public.sizing or plan_job(
            self.journal.list_jobs(), eng.primaries, cloud.shards, cost,
            deadline_s=sz.deadline_seconds, cost_cap=sz.cost_cap, max_shards=sz.max_shards)
        target = mc_target_uncertainty_percent(self.settings)  # the second check's need included
        shards = int(sizing["shards"])
        if target > 0:
            shards = max(2, shards)  # the uncertainty comes from the spread between shards
        # the fewest primaries a wave may have: an engine may need some per shard (ompMC runs a photon
        # plan's weakest beamlet only with enough histories; its shard fails with fewer)
        floor = shards * int(inputs.extra.get("min_primaries_per_shard", 1))
        if eng.primaries < floor:
            LOGGER.info("job %s: %d primaries per wave at least (the engine needs %d a shard)", job.id, floor,
                        floor // shards)
        waves: list[dict[str, Any]] = [dict(w) for w in job.data.public.waves or []] or [
            {"wave": 1, "first_shard": 0, "shards": shards, "primaries": max(eng.primaries, floor),
             "uncertainty_percent": None}]
        self.journal.update_job_data(job.id, JobData(public=PublicData(sizing=sizing, waves=waves)))
        backend = self._backend_for(job)
        # A later wave has no more shards than the backend runs at once: more would only run in turn,
        # each one more worker and engine start (the local backend's one worker: one shard). The spread
        # of the first wave's shards and the later ones still gives the SE (cloud.merge: unbiased for
        # shards of any sizes).
        later_shards = max(1, min(shards, backend.workers()))
        floor_later = later_shards * int(inputs.extra.get("min_primaries_per_shard", 1))
        bundle_uri, results_uri = (folder / "bundle.sealed").as_uri(), (folder / "results").as_uri()
        compute_s = merge_s = 0.0
        acc = StreamingMerge()  # every shard's tally is summed as it arrives, wave after wave
        # a retry that kept the job folder: say how many shards of the failed run are kept, once, when the
        # first dispatch has re-attached them (before the missing ones start)
        report_kept = [bool(job.data.public.retry) and "kept_shards" not in (job.data.public.retry or {})]

        def progress(done: int, total: int) -> None:
            if report_kept[0]:
                report_kept[0] = False
                LOGGER.info("job %s: retry: %d of %d shards kept", job.id, done, total)
                self.journal.update_job_data(job.id, JobData(public=PublicData(
                    retry={"reused_seal": True, "kept_shards": done, "shards": total})))
            self.journal.set_progress(job.id, done, total)

        try:
            while True:
                tasks = [t for w in waves for t in plan_tasks(job.id, int(w["shards"]), int(w["primaries"]), bundle_uri,
                                                              results_uri, first_index=int(w["first_shard"]))]
                start = time.perf_counter()
                failures_before = backend.shard_failures
                try:
                    # the first wave, with a target: a few short shards that only measure the spread
                    dispatch_merged(tasks, key, backend, acc, on_progress=progress,
                                    small=target > 0 and len(waves) == 1)
                finally:
                    if backend.shard_failures > failures_before:  # over every attempt of the job (/metrics)
                        recorded = self.journal.job(job.id).data.public.shard_failures or 0
                        total = recorded + backend.shard_failures - failures_before
                        self.journal.update_job_data(job.id, JobData(public=PublicData(shard_failures=total)))
                compute_s += time.perf_counter() - start  # with the merge of every shard but the last (overlapped)
                start = time.perf_counter()
                merged = merge_dose(acc, inputs, eng, expected_shards=len(tasks), body=body)
                merge_s += time.perf_counter() - start
                unc = merged.summary["uncertainty_percent"]
                wave = waves[-1]
                wave["uncertainty_percent"] = None if unc is None else round(float(unc), 3)
                done = merged.primaries
                LOGGER.info("job %s: wave %d: %d primaries in %d shards; uncertainty %s (target %s)", job.id,
                            wave["wave"], done, len(tasks), "n/a" if unc is None else f"{unc:.2f} %",
                            f"{target:g} %" if target > 0 else "off")
                if target <= 0 or (unc is not None and unc <= target):
                    break
                more = primaries_for_target(done, float(unc if unc is not None else 100.0), target, eng.max_primaries,
                                            later_shards)
                if 0 < more < floor_later:
                    more = floor_later if eng.max_primaries - done >= floor_later else 0
                if more <= 0:
                    break
                waves.append({"wave": len(waves) + 1, "first_shard": len(tasks), "shards": later_shards,
                              "primaries": more, "uncertainty_percent": None})
                self.journal.update_job_data(job.id, JobData(public=PublicData(waves=waves)))
        finally:
            backend.release(job.id)  # what it kept between the waves (the local backend's opened bundle)
        self.timings.setdefault(job.id, {}).update(compute=compute_s, merge=merge_s)
        sizing = finish_job(sizing, compute_s, cost)
        target_met = None if target <= 0 else (unc is not None and unc <= target)
        marks, warnings = [], list(job.data.public.warnings or [])
        if target_met is False:
            marks.append(UNCERTAINTY_ABOVE_TARGET)
            unc_text = "unknown" if unc is None else f"{unc:.2f} %"
            warnings.append(f"uncertainty {unc_text} is above the target {target:g} % after {done} primaries "
                            f"(engine.max_primaries {eng.max_primaries}); the RT Dose is marked")
            LOGGER.warning("job %s: %s", job.id, warnings[-1])
        start = time.perf_counter()
        plan = next(ds for ds in anon if str(ds.SOPClassUID) in uids.PLAN_CLASSES)
        ct = next(ds for ds in anon if str(ds.SOPClassUID) == CTImageStorage)
        notes = [f"target uncertainty {target:g} % {'met' if target_met else 'NOT MET'}"] if target > 0 else []
        dose = rt_dose(merged, inputs, ct, plan, job.data.public.ct_calibration or inputs.ct_calibration,
                       notes=notes, marks=marks)
        dose = reidentify(dose, self.vault.load(job.id))
        out = folder / "RD.dcm"
        dose.save_as(out, enforce_file_format=True)
        files.record(out.name)  # the outbox sends it only if it is still these bytes
        self._timed(job.id, "write", start)
        self.timings[job.id]["process_cpu_at_merged"] = time.process_time()
        summary = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in merged.summary.items()}
        return self.journal.transition(job.id, JobState.MERGED, data=JobData(
            rtdose=str(out),
            public=PublicData(summary=summary, shards=len(tasks), primaries=done, sizing=sizing, waves=waves,
                              uncertainty_target_met=target_met, warnings=warnings or None,
                              shard_wall_s=[round(acc.wall_s[i], 3) for i in sorted(acc.wall_s)])))
