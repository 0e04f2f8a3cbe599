"""RT Dose on the dose grid, linked to its plan the way a TPS expects.

The dose carries the CT's patient and study, the CT's FrameOfReferenceUID, a new series, and
ReferencedRTPlanSequence -> the plan's SOP Instance UID: a TPS links a returned dose to its plan by
these references alone. Geometry is the dose grid's (a uniform grid, the TPS's own, or the CT's):
ImagePositionPatient of the first voxel centre, identity ImageOrientationPatient, PixelSpacing (row,
column) and GridFrameOffsetVector relative to the first frame (first value 0). Pixels are 32-bit
unsigned with DoseGridScaling (Gy per pixel unit).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, RTDoseStorage, generate_uid

from cloud.engines.base import UNCOMMISSIONED
from cloud.grid import Grid
from cloud.merge import MergedDose

_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "SpecificCharacterSet")
_UINT32_MAX = 2**32 - 1


def new_instance(sop_class: str, source: Dataset, series_number: int = 900) -> Dataset:
    """A new instance in the patient and study of `source`: file meta, UIDs, a new series, creation time."""
    ds = Dataset()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    for keyword in _PATIENT_STUDY:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
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


UNCERTAINTY_ABOVE_TARGET = "UNCERTAINTY ABOVE TARGET"
# Shorter forms of marks, used where the long one does not fit next to another (LO: 64 characters).
_SHORT = {UNCERTAINTY_ABOVE_TARGET: "NOISE>TARGET"}


def _fit(parts: Seq[str], sep: str, limit: int, keep_last: bool = False) -> str:
    """Join whole parts (or their short forms), in order, while they fit in ``limit`` characters; the
    last one always, if asked."""
    tail = list(parts[-1:]) if keep_last else []
    out: list[str] = []
    for part in parts[:-1] if keep_last else parts:
        for form in (part, _SHORT.get(part)):
            if form and len(sep.join([*out, form, *tail])) <= limit:
                out.append(form)
                break
    return sep.join([*out, *tail])[:limit]


def write_rt_dose(merged: MergedDose, grid: Grid, reference: Dataset, plan_ds: Dataset, *, plan_total: bool = True,
                  series_description: str = "Monte Carlo dose (MCsquare)", notes: Seq[str] = (),
                  marks: Seq[str] = (), dose_to_water: bool | None = None, uncommissioned: bool = False) -> Dataset:
    """An RT Dose dataset (not yet saved) on ``grid`` for the plan total, or per fraction.

    ``reference`` is any image of the plan's CT (its header only: patient, study, frame of
    reference). ``marks`` are warnings a user must see before using the dose (e.g. uncertainty above
    the asked target), in capitals; ``uncommissioned`` adds UNCOMMISSIONED ("... NOT FOR CLINICAL
    USE") as the first. They lead SeriesDescription and DoseComment (both LO, 64 characters: as many
    whole marks as fit), so the TPS shows them wherever it shows the dose. DoseComment ends with
    "DOSE TO WATER" or "DOSE TO MEDIUM" when ``dose_to_water`` is given. ImageComments (LT) holds
    all of it, the run's summary and ``notes`` (beam model, CT calibration, uncertainty).
    """
    dose = merged.plan_gy if plan_total else merged.per_fraction_gy
    if dose.shape != grid.shape:
        raise ValueError(f"dose array {dose.shape} is not on the dose grid {grid.shape}")
    nz, ny, nx = grid.shape

    ds = new_instance(RTDoseStorage, reference)
    ds.Modality = "RTDOSE"
    marks = [*([UNCOMMISSIONED] if uncommissioned else []), *(m.upper() for m in marks)]
    if marks:
        shown = _fit(marks, " / ", 64)
        ds.SeriesDescription = shown + " (MC)" if len(shown) <= 64 - 5 else shown
    else:
        ds.SeriesDescription = series_description[:64]
    ds.FrameOfReferenceUID = reference.FrameOfReferenceUID
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
    quantity = [] if dose_to_water is None else ["DOSE TO WATER" if dose_to_water else "DOSE TO MEDIUM"]
    # DoseComment is LO (64 characters): the marks that fit whole, then the quantity; the whole story in
    # ImageComments (LT, General Image module), which TPS dose properties also show.
    ds.DoseComment = _fit([*marks, *quantity], "; ", 64, keep_last=bool(quantity)) or "Monte Carlo dose"
    summary = (f"MC {merged.primaries} primaries in {merged.shards} shards; "
               f"{'plan total' if plan_total else 'per fraction'}, {merged.fractions} fractions")
    ds.ImageComments = "; ".join([*marks, *quantity, summary, *notes])[:10240]

    z0, y0, x0 = grid.origin
    dz, dy, dx = grid.spacing
    ds.ImagePositionPatient = [round(x0, 6), round(y0, 6), round(z0, 6)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [round(dy, 6), round(dx, 6)]  # row spacing (y), column spacing (x)
    ds.GridFrameOffsetVector = [round(k * dz, 6) for k in range(nz)]  # relative to the first frame
    ds.FrameIncrementPointer = 0x3004000C  # GridFrameOffsetVector
    ds.SliceThickness = round(dz, 6)
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
