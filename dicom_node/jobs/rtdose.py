"""RT Dose on the CT grid, linked to its plan the way a TPS expects.

The dose carries the CT's patient and study, the CT's FrameOfReferenceUID, a new series, and
ReferencedRTPlanSequence -> the plan's SOP Instance UID: a TPS links a returned dose to its plan by
these references alone. Geometry is the CT's: ImagePositionPatient of the lowest slice,
ImageOrientationPatient, PixelSpacing, and GridFrameOffsetVector relative to the first frame
(first value 0). Pixels are 32-bit unsigned with DoseGridScaling (Gy per pixel unit).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from cloud.engines.base import UNCOMMISSIONED
from cloud.merge import MergedDose
from dicom_node.net import uids

_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "SpecificCharacterSet")
_UINT32_MAX = 2**32 - 1


def new_instance(sop_class: str, source: Dataset, series_number: int = 900) -> Dataset:
    """A new instance in the patient and study of `source`: file meta, UIDs, a new series, creation time."""
    ds = Dataset()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    for keyword in _PATIENT_STUDY:
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)
    now = datetime.now()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.Manufacturer = "dicom-mc-node"
    ds.InstanceNumber = 1
    return ds


def write_rt_dose(merged: MergedDose, ct_datasets: list[Dataset], plan_ds: Dataset, *, plan_total: bool = True,
                  series_description: str = "Monte Carlo dose (MCsquare)", notes: Seq[str] = (),
                  uncommissioned: bool = False) -> Dataset:
    """An RT Dose dataset (not yet saved) for the plan total, or per fraction when plan_total is False.

    ``notes`` (beam model, CT calibration) go into ImageComments after the run's summary.
    ``uncommissioned`` marks a dose whose beam model nobody commissioned: SeriesDescription,
    DoseComment and ImageComments then begin with UNCOMMISSIONED ("... NOT FOR CLINICAL USE"), so
    the TPS shows it wherever it shows the dose.
    """
    cts = sorted((ds for ds in ct_datasets if str(ds.get("SOPClassUID", "")) == uids.CT_IMAGE),
                 key=lambda ds: float(ds.ImagePositionPatient[2]))
    if not cts:
        raise ValueError("no CT images to take the dose grid from")
    dose = merged.plan_gy if plan_total else merged.per_fraction_gy
    nz, ny, nx = dose.shape
    first = cts[0]
    if (len(cts), int(first.Rows), int(first.Columns)) != (nz, ny, nx):
        raise ValueError(f"dose grid {dose.shape} does not match the CT ({len(cts)}, {first.Rows}, {first.Columns})")

    ds = new_instance(uids.RT_DOSE, first)
    ds.Modality = "RTDOSE"
    ds.SeriesDescription = series_description
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime

    ref = Dataset()
    ref.ReferencedSOPClassUID = plan_ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = plan_ds.SOPInstanceUID
    ds.ReferencedRTPlanSequence = Sequence([ref])

    ds.DoseUnits = "GY"
    ds.DoseType = merged.dose_type
    ds.DoseSummationType = "PLAN" if plan_total else "FRACTION"
    summary = (f"MC {merged.primaries} primaries in {merged.shards} shards; "
               f"{'plan total' if plan_total else 'per fraction'}, {merged.fractions} fractions")
    if uncommissioned:
        ds.SeriesDescription = f"{UNCOMMISSIONED} (MC)"[:64]
    # DoseComment is LO (64 characters): the warning alone when there is one; the whole story in
    # ImageComments (LT, General Image module), which TPS dose properties also show.
    ds.DoseComment = (UNCOMMISSIONED if uncommissioned else summary)[:64]
    ds.ImageComments = "; ".join([*([UNCOMMISSIONED] if uncommissioned else []), summary, *notes])[:10240]

    ds.ImagePositionPatient = [float(v) for v in first.ImagePositionPatient]
    ds.ImageOrientationPatient = [float(v) for v in first.ImageOrientationPatient]
    ds.PixelSpacing = [float(v) for v in first.PixelSpacing]
    z0 = float(first.ImagePositionPatient[2])
    ds.GridFrameOffsetVector = [round(float(c.ImagePositionPatient[2]) - z0, 6) for c in cts]
    ds.FrameIncrementPointer = 0x3004000C  # GridFrameOffsetVector
    ds.SliceThickness = first.get("SliceThickness", "")
    ds.NumberOfFrames = nz
    ds.Rows = ny
    ds.Columns = nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0

    dmax = float(dose.max()) if dose.size else 0.0
    # DS holds at most 16 characters: write the scaling first and quantise with the value as written.
    ds.DoseGridScaling = f"{(dmax / _UINT32_MAX if dmax > 0 else 1.0):.9e}"
    scaling = float(ds.DoseGridScaling)
    pixels = np.clip(np.rint(np.clip(dose, 0, None) / scaling), 0, _UINT32_MAX).astype("<u4")
    ds.PixelData = pixels.tobytes()
    return ds
