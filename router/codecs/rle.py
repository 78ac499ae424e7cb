"""RLE Lossless through pylibjpeg-rle, the backend of pydicom's "pylibjpeg" RLE plugin."""

from __future__ import annotations

import numpy as np

from router.codecs.registry import ImageInfo
from router.request import Params

DEPENDENCIES = ("rle",)


def cannot_carry(image: ImageInfo, params: Params) -> str | None:
    segments = image.samples_per_pixel * image.bits_allocated // 8
    if segments > 15:
        return f"rle cannot carry {segments} byte segments (at most 15)"
    return None


def encode_frame(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    # called directly: pydicom's front end refuses 32-bit colour that RLE can carry
    from rle.utils import encode_frame as encode

    data = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<")).tobytes()
    return bytes(encode(data, image.rows, image.columns, image.samples_per_pixel, image.bits_allocated, "<"))


def decode_frame(data: bytes, image: ImageInfo) -> np.ndarray:
    from rle.utils import decode_frame as decode

    raw = decode(data, image.rows * image.columns, image.bits_allocated, "<")
    dtype = {8: np.uint8, 16: np.dtype("<u2"), 32: np.dtype("<u4")}[image.bits_allocated]
    # RLE output is planar (one plane per sample)
    planes = np.frombuffer(bytes(raw), dtype).reshape(image.samples_per_pixel, image.rows, image.columns)
    return planes[0] if image.samples_per_pixel == 1 else np.moveaxis(planes, 0, -1)
