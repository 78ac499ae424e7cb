"""Re-encode one DICOM file in an outbound transfer syntax.

``transcode_file`` is a pure function of its (picklable) arguments, run in the worker processes
of a pool: a native codec that crashes takes a worker down, not the router.

What its outcomes mean to the caller:

- a `Transcoded` result: the file to send. For an image a syntax cannot carry it says so and
  carries the fallback's output or the original (``changed=False``); this is never an error.
- `TranscodeError` (the only exception class for the input, subclasses included): this input
  cannot be transcoded, and trying again will not change that. The file is not DICOM, its
  Pixel Data disagrees with its header (more or fewer bytes or frames than declared, a
  codestream declaring a larger image than Rows x Columns), its pixels cannot be decoded or
  encoded, it declares more decoded pixel data than ``max_decoded_bytes``, or the request names
  a syntax this process does not know. Send the original, or dead-letter it, at once.
- any other exception (OSError from reading the input or writing the output, MemoryError, a
  worker that dies): the attempt failed, not the input; it may succeed later.

Every Pixel Data of an output, nested ones (icons) included, is valid in the output's syntax, and
every element has one VR (see `router.compat.pydicom.resolve_ambiguous_vrs`). Nothing is decoded
before the Pixel Data have been checked against their header (`router.codecs.pixeldata`).

This module is the plan (which syntax, which fallback); the steps are one module each:
`encode` (encode and verify, re-pack), `label` (lossy bookkeeping), `nested` (nested Pixel
Data), `write` (the output file). What each syntax can carry, takes and writes is declared in
`router.codecs.registry`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset

from router import codecs
from router.codecs import header, pixeldata
from router.codecs.deidentify import lossy_uid
from router.codecs.encode import CannotCarry, Mismatch, encode_frames, for_syntax, repack_frames
from router.codecs.label import lossy_bookkeeping
from router.codecs.nested import make_valid
from router.codecs.pixeldata import PixelDataError, Pixels, is_transient
from router.codecs.registry import (
    EXPLICIT_BE, EXPLICIT_LE, NATIVE_TRANSFER_SYNTAXES, VIDEO_TRANSFER_SYNTAXES, ImageInfo, Syntax, is_lossy_input,
    uid_name,
)
from router.codecs.write import guess_ts, set_encapsulated, set_encoded, set_native, write_file
from router.compat.pydicom import resolve_ambiguous_vrs, teach_jpeg_xl
from router.receive.dicomfile import read_header
from router.request import ORIGINAL, Reason, Request, fallback

__all__ = ["HeaderRefusal", "Transcoded", "TranscodeError", "UnknownSyntax", "transcode_file"]

teach_jpeg_xl()  # the output may be in a JPEG XL syntax pydicom 3.0 does not know

T = TypeVar("T")


class TranscodeError(ValueError):
    """This input cannot be transcoded, and trying again will not change that (see the module
    docstring); the message says why."""


class HeaderRefusal(TranscodeError):
    """The destination's header rules cannot be applied to this instance (`reason`: unmapped, ...):
    it is not sent there without them."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.reason)  # it crosses from the codec worker


