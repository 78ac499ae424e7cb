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

This module plans (which syntax, which fallback) and writes (bookkeeping, encapsulation);
what each syntax can carry, takes and writes is declared in `router.codecs.registry`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from router import codecs
from router.codecs import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    NATIVE_TRANSFER_SYNTAXES,
    VIDEO_TRANSFER_SYNTAXES,
    ImageInfo,
    Syntax,
    is_lossy_input,
)
from router.codecs import pixeldata
from router.codecs.frames import to_pattern, to_signed
from router.codecs.pixeldata import PixelDataError, Pixels, is_transient
from router.codecs.registry import uid_name
from router.compat.pydicom import resolve_ambiguous_vrs, swap_other_words_to_little_endian, teach_jpeg_xl
from router.dicomfile import read_header
from router.request import ORIGINAL, Params, Reason, Request, fallback

__all__ = ["Transcoded", "TranscodeError", "UnknownSyntax", "transcode_file", "decoded_frames"]

teach_jpeg_xl()  # the output may be in a JPEG XL syntax pydicom 3.0 does not know

# Offsets in a Basic Offset Table are 32-bit
_BOT_LIMIT = 2**32 - 1

T = TypeVar("T")


class TranscodeError(ValueError):
    """This input cannot be transcoded, and trying again will not change that (see the module
    docstring); the message says why."""


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


# what became of one nested Pixel Data: kept as it was, re-encoded, or the reason to drop it
_KEPT, _CONVERTED = "kept", "converted"


