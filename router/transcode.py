"""Re-encode one DICOM file in an outbound transfer syntax.

``transcode_file`` is a pure function of its (picklable) arguments, run in the
worker processes of a pool: a native codec that crashes takes a worker down,
not the router.  It never raises for an image a syntax cannot carry (the
``Transcoded`` result says so and carries the fallback or the original); it
raises ``TranscodeError`` only when the input's pixels cannot be decoded.

This module plans (which syntax, which fallback) and writes (bookkeeping, encapsulation);
what each syntax can carry, takes and writes is declared in `router.codecs.registry`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
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
from router.codecs.frames import to_pattern, to_signed
from router.compat.pydicom import swap_other_words_to_little_endian, teach_jpeg_xl
from router.dicomfile import read_header
from router.request import ORIGINAL, Params, Reason, Request, fallback

__all__ = ["Transcoded", "TranscodeError", "transcode_file", "decoded_frames"]

teach_jpeg_xl()  # the output may be in a JPEG XL syntax pydicom 3.0 does not know

# Offsets in a Basic Offset Table are 32-bit
_BOT_LIMIT = 2**32 - 1


class TranscodeError(ValueError):
    """The input's pixels cannot be decoded (corrupt codestream, data too short)."""


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


@dataclass
class _Pixels:
    """Decoded pixels: signed values when signed, unsigned otherwise."""

    frames: list[np.ndarray]
    image: ImageInfo


# ---------------------------------------------------------------- entry point


def transcode_file(src: Path, dst: Path, request: Request, checked: bool = False) -> Transcoded:
    """Write ``src`` to ``dst`` in ``request.syntax``, or say why it was left alone.

    When the result has ``changed=False`` nothing was written and ``path`` is
    ``src``: send the original.  Lossy output follows PS3.3 C.7.6.1.1.5 (2110,
    2112, 2114, DERIVED, new SOP Instance UID).  Raises ``TranscodeError`` when
    the input's pixels cannot be decoded and ``KeyError`` for an unknown syntax.
    ``checked``: the file already passed ``dicomfile.read_header`` (the router's spool).
    """
    start = time.perf_counter()
    cpu_start = time.thread_time()
    src, dst = Path(src), Path(dst)
    target = codecs.get(request.syntax)
    try:
        if not checked:  # the receiver has already checked what it accepted
            read_header(src)  # refuses declared lengths the file cannot hold before anything is allocated
        ds = pydicom.dcmread(src)
    except Exception as exc:
        raise TranscodeError(f"{src}: not readable as DICOM: {exc}") from exc
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        raise TranscodeError(f"{src}: not a DICOM instance (no SOP Class / Instance UID)")
    transcoding = _Transcoding(src, dst, request, ds, start, cpu_start)
    try:
        return transcoding.run(target)
    except TranscodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a value pydicom cannot decode or encode
        raise TranscodeError(f"{src}: cannot transcode to {target.name}: {type(exc).__name__}: {exc}") from exc


