"""The engine's cheap "can this plan be computed" check: each bad input is refused, naming what is wrong."""

from __future__ import annotations

import shutil

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from cloud.engines import get_engine
from cloud.engines.base import UNCOMMISSIONED
from cloud.engines.ct import ct_grid
from cloud.engines.mcsquare.adapter import generic_beam_model_path
from cloud.errors import UnsupportedPlan
from dicom_node.phantom import PhantomSpec, Spot, build_study
from tests.plan_edits import with_energy, with_machine, with_odd_spot_map, with_range_shifter, without_beams

ENGINE = get_engine("mcsquare")
SPEC = PhantomSpec(size_mm=(60.0, 60.0, 40.0), spacing_mm=(5.0, 5.0, 5.0), water_box_mm=(40.0, 40.0, 30.0),
                   bone_slab_thickness_mm=0.0, target_radius_mm=10.0, machine_name="TR3",
                   spots=(Spot(0.0, 0.0, 80.0, 2.0),))
GENERIC = {"TR3": "generic"}


@pytest.fixture
def site_bdl(tmp_path):
    """A commissioned-looking BDL of our own with one range shifter, RS_40MM."""
    text = generic_beam_model_path().read_text()
    rs = "Range Shifter parameters\nRS_ID = RS_40MM\nRS_type = binary\nRS_material = 64\nRS_density = 1.19\n" \
         "RS_WET = 40.0\n\n"
    path = tmp_path / "tr3.txt"
    path.write_text(text.replace("Beam parameters", rs + "Beam parameters", 1))
    return path


def plan():
    return build_study(SPEC).plan


def test_a_generic_mapping_is_accepted_and_says_uncommissioned():
    warnings = ENGINE.check_plan(plan(), beam_models=GENERIC)
    assert len(warnings) == 1 and warnings[0].startswith(UNCOMMISSIONED) and "'TR3'" in warnings[0]


def test_a_commissioned_mapping_carries_no_warning(site_bdl):
    assert ENGINE.check_plan(plan(), beam_models={"TR3": site_bdl}) == ()


@pytest.mark.parametrize("models", [None, {}, {"OTHER": "generic"}])
def test_an_unmapped_machine_is_refused_by_name(models):
    with pytest.raises(UnsupportedPlan, match=r"treatment machine 'TR3' has no beam model.*beam_models"):
        ENGINE.check_plan(plan(), beam_models=models)


def test_a_photon_plan_is_refused():
    with pytest.raises(UnsupportedPlan, match="RT Plan with PHOTON beams"):
        ENGINE.check_plan(dcmread(get_testdata_file("rtplan.dcm")), beam_models=GENERIC)


def test_a_plan_without_beams_is_refused():
    with pytest.raises(UnsupportedPlan, match="has no beams"):
        ENGINE.check_plan(without_beams(plan()), beam_models=GENERIC)


def test_an_energy_outside_the_beam_model_is_refused():
    with pytest.raises(UnsupportedPlan, match=r"beam G000: energy 250 MeV outside the beam model of machine 'TR3' "
                                              r"\(generic_pbs_bdl.txt: 70-230 MeV\)"):
        ENGINE.check_plan(with_energy(plan(), 250.0), beam_models=GENERIC)


def test_an_odd_spot_map_is_refused():
    with pytest.raises(UnsupportedPlan, match="beam G000, control point 0: ScanSpotPositionMap has 1 values, an odd"):
        ENGINE.check_plan(with_odd_spot_map(plan()), beam_models=GENERIC)


def test_a_range_shifter_the_model_does_not_know_is_refused(site_bdl):
    ENGINE.check_plan(with_range_shifter(plan(), "RS_40MM", 40.0), beam_models={"TR3": site_bdl})
    with pytest.raises(UnsupportedPlan, match=r"range shifter 'RS_75MM' is not in the beam model of machine 'TR3' "
                                              r"\(tr3.txt; its range shifters: RS_40MM\)"):
        ENGINE.check_plan(with_range_shifter(plan()), beam_models={"TR3": site_bdl})


def test_the_generic_model_models_any_range_shifter_from_its_wet():
    assert ENGINE.check_plan(with_range_shifter(plan()), beam_models=GENERIC)


def test_a_machine_name_missing_is_named():
    with pytest.raises(UnsupportedPlan, match="treatment machine '.no TreatmentMachineName.' has no beam model"):
        ENGINE.check_plan(with_machine(plan(), ""), beam_models=GENERIC)


def test_a_malformed_plan_is_a_rejection_not_an_internal_error():
    p = plan()
    del p.IonBeamSequence[0].IonControlPointSequence[0].IsocenterPosition
    del p.FractionGroupSequence
    with pytest.raises(UnsupportedPlan):
        ENGINE.check_plan(p, beam_models=GENERIC)


def test_ct_with_a_gap_or_tilt_is_refused_naming_it():
    ct = build_study(SPEC).ct
    ct_grid(ct)
    with pytest.raises(UnsupportedPlan, match=r"CT has a gap.*10 mm between slices at z = -2.5 and 7.5 mm, 5 mm"):
        ENGINE.check_ct([c for c in ct if float(c.ImagePositionPatient[2]) != 2.5])
    tilted = build_study(SPEC).ct
    for c in tilted:
        c.ImageOrientationPatient = [1, 0, 0, 0, 0.9962, 0.0872]
    with pytest.raises(UnsupportedPlan, match="CT is tilted or oblique"):
        ENGINE.check_ct(tilted)
    for c in tilted:
        c.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        c.GantryDetectorTilt = 5.0
    with pytest.raises(UnsupportedPlan, match="gantry tilt 5 degrees"):
        ENGINE.check_ct(tilted)


def test_a_site_bdl_copy_is_read(site_bdl, tmp_path):
    shutil.copy(site_bdl, tmp_path / "copy.txt")
    assert ENGINE.check_plan(plan(), beam_models={"TR3": tmp_path / "copy.txt"}) == ()
