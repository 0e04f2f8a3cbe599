"""A consistent test study as a TPS would export it: CT series, RT Structure Set and RT Ion Plan.

The CT is a water box (HU 0) in air with a bone slab (HU 1000) between the beam entrance and the
target. The structure set (BODY, PTV) references every slice; the PBS plan has one beam per gantry
angle, several energy layers whose Bragg peaks span the target depth, and spots on a square grid
covering the target at the isocenter plane. Every object carries the same realistic fake identity,
so the anonymizer has something to remove.

Coordinates are DICOM patient coordinates (mm), head-first supine, identity orientation: x to the
patient's left, y posterior, z superior. The CT is centred on the origin, which is the isocenter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTIonPlanStorage,
    RTStructureSetStorage,
    generate_uid,
)

HU_AIR = -1000
HU_WATER = 0
HU_BONE = 1000


@dataclass(frozen=True)
class FakeIdentity:
    patient_name: str = "Lindqvist^Astrid^Maria"
    patient_id: str = "PAT-4471920"
    birth_date: str = "19580412"
    sex: str = "F"
    physician: str = "Okonkwo^Chidi^^Dr."
    operator: str = "Brennan^Siobhan"
    institution: str = "St. Elsewhere Proton Centre"
    accession: str = "A261123-0042"
    study_date: str = "20261123"
    study_time: str = "101500"


@dataclass(frozen=True)
class Spot:
    """One explicit pencil beam: position at the isocenter plane (IEC gantry x, y in mm), energy, MU."""

    x_mm: float = 0.0
    y_mm: float = 0.0
    energy_mev: float = 150.0
    mu: float = 1.0


@dataclass(frozen=True)
class PhantomSpec:
    """What the phantom looks like. Sizes in mm; defaults give about 30x30x30 cm at 2.5 mm."""

    size_mm: tuple[float, float, float] = (300.0, 300.0, 300.0)
    spacing_mm: tuple[float, float, float] = (2.5, 2.5, 2.5)
    water_box_mm: tuple[float, float, float] = (200.0, 200.0, 200.0)
    bone_slab_thickness_mm: float = 20.0
    # The slab lies across the anterior half of the box (gantry 0 beams cross it), centred in y here:
    bone_slab_center_y_mm: float = -60.0
    target_radius_mm: float = 30.0
    gantry_angles: tuple[float, ...] = (0.0,)
    couch_angle: float = 0.0
    energy_layers: int = 6
    spot_spacing_mm: float = 6.0
    fractions: int = 30
    mu_per_spot: float = 0.05
    machine_name: str = "GENERIC_PBS"
    plan_label: str = "PELVIS_MC"
    # Explicit spots: when given, every beam delivers exactly these (one layer per energy, in the order
    # given) instead of the target-covering grid; e.g. (Spot(energy_mev=200.0),) is a single pencil beam.
    spots: tuple[Spot, ...] = ()
    # "box": the water box of water_box_mm; "head": an ellipsoid of water with semi-axes water_box_mm / 2
    # inside a skull (bone) shell of skull_mm, the BODY contour an ellipse on every slice.
    shape: str = "box"
    skull_mm: float = 6.0
    identity: FakeIdentity = field(default_factory=FakeIdentity)


@dataclass
class Study:
    ct: list[Dataset]
    rtstruct: Dataset
    plan: Dataset

    def all(self) -> list[Dataset]:
        return [*self.ct, self.rtstruct, self.plan]


def csda_range_cm(energy_mev: float) -> float:
    """Approximate proton CSDA range in water (Bragg-Kleeman rule, fitted to PSTAR 70-250 MeV)."""
    return float(0.0022 * energy_mev**1.77)


def energy_for_range(range_cm: float) -> float:
    return float((range_cm / 0.0022) ** (1.0 / 1.77))


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _base(sop_class: str, modality: str, ident: FakeIdentity, study_uid: str, series_uid: str,
          for_uid: str) -> Dataset:
    ds = Dataset()
    sop_instance = generate_uid()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.Modality = modality
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.StudyDate = ident.study_date
    ds.StudyTime = ident.study_time
    ds.StudyID = "1"
    ds.AccessionNumber = ident.accession
    ds.ReferringPhysicianName = ident.physician
    ds.OperatorsName = ident.operator
    ds.InstitutionName = ident.institution
    ds.Manufacturer = "dicom-mc-node phantom"
    ds.SeriesNumber = 1
    return ds


def _grid(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (mm) along x, y, z of a grid centred on the origin."""
    axes = []
    for size, step in zip(spec.size_mm, spec.spacing_mm, strict=True):
        n = max(1, int(round(size / step)))
        axes.append((np.arange(n) - (n - 1) / 2.0) * step)
    return axes[0], axes[1], axes[2]


