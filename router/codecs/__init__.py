"""The codecs: `registry` declares every outbound syntax, one module per backend encodes and
decodes its frames (`rle`, `jpeg`, `jpegls`, `j2k`, `htj2k`, `jpegxl`; numpy helpers in
`frames`). `pixeldata` checks one data set's Pixel Data against its header and decodes it,
`codestream` reads the size a frame's codestream declares. Importing this package loads neither
numpy nor pydicom."""

from router.codecs.registry import (
    DEFLATED,
    EXPLICIT_BE,
    EXPLICIT_LE,
    HTJ2K,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    IMPLICIT_LE,
    J2K,
    J2K_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR,
    JPEGXL,
    JPEGXL_JPEG,
    JPEGXL_LOSSLESS,
    LOSSY_TRANSFER_SYNTAXES,
    NATIVE_TRANSFER_SYNTAXES,
    RLE,
    VIDEO_TRANSFER_SYNTAXES,
    ImageInfo,
    Param,
    ParameterError,
    Syntax,
    all_syntaxes,
    check_params,
    get,
    is_lossy_input,
    load_plugins,
    register,
)

__all__ = [
    "DEFLATED", "EXPLICIT_BE", "EXPLICIT_LE", "HTJ2K", "HTJ2K_LOSSLESS", "HTJ2K_LOSSLESS_RPCL", "IMPLICIT_LE",
    "J2K", "J2K_LOSSLESS", "JPEG_BASELINE", "JPEG_EXTENDED", "JPEG_LOSSLESS_SV1", "JPEG_LS_LOSSLESS",
    "JPEG_LS_NEAR", "JPEGXL", "JPEGXL_JPEG", "JPEGXL_LOSSLESS", "LOSSY_TRANSFER_SYNTAXES",
    "NATIVE_TRANSFER_SYNTAXES", "RLE", "VIDEO_TRANSFER_SYNTAXES", "ImageInfo", "Param", "ParameterError", "Syntax",
    "all_syntaxes", "check_params", "get", "is_lossy_input", "load_plugins", "register",
]
