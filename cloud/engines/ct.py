"""A CT series as one HU volume on a regular grid, indexed [z, y, x] with z ascending."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cloud.engines.base import Grid
from cloud.errors import UnsupportedPlan

if TYPE_CHECKING:  # pydicom costs ~0.5 s to import; a worker only needs it for type hints
    from pydicom.dataset import Dataset

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_TOL_MM = 1e-3


def ct_slices(datasets: list[Dataset], frame_of_reference_uid: str = "") -> list[Dataset]:
    """The CT images (of the plan's frame of reference when given), sorted by ascending z."""
    cts = [ds for ds in datasets if str(ds.get("SOPClassUID", "")) == CT_IMAGE]
    if frame_of_reference_uid:
        cts = [ds for ds in cts if str(ds.get("FrameOfReferenceUID", "")) == frame_of_reference_uid]
    if not cts:
        raise UnsupportedPlan("no CT images in the plan's frame of reference")
    series = {str(ds.SeriesInstanceUID) for ds in cts}
    if len(series) > 1:
        raise UnsupportedPlan(f"{len(series)} CT series share the plan's frame of reference; expected one")
    return sorted(cts, key=lambda ds: float(ds.ImagePositionPatient[2]))


def ct_volume(slices: list[Dataset]) -> tuple[np.ndarray, Grid]:
    """HU volume (int16, [z, y, x]) and its grid; UnsupportedPlan if the geometry is not handled."""
    first = slices[0]
    orientation = [float(v) for v in first.ImageOrientationPatient]
    if not np.allclose(orientation, [1, 0, 0, 0, 1, 0], atol=1e-4):
        raise UnsupportedPlan(f"CT orientation {orientation} is not supported (axial, identity only)")
    position = str(first.get("PatientPosition", "HFS") or "HFS")
    if position != "HFS":
        raise UnsupportedPlan(f"patient position {position} is not supported yet (HFS only)")
    rows, cols = int(first.Rows), int(first.Columns)
    dy, dx = (float(v) for v in first.PixelSpacing)
    zs = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    if len(slices) > 1:
        steps = np.diff(zs)
        if steps.min() <= 0 or steps.max() - steps.min() > _TOL_MM * 10:
            raise UnsupportedPlan("CT slices are not equally spaced (or two share a position)")
        dz = float(steps.mean())
    else:
        dz = float(first.get("SliceThickness", 1.0) or 1.0)
    x0, y0 = (float(v) for v in first.ImagePositionPatient[:2])
    volume = np.empty((len(slices), rows, cols), dtype=np.int16)
    for k, ds in enumerate(slices):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols) or any(
                abs(float(a) - float(b)) > _TOL_MM for a, b in zip(ds.ImagePositionPatient[:2], (x0, y0), strict=True)):
            raise UnsupportedPlan("CT slices differ in size or in-plane position")
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0)
        volume[k] = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    grid = Grid(shape=(len(slices), rows, cols), origin=(x0, y0, float(zs[0])), spacing=(dx, dy, dz))
    return volume, grid
