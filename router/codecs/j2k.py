"""JPEG 2000 (ISO 15444-1) through imagecodecs (OpenJPEG), and pylibjpeg-openjpeg where a
target ratio needs OpenJPEG's rate control."""

from __future__ import annotations

import numpy as np

from router.codecs.frames import as_pattern, signed_values
from router.codecs.registry import ImageInfo
from router.request import Params

DEPENDENCIES = ("imagecodecs",)


def _psnr(image: ImageInfo, quality: int) -> float:
    # quality 100 ~ 6 dB per bit plus 10 dB: visually lossless at 90
    return 6.02 * image.bits * quality / 100 + 10


def _encode(frame: np.ndarray, image: ImageInfo, params: Params, lossy: bool) -> bytes:
    values = signed_values(frame, image)
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

    assert not lossy or params.quality is not None  # declared with a default
    return bytes(
        imagecodecs.jpeg2k_encode(
            values,
            level=_psnr(image, params.quality) if lossy else None,
            codecformat="J2K",
            reversible=not lossy,
            bitspersample=image.bits,
            mct=mct,
        )
    )


def encode_lossless(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    return _encode(frame, image, params, lossy=False)


def encode_lossy(frame: np.ndarray, image: ImageInfo, params: Params) -> bytes:
    return _encode(frame, image, params, lossy=True)


def decode_frame(data: bytes, image: ImageInfo) -> np.ndarray:
    import imagecodecs

    return as_pattern(imagecodecs.jpeg2k_decode(data), image)


def photometric_reversible(image: ImageInfo) -> str:
    """RGB is coded with the reversible colour transform (also HTJ2K)."""
    return "YBR_RCT" if image.samples_per_pixel == 3 and image.photometric == "RGB" else image.photometric


def photometric_irreversible(image: ImageInfo) -> str:
    """RGB is coded with the irreversible colour transform (also HTJ2K)."""
    return "YBR_ICT" if image.samples_per_pixel == 3 and image.photometric == "RGB" else image.photometric
