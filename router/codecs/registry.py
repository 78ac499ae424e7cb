"""The outbound transfer syntaxes the router can write, one declaration each.

Every `Syntax` says what it can carry (precision, signedness, samples per pixel, photometric
interpretations), which parameters it takes (`Param`, checked once by `check_params` where a
rule or a command line is read), and which backend functions encode and decode one frame. The
transcoder never branches on the codec: adding a syntax is adding one declaration here (or a
plugin calling `register`), and a backend module under `router/codecs/`.

Backends are named as ``"module:function"`` strings, imported on first use, so that this module
imports neither numpy nor pydicom: the rules and the configuration read it in processes that
never decode a pixel. Plugins may pass callables instead.

Frames handed to an encoder are C-contiguous arrays of shape (rows, columns) or
(rows, columns, samples), unsigned (uint8 / uint16 / uint32), holding the two's-complement bit
pattern of each sample masked to ``ImageInfo.precision`` bits. Decoders return the same
representation, so verification is a plain comparison.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from router.request import ORIGINAL, PARAMETER_NAMES, Params
from router.uids import (  # noqa: F401 - the registry names them for the codec modules
    DEFLATED, EXPLICIT_BE, EXPLICIT_LE, HTJ2K, HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, IMPLICIT_LE, J2K, J2K_LOSSLESS,
    JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, JPEG_LS_NEAR, JPEGXL, JPEGXL_JPEG,
    JPEGXL_LOSSLESS, RLE,
)

NATIVE_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {IMPLICIT_LE, EXPLICIT_LE, DEFLATED, EXPLICIT_BE}
)

VIDEO_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        # MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
        # SMPTE ST 2110
        "1.2.840.10008.1.2.7.1",
        "1.2.840.10008.1.2.7.2",
        "1.2.840.10008.1.2.7.3",
    }
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
        # video, except the SMPTE ST 2110 uncompressed ones
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
        "1.2.840.10008.1.2.7.1",
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


class ParameterError(ValueError):
    """A parameter a syntax does not take, or a value outside its declared range.

    ``field`` is the parameter's name (a field of `router.request.Params`, of a rule and of the
    ``transcode`` command); the message names it and says what was probably meant.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Param:
    """One parameter a syntax takes: its bounds (inclusive), its default and how it reads."""

    name: str  # one of router.request.PARAMETER_NAMES
    type: type
    minimum: int | float
    maximum: int | float
    default: int | float | None = None  # None: the encoder does without it unless given
    hint: str = ""  # said when a value is below the minimum: what was probably meant
    describe: str = "{name} {value}"  # the setting in Derivation Description

    def __post_init__(self) -> None:
        if self.name not in PARAMETER_NAMES:
            raise ValueError(f"parameter {self.name!r} is not one of {', '.join(PARAMETER_NAMES)}")

    def check(self, value: object, syntax: str) -> None:
        """Raise ParameterError unless ``value`` is of this parameter's type and within bounds."""
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not (whole or (self.type is float and isinstance(value, float))):
            kind = "a whole number" if self.type is int else "a number"
            raise ParameterError(self.name, f"{self.name} must be {kind} for {syntax}, got {value!r}")
        assert isinstance(value, (int, float))
        if value < self.minimum:
            hint = f"; {self.hint}" if self.hint else ""
            raise ParameterError(
                self.name,
                f"{self.name} must be greater than or equal to {self.minimum} for {syntax}, got {value}{hint}",
            )
        if value > self.maximum:
            raise ParameterError(
                self.name, f"{self.name} must be less than or equal to {self.maximum} for {syntax}, got {value}"
            )

    def text(self, value: int | float) -> str:
        return self.describe.format(name=self.name, value=value)


# A backend function: "package.module:function", imported on first use, or the callable itself.
Backend = str | Callable[..., Any]