class UnknownSyntax(TranscodeError, KeyError):
    """The request names a syntax this process does not know (a plugin not loaded here)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Transcoded:
    """What `transcode_file` made of one request: the file to send (``path``; the input itself
    when ``changed`` is False), its transfer syntax, and why it is not in the requested one."""

    path: Path
    changed: bool
    transfer_syntax_uid: str
    syntax: str
    sop_instance_uid: str
    ratio: float | None
    note: str
    fallback_reason: Reason | None
    seconds: float
    # CPU seconds of this call by stage: decode (read the input, decode its pixels), encode,
    # verify (decode the output back and compare), write (the output file)
    cpu: dict[str, float] = field(default_factory=dict, compare=False)
    header: tuple[tuple[str, str], ...] = ()  # header rules applied: (action, attribute), never values


# ---------------------------------------------------------------- entry point


def transcode_file(src: Path, dst: Path, request: Request, checked: bool = False,
                   max_decoded_bytes: int | None = None) -> Transcoded:
    """Write ``src`` to ``dst`` in ``request.syntax``, or say why it was left alone.

    When the result has ``changed=False`` nothing was written and ``path`` is ``src``: send the
    original. Lossy output follows PS3.3 C.7.6.1.1.5 (2110, 2112, 2114, DERIVED, new SOP Instance
    UID). ``checked``: the file already passed ``dicomfile.read_header`` (the router's spool).
    ``max_decoded_bytes``: the most decoded pixel data (all frames, nested ones too) the header
    may declare; checked before anything is decoded. None: no bound.

    Raises TranscodeError when this input cannot be transcoded (deterministic), OSError and
    MemoryError when the attempt failed (see the module docstring).
    """
    start = time.perf_counter()
    cpu_start = time.thread_time()
    src, dst = Path(src), Path(dst)
    try:
        target = codecs.get(request.syntax)
    except KeyError as exc:
        raise UnknownSyntax(exc.args[0] if exc.args else str(exc)) from None
    try:
        if not checked:  # the receiver has already checked what it accepted
            read_header(src)  # refuses declared lengths the file cannot hold before anything is allocated
        ds = pydicom.dcmread(src)
    except Exception as exc:
        if is_transient(exc):
            raise
        raise TranscodeError(f"{src}: not readable as DICOM: {exc}") from exc
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        raise TranscodeError(f"{src}: not a DICOM instance (no SOP Class / Instance UID)")
    try:
        transcoding = _Transcoding(src, dst, request, ds, start, cpu_start, max_decoded_bytes)
    except header.HeaderRefused as exc:
        raise HeaderRefusal(str(exc), exc.reason) from None
    except Exception as exc:
        if is_transient(exc) or not request.header:
            raise
        # the header rules cannot be applied to this data set (a value the de-identification
        # cannot read): the same every time, and never sent without them
        raise HeaderRefusal(f"{src}: header rules cannot be applied: {type(exc).__name__}: {exc}",
                            "header_rule") from exc
    try:
        return transcoding.run(target)
    except TranscodeError:
        raise
    except PixelDataError as exc:
        raise TranscodeError(f"{src}: {exc}") from exc
    except Exception as exc:
        if is_transient(exc):
            raise
        # a value pydicom cannot decode or encode, a codec refusing its input
        raise TranscodeError(f"{src}: cannot transcode to {target.name}: {type(exc).__name__}: {exc}") from exc


class _Transcoding:
    """One call of `transcode_file`: the input data set, the request, the CPU laps."""

    def __init__(self, src: Path, dst: Path, request: Request, ds: Dataset, start: float, cpu_start: float,
                 max_decoded_bytes: int | None = None) -> None:
        self.src, self.dst, self.request, self.ds, self.start = src, dst, request, ds, start
        self.max_decoded_bytes = max_decoded_bytes
        self.cpu: dict[str, float] = {}
        self._clock = cpu_start
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta = meta
        self.ts = str(meta.get("TransferSyntaxUID", "") or guess_ts(ds))
        self.sop = str(ds.get("SOPInstanceUID", ""))
        self.lossy_input = is_lossy_input(self.ts, ds.get("LossyImageCompression"))
        self._pixels: Pixels | None = None
        self._checked = False
        # where the input's native Pixel Data value lies, while it is still raw: when only the
        # pixels change, the output is the input's own bytes around new Pixel Data (_write_spliced)
        raw = ds.get_item(0x7FE00010) if 0x7FE00010 in ds else None
        self._raw_pixels = ((raw.value_tell, raw.length) if isinstance(raw, RawDataElement)
                            and raw.length != 0xFFFFFFFF else None)
        self._photometric = str(ds.get("PhotometricInterpretation", ""))
        self._splice = False  # only the main Pixel Data changed: the output may be spliced
        # the header rules' changes, read from the header as received; made just before the write
        self._header = header.plan(ds, request.header) if request.header else []
        self._header_done: tuple[tuple[str, str], ...] = ()
        # de-identified now, before the pixels: the lossy bookkeeping follows it, and its new
        # SOP Instance UID is derived from the de-identified one
        self._deid = header.deidentify_now(self._header) if self._header else None

    def lap(self, stage: str) -> None:
        """Count the CPU time since the last lap under `stage`."""
        now = time.thread_time()
        self.cpu[stage] = self.cpu.get(stage, 0.0) + (now - self._clock)
        self._clock = now

    # -- outcomes

    def unchanged(self, note: str, reason: Reason | None = None) -> Transcoded:
        if self.request.header:  # the pixels as received, the header as the rules say: written all the same
            self.lap("decode")
            self.check_pixel_data()
            self._apply_header()
            uid = EXPLICIT_LE if self.ts == EXPLICIT_BE else self.ts  # big endian is written little
            write_file(self.ds, self.src, self.dst, self.ts, uid, None)
            return replace(self.written(codecs.get(ORIGINAL), uid, None, note + "; header rules applied"),
                           fallback_reason=reason)
        self.lap("decode")
        return Transcoded(
            path=self.src,
            changed=False,
            transfer_syntax_uid=self.ts,
            syntax="original",
            sop_instance_uid=self.sop,
            ratio=None,
            note=note,
            fallback_reason=reason,
            seconds=time.perf_counter() - self.start,
            cpu=dict(self.cpu),
        )

    def written(self, syntax: Syntax, uid: str, ratio: float | None, note: str) -> Transcoded:
        self.lap("write")
        return Transcoded(
            path=self.dst,
            changed=True,
            transfer_syntax_uid=uid,
            syntax=syntax.name,
            sop_instance_uid=str(self.ds.SOPInstanceUID),
            ratio=ratio,
            note=note,
            fallback_reason=None,
            seconds=time.perf_counter() - self.start,
            cpu=dict(self.cpu),
            header=self._header_done,
        )

    def _apply_header(self) -> None:
        if self._header:
            self._header_done = tuple((c.action, c.attribute) for c in header.apply(self._header))
            self._header = []

    # -- decisions

    def run(self, target: Syntax) -> Transcoded:
        verdict = self.try_syntax(target)
        if isinstance(verdict, Transcoded):
            return verdict
        reason = verdict  # the target cannot carry it
        instead = fallback(self.request, Reason.CODEC_CANNOT_CARRY)
        if instead is None or codecs.get(instead.syntax) is target:
            return self.unchanged(f"{reason}: forwarded as received", Reason.CODEC_CANNOT_CARRY)
        self.request = instead
        verdict = self.try_syntax(codecs.get(instead.syntax), because=reason)
        if isinstance(verdict, Transcoded):
            return replace(verdict, fallback_reason=Reason.CODEC_CANNOT_CARRY)
        return self.unchanged(
            f"{reason}; fallback {verdict}: forwarded as received", Reason.CODEC_CANNOT_CARRY
        )

    def try_syntax(self, syntax: Syntax, because: CannotCarry | None = None) -> Transcoded | CannotCarry:
        """The result, or the reason ``syntax`` cannot carry this object."""
        prefix = f"{because}: fallback {syntax.name}; " if because else ""
        ds, ts = self.ds, self.ts
        if syntax.name == ORIGINAL:
            return self.unchanged(f"{prefix}original requested: forwarded as received")
        # already-lossy pixels are never re-encoded into another codestream: that would lose more
        # (lossy) or only grow the file (lossless); re-packing a codestream as it is loses nothing
        recompress = syntax.lossy or (syntax.encapsulated and syntax.repacks is None)
        if recompress and self.lossy_input:
            why = (
                "0028,2110=01"
                if str(ds.get("LossyImageCompression", "")).strip() == "01"
                else f"received in lossy {uid_name(ts)}"
            )
            return self.unchanged(f"{prefix}already lossy ({why}): forwarded as received")
        if ts in syntax.uids:
            return self.unchanged(f"{prefix}already in {syntax.name} ({ts}): forwarded as received")
        if "PixelData" not in ds and syntax.encapsulated:
            return self.unchanged(f"{prefix}no pixel data (float pixels, document or non-image): forwarded as received")
        if ts in VIDEO_TRANSFER_SYNTAXES:
            return self.unchanged(f"{prefix}video ({uid_name(ts)}) is never transcoded: forwarded as received")
        self.check_pixel_data()
        if "PixelData" not in ds:
            return self.rewrite_native(syntax, None, prefix + "no pixel data: dataset re-encoded")
        if syntax.repacks is not None:
            return self.repack(syntax, prefix)
        pixels = self.pixels()
        if pixels is None:
            if not syntax.encapsulated and ts in NATIVE_TRANSFER_SYNTAXES and ts != EXPLICIT_BE:
                return self.rewrite_native(syntax, None, prefix + "dataset re-encoded, pixels as received")
            return CannotCarry(f"{syntax.name} cannot carry {ds.get('BitsAllocated')}-bit allocated pixels")
        if not syntax.encapsulated:
            if ts in NATIVE_TRANSFER_SYNTAXES and ts != EXPLICIT_BE:
                return self.rewrite_native(syntax, None, prefix + "dataset re-encoded, pixels as received")
            note = f"{prefix}decompressed from {uid_name(ts)}{_padding(pixels)}"
            return self.rewrite_native(syntax, pixels, note)
        pixels, image = for_syntax(syntax, pixels)
        reason = syntax.cannot_carry(image, self.request.params)
        if reason:
            return CannotCarry(reason)
        return self.encode(syntax, pixels, image, prefix)

    # -- pixels

    def check_pixel_data(self) -> None:
        """Every Pixel Data of the input, nested ones too, against its header, and their
        declared decoded size against the bound: before anything is decoded or written."""
        if self._checked:
            return
        # pydicom raises on reading some elements whose VR it cannot decide: decide them first
        resolve_ambiguous_vrs(self.ds, is_little_endian=self.ts != EXPLICIT_BE)
        ds = self.ds
        found = [(ds, self.ts not in NATIVE_TRANSFER_SYNTAXES)] if "PixelData" in ds else []
        found += [(item, pixeldata.is_encapsulated(item)) for _, _, item in pixeldata.nested(ds)]
        geometries = [_saying_nested(item is not ds, pixeldata.geometry, item) for item, _ in found]
        total = sum(g.decoded_bytes for g in geometries)
        if self.max_decoded_bytes is not None and total > self.max_decoded_bytes:
            what = str(geometries[0]) + (f" and {len(geometries) - 1} nested" if len(geometries) > 1 else "")
            raise PixelDataError(f"Pixel Data declares {total} bytes decoded ({what}), more than one image may "
                                 f"decode here: {self.max_decoded_bytes} bytes ([transcode] max_decoded_mb, and "
                                 f"what a codec worker can afford of this machine's memory)")
        for item, encapsulated in found:
            if encapsulated and item is not ds and self.ts in NATIVE_TRANSFER_SYNTAXES:
                raise PixelDataError(f"nested Pixel Data is encapsulated in a file of native {uid_name(self.ts)}")
            _saying_nested(item is not ds, pixeldata.check, item, encapsulated)
        self._checked = True

    def pixels(self) -> Pixels | None:
        if self._pixels is None:
            self._pixels = pixeldata.decode(self.ds, self.ts)
        return self._pixels

    # -- writers

    def encode(self, syntax: Syntax, pixels: Pixels, image: ImageInfo, prefix: str) -> Transcoded:
        params = self.request.params
        self.lap("decode")
        encoded = encode_frames(syntax, pixels, image, self.request, self.lap)
        if isinstance(encoded, Mismatch):
            return self.unchanged(f"{prefix}{encoded}: forwarded as received", Reason.VERIFY_MISMATCH)
        raw_bytes = image.rows * image.columns * image.samples_per_pixel * image.frames * image.bits_allocated // 8
        ratio = raw_bytes / max(sum(len(f) for f in encoded), 1)
        uid = syntax.uid_for(image)
        ds = self.ds
        set_encoded(ds, syntax, image, encoded)
        note = f"{prefix}{uid_name(self.ts)} -> {syntax.name} ({uid}), ratio {ratio:.2f}:1{_padding(pixels)}"
        if pixels.image.bits > image.bits_stored:
            note += f"; values above Bits Stored kept: coded at {image.bits} bits"
        if syntax.lossy:
            new_uid = None if self._deid is None else functools.partial(lossy_uid, self._deid.secret_file)
            lossy_bookkeeping(ds, syntax, ratio, params, self.request.keep_sop_instance_uid, new_uid)
            note += "; lossy: new SOP Instance UID" if not self.request.keep_sop_instance_uid else "; lossy"
        elif self.lossy_input:
            ds.LossyImageCompression = "01"
        # lossless, one sample, same photometric and words: no element but Pixel Data changed
        self._splice = (not syntax.lossy and not self.lossy_input and self.ts == EXPLICIT_LE
                        and image.samples_per_pixel == 1 and ds.PhotometricInterpretation == self._photometric
                        and ds.BitsAllocated == image.bits_allocated and "ExtendedOffsetTable" not in ds)
        return self.finish(syntax, uid, ratio, note)

    def rewrite_native(self, syntax: Syntax, pixels: Pixels | None, note: str) -> Transcoded:
        self.lap("decode")
        ds = self.ds
        if pixels is not None:
            set_native(ds, pixels)
            if self.lossy_input:
                ds.LossyImageCompression = "01"
        elif "PixelData" in ds and self.ts == EXPLICIT_BE:
            raise TranscodeError(f"{self.src}: big endian pixel data could not be decoded")
        return self.finish(syntax, syntax.uid, None, note)

    def repack(self, syntax: Syntax, prefix: str) -> Transcoded | CannotCarry:
        """Each frame's codestream re-packed by ``syntax`` as it is: no pixel is decoded."""
        source_name = uid_name(str(syntax.repacks))
        if self.ts != syntax.repacks:
            return CannotCarry(f"{syntax.name} only re-packs {source_name} input, not {uid_name(self.ts)}")
        ds = self.ds
        done = repack_frames(ds, syntax, self.request)
        if isinstance(done, Mismatch):
            return self.unchanged(f"{prefix}{done}: forwarded as received", Reason.VERIFY_MISMATCH)
        if isinstance(done, CannotCarry):
            return done
        packed, source = done
        ratio = source / max(sum(len(p) for p in packed), 1)
        self.lap("encode")
        set_encapsulated(ds, packed)
        ds.LossyImageCompression = "01"
        return self.finish(syntax, syntax.uid, ratio,
                           f"{prefix}{source_name} re-packed as {syntax.name}, {ratio:.2f}:1 smaller than the input")

    def finish(self, syntax: Syntax, uid: str, ratio: float | None, note: str) -> Transcoded:
        """The main image done: the nested ones made valid in ``uid``, the file written."""
        nested = make_valid(self.ds, self.ts, syntax, uid, self.request, self.lap)
        self.check_pixel_data()  # also gives every element one VR
        splice = self._raw_pixels if self._splice and not nested.changed and not self._header else None
        self._apply_header()
        write_file(self.ds, self.src, self.dst, self.ts, uid, splice)
        return self.written(syntax, uid, ratio, note + nested.note)


def _saying_nested(nested: bool, call: Callable[..., T], *args: object) -> T:
    """``call(*args)``, its PixelDataError saying "nested" when the Pixel Data is."""
    try:
        return call(*args)
    except PixelDataError as exc:
        if not nested:
            raise
        raise PixelDataError(f"nested {exc}") from None


def _padding(pixels: Pixels) -> str:
    """What the note says of frames decoded smaller than Rows x Columns."""
    if not pixels.padded:
        return ""
    return f"; {pixels.padded} of {len(pixels.frames)} frames smaller than Rows x Columns, padded with 0"
