"""Workarounds of pydicom 3.0 behaviour (see the package docstring)."""

from __future__ import annotations

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from router.uids import JPEGXL, JPEGXL_JPEG, JPEGXL_LOSSLESS

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
            import numpy as np  # the codec side only: the receiving processes never swap words

            arr = np.frombuffer(elem.value, dtype=f">u{size}")
            elem.value = arr.astype(f"<u{size}").tobytes()

    ds.walk(swap)


# The ambiguous VRs of the data dictionary (PS3.6 section 6), as pydicom spells them
_AMBIGUOUS_VRS = frozenset({"OB or OW", "US or SS", "US or SS or OW", "US or OW"})
_CURVE_DATA = 0x50003000  # 50xx,3000, retired
_CURVE_DATA_VALUE_REPRESENTATION = 0x0103  # 50xx,0103: 0 US, 1 SS, 2 FL, 3 FD, 4 SL: words, all of them
_VARIABLE_PIXEL_DATA = 0x7F000010  # 7Fxx,0010, retired
_REPEATING = 0xFF00FFFF  # the mask of the repeating groups 50xx and 60xx/7Fxx
# raw elements whose VR is still to be decided: implicit VR (None), UN (pydicom replaces it with
# the dictionary's VR, perhaps an ambiguous one), and sequences (their items may hold either)
_UNDECIDED_RAW_VRS = frozenset({None, "UN", "SQ"})


def resolve_ambiguous_vrs(ds: Dataset, is_little_endian: bool = True) -> None:
    """Give every element of ``ds``, in sequences too, whose dictionary VR is ambiguous ('OB or
    OW', 'US or SS', 'US or SS or OW', 'US or OW': elements read from Implicit VR) one VR, keeping
    its bytes, so that ``ds`` can be written with explicit VR. Never raises for a VR.

    pydicom resolves the common ones (Pixel Data, Overlay Data, waveform and LUT data, the pixel
    values it lists by Pixel Representation) and leaves the rest ambiguous, which its writer then
    refuses: "Cannot write ambiguous VR of 'OB or OW'" (pydicom issue #66, closed by adding that
    error; the retired and DICONDE elements listed as unsolved in pydicom/pynetdicom#3 still are:
    Curve Data 50xx,3000, Audio Sample Data 50xx,200C, Variable Pixel Data 7Fxx,0010, Dark Current
    and Air Counts 0014,3050/3070, Gray LUT Data 0028,1200, Perimeter Value 0028,0071, the Gray
    and Large Palette LUT descriptors 0028,1100 and 0028,1111-1113). Where the attribute it decides
    by is missing (LUT Data without LUT Descriptor, waveform data without Waveform Bits Allocated)
    it raises AttributeError instead (pydicom PR #728), even on reading the element.

    What pydicom leaves is resolved as DCMTK resolves it; little endian bytes read the same as OB
    or OW, so no value changes:
    - 'OB or OW': OW where the data are words (Curve Data whose group has a Curve Data Value
      Representation; Variable Pixel Data with Bits Allocated above 8), else OB, DCMTK's choice
      for data of unknown word size;
    - 'US or SS': SS where the nearest Pixel Representation (this item's or an enclosing data
      set's) is 1, else US;
    - 'US or SS or OW' and 'US or OW': OW, a table of words.
    """
    _resolve(ds, [ds], is_little_endian)


def _resolve(ds: Dataset, ancestors: list[Dataset], is_little_endian: bool) -> None:
    from pydicom.filewriter import correct_ambiguous_vr_element

    for tag, raw in list(ds._dict.items()):
        if isinstance(raw, RawDataElement) and raw.VR not in _UNDECIDED_RAW_VRS:
            continue  # read with an explicit VR of its own: nothing to decide, nothing to convert
        try:
            elem = ds[tag]  # converts a raw element, and pydicom resolves what it can
        except AttributeError:
            elem = ds._dict[tag]  # converted, its VR left ambiguous
        if not isinstance(elem, DataElement):
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                _resolve(item, [item, *ancestors], is_little_endian)
            continue
        if elem.VR not in _AMBIGUOUS_VRS:
            continue
        try:
            correct_ambiguous_vr_element(elem, ds, is_little_endian, ancestors)
        except AttributeError:
            pass
        if elem.VR in _AMBIGUOUS_VRS:
            _resolve_as_dcmtk(elem, ds, ancestors, is_little_endian)


def _nearest(ancestors: list[Dataset], keyword: str) -> int | None:
    for dataset in ancestors:
        value = dataset.get(keyword)
        if isinstance(value, int):
            return value
    return None


def _resolve_as_dcmtk(elem: DataElement, ds: Dataset, ancestors: list[Dataset], is_little_endian: bool) -> None:
    from pydicom.values import convert_numbers

    tag = int(elem.tag)
    if elem.VR == "OB or OW":
        words = False
        if tag & _REPEATING == _CURVE_DATA:
            words = (tag & 0xFFFF0000 | _CURVE_DATA_VALUE_REPRESENTATION) in ds
        elif tag & _REPEATING == _VARIABLE_PIXEL_DATA:
            words = (_nearest(ancestors, "BitsAllocated") or 0) > 8
        elem.VR = "OW" if words else "OB"
    elif elem.VR == "US or SS":
        signed = _nearest(ancestors, "PixelRepresentation") == 1
        value = elem.value
        if isinstance(value, (bytes, bytearray)):
            if len(value) % 2:  # not a value of either: its bytes go out as they are
                elem.VR = "UN"
                return
            value = convert_numbers(bytes(value), is_little_endian, "h" if signed else "H")
        elem.VR = "SS" if signed else "US"
        elem.value = value
    else:  # 'US or SS or OW', 'US or OW'
        elem.VR = "OW"
