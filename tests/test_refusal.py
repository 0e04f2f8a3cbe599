"""Early refusal through a running node: a plan the engine can never compute is REJECTED with the
reason within seconds of arriving (the CT timeout is an hour), a CT that cannot be used is REJECTED
when assembled, and the fallback assembly keeps the structure set drawn on the CT."""

from __future__ import annotations

import time

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cloud.engines.mcsquare.adapter import generic_beam_model_path
from dicom_node.intake.jobrecord import JobState
from dicom_node.phantom import write_study
from tests.conftest import SMALL, settings_for, storescu, wait_for
from tests.plan_edits import with_energy, with_machine, with_odd_spot_map, with_range_shifter, without_beams

READY, RECEIVING, REJECTED = JobState.READY, JobState.RECEIVING, JobState.REJECTED


def _site_bdl(folder):
    rs = "Range Shifter parameters\nRS_ID = RS_40MM\nRS_type = binary\nRS_material = 64\nRS_density = 1.19\n" \
         "RS_WET = 40.0\n\n"
    path = folder / "site_bdl.txt"
    path.write_text(generic_beam_model_path().read_text().replace("Beam parameters", rs + "Beam parameters", 1))
    return path


BAD_PLANS = {
    "photon": (None, "PHOTON beams: treatment machine 'unit001' has no beam model"),
    "unmapped": (lambda p: with_machine(p, "TR9"), "treatment machine 'TR9' has no beam model"),
    "no_beams": (without_beams, "RT Ion Plan has no beams"),
    "energy": (lambda p: with_energy(p, 250.0), "energy 250 MeV outside the beam model of machine 'GENERIC_PBS'"),
    "odd_spots": (with_odd_spot_map, "ScanSpotPositionMap has"),
    "range_shifter": (with_range_shifter, "range shifter 'RS_75MM' is not in the beam model of machine 'GENERIC_PBS'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PLANS))
def test_a_plan_the_engine_cannot_compute_is_rejected_on_arrival(kind, config_dir, node_factory, make_study, tmp_path,
                                                                 caplog):
    edit, reason = BAD_PLANS[kind]
    settings = settings_for(config_dir, engine={"beam_models": {SMALL.machine_name: str(_site_bdl(tmp_path))}}) \
        if kind == "range_shifter" else None
    node = node_factory(settings)
    assert node.settings.trigger.timeout_seconds == 3600  # a rejection within seconds is not the timeout
    if edit is None:
        path = get_testdata_file("rtplan.dcm")
    else:
        path = tmp_path / "RP.dcm"
        edit(make_study().plan).save_as(path, enforce_file_format=True)
    start = time.monotonic()
    assert storescu(node.port, [path]).returncode == 0  # stored (nothing received is lost), then refused
    job = wait_for(lambda: node.journal.jobs_in(REJECTED), timeout=10)[0]
    assert reason in job.reason and time.monotonic() - start < 10
    assert [s for s, _r, _t in node.journal.history(job.id)] == [RECEIVING, REJECTED]
    assert node.journal.instance(job.plan_uid) is not None
    wait_for(lambda: any(reason in r.getMessage() for r in caplog.records), timeout=5)  # and the log says why


def test_a_plan_from_a_sender_without_a_destination_is_rejected_on_arrival(config_dir, node_factory, phantom_dir,
                                                                          caplog):
    """The dose of a plan from an AE title with no `[[destinations]]` entry could never go back: the
    job is REJECTED when the plan arrives, not computed for minutes and then left MERGED."""
    settings = settings_for(config_dir, destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS",
                                                       "host": "127.0.0.1", "port": 11113}])
    node = node_factory(settings, compute=True)
    start = time.monotonic()
    assert storescu(node.port, sorted(phantom_dir.iterdir()), "TPS2").returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(REJECTED), timeout=10)[0]
    assert "no [[destinations]] entry for calling AE title 'TPS2'" in job.reason
    assert time.monotonic() - start < 10
    assert [s for s, _r, _t in node.journal.history(job.id)] == [RECEIVING, REJECTED]
    assert node.journal.instance(job.plan_uid) is not None  # what was received is kept
    assert any("TPS2" in r.getMessage() and "REJECTED" in r.getMessage() for r in caplog.records)
    # the same study from the TPS the node knows is accepted and assembled
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    wait_for(lambda: [j for j in node.journal.all_jobs() if j.calling_ae == "TPS" and j.state != REJECTED], timeout=10)


def test_a_ct_with_a_gap_is_rejected_when_assembled(node_factory, make_study, tmp_path):
    node = node_factory()
    study = make_study()
    del study.plan.ReferencedStructureSetSequence
    folder = tmp_path / "gap"
    write_study(study, folder)
    (folder / "RS.dcm").unlink()
    cts = sorted(folder.glob("CT_*.dcm"), key=lambda p: float(dcmread(p).ImagePositionPatient[2]))
    gone = cts.pop(len(cts) // 2)
    assert storescu(node.port, [folder / "RP.dcm", *cts]).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(REJECTED), timeout=15)[0]
    z = float(dcmread(gone).ImagePositionPatient[2])
    assert "CT has a gap or uneven spacing: 10 mm between slices at z = " f"{z - 5:g} and {z + 5:g} mm" in job.reason


def test_a_tilted_ct_is_rejected_when_assembled(node_factory, make_study, tmp_path):
    node = node_factory()
    study = make_study()
    for ct in study.ct:
        ct.GantryDetectorTilt = 12.0
    write_study(study, tmp_path / "tilt")
    assert storescu(node.port, sorted((tmp_path / "tilt").iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(REJECTED), timeout=15)[0]
    assert job.reason == "CT acquired with gantry tilt 12 degrees; only untilted CT is supported"


def test_fallback_assembly_keeps_the_structure_set_drawn_on_the_ct(node_factory, make_study, tmp_path):
    """The plan names a structure set that never comes (an export mix-up); another one drawn on the same
    CT does: assembly falls back to the frame of reference and keeps that structure set (body contour)."""
    node = node_factory()
    study = make_study()
    study.plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = generate_uid()  # never sent
    folder = tmp_path / "mixup"
    write_study(study, folder)
    assert storescu(node.port, sorted(folder.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(READY), timeout=15)[0]
    assert "stable" in job.data.public.assembly
    assert job.data.structure_set is not None
    kept = dcmread(job.data.structure_set)
    assert kept.SOPInstanceUID == study.rtstruct.SOPInstanceUID
    assert "BODY" in [r.ROIName for r in kept.StructureSetROISequence]


def test_a_waiting_plan_is_checked_again_after_a_restart(config_dir, node_factory, phantom_dir):
    """Received under a config that mapped its machine, still waiting for its CT when the node stops; the
    machine is no longer mapped when it starts again: REJECTED with the reason, not left waiting."""
    node = node_factory()
    assert storescu(node.port, [phantom_dir / "RP.dcm"]).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(RECEIVING))[0]
    node.stop()
    unmapped = settings_for(config_dir, engine={"beam_models": {}})
    again = node_factory(unmapped)
    done = wait_for(lambda: again.journal.jobs_in(REJECTED), timeout=10)[0]
    assert done.id == job.id and "treatment machine 'GENERIC_PBS' has no beam model" in done.reason
