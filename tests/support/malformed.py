"""Malformed DICOM files: a valid file meta header followed by a broken data set.

Each file starts from a small valid image (a *seed*). The data set bytes are then changed
without decoding them: cut short, an element's declared length or VR rewritten, a sequence
or item that never ends, a declared length of 0xFFFFFFF0, pixel data shorter than
Rows x Columns, a corrupt JPEG / JPEG-LS / JPEG 2000 / RLE codestream, or random bytes.
The file meta (group 0002) stays valid so that a sender can still propose a presentation
context and stream the broken body unchanged.

``CATALOGUE`` lists named cases with what a router must do with each; the fuzz tests build
further cases from the same operations.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pydicom
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble  # noqa: PLC2701
from pydicom.filewriter import write_file_meta_info

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

HUGE = 0xFFFFFFF0
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# name -> a small valid image in pydicom's own test files
SEEDS = {
    "native": "MR_small.dcm",  # Explicit VR Little Endian, 64x64 16-bit
    "implicit": "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "rgb": "SC_rgb_small_odd.dcm",  # Explicit VR Little Endian, 3x3 RGB 8-bit
    "jpeg": "SC_rgb_small_odd_jpeg.dcm",  # JPEG Baseline, lossy
    "jpeg-ls": "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "j2k": "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "rle": "MR_small_RLE.dcm",  # RLE Lossless
}
ENCAPSULATED_SEEDS = ("jpeg", "jpeg-ls", "j2k", "rle")


@dataclass(frozen=True)
class Element:
    """One top-level element of an encoded data set, located by byte offsets."""

    offset: int  # where its tag starts
    tag: int
    vr: bytes | None  # None in implicit VR
    length: int  # as declared
    value_offset: int
    end: int  # offset just after the element (after its delimiter when undefined length)

    @property
    def length_offset(self) -> int:
        """Where the declared length is written."""
        if self.vr is None:
            return self.offset + 4
        return self.offset + (8 if self.vr in _LONG_VRS else 6)

    @property
    def length_size(self) -> int:
        return 4 if self.vr is None or self.vr in _LONG_VRS else 2


@dataclass(frozen=True)
class Seed:
    name: str
    path: Path
    meta: bytes  # preamble, "DICM" and the group 0002 elements
    body: bytes  # the data set
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    implicit: bool
    little: bool

    def elements(self, body: bytes | None = None) -> list[Element]:
        return walk(self.body if body is None else body, self.implicit, self.little)

    def element(self, tag: int) -> Element:
        return next(e for e in self.elements() if e.tag == tag)

    def file(self, body: bytes, sop_instance_uid: str | None = None) -> bytes:
        """Preamble, file meta and ``body``; the meta names ``sop_instance_uid`` when given."""
        if sop_instance_uid is None:
            return self.meta + body
        return file_meta(self.transfer_syntax_uid, self.sop_class_uid, sop_instance_uid) + body


def file_meta(transfer_syntax_uid: str, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A valid preamble, "DICM" prefix and group 0002."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, data set) of a DICOM file's bytes."""
    fp = DicomBytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return data[: fp.tell()], data[fp.tell() :]


@cache
def seed(name: str) -> Seed:
    path = TEST_FILES / SEEDS[name]
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        offset = fp.tell()
    raw = path.read_bytes()
    uid = meta.TransferSyntaxUID
    ds = dcmread(path, stop_before_pixels=True)
    return Seed(
        name=name,
        path=path,
        meta=raw[:offset],
        body=raw[offset:],
        transfer_syntax_uid=str(uid),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        implicit=uid.is_implicit_VR,
        little=uid.is_little_endian,
    )


# ---------------------------------------------------------------- reading the bytes


def _u16(data: bytes, at: int, little: bool) -> int:
    return struct.unpack_from("<H" if little else ">H", data, at)[0]


def _u32(data: bytes, at: int, little: bool) -> int:
    return struct.unpack_from("<I" if little else ">I", data, at)[0]


def _tag(data: bytes, at: int, little: bool) -> int:
    return _u16(data, at, little) << 16 | _u16(data, at + 2, little)


