"""Photon RT Plans for tests, on the phantom study's CT (as a TPS would export them)."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RTPlanStorage, generate_uid

from dicom_node.phantom import PhantomSpec, Study, build_study

MACHINE = "TEST_LINAC"
LEAF_BOUNDARIES = [-200.0 + 10.0 * i for i in range(41)]  # 40 leaf pairs of 10 mm


def _device(kind: str, positions: Seq[float]) -> Dataset:
    d = Dataset()
    d.RTBeamLimitingDeviceType = kind
    d.LeafJawPositions = [float(v) for v in positions]
    return d


def photon_plan(study: Study, *, gantry: float = 0.0, collimator: float = 0.0, couch: float = 0.0,
                segments: Seq[tuple[float, tuple[float, float], tuple[float, float], Seq[float] | None]] = (
                    (100.0, (-50.0, 50.0), (-50.0, 50.0), None),),
                energy: float = 6.0, machine: str = MACHINE, radiation: str = "PHOTON",
                wedge: str | None = None, fractions: int = 1,
                isocenter: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Dataset:
    """An RT Plan of one beam: each segment is (MU, X jaws, Y jaws, MLCX positions (80) or None)."""
    ref = study.plan
    ds = Dataset()
    ds.file_meta = ref.file_meta.__class__()
    ds.file_meta.update(ref.file_meta)
    ds.file_meta.MediaStorageSOPClassUID = RTPlanStorage
    for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
               "ReferencedStructureSetSequence", "PatientSetupSequence"):
        if kw in ref:
            setattr(ds, kw, ref.get(kw))
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "RTPLAN"
    ds.RTPlanLabel = "PHOTON_TEST"
    ds.RTPlanGeometry = "PATIENT"
    beam = Dataset()
    beam.BeamNumber = 1
    beam.BeamName = "B1"
    beam.BeamType = "STATIC"
    beam.RadiationType = radiation
    beam.TreatmentDeliveryType = "TREATMENT"
    beam.TreatmentMachineName = machine
    beam.PrimaryDosimeterUnit = "MU"
    beam.SourceAxisDistance = 1000.0
    devices = []
    for kind in ("ASYMX", "ASYMY"):
        d = Dataset()
        d.RTBeamLimitingDeviceType = kind
        d.NumberOfLeafJawPairs = 1
        devices.append(d)
    mlc = Dataset()
    mlc.RTBeamLimitingDeviceType = "MLCX"
    mlc.NumberOfLeafJawPairs = 40
    mlc.LeafPositionBoundaries = LEAF_BOUNDARIES
    devices.append(mlc)
    beam.BeamLimitingDeviceSequence = Sequence(devices)
    beam.NumberOfWedges = 1 if wedge else 0
    if wedge:
        w = Dataset()
        w.WedgeNumber = 1
        w.WedgeID = wedge
        w.WedgeType = "STANDARD"
        w.WedgeAngle = 30
        beam.WedgeSequence = Sequence([w])
    beam.NumberOfCompensators = 0
    beam.NumberOfBoli = 0
    beam.NumberOfBlocks = 0
    total = float(sum(s[0] for s in segments))
    cps = []
    cumulative = 0.0
    for i, (mu, xj, yj, leaves) in enumerate(segments):
        mlc_positions = leaves if leaves is not None else [xj[0]] * 40 + [xj[1]] * 40
        for j, weight in enumerate((cumulative, cumulative + mu)):
            positions = [_device("ASYMX", xj), _device("ASYMY", yj), _device("MLCX", mlc_positions)]
            cp = Dataset()
            cp.ControlPointIndex = 2 * i + j
            cp.CumulativeMetersetWeight = weight / total
            cp.BeamLimitingDevicePositionSequence = Sequence(positions)
            if i == 0 and j == 0:
                cp.NominalBeamEnergy = energy
                cp.GantryAngle = gantry
                cp.GantryRotationDirection = "NONE"
                cp.BeamLimitingDeviceAngle = collimator
                cp.BeamLimitingDeviceRotationDirection = "NONE"
                cp.PatientSupportAngle = couch
                cp.PatientSupportRotationDirection = "NONE"
                cp.IsocenterPosition = [float(v) for v in isocenter]
            cps.append(cp)
        cumulative += mu
    beam.NumberOfControlPoints = len(cps)
    beam.ControlPointSequence = Sequence(cps)
    beam.FinalCumulativeMetersetWeight = 1.0
    ds.BeamSequence = Sequence([beam])
    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = fractions
    fg.NumberOfBeams = 1
    rb = Dataset()
    rb.ReferencedBeamNumber = 1
    rb.BeamMeterset = total
    fg.ReferencedBeamSequence = Sequence([rb])
    ds.FractionGroupSequence = Sequence([fg])
    return ds


def water_study() -> Study:
    """A 20 cm water cube in air, 5 mm voxels, centred on the isocenter (no bone slab)."""
    return build_study(PhantomSpec(size_mm=(240.0, 240.0, 200.0), spacing_mm=(5.0, 5.0, 5.0),
                                   water_box_mm=(200.0, 200.0, 200.0), bone_slab_thickness_mm=0.0))


def arc_plan(study: Study, angles: Seq[float], direction: str, *, mu: float = 360.0,
             field_mm: float = 30.0) -> Dataset:
    """One arc: control points at `angles`, the gantry turning `direction` between them, the same MU per
    interval, a square `field_mm` aperture (jaws and leaves) that does not move."""
    half = field_mm / 2.0
    plan = photon_plan(study, gantry=float(angles[0]), segments=((mu, (-half, half), (-half, half), None),))
    beam = plan.BeamSequence[0]
    beam.BeamType = "DYNAMIC"
    first, last = beam.ControlPointSequence
    cps = [first]
    for k, angle in enumerate(angles[1:], start=1):
        cp = Dataset()
        cp.ControlPointIndex = k
        cp.CumulativeMetersetWeight = k / (len(angles) - 1)
        cp.GantryAngle = float(angle)
        cp.BeamLimitingDevicePositionSequence = last.BeamLimitingDevicePositionSequence
        cps.append(cp)
    for cp in cps[:-1]:
        cp.GantryRotationDirection = direction
    cps[-1].GantryRotationDirection = "NONE"
    beam.ControlPointSequence = Sequence(cps)
    beam.NumberOfControlPoints = len(cps)
    return plan


def on_study(study: Study, plan: Dataset) -> Dataset:
    """A plan from elsewhere (e.g. a QA plan with no CT) put on the study: its patient, study, frame of
    reference and structure set, with a file meta header."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = plan.copy()
    ref = study.plan
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
               "ReferencedStructureSetSequence"):
        if kw in ref:
            setattr(ds, kw, ref.get(kw))
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTPlanStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
