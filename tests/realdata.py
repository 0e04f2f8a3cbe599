"""Real RayStation 12 exports (tests/data/realdata/raystation12_tr3, see its README) and the phantom CT
they lack, rebuilt from the structure set: the External contour filled, the CT UIDs the structure set
references, the plan's frame of reference; and the second check's case made of them (the test and the
benchmark of the second check share it)."""

from __future__ import annotations

import copy
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.path import Path as Polygon
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cloud.engines.ct import ct_grid
from cloud.merge import MergedDose
from dicom_node.jobs.rtdose import write_rt_dose
from dicom_node.qa.compare import Volume, box_average, ct_from_datasets, dose_from_rtdose

RAYSTATION = Path(__file__).parent / "data" / "realdata" / "raystation12_tr3"
PHANTOM_SCANNER = ("dicom-mc-node", "RayStation phantom rebuilt from its External ROI")
PHANTOM_HU = 0  # inside the External contour
AIR_HU = -1000


def phantom_calibration(folder: Path) -> tuple[Path, Path]:
    """HU tables for the rebuilt CT: air, and inside the External the material RayStation assigned it.

    The structure set overrides the External ROI's material (ROIPhysicalProperties: REL_MASS_DENSITY
    1.19, MEAN_EXCI_ENERGY 74 eV, effective Z 5.85: PMMA), and RayStation's doses are computed in
    it; HU 0 is therefore PMMA of 1.19 g/cm3 (MCsquare material 64).
    """
    density = folder / "phantom_hu_density.txt"
    material = folder / "phantom_hu_material.txt"
    density.write_text("# HU density g/cm3\n-1050\t0.0012\n-1000\t0.0012\n-500\t1.19\n3000\t1.19\n")
    material.write_text("# HU material (MCsquare Materials/list.dat)\n-1050\t39\n-500\t64\n")
    return density, material


def _slice_positions(rs: Dataset) -> dict[str, float]:
    """z of every CT image the structure set references: from its contours where one lies on it; the
    rest (outside every contour) continue the slice spacing below and above, in the listed order."""
    series = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    listed = [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence]
    known: dict[str, float] = {}
    for roi in rs.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            for image in contour.get("ContourImageSequence", []):
                known[str(image.ReferencedSOPInstanceUID)] = round(float(contour.ContourData[2]), 3)
    zs = sorted(set(known.values()))
    step = float(np.median(np.diff(zs)))
    first_known = min(i for i, u in enumerate(listed) if u in known)
    below = [u for u in listed[:first_known] if u not in known]
    above = [u for u in listed[first_known:] if u not in known]
    out = dict(known)
    for n, u in enumerate(reversed(below), start=1):
        out[u] = zs[0] - n * step
    for n, u in enumerate(above, start=1):
        out[u] = zs[-1] + n * step
    return out


def phantom_ct(rs: Dataset, plan: Dataset, out_dir: Path, spacing_mm: float = 2.0,
               margin_mm: float = 20.0) -> list[Path]:
    """CT slices (one file each) of the External ROI filled with PHANTOM_HU in air."""
    names = {int(r.ROINumber): str(r.ROIName) for r in rs.StructureSetROISequence}
    external = next(roi for roi in rs.ROIContourSequence if names[int(roi.ReferencedROINumber)] == "External")
    polygons: dict[float, list[np.ndarray]] = {}
    for contour in external.ContourSequence:
        pts = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        polygons.setdefault(round(float(pts[0, 2]), 3), []).append(pts[:, :2])
    allpts = np.concatenate([p for ps in polygons.values() for p in ps])
    lo = np.floor((allpts.min(axis=0) - margin_mm) / spacing_mm) * spacing_mm
    hi = np.ceil((allpts.max(axis=0) + margin_mm) / spacing_mm) * spacing_mm
    cols, rows = (int(round(v)) + 1 for v in (hi - lo) / spacing_mm)
    xs = lo[0] + spacing_mm * np.arange(cols)
    ys = lo[1] + spacing_mm * np.arange(rows)
    xx, yy = np.meshgrid(xs, ys)
    centres = np.column_stack([xx.ravel(), yy.ravel()])
    positions = _slice_positions(rs)
    series = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    zs = sorted(set(positions.values()))
    thickness = float(np.median(np.diff(zs)))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (uid, z) in enumerate(sorted(positions.items(), key=lambda kv: kv[1]), start=1):
        inside = np.zeros(rows * cols, dtype=bool)
        for poly in polygons.get(round(z, 3), []):
            inside ^= Polygon(poly).contains_points(centres)
        hu = np.where(inside.reshape(rows, cols), PHANTOM_HU, AIR_HU).astype(np.int16)
        paths.append(write_ct_slice(out_dir / f"CT{uid}.dcm", hu, like=rs, uid=uid,
                                    series=str(series.SeriesInstanceUID),
                                    frame_of_reference=str(plan.FrameOfReferenceUID), number=n,
                                    position=(float(lo[0]), float(lo[1]), float(z)), spacing_mm=spacing_mm,
                                    thickness_mm=thickness, scanner=PHANTOM_SCANNER))
    return paths