def _skip_items(data: bytes, at: int, implicit: bool, little: bool) -> int:
    """From the first item of an undefined-length value to just after its sequence delimiter."""
    while at + 8 <= len(data):
        tag, length = _tag(data, at, little), _u32(data, at + 4, little)
        at += 8
        if tag == SEQUENCE_END:
            return at
        if tag != ITEM:
            raise ValueError(f"unexpected tag {tag:08X} in an undefined-length value")
        if length == UNDEFINED:
            at = _skip_dataset(data, at, implicit, little)
        else:
            at += length
    raise ValueError("undefined-length value without a sequence delimiter")


def _skip_dataset(data: bytes, at: int, implicit: bool, little: bool) -> int:
    """From the start of an undefined-length item's data set to just after its delimiter."""
    while at + 8 <= len(data):
        if _tag(data, at, little) == ITEM_END:
            return at + 8
        at = _element_at(data, at, implicit, little).end
    raise ValueError("undefined-length item without an item delimiter")


def _element_at(data: bytes, at: int, implicit: bool, little: bool) -> Element:
    tag = _tag(data, at, little)
    if implicit:
        vr, length, value = None, _u32(data, at + 4, little), at + 8
    else:
        vr = data[at + 4 : at + 6]
        if vr in _LONG_VRS:
            length, value = _u32(data, at + 8, little), at + 12
        else:
            length, value = _u16(data, at + 6, little), at + 8
    if length == UNDEFINED:
        end = _skip_items(data, value, implicit, little)
    else:
        end = value + length
    return Element(at, tag, vr, length, value, end)


def walk(body: bytes, implicit: bool, little: bool) -> list[Element]:
    """The top-level elements of a well-formed data set."""
    elements, at = [], 0
    while at + 8 <= len(body):
        element = _element_at(body, at, implicit, little)
        elements.append(element)
        at = element.end
    return elements


def fragments(seed_: Seed) -> list[tuple[int, int]]:
    """(offset, length) of the values of the encapsulated Pixel Data items after the offset table."""
    pixel = seed_.element(PIXEL_DATA)
    if pixel.length != UNDEFINED:
        return []
    found, at, body = [], pixel.value_offset, seed_.body
    while True:
        tag, length = _tag(body, at, seed_.little), _u32(body, at + 4, seed_.little)
        if tag != ITEM:
            break
        found.append((at + 8, length))
        at += 8 + length
    return found[1:]


# ---------------------------------------------------------------- the operations


def _pack_u(value: int, size: int, little: bool) -> bytes:
    return struct.pack(("<" if little else ">") + ("H" if size == 2 else "I"), value)


def truncate(body: bytes, at: int) -> bytes:
    """The data set cut after ``at`` bytes."""
    return body[: max(0, min(at, len(body)))]


def set_length(seed_: Seed, body: bytes, element: Element, length: int) -> bytes:
    """``element`` with another declared length (a 2-byte length field keeps the low 16 bits)."""
    size = element.length_size
    value = length & (0xFFFF if size == 2 else 0xFFFFFFFF)
    at = element.length_offset
    return body[:at] + _pack_u(value, size, seed_.little) + body[at + size :]


def set_vr(body: bytes, element: Element, vr: bytes) -> bytes:
    """``element`` with another two-character VR, its length field left as it was."""
    assert element.vr is not None and len(vr) == 2
    at = element.offset + 4
    return body[:at] + vr + body[at + 2 :]


def encode_element(seed_: Seed, tag: int, vr: bytes, value: bytes | None, length: int | None = None) -> bytes:
    """One element in the seed's encoding; ``value=None`` gives undefined length and no value."""
    declared = length if length is not None else (UNDEFINED if value is None else len(value))
    group, elem = _pack_u(tag >> 16, 2, seed_.little), _pack_u(tag & 0xFFFF, 2, seed_.little)
    if seed_.implicit:
        head = group + elem + _pack_u(declared, 4, seed_.little)
    elif vr in _LONG_VRS:
        head = group + elem + vr + b"\x00\x00" + _pack_u(declared, 4, seed_.little)
    else:
        head = group + elem + vr + _pack_u(declared & 0xFFFF, 2, seed_.little)
    return head + (value or b"")