class _Transcoding:
    """One call of `transcode_file`: the input data set, the request, the CPU laps."""

    def __init__(self, src: Path, dst: Path, request: Request, ds: Dataset, start: float, cpu_start: float) -> None:
        self.src, self.dst, self.request, self.ds, self.start = src, dst, request, ds, start
        self.cpu: dict[str, float] = {}
        self._clock = cpu_start
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta = meta
        self.ts = str(meta.get("TransferSyntaxUID", "") or _guess_ts(ds))
        self.sop = str(ds.get("SOPInstanceUID", ""))
        self.lossy_input = is_lossy_input(self.ts, ds.get("LossyImageCompression"))
        self._pixels: _Pixels | None = None
        # where the input's native Pixel Data value lies, while it is still raw: when only the
        # pixels change, the output is the input's own bytes around new Pixel Data (_write_spliced)
        raw = ds.get_item(0x7FE00010) if 0x7FE00010 in ds else None
        self._raw_pixels = ((raw.value_tell, raw.length) if isinstance(raw, RawDataElement)
                            and raw.length != 0xFFFFFFFF else None)
        self._photometric = str(ds.get("PhotometricInterpretation", ""))
        self._splice = False

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
                else f"received in lossy {_ts_name(ts)}"
            )
            return self.unchanged(f"{prefix}already lossy ({why}): forwarded as received")
        if ts in syntax.uids:
            return self.unchanged(f"{prefix}already in {syntax.name} ({ts}): forwarded as received")
        if "PixelData" not in ds:
            if not syntax.encapsulated:
                return self.rewrite_native(syntax, None, prefix + "no pixel data: dataset re-encoded")
            return self.unchanged(f"{prefix}no pixel data (float pixels, document or non-image): forwarded as received")
        if ts in VIDEO_TRANSFER_SYNTAXES:
            return self.unchanged(f"{prefix}video ({_ts_name(ts)}) is never transcoded: forwarded as received")
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
            return self.rewrite_native(syntax, pixels, prefix + f"decompressed from {_ts_name(ts)}")
        image = pixels.image
        image = syntax.coded(image)
        if syntax.lossy and image.photometric == "YBR_FULL":
            pixels = _ybr_to_rgb(pixels)
            image = pixels.image
        reason = syntax.cannot_carry(image, self.request.params)
        if reason:
            return reason
        return self.encode(syntax, pixels, image, prefix)

    # -- pixels

    def pixels(self) -> _Pixels | None:
        if self._pixels is None:
            self._pixels = _decode(self.ds, self.ts)
        return self._pixels

    # -- writers

    def encode(self, syntax: Syntax, pixels: _Pixels, image: ImageInfo, prefix: str) -> Transcoded:
        request = self.request
        params = request.params
        bits = image.bits
        encoded: list[bytes] = []
        self.lap("decode")
        for values in pixels.frames:
            pattern = np.ascontiguousarray(to_pattern(values, bits) if image.signed else values)
            data = syntax.encode(pattern, image, params)
            self.lap("encode")
            verify = request.verify if request.verify is not None else not syntax.lossy
            if verify or request.max_error is not None:
                mismatch = self.check(syntax, data, pattern, image)
                self.lap("verify")
                if mismatch:
                    return self.unchanged(f"{prefix}{mismatch}: forwarded as received", Reason.VERIFY_MISMATCH)
            encoded.append(data if len(data) % 2 == 0 else data + b"\x00")
        raw_bytes = image.rows * image.columns * image.samples_per_pixel * image.frames * image.bits_allocated // 8
        ratio = raw_bytes / max(sum(len(f) for f in encoded), 1)
        uid = syntax.uid_for(image)
        ds = self.ds
        _set_encapsulated(ds, encoded)
        photometric = syntax.photometric_for(image)
        ds.PhotometricInterpretation = photometric
        if image.samples_per_pixel > 1:
            ds.PlanarConfiguration = 0
        bits_allocated = syntax.bits_allocated_for(image)
        if bits_allocated != image.bits_allocated:
            stored = min(image.bits_stored, bits_allocated)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, stored, stored - 1
        note = f"{prefix}{_ts_name(self.ts)} -> {syntax.name} ({uid}), ratio {ratio:.2f}:1"
        if pixels.image.bits > image.bits_stored:
            note += f"; values above Bits Stored kept: coded at {image.bits} bits"
        if syntax.lossy:
            self.lossy_bookkeeping(syntax, ratio, params)
            note += "; lossy: new SOP Instance UID" if not request.keep_sop_instance_uid else "; lossy"
        elif self.lossy_input:
            ds.LossyImageCompression = "01"
        # lossless, one sample, same photometric and words: no element but Pixel Data changed
        self._splice = (not syntax.lossy and not self.lossy_input and self.ts == EXPLICIT_LE
                        and image.samples_per_pixel == 1 and photometric == self._photometric
                        and bits_allocated == image.bits_allocated and "ExtendedOffsetTable" not in ds
                        and 0x7FE00000 not in ds)  # a group length would still count the old pixels
        self.write(uid)
        return self.written(syntax, uid, ratio, note)

    def check(self, syntax: Syntax, data: bytes, pattern: np.ndarray, image: ImageInfo) -> str | None:
        """None when the frame decodes back as required, else what went wrong."""
        try:
            decoded = np.asarray(syntax.decode(data, image))
        except Exception as exc:
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

    def rewrite_native(self, syntax: Syntax, pixels: _Pixels | None, note: str) -> Transcoded:
        self.lap("decode")
        ds = self.ds
        if pixels is not None:
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
            if self.lossy_input:
                ds.LossyImageCompression = "01"
        elif "PixelData" in ds and self.ts == EXPLICIT_BE:
            raise TranscodeError(f"{self.src}: big endian pixel data could not be decoded")
        self.write(syntax.uid)
        return self.written(syntax, syntax.uid, None, note)

    def repack(self, syntax: Syntax, prefix: str) -> Transcoded | str:
        """Each frame's codestream re-packed by ``syntax`` as it is: no pixel is decoded."""
        source_name = _ts_name(str(syntax.repacks))
        if self.ts != syntax.repacks:
            return f"{syntax.name} only re-packs {source_name} input, not {_ts_name(self.ts)}"
        ds = self.ds
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        source = list(generate_frames(ds.PixelData, number_of_frames=frames))
        packed = []
        for codestream in source:
            codestream = _without_padding(codestream)
            try:
                data = syntax.repack(codestream)
            except Exception as exc:
                return f"{syntax.name} cannot re-pack this codestream ({exc})"
            verify = self.request.verify if self.request.verify is not None else True
            if verify and syntax.unpack(data) != codestream:
                return self.unchanged(f"{prefix}{syntax.name} does not give back the codestream: forwarded as received",
                                      Reason.VERIFY_MISMATCH)
            packed.append(data if len(data) % 2 == 0 else data + b"\x00")
        ratio = sum(len(j) for j in source) / max(sum(len(p) for p in packed), 1)
        self.lap("encode")
        _set_encapsulated(ds, packed)
        ds.LossyImageCompression = "01"
        self.write(syntax.uid)
        return self.written(syntax, syntax.uid, ratio,
                            f"{prefix}{source_name} re-packed as {syntax.name}, {ratio:.2f}:1 smaller than the input")

    def write(self, uid: str) -> None:
        ds = self.ds
        if self.ts == EXPLICIT_BE:
            swap_other_words_to_little_endian(ds)
        meta = ds.file_meta
        meta.TransferSyntaxUID = uid
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.preamble = ds.preamble if getattr(ds, "preamble", None) else b"\x00" * 128
        # when the VR encoding changes, elements still raw from the input get their VR now: a file
        # that declares explicit VR but is encoded implicit (it happens) would otherwise fail
        if uid != IMPLICIT_LE and any(getattr(e, "VR", "") is None for e in ds._dict.values()):
            for _ in ds.iterall():
                pass
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        if self._splice and self._write_spliced():
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
    pixels = _decode(ds, str(meta.get("TransferSyntaxUID", "") or _guess_ts(ds)))
    return None if pixels is None else (pixels.frames, pixels.image)


