"""Workarounds of pydicom 3.0 behaviour (see the package docstring)."""

from __future__ import annotations

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from router.codecs.registry import JPEGXL, JPEGXL_JPEG, JPEGXL_LOSSLESS

# Other-word VRs and the size of one word: the values pydicom keeps as raw bytes
_WORD_SIZES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def teach_jpeg_xl() -> None:
    """Add the JPEG XL transfer syntaxes (DICOM 2024d, Supplement 232) to pydicom's UID dictionary.

    pydicom 3.0 does not know them: `UID.is_transfer_syntax` is False for them, so pydicom refuses
    to write a file in them and `UID.is_little_endian` raises. Added upstream by pydicom PR #2157
    ("Update data dicts to 2024d"), which no 3.0.x release carries. Idempotent; call it once from
    the modules that write or send such files.
    """
    from pydicom._uid_dict import UID_dictionary

    known = {
        JPEGXL_LOSSLESS: ("JPEG XL Lossless", "JPEGXLLossless"),
        JPEGXL_JPEG: ("JPEG XL JPEG Recompression", "JPEGXLJPEGRecompression"),
        JPEGXL: ("JPEG XL", "JPEGXL"),
    }
    for uid, (title, keyword) in known.items():
        UID_dictionary.setdefault(uid, (title, "Transfer Syntax", "", "", keyword))


def swap_other_words_to_little_endian(ds: Dataset) -> None:
    """Byte-swap every big endian OW/OL/OF/OD/OV value of ``ds`` (but Pixel Data) in place.

    pydicom keeps these values as the raw bytes it read and writes them back unchanged whatever
    the output's byte order (`filewriter.write_OWvalue`: "does not currently do the byte swapping
    for Endian state"); no upstream issue found for the conversion on write. Call it on a data
    set read as Explicit VR Big Endian before writing it little endian; Pixel Data is left to
    the caller, who decodes it.
    """

    def swap(dataset: Dataset, elem: DataElement) -> None:
        size = _WORD_SIZES.get(elem.VR)
        if size and elem.tag != 0x7FE00010 and isinstance(elem.value, (bytes, bytearray)) and elem.value:
            arr = np.frombuffer(elem.value, dtype=f">u{size}")
            elem.value = arr.astype(f"<u{size}").tobytes()

    ds.walk(swap)
