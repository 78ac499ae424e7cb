"""The outbound transfer syntaxes the router can write, one registry entry each.

Every entry says what it can carry (precision, signedness, samples per pixel,
photometric interpretations) and how one frame is encoded and decoded again for
verification. The transcoder never branches on the codec: adding a syntax is
adding one entry to ``_REGISTRY``.

Frames handed to an encoder are C-contiguous arrays of shape (rows, columns) or
(rows, columns, samples), unsigned (uint8 / uint16 / uint32), holding the
two's-complement bit pattern of each sample masked to ``ImageInfo.precision``
bits.  Decoders return the same representation, so verification is a plain
comparison.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from pydicom import uid as _uid

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
JPEGXL_LOSSLESS = "1.2.840.10008.1.2.4.110"
JPEGXL_JPEG = "1.2.840.10008.1.2.4.111"
JPEGXL = "1.2.840.10008.1.2.4.112"

NATIVE_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {IMPLICIT_LE, EXPLICIT_LE, DEFLATED, EXPLICIT_BE}
)

LOSSY_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        JPEG_BASELINE,
        JPEG_EXTENDED,
        # retired lossy JPEG processes, still found in archives
        *(f"1.2.840.10008.1.2.4.{n}" for n in (52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64)),
        JPEG_LS_NEAR,
        J2K,
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component (lossy allowed)
        HTJ2K,
        JPEGXL,
        # a JPEG XL recompressed JPEG still holds the lossy JPEG's pixels
        JPEGXL_JPEG,
        # MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265 video
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
        # SMPTE ST 2110 video
        "1.2.840.10008.1.2.7.1",
    }
)

VIDEO_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
        "1.2.840.10008.1.2.7.1",
        "1.2.840.10008.1.2.7.2",
        "1.2.840.10008.1.2.7.3",
    }
)


def is_lossy_input(transfer_syntax_uid: str, lossy_image_compression: str | None) -> bool:
    """True when the pixels have already been through lossy compression.

    Either (0028,2110) Lossy Image Compression says "01", or the object arrived
    in a syntax that is lossy (JPEG baseline/extended, JPEG-LS near-lossless,
    JPEG 2000 / HTJ2K irreversible, JPEG XL, video).
    """
    if lossy_image_compression is not None and str(lossy_image_compression).strip() == "01":
        return True
    return str(transfer_syntax_uid).strip() in LOSSY_TRANSFER_SYNTAXES


@dataclass(frozen=True)
class ImageInfo:
    """What a codec needs to know about the decoded pixels of one object."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    frames: int = 1
    # bits the encoder must keep: Bits Stored, or Bits Allocated when some
    # pixels have bits set above Bits Stored (old overlays)
    precision: int = 0
    # signed range of the pixels, for codecs whose errors may cross the sign
    minimum: int = 0
    maximum: int = 0

    @property
    def bits(self) -> int:
        return self.precision or self.bits_stored


@dataclass(frozen=True)
class Params:
    """Encoder parameters taken from a rule or a CLI call."""

    quality: int | None = None
    near: int | None = None
    ratio: float | None = None


Encoder = Callable[[np.ndarray, ImageInfo, Params], bytes]
Decoder = Callable[[bytes, ImageInfo], np.ndarray]

_MONO = frozenset({"MONOCHROME1", "MONOCHROME2"})
_LOSSLESS_PI = _MONO | {"PALETTE COLOR", "RGB", "YBR_FULL"}
_LOSSY_PI = _MONO | {"RGB"}


