"""The journal: transitions follow the state machine, and `public` job data is merged, never lost."""

from __future__ import annotations

import pytest

from dicom_node.errors import JournalError
from dicom_node.intake.journal import FAILED, MERGED, READY, RECEIVING, SEALED, Journal


def test_public_data_from_several_writers_is_merged(tmp_path):
    with Journal.open(tmp_path) as journal:
        job = journal.create_job("1.2.3", "TPS")
        stale = journal.transition(job.id, READY, data={"public": {"ct_slices": 10}})
        # another writer (the outbox, the second check) adds its keys without reading first ...
        journal.update_job_data(job.id, {"public": {"send_attempts": 1}})
        # ... and a stage holding an older copy of the job adds its own: nothing is lost
        journal.transition(stale.id, SEALED, data={"public": {"warnings": ["beam model fallback"]},
                                                   "anonymized": ["a.dcm"]})
        data = journal.job(job.id).data
        assert data["public"] == {"ct_slices": 10, "send_attempts": 1, "warnings": ["beam model fallback"]}
        assert data["anonymized"] == ["a.dcm"]
        row = journal.list_jobs()[0]
        assert row["send_attempts"] == 1 and row["ct_slices"] == 10


def test_invalid_transitions_and_retry(tmp_path):
    with Journal.open(tmp_path) as journal:
        job = journal.create_job("1.2.4", "TPS")
        with pytest.raises(JournalError, match="RECEIVING → MERGED is not a valid transition"):
            journal.transition(job.id, MERGED)
        with pytest.raises(JournalError, match="only FAILED jobs can be retried"):
            journal.retry(job.id)
        journal.transition(job.id, FAILED, reason="RECEIVING: boom", data={"failed_in": RECEIVING})
        with pytest.raises(JournalError):
            journal.transition(job.id, READY, expect=RECEIVING)
        assert journal.create_job("1.2.4", "TPS").id == job.id  # one job per plan
        assert [s for s, _r, _t in journal.history(job.id)] == [RECEIVING, FAILED]