def head_spec(**changes: object) -> PhantomSpec:
    """A head-sized phantom: 512 x 512 x 177 CT of 0.59 x 0.59 x 1.25 mm, skull shell, 3 fields (0, 90, 270)."""
    base = PhantomSpec(size_mm=(512 * 0.59, 512 * 0.59, 177 * 1.25), spacing_mm=(0.59, 0.59, 1.25),
                       water_box_mm=(150.0, 190.0, 180.0), shape="head", skull_mm=6.0, bone_slab_thickness_mm=0.0,
                       target_radius_mm=25.0, gantry_angles=(0.0, 90.0, 270.0), energy_layers=6,
                       spot_spacing_mm=6.0, fractions=30, plan_label="HEAD_MC")
    return replace(base, **changes)  # type: ignore[arg-type]


def _head_slice(spec: PhantomSpec, xs: np.ndarray, ys: np.ndarray, z: float) -> np.ndarray:
    """HU of one axial slice of the head phantom: water inside the skull, bone shell, air around."""
    hx, hy, hz = (s / 2.0 for s in spec.water_box_mm)
    r2 = (xs[None, :] / hx) ** 2 + (ys[:, None] / hy) ** 2 + (z / hz) ** 2
    t = spec.skull_mm
    inner = (xs[None, :] / (hx - t)) ** 2 + (ys[:, None] / (hy - t)) ** 2 + (z / (hz - t)) ** 2
    hu = np.full(r2.shape, HU_AIR, dtype=np.int16)
    hu[r2 <= 1.0] = HU_BONE
    hu[inner <= 1.0] = HU_WATER
    return hu


def _head_outline(spec: PhantomSpec, z: float, points: int = 64) -> list[tuple[float, float]]:
    """The head's outer ellipse at height z (empty above or below the head)."""
    hx, hy, hz = (s / 2.0 for s in spec.water_box_mm)
    if abs(z) >= hz:
        return []
    k = math.sqrt(1.0 - (z / hz) ** 2)
    return [(hx * k * math.cos(2 * math.pi * i / points), hy * k * math.sin(2 * math.pi * i / points))
            for i in range(points)]


def ct_volume(spec: PhantomSpec) -> np.ndarray:
    """HU values indexed [z, y, x]."""
    xs, ys, zs = _grid(spec)
    if spec.shape == "head":
        return np.stack([_head_slice(spec, xs, ys, float(z)) for z in zs])
    # Open grids broadcast to [z, y, x] without materialising three full coordinate volumes.
    z, y, x = zs[:, None, None], ys[None, :, None], xs[None, None, :]
    hx, hy, hz = (s / 2.0 for s in spec.water_box_mm)
    hu = np.full((len(zs), len(ys), len(xs)), HU_AIR, dtype=np.int16)
    box = (np.abs(x) <= hx) & (np.abs(y) <= hy) & (np.abs(z) <= hz)
    hu[box] = HU_WATER
    half_t = spec.bone_slab_thickness_mm / 2.0
    if half_t > 0:
        slab = box & (np.abs(y - spec.bone_slab_center_y_mm) <= half_t) & (x <= 0)
        hu[slab] = HU_BONE
    return hu


