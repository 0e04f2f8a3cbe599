"""The CT's stored values read straight from PixelData equal pydicom's pixel_array, bit for bit.

`cloud.engines.ct.stored_values` skips pydicom's pixel handlers for native little-endian 16-bit
images (0.5 s of a 177-slice head CT); pydicom is the reference for every case it takes.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from cloud.engines.ct import ct_volume, stored_values
from dicom_node.phantom import PhantomSpec, build_study, write_study


def _image(syntax: str, bits: int, signed: int, raw: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = raw.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = signed, 1, "MONOCHROME2"
    ds.PixelData = raw.astype("<u2").tobytes()
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("bits", [16, 12])
@pytest.mark.parametrize("signed", [0, 1])
def test_stored_values_are_pydicoms(syntax, bits, signed):
    # every 16-bit pattern, with bits above BitsStored set at random (they are not the pixel's)
    raw = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    ds = _image(syntax, bits, signed, raw)
    fast = stored_values(ds)
    reference = ds.pixel_array
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    np.testing.assert_array_equal(fast, reference)


def test_a_compressed_image_goes_through_pydicom(tmp_path):
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ds = _image(ExplicitVRLittleEndian, 16, 0, raw)
    ds.compress(RLELossless, raw)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(stored_values(ds), raw)


def test_the_phantom_ct_volume_is_unchanged(tmp_path):
    spec = PhantomSpec(size_mm=(120.0, 120.0, 30.0), spacing_mm=(2.0, 2.0, 3.0), water_box_mm=(100.0, 100.0, 30.0),
                       target_radius_mm=8.0, energy_layers=1)
    write_study(build_study(spec), tmp_path)
    slices = [ds for ds in (dcmread(p) for p in sorted(tmp_path.iterdir())) if ds.Modality == "CT"]
    volume, _grid = ct_volume(slices)
    by_z = sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    expected = np.stack([np.clip(np.round(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)),
                                 -1024, 3071) for ds in by_z]).astype(np.int16)
    np.testing.assert_array_equal(volume, expected)
