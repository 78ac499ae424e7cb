"""Real test images from pydicom-data, and edge cases built from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

try:
    import data_store

    DATA = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover
    DATA = Path("/nonexistent")

CT = DATA / "693_UNCR.dcm"  # signed, 14 bits stored
MR = DATA / "MR2_UNCR.dcm"  # 12 bits stored
CR = DATA / "RG1_UNCR.dcm"  # 15 bits stored, 7 MB
US = DATA / "US1_UNCR.dcm"  # RGB 8-bit
MULTIFRAME = DATA / "emri_small.dcm"
RGB_2FRAME = DATA / "SC_rgb_2frame.dcm"
BIG_ENDIAN = DATA / "OBXXXX1A_expb.dcm"
BIG_ENDIAN_MF = DATA / "emri_small_big_endian.dcm"
RLE_MF = DATA / "emri_small_RLE.dcm"
JPEG_BASELINE = DATA / "color3d_jpeg_baseline.dcm"
J2K_LOSSY = DATA / "MR2_J2KI.dcm"
J2K_LOSSLESS = DATA / "MR2_J2KR.dcm"
JLS_MF = DATA / "emri_small_jpeg_ls_lossless.dcm"
ONE_BIT = DATA / "liver.dcm"
RGB_32BIT = DATA / "SC_rgb_32bit.dcm"
PALETTE = DATA / "OBXXXX1A.dcm"
YBR_FULL = DATA / "SC_ybr_full_uncompressed.dcm"
TOO_SHORT = DATA / "emri_small_jpeg_2k_lossless_too_short.dcm"


def pixels(path: Path) -> np.ndarray:
    """Pixels as pydicom 3 decodes them (what a viewer built on it shows)."""
    return pydicom.dcmread(path).pixel_array


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _with_pixels(ds: Dataset, arr: np.ndarray) -> Dataset:
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def odd_size(tmp: Path, src: Path = MR) -> Path:
    """A 255 x 253 crop: odd rows and columns."""
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array[:255, :253]
    ds.Rows, ds.Columns = arr.shape
    return write(_with_pixels(ds, arr), tmp / "odd.dcm")


def high_bits(tmp: Path) -> Path:
    """12-bit MR whose stored words carry an old overlay in bit 14."""
    ds = pydicom.dcmread(MR)
    arr = ds.pixel_array.copy()
    arr[10:20, 10:60] |= 0x4000
    return write(_with_pixels(ds, arr), tmp / "highbits.dcm")


def signed16(tmp: Path) -> Path:
    """Signed 16-bit (Bits Stored 16) from the CT, spread over the full range."""
    ds = pydicom.dcmread(CT)
    arr = ds.pixel_array.astype(np.int32) * 6
    arr = np.clip(arr, -32768, 32767).astype(np.int16)
    ds.BitsStored, ds.HighBit = 16, 15
    return write(_with_pixels(ds, arr), tmp / "signed16.dcm")


def signed12_masked(tmp: Path) -> Path:
    """Signed 12-bit stored without sign extension (high nibble zero), as some modalities write."""
    ds = pydicom.dcmread(CT)
    arr = np.clip(ds.pixel_array, -2048, 2047).astype(np.int16)
    ds.BitsStored, ds.HighBit = 12, 11
    pattern = arr.view(np.uint16) & 0x0FFF
    return write(_with_pixels(ds, pattern), tmp / "signed12.dcm")


def eight_bit_mono(tmp: Path) -> Path:
    """8-bit MONOCHROME2 made from the MR (Bits Allocated 8)."""
    ds = pydicom.dcmread(MR)
    arr = (ds.pixel_array >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return write(_with_pixels(ds, arr), tmp / "mono8.dcm")


def lossy_flagged(tmp: Path, src: Path = MR) -> Path:
    """An uncompressed image whose header says it was lossy compressed before."""
    ds = pydicom.dcmread(src)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "8.5"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    return write(ds, tmp / "lossy_flagged.dcm")


def no_pixels(tmp: Path) -> Path:
    """A Basic Text SR-like object: no Pixel Data at all."""
    ds = pydicom.dcmread(MR)
    for keyword in ("PixelData",):
        del ds[keyword]
    return write(ds, tmp / "nopixels.dcm")


def float_pixels(tmp: Path) -> Path:
    """Float Pixel Data (7FE0,0008) instead of Pixel Data."""
    ds = pydicom.dcmread(MR)
    arr = ds.pixel_array.astype(np.float32) / 7
    del ds.PixelData
    ds.FloatPixelData = arr.tobytes()
    ds.BitsAllocated, ds.BitsStored = 32, None
    del ds.BitsStored
    del ds.HighBit
    del ds.PixelRepresentation
    return write(ds, tmp / "float.dcm")


def truncated(tmp: Path) -> Path:
    """Native pixel data shorter than Rows x Columns says."""
    ds = pydicom.dcmread(MR)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return write(ds, tmp / "truncated.dcm")
