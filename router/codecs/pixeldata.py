"""The Pixel Data of one data set, the top level or a nested item (an icon): what its header
declares, whether its value holds that, and its frames decoded.

Nothing is decoded before the value has been checked against the header, so that what a decoder
allocates is bounded by the header, and the header by the caller (`Geometry.decoded_bytes`):

- a native value holds Rows x Columns x Samples per Pixel x Number of Frames x Bits Allocated / 8
  bytes (one pad byte more when that is odd), no more and no less;
- an encapsulated value holds Number of Frames frames;
- no frame's codestream declares more rows, columns or components than the header.

A frame whose codestream declares fewer rows or columns than the header (the edge tiles of some
whole-slide images) is decoded at its own size and padded to Rows x Columns with 0 on the right
and at the bottom. DCMTK does the same with the same value: dcmjpeg (`DJCodecDecoder::decode`)
decodes into a frame buffer created zero-filled (`DcmPolymorphOBOW::createUint16Array`, through
`DcmElement::createEmptyValue`), and `DJDecompressIJG8Bit::decode` copies the codestream's rows
into it at the codestream's own width. For a tile of full width the two outputs are the same;
for a narrower one DCMTK's rows run on without the header's stride, here each row starts at
column 0 of its row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames

from router import codecs
from router.codecs.codestream import CodestreamError, declared, starts_a_codestream
from router.codecs.frames import to_signed
from router.codecs.registry import EXPLICIT_BE, NATIVE_TRANSFER_SYNTAXES, ImageInfo, uid_name

__all__ = ["Geometry", "Pixels", "PixelDataError", "check", "decode", "geometry", "is_encapsulated", "nested",
           "is_transient"]

PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
# native pixel data whose two chroma samples are shared by two pixels
_SUBSAMPLED = ("YBR_FULL_422", "YBR_PARTIAL_422")


class PixelDataError(ValueError):
    """The Pixel Data disagrees with its header, or cannot be decoded; the message says how."""


def is_transient(exc: BaseException) -> bool:
    """True for the failures that say nothing about the data: memory, and the system's I/O
    errors (an OSError with an errno; codecs raise OSError without one for bad data)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno is not None)


@dataclass(frozen=True)
class Geometry:
    """What the Image Pixel attributes of one data set declare."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int
    photometric: str

    @property
    def decoded_bytes(self) -> int:
        """The size of the decoded frames, at least one byte a sample."""
        return self.rows * self.columns * self.samples * self.frames * max(1, (self.bits_allocated + 7) // 8)

    @property
    def native_bytes(self) -> int:
        """The length of a native value, without its pad byte."""
        samples = 2 if self.samples == 3 and self.photometric in _SUBSAMPLED else self.samples
        return (self.rows * self.columns * samples * self.frames * self.bits_allocated + 7) // 8

    def __str__(self) -> str:
        frames = f"{self.frames} frames of " if self.frames != 1 else ""
        samples = f" x {self.samples} samples" if self.samples != 1 else ""
        return f"{frames}{self.rows} x {self.columns}{samples} x {self.bits_allocated} bits"


@dataclass
class Pixels:
    """Decoded pixels: signed values when signed, unsigned otherwise."""

    frames: list[np.ndarray]
    image: ImageInfo
    # frames whose codestream declared fewer rows or columns, padded to Rows x Columns with 0
    padded: int = 0


def _whole(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise PixelDataError(f"Pixel Data without {keyword}")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PixelDataError(f"{keyword} is not a whole number: {value!r}") from None
    if number != value and not isinstance(value, str):  # a float such as 1.5
        raise PixelDataError(f"{keyword} is not a whole number: {value!r}")
    return number


def geometry(ds: Dataset) -> Geometry:
    """The image ``ds``'s header declares; raises PixelDataError when it declares none."""
    g = Geometry(
        rows=_whole(ds, "Rows"),
        columns=_whole(ds, "Columns"),
        samples=_whole(ds, "SamplesPerPixel", 1),
        bits_allocated=_whole(ds, "BitsAllocated"),
        frames=_whole(ds, "NumberOfFrames", 1),
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip(),
    )
    for name, value in (("Rows", g.rows), ("Columns", g.columns), ("Samples per Pixel", g.samples),
                        ("Bits Allocated", g.bits_allocated), ("Number of Frames", g.frames)):
        if value < 1:
            raise PixelDataError(f"{name} is {value}")
    return g


