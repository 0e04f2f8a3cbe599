"""The journal: one SQLite database (WAL) of received instances, jobs and every state transition.

A transition is written before the side effect that follows it, so a restarted node resumes from
the last recorded state. The database lives on the clinic node only; it holds UIDs and file paths,
and a hash of the patient ID (to keep patients apart) rather than the ID itself.

The job states, their transitions and the fields of a job's data are in `jobrecord.py`
(design: DESIGN.md at the repository root).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.errors import JournalError
from dicom_node.intake.jobrecord import FIELDS, TRANSITIONS, JobData, JobState

LOGGER = logging.getLogger(__name__)

# A job in one of these states has ended: a plan sent again then starts a new job.
FINAL_STATES = (JobState.SENT, JobState.VERIFIED, JobState.REJECTED, JobState.CANCELLED)

_JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id           TEXT PRIMARY KEY,
    plan_uid     TEXT NOT NULL,          -- a plan resent after its job ended gets a new job
    state        TEXT NOT NULL,
    reason       TEXT,
    calling_ae   TEXT,
    created      REAL NOT NULL,
    updated      REAL NOT NULL,
    shards_done  INTEGER NOT NULL DEFAULT 0,
    shards_total INTEGER NOT NULL DEFAULT 0,
    data         TEXT NOT NULL DEFAULT '{}'
);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid    TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    for_uid          TEXT,
    patient_key      TEXT NOT NULL,
    path             TEXT NOT NULL,
    calling_ae       TEXT,
    received         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_for ON instances(for_uid);
CREATE TABLE IF NOT EXISTS refs (
    sop_instance_uid TEXT NOT NULL,
    kind             TEXT NOT NULL,   -- 'structure_set' | 'image' | 'plan'
    ref_uid          TEXT NOT NULL,
    PRIMARY KEY (sop_instance_uid, kind, ref_uid)
);
CREATE INDEX IF NOT EXISTS refs_ref ON refs(ref_uid);
{jobs_table}
CREATE TABLE IF NOT EXISTS transitions (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id   TEXT NOT NULL REFERENCES jobs(id),
    state    TEXT NOT NULL,
    reason   TEXT,
    at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job_id);
"""
SCHEMA = SCHEMA.replace("{jobs_table}", _JOBS_TABLE.replace("{name}", "jobs").strip())
# PRAGMA user_version of a journal with the schema above; older journals are migrated at open.
SCHEMA_VERSION = 1
_JOBS_COLUMNS = "id, plan_uid, state, reason, calling_ae, created, updated, shards_done, shards_total, data"


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    for_uid: str | None
    patient_key: str
    path: str
    calling_ae: str | None
    received: float


@dataclass(frozen=True)
class Job:
    id: str
    plan_uid: str
    state: JobState
    reason: str | None
    calling_ae: str | None
    created: float
    updated: float
    shards_done: int
    shards_total: int
    data: JobData


