"""What one frame's codestream declares about itself, read from its header without decoding it.

A decoder allocates what the codestream's header declares, whatever the DICOM header says: a
frame of a few hundred bytes may declare 65535 x 65535 pixels. Reading the declared size first
lets the caller refuse such a frame before any decoder allocates it. The codestream is
recognised by its first bytes, not by the transfer syntax, so any syntax whose frames are JPEG
(ISO 10918, all processes), JPEG-LS (ISO 14495), JPEG 2000 or HTJ2K (ISO 15444-1/-15, raw or in a
JP2 container) or JPEG XL (ISO 18181, raw or in its container) is covered. Pure Python: no
numpy, no pydicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JXL_CODESTREAM = b"\xff\x0a"
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"

# JPEG start-of-frame markers: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC); JPEG-LS SOF55 (F7)
_JPEG_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
# markers without a length field: TEM, RST0-RST7
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9

# JPEG XL SizeHeader: the aspect ratios of `ratio` 1..7 (ISO 18181-1, D.2)
_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


class CodestreamError(ValueError):
    """A codestream of a known kind whose header does not say how large its image is."""


@dataclass(frozen=True)
class Declared:
    """The image a codestream declares: rows (0 when the codestream defines them later, as a
    JPEG with a DNL marker does), columns and components (None where the header does not say)."""

    rows: int
    columns: int
    components: int | None


def declared(data: bytes) -> Declared | None:
    """The image ``data`` (one frame's codestream) declares; None when it is of no kind known
    here (RLE, native data), so that nothing can be said before decoding.

    Raises CodestreamError for a JPEG, JPEG-LS, JPEG 2000 or JPEG XL codestream whose header
    cannot be read: no decoder could decode it either.
    """
    if data.startswith(_JPEG_SOI):
        return _jpeg(data)
    if data.startswith(_J2K_SOC_SIZ):
        return _j2k(data, 0)
    if data.startswith(_JP2_SIGNATURE):
        at = data.find(_J2K_SOC_SIZ)
        if at < 0:
            raise CodestreamError("JP2 file without a JPEG 2000 codestream")
        return _j2k(data, at)
    if data.startswith(_JXL_CODESTREAM):
        return _jxl(data[2:])
    if data.startswith(_JXL_CONTAINER):
        return _jxl(_jxl_codestream(data)[2:])
    return None


def starts_a_codestream(fragment: bytes) -> bool:
    """True when ``fragment`` begins with the start of a JPEG-family, JPEG 2000 or JPEG XL
    codestream (a fragment in the middle of a frame does not)."""
    return fragment.startswith((_JPEG_SOI, _J2K_SOC_SIZ, _JP2_SIGNATURE, _JXL_CODESTREAM, _JXL_CONTAINER))


def _jpeg(data: bytes) -> Declared:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise CodestreamError(f"JPEG codestream: no marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            break
        (length,) = struct.unpack_from(">H", data, at + 2)
        if marker in _JPEG_SOF:
            if at + 10 > len(data):
                break
            rows, columns = struct.unpack_from(">HH", data, at + 5)
            return Declared(rows, columns, data[at + 9])
        at += 2 + length
    raise CodestreamError("JPEG codestream without a frame header (SOF) before its first scan")


def _j2k(data: bytes, at: int) -> Declared:
    # SOC, then SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz
    if at + 42 > len(data):
        raise CodestreamError("JPEG 2000 codestream shorter than its image header (SIZ)")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, at + 8)
    (components,) = struct.unpack_from(">H", data, at + 40)
    if xosiz > xsiz or yosiz > ysiz:
        raise CodestreamError("JPEG 2000 image header (SIZ) with an offset beyond the image")
    return Declared(ysiz - yosiz, xsiz - xosiz, components)


def _jxl_codestream(data: bytes) -> bytes:
    """The codestream inside a JPEG XL container: the jxlc box, or the first jxlp box."""
    at = 0
    while at + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, at)
        head = 8
        if size == 1:
            if at + 16 > len(data):
                break
            (size,) = struct.unpack_from(">Q", data, at + 8)
            head = 16
        end = len(data) if size == 0 else at + size
        if kind == b"jxlc":
            return data[at + head:end]
        if kind == b"jxlp":
            return data[at + head + 4:end]
        if size < head:
            break
        at = end
    raise CodestreamError("JPEG XL container without a codestream box")


class _Bits:
    """Bits of a JPEG XL header, least significant first."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def u(self, n: int) -> int:
        value = 0
        for i in range(n):
            byte = self.at >> 3
            if byte >= len(self.data):
                raise CodestreamError("JPEG XL codestream shorter than its size header")
            value |= ((self.data[byte] >> (self.at & 7)) & 1) << i
            self.at += 1
        return value

    def size(self) -> int:
        # U32(1 + u(9), 1 + u(13), 1 + u(18), 1 + u(30))
        return 1 + self.u((9, 13, 18, 30)[self.u(2)])


def _jxl(codestream: bytes) -> Declared:
    bits = _Bits(codestream)
    small = bits.u(1)
    rows = 8 * (1 + bits.u(5)) if small else bits.size()
    ratio = bits.u(3)
    if ratio:
        numerator, denominator = _JXL_RATIOS[ratio]
        columns = rows * numerator // denominator
    else:
        columns = 8 * (1 + bits.u(5)) if small else bits.size()
    return Declared(rows, columns, None)
