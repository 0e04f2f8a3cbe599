"""The journal: transitions follow the state machine, and `public` job data is merged, never lost."""

from __future__ import annotations

import json

import pytest

from dicom_node.errors import JournalError
from dicom_node.intake.jobrecord import JobData, JobState, PublicData
from dicom_node.intake.journal import SCHEMA, SCHEMA_VERSION, Journal


def test_public_data_from_several_writers_is_merged(tmp_path):
    with Journal.open(tmp_path) as journal:
        job = journal.create_job("1.2.3", "TPS")
        stale = journal.transition(job.id, JobState.READY, data=JobData(public=PublicData(ct_slices=10)))
        # another writer (the outbox, the second check) adds its keys without reading first ...
        journal.update_job_data(job.id, JobData(public=PublicData(send_attempts=1)))
        # ... and a stage holding an older copy of the job adds its own: nothing is lost
        journal.transition(stale.id, JobState.SEALED,
                           data=JobData(public=PublicData(warnings=["beam model fallback"]), anonymized=["a.dcm"]))
        data = journal.job(job.id).data
        assert data.public == PublicData(ct_slices=10, send_attempts=1, warnings=["beam model fallback"])
        assert data.anonymized == ["a.dcm"]
        row = journal.list_jobs()[0]
        assert row["send_attempts"] == 1 and row["ct_slices"] == 10


def test_invalid_transitions_and_retry(tmp_path):
    with Journal.open(tmp_path) as journal:
        job = journal.create_job("1.2.4", "TPS")
        with pytest.raises(JournalError, match="RECEIVING → MERGED is not a valid transition"):
            journal.transition(job.id, JobState.MERGED)
        with pytest.raises(JournalError, match="only FAILED jobs can be retried"):
            journal.retry(job.id)
        journal.transition(job.id, JobState.FAILED, reason="RECEIVING: boom",
                           data=JobData(failed_in=JobState.RECEIVING))
        with pytest.raises(JournalError):
            journal.transition(job.id, JobState.READY, expect=JobState.RECEIVING)
        assert journal.create_job("1.2.4", "TPS").id == job.id  # one job per plan while it has not ended
        assert [s for s, _r, _t in journal.history(job.id)] == [JobState.RECEIVING, JobState.FAILED]


def test_old_rows_and_unknown_keys_still_load(tmp_path):
    """A row written by an older (or newer) node: missing keys take defaults, unknown keys survive a write."""
    with Journal.open(tmp_path) as journal:
        job = journal.create_job("1.2.5", "TPS")
        old = {"plan": "/spool/RP.dcm", "structure_set": None, "ct": ["/spool/CT1.dcm"], "failed_in": "RUNNING",
               "from_the_future": {"x": 1}, "public": {"ct_slices": 1, "legacy_note": "kept"}}
        journal._conn.execute("UPDATE jobs SET data=? WHERE id=?", (json.dumps(old), job.id))
        data = journal.job(job.id).data
        assert data.plan == "/spool/RP.dcm" and data.ct == ["/spool/CT1.dcm"] and data.rtdose == ""
        assert data.failed_in is JobState.RUNNING and data.report is None
        assert data.extra == {"from_the_future": {"x": 1}} and data.public.extra == {"legacy_note": "kept"}
        journal.update_job_data(job.id, JobData(public=PublicData(send_attempts=2)))
        stored = json.loads(journal._conn.execute("SELECT data FROM jobs WHERE id=?", (job.id,)).fetchone()[0])
        assert stored["from_the_future"] == {"x": 1} and stored["public"]["legacy_note"] == "kept"
        row = journal.list_jobs()[0]
        assert row["legacy_note"] == "kept" and row["send_attempts"] == 2 and row["ct_slices"] == 1
        assert row["state"] == "RECEIVING" and "verdict" not in row  # unset public fields are not shown


def test_clear_resets_a_field_and_rejects_unknown_names(tmp_path):
    with Journal.open(tmp_path) as journal:
        job = journal.create_job("1.2.6", "TPS")
        journal.transition(job.id, JobState.FAILED, data=JobData(failed_in=JobState.RECEIVING, failed_step="x"))
        assert journal.job(job.id).data.failed_step == "x"
        journal.transition(job.id, JobState.FAILED, clear=("failed_step",))
        assert journal.job(job.id).data.failed_step is None
        assert journal.job(job.id).data.failed_in is JobState.RECEIVING
        with pytest.raises(JournalError, match="unknown job data fields"):
            journal.transition(job.id, JobState.FAILED, clear=("no_such_field",))


def test_plan_sent_again_after_its_job_ended_gets_a_new_job(tmp_path, caplog):
    import logging

    with Journal.open(tmp_path) as journal:
        first = journal.create_job("1.2.5", "TPS")
        assert journal.create_job("1.2.5", "TPS").id == first.id  # still receiving: the same job
        journal.transition(first.id, JobState.REJECTED, reason="photon plan")
        with caplog.at_level(logging.INFO, logger="dicom_node.intake.journal"):
            second = journal.create_job("1.2.5", "TPS")
        assert second.id != first.id and second.state == JobState.RECEIVING
        assert journal.job(first.id).state == JobState.REJECTED  # the old job is kept as it was
        assert journal.job_for_plan("1.2.5").id == second.id
        assert f"plan was sent again after job {first.id} ended (REJECTED)" in caplog.text
        assert "1.2.5" not in caplog.text


def test_journal_with_unique_plan_uid_is_migrated_keeping_its_jobs(tmp_path):
    """A journal written before plans could have several jobs (jobs.plan_uid UNIQUE, user_version 0)."""
    import sqlite3

    old_schema = SCHEMA.replace("plan_uid     TEXT NOT NULL,", "plan_uid     TEXT NOT NULL UNIQUE,")
    assert old_schema != SCHEMA
    with sqlite3.connect(tmp_path / Journal.FILENAME) as conn:
        conn.executescript(old_schema)
        conn.execute("INSERT INTO jobs (id, plan_uid, state, created, updated) VALUES ('aaa', '1.2.6', 'SENT', 1, 1)")
        conn.execute("INSERT INTO transitions (job_id, state, at) VALUES ('aaa', 'SENT', 1)")
    conn.close()
    with Journal.open(tmp_path) as journal:
        assert journal.job("aaa").state == JobState.SENT and journal.history("aaa") == [("SENT", None, 1.0)]
        again = journal.create_job("1.2.6", "TPS")
        assert again.id != "aaa"
    with sqlite3.connect(tmp_path / Journal.FILENAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "UNIQUE" not in conn.execute("SELECT sql FROM sqlite_master WHERE name='jobs'").fetchone()[0]
    conn.close()


def test_multi_line_reason_is_stored_as_one_line_and_logged_in_full(tmp_path, caplog):
    import logging

    with Journal.open(tmp_path) as journal:
        job = journal.create_job("1.2.7", "TPS")
        reason = "RECEIVING: internal error\nTraceback (most recent call last):\n  File x, line 1\nValueError: boom"
        with caplog.at_level(logging.INFO, logger="dicom_node.intake.journal"):
            journal.transition(job.id, JobState.FAILED, reason=reason)
        (row,) = journal.list_jobs()
        assert "\n" not in row["reason"] and row["reason"].endswith("ValueError: boom")
        assert "File x, line 1\nValueError" in caplog.text