def is_encapsulated(ds: Dataset) -> bool:
    """True when the Pixel Data of ``ds`` is encapsulated (undefined length)."""
    elem = ds.get_item(PIXEL_DATA)
    return bool(elem is not None and (elem.is_undefined_length if hasattr(elem, "is_undefined_length")
                                      else elem.length == UNDEFINED))


def nested(ds: Dataset) -> Iterator[tuple[Dataset, int, Dataset]]:
    """(data set, sequence tag, item) of every sequence item below ``ds``, at any depth, that holds
    a Pixel Data of its own (an Icon Image Sequence item, most often)."""
    for tag, elem in list(ds._dict.items()):
        if elem.VR in (None, "UN"):  # implicit VR (or UN): its VR is known once converted
            elem = ds[tag]
        if elem.VR != "SQ":
            continue  # an element read with its own VR is not converted: only sequences are
        for item in ds[tag].value:
            if PIXEL_DATA in item:
                yield ds, int(elem.tag), item
            yield from nested(item)


def check(ds: Dataset, encapsulated: bool) -> Geometry:
    """The geometry of the Pixel Data of ``ds``, after checking that its value holds it:
    ``encapsulated`` says how the value must be encoded. Raises PixelDataError saying what
    disagrees; decodes nothing."""
    g = geometry(ds)
    if encapsulated != is_encapsulated(ds):
        kind = "native (defined length)" if encapsulated else "encapsulated (undefined length)"
        raise PixelDataError(f"Pixel Data is {kind}, which its transfer syntax does not allow")
    value = ds.PixelData
    if not encapsulated:
        size = g.native_bytes
        if len(value) not in (size, size + size % 2):
            raise PixelDataError(f"Pixel Data holds {len(value)} bytes, the header declares {size} ({g})")
        return g
    count = _frame_count(ds, value, g.frames)
    if count != g.frames:
        raise PixelDataError(f"Pixel Data holds {count} frames, Number of Frames says {g.frames}")
    return g


def _frames(ds: Dataset, value: bytes, frames: int) -> Iterator[bytes]:
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return generate_frames(value, number_of_frames=frames, extended_offsets=extended)


def _frame_count(ds: Dataset, value: bytes, frames: int) -> int:
    try:
        count = sum(1 for _ in _frames(ds, value, frames))
    except ValueError as exc:  # fewer fragments than frames, a broken offset table
        raise PixelDataError(f"Pixel Data does not hold Number of Frames ({frames}) frames: {exc}") from None
    if count == 1:
        # one frame may span fragments, but a fragment that starts a codestream starts a frame
        starts = sum(starts_a_codestream(f) for f in generate_fragments(value) if f)
        count = max(count, starts)
    return count


# ---------------------------------------------------------------- decoding


