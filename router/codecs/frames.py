"""Frame representations shared by the backends (numpy).

An encoder is given, and a decoder returns, the unsigned two's-complement bit pattern of each
sample masked to the coded precision (see `router.codecs.registry`); some libraries want the
signed values instead, or the narrowest unsigned type.
"""

from __future__ import annotations

import numpy as np

from router.codecs.registry import ImageInfo


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


def u8_or_u16(frame: np.ndarray, bits: int) -> np.ndarray:
    """``frame`` as uint8 when ``bits`` fit in a byte, else as it is; C-contiguous."""
    if bits <= 8 and frame.dtype.itemsize != 1:
        return frame.astype(np.uint8)
    return np.ascontiguousarray(frame)


def signed_values(frame: np.ndarray, image: ImageInfo) -> np.ndarray:
    """The sample values of a pattern frame, for libraries that code signed data themselves."""
    values = u8_or_u16(frame, image.bits)
    return np.ascontiguousarray(to_signed(values, image.bits) if image.signed else values)


def as_pattern(decoded: np.ndarray, image: ImageInfo) -> np.ndarray:
    """A decoder's output (signed values, or unsigned) as the pattern the encoder was given."""
    if image.signed or decoded.dtype.kind == "i":
        return to_pattern(decoded, image.bits)
    return decoded