class _Mismatch(str):
    """What verification found: an output that does not give back what it was made from."""


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
    transcoding = _Transcoding(src, dst, request, ds, start, cpu_start, max_decoded_bytes)
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
        self.ts = str(meta.get("TransferSyntaxUID", "") or _guess_ts(ds))
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
        self._splice = False
        self._nested_changed = False

    def lap(self, stage: str) -> None:
        """Count the CPU time since the last lap under `stage`."""
        now = time.thread_time()
        self.cpu[stage] = self.cpu.get(stage, 0.0) + (now - self._clock)
        self._clock = now

    # -- outcomes

    def unchanged(self, note: str, reason: Reason | None = None) -> Transcoded:
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
        )

    # -- decisions

    def run(self, target: Syntax) -> Transcoded:
        verdict = self.try_syntax(target)
        if isinstance(verdict, Transcoded):
            return verdict
        reason = verdict
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

    def try_syntax(self, syntax: Syntax, because: str | None = None) -> Transcoded | str:
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
            ba = ds.get("BitsAllocated")
            return f"{syntax.name} cannot carry {ba}-bit allocated pixels"
        if not syntax.encapsulated:
            if ts in NATIVE_TRANSFER_SYNTAXES and ts != EXPLICIT_BE:
                return self.rewrite_native(syntax, None, prefix + "dataset re-encoded, pixels as received")
            note = f"{prefix}decompressed from {uid_name(ts)}{_padding(pixels)}"
            return self.rewrite_native(syntax, pixels, note)
        pixels, image = _for_syntax(syntax, pixels)
        reason = syntax.cannot_carry(image, self.request.params)
        if reason:
            return reason
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
            raise PixelDataError(f"Pixel Data declares {total} bytes decoded ({what}), more than the limit of "
                                 f"{self.max_decoded_bytes} bytes")
        for item, encapsulated in found:
            if encapsulated and item is not ds and self.ts in NATIVE_TRANSFER_SYNTAXES:
                raise PixelDataError(f"nested Pixel Data is encapsulated in a file of native {uid_name(self.ts)}")
            _saying_nested(item is not ds, pixeldata.check, item, encapsulated)
        self._checked = True

    def pixels(self) -> Pixels | None:
        if self._pixels is None:
            self._pixels = pixeldata.decode(self.ds, self.ts)
        return self._pixels

    def nested_syntax(self, item: Dataset) -> str:
        """The transfer syntax the Pixel Data of nested ``item`` is stored in: the file's when it is
        encapsulated, else native (little endian in every encapsulated file)."""
        if pixeldata.is_encapsulated(item) or self.ts in NATIVE_TRANSFER_SYNTAXES:
            return self.ts
        return EXPLICIT_LE

    # -- writers

    def encode_frames(self, syntax: Syntax, pixels: Pixels, image: ImageInfo) -> list[bytes] | str:
        """Each frame in ``syntax``, verified as the request asks, padded to even length; or
        what went wrong when a frame does not decode back as required."""
        request = self.request
        encoded: list[bytes] = []
        for values in pixels.frames:
            pattern = np.ascontiguousarray(to_pattern(values, image.bits) if image.signed else values)
            data = syntax.encode(pattern, image, request.params)
            self.lap("encode")
            verify = request.verify if request.verify is not None else not syntax.lossy
            if verify or request.max_error is not None:
                mismatch = self.check(syntax, data, pattern, image)
                self.lap("verify")
                if mismatch:
                    return _Mismatch(mismatch)
            encoded.append(data if len(data) % 2 == 0 else data + b"\x00")
        return encoded

    def encode(self, syntax: Syntax, pixels: Pixels, image: ImageInfo, prefix: str) -> Transcoded:
        params = self.request.params
        self.lap("decode")
        encoded = self.encode_frames(syntax, pixels, image)
        if isinstance(encoded, str):
            return self.unchanged(f"{prefix}{encoded}: forwarded as received", Reason.VERIFY_MISMATCH)
        raw_bytes = image.rows * image.columns * image.samples_per_pixel * image.frames * image.bits_allocated // 8
        ratio = raw_bytes / max(sum(len(f) for f in encoded), 1)
        uid = syntax.uid_for(image)
        ds = self.ds
        _set_encoded(ds, syntax, image, encoded)
        note = f"{prefix}{uid_name(self.ts)} -> {syntax.name} ({uid}), ratio {ratio:.2f}:1{_padding(pixels)}"
        if pixels.image.bits > image.bits_stored:
            note += f"; values above Bits Stored kept: coded at {image.bits} bits"
        if syntax.lossy:
            self.lossy_bookkeeping(syntax, ratio, params)
            note += "; lossy: new SOP Instance UID" if not self.request.keep_sop_instance_uid else "; lossy"
        elif self.lossy_input:
            ds.LossyImageCompression = "01"
        # lossless, one sample, same photometric and words: no element but Pixel Data changed
        self._splice = (not syntax.lossy and not self.lossy_input and self.ts == EXPLICIT_LE
                        and image.samples_per_pixel == 1 and ds.PhotometricInterpretation == self._photometric
                        and ds.BitsAllocated == image.bits_allocated and "ExtendedOffsetTable" not in ds
                        and 0x7FE00000 not in ds)  # a group length would still count the old pixels
        return self.finish(syntax, uid, ratio, note)

    def check(self, syntax: Syntax, data: bytes, pattern: np.ndarray, image: ImageInfo) -> str | None:
        """None when the frame decodes back as required, else what went wrong."""
        try:
            decoded = np.asarray(syntax.decode(data, image))
        except Exception as exc:
            if is_transient(exc):
                raise
            return f"{syntax.name} output does not decode ({exc})"
        if decoded.ndim == 3 and pattern.ndim == 2 and decoded.shape[-1] == 1:
            decoded = decoded[..., 0]
        if decoded.shape != pattern.shape:
            return f"{syntax.name} output decodes to shape {decoded.shape}, expected {pattern.shape}"
        tolerance = self.request.max_error
        if tolerance is None and syntax.lossy:
            tolerance = syntax.promised_error(self.request.params)
        if not syntax.lossy and tolerance is None:
            if not np.array_equal(decoded, pattern):
                return f"{syntax.name} output decodes to different pixels"
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
            return f"{syntax.name} error {error} exceeds max_error {tolerance}"
        return None

    def lossy_bookkeeping(self, syntax: Syntax, ratio: float, params: Params) -> None:
        ds = self.ds
        ds.LossyImageCompression = "01"
        ratios = _values(ds.get("LossyImageCompressionRatio"))
        methods = _values(ds.get("LossyImageCompressionMethod"))
        ratios.append(_ds_str(ratio))
        methods.append(syntax.method or "")
        ds.LossyImageCompressionRatio = ratios if len(ratios) > 1 else ratios[0]
        ds.LossyImageCompressionMethod = methods if len(methods) > 1 else methods[0]
        image_type = _values(ds.get("ImageType"))
        if image_type:
            image_type[0] = "DERIVED"
        else:
            image_type = ["DERIVED", "SECONDARY"]
        ds.ImageType = image_type if len(image_type) > 1 else image_type[0]
        setting = syntax.describe(params)
        setting = f" {setting}" if setting else ""
        text = f"Lossy compression {syntax.title} ({syntax.method}){setting}, compression ratio {ratio:.2f}:1"
        old = str(ds.get("DerivationDescription", "") or "").strip()
        ds.DerivationDescription = (f"{old}; {text}" if old else text)[:1024]
        if not self.request.keep_sop_instance_uid:
            source = Dataset()
            source.ReferencedSOPClassUID = ds.SOPClassUID
            source.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            purpose = Dataset()
            purpose.CodeValue = "121320"
            purpose.CodingSchemeDesignator = "DCM"
            purpose.CodeMeaning = "Uncompressed predecessor"
            source.PurposeOfReferenceCodeSequence = Sequence([purpose])
            existing = list(ds.get("SourceImageSequence", []) or [])
            ds.SourceImageSequence = Sequence(existing + [source])
            ds.SOPInstanceUID = generate_uid()

    def rewrite_native(self, syntax: Syntax, pixels: Pixels | None, note: str) -> Transcoded:
        self.lap("decode")
        ds = self.ds
        if pixels is not None:
            _set_native(ds, pixels)
            if self.lossy_input:
                ds.LossyImageCompression = "01"
        elif "PixelData" in ds and self.ts == EXPLICIT_BE:
            raise TranscodeError(f"{self.src}: big endian pixel data could not be decoded")
        return self.finish(syntax, syntax.uid, None, note)

    def repacked(self, ds: Dataset, syntax: Syntax) -> tuple[list[bytes], int] | str:
        """Each frame of the Pixel Data of ``ds`` re-packed by ``syntax``, padded to even length,
        and the size of the codestreams it was given; or why not (a `_Mismatch` when the
        output does not give back the codestream)."""
        source, packed = 0, []
        frames = pixeldata.geometry(ds).frames
        for codestream in generate_frames(ds.PixelData, number_of_frames=frames):
            source += len(codestream)
            codestream = _without_padding(codestream)
            try:
                data = syntax.repack(codestream)
            except Exception as exc:
                if is_transient(exc):
                    raise
                return f"{syntax.name} cannot re-pack this codestream ({exc})"
            verify = self.request.verify if self.request.verify is not None else True
            if verify and syntax.unpack(data) != codestream:
                return _Mismatch(f"{syntax.name} does not give back the codestream")
            packed.append(data if len(data) % 2 == 0 else data + b"\x00")
        return packed, source

    def repack(self, syntax: Syntax, prefix: str) -> Transcoded | str:
        """Each frame's codestream re-packed by ``syntax`` as it is: no pixel is decoded."""
        source_name = uid_name(str(syntax.repacks))
        if self.ts != syntax.repacks:
            return f"{syntax.name} only re-packs {source_name} input, not {uid_name(self.ts)}"
        ds = self.ds
        done = self.repacked(ds, syntax)
        if isinstance(done, _Mismatch):
            return self.unchanged(f"{prefix}{done}: forwarded as received", Reason.VERIFY_MISMATCH)
        if isinstance(done, str):
            return done
        packed, source = done
        ratio = source / max(sum(len(p) for p in packed), 1)
        self.lap("encode")
        _set_encapsulated(ds, packed)
        ds.LossyImageCompression = "01"
        return self.finish(syntax, syntax.uid, ratio,
                           f"{prefix}{source_name} re-packed as {syntax.name}, {ratio:.2f}:1 smaller than the input")

    def finish(self, syntax: Syntax, uid: str, ratio: float | None, note: str) -> Transcoded:
        """The main image done: the nested ones made valid in ``uid``, the file written."""
        note += self.nested(syntax, uid)
        self.write(uid)
        return self.written(syntax, uid, ratio, note)

    # -- nested Pixel Data

    def nested(self, syntax: Syntax, uid: str) -> str:
        """Make every nested Pixel Data (icons) valid in ``uid``, written by ``syntax``: native in
        a native syntax, encoded like the main image otherwise; a sequence whose image no codec
        of ``syntax`` can carry is dropped (an Icon Image Sequence is Type 3). What was done,
        for the note."""
        converted: dict[tuple[int, int], str] = {}
        drop: dict[tuple[int, int], tuple[Dataset, int, str]] = {}
        for owner, tag, item in list(pixeldata.nested(self.ds)):
            key = (id(owner), tag)
            if key in drop:
                continue
            outcome = self.nested_one(item, syntax, uid)
            if outcome == _KEPT:
                continue
            self._nested_changed = True
            if outcome == _CONVERTED:
                converted[key] = _element_name(tag)
            else:
                drop[key] = (owner, tag, outcome)
        words = []
        for owner, tag, why in drop.values():
            del owner[tag]
            words.append(f"{_element_name(tag)} dropped: {why}")
        names = sorted({name for key, name in converted.items() if key not in drop})
        if names:
            how = "written native" if not syntax.encapsulated else f"re-encoded in {syntax.name}"
            words.append(f"nested Pixel Data {how} ({', '.join(names)})")
        return "".join(f"; {w}" for w in words)

    def nested_one(self, item: Dataset, syntax: Syntax, uid: str) -> str:
        """_KEPT, _CONVERTED, or why the sequence holding ``item`` must be dropped."""
        source = self.nested_syntax(item)
        encapsulated = pixeldata.is_encapsulated(item)
        if not syntax.encapsulated and not encapsulated and source != EXPLICIT_BE:
            return _KEPT
        if syntax.repacks is not None:
            if not encapsulated or source != syntax.repacks:
                return f"{syntax.name} only re-packs {uid_name(syntax.repacks)}, not {uid_name(source)}"
            done = self.repacked(item, syntax)
            if isinstance(done, str):
                return done
            _set_encapsulated(item, done[0])
            return _CONVERTED
        pixels = pixeldata.decode(item, source)
        if pixels is None:
            return f"{item.get('BitsAllocated')}-bit allocated pixels are not decoded"
        if not syntax.encapsulated:
            _set_native(item, pixels)
            return _CONVERTED
        pixels, image = _for_syntax(syntax, pixels)
        reason = syntax.cannot_carry(image, self.request.params)
        if reason:
            return reason
        if not syntax.valid_in(image, uid):
            return f"{syntax.name} codes it as {uid_name(syntax.uid_for(image))}, not {uid_name(uid)}"
        encoded = self.encode_frames(syntax, pixels, image)
        if isinstance(encoded, str):
            return encoded
        _set_encoded(item, syntax, image, encoded)
        return _CONVERTED

    # -- the file

    def write(self, uid: str) -> None:
        ds = self.ds
        self.check_pixel_data()  # also gives every element one VR
        if self.ts == EXPLICIT_BE:
            swap_other_words_to_little_endian(ds)
        meta = ds.file_meta
        meta.TransferSyntaxUID = uid
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.preamble = ds.preamble if getattr(ds, "preamble", None) else b"\x00" * 128
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        # the input's bytes around the new Pixel Data, unless something else changed
        if self._splice and not self._nested_changed and self._write_spliced():
            return
        if 0x7FE00000 in ds:  # a retired group length that would still count the old pixels
            del ds[0x7FE00000]
        if self.ts == EXPLICIT_BE:
            # pydicom only re-encodes big endian on request; OW values were swapped above
            dcmwrite(self.dst, ds, implicit_vr=uid == IMPLICIT_LE, little_endian=True, force_encoding=True)
        else:
            dcmwrite(self.dst, ds, implicit_vr=uid == IMPLICIT_LE, little_endian=True, enforce_file_format=True)


    def _write_spliced(self) -> bool:
        """Write the output as the input's bytes with new file meta and new Pixel Data; False
        when the input's layout is not the plain one this needs (then pydicom writes it).

        Explicit VR Little Endian in and out, and no data element but Pixel Data changed: the
        elements are copied as they were received instead of being re-encoded one by one.
        """
        if self._raw_pixels is None:
            return False
        data = self.src.read_bytes()
        # preamble, DICM, then (0002,0000) UL 4 <group length>: the data set follows the group
        if data[128:132] != b"DICM" or data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
            return False
        start = 144 + int.from_bytes(data[140:144], "little")
        value_at, length = self._raw_pixels
        head = value_at - 12
        if (head < start or data[head:head + 4] != b"\xe0\x7f\x10\x00" or data[head + 4:head + 6] not in (b"OW", b"OB")
                or data[head + 6:head + 8] != b"\x00\x00" or int.from_bytes(data[head + 8:head + 12], "little") != length
                or value_at + length > len(data)):
            return False
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, self.ds.file_meta, enforce_standard=True)
        pixels = self.ds.PixelData
        with open(self.dst, "wb") as out:
            out.write(data[:128])
            out.write(b"DICM")
            out.write(meta.getvalue())
            out.write(memoryview(data)[start:head])
            out.write(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
            out.write(pixels)
            out.write(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
            out.write(memoryview(data)[value_at + length:])
        return True


# ---------------------------------------------------------------- decoding


def decoded_frames(ds: Dataset) -> tuple[list[np.ndarray], ImageInfo] | None:
    """The frames of ``ds`` as the transcoder hands them to an encoder (signed values when the
    pixels are signed), and what a codec needs to know of them; None for pixels no codec
    takes (1-bit). Raises TranscodeError when the pixels cannot be decoded."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ts = str(meta.get("TransferSyntaxUID", "") or _guess_ts(ds))
    try:
        pixeldata.check(ds, ts not in NATIVE_TRANSFER_SYNTAXES)
        pixels = pixeldata.decode(ds, ts)
    except PixelDataError as exc:
        raise TranscodeError(str(exc)) from exc
    return None if pixels is None else (pixels.frames, pixels.image)


def _for_syntax(syntax: Syntax, pixels: Pixels) -> tuple[Pixels, ImageInfo]:
    """``pixels`` as ``syntax`` takes them, and what it codes: the precision it codes at; lossy
    syntaxes take YBR_FULL as RGB."""
    image = syntax.coded(pixels.image)
    if syntax.lossy and image.photometric == "YBR_FULL":
        pixels = _ybr_to_rgb(pixels)
        image = pixels.image
    return pixels, image


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


def _ybr_to_rgb(pixels: Pixels) -> Pixels:
    from pydicom.pixels import convert_color_space

    frames = [convert_color_space(f, "YBR_FULL", "RGB") for f in pixels.frames]
    return replace(pixels, frames=frames, image=replace(pixels.image, photometric="RGB"))


# ---------------------------------------------------------------- writing helpers


def _set_native(ds: Dataset, pixels: Pixels) -> None:
    """``pixels`` as the native Pixel Data of ``ds``, little endian, with what describes them."""
    image = pixels.image
    dtype = np.dtype(f"<{'i' if image.signed else 'u'}{image.bits_allocated // 8}")
    data = b"".join(np.ascontiguousarray(f, dtype=dtype).tobytes() for f in pixels.frames)
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    elem = ds["PixelData"]
    elem.VR = "OW" if image.bits_allocated > 8 else "OB"
    elem.is_undefined_length = False
    ds.PhotometricInterpretation = image.photometric
    if image.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]


def _set_encoded(ds: Dataset, syntax: Syntax, image: ImageInfo, fragments: list[bytes]) -> None:
    """``fragments`` (one frame each, coded by ``syntax``) as the Pixel Data of ``ds``, with the
    Image Pixel attributes the codestreams have."""
    _set_encapsulated(ds, fragments)
    ds.PhotometricInterpretation = syntax.photometric_for(image)
    if image.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    bits_allocated = syntax.bits_allocated_for(image)
    if bits_allocated != image.bits_allocated:
        stored = min(image.bits_stored, bits_allocated)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, stored, stored - 1


def _element_name(tag: int) -> str:
    """The tag and name of a data element, as in "(0088,0200) Icon Image Sequence"."""
    try:
        name = dictionary_description(tag)
    except KeyError:
        name = "private sequence"
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {name}"


def _set_encapsulated(ds: Dataset, fragments: list[bytes]) -> None:
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    total = sum(len(f) + 8 for f in fragments)
    if total > _BOT_LIMIT:
        data, offsets, lengths = encapsulate_extended(fragments)
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    else:
        ds.PixelData = encapsulate(fragments, has_bot=True)
    elem = ds["PixelData"]
    elem.VR = "OB"
    elem.is_undefined_length = True


def _without_padding(fragment: bytes) -> bytes:
    """The codestream in a frame's fragment, without the padding after it: JPEG, JPEG-LS and
    JPEG 2000 codestreams all end with the marker FFD9 (EOI / EOC)."""
    end = fragment.rfind(b"\xff\xd9")
    return fragment[: end + 2] if end >= 0 else fragment


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]  # type: ignore[union-attr]
    return [str(value)]


def _ds_str(ratio: float) -> str:
    return f"{ratio:.2f}" if ratio < 1e10 else f"{ratio:.6g}"


def _guess_ts(ds: Dataset) -> str:
    if ds.is_little_endian is False:
        return EXPLICIT_BE
    return IMPLICIT_LE if ds.is_implicit_VR else EXPLICIT_LE
