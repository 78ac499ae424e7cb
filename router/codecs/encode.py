"""Encode and verify: each frame of an image in an outbound syntax, decoded back and compared
as the request asks, or a codestream re-packed as it is. What goes wrong is a typed verdict
(`CannotCarry`, `Mismatch`), never an exception: the plan (`codecs.transcode`) falls back on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from router.codecs import pixeldata
from router.codecs.frames import to_pattern, to_signed
from router.codecs.pixeldata import Pixels, is_transient
from router.codecs.registry import ImageInfo, Syntax
from router.request import Request


@dataclass(frozen=True)
class CannotCarry:
    """Why a syntax cannot carry this object (the plan tries the fallback, else sends it as received)."""

    why: str

    def __str__(self) -> str:
        return self.why


@dataclass(frozen=True)
class Mismatch:
    """What verification found: an output that does not give back what it was made from."""

    why: str

    def __str__(self) -> str:
        return self.why


Lap = Callable[[str], None]  # counts the CPU time since the last lap under a stage name


def for_syntax(syntax: Syntax, pixels: Pixels) -> tuple[Pixels, ImageInfo]:
    """``pixels`` as ``syntax`` takes them, and what it codes: the precision it codes at; lossy
    syntaxes take YBR_FULL as RGB."""
    image = syntax.coded(pixels.image)
    if syntax.lossy and image.photometric == "YBR_FULL":
        pixels = _ybr_to_rgb(pixels)
        image = pixels.image
    return pixels, image


def _ybr_to_rgb(pixels: Pixels) -> Pixels:
    from pydicom.pixels import convert_color_space

    frames = [convert_color_space(f, "YBR_FULL", "RGB") for f in pixels.frames]
    return replace(pixels, frames=frames, image=replace(pixels.image, photometric="RGB"))


def encode_frames(syntax: Syntax, pixels: Pixels, image: ImageInfo, request: Request, lap: Lap) -> list[bytes] | Mismatch:
    """Each frame in ``syntax``, verified as the request asks, padded to even length; or what
    went wrong when a frame does not decode back as required."""
    encoded: list[bytes] = []
    for values in pixels.frames:
        pattern = np.ascontiguousarray(to_pattern(values, image.bits) if image.signed else values)
        data = syntax.encode(pattern, image, request.params)
        lap("encode")
        verify = request.verify if request.verify is not None else not syntax.lossy
        if verify or request.max_error is not None:
            mismatch = check(syntax, data, pattern, image, request)
            lap("verify")
            if mismatch is not None:
                return mismatch
        encoded.append(data if len(data) % 2 == 0 else data + b"\x00")
    return encoded


def check(syntax: Syntax, data: bytes, pattern: np.ndarray, image: ImageInfo, request: Request) -> Mismatch | None:
    """None when the frame decodes back as required: bit for bit when lossless, within the
    request's (or the syntax's promised) error when lossy."""
    try:
        decoded = np.asarray(syntax.decode(data, image))
    except Exception as exc:
        if is_transient(exc):
            raise
        return Mismatch(f"{syntax.name} output does not decode ({exc})")
    if decoded.ndim == 3 and pattern.ndim == 2 and decoded.shape[-1] == 1:
        decoded = decoded[..., 0]
    if decoded.shape != pattern.shape:
        return Mismatch(f"{syntax.name} output decodes to shape {decoded.shape}, expected {pattern.shape}")
    tolerance = request.max_error
    if tolerance is None and syntax.lossy:
        tolerance = syntax.promised_error(request.params)
    if not syntax.lossy and tolerance is None:
        if not np.array_equal(decoded, pattern):
            return Mismatch(f"{syntax.name} output decodes to different pixels")
        return None
    if tolerance is None:
        return None
    if image.signed:
        a = to_signed(decoded.astype(pattern.dtype), image.bits).astype(np.int64)
        b = to_signed(pattern, image.bits).astype(np.int64)
    else:
        a, b = decoded.astype(np.int64), pattern.astype(np.int64)
    error = int(np.abs(a - b).max()) if a.size else 0
    if error > tolerance:
        return Mismatch(f"{syntax.name} error {error} exceeds max_error {tolerance}")
    return None


def repack_frames(ds: Dataset, syntax: Syntax, request: Request) -> tuple[list[bytes], int] | CannotCarry | Mismatch:
    """Each frame of the Pixel Data of ``ds`` re-packed by ``syntax``, padded to even length,
    and the size of the codestreams it was given; or why not."""
    source, packed = 0, []
    frames = pixeldata.geometry(ds).frames
    for codestream in generate_frames(ds.PixelData, number_of_frames=frames):
        source += len(codestream)
        codestream = without_padding(codestream)
        try:
            data = syntax.repack(codestream)
        except Exception as exc:
            if is_transient(exc):
                raise
            return CannotCarry(f"{syntax.name} cannot re-pack this codestream ({exc})")
        verify = request.verify if request.verify is not None else True
        if verify and syntax.unpack(data) != codestream:
            return Mismatch(f"{syntax.name} does not give back the codestream")
        packed.append(data if len(data) % 2 == 0 else data + b"\x00")
    return packed, source


def without_padding(fragment: bytes) -> bytes:
    """The codestream in a frame's fragment, without the padding after it: JPEG, JPEG-LS and
    JPEG 2000 codestreams all end with the marker FFD9 (EOI / EOC)."""
    end = fragment.rfind(b"\xff\xd9")
    return fragment[: end + 2] if end >= 0 else fragment
