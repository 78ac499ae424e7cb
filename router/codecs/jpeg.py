"""JPEG (ISO 10918) through imagecodecs (libjpeg-turbo): baseline 8-bit and extended 12-bit
lossy, and lossless process 14 with first-order prediction (SV1)."""

from __future__ import annotations

import numpy as np

from router.codecs.frames import u8_or_u16
from router.codecs.registry import JPEG_BASELINE, JPEG_EXTENDED, ImageInfo
from router.request import Params

DEPENDENCIES = ("imagecodecs",)


def encode_lossy(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    import imagecodecs

    bits = 12 if image.bits > 8 else 8
    frame = u8_or_u16(frame, bits)
    if frame.ndim == 3:
        return bytes(imagecodecs.jpeg8_encode(frame, level=params.quality, subsampling="422", bitspersample=bits))
    return bytes(imagecodecs.jpeg8_encode(frame, level=params.quality, bitspersample=bits))


def encode_lossless(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    import imagecodecs

    bits = max(image.bits, 2)
    frame = u8_or_u16(frame, bits)
    return bytes(imagecodecs.jpeg8_encode(frame, lossless=True, predictor=1, bitspersample=bits))


def decode_frame(data: bytes, image: ImageInfo) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(data)


def uid_for(image: ImageInfo) -> str:
    """Baseline for 8-bit pixels, extended for 12."""
    return JPEG_EXTENDED if image.bits > 8 else JPEG_BASELINE


def valid_uids(image: ImageInfo) -> tuple[str, ...]:
    """An 8-bit (baseline) codestream is also one of JPEG Extended (processes 2 and 4)."""
    return (JPEG_BASELINE, JPEG_EXTENDED) if image.bits <= 8 else (JPEG_EXTENDED,)


def bits_allocated_for(image: ImageInfo) -> int:
    """Baseline JPEG is 8-bit: its pixels are allocated 8 bits whatever the input's words."""
    return 8 if image.bits <= 8 else image.bits_allocated


def photometric_for(image: ImageInfo) -> str:
    """Colour is coded as YCbCr 4:2:2."""
    return "YBR_FULL_422" if image.samples_per_pixel == 3 else image.photometric
