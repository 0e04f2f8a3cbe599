"""Engine plumbing without physics: rejection, merge rules, tally transport, RT Dose, CLI."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from cloud.engines import get_engine
from cloud.engines.base import UNCOMMISSIONED, ShardInputs, Tally
from cloud.engines.ct import ct_grid
from cloud.engines.mcsquare.adapter import generic_beam_model_path
from cloud.engines.mcsquare.bdl import generic_bdl_text, read_bdl
from cloud.errors import EngineError, MergeError, UnsupportedPlan
from cloud.merge import merge
from dicom_node.cli import main
from dicom_node.jobs.rtdose import write_rt_dose
from dicom_node.phantom import PhantomSpec, Spot, build_study, write_study

TINY = PhantomSpec(size_mm=(60.0, 60.0, 40.0), spacing_mm=(5.0, 5.0, 5.0), water_box_mm=(40.0, 40.0, 30.0),
                   bone_slab_thickness_mm=0.0, target_radius_mm=10.0, fractions=5, machine_name="GANTRY_X",
                   spots=(Spot(0.0, 0.0, 80.0, 2.0),))


GENERIC = {"GANTRY_X": "generic"}  # TINY's machine, mapped explicitly to the uncommissioned model


def tallies(shape=(2, 3, 4), n=4, primaries=100, seed0=0):
    rng = np.random.default_rng(7)
    return [Tally(dose_per_primary=(1e-12 + 1e-13 * rng.standard_normal(shape)).astype(np.float32),
                  primaries=primaries, seed=seed0 + i, wall_s=0.1) for i in range(n)]


def test_photon_plan_is_rejected_with_its_reason():
    plan = dcmread(get_testdata_file("rtplan.dcm"))
    with pytest.raises(UnsupportedPlan, match="RT Plan with PHOTON beams"):
        get_engine("mcsquare").check_plan(plan)


def test_non_pbs_ion_plan_is_rejected():
    plan = build_study(TINY).plan
    plan.IonBeamSequence[0].ScanMode = "UNIFORM"
    with pytest.raises(UnsupportedPlan, match="not pencil-beam scanning"):
        get_engine("mcsquare").check_plan(plan)


def test_unknown_engine_is_named():
    with pytest.raises(EngineError, match="unknown engine 'fluka'.*mcsquare"):
        get_engine("fluka")


def test_shipped_generic_beam_model_is_what_the_derivation_generates():
    assert generic_beam_model_path().read_text() == generic_bdl_text()
    model = read_bdl(generic_beam_model_path())
    assert model.energies[0] == 70 and model.energies[-1] == 230
    # protons per MU rises with energy (charge per proton in the monitor falls with stopping power)
    assert np.all(np.diff(model.protons_per_mu) > 0)


def test_prepare_writes_a_self_contained_folder_and_marks_the_generic_model(tmp_path):
    study = build_study(TINY)
    inputs = get_engine("mcsquare").prepare(study.all(), tmp_path / "in", beam_models=GENERIC)
    names = {p.name for p in (tmp_path / "in").iterdir()}
    assert {"CT.mhd", "CT.raw", "BDL.txt", "PlanPencil.txt", "HU_Density_Conversion.txt",
            "HU_Material_Conversion.txt", "inputs.json"} <= names
    loaded = ShardInputs.load(tmp_path / "in")
    assert loaded.grid == inputs.grid and loaded.fractions == 5
    assert loaded.protons_per_fraction == pytest.approx(2.0 * np.interp(80.0, *_ppmu()))
    assert any(w.startswith(UNCOMMISSIONED) and "'GANTRY_X'" in w for w in loaded.warnings)
    assert loaded.commissioned is False and loaded.ct_calibration == "built-in"


def test_prepare_refuses_an_unmapped_machine(tmp_path):
    with pytest.raises(UnsupportedPlan, match="treatment machine 'GANTRY_X' has no beam model"):
        get_engine("mcsquare").prepare(build_study(TINY).all(), tmp_path / "in")
    assert not (tmp_path / "in" / "CT.mhd").exists()


def test_beam_model_protons_are_linear_in_mu_and_refused_outside_its_energies():
    model = read_bdl(generic_beam_model_path())
    assert model.protons_for(100.0, 3.0) == pytest.approx(3.0 * model.protons_for(100.0, 1.0))
    assert model.covers(70.0) and model.covers(230.0) and not model.covers(250.0)
    with pytest.raises(UnsupportedPlan, match=r"energy 250 MeV outside the beam model \(70-230 MeV\)"):
        model.protons_for(250.0, 1.0)


def _ppmu():
    m = read_bdl(generic_beam_model_path())
    return m.energies, m.protons_per_mu


def test_tally_round_trips_through_bytes():
    t = tallies(n=1)[0]
    back = Tally.from_bytes(t.to_bytes())
    np.testing.assert_array_equal(back.dose_per_primary, t.dose_per_primary)
    assert (back.primaries, back.seed) == (t.primaries, t.seed)


def test_merge_refuses_partial_duplicate_or_mismatched_sets():
    ts = tallies()
    with pytest.raises(MergeError, match="3 of 4 shards"):
        merge(ts[:3], 1e9, 1, expected_shards=4)
    with pytest.raises(MergeError, match="same seed"):
        merge([ts[0], ts[0]], 1e9, 1, expected_shards=2)
    with pytest.raises(MergeError, match="expected 500"):
        merge(ts, 1e9, 1, expected_shards=4, expected_primaries=500)
    odd = tallies(shape=(2, 3, 5), n=1, seed0=9)
    with pytest.raises(MergeError, match="different grids"):
        merge([ts[0], odd[0]], 1e9, 1, expected_shards=2)


def test_merge_scales_to_gy_applies_rbe_and_fractions_and_estimates_the_error():
    ts = tallies(n=4)
    m = merge(ts, 2e9, 30, expected_shards=4)
    stack = np.stack([t.dose_per_primary.astype(np.float64) for t in ts])
    np.testing.assert_allclose(m.per_fraction_gy, stack.mean(0) * 2e9)
    np.testing.assert_allclose(m.plan_gy, m.per_fraction_gy * 30)
    np.testing.assert_allclose(m.std_error_per_fraction_gy, stack.std(0, ddof=1) / 2 * 2e9, rtol=1e-9)
    effective = merge(ts, 2e9, 30, rbe=True, expected_shards=4)
    np.testing.assert_allclose(effective.per_fraction_gy, 1.1 * m.per_fraction_gy)
    assert effective.dose_type == "EFFECTIVE" and m.dose_type == "PHYSICAL"
    assert m.summary["max_dose_plan_gy"] == pytest.approx(m.plan_gy.max())
    high = m.per_fraction_gy >= 0.5 * m.per_fraction_gy.max()
    pooled = np.sqrt((m.std_error_per_fraction_gy[high] ** 2).sum() / (m.per_fraction_gy[high] ** 2).sum())
    assert m.summary["uncertainty_percent"] == pytest.approx(100 * pooled)
    assert merge(ts[:1], 2e9, 30, expected_shards=1).std_error_per_fraction_gy is None


def test_rt_dose_references_and_geometry(tmp_path):
    study = build_study(TINY)
    nz, ny, nx = len(study.ct), study.ct[0].Rows, study.ct[0].Columns
    ts = [Tally(np.linspace(0, 1e-12, nz * ny * nx, dtype=np.float32).reshape(nz, ny, nx), 10, s, 0.0)
          for s in range(2)]
    merged = merge(ts, 1e9, 5, expected_shards=2)
    grid = ct_grid(sorted(study.ct, key=lambda d: float(d.ImagePositionPatient[2])))
    rd = write_rt_dose(merged, grid, study.ct[3], study.plan, dose_to_water=False,
                       marks=["uncertainty above target"], notes=["beam model site.txt"])
    assert UNCOMMISSIONED not in f"{rd.SeriesDescription} {rd.DoseComment} {rd.ImageComments}"  # commissioned
    assert rd.ImageComments.endswith("; beam model site.txt") and len(rd.DoseComment) <= 64
    path = tmp_path / "rd.dcm"
    rd.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    ct0 = study.ct[0]
    assert back.StudyInstanceUID == ct0.StudyInstanceUID and back.PatientID == ct0.PatientID
    assert back.FrameOfReferenceUID == ct0.FrameOfReferenceUID
    assert back.SeriesInstanceUID != ct0.SeriesInstanceUID
    assert back.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == study.plan.SOPInstanceUID
    assert (back.DoseUnits, back.DoseType, back.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert back.DoseComment == "UNCERTAINTY ABOVE TARGET; DOSE TO MEDIUM"
    assert back.SeriesDescription == "UNCERTAINTY ABOVE TARGET (MC)"
    assert [float(v) for v in back.ImagePositionPatient] == [float(v) for v in ct0.ImagePositionPatient]
    offsets = [float(v) for v in back.GridFrameOffsetVector]
    assert offsets[0] == 0 and offsets == pytest.approx([5.0 * k for k in range(nz)])
    assert back.BitsAllocated == 32 and back.PixelRepresentation == 0
    gy = back.pixel_array.astype(np.float64) * float(back.DoseGridScaling)
    np.testing.assert_allclose(gy, merged.plan_gy, atol=float(back.DoseGridScaling))
    if shutil.which("dcmdump"):
        out = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and "DoseGridScaling" in out.stdout and "E:" not in out.stderr


def test_compute_cli_rejects_a_photon_plan(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(get_testdata_file("rtplan.dcm"), tmp_path / "in" / "rtplan.dcm")
    assert main(["compute", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--primaries", "10"]) != 0
    assert "PHOTON" in capsys.readouterr().err


@pytest.mark.slow
def test_compute_cli_writes_one_rt_dose(tmp_path, capsys):
    write_study(build_study(TINY), tmp_path / "in")
    args = ["compute", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--primaries", "4000", "--shards", "2",
            "--threads", "2"]
    assert main(args) != 0  # GANTRY_X is mapped to no beam model
    assert "treatment machine 'GANTRY_X' has no beam model" in capsys.readouterr().err
    assert main([*args, "--beam-model", "GANTRY_X=generic"]) == 0
    files = list((tmp_path / "out").iterdir())
    rd = dcmread(files[0])
    assert len(files) == 1 and rd.Modality == "RTDOSE"
    assert rd.SeriesDescription.startswith(UNCOMMISSIONED) and rd.DoseComment.startswith(UNCOMMISSIONED)
    assert rd.ImageComments.startswith(UNCOMMISSIONED) and "CT calibration built-in tables" in rd.ImageComments
    out = capsys.readouterr().out
    assert "max dose" in out and UNCOMMISSIONED in out


@pytest.mark.slow
def test_shard_runs_when_inputs_live_under_a_long_path(tmp_path):
    """MCsquare writes no dose for paths past ~100 characters; run_shard must not depend on where inputs are."""
    deep = tmp_path / ("a-rather-long-folder-name-for-a-clinic-data-disk" * 2) / ("jobs-" + "x" * 60)
    engine = get_engine("mcsquare")
    inputs = engine.prepare(build_study(TINY).all(), deep / "inputs", beam_models=GENERIC)
    assert len(str(inputs.root / "CT.mhd")) > 150
    tally = engine.run_shard(inputs, 2000, seed=3, threads=1)
    assert tally.dose_per_primary.max() > 0