def _ct_series(spec: PhantomSpec, ident: FakeIdentity, study_uid: str, for_uid: str) -> list[Dataset]:
    xs, ys, zs = _grid(spec)
    hu = ct_volume(spec) if spec.shape != "head" else None  # the head: one slice at a time
    series_uid = generate_uid()
    slices = []
    for k, zpos in enumerate(zs):
        ds = _base(CTImageStorage, "CT", ident, study_uid, series_uid, for_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = "Phantom CT"
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [float(xs[0]), float(ys[0]), float(zpos)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = float(spec.spacing_mm[2])
        ds.SliceLocation = float(zpos)
        ds.PixelSpacing = [float(spec.spacing_mm[1]), float(spec.spacing_mm[0])]  # row, column
        ds.Rows = len(ys)
        ds.Columns = len(xs)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        pixels = hu[k] if hu is not None else _head_slice(spec, xs, ys, float(zpos))
        ds.PixelData = np.ascontiguousarray(pixels).astype("<i2").tobytes()
        slices.append(ds)
    return slices


def _polygon(points: list[tuple[float, float]], z: float) -> list[float]:
    flat: list[float] = []
    for px, py in points:
        flat += [round(px, 3), round(py, 3), round(z, 3)]
    return flat


def _rtstruct(spec: PhantomSpec, ident: FakeIdentity, study_uid: str, for_uid: str,
              ct: list[Dataset]) -> Dataset:
    ds = _base(RTStructureSetStorage, "RTSTRUCT", ident, study_uid, generate_uid(), for_uid)
    ds.StructureSetLabel = "PHANTOM_SS"
    ds.StructureSetName = "Phantom structures"
    ds.StructureSetDate = ident.study_date
    ds.StructureSetTime = ident.study_time
    contour_images = Sequence()
    for img in ct:
        item = Dataset()
        item.ReferencedSOPClassUID = img.SOPClassUID
        item.ReferencedSOPInstanceUID = img.SOPInstanceUID
        contour_images.append(item)
    series_item = Dataset()
    series_item.SeriesInstanceUID = ct[0].SeriesInstanceUID
    series_item.ContourImageSequence = contour_images
    study_item = Dataset()
    # Detached Study Management (retired, customary)
    study_item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_item.ReferencedSOPInstanceUID = study_uid
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    for_item = Dataset()
    for_item.FrameOfReferenceUID = for_uid
    for_item.RTReferencedStudySequence = Sequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = Sequence([for_item])

    hx, hy, hz = (s / 2.0 for s in spec.water_box_mm)
    r = spec.target_radius_mm
    rois = [(1, "BODY", "EXTERNAL"), (2, "PTV", "PTV")]
    roi_seq, contour_seq, obs_seq = Sequence(), Sequence(), Sequence()
    for number, name, kind in rois:
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_seq.append(roi)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = kind
        obs.ROIInterpreter = ""
        obs_seq.append(obs)
        contours = Sequence()
        for img in ct:
            z = float(img.ImagePositionPatient[2])
            if name == "BODY" and spec.shape == "head":
                pts = _head_outline(spec, z)
                if not pts:
                    continue
            elif name == "BODY":
                if abs(z) > hz:
                    continue
                pts = [(-hx, -hy), (hx, -hy), (hx, hy), (-hx, hy)]
            else:
                if abs(z) >= r:
                    continue
                rz = math.sqrt(r * r - z * z)
                pts = [(rz * math.cos(2 * math.pi * i / 32), rz * math.sin(2 * math.pi * i / 32))
                       for i in range(32)]
            c = Dataset()
            ref = Dataset()
            ref.ReferencedSOPClassUID = img.SOPClassUID
            ref.ReferencedSOPInstanceUID = img.SOPInstanceUID
            c.ContourImageSequence = Sequence([ref])
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = _polygon(pts, z)
            contours.append(c)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = [255, 0, 0] if name == "PTV" else [0, 255, 0]
        roi_contour.ContourSequence = contours
        contour_seq.append(roi_contour)
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    return ds


def _entrance_depths(spec: PhantomSpec, gantry: float) -> tuple[float, float]:
    """Water-equivalent depth (mm) of the target's near and far edge along a beam of this angle.

    The box is square in x/y, so depth to the centre is the half width; the bone slab adds roughly
    (relative stopping power - 1) x thickness where gantry 0 crosses it.
    """
    half = spec.water_box_mm[0] / 2.0 if gantry % 180 else spec.water_box_mm[1] / 2.0
    extra = 0.0
    if abs(((gantry + 180) % 360) - 180) < 45:  # anterior beams cross the slab (only x <= 0 half)
        extra = 0.5 * spec.bone_slab_thickness_mm * 0.6
    return half - spec.target_radius_mm + extra, half + spec.target_radius_mm + extra


def _layers(spec: PhantomSpec, energies: list[float], grid: list[tuple[float, float]]
            ) -> list[tuple[float, list[tuple[float, float]], list[float]]]:
    """(energy, spot positions, spot MU) for each energy layer of a beam."""
    if spec.spots:
        by_energy: dict[float, list[Spot]] = {}
        for spot in spec.spots:
            by_energy.setdefault(float(spot.energy_mev), []).append(spot)
        return [(e, [(s.x_mm, s.y_mm) for s in spots], [float(s.mu) for s in spots]) for e, spots in by_energy.items()]
    out = []
    for layer, energy in enumerate(energies):
        # Distal layers carry more weight, as in a spread-out Bragg peak.
        layer_weight = spec.mu_per_spot * (1.0 if layer == 0 else 0.6 * (0.85 ** (layer - 1)))
        out.append((energy, grid, [round(layer_weight, 6)] * len(grid)))
    return out


def _ion_plan(spec: PhantomSpec, ident: FakeIdentity, study_uid: str, for_uid: str,
              rtstruct: Dataset) -> Dataset:
    ds = _base(RTIonPlanStorage, "RTPLAN", ident, study_uid, generate_uid(), for_uid)
    ds.RTPlanLabel = spec.plan_label
    ds.RTPlanName = spec.plan_label
    ds.RTPlanDescription = f"Phantom PBS plan for {ident.patient_name}"
    ds.RTPlanDate = ident.study_date
    ds.RTPlanTime = ident.study_time
    ds.RTPlanGeometry = "PATIENT"
    ds.ApprovalStatus = "UNAPPROVED"
    ref_ss = Dataset()
    ref_ss.ReferencedSOPClassUID = RTStructureSetStorage
    ref_ss.ReferencedSOPInstanceUID = rtstruct.SOPInstanceUID
    ds.ReferencedStructureSetSequence = Sequence([ref_ss])
    setup = Dataset()
    setup.PatientPosition = "HFS"
    setup.PatientSetupNumber = 1
    ds.PatientSetupSequence = Sequence([setup])

    r = spec.target_radius_mm
    step = spec.spot_spacing_mm
    n_half = int(math.floor((r + step / 2) / step))
    grid = [(i * step, j * step) for i in range(-n_half, n_half + 1) for j in range(-n_half, n_half + 1)
            if math.hypot(i * step, j * step) <= r + step / 2]

    beams = Sequence()
    ref_beams = Sequence()
    for b, gantry in enumerate(spec.gantry_angles, start=1):
        near, far = _entrance_depths(spec, gantry)
        if spec.energy_layers > 1:
            ranges_mm = np.linspace(far, near, spec.energy_layers)
        else:
            ranges_mm = np.array([(near + far) / 2])
        energies = [round(energy_for_range(rng / 10.0), 2) for rng in ranges_mm]
        beam = Dataset()
        beam.BeamNumber = b
        beam.BeamName = f"G{int(gantry):03d}"
        beam.BeamDescription = f"Field {b} for {ident.patient_name}"
        beam.BeamType = "STATIC"
        beam.RadiationType = "PROTON"
        beam.ScanMode = "MODULATED"
        beam.TreatmentMachineName = spec.machine_name
        beam.PrimaryDosimeterUnit = "MU"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.NumberOfWedges = 0
        beam.NumberOfCompensators = 0
        beam.NumberOfBoli = 0
        beam.NumberOfBlocks = 0
        beam.NumberOfRangeShifters = 0
        beam.NumberOfLateralSpreadingDevices = 0
        beam.NumberOfRangeModulators = 0
        beam.PatientSupportType = "TABLE"
        beam.ReferencedPatientSetupNumber = 1
        cps = Sequence()
        cumulative = 0.0
        for energy, layer_grid, weights in _layers(spec, energies, grid):
            for end in (False, True):
                cp = Dataset()
                cp.ControlPointIndex = len(cps)
                cp.NominalBeamEnergy = float(energy)
                cp.NominalBeamEnergyUnit = "MEV"
                cp.ScanSpotTuneID = "3.0"
                cp.NumberOfScanSpotPositions = len(layer_grid)
                cp.ScanSpotPositionMap = [float(v) for xy in layer_grid for v in xy]
                cp.ScanSpotMetersetWeights = [0.0] * len(layer_grid) if end else weights
                cp.ScanningSpotSize = [5.0, 5.0]
                cp.NumberOfPaintings = 1
                cp.CumulativeMetersetWeight = round(cumulative, 6)
                if len(cps) == 0:
                    cp.GantryAngle = float(gantry)
                    cp.GantryRotationDirection = "NONE"
                    cp.BeamLimitingDeviceAngle = 0.0
                    cp.BeamLimitingDeviceRotationDirection = "NONE"
                    cp.PatientSupportAngle = float(spec.couch_angle)
                    cp.PatientSupportRotationDirection = "NONE"
                    cp.IsocenterPosition = [0.0, 0.0, 0.0]
                    cp.SnoutPosition = 300.0
                    cp.TableTopVerticalPosition = 0.0
                    cp.TableTopLongitudinalPosition = 0.0
                    cp.TableTopLateralPosition = 0.0
                if not end:
                    cumulative += sum(weights)
                else:
                    cp.CumulativeMetersetWeight = round(cumulative, 6)
                cps.append(cp)
        beam.IonControlPointSequence = cps
        beam.NumberOfControlPoints = len(cps)
        beam.FinalCumulativeMetersetWeight = round(cumulative, 6)
        beams.append(beam)
        ref = Dataset()
        ref.ReferencedBeamNumber = b
        ref.BeamMeterset = round(cumulative, 6)  # weights are in MU already
        ref_beams.append(ref)
    ds.IonBeamSequence = beams
    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = spec.fractions
    fg.NumberOfBeams = len(beams)
    fg.NumberOfBrachyApplicationSetups = 0
    fg.ReferencedBeamSequence = ref_beams
    ds.FractionGroupSequence = Sequence([fg])
    return ds


def build_study(spec: PhantomSpec | None = None) -> Study:
    """Make a fresh study (new UIDs every call) as in-memory datasets."""
    spec = spec or PhantomSpec()
    ident = spec.identity
    study_uid = generate_uid()
    for_uid = generate_uid()
    ct = _ct_series(spec, ident, study_uid, for_uid)
    rtstruct = _rtstruct(spec, ident, study_uid, for_uid, ct)
    plan = _ion_plan(spec, ident, study_uid, for_uid, rtstruct)
    now = datetime.now()
    for ds in (rtstruct, plan):
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
    return Study(ct=ct, rtstruct=rtstruct, plan=plan)


def write_study(study: Study, out_dir: Path | str) -> list[Path]:
    """Write every object as a DICOM file (CT_0001.dcm, ..., RS.dcm, RP.dcm); return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(study.ct, start=1):
        p = out / f"CT_{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    for name, ds in (("RS.dcm", study.rtstruct), ("RP.dcm", study.plan)):
        p = out / name
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