def item(seed_: Seed, content: bytes | None, length: int | None = None) -> bytes:
    declared = length if length is not None else (UNDEFINED if content is None else len(content))
    head = _pack_u(0xFFFE, 2, seed_.little) + _pack_u(0xE000, 2, seed_.little)
    return head + _pack_u(declared, 4, seed_.little) + (content or b"")


def insert_before(seed_: Seed, body: bytes, tag: int, raw: bytes) -> bytes:
    """``raw`` placed just before the first top-level element whose tag is >= ``tag``; at the end
    of a body that earlier edits made unreadable to this walk (it is broken either way)."""
    try:
        at = next((e.offset for e in seed_.elements(body) if e.tag >= tag), len(body))
    except ValueError:
        at = len(body)
    return body[:at] + raw + body[at:]


def endless_sequence(seed_: Seed, with_item: bool, items: int = 1) -> bytes:
    """An undefined-length sequence (Referenced Image Sequence) whose delimiters never come.

    The rest of the data set, pixel data included, ends up inside the never-ending item.
    """
    opening = encode_element(seed_, 0x00081140, b"SQ", None)
    if with_item:
        inner = encode_element(seed_, 0x00081150, b"UI", seed_.sop_class_uid.encode() + b"\x00" * (len(seed_.sop_class_uid) % 2))
        closed = item(seed_, inner)
        opening += closed * (items - 1) + item(seed_, None)
    return insert_before(seed_, seed_.body, 0x00081140, opening)


def short_pixels(seed_: Seed, keep: int) -> bytes:
    """Native pixel data whose declared length matches its bytes, fewer than Rows x Columns needs."""
    pixel = seed_.element(PIXEL_DATA)
    assert pixel.length != UNDEFINED
    keep = max(0, min(keep, pixel.length - 2)) & ~1
    value = seed_.body[pixel.value_offset : pixel.value_offset + keep]
    head = set_length(seed_, seed_.body[: pixel.value_offset], pixel, keep)
    return head + value + seed_.body[pixel.end :]


