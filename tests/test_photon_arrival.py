"""A plan the engine can never compute is REJECTED on arrival with its reason, without waiting for
its CT (a real RayStation photon plan, sent alone by dcmtk's storescu)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dicom_node.intake.jobrecord import JobState
from tests.conftest import storescu, wait_for

PHOTON_PLAN = Path(__file__).parent / "data" / "realdata" / "raystation_photon" / "RP_photon.dcm"


def test_photon_plan_rejected_on_arrival_naming_the_beams(node_factory, caplog, phantom_dir):
    node = node_factory()
    assert node.settings.trigger.timeout_seconds >= 60  # the rejection below cannot be the timeout's
    caplog.set_level(logging.INFO, logger="dicom_node.intake.assembler")
    start = time.monotonic()
    assert storescu(node.port, [PHOTON_PLAN]).returncode == 0  # stored (nothing received is lost)
    (job,) = wait_for(lambda: node.journal.jobs_in(JobState.REJECTED), timeout=10)
    assert time.monotonic() - start < 10
    assert "PHOTON beams: treatment machine 'CLINACIX_V9' has no beam model" in (job.reason or "")
    assert node.journal.count_instances() == 1
    # the log line comes right after the journal's transition
    wait_for(lambda: any("REJECTED" in r.getMessage() and "PHOTON" in r.getMessage() for r in caplog.records),
             timeout=5)
    # an ion plan of the same node is not refused: it waits for its CT as before
    assert storescu(node.port, [phantom_dir / "RP.dcm"]).returncode == 0
    node.assembler.wait_idle()
    assert len(node.journal.jobs_in(JobState.REJECTED)) == 1
