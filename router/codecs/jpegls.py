"""JPEG-LS (ISO 14495-1) through imagecodecs (CharLS), and pyjpegls for precisions that are not
a whole byte or word."""

from __future__ import annotations

import numpy as np

from router.codecs.frames import u8_or_u16
from router.codecs.registry import ImageInfo
from router.request import Params

DEPENDENCIES = ("imagecodecs",)


def cannot_carry_near(image: ImageInfo, params: Params) -> str | None:
    """What near-lossless cannot carry with ``params.near``: an image, never the parameter
    itself (its bounds are declared in the registry)."""
    near = params.near or 0
    # ISO 14495-1 C.2.4.1.1: NEAR <= min(255, MAXVAL / 2); CharLS writes a larger one that no
    # decoder reads
    most = min(255, ((1 << image.bits) - 1) // 2)
    if near > most:
        return f"jpeg-ls-near-lossless with near={near} cannot carry {image.bits}-bit pixels (near at most {most})"
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


def _encode(frame: np.ndarray, image: ImageInfo, near: int) -> bytes:
    bits = max(image.bits, 2)
    frame = u8_or_u16(frame, bits)
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


def encode_lossless(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    return _encode(frame, image, 0)


def encode_near(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    assert params.near is not None  # declared with a default
    return _encode(frame, image, params.near)


def decode_frame(data: bytes, image: ImageInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpegls_decode(data)