@dataclass(frozen=True)
class Syntax:
    """One outbound syntax: what it is, what it can carry, how to encode a frame."""

    name: str
    uid: str
    lossy: bool
    method: str | None = None  # (0028,2114) Lossy Image Compression Method
    title: str = ""
    encapsulated: bool = True
    min_bits: int = 1
    max_bits: int = 16
    signed: bool = True
    samples: frozenset[int] = frozenset({1, 3})
    photometrics: frozenset[str] | None = _LOSSLESS_PI  # None: any
    bits_allocated: frozenset[int] = frozenset({8, 16})
    # RLE keeps every byte of each sample; the others code ``precision`` bits
    codes_allocated_bits: bool = False
    # signed pixels are coded as whole Bits Allocated words, sign-extended (as dcm4chee does):
    # every decoder then returns the stored values whatever it makes of Bits Stored, and for
    # JPEG-LS lossless the 16-bit words go through imagecodecs, 2.3x faster than pyjpegls at 14
    # bits, for about 2% more bytes (CT)
    signed_at_allocated_bits: bool = False
    other_uids: tuple[str, ...] = ()
    encode: Encoder | None = field(default=None, repr=False, compare=False)
    decode: Decoder | None = field(default=None, repr=False, compare=False)
    check: Callable[[ImageInfo, Params], str | None] | None = field(
        default=None, repr=False, compare=False
    )
    pick_uid: Callable[[ImageInfo], str] | None = field(default=None, repr=False, compare=False)
    photometric_out: Callable[[ImageInfo], str] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def uids(self) -> tuple[str, ...]:
        return (self.uid, *self.other_uids) if self.uid else ()

    def uid_for(self, image: ImageInfo) -> str:
        """The transfer syntax UID this syntax writes for ``image``."""
        return self.pick_uid(image) if self.pick_uid else self.uid

    def photometric_for(self, image: ImageInfo) -> str:
        """Photometric Interpretation of the output for ``image``."""
        return self.photometric_out(image) if self.photometric_out else image.photometric

    def coded(self, image: ImageInfo) -> ImageInfo:
        """``image`` with the precision this syntax codes it at."""
        if self.codes_allocated_bits or (self.signed_at_allocated_bits and image.signed):
            return replace(image, precision=image.bits_allocated)
        return image

    def cannot_carry(self, image: ImageInfo, params: Params = Params()) -> str | None:
        """None when this syntax can carry ``image``, else the reason in words."""
        if not self.encapsulated:
            return None
        if self.encode is None:
            return f"{self.name} has no encoder on this system"
        if image.bits_allocated not in self.bits_allocated:
            return f"{self.name} cannot carry {image.bits_allocated}-bit allocated pixels"
        bits = image.bits_allocated if self.codes_allocated_bits else image.bits
        if not self.min_bits <= bits <= self.max_bits:
            what = (
                f"{bits}-bit pixels (values above Bits Stored {image.bits_stored})"
                if image.bits > image.bits_stored
                else f"{bits}-bit pixels"
            )
            return f"{self.name} cannot carry {what}"
        if image.signed and not self.signed:
            return f"{self.name} cannot carry signed pixels"
        if image.samples_per_pixel not in self.samples:
            return f"{self.name} cannot carry {image.samples_per_pixel} samples per pixel"
        if self.photometrics is not None and image.photometric not in self.photometrics:
            return f"{self.name} cannot carry {image.photometric} pixels"
        if self.check is not None:
            return self.check(image, params)
        return None


# ---------------------------------------------------------------- helpers


def _mask(bits: int) -> int:
    return (1 << bits) - 1


def to_signed(pattern: np.ndarray, bits: int) -> np.ndarray:
    """Sign-extend a ``bits``-bit two's-complement pattern into a signed array."""
    dtype = np.int8 if pattern.dtype.itemsize == 1 else np.int16 if pattern.dtype.itemsize == 2 else np.int32
    a = (pattern & _mask(bits)).astype(dtype)
    shift = 8 * pattern.dtype.itemsize - bits
    if shift:
        a = (a << shift) >> shift
    return a


def to_pattern(values: np.ndarray, bits: int) -> np.ndarray:
    """The unsigned ``bits``-bit pattern of (possibly signed) ``values``."""
    unsigned = values.dtype.str.replace("i", "u")
    return (values.view(unsigned) & _mask(bits)).astype(unsigned, copy=False)


def _u8_or_u16(frame: np.ndarray, bits: int) -> np.ndarray:
    if bits <= 8 and frame.dtype.itemsize != 1:
        return frame.astype(np.uint8)
    return np.ascontiguousarray(frame)


# ---------------------------------------------------------------- JPEG-LS


def _jls_near_range(image: ImageInfo, params: Params) -> str | None:
    near = 2 if params.near is None else params.near
    if near < 1 or near > 255:
        return f"jpeg-ls-near-lossless needs 1 <= near <= 255, got {near}"
    if image.signed:
        # The codec sees unsigned patterns: an error that crosses the middle of
        # the range flips the sign, so keep the values `near` away from it.
        lo, hi = -(1 << (image.bits - 1)) + near, (1 << (image.bits - 1)) - 1 - near
        if image.minimum < lo or image.maximum > hi:
            return (
                f"jpeg-ls-near-lossless with near={near} cannot carry signed "
                f"{image.bits}-bit values outside {lo}..{hi}"
            )
    return None


