"""A CT series as one HU volume on a regular grid, indexed [z, y, x] with z ascending."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cloud.errors import UnsupportedPlan
from cloud.grid import Grid

if TYPE_CHECKING:  # pydicom costs ~0.5 s to import; a worker only needs it for type hints
    from pydicom.dataset import Dataset

_TOL_MM = 1e-3


def ct_slices(datasets: list[Dataset], frame_of_reference_uid: str = "") -> list[Dataset]:
    """The CT images (of the plan's frame of reference when given), sorted by ascending z."""
    from pydicom.uid import CTImageStorage  # here: a worker never loads pydicom

    cts = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == CTImageStorage]
    if frame_of_reference_uid:
        cts = [ds for ds in cts if str(ds.get("FrameOfReferenceUID", "")) == frame_of_reference_uid]
    if not cts:
        raise UnsupportedPlan("no CT images in the plan's frame of reference")
    series = {str(ds.SeriesInstanceUID) for ds in cts}
    if len(series) > 1:
        raise UnsupportedPlan(f"{len(series)} CT series share the plan's frame of reference; expected one")
    return sorted(cts, key=lambda ds: float(ds.ImagePositionPatient[2]))


def ct_grid(slices: list[Dataset]) -> Grid:
    """The grid of a CT series from its headers (no pixels); UnsupportedPlan names what is not handled.

    Handled: axial slices (orientation the identity: no gantry tilt, no oblique reconstruction),
    patient position HFS, one size and in-plane position, equal spacing along z with no gap.
    """
    if not slices:
        raise UnsupportedPlan("no CT images")
    slices = sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = slices[0]
    for ds in slices:
        orientation = [float(v) for v in ds.get("ImageOrientationPatient", [])]
        if len(orientation) != 6:
            raise UnsupportedPlan("CT slice without ImageOrientationPatient")
        if not np.allclose(orientation, [1, 0, 0, 0, 1, 0], atol=1e-4):
            raise UnsupportedPlan(f"CT is tilted or oblique (ImageOrientationPatient {orientation}); only axial "
                                  "slices with the identity orientation are supported")
        tilt = float(ds.get("GantryDetectorTilt", 0) or 0)
        if abs(tilt) > 1e-3:
            raise UnsupportedPlan(f"CT acquired with gantry tilt {tilt:g} degrees; only untilted CT is supported")
    position = str(first.get("PatientPosition", "HFS") or "HFS")
    if position != "HFS":
        raise UnsupportedPlan(f"patient position {position} is not supported yet (HFS only)")
    rows, cols = int(first.Rows), int(first.Columns)
    dy, dx = (float(v) for v in first.PixelSpacing)
    zs = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    x0, y0 = (float(v) for v in first.ImagePositionPatient[:2])
    for ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols) or any(
                abs(float(a) - float(b)) > _TOL_MM for a, b in zip(ds.ImagePositionPatient[:2], (x0, y0), strict=True)):
            raise UnsupportedPlan("CT slices differ in size or in-plane position")
    if len(slices) > 1:
        steps = np.diff(zs)
        if steps.min() <= _TOL_MM:
            k = int(np.argmin(steps))
            raise UnsupportedPlan(f"two CT slices share the position z = {zs[k]:g} mm")
        dz = float(np.median(steps))
        if steps.max() - steps.min() > _TOL_MM * 10:
            k = int(np.argmax(np.abs(steps - dz)))
            raise UnsupportedPlan(f"CT has a gap or uneven spacing: {steps[k]:g} mm between slices at z = "
                                  f"{zs[k]:g} and {zs[k + 1]:g} mm, {dz:g} mm elsewhere "
                                  f"({len(slices)} slices)")
        dz = float(steps.mean())
    else:
        dz = float(first.get("SliceThickness", 1.0) or 1.0)
    return Grid.regular((len(slices), rows, cols), origin=(float(zs[0]), y0, x0), spacing=(dz, dy, dx))


_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit VR little endian


def stored_values(ds: Dataset) -> np.ndarray:
    """One CT image's stored pixel values, [rows, columns], as pydicom's ``pixel_array`` gives them.

    Native little-endian 16-bit greyscale (what scanners and TPSs export) is read straight from the
    PixelData bytes, with BitsStored's mask and sign applied: pydicom's pixel handlers take ~3 ms a
    512x512 slice to get there (0.5 s of a 177-slice head CT, against 0.09 s). Anything else
    (compressed, big endian, 8 or 32 bits) goes through ``pixel_array``.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    data = ds.get("PixelData")
    if (syntax not in _NATIVE_LITTLE_ENDIAN or int(ds.get("BitsAllocated", 0)) != 16
            or int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1
            or not isinstance(data, bytes) or len(data) < rows * cols * 2):
        return np.asarray(ds.pixel_array)
    bits = int(ds.get("BitsStored", 16) or 16)
    raw = np.frombuffer(data, dtype="<u2", count=rows * cols).reshape(rows, cols)
    if bits < 16:
        raw = raw & np.uint16((1 << bits) - 1)  # bits above BitsStored are not the pixel's
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return raw
    values = raw.astype(np.int32)
    return np.where(values >= 1 << (bits - 1), values - (1 << bits), values).astype(np.int16)


def ct_volume(slices: list[Dataset]) -> tuple[np.ndarray, Grid]:
    """HU volume (int16, [z, y, x]) and its grid; UnsupportedPlan if the geometry is not handled."""
    grid = ct_grid(slices)
    slices = sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = np.empty(grid.shape, dtype=np.int16)
    for k, ds in enumerate(slices):
        hu = stored_values(ds).astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0)
        volume[k] = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return volume, grid
