"""JPEG XL (ISO 18181) through imagecodecs (libjxl): lossless, lossy, and the lossless
re-packing of a JPEG baseline codestream (JPEG XL JPEG Recompression)."""

from __future__ import annotations

import numpy as np

from router.codecs.frames import u8_or_u16
from router.codecs.registry import ImageInfo
from router.request import Params

DEPENDENCIES = ("imagecodecs",)


def _distance(quality: int) -> float:
    # libjxl's own quality scale: 90 ~ distance 1 ("visually lossless")
    if quality >= 30:
        return max(0.1 + (100 - quality) * 0.09, 0.1)
    return 6.4 + 0.3 * (30 - quality)


def encode_lossless(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    import imagecodecs

    frame = u8_or_u16(frame, image.bits)
    return bytes(imagecodecs.jpegxl_encode(frame, lossless=True, effort=1, bitspersample=image.bits))


def encode_lossy(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    import imagecodecs

    assert params.quality is not None  # declared with a default
    frame = u8_or_u16(frame, image.bits)
    return bytes(
        imagecodecs.jpegxl_encode(frame, distance=_distance(params.quality), effort=3, bitspersample=image.bits)
    )


def decode_frame(data: bytes, image: ImageInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpegxl_decode(data)


def repack_jpeg(jpeg: bytes) -> bytes:
    """A JPEG baseline codestream re-packed as JPEG XL, its DCT coefficients untouched."""
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode_jpeg(jpeg))


def unpack_jpeg(data: bytes) -> bytes:
    """The JPEG codestream `repack_jpeg` was given."""
    import imagecodecs

    return bytes(imagecodecs.jpegxl_decode_jpeg(data))