def _jls_encode(frame: np.ndarray, image: ImageInfo, near: int) -> bytes:
    bits = max(image.bits, 2)
    frame = _u8_or_u16(frame, bits)
    if bits == 8 * frame.dtype.itemsize:
        import imagecodecs

        return bytes(imagecodecs.jpegls_encode(frame, level=near or None))
    # imagecodecs writes the precision of the dtype; fewer bits need pyjpegls, so that the
    # codestream's precision is Bits Stored (signed lossless comes here only as whole words, see
    # Syntax.signed_at_allocated_bits; a masked signed pattern coded at 16 bits would read wrong
    # in pydicom's decoders)
    import jpeg_ls

    return bytes(
        jpeg_ls.encode_buffer(
            frame.tobytes(),
            image.rows,
            image.columns,
            image.samples_per_pixel,
            bits,
            lossy_error=near,
            interleave_mode=2 if image.samples_per_pixel > 1 else None,
        )
    )


def _jls_lossless(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    return _jls_encode(frame, image, 0)


def _jls_near(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    return _jls_encode(frame, image, 2 if params.near is None else params.near)


def _jls_decode(data: bytes, image: ImageInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpegls_decode(data)


# ---------------------------------------------------------------- JPEG (ISO 10918)


def _jpeg_quality(params: Params) -> str | None:
    q = 90 if params.quality is None else params.quality
    if not 1 <= q <= 100:
        return f"quality must be 1..100, got {q}"
    return None


def _jpeg_lossy_encode(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    import imagecodecs

    quality = 90 if params.quality is None else params.quality
    bits = 12 if image.bits > 8 else 8
    frame = _u8_or_u16(frame, bits)
    if frame.ndim == 3:
        return bytes(imagecodecs.jpeg8_encode(frame, level=quality, subsampling="422", bitspersample=bits))
    return bytes(imagecodecs.jpeg8_encode(frame, level=quality, bitspersample=bits))


def _jpeg_lossless_encode(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    import imagecodecs

    bits = max(image.bits, 2)
    frame = _u8_or_u16(frame, bits)
    return bytes(imagecodecs.jpeg8_encode(frame, lossless=True, predictor=1, bitspersample=bits))


def _jpeg_decode(data: bytes, image: ImageInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(data)


def _jpeg_uid(image: ImageInfo) -> str:
    return JPEG_EXTENDED if image.bits > 8 else JPEG_BASELINE


def _ybr_422(image: ImageInfo) -> str:
    return "YBR_FULL_422" if image.samples_per_pixel == 3 else image.photometric


# ---------------------------------------------------------------- JPEG 2000 / HTJ2K


def _signed_values(frame: np.ndarray, image: ImageInfo) -> np.ndarray:
    return to_signed(frame, image.bits) if image.signed else frame


def _j2k_psnr(image: ImageInfo, params: Params) -> float:
    # quality 100 ~ 6 dB per bit plus 10 dB: visually lossless at 90
    q = 90 if params.quality is None else params.quality
    return 6.02 * image.bits * q / 100 + 10


def _j2k_encode(frame: np.ndarray, image: ImageInfo, params: Params, lossy: bool) -> bytes:
    values = np.ascontiguousarray(_signed_values(_u8_or_u16(frame, image.bits), image))
    mct = image.samples_per_pixel == 3
    if lossy and params.ratio:
        # OpenJPEG's rate control is only reachable through pylibjpeg-openjpeg
        from openjpeg.utils import encode_array

        return bytes(
            encode_array(
                values,
                bits_stored=image.bits,
                photometric_interpretation=1 if mct else 0,  # 1: RGB, apply MCT
                use_mct=mct,
                # OpenJPEG counts the raw size at the coded precision, we at Bits Allocated
                compression_ratios=[float(params.ratio) * image.bits / (8 * values.dtype.itemsize)],
            )
        )
    import imagecodecs

    return bytes(
        imagecodecs.jpeg2k_encode(
            values,
            level=_j2k_psnr(image, params) if lossy else None,
            codecformat="J2K",
            reversible=not lossy,
            bitspersample=image.bits,
            mct=mct,
        )
    )


def _j2k_lossless(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    return _j2k_encode(frame, image, params, lossy=False)


def _j2k_lossy(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    return _j2k_encode(frame, image, params, lossy=True)


def _as_pattern(decoded: np.ndarray, image: ImageInfo) -> np.ndarray:
    if image.signed or decoded.dtype.kind == "i":
        return to_pattern(decoded, image.bits)
    return decoded


def _j2k_decode(data: bytes, image: ImageInfo) -> np.ndarray:
    import imagecodecs

    return _as_pattern(imagecodecs.jpeg2k_decode(data), image)


def _htj2k_qstep(quality: int, itemsize: int) -> float:
    # OpenJPH scales the step by the sample type, not the precision. Measured at
    # quality 90: 16-bit MR/CT max error 2-3 (~4-5:1), 8-bit RGB max error 3
    return 10 ** (-1 - 4 * quality / 100 + (2 if itemsize == 1 else 0))


def _htj2k_encode_at(values: np.ndarray, image: ImageInfo, qstep: float | None) -> bytes:
    import imagecodecs

    rgb = image.samples_per_pixel == 3
    if qstep is None:
        return bytes(imagecodecs.htj2k_encode(values, reversible=True, rgb=rgb))
    return bytes(imagecodecs.htj2k_encode(values, level=qstep, reversible=False, rgb=rgb))


def _htj2k_lossless(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    values = np.ascontiguousarray(_signed_values(_u8_or_u16(frame, image.bits), image))
    return _htj2k_encode_at(values, image, None)


def _htj2k_lossy(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    values = np.ascontiguousarray(_signed_values(_u8_or_u16(frame, image.bits), image))
    if not params.ratio:
        return _htj2k_encode_at(values, image, _htj2k_qstep(90 if params.quality is None else params.quality, values.dtype.itemsize))
    # OpenJPH has no rate control: bisect the quantisation step (HTJ2K is fast)
    target = values.nbytes / float(params.ratio)
    lo, hi = -6.0, -0.5
    best = _htj2k_encode_at(values, image, 10**lo)
    for _ in range(8):
        mid = (lo + hi) / 2
        data = _htj2k_encode_at(values, image, 10**mid)
        if len(data) > target:
            lo = mid
        else:
            hi, best = mid, data
    return best if len(best) <= target else _htj2k_encode_at(values, image, 10**hi)


def _htj2k_decode(data: bytes, image: ImageInfo) -> np.ndarray:
    # imagecodecs' htj2k_decode wraps lossy 8-bit RGB; OpenJPEG decodes it right
    import openjpeg

    return _as_pattern(openjpeg.decode(data), image)


def _rct_or_ict(lossy: bool) -> Callable[[ImageInfo], str]:
    def photometric(image: ImageInfo) -> str:
        if image.samples_per_pixel == 3 and image.photometric == "RGB":
            return "YBR_ICT" if lossy else "YBR_RCT"
        return image.photometric

    return photometric


# ---------------------------------------------------------------- JPEG XL


def _jxl_distance(params: Params) -> float:
    # libjxl's own quality scale: 90 ~ distance 1 ("visually lossless")
    q = 90 if params.quality is None else params.quality
    if q >= 30:
        return max(0.1 + (100 - q) * 0.09, 0.1)
    return 6.4 + 0.3 * (30 - q)


def _jxl_lossless(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    import imagecodecs

    frame = _u8_or_u16(frame, image.bits)
    return bytes(imagecodecs.jpegxl_encode(frame, lossless=True, effort=1, bitspersample=image.bits))


def _jxl_lossy(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    import imagecodecs

    frame = _u8_or_u16(frame, image.bits)
    return bytes(
        imagecodecs.jpegxl_encode(frame, distance=_jxl_distance(params), effort=3, bitspersample=image.bits)
    )


def _jxl_decode(data: bytes, image: ImageInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpegxl_decode(data)


# ---------------------------------------------------------------- RLE


def _rle_segments(image: ImageInfo, params: Params) -> str | None:
    segments = image.samples_per_pixel * image.bits_allocated // 8
    if segments > 15:
        return f"rle cannot carry {segments} byte segments (at most 15)"
    return None


def _rle_encode(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    # pylibjpeg-rle, the backend of pydicom's "pylibjpeg" RLE plugin, called
    # directly: pydicom's front end refuses 32-bit colour that RLE can carry
    from rle.utils import encode_frame

    data = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<")).tobytes()
    return bytes(
        encode_frame(data, image.rows, image.columns, image.samples_per_pixel, image.bits_allocated, "<")
    )


def _rle_decode(data: bytes, image: ImageInfo) -> np.ndarray:
    from rle.utils import decode_frame

    raw = decode_frame(data, image.rows * image.columns, image.bits_allocated, "<")
    dtype = {8: np.uint8, 16: np.dtype("<u2"), 32: np.dtype("<u4")}[image.bits_allocated]
    # RLE output is planar (one plane per sample)
    planes = np.frombuffer(bytes(raw), dtype).reshape(image.samples_per_pixel, image.rows, image.columns)
    return planes[0] if image.samples_per_pixel == 1 else np.moveaxis(planes, 0, -1)


# ---------------------------------------------------------------- registry


def _entries() -> list[Syntax]:
    native = dict(encapsulated=False, photometrics=None, bits_allocated=frozenset({1, 8, 16, 32, 64}))
    return [
        Syntax("original", "", lossy=False, title="as received", encapsulated=False, photometrics=None),
        Syntax("explicit-le", EXPLICIT_LE, lossy=False, title="Explicit VR Little Endian", **native),
        Syntax("implicit-le", IMPLICIT_LE, lossy=False, title="Implicit VR Little Endian", **native),
        Syntax("deflated", DEFLATED, lossy=False, title="Deflated Explicit VR Little Endian", **native),
        Syntax(
            "rle",
            RLE,
            lossy=False,
            title="RLE Lossless",
            photometrics=None,
            bits_allocated=frozenset({8, 16, 32}),
            max_bits=32,
            codes_allocated_bits=True,
            encode=_rle_encode,
            decode=_rle_decode,
            check=_rle_segments,
        ),
        Syntax(
            "jpeg-lossless",
            JPEG_LOSSLESS_SV1,
            lossy=False,
            title="JPEG Lossless, First-Order Prediction (Process 14 SV1)",
            min_bits=2,
            encode=_jpeg_lossless_encode,
            decode=_jpeg_decode,
        ),
        Syntax(
            "jpeg-lossy",
            JPEG_BASELINE,
            lossy=True,
            method="ISO_10918_1",
            title="JPEG Baseline (8-bit) / Extended (12-bit)",
            max_bits=12,
            signed=False,
            photometrics=_LOSSY_PI,
            other_uids=(JPEG_EXTENDED,),
            encode=_jpeg_lossy_encode,
            decode=_jpeg_decode,
            check=lambda image, params: _jpeg_quality(params),
            pick_uid=_jpeg_uid,
            photometric_out=_ybr_422,
        ),
        Syntax(
            "jpeg-ls-lossless",
            JPEG_LS_LOSSLESS,
            lossy=False,
            title="JPEG-LS Lossless",
            min_bits=2,
            signed_at_allocated_bits=True,
            encode=_jls_lossless,
            decode=_jls_decode,
        ),
        Syntax(
            "jpeg-ls-near-lossless",
            JPEG_LS_NEAR,
            lossy=True,
            method="ISO_14495_1",
            title="JPEG-LS Near-Lossless",
            min_bits=2,
            photometrics=_LOSSY_PI,
            encode=_jls_near,
            decode=_jls_decode,
            check=_jls_near_range,
        ),
        Syntax(
            "j2k-lossless",
            J2K_LOSSLESS,
            lossy=False,
            title="JPEG 2000 Lossless",
            photometrics=_MONO | {"PALETTE COLOR", "RGB"},
            encode=_j2k_lossless,
            decode=_j2k_decode,
            photometric_out=_rct_or_ict(lossy=False),
        ),
        Syntax(
            "j2k",
            J2K,
            lossy=True,
            method="ISO_15444_1",
            title="JPEG 2000 (irreversible)",
            photometrics=_LOSSY_PI,
            encode=_j2k_lossy,
            decode=_j2k_decode,
            check=lambda image, params: _jpeg_quality(params),
            photometric_out=_rct_or_ict(lossy=True),
        ),
        Syntax(
            "htj2k-lossless",
            HTJ2K_LOSSLESS,
            lossy=False,
            title="High-Throughput JPEG 2000 Lossless",
            photometrics=_MONO | {"PALETTE COLOR", "RGB"},
            other_uids=(HTJ2K_LOSSLESS_RPCL,),
            encode=_htj2k_lossless,
            decode=_htj2k_decode,
            photometric_out=_rct_or_ict(lossy=False),
        ),
        Syntax(
            "htj2k",
            HTJ2K,
            lossy=True,
            method="ISO_15444_15",
            title="High-Throughput JPEG 2000 (irreversible)",
            photometrics=_LOSSY_PI,
            encode=_htj2k_lossy,
            decode=_htj2k_decode,
            check=lambda image, params: _jpeg_quality(params),
            photometric_out=_rct_or_ict(lossy=True),
        ),
        Syntax(
            "jpegxl-lossless",
            JPEGXL_LOSSLESS,
            lossy=False,
            title="JPEG XL Lossless",
            signed=False,
            photometrics=_MONO | {"PALETTE COLOR", "RGB"},
            encode=_jxl_lossless,
            decode=_jxl_decode,
        ),
        Syntax(
            "jpegxl",
            JPEGXL,
            lossy=True,
            method="ISO_18181_1",
            title="JPEG XL",
            signed=False,
            photometrics=_LOSSY_PI,
            encode=_jxl_lossy,
            decode=_jxl_decode,
            check=lambda image, params: _jpeg_quality(params),
        ),
        # Re-packs a JPEG baseline codestream without decoding it; the
        # transcoder handles it apart, since no pixels are encoded.
        Syntax(
            "jpegxl-jpeg",
            JPEGXL_JPEG,
            lossy=False,
            title="JPEG XL JPEG Recompression (from JPEG Baseline input only)",
            signed=False,
            max_bits=8,
            bits_allocated=frozenset({8}),
            photometrics=None,
            decode=_jxl_decode,
            check=lambda image, params: "jpegxl-jpeg only re-packs JPEG Baseline input",
        ),
    ]


_REGISTRY: dict[str, Syntax] = {s.name: s for s in _entries()}


def _teach_pydicom() -> None:
    """pydicom 3.0 does not know the JPEG XL syntaxes; it refuses to write them."""
    from pydicom._uid_dict import UID_dictionary

    known = {
        JPEGXL_LOSSLESS: ("JPEG XL Lossless", "JPEGXLLossless"),
        JPEGXL_JPEG: ("JPEG XL JPEG Recompression", "JPEGXLJPEGRecompression"),
        JPEGXL: ("JPEG XL", "JPEGXL"),
    }
    for uid, (title, keyword) in known.items():
        UID_dictionary.setdefault(uid, (title, "Transfer Syntax", "", "", keyword))


_teach_pydicom()
_BY_UID: dict[str, Syntax] = {u: s for s in _REGISTRY.values() for u in s.uids}


def names() -> list[str]:
    """All registry names, "original" included, in registry order."""
    return list(_REGISTRY)


def all_syntaxes() -> list[Syntax]:
    return list(_REGISTRY.values())


def get(name_or_uid: str) -> Syntax:
    """The registry entry for a name ("jpeg-ls-lossless") or a transfer syntax UID.

    Raises KeyError naming the closest registry names when nothing matches.
    """
    key = str(name_or_uid).strip()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.lower() in _REGISTRY:
        return _REGISTRY[key.lower()]
    if key in _BY_UID:
        return _BY_UID[key]
    # a name the user started typing beats one that merely looks alike
    bare = key.lower().replace("-", "").replace("_", "")
    close = [n for n in _REGISTRY if bare and n.replace("-", "").startswith(bare) and n != bare]
    close += [n for n in difflib.get_close_matches(key.lower(), list(_REGISTRY), n=3, cutoff=0.5) if n not in close]
    hint = f"; did you mean {' or '.join(repr(n) for n in close[:3])}?" if close else ""
    if key.startswith("1.2.840.10008.1.2"):
        try:
            ts = _uid.UID(key).name
        except Exception:  # pragma: no cover - pydicom's dictionary lookup
            ts = key
        hint = f" ({ts}) is not an outbound syntax of this router" + hint
    raise KeyError(f"unknown syntax {key!r}{hint} (known: {', '.join(_REGISTRY)})")


def register(syntax: Syntax) -> None:
    """Add an outbound syntax to the registry (codec plugins call this when imported).

    A name already in the registry is replaced; a UID keeps resolving to its first entry.
    """
    _REGISTRY[syntax.name] = syntax
    for uid in syntax.uids:
        _BY_UID.setdefault(uid, syntax)


def load_plugins(specs: list[str] | tuple[str, ...]) -> None:
    """Import codec plugin modules, by module name or by path to a .py file.

    Each plugin registers its syntaxes with `register` when imported. The same list is
    loaded in the router and in every codec worker process.
    """
    import importlib
    import importlib.util
    import sys

    for spec in specs:
        if spec.endswith(".py"):
            name = "dicom_router_plugin_" + spec.rsplit("/", 1)[-1][:-3]
            if name in sys.modules:
                continue
            loader = importlib.util.spec_from_file_location(name, spec)
            if loader is None or loader.loader is None:
                raise ImportError(f"cannot load codec plugin {spec}")
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            loader.loader.exec_module(module)
        else:
            importlib.import_module(spec)
