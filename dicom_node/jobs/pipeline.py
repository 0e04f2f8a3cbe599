"""The pipeline drives READY jobs through SEALED → RUNNING → MERGED, then hands them to the outbox.

Each step reads the job's state from the journal, does its work, and records the next state; a step
that is interrupted (crash, SIGKILL, restart) is simply done again from the last recorded state:

- READY   → de-identify (identity to the vault), prepare engine inputs, seal the bundle → SEALED
- SEALED  → RUNNING is recorded *before* any shard starts
- RUNNING → dispatch the shards that have no verified result yet (re-attach), merge, write the
            RT Dose from the anonymized data, re-identify it through the vault → MERGED
- MERGED  → the outbox sends it; SENT only after the TPS answered success

Errors are sorted at this boundary: a plan the engine can never compute is REJECTED with the
reason, anything else FAILED with the reason (a retry starts from the state it failed in).
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from anonymizer.deidentify import deidentify_job
from anonymizer.errors import AnonymizerError
from anonymizer.seal import new_data_key, unwrap_key, wrap_key
from anonymizer.vault import Vault, reidentify
from cloud.backends import get_backend
from cloud.backends.base import Backend
from cloud.bundle import make_bundle
from cloud.dispatch import dispatch, plan_tasks
from cloud.engines import engine_name_for, get_engine
from cloud.engines.base import INPUTS_JSON, ShardInputs, Tally
from cloud.errors import Cancelled, CloudError, UnsupportedPlan
from cloud.merge import merge
from cloud.sizing import CostModel, finish_job, plan_job
from dicom_node.errors import JournalError, NodeError
from dicom_node.intake.jobrecord import JobData, JobState, PublicData
from dicom_node.intake.journal import Job, Journal
from dicom_node.jobs.ctcal import choose_ct_calibration
from dicom_node.jobs.integrity import JobFiles
from dicom_node.jobs.queue_worker import QueueWorker
from dicom_node.jobs.rtdose import write_rt_dose
from dicom_node.net import uids
from dicom_node.settings import Settings, read_site_key

LOGGER = logging.getLogger(__name__)

# How often an idle pipeline looks for jobs put back by `mcnode retry` from another process.
RETRY_SCAN_SECONDS = 5.0
# A job whose failure could not even be written to the journal (disk full) waits this long.
PARK_SECONDS = 60.0


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


def _load(paths: list[str]) -> list[Dataset]:
    return [dcmread(p) for p in paths]


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
        self._worker = QueueWorker("pipeline", self._handle, on_error=self._fail_unexpected,
                                   on_idle=self._pick_up_retries, idle_seconds=RETRY_SCAN_SECONDS)
        self.timings: dict[str, dict[str, float]] = {}
        self._backend: Backend | None = None
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._parked: dict[str, float] = {}  # job id -> when to try again (its failure could not be recorded)
        self._current: str | None = None  # the job a step is working on

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._clean_work_dir()
        self._worker.start()
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
        if self._backend is not None:
            self._backend.cancel()
        self._worker.stop(timeout=5)

    def submit(self, job: Job) -> None:
        with self._lock:
            if job.id in self._queued:
                return
            self._queued.add(job.id)
        self._worker.put(job.id)

    def cancel(self, job_id: str) -> None:
        """The job was recorded CANCELLED: stop its shards if they are running now."""
        with self._lock:
            backend = self._backend if self._current == job_id else None
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
        return self._worker.wait_idle(timeout)

    def _handle(self, job_id: str) -> None:
        try:
            self.process(job_id)
        finally:
            with self._lock:
                self._queued.discard(job_id)

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
        with self._lock:
            self._current = job_id
        while job.state in steps and job.state != until:
            before = job.state
            try:
                job = steps[job.state](job)
            except Cancelled:
                if self.journal.job(job.id).state == JobState.CANCELLED:
                    LOGGER.info("job %s: shards stopped (cancelled)", job.id)
                else:
                    LOGGER.info("job %s: stopped while %s; it resumes on the next start", job.id, before)
                return job
            except UnsupportedPlan as exc:
                job = self.journal.transition(job.id, JobState.REJECTED, reason=str(exc))
            except (CloudError, AnonymizerError, NodeError, OSError) as exc:
                if isinstance(exc, JournalError) and self._cancelled(job.id):
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
        folder = self.job_dir(job.id)
        if folder.exists():
            shutil.rmtree(folder)  # a half-finished earlier attempt
        paths = [job.data.plan, *([job.data.structure_set] if job.data.structure_set else []), *job.data.ct]
        datasets = _load(paths)
        engine = get_engine(engine_name_for(datasets[0], self.settings.engine.name))
        engine.check_plan(datasets[0], beam_models=self._beam_models())
        # Chosen on the original CT: the scanner's name does not survive de-identification.
        calibration = choose_ct_calibration([ds for ds in datasets if str(ds.SOPClassUID) == uids.CT_IMAGE],
                                            self.settings.engine.ct_calibrations)
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
        inputs = engine.prepare(anonymized, folder / "inputs", beam_models=self._beam_models(),
                                ct_calibration=calibration.for_engine())
        self._timed(job.id, "anonymize_prepare", start)
        start = time.perf_counter()
        key = new_data_key()
        (folder / "data.key").write_bytes(wrap_key(self.site_key, key, job.id))
        # what the merge and the RT Dose writer read back later is authenticated (jobs/integrity.py)
        JobFiles(folder, key, job.id).record(f"inputs/{INPUTS_JSON}", *(f"anonymized/{n}" for n in names))
        make_bundle(folder / "bundle.sealed", key, job.id, {"inputs": inputs.root, "dicom": anon_dir},
                    {"engine": engine.name, "files": names})
        self._timed(job.id, "seal", start)
        public = PublicData(warnings=list(inputs.warnings) if inputs.warnings else None,
                            beam_model=str(inputs.extra.get("beam_model", "")), commissioned=inputs.commissioned,
                            # the photon engine converts the CT with its own table
                            ct_calibration=calibration.description if engine.name == "mcsquare"
                            else inputs.ct_calibration)
        return self.journal.transition(job.id, JobState.SEALED, data=JobData(public=public, anonymized=names))

    def _beam_models(self) -> dict[str, Path | str]:
        return dict(self.settings.engine.beam_models)

    def _start_running(self, job: Job) -> Job:
        return self.journal.transition(job.id, JobState.RUNNING, expect=JobState.SEALED)

    def _compute(self, job: Job) -> Job:
        folder = self.job_dir(job.id)
        key = unwrap_key(self.site_key, (folder / "data.key").read_bytes(), job.id)
        # read (and authenticate) what the merge and the RT Dose writer need before any shard runs
        files = JobFiles(folder, key, job.id)
        inputs = ShardInputs.load(folder / "inputs", files.read(f"inputs/{INPUTS_JSON}"))
        anon = [dcmread(BytesIO(files.read(f"anonymized/{n}"))) for n in job.data.anonymized]
        cloud = self.settings.cloud
        sz = cloud.sizing
        cost = CostModel(sz.price_per_ghz_hour, sz.ghz_per_core, sz.cores_per_worker)
        # chosen once per job and recorded before any shard starts, so a resumed job keeps its shard count
        sizing = job.data.public.sizing or plan_job(
            self.journal.list_jobs(), self.settings.engine.primaries, cloud.shards, cost,
            deadline_s=sz.deadline_seconds, cost_cap=sz.cost_cap, max_shards=sz.max_shards)
        self.journal.update_job_data(job.id, JobData(public=PublicData(sizing=sizing)))
        tasks = plan_tasks(job.id, int(sizing["shards"]), self.settings.engine.primaries,
                           (folder / "bundle.sealed").as_uri(), (folder / "results").as_uri())
        options = cloud.backend_options()
        if cloud.backend == "local":
            options["work_dir"] = self.work_dir
        backend = get_backend(cloud.backend, **options)
        with self._lock:
            self._backend = backend
        if self.journal.job(job.id).state == JobState.CANCELLED:
            raise Cancelled("cancelled")
        start = time.perf_counter()
        results = dispatch(tasks, key, backend, on_progress=lambda d, t: self.journal.set_progress(job.id, d, t))
        self._timed(job.id, "compute", start)
        sizing = finish_job(sizing, self.timings[job.id]["compute"], cost)
        start = time.perf_counter()
        tallies = [Tally.from_bytes(b) for b in results]
        rbe = bool(getattr(self.settings.engine, "rbe", False)) and inputs.engine == "mcsquare"  # protons only
        merged = merge(tallies, protons_per_fraction=inputs.protons_per_fraction, fractions=inputs.fractions,
                       rbe=rbe, expected_shards=len(tasks))
        self._timed(job.id, "merge", start)
        start = time.perf_counter()
        plan = next(ds for ds in anon if str(ds.SOPClassUID) in uids.PLAN_CLASSES)
        ct = [ds for ds in anon if str(ds.SOPClassUID) == uids.CT_IMAGE]
        public = job.data.public
        notes = [f"beam model {public.beam_model or inputs.extra.get('beam_model', '?')}",
                 f"CT calibration {public.ct_calibration or inputs.ct_calibration}"]
        dose = write_rt_dose(merged, ct, plan, notes=notes, uncommissioned=not inputs.commissioned)
        dose = reidentify(dose, self.vault.load(job.id))
        out = folder / "RD.dcm"
        dose.save_as(out, enforce_file_format=True)
        files.record(out.name)  # the outbox sends it only if it is still these bytes
        self._timed(job.id, "write", start)
        summary = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in merged.summary.items()}
        return self.journal.transition(job.id, JobState.MERGED, data=JobData(
            rtdose=str(out),
            public=PublicData(summary=summary, shards=len(tasks), primaries=self.settings.engine.primaries,
                              sizing=sizing, shard_wall_s=[round(t.wall_s, 3) for t in tallies])))
