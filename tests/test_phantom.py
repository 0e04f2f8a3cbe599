"""The phantom study is consistent, as a TPS would export it."""

from __future__ import annotations

import numpy as np
from pydicom import dcmread

from dicom_node.cli import main
from dicom_node.phantom import HU_BONE, HU_WATER, PhantomSpec, build_study, csda_range_cm, ct_volume


def test_phantom_cli_writes_consistent_study(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", str(out), "--size", "200,200,100", "--spacing", "4", "--gantry", "0,90"]) == 0
    assert "CT slices" in capsys.readouterr().out
    ct = [dcmread(p) for p in sorted(out.glob("CT_*.dcm"))]
    rs, rp = dcmread(out / "RS.dcm"), dcmread(out / "RP.dcm")
    assert len(ct) == 25 and ct[0].Rows == 50 and ct[0].Columns == 50
    z = [float(d.ImagePositionPatient[2]) for d in ct]
    assert np.allclose(np.diff(z), 4.0)
    # every object belongs to one patient, study and frame of reference
    for ds in (*ct, rs, rp):
        assert ds.PatientID == ct[0].PatientID and ds.StudyInstanceUID == ct[0].StudyInstanceUID
        assert ds.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    # plan → structure set → every CT slice
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    images = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].ContourImageSequence
    assert {i.ReferencedSOPInstanceUID for i in images} == {d.SOPInstanceUID for d in ct}
    assert [b.IonControlPointSequence[0].GantryAngle for b in rp.IonBeamSequence] == [0, 90]


def test_plan_energies_cover_the_target_depth():
    spec = PhantomSpec()
    study = build_study(spec)
    beam = study.plan.IonBeamSequence[0]
    energies = sorted({float(cp.NominalBeamEnergy) for cp in beam.IonControlPointSequence})
    ranges_mm = [10 * csda_range_cm(e) for e in energies]
    depth_to_centre = spec.water_box_mm[1] / 2
    assert min(ranges_mm) < depth_to_centre - spec.target_radius_mm / 2
    assert max(ranges_mm) > depth_to_centre + spec.target_radius_mm / 2
    meterset = sum(sum(cp.ScanSpotMetersetWeights) for cp in beam.IonControlPointSequence)
    assert abs(meterset - beam.FinalCumulativeMetersetWeight) < 1e-3
    assert abs(study.plan.FractionGroupSequence[0].ReferencedBeamSequence[0].BeamMeterset - meterset) < 1e-3


def test_ct_has_water_box_and_bone_slab():
    spec = PhantomSpec(size_mm=(200, 200, 40), spacing_mm=(2, 2, 2), water_box_mm=(100, 100, 40),
                       bone_slab_center_y_mm=-30)
    hu = ct_volume(spec)
    assert hu[10, 50, 50] == HU_WATER  # centre
    assert hu[10, 0, 0] == -1000       # corner is air
    bone = np.argwhere(hu == HU_BONE)
    assert len(bone) > 0
    # x <= 0 half (columns up to the centre), y from -40 to -20 mm (rows 30-39 of 100 at 2 mm)
    assert bone[:, 2].max() <= 49 and (bone[:, 1].min(), bone[:, 1].max()) == (30, 39)