def replace_range(body: bytes, at: int, length: int, data: bytes) -> bytes:
    """``length`` bytes at ``at`` replaced by ``data`` of the same size (cycled or cut)."""
    if length <= 0 or not data:
        return body
    filler = (data * (length // len(data) + 1))[:length]
    return body[:at] + filler + body[at + length :]


def corrupt_fragment(seed_: Seed, how: str, position: float = 0.5, noise: bytes = b"\xa5") -> bytes:
    """The first codestream fragment of an encapsulated seed, damaged.

    how: "noise" overwrites from ``position`` (a fraction of the fragment) to the end keeping
    the fragment's length; "zeros" the same with zero bytes; "header" overwrites the first
    bytes (the codestream's markers and dimensions); "short" cuts the fragment at
    ``position`` and fixes the item length so that the encapsulation stays well-formed.
    """
    offset, length = fragments(seed_)[0]
    body = seed_.body
    start = offset + min(length - 1, max(0, int(length * position)))
    if how == "noise":
        return replace_range(body, start, offset + length - start, noise)
    if how == "zeros":
        return replace_range(body, start, offset + length - start, b"\x00")
    if how == "header":
        return replace_range(body, offset, min(32, length), noise)
    if how == "short":
        keep = (start - offset) & ~1
        head = body[: offset - 4] + _pack_u(keep, 4, seed_.little)
        return head + body[offset : offset + keep] + body[offset + length :]
    raise ValueError(how)


def random_body(size: int, seed_value: int) -> bytes:
    return random.Random(seed_value).randbytes(size)


# ---------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    """A malformed file and what a router must do with it.

    expect:
      "reject" - the data set cannot be parsed: a 0xC000-range status, counted as malformed,
        never forwarded;
      "fallback" - the header is fine but the pixels cannot be decoded: stored, forwarded byte
        for byte as received, counted as a codec_error fallback;
      "stored" - a damaged codestream a decoder may conceal: stored and forwarded, either as
        received (a codec_error fallback) or decoded;
      "either" - elements are well delimited but a value does not fit its VR: "reject" or
        "fallback".
    """

    name: str
    seed: str
    body: bytes
    expect: str
    target: str  # the outbound syntax the router is asked for (so that transcoding decodes)

    @property
    def source(self) -> Seed:
        return seed(self.seed)

    def body_for(self, sop_instance_uid: str | None) -> bytes:
        """The body with the seed's SOP Instance UID replaced (same length, same offsets)."""
        if sop_instance_uid is None:
            return self.body
        old = self.source.sop_instance_uid
        assert len(sop_instance_uid) == len(old)
        return self.body.replace(old.encode(), sop_instance_uid.encode())

    def unique_uid(self, rng: random.Random | None = None) -> str:
        """A new UID as long as the seed's, so that it can replace it in the body."""
        rng = rng or random.Random()
        size = len(self.source.sop_instance_uid) - 5
        return "2.25." + str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(size - 1))

    def data(self, sop_instance_uid: str | None = None) -> bytes:
        """The file; a given UID goes in the file meta and replaces the seed's in the body."""
        return self.source.file(self.body_for(sop_instance_uid), sop_instance_uid)

    def write(self, directory: Path, sop_instance_uid: str | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.dcm"
        path.write_bytes(self.data(sop_instance_uid))
        return path


def _catalogue() -> list[Case]:
    cases: list[Case] = []
    native, implicit = seed("native"), seed("implicit")

    def add(name: str, seed_name: str, body: bytes, expect: str, target: str = "jpeg-ls-lossless") -> None:
        cases.append(Case(name, seed_name, body, expect, target))

    for s in (native, implicit):
        elements = s.elements()
        study = s.element(0x0020000D)
        pixel = s.element(PIXEL_DATA)
        # cut inside a value before the pixel data: the declared length runs past the end
        add(f"{s.name}-truncated-in-study-uid", s.name, truncate(s.body, study.value_offset + 3), "reject")
        add(f"{s.name}-truncated-in-element-header", s.name, truncate(s.body, elements[3].offset + 5), "reject")
        add(f"{s.name}-truncated-in-pixel-data", s.name, truncate(s.body, pixel.value_offset + 1000), "reject")
        # an element declared longer than the data set
        document = encode_element(s, 0x00420011, b"OB", b"%PDF-1.4", HUGE)  # Encapsulated Document
        add(f"{s.name}-huge-length-in-header", s.name, insert_before(s, s.body, 0x00420011, document), "reject")
        add(f"{s.name}-huge-pixel-data-length", s.name, set_length(s, s.body, pixel, HUGE), "reject")
        # a declared length that lands in the middle of the next element
        add(f"{s.name}-length-off-by-3", s.name, set_length(s, s.body, study, study.length + 3), "reject")
        # sequences and items that never end
        add(f"{s.name}-endless-sequence", s.name, truncate(endless_sequence(s, False), study.offset + 40), "reject")
        add(f"{s.name}-endless-item", s.name, endless_sequence(s, True), "reject")
        # pixel data shorter than Rows x Columns x BitsAllocated says, encoded consistently
        add(f"{s.name}-pixels-short", s.name, short_pixels(s, pixel.length // 3), "fallback")
    # wrong VRs in the header (explicit VR only)
    s = native
    bits_stored = s.element(0x00280101)
    rows = s.element(0x00280010)
    add("native-bits-stored-3-bytes", "native",
        set_length(s, s.body[: bits_stored.end] + b"\x00" + s.body[bits_stored.end :], bits_stored, 3), "reject")
    add("native-rows-as-FD", "native", set_vr(s.body, rows, b"FD"), "either")
    add("native-rows-as-SQ", "native", set_vr(s.body, rows, b"SQ"), "reject")
    add("native-vr-not-letters", "native", set_vr(s.body, s.element(0x00080060), b"\x00\x01"), "reject")
    # random bytes behind a valid file meta
    for size, value in ((16, 1), (333, 2), (4096, 3)):
        add(f"random-{size}-bytes", "native", random_body(size, value), "reject")
    add("empty-data-set", "native", b"", "reject")
    # a valid header with a corrupt codestream
    for name in ENCAPSULATED_SEEDS:
        target = "explicit-le"
        for how in ("noise", "zeros", "header", "short"):
            expect = "fallback" if how == "header" or name == "jpeg" else "stored"
            add(f"{name}-codestream-{how}", name, corrupt_fragment(seed(name), how), expect, target)
    return cases


CATALOGUE = _catalogue()