def decode(ds: Dataset, ts: str) -> Pixels | None:
    """The frames of the Pixel Data of ``ds``, stored in transfer syntax ``ts`` (that of the
    file, or Explicit VR Little Endian for a native icon in an encapsulated file), as the
    transcoder hands them to an encoder; None for pixels no codec takes (Bits Allocated 1).
    Raises PixelDataError when they cannot be decoded; call `check` first."""
    g = geometry(ds)
    bs = _whole(ds, "BitsStored", g.bits_allocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    pi = g.photometric or "MONOCHROME2"
    if g.bits_allocated not in (8, 16, 32):
        return None
    padded = 0
    try:
        if ts in NATIVE_TRANSFER_SYNTAXES and ts != EXPLICIT_BE and pi not in _SUBSAMPLED:
            frames = _native_frames(ds, g)
        else:
            frames, pi, padded = _decoded_frames(ds, ts, g, bs, signed)
    except PixelDataError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        raise PixelDataError(f"pixel data cannot be decoded ({uid_name(ts)}): {exc}") from exc
    if len(frames) != g.frames:
        raise PixelDataError(f"pixel data holds {len(frames)} frames, Number of Frames says {g.frames}")
    precision, frames, lo, hi = _fit(frames, g.bits_allocated, bs, signed)
    image = ImageInfo(
        rows=g.rows, columns=g.columns, samples_per_pixel=g.samples, bits_allocated=g.bits_allocated,
        bits_stored=bs, signed=signed, photometric=pi, frames=g.frames, precision=precision, minimum=lo,
        maximum=hi,
    )
    return Pixels(frames, image, padded)


def _native_frames(ds: Dataset, g: Geometry) -> list[np.ndarray]:
    # Read the stored bits ourselves: pydicom masks bits above Bits Stored,
    # and those bits (old overlays) must survive a lossless transcode.
    raw = ds.PixelData
    count = g.rows * g.columns * g.samples * g.frames
    need = count * g.bits_allocated // 8
    if len(raw) < need:
        raise PixelDataError(f"pixel data too short: {len(raw)} bytes, {need} expected")
    arr = np.frombuffer(raw, dtype=np.dtype(f"<u{g.bits_allocated // 8}"), count=count)
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    if g.samples == 1:
        arr = arr.reshape(g.frames, g.rows, g.columns)
    elif planar == 1:
        arr = np.moveaxis(arr.reshape(g.frames, g.samples, g.rows, g.columns), 1, -1)
    else:
        arr = arr.reshape(g.frames, g.rows, g.columns, g.samples)
    return [np.ascontiguousarray(f) for f in arr]


def _frame_sizes(ds: Dataset, g: Geometry) -> list[tuple[int, int]]:
    """(rows, columns) each frame's codestream declares, read before anything is decoded;
    raises PixelDataError for a frame that declares more than the header."""
    sizes = []
    for number, codestream in enumerate(_frames(ds, ds.PixelData, g.frames), start=1):
        try:
            found = declared(codestream)
        except CodestreamError as exc:
            raise PixelDataError(f"frame {number}: {exc}") from None
        if found is None:
            sizes.append((g.rows, g.columns))
            continue
        rows = found.rows or g.rows  # 0: the height follows the first scan (JPEG DNL)
        if rows > g.rows or found.columns > g.columns:
            raise PixelDataError(f"frame {number}: its codestream declares {rows} x {found.columns} pixels, "
                                 f"more than Rows x Columns ({g.rows} x {g.columns})")
        if found.components is not None and found.components > g.samples:
            raise PixelDataError(f"frame {number}: its codestream declares {found.components} components, "
                                 f"Samples per Pixel says {g.samples}")
        sizes.append((rows, found.columns))
    return sizes


def _padded(frame: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``frame`` at the top left of a Rows x Columns frame of zeros (see the module docstring)."""
    if frame.shape[:2] == (rows, columns):
        return frame
    out = np.zeros((rows, columns, *frame.shape[2:]), frame.dtype)
    out[: frame.shape[0], : frame.shape[1]] = frame
    return out


def _decoded_frames(ds: Dataset, ts: str, g: Geometry, bs: int,
                    signed: bool) -> tuple[list[np.ndarray], str, int]:
    """The frames, their photometric interpretation, and how many were padded."""
    from pydicom.pixels import get_decoder

    pi = g.photometric or "MONOCHROME2"
    sizes = _frame_sizes(ds, g) if ts not in NATIVE_TRANSFER_SYNTAXES else []
    padded = sum(size != (g.rows, g.columns) for size in sizes)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return (*_registry_frames(ds, ts, g, bs, pi, sizes), padded)
    # Subsampled YBR decodes to RGB; other colour data stays as stored, so a
    # lossless transcode keeps the exact sample values
    as_rgb = pi in ("YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420")
    frames, out_pi = [], pi
    if not padded:
        decoded = decoder.iter_array(ds, as_rgb=as_rgb)
    else:
        # frames of their own sizes: each is decoded alone, as what it declares
        options = dict(
            number_of_frames=1, samples_per_pixel=g.samples, bits_allocated=g.bits_allocated, bits_stored=bs,
            pixel_representation=int(signed), photometric_interpretation=pi,
            planar_configuration=int(ds.get("PlanarConfiguration", 0) or 0), as_rgb=as_rgb,
        )
        decoded = (decoder.as_array(encapsulate([codestream]), rows=rows, columns=columns, **options)
                   for codestream, (rows, columns) in zip(_frames(ds, ds.PixelData, g.frames), sizes))
    for arr, meta in decoded:
        frames.append(np.ascontiguousarray(_padded(arr, g.rows, g.columns)))
        out_pi = str(meta.get("photometric_interpretation", out_pi))
    if out_pi in ("YBR_RCT", "YBR_ICT"):
        out_pi = "RGB"
    return frames, out_pi, padded


def _registry_frames(ds: Dataset, ts: str, g: Geometry, bs: int, pi: str,
                     sizes: list[tuple[int, int]]) -> tuple[list[np.ndarray], str]:
    """Frames of a syntax pydicom cannot decode (JPEG XL) through our own decoder."""
    syntax = codecs.get(ts)
    if syntax.decoder is None:
        raise PixelDataError(f"no decoder for {uid_name(ts)}")
    frames = []
    for codestream, (rows, columns) in zip(_frames(ds, ds.PixelData, g.frames), sizes):
        image = ImageInfo(rows=rows, columns=columns, samples_per_pixel=g.samples,
                          bits_allocated=g.bits_allocated, bits_stored=bs, signed=False, photometric=pi)
        frames.append(_padded(np.asarray(syntax.decode(codestream, image)), g.rows, g.columns))
    if syntax.decodes_to_rgb and pi.startswith("YBR"):
        pi = "RGB"
    return frames, pi


def _fit(frames: list[np.ndarray], ba: int, bs: int, signed: bool) -> tuple[int, list[np.ndarray], int, int]:
    """Coding precision, the pixel values (signed when signed), their min and max.

    Precision is Bits Stored unless some stored value does not fit it, then
    Bits Allocated: such bits are kept, never truncated.
    """
    if not frames:
        return bs, frames, 0, 0
    utype = np.dtype(f"u{ba // 8}")
    itype = np.dtype(f"i{ba // 8}")
    if not signed:
        frames = [f if f.dtype == utype else f.astype(utype) for f in frames]
        hi = max(int(f.max()) for f in frames)
        lo = min(int(f.min()) for f in frames)
        return (bs if hi < (1 << bs) else ba), frames, lo, hi
    patterns = [f.view(utype) if f.dtype.itemsize == ba // 8 else f.astype(itype).view(utype) for f in frames]
    if bs < ba:
        # the common case, checked with two reductions: every word already is a sign-extended
        # Bits Stored value, so the words are the values
        words = [p.view(itype) for p in patterns]
        lo, hi = min(int(w.min()) for w in words), max(int(w.max()) for w in words)
        if -(1 << (bs - 1)) <= lo and hi < (1 << (bs - 1)):
            return bs, words, lo, hi
    fits = bs >= ba
    if not fits:
        top = (1 << (ba - bs)) - 1
        sign = 1 << (bs - 1)
        fits = all(
            bool(np.all(((p >> bs) == 0) | (((p >> bs) == top) & ((p & sign) != 0)))) for p in patterns
        )
    precision = bs if fits else ba
    values = [to_signed(p, precision).astype(itype, copy=False) for p in patterns]
    lo = min(int(v.min()) for v in values)
    hi = max(int(v.max()) for v in values)
    return precision, values, lo, hi

