"""Reading a received file's header strictly enough to refuse what is not a whole data set.

pydicom reads leniently: a file cut short, or an element declaring more bytes than the file
holds, still gives a Dataset. A router that answered success for such a file would forward
garbage while the modality believes the image is stored. Here every top-level element must fit
in the file, every value must decode, the Pixel Data must end where it says it does, and the
instance must name itself. Values longer than a few KiB are never read into memory, so a
declared length of 4 GB costs nothing.

The UIDs the router keeps and shows (SOP Class, SOP Instance, Study and Series Instance UID)
must be valid UI values (`uid_problem`, `check_uids`): a value with a space, a quote or a
control character could not be stored, searched or shown safely, and is refused as malformed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.valuerep import VR

from router.text import escape
from router.uids import DEFLATED

_VALID_VRS = frozenset(v.value for v in VR)

UNDEFINED = 0xFFFFFFFF
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_DEFER = 4096


class MalformedDataset(ValueError):
    """The file does not hold a complete, decodable DICOM data set; the message says why."""


# PS3.5 9.1: digits in components separated by dots, at most 64 characters. A component with a
# leading zero ("1.2.03") breaks the standard's letter but not the value: older equipment makes
# such UIDs, every archive stores them, and they are accepted.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def uid_problem(value: object) -> str | None:
    """Why `value` is not a UID the router accepts (PS3.5 9.1: digits and dots, at most 64
    characters; trailing NUL or space padding already removed), or None when it is one."""
    if not isinstance(value, str):
        return "is not a single value"
    if not value:
        return "is empty"
    if len(value) > 64:
        return f"has {len(value)} characters (at most 64)"
    if not _UID.fullmatch(value):
        return "is not digits separated by dots"
    return None


def check_uids(ds: Dataset) -> None:
    """Raise MalformedDataset naming the first of the data set's UIDs the router keeps (SOP
    Class, SOP Instance, Study and Series Instance UID; the last two may be absent) that is not
    a valid UI value, its value escaped."""
    for keyword in UID_KEYWORDS:
        value = ds.get(keyword)
        if value is not None and value != "" and (problem := uid_problem(value)) is not None:
            raise MalformedDataset(f"{keyword} '{escape(value)}' {problem}")


def _raw_end(elem: RawDataElement) -> int:
    if elem.length == UNDEFINED:
        return elem.value_tell + len(elem.value or b"") + 8
    return elem.value_tell + elem.length


def read_header(path: Path | str, expected_sop_instance_uid: str | None = None,
                decode: tuple[str, ...] | list[str] = ()) -> Dataset:
    """The data set without its pixel data; raises MalformedDataset.

    The elements named in `decode` (keywords) are decoded here, so that a value that does not
    fit its VR is reported as malformed rather than surfacing later.
    """
    size = os.path.getsize(path)
    try:
        ds = dcmread(path, stop_before_pixels=True, defer_size=_DEFER)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for broken input
        raise MalformedDataset(f"cannot be parsed: {type(exc).__name__}: {exc}") from None
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    deflated = transfer_syntax == DEFLATED
    end = 0
    if not deflated:
        for tag, elem in list(ds._dict.items()):
            if isinstance(elem, RawDataElement):
                stop = _raw_end(elem)
                if stop > size:
                    raise MalformedDataset(
                        f"element {tag} declares {elem.length} bytes but the file ends {stop - size} bytes short"
                    )
                end = max(end, stop)
    for tag, elem in list(ds._dict.items()):
        vr = getattr(elem, "VR", None)
        if vr is not None and vr not in _VALID_VRS:
            raise MalformedDataset(f"element {tag} has an invalid VR {vr!r}")
    try:
        for keyword in decode:
            ds.get(keyword)
    except Exception as exc:  # noqa: BLE001
        raise MalformedDataset(f"an element cannot be decoded: {type(exc).__name__}: {exc}") from None
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise MalformedDataset(f"no {keyword} in the data set")
    if expected_sop_instance_uid and str(ds.SOPInstanceUID).strip() != expected_sop_instance_uid.strip():
        raise MalformedDataset(
            f"SOP Instance UID in the data set ({ds.SOPInstanceUID}) differs from the request's "
            f"({expected_sop_instance_uid})"
        )
    if not deflated and end and end < size:
        _check_pixel_element(path, ds, end, size)
    return ds


def _check_pixel_element(path: Path | str, ds: Dataset, offset: int, size: int) -> None:
    implicit, little = ds.original_encoding
    with open(path, "rb") as fp:
        fp.seek(offset)
        try:
            elem = None
            for candidate in data_element_generator(fp, bool(implicit), bool(little), defer_size=_DEFER):
                if candidate.tag >= 0x7FE00008:
                    elem = candidate
                    break
        except Exception as exc:  # noqa: BLE001
            raise MalformedDataset(f"pixel data element cannot be parsed: {type(exc).__name__}: {exc}") from None
        if not isinstance(elem, RawDataElement):
            return
        if elem.length != UNDEFINED:
            stop = elem.value_tell + elem.length
            if stop > size:
                raise MalformedDataset(
                    f"element {elem.tag} declares {elem.length} bytes but the file ends {stop - size} bytes short"
                )
            return
        stop = fp.tell()
        fp.seek(max(0, stop - 8))
        if stop > size or fp.read(8) != _SEQUENCE_DELIMITER:
            raise MalformedDataset(f"encapsulated element {elem.tag} ends before its sequence delimiter")
