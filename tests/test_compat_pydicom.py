"""router.compat.pydicom: each workaround works, and a test fails the day pydicom no longer
needs it (then remove the workaround and its test)."""

from __future__ import annotations

import io
import subprocess
import sys

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from router.codecs import JPEGXL, JPEGXL_JPEG, JPEGXL_LOSSLESS
from router.compat.pydicom import swap_other_words_to_little_endian, teach_jpeg_xl
from tests.peers import REPO

JPEG_XL_UIDS = (JPEGXL_LOSSLESS, JPEGXL_JPEG, JPEGXL)


def _instance(transfer_syntax: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


# ---------------------------------------------------------------- JPEG XL transfer syntax UIDs


def test_pydicom_still_lacks_the_jpeg_xl_transfer_syntaxes():
    """Fails once pydicom ships them (pydicom PR #2157): then remove `teach_jpeg_xl`."""
    # a fresh interpreter: this one may have been taught already
    code = ("import sys, pydicom.uid; from pydicom._uid_dict import UID_dictionary; "
            f"print(sum(u in UID_dictionary for u in {JPEG_XL_UIDS!r}), hasattr(pydicom.uid, 'JPEGXLLossless'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False"], (
        f"pydicom {pydicom.__version__} knows the JPEG XL transfer syntaxes: remove teach_jpeg_xl")


def test_teaching_jpeg_xl_lets_pydicom_write_and_read_those_files():
    teach_jpeg_xl()
    teach_jpeg_xl()  # idempotent
    for uid in JPEG_XL_UIDS:
        assert UID(uid).is_transfer_syntax and UID(uid).is_little_endian and not UID(uid).is_implicit_VR
        assert UID(uid).is_compressed
        buffer = io.BytesIO()
        dcmwrite(buffer, _instance(uid), enforce_file_format=True)
        buffer.seek(0)
        assert pydicom.dcmread(buffer).file_meta.TransferSyntaxUID == uid
    assert UID(JPEGXL_LOSSLESS).name == "JPEG XL Lossless"


# ---------------------------------------------------------------- big endian OW values


def _big_endian_with_ow() -> bytes:
    ds = _instance(ExplicitVRBigEndian)
    ds.RedPaletteColorLookupTableData = b"\x01\x02\x03\x04"  # OW: two words, big endian
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    return buffer.getvalue()


def _rewritten_little_endian(big_endian: bytes, swap: bool) -> Dataset:
    ds = pydicom.dcmread(io.BytesIO(big_endian))
    assert ds.RedPaletteColorLookupTableData == b"\x01\x02\x03\x04"
    if swap:
        swap_other_words_to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    dcmwrite(out, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    out.seek(0)
    return pydicom.dcmread(out)


def test_pydicom_still_writes_big_endian_ow_values_unswapped():
    """Fails once pydicom swaps OW values when it changes the byte order: then remove
    `swap_other_words_to_little_endian` (it would swap them back)."""
    written = _rewritten_little_endian(_big_endian_with_ow(), swap=False)
    assert written.RedPaletteColorLookupTableData == b"\x01\x02\x03\x04", (
        f"pydicom {pydicom.__version__} now swaps OW values itself: remove swap_other_words_to_little_endian")


def test_swapping_other_words_keeps_their_values_in_little_endian():
    written = _rewritten_little_endian(_big_endian_with_ow(), swap=True)
    assert written.RedPaletteColorLookupTableData == b"\x02\x01\x04\x03"


@pytest.mark.parametrize("vr,size", [("OL", 4), ("OD", 8), ("OF", 4)])
def test_swapping_follows_the_word_size_and_leaves_pixel_data_alone(vr, size):
    ds = Dataset()
    value = bytes(range(8))
    ds.add_new(0x00091010, vr, value)
    ds.add_new(0x7FE00010, "OW", value)
    swap_other_words_to_little_endian(ds)
    words = [value[i:i + size][::-1] for i in range(0, 8, size)]
    assert ds[0x00091010].value == b"".join(words)
    assert ds.PixelData == value
