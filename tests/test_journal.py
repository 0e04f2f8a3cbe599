"""The journal: transitions follow the state machine, and `public` job data is merged, never lost."""

from __future__ import annotations

import json

import pytest

from dicom_node.errors import JournalError
from dicom_node.intake.jobrecord import JobData, JobState, PublicData
from dicom_node.intake.journal import Journal


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
        assert journal.create_job("1.2.4", "TPS").id == job.id  # one job per plan
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