@functools.cache
def _imported(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _resolve(ref: Backend) -> Callable[..., Any]:
    return _imported(ref) if isinstance(ref, str) else ref


@functools.cache
def _installed(ref: str) -> tuple[str, ...]:
    """The DEPENDENCIES of the backend module ``ref`` lives in that are not installed."""
    module = importlib.import_module(ref.partition(":")[0])
    return tuple(d for d in getattr(module, "DEPENDENCIES", ()) if importlib.util.find_spec(d) is None)


_MONO = frozenset({"MONOCHROME1", "MONOCHROME2"})
_LOSSLESS_PI = _MONO | {"PALETTE COLOR", "RGB", "YBR_FULL"}
_LOSSY_PI = _MONO | {"RGB"}


@dataclass(frozen=True)
class Syntax:
    """One outbound syntax: what it is, what it can carry, which parameters it takes, and the
    backend functions that encode, decode and describe its output."""

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
    # the parameters it takes, in the order the first one set describes the output
    params: tuple[Param, ...] = ()
    # the parameter that bounds every pixel's error (JPEG-LS NEAR): verification checks it
    error_bound: str | None = None
    # the transfer syntax whose codestreams it re-packs as they are, instead of encoding pixels
    repacks: str | None = None
    # its decoder returns colour as RGB whatever the stored Photometric Interpretation says
    decodes_to_rgb: bool = False
    # backends: encoder(frame, image, params) -> bytes; decoder(data, image) -> frame
    encoder: Backend | None = field(default=None, repr=False, compare=False)
    decoder: Backend | None = field(default=None, repr=False, compare=False)
    # for a syntax that re-packs: repacker(codestream) -> bytes; unpacker(bytes) -> codestream
    repacker: Backend | None = field(default=None, repr=False, compare=False)
    unpacker: Backend | None = field(default=None, repr=False, compare=False)
    # what it cannot carry beyond the declared limits: check(image, params) -> reason | None
    check: Backend | None = field(default=None, repr=False, compare=False)
    # what it writes for an image, when that depends on the image
    pick_uid: Backend | None = field(default=None, repr=False, compare=False)
    # the transfer syntaxes a codestream of an image may stand in, when more than its own
    # (an image nested in a file written for another, such as an icon): valid_uids(image)
    valid_uids: Backend | None = field(default=None, repr=False, compare=False)
    photometric_out: Backend | None = field(default=None, repr=False, compare=False)
    bits_allocated_out: Backend | None = field(default=None, repr=False, compare=False)

    @property
    def uids(self) -> tuple[str, ...]:
        return (self.uid, *self.other_uids) if self.uid else ()

    def uid_for(self, image: ImageInfo) -> str:
        """The transfer syntax UID this syntax writes for ``image``."""
        return _resolve(self.pick_uid)(image) if self.pick_uid else self.uid

    def valid_in(self, image: ImageInfo, uid: str) -> bool:
        """True when this syntax's codestream of ``image`` may stand in a file of transfer syntax
        ``uid``: one it writes for ``image``, or one that also takes that codestream."""
        if self.uid_for(image) == uid:
            return True
        return self.valid_uids is not None and uid in _resolve(self.valid_uids)(image)

    def photometric_for(self, image: ImageInfo) -> str:
        """Photometric Interpretation of the output for ``image``."""
        return _resolve(self.photometric_out)(image) if self.photometric_out else image.photometric

    def bits_allocated_for(self, image: ImageInfo) -> int:
        """Bits Allocated of the output for ``image``."""
        return _resolve(self.bits_allocated_out)(image) if self.bits_allocated_out else image.bits_allocated

    def coded(self, image: ImageInfo) -> ImageInfo:
        """``image`` with the precision this syntax codes it at."""
        if self.codes_allocated_bits or (self.signed_at_allocated_bits and image.signed):
            return replace(image, precision=image.bits_allocated)
        return image

    def settings(self, params: Params) -> Params:
        """``params`` with this syntax's declared defaults for those not given."""
        return replace(params, **{
            p.name: p.default for p in self.params if getattr(params, p.name) is None and p.default is not None
        })

    def describe(self, params: Params) -> str:
        """The setting the output was made with, for Derivation Description ("quality 90")."""
        settings = self.settings(params)
        for p in self.params:
            value = getattr(settings, p.name)
            if value is not None:
                return p.text(value)
        return ""

    def promised_error(self, params: Params) -> int | None:
        """The largest pixel error this syntax guarantees with ``params``; None: no guarantee."""
        return getattr(self.settings(params), self.error_bound) if self.error_bound else None

    def cannot_carry(self, image: ImageInfo, params: Params = Params()) -> str | None:
        """None when this syntax can carry ``image``, else the reason in words."""
        if not self.encapsulated:
            return None
        if self.repacks:
            return f"{self.name} only re-packs {uid_name(self.repacks)} input, it does not encode pixels"
        if self.encoder is None:
            return f"{self.name} has no encoder on this system"
        missing = _installed(self.encoder) if isinstance(self.encoder, str) else ()
        if missing:
            return f"{self.name} needs {', '.join(missing)}, not installed on this system"
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
            return _resolve(self.check)(image, self.settings(params))
        return None

    def encode(self, frame: Any, image: ImageInfo, params: Params = Params()) -> bytes:
        """One frame (see the module docstring) as this syntax's codestream."""
        if self.encoder is None:
            raise ValueError(f"{self.name} has no encoder")
        return _resolve(self.encoder)(frame, image, self.settings(params))

    def decode(self, data: bytes, image: ImageInfo) -> Any:
        """One frame back from this syntax's codestream, as the encoder was given it."""
        if self.decoder is None:
            raise ValueError(f"{self.name} has no decoder")
        return _resolve(self.decoder)(data, image)

    def repack(self, codestream: bytes) -> bytes:
        """A codestream of the `repacks` syntax re-packed in this one, pixels untouched."""
        if self.repacker is None:
            raise ValueError(f"{self.name} re-packs nothing")
        return _resolve(self.repacker)(codestream)

    def unpack(self, data: bytes) -> bytes:
        """The codestream `repack` was given, back from its output."""
        if self.unpacker is None:
            raise ValueError(f"{self.name} re-packs nothing")
        return _resolve(self.unpacker)(data)


# ---------------------------------------------------------------- declarations


def _quality() -> Param:
    return Param("quality", int, 1, 100, default=90, describe="quality {value}")


def _ratio(lossless: str) -> Param:
    # below 2:1 a lossless syntax usually does as well
    return Param("ratio", float, 2.0, 200.0, describe="target ratio {value:g}",
                 hint=f"for so little compression use syntax = '{lossless}'")


def _jpeg_2000(name: str, lossless_uid: str, lossy_uid: str, title: str, method: str,
               other_lossless_uids: tuple[str, ...] = ()) -> tuple[Syntax, Syntax]:
    """A JPEG 2000 family's reversible and irreversible syntaxes (`router.codecs.<name>`)."""
    module = f"router.codecs.{name}"
    return (
        Syntax(
            f"{name}-lossless",
            lossless_uid,
            lossy=False,
            title=f"{title} Lossless",
            photometrics=_MONO | {"PALETTE COLOR", "RGB"},
            other_uids=other_lossless_uids,
            encoder=f"{module}:encode_lossless",
            decoder=f"{module}:decode_frame",
            photometric_out="router.codecs.j2k:photometric_reversible",
        ),
        Syntax(
            name,
            lossy_uid,
            lossy=True,
            method=method,
            title=f"{title} (irreversible)",
            photometrics=_LOSSY_PI,
            params=(_ratio(f"{name}-lossless"), _quality()),
            encoder=f"{module}:encode_lossy",
            decoder=f"{module}:decode_frame",
            photometric_out="router.codecs.j2k:photometric_irreversible",
        ),
    )


def _entries() -> list[Syntax]:
    native = dict(encapsulated=False, photometrics=None, bits_allocated=frozenset({1, 8, 16, 32, 64}))
    return [
        Syntax(ORIGINAL, "", lossy=False, title="as received", encapsulated=False, photometrics=None),
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
            encoder="router.codecs.rle:encode_frame",
            decoder="router.codecs.rle:decode_frame",
            check="router.codecs.rle:cannot_carry",
        ),
        Syntax(
            "jpeg-lossless",
            JPEG_LOSSLESS_SV1,
            lossy=False,
            title="JPEG Lossless, First-Order Prediction (Process 14 SV1)",
            min_bits=2,
            encoder="router.codecs.jpeg:encode_lossless",
            decoder="router.codecs.jpeg:decode_frame",
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
            params=(_quality(),),
            encoder="router.codecs.jpeg:encode_lossy",
            decoder="router.codecs.jpeg:decode_frame",
            pick_uid="router.codecs.jpeg:uid_for",
            valid_uids="router.codecs.jpeg:valid_uids",
            photometric_out="router.codecs.jpeg:photometric_for",
            bits_allocated_out="router.codecs.jpeg:bits_allocated_for",
        ),
        Syntax(
            "jpeg-ls-lossless",
            JPEG_LS_LOSSLESS,
            lossy=False,
            title="JPEG-LS Lossless",
            min_bits=2,
            signed_at_allocated_bits=True,
            encoder="router.codecs.jpegls:encode_lossless",
            decoder="router.codecs.jpegls:decode_frame",
        ),
        Syntax(
            "jpeg-ls-near-lossless",
            JPEG_LS_NEAR,
            lossy=True,
            method="ISO_14495_1",
            title="JPEG-LS Near-Lossless",
            min_bits=2,
            photometrics=_LOSSY_PI,
            params=(Param("near", int, 1, 255, default=2, describe="near={value}",
                          hint="near = 0 is lossless: use syntax = 'jpeg-ls-lossless'"),),
            error_bound="near",
            encoder="router.codecs.jpegls:encode_near",
            decoder="router.codecs.jpegls:decode_frame",
            check="router.codecs.jpegls:cannot_carry_near",
        ),
        *_jpeg_2000("j2k", J2K_LOSSLESS, J2K, "JPEG 2000", "ISO_15444_1"),
        *_jpeg_2000("htj2k", HTJ2K_LOSSLESS, HTJ2K, "High-Throughput JPEG 2000", "ISO_15444_15",
                    other_lossless_uids=(HTJ2K_LOSSLESS_RPCL,)),
        Syntax(
            "jpegxl-lossless",
            JPEGXL_LOSSLESS,
            lossy=False,
            title="JPEG XL Lossless",
            signed=False,
            photometrics=_MONO | {"PALETTE COLOR", "RGB"},
            encoder="router.codecs.jpegxl:encode_lossless",
            decoder="router.codecs.jpegxl:decode_frame",
        ),
        Syntax(
            "jpegxl",
            JPEGXL,
            lossy=True,
            method="ISO_18181_1",
            title="JPEG XL",
            signed=False,
            photometrics=_LOSSY_PI,
            params=(_quality(),),
            encoder="router.codecs.jpegxl:encode_lossy",
            decoder="router.codecs.jpegxl:decode_frame",
        ),
        Syntax(
            "jpegxl-jpeg",
            JPEGXL_JPEG,
            lossy=False,
            title="JPEG XL JPEG Recompression (from JPEG Baseline input only)",
            signed=False,
            max_bits=8,
            bits_allocated=frozenset({8}),
            photometrics=None,
            repacks=JPEG_BASELINE,
            # libjxl gives back the JPEG's pixels converted to RGB
            decodes_to_rgb=True,
            decoder="router.codecs.jpegxl:decode_frame",
            repacker="router.codecs.jpegxl:repack_jpeg",
            unpacker="router.codecs.jpegxl:unpack_jpeg",
        ),
    ]


