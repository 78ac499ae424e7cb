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
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from router.codecs import JPEGXL, JPEGXL_JPEG, JPEGXL_LOSSLESS
from router.compat.pydicom import resolve_ambiguous_vrs, swap_other_words_to_little_endian, teach_jpeg_xl
from tests.support.peers import REPO

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


# ---------------------------------------------------------------- ambiguous VRs from Implicit VR


def _implicit(tmp_path) -> pydicom.Dataset:
    from tests.support import transcode_images as img

    return pydicom.dcmread(img.curve_data_implicit(tmp_path))


def _as_explicit(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    dcmwrite(out, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    out.seek(0)
    return pydicom.dcmread(out)


def test_pydicom_still_cannot_write_every_ambiguous_vr_of_implicit_input(tmp_path):
    """Fails once pydicom writes these (Curve Data, Dark Current Counts, Gray LUT Data, Perimeter
    Value, LUT Data without descriptor) with explicit VR: then remove `resolve_ambiguous_vrs`."""
    ds = _implicit(tmp_path)
    for tag in (0x00283006, 0x50003000, 0x00143050, 0x00281200, 0x00280071):
        one = Dataset()
        one.file_meta = ds.file_meta
        one.set_original_encoding(True, True)
        one._dict[Tag(tag)] = ds._dict[Tag(tag)]  # still raw, as read
        with pytest.raises((ValueError, AttributeError), match="ambiguous VR"):
            _as_explicit(one)


def test_resolving_gives_dcmtks_vrs_and_keeps_the_bytes(tmp_path):
    ds = _implicit(tmp_path)
    tags = (0x50003000, 0x50023000, 0x00143050, 0x00280071, 0x00281200, 0x00283006)
    raw = {tag: ds._dict[Tag(tag)].value for tag in tags}
    resolve_ambiguous_vrs(ds)
    out = _as_explicit(ds)
    vrs = {tag: out[tag].VR for tag in raw}
    assert vrs == {0x50003000: "OW", 0x50023000: "OB", 0x00143050: "OB", 0x00280071: "SS", 0x00281200: "OW",
                   0x00283006: "OW"}
    for tag, value in raw.items():
        written = out[tag].value
        assert (written if isinstance(written, bytes) else int(written).to_bytes(2, "little", signed=True)) == value
    # in sequences too, by the nearest Pixel Representation
    item = out.ReferencedImageSequence[0]
    assert (item[0x00280106].VR, item[0x00280106].value, item[0x50043000].VR) == ("SS", -2, "OB")


def test_us_or_ss_follows_the_nearest_pixel_representation_and_is_us_without_one():
    ds = Dataset()
    ds.add_new(0x00280071, "US or SS", b"\xfe\xff")  # Perimeter Value
    inner = Dataset()
    inner.PixelRepresentation = 1
    inner.add_new(0x00280071, "US or SS", b"\xfe\xff")
    ds.add_new(0x00081140, "SQ", [inner])
    resolve_ambiguous_vrs(ds)
    assert (ds[0x00280071].VR, ds[0x00280071].value) == ("US", 65534)
    assert (inner[0x00280071].VR, inner[0x00280071].value) == ("SS", -2)


def test_variable_pixel_data_and_odd_values_never_stop_the_write():
    ds = Dataset()
    ds.BitsAllocated = 16
    ds.add_new(0x7F000010, "OB or OW", b"\x01\x00\x02\x00")  # Variable Pixel Data (retired)
    ds.add_new(0x00280071, "US or SS", b"\x01\x02\x03")  # three bytes: neither US nor SS
    resolve_ambiguous_vrs(ds)
    assert (ds[0x7F000010].VR, ds[0x00280071].VR) == ("OW", "UN")
    assert ds[0x00280071].value == b"\x01\x02\x03"