def write_ct_slice(path: Path, hu: np.ndarray, *, like: Dataset, uid: str, series: str, frame_of_reference: str,
                   number: int, position: tuple[float, float, float], spacing_mm: float, thickness_mm: float,
                   scanner: tuple[str, str] | None = None) -> Path:
    """One axial HFS CT slice (``hu``: int16 [row, column], square pixels, ImagePositionPatient ``position``)
    in the patient and study of ``like`` (a plan or structure set the test's CT is made for)."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, uid, "CT"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "StudyID"):
        if keyword in like:
            setattr(ds, keyword, like.data_element(keyword).value)
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame_of_reference
    if scanner is not None:
        ds.Manufacturer, ds.ManufacturerModelName = scanner
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [spacing_mm, spacing_mm]
    ds.SliceThickness = thickness_mm
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.PixelData = np.ascontiguousarray(hu, dtype="<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def reference_folder(name: str, out: Path) -> Path:
    """A copy of one RayStation export (plan, structure set, RT Dose) with its rebuilt phantom CT."""
    src = RAYSTATION / name
    folder = out / name
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.md"))
    plan = dcmread(next(folder.glob("RP*.dcm")), stop_before_pixels=True)
    rs = dcmread(next(folder.glob("RS*.dcm")))
    phantom_ct(rs, plan, folder)
    return folder


# --- the second check's real case: RayStation's dose as the TPS's, the same dose with MC noise as the node's ---


@dataclass(frozen=True)
class SecondCheckCase:
    """The reference export read back: structure set, plan, RayStation's RT Dose, the rebuilt CT (datasets and
    HU volume), and RayStation's dose on the CT grid as an MC engine scores it: its mean over each CT voxel
    (2 x 2 x 5 mm; 0 outside RayStation's grid)."""

    rs: Dataset
    rp: Dataset
    rd: Dataset
    cts: list[Dataset]
    ct: Volume
    clean: np.ndarray


def second_check_case(out: Path) -> SecondCheckCase:
    folder = reference_folder("reference", out)
    cts = [dcmread(p) for p in folder.glob("CT*.dcm")]
    rd = dcmread(next(folder.glob("RD*.dcm")))
    ct = ct_from_datasets(cts)
    return SecondCheckCase(rs=dcmread(next(folder.glob("RS*.dcm"))), rp=dcmread(next(folder.glob("RP*.dcm"))),
                           rd=rd, cts=cts, ct=ct,
                           clean=np.nan_to_num(box_average(dose_from_rtdose(rd), ct.grid), nan=0.0))


def noisy_mc_dose(case: SecondCheckCase, noise: float, seed: int, air_spike: float) -> tuple[Dataset, np.ndarray]:
    """RayStation's dose on the CT grid as an MC dose would be: relative standard error ``noise`` at the
    maximum, growing as 1/sqrt(dose), and spikes in 1 % of the air voxels (|normal| x ``air_spike`` x the
    maximum), as an MC scoring grid has them. The RT Dose the node would write (read back), and the dose."""
    rng = np.random.default_rng(seed)
    clean = case.clean
    dmax = float(clean.max())
    dose = clean + noise * np.sqrt(np.clip(clean, 0, None) * dmax) * rng.standard_normal(clean.shape)
    air = case.ct.values < -500
    n_air = int(air.sum())
    dose[air] = np.abs(rng.standard_normal(n_air)) * air_spike * dmax * (rng.random(n_air) < 0.01)
    dose = np.clip(dose, 0.0, None)
    merged = MergedDose(per_fraction_gy=dose, plan_gy=dose, std_error_per_fraction_gy=None, fractions=1, rbe=False,
                        primaries=10**7, shards=4)
    buf = io.BytesIO()
    write_rt_dose(merged, ct_grid(case.cts), case.cts[0], case.rp, dose_to_water=True).save_as(
        buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf), dose


def shifted_dose(rd: Dataset, x_mm: float) -> Dataset:
    """The RT Dose moved by ``x_mm`` along x (to the patient's left for x > 0)."""
    out = copy.deepcopy(rd)
    x, y, z = (float(v) for v in out.ImagePositionPatient)
    out.ImagePositionPatient = [x + x_mm, y, z]
    return out


def scaled_dose(rd: Dataset, factor: float) -> Dataset:
    out = copy.deepcopy(rd)
    out.DoseGridScaling = f"{float(out.DoseGridScaling) * factor:.10g}"
    return out


# --- Pinnacle's photon plan and RT Dose (tests/data/realdata/pinnacle_photon): no CT, no structure set ---

PINNACLE = Path(__file__).parent / "data" / "realdata" / "pinnacle_photon"
PINNACLE_SCANNER = ("dicom-mc-node", "Pinnacle phantom rebuilt from its RT Dose's outline")


def outline_ct(rd: Dataset, plan: Dataset, out_dir: Path, extend_mm: float = 50.0) -> list[Path]:
    """CT slices (one file each, HU 0 inside the body, air outside) for a plan whose export has no CT and no
    structure set: the body is where the TPS's RT Dose is above 0.

    Pinnacle (as most TPSs) reports no dose outside the patient's external contour and some dose (scatter at
    least) everywhere inside it, so the dose grid's non-zero voxels are the body's outline on the dose grid's
    voxels (2.5 mm here). The CT has the RT Dose's pixels and slice positions; beyond the dose grid the outline
    is continued as it is at the grid's edge (``extend_mm`` on every side: the body goes on past the grid's
    ends along z and, on a few slices, past its x edge). Only the outline comes from the TPS dose; the dose
    values are not used.
    """
    dose = dose_from_rtdose(rd).values  # [z, y, x], axes increasing
    x0, y0, z0 = (float(v) for v in rd.ImagePositionPatient)
    spacing = float(rd.PixelSpacing[0])
    offsets = [float(v) for v in rd.GridFrameOffsetVector]
    if not (np.allclose(np.diff(offsets), spacing) and float(rd.PixelSpacing[1]) == spacing):
        raise ValueError("outline_ct needs a dose grid of cubic voxels")
    pad = int(round(extend_mm / spacing))
    body = np.pad(dose > 0, pad, mode="edge")
    hu = np.where(body, PHANTOM_HU, AIR_HU).astype(np.int16)
    series = generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(hu.shape[0]):
        uid = generate_uid()
        z = z0 + offsets[0] + (k - pad) * spacing
        paths.append(write_ct_slice(out_dir / f"CT{uid}.dcm", hu[k], like=plan, uid=uid, series=series,
                                    frame_of_reference=str(plan.FrameOfReferenceUID), number=k + 1,
                                    position=(x0 - pad * spacing, y0 - pad * spacing, z), spacing_mm=spacing,
                                    thickness_mm=spacing, scanner=PINNACLE_SCANNER))
    return paths