_REGISTRY: dict[str, Syntax] = {s.name: s for s in _entries()}
_BY_UID: dict[str, Syntax] = {u: s for s in _REGISTRY.values() for u in s.uids}


def all_syntaxes() -> list[Syntax]:
    """Every registry entry, "original" included, in registry order."""
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
        hint = f" ({uid_name(key)}) is not an outbound syntax of this router" + hint
    raise KeyError(f"unknown syntax {key!r}{hint} (known: {', '.join(_REGISTRY)})")


def uid_name(uid: str) -> str:
    """The name pydicom's dictionary gives ``uid`` ("JPEG-LS Lossless Image Compression"), else
    the UID itself ("unknown syntax" for none)."""
    try:
        from pydicom.uid import UID  # only for messages: the registry stays free of pydicom

        name = UID(uid).name
    except Exception:  # noqa: BLE001 - pydicom's dictionary lookup
        name = uid
    return name if name and name != uid else uid or "unknown syntax"


def check_params(syntax: Syntax, params: Params) -> None:
    """Raise ParameterError unless ``syntax`` takes every parameter given in ``params`` and
    each is within its declared bounds. Called where a request is made (a rule file, the
    ``transcode`` command), never again."""
    declared = {p.name: p for p in syntax.params}
    for name, value in params.given().items():
        param = declared.get(name)
        if param is None:
            raise ParameterError(name, _not_taken(name, syntax))
        param.check(value, syntax.name)


def _not_taken(name: str, syntax: Syntax) -> str:
    takers = [s.name for s in _REGISTRY.values() if any(p.name == name for p in s.params)]
    where = f"applies to {', '.join(takers)}" if takers else "applies to no syntax of this router"
    kind = " (a lossless syntax)" if not syntax.lossy else ""
    return f"'{name}' {where}, not to {syntax.name!r}{kind}"


def register(syntax: Syntax) -> None:
    """Add an outbound syntax to the registry (codec plugins call this when imported).

    A name already in the registry is replaced; a UID keeps resolving to its first entry.
    """
    _REGISTRY[syntax.name] = syntax
    for uid in syntax.uids:
        _BY_UID.setdefault(uid, syntax)


def load_plugins(specs: Sequence[str]) -> None:
    """Import codec plugin modules, by module name or by path to a .py file.

    Each plugin registers its syntaxes with `register` when imported. The same list is
    loaded in the router and in every codec worker process.
    """
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
