"""Write the output: the Pixel Data of a data set set anew (native, encoded or re-packed
fragments, with what describes them), and the file, spliced from the input's own bytes when
only the Pixel Data changed, else written by pydicom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_description
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_file_meta_info

from router.codecs.pixeldata import Pixels
from router.codecs.registry import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, ImageInfo, Syntax
from router.compat.pydicom import swap_other_words_to_little_endian

# Offsets in a Basic Offset Table are 32-bit
_BOT_LIMIT = 2**32 - 1


def set_native(ds: Dataset, pixels: Pixels) -> None:
    """``pixels`` as the native Pixel Data of ``ds``, little endian, with what describes them."""
    image = pixels.image
    dtype = np.dtype(f"<{'i' if image.signed else 'u'}{image.bits_allocated // 8}")
    data = b"".join(np.ascontiguousarray(f, dtype=dtype).tobytes() for f in pixels.frames)
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    elem = ds["PixelData"]
    elem.VR = "OW" if image.bits_allocated > 8 else "OB"
    elem.is_undefined_length = False
    ds.PhotometricInterpretation = image.photometric
    if image.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]


def set_encoded(ds: Dataset, syntax: Syntax, image: ImageInfo, fragments: list[bytes]) -> None:
    """``fragments`` (one frame each, coded by ``syntax``) as the Pixel Data of ``ds``, with the
    Image Pixel attributes the codestreams have."""
    set_encapsulated(ds, fragments)
    ds.PhotometricInterpretation = syntax.photometric_for(image)
    if image.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    bits_allocated = syntax.bits_allocated_for(image)
    if bits_allocated != image.bits_allocated:
        stored = min(image.bits_stored, bits_allocated)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, stored, stored - 1


def set_encapsulated(ds: Dataset, fragments: list[bytes]) -> None:
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    total = sum(len(f) + 8 for f in fragments)
    if total > _BOT_LIMIT:
        data, offsets, lengths = encapsulate_extended(fragments)
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    else:
        ds.PixelData = encapsulate(fragments, has_bot=True)
    elem = ds["PixelData"]
    elem.VR = "OB"
    elem.is_undefined_length = True


def element_name(tag: int) -> str:
    """The tag and name of a data element, as in "(0088,0200) Icon Image Sequence"."""
    try:
        name = dictionary_description(tag)
    except KeyError:
        name = "private sequence"
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {name}"


def guess_ts(ds: Dataset) -> str:
    if ds.is_little_endian is False:
        return EXPLICIT_BE
    return IMPLICIT_LE if ds.is_implicit_VR else EXPLICIT_LE


def write_file(ds: Dataset, src: Path, dst: Path, ts: str, uid: str, raw_pixels: tuple[int, int] | None) -> None:
    """Write ``ds`` (read from ``src`` in ``ts``) to ``dst`` in ``uid``. ``raw_pixels``: where
    the input's native Pixel Data value lies, when only the Pixel Data changed: then the output
    is the input's own bytes around the new Pixel Data."""
    if ts == EXPLICIT_BE:
        swap_other_words_to_little_endian(ds)
    meta = ds.file_meta
    meta.TransferSyntaxUID = uid
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.preamble = ds.preamble if getattr(ds, "preamble", None) else b"\x00" * 128
    dst.parent.mkdir(parents=True, exist_ok=True)
    if raw_pixels is not None and _write_spliced(ds, src, dst, raw_pixels):
        return
    if 0x7FE00000 in ds:  # a retired group length that would still count the old pixels
        del ds[0x7FE00000]
    if ts == EXPLICIT_BE:
        # pydicom only re-encodes big endian on request; OW values were swapped above
        dcmwrite(dst, ds, implicit_vr=uid == IMPLICIT_LE, little_endian=True, force_encoding=True)
    else:
        dcmwrite(dst, ds, implicit_vr=uid == IMPLICIT_LE, little_endian=True, enforce_file_format=True)


def _write_spliced(ds: Dataset, src: Path, dst: Path, raw_pixels: tuple[int, int]) -> bool:
    """Write the output as the input's bytes with new file meta and new Pixel Data; False
    when the input's layout is not the plain one this needs (then pydicom writes it).

    Explicit VR Little Endian in and out, and no data element but Pixel Data changed: the
    elements are copied as they were received instead of being re-encoded one by one.
    """
    data = src.read_bytes()
    # preamble, DICM, then (0002,0000) UL 4 <group length>: the data set follows the group
    if data[128:132] != b"DICM" or data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return False
    start = 144 + int.from_bytes(data[140:144], "little")
    value_at, length = raw_pixels
    head = value_at - 12
    if (head < start or data[head:head + 4] != b"\xe0\x7f\x10\x00" or data[head + 4:head + 6] not in (b"OW", b"OB")
            or data[head + 6:head + 8] != b"\x00\x00" or int.from_bytes(data[head + 8:head + 12], "little") != length
            or value_at + length > len(data)):
        return False
    before = head  # where the copied elements before Pixel Data end
    if 0x7FE00000 in ds:
        # a retired group length, (7FE0,0000) UL right before Pixel Data: it would still count
        # the old pixels, so it is left out
        if data[head - 12:head - 4] != b"\xe0\x7f\x00\x00UL\x04\x00" or head - 12 < start:
            return False
        before = head - 12
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    pixels = ds.PixelData
    with open(dst, "wb") as out:
        out.write(data[:128])
        out.write(b"DICM")
        out.write(meta.getvalue())
        out.write(memoryview(data)[start:before])
        out.write(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
        out.write(pixels)
        out.write(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
        out.write(memoryview(data)[value_at + length:])
    return True