def _decode(ds: Dataset, ts: str) -> _Pixels | None:
    """Decoded pixels, or None when they are not something a codec can take (1-bit)."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    ba = int(ds.BitsAllocated)
    bs = int(ds.get("BitsStored", ba) or ba)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if ba not in (8, 16, 32):
        return None
    try:
        if ts in NATIVE_TRANSFER_SYNTAXES and ts != EXPLICIT_BE and pi not in ("YBR_FULL_422", "YBR_PARTIAL_422"):
            frames = _native_frames(ds, rows, columns, spp, ba, nframes)
        else:
            frames, pi = _pydicom_frames(ds, ts, pi)
    except TranscodeError:
        raise
    except Exception as exc:
        raise TranscodeError(f"pixel data cannot be decoded ({_ts_name(ts)}): {exc}") from exc
    if len(frames) != nframes:
        raise TranscodeError(f"pixel data holds {len(frames)} frames, Number of Frames says {nframes}")
    precision, frames, lo, hi = _fit(frames, ba, bs, signed)
    image = ImageInfo(
        rows=rows,
        columns=columns,
        samples_per_pixel=spp,
        bits_allocated=ba,
        bits_stored=bs,
        signed=signed,
        photometric=pi,
        frames=nframes,
        precision=precision,
        minimum=lo,
        maximum=hi,
    )
    return _Pixels(frames, image)


def _native_frames(ds: Dataset, rows: int, columns: int, spp: int, ba: int, nframes: int) -> list[np.ndarray]:
    # Read the stored bits ourselves: pydicom masks bits above Bits Stored,
    # and those bits (old overlays) must survive a lossless transcode.
    raw = ds.PixelData
    count = rows * columns * spp * nframes
    need = count * ba // 8
    if len(raw) < need:
        raise TranscodeError(f"pixel data too short: {len(raw)} bytes, {need} expected")
    arr = np.frombuffer(raw, dtype=np.dtype(f"<u{ba // 8}"), count=count)
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    if spp == 1:
        arr = arr.reshape(nframes, rows, columns)
    elif planar == 1:
        arr = np.moveaxis(arr.reshape(nframes, spp, rows, columns), 1, -1)
    else:
        arr = arr.reshape(nframes, rows, columns, spp)
    return [np.ascontiguousarray(f) for f in arr]


def _pydicom_frames(ds: Dataset, ts: str, pi: str) -> tuple[list[np.ndarray], str]:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return _registry_frames(ds, ts, pi)
    # Subsampled YBR decodes to RGB; other colour data stays as stored, so a
    # lossless transcode keeps the exact sample values
    as_rgb = pi in ("YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420")
    frames, out_pi = [], pi
    for arr, meta in decoder.iter_array(ds, as_rgb=as_rgb):
        frames.append(np.ascontiguousarray(arr))
        out_pi = str(meta.get("photometric_interpretation", out_pi))
    if out_pi in ("YBR_RCT", "YBR_ICT"):
        out_pi = "RGB"
    return frames, out_pi


def _registry_frames(ds: Dataset, ts: str, pi: str) -> tuple[list[np.ndarray], str]:
    """Frames of a syntax pydicom cannot decode (JPEG XL) through our own decoder."""
    syntax = codecs.get(ts)
    if syntax.decoder is None:
        raise TranscodeError(f"no decoder for {_ts_name(ts)}")
    image = ImageInfo(
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        bits_allocated=int(ds.BitsAllocated),
        bits_stored=int(ds.get("BitsStored", ds.BitsAllocated)),
        signed=False,
        photometric=pi,
    )
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    frames = [np.asarray(syntax.decode(f, image)) for f in generate_frames(ds.PixelData, number_of_frames=nframes)]
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


def _ybr_to_rgb(pixels: _Pixels) -> _Pixels:
    from pydicom.pixels import convert_color_space

    frames = [convert_color_space(f, "YBR_FULL", "RGB") for f in pixels.frames]
    return _Pixels(frames, replace(pixels.image, photometric="RGB"))


# ---------------------------------------------------------------- writing helpers


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


def _ts_name(ts: str) -> str:
    try:
        name = pydicom.uid.UID(ts).name
    except Exception:
        name = ts
    return name if name and name != ts else ts or "unknown syntax"


def _guess_ts(ds: Dataset) -> str:
    if ds.is_little_endian is False:
        return EXPLICIT_BE
    return IMPLICIT_LE if ds.is_implicit_VR else EXPLICIT_LE