def _one_line(text: str, limit: int = 300) -> str:
    """A reason as shown in `mcnode jobs`: one line, bounded (the full text goes to the log)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], plan_uid=row["plan_uid"], state=JobState(row["state"]), reason=row["reason"],
        calling_ae=row["calling_ae"], created=row["created"], updated=row["updated"],
        shards_done=row["shards_done"], shards_total=row["shards_total"],
        data=JobData.from_json(json.loads(row["data"])),
    )


def _merge_data(stored: str, patch: JobData | None, clear: tuple[str, ...]) -> str:
    """The stored JSON after a patch (see `JobData.merged`).

    Merging here, inside the write transaction, means no stage has to read-modify-write the data
    (the outbox and the second check update it from other threads than the pipeline).
    """
    unknown = set(clear) - FIELDS
    if unknown:
        raise JournalError(f"cannot clear unknown job data fields {sorted(unknown)}")
    data = JobData.from_json(json.loads(stored))
    return json.dumps(data.merged(patch or JobData(), clear).to_json())


class Journal:
    """Thread-safe access to the journal database (one connection, one lock)."""

    FILENAME = "journal.sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)
            self._conn.execute("CREATE INDEX IF NOT EXISTS jobs_plan ON jobs(plan_uid)")
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        self._lock = threading.RLock()

    def _migrate(self) -> None:
        """Version 0 -> 1: jobs.plan_uid loses UNIQUE (one plan, several jobs over time).

        SQLite cannot drop a constraint, so the table is rebuilt in one transaction, with foreign
        keys off while the old table goes (SQLite's documented procedure) and checked before COMMIT.
        """
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        row = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='jobs'").fetchone()
        if version >= SCHEMA_VERSION or row is None or "UNIQUE" not in row[0].upper():
            return
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_JOBS_TABLE.replace("{name}", "jobs_new"))
            conn.execute(f"INSERT INTO jobs_new ({_JOBS_COLUMNS}) SELECT {_JOBS_COLUMNS} FROM jobs")
            conn.execute("DROP TABLE jobs")
            conn.execute("ALTER TABLE jobs_new RENAME TO jobs")
            if conn.execute("PRAGMA foreign_key_check").fetchall():
                raise sqlite3.IntegrityError("foreign key check failed after rebuilding jobs")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        LOGGER.info("journal migrated to schema version %d (a resent plan may start a new job)", SCHEMA_VERSION)

    @classmethod
    def open(cls, data_dir: Path) -> Journal:
        return cls(Path(data_dir) / cls.FILENAME)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise JournalError(f"journal write failed: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        # SQLite has already rolled back on some errors (a full disk during COMMIT); a ROLLBACK then
        # would raise "no transaction is active" over the error that matters.
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                LOGGER.warning("journal: rollback failed: %s", exc)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"journal read failed: {exc}") from exc

    # --- instances ----------------------------------------------------------------------

    def add_instance(self, inst: Instance, refs: list[tuple[str, str]]) -> bool:
        """Record a stored instance and its references. Returns False if it was already known."""
        with self._tx() as conn:
            known = conn.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?",
                                 (inst.sop_instance_uid,)).fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                (inst.sop_instance_uid, inst.sop_class_uid, inst.study_uid, inst.series_uid, inst.for_uid,
                 inst.patient_key, inst.path, inst.calling_ae, inst.received),
            )
            conn.execute("DELETE FROM refs WHERE sop_instance_uid=?", (inst.sop_instance_uid,))
            conn.executemany("INSERT OR IGNORE INTO refs VALUES (?,?,?)",
                             [(inst.sop_instance_uid, kind, uid) for kind, uid in refs])
        return known is None

    def instance(self, sop_instance_uid: str) -> Instance | None:
        rows = self._query("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
        return Instance(**dict(rows[0])) if rows else None

    def instances_where(self, **where: Any) -> list[Instance]:
        clause = " AND ".join(f"{k}=?" for k in where)
        rows = self._query(f"SELECT * FROM instances WHERE {clause}", tuple(where.values()))
        return [Instance(**dict(r)) for r in rows]

    def instances_received_before(self, when: float) -> list[Instance]:
        rows = self._query("SELECT * FROM instances WHERE received < ?", (when,))
        return [Instance(**dict(r)) for r in rows]

    def refs(self, sop_instance_uid: str, kind: str) -> list[str]:
        rows = self._query("SELECT ref_uid FROM refs WHERE sop_instance_uid=? AND kind=?",
                           (sop_instance_uid, kind))
        return [r["ref_uid"] for r in rows]

    def referencing(self, ref_uid: str, kind: str) -> list[Instance]:
        """Instances that reference `ref_uid` as `kind` (e.g. the RT Doses of a plan), oldest first."""
        rows = self._query("SELECT i.* FROM refs r JOIN instances i ON i.sop_instance_uid = r.sop_instance_uid "
                           "WHERE r.ref_uid=? AND r.kind=? ORDER BY i.received", (ref_uid, kind))
        return [Instance(**dict(r)) for r in rows]

    def present(self, sop_instance_uids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(sop_instance_uids), 500):
            chunk = sop_instance_uids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._query(f"SELECT sop_instance_uid FROM instances WHERE sop_instance_uid IN ({marks})",
                               tuple(chunk))
            found.update(r["sop_instance_uid"] for r in rows)
        return found

    def count_instances(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])

    # --- jobs ---------------------------------------------------------------------------

    def create_job(self, plan_uid: str, calling_ae: str | None, data: JobData | None = None) -> Job:
        """Create a job for a plan in RECEIVING, or return the plan's job while that has not ended.

        A plan sent again after its job ended (SENT, VERIFIED, REJECTED) is a new request: a new
        job; the old one stays in the journal as it was.
        """
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE plan_uid=? ORDER BY created DESC, rowid DESC LIMIT 1",
                               (plan_uid,)).fetchone()
            if row is not None and row["state"] not in FINAL_STATES:
                return _job(row)
            previous = _job(row) if row is not None else None
            job_id = secrets.token_hex(6)
            conn.execute(
                "INSERT INTO jobs (id, plan_uid, state, reason, calling_ae, created, updated, data) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job_id, plan_uid, JobState.RECEIVING, None, calling_ae, now, now,
                 json.dumps((data or JobData()).to_json())),
            )
            conn.execute("INSERT INTO transitions (job_id, state, reason, at) VALUES (?,?,?,?)",
                         (job_id, JobState.RECEIVING, None, now))
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if previous is not None:
            LOGGER.info("job %s created (RECEIVING): its plan was sent again after job %s ended (%s)", job_id,
                        previous.id, previous.state)
        else:
            LOGGER.info("job %s created (RECEIVING)", job_id)
        return _job(row)

    def job(self, job_id: str) -> Job:
        rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise JournalError(f"no job {job_id}")
        return _job(rows[0])

    def job_for_plan(self, plan_uid: str) -> Job | None:
        """The newest job of a plan."""
        rows = self._query("SELECT * FROM jobs WHERE plan_uid=? ORDER BY created DESC, rowid DESC LIMIT 1",
                           (plan_uid,))
        return _job(rows[0]) if rows else None

    def all_jobs(self) -> list[Job]:
        return [_job(r) for r in self._query("SELECT * FROM jobs ORDER BY created")]

    def instances_at(self, paths: set[str]) -> list[Instance]:
        """The instances stored at these spool paths."""
        rows = self._query("SELECT * FROM instances")
        return [Instance(**dict(r)) for r in rows if r["path"] in paths]

    def remove_instances(self, sop_instance_uids: list[str]) -> None:
        """Forget instances whose files were removed (retention)."""
        with self._tx() as conn:
            for uid in sop_instance_uids:
                conn.execute("DELETE FROM refs WHERE sop_instance_uid=?", (uid,))
                conn.execute("DELETE FROM instances WHERE sop_instance_uid=?", (uid,))

    def jobs_in(self, *states: JobState) -> list[Job]:
        marks = ",".join("?" * len(states))
        rows = self._query(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created", states)
        return [_job(r) for r in rows]

    def transition(self, job_id: str, state: JobState, reason: str | None = None,
                   data: JobData | None = None, expect: JobState | tuple[JobState, ...] | None = None,
                   clear: tuple[str, ...] = ()) -> Job:
        """Move a job to `state` (recorded with its time); merge the patch `data` into the job's data
        and reset the fields named in `clear`.

        `expect` guards against racing writers: the move happens only from those states.
        """
        try:
            state = JobState(state)
        except ValueError:
            raise JournalError(f"unknown state {state!r}") from None
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JournalError(f"no job {job_id}")
            current = JobState(row["state"])
            allowed = (expect,) if isinstance(expect, JobState) else expect
            if allowed is not None and current not in allowed:
                raise JournalError(f"job {job_id} is {current}, expected {' or '.join(allowed)}")
            if state != current and state not in TRANSITIONS[current]:
                raise JournalError(f"job {job_id}: {current} → {state} is not a valid transition")
            merged = _merge_data(row["data"], data, clear)
            shown = _one_line(reason) if reason else reason  # the full text goes to the log below
            conn.execute("UPDATE jobs SET state=?, reason=?, updated=?, data=? WHERE id=?",
                         (state, shown, now, merged, job_id))
            conn.execute("INSERT INTO transitions (job_id, state, reason, at) VALUES (?,?,?,?)",
                         (job_id, state, shown, now))
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        LOGGER.info("job %s → %s%s", job_id, state, f" ({reason})" if reason else "")
        return _job(row)

    def update_job_data(self, job_id: str, data: JobData) -> None:
        with self._tx() as conn:
            row = conn.execute("SELECT data FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JournalError(f"no job {job_id}")
            merged = _merge_data(row["data"], data, ())
            conn.execute("UPDATE jobs SET data=?, updated=? WHERE id=?", (merged, time.time(), job_id))

    def set_progress(self, job_id: str, done: int, total: int) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET shards_done=?, shards_total=?, updated=? WHERE id=?",
                         (done, total, time.time(), job_id))

    def retry(self, job_id: str) -> Job:
        """Put a FAILED job back where the running node takes it up again.

        A job that failed on its way to the dose starts again at READY. The pipeline seals it afresh
        from the received originals, unless it failed while RUNNING and its job folder still verifies
        in full (key, job files' MACs, bundle, settings it was sealed under): then the folder is kept
        and only the shards without a verified result run (pipeline.Pipeline._keep_sealed); a corrupt
        or changed bundle or job file is never reused. A failed second check (failed in SENT) goes back
        to SENT.
        """
        job = self.job(job_id)
        if job.state != JobState.FAILED:
            raise JournalError(f"job {job_id} is {job.state}; only FAILED jobs can be retried")
        failed_in = job.data.failed_in or JobState.READY
        back_to = failed_in if failed_in in (JobState.SENT, JobState.VERIFIED) else JobState.READY
        reason = _one_line(f"retry after: {job.reason}")
        return self.transition(job_id, back_to, reason=reason, expect=JobState.FAILED)

    def cancel(self, job_id: str, who: str) -> Job:
        """Record CANCELLED (final) for a job whose dose is not delivered yet; a running node stops its shards."""
        job = self.job(job_id)
        if JobState.CANCELLED not in TRANSITIONS[job.state]:
            raise JournalError(f"job {job_id} is {job.state}: it cannot be cancelled (its dose was delivered "
                               "or it has ended)")
        return self.transition(job_id, JobState.CANCELLED, reason=f"cancelled by {who} (was {job.state})",
                               expect=job.state)

    def history(self, job_id: str) -> list[tuple[JobState, str | None, float]]:
        rows = self._query("SELECT state, reason, at FROM transitions WHERE job_id=? ORDER BY seq", (job_id,))
        return [(JobState(r["state"]), r["reason"], r["at"]) for r in rows]

    def list_jobs(self) -> list[dict[str, Any]]:
        """Jobs for display: ids, states, reasons, times and progress, nothing about the patient."""
        rows = self._query("SELECT * FROM jobs ORDER BY created")
        out = []
        for r in rows:
            public = JobData.from_json(json.loads(r["data"])).public.to_json()
            item: dict[str, Any] = {
                "id": r["id"], "state": r["state"], "reason": r["reason"],
                "created": _iso(r["created"]), "updated": _iso(r["updated"]),
                "shards_done": r["shards_done"], "shards_total": r["shards_total"],
            }
            item.update(public)
            out.append(item)
        return out
