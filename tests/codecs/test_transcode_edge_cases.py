"""Edge cases of real files the transcoder must handle as a class, not file by file: nested Pixel
Data (icons), ambiguous VRs from Implicit VR input, frames of another size than the header says,
Pixel Data that disagrees with its header, and headers that declare far more pixels than the file
holds. And the contract: TranscodeError means "this input, always"; anything else may pass."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence

from router import codecs
from router.codecs import registry
from router.codecs.codestream import Declared, declared
from router.request import Request
from router.codecs.transcode import Transcoded, TranscodeError, UnknownSyntax, transcode_file
from tests.support import transcode_images as img
from tests.support.peers import REPO

pytestmark = pytest.mark.skipif(not img.CT.exists(), reason="pydicom-data is not installed")

NATIVE_OUTPUTS = ["explicit-le", "implicit-le", "deflated"]
ENCAPSULATED_OUTPUTS = ["rle", "jpeg-lossless", "jpeg-ls-lossless", "j2k-lossless", "htj2k-lossless",
                        "jpegxl-lossless", "jpeg-lossy", "jpeg-ls-near-lossless", "j2k"]


def run(src: Path, tmp_path: Path, syntax: str, **kw) -> Transcoded:
    return transcode_file(src, tmp_path / f"out-{syntax}.dcm", Request(syntax, **kw))


# ---------------------------------------------------------------- nested Pixel Data


def _assert_icon_valid_in_its_file(path: Path, original: np.ndarray, lossy: bool) -> None:
    ds = pydicom.dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    icon = ds.IconImageSequence[0]
    assert icon["PixelData"].is_undefined_length == ts.is_compressed, f"icon left in another encoding in {ts.name}"
    got = img.icon_pixels(ds)
    if lossy:
        assert np.abs(got.astype(int) - original).mean() < 3
    else:
        assert np.array_equal(got, original)


@pytest.mark.parametrize("output", NATIVE_OUTPUTS + ENCAPSULATED_OUTPUTS)
@pytest.mark.parametrize("received", list(img.ICON_SYNTAXES))
def test_every_nested_pixel_data_is_valid_in_the_output_syntax(tmp_path, received, output):
    src = img.mammogram_with_icon(tmp_path, received)
    icon = img.icon_pixels(pydicom.dcmread(src))
    outcome = run(src, tmp_path, output)
    if received == output:
        assert not outcome.changed
        return
    assert outcome.changed, outcome.note
    _assert_icon_valid_in_its_file(outcome.path, icon, codecs.get(output).lossy)
    assert "(0088,0200) Icon Image Sequence" in outcome.note or output in NATIVE_OUTPUTS and received == "explicit-le"
    # and the main image is what it was (pydicom 3.0 decodes no JPEG XL)
    if not codecs.get(output).lossy and output != "jpegxl-lossless":
        assert np.array_equal(img.pixels(outcome.path), img.pixels(src))


def test_a_native_icon_in_a_jpeg_lossless_file_goes_out_encapsulated_too(tmp_path):
    src = img.mammogram_with_icon(tmp_path, "jpeg-lossless", icon_syntax="explicit-le")
    icon = img.icon_pixels(pydicom.dcmread(src))
    for output in ("jpeg-ls-lossless", "rle", "implicit-le"):
        _assert_icon_valid_in_its_file(run(src, tmp_path, output).path, icon, lossy=False)


def test_a_lossless_output_of_a_native_file_with_an_icon_is_not_spliced(tmp_path):
    # Explicit VR LE in, lossless out, one sample: the case written as the input's own bytes
    # around new Pixel Data; the icon changes too, so it must be written element by element
    src = img.mammogram_with_icon(tmp_path, "explicit-le")
    outcome = run(src, tmp_path, "jpeg-ls-lossless")
    _assert_icon_valid_in_its_file(outcome.path, img.icon_pixels(pydicom.dcmread(src)), lossy=False)
    before, after = pydicom.dcmread(src), pydicom.dcmread(outcome.path)
    assert [e.tag for e in after] == [e.tag for e in before]


def test_pixel_data_nested_at_any_depth_is_converted(tmp_path):
    src = img.mammogram_with_icon(tmp_path, "jpeg-lossless")
    ds = pydicom.dcmread(src)
    icon = img.icon_pixels(ds)
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
    reference.IconImageSequence = Sequence([ds.IconImageSequence[0]])
    ds.ReferencedImageSequence = Sequence([reference])
    img.write(ds, tmp_path / "deep.dcm")
    outcome = run(tmp_path / "deep.dcm", tmp_path, "rle")
    out = pydicom.dcmread(outcome.path)
    deep = out.ReferencedImageSequence[0].IconImageSequence[0]
    assert deep["PixelData"].is_undefined_length
    from pydicom.pixels import get_decoder

    assert np.array_equal(get_decoder(codecs.RLE).as_array(deep)[0], icon)
    _assert_icon_valid_in_its_file(outcome.path, icon, lossy=False)


def test_an_icon_the_output_codec_cannot_carry_is_dropped_and_said(tmp_path):
    src = img.mammogram_with_icon(tmp_path, "jpeg-ls-lossless", icon_syntax="explicit-le")
    ds = pydicom.dcmread(src)
    icon = ds.IconImageSequence[0]
    words = (img.icon_of(ds.pixel_array).astype(np.uint16) << 8) | 0x00FF  # 16 bits stored
    icon.BitsAllocated, icon.BitsStored, icon.HighBit = 16, 16, 15
    icon.PixelData = words.tobytes()
    icon["PixelData"].VR = "OW"
    img.write(ds, tmp_path / "wide-icon.dcm")
    outcome = run(tmp_path / "wide-icon.dcm", tmp_path, "jpeg-lossy")
    assert outcome.changed
    assert "(0088,0200) Icon Image Sequence dropped: jpeg-lossy cannot carry 16-bit pixels" in outcome.note
    out = pydicom.dcmread(outcome.path)
    assert "IconImageSequence" not in out
    # a codec that can carry it keeps it
    kept = pydicom.dcmread(run(tmp_path / "wide-icon.dcm", tmp_path, "rle").path)
    assert np.array_equal(img.icon_pixels(kept), words)


def test_an_icon_in_a_syntax_other_than_the_main_images_is_dropped(tmp_path):
    # an 8-bit main image goes out in JPEG Baseline: a 12-bit icon would need JPEG Extended
    src = img.mammogram_with_icon(tmp_path, "explicit-le")
    ds = pydicom.dcmread(src)
    main = (ds.pixel_array >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = main.tobytes()
    icon = ds.IconImageSequence[0]
    icon.BitsAllocated, icon.BitsStored, icon.HighBit = 16, 12, 11
    icon.PixelData = (img.icon_of(pydicom.dcmread(src).pixel_array).astype(np.uint16) << 4).tobytes()
    img.write(ds, tmp_path / "eight-bit.dcm")
    outcome = run(tmp_path / "eight-bit.dcm", tmp_path, "jpeg-lossy")
    assert outcome.transfer_syntax_uid == codecs.JPEG_BASELINE
    assert "Icon Image Sequence dropped: jpeg-lossy codes it as JPEG Extended" in outcome.note
    assert "IconImageSequence" not in pydicom.dcmread(outcome.path)


def test_as_received_leaves_icons_alone(tmp_path):
    src = img.mammogram_with_icon(tmp_path, "jpeg-lossless")
    for syntax in ("original", "jpeg-lossless"):
        outcome = run(src, tmp_path, syntax)
        assert not outcome.changed and outcome.path == src


# ---------------------------------------------------------------- ambiguous VRs


EXPECTED_VRS = {  # as DCMTK writes them: OW for words, OB when unknown, US/SS by Pixel Representation
    0x50003000: "OW", 0x50023000: "OB", 0x00143050: "OB", 0x00280071: "SS", 0x00281200: "OW", 0x00283006: "OW",
}


@pytest.mark.parametrize("output", ["explicit-le", "deflated", "jpeg-ls-lossless", "rle", "j2k-lossless"])
def test_ambiguous_vrs_of_implicit_input_are_resolved_and_keep_their_bytes(tmp_path, output):
    src = img.curve_data_implicit(tmp_path)
    outcome = run(src, tmp_path, output)
    assert outcome.changed, outcome.note
    out = pydicom.dcmread(outcome.path)
    raw = pydicom.dcmread(src)
    for tag, vr in EXPECTED_VRS.items():
        assert out[tag].VR == vr, f"{tag:08X}"
    item = out.ReferencedImageSequence[0]
    assert (item[0x00280106].VR, item[0x50043000].VR) == ("SS", "OB")
    assert item[0x00280106].value == -2
    for tag in EXPECTED_VRS:
        written = out[tag].value
        assert (written if isinstance(written, bytes) else int(written).to_bytes(2, "little", signed=True)) \
            == raw.get_item(tag).value
    assert np.array_equal(out.pixel_array, raw.pixel_array)


@pytest.mark.interop
def test_dcmtk_reads_the_resolved_vrs(tmp_path):
    from tests.interop.conftest import PEER_ENV, require

    require("dcmdump", "dcmconv")
    outcome = run(img.curve_data_implicit(tmp_path), tmp_path, "explicit-le")
    dump = subprocess.run(["dcmdump", str(outcome.path)], capture_output=True, text=True, env=PEER_ENV, timeout=60)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    for line in ("(5000,3000) OW", "(5002,3000) OB", "(0014,3050) OB", "(0028,0071) SS", "(0028,1200) OW",
                 "(0028,3006) OW", "(0028,0106) SS", "(5004,3000) OB"):
        assert line in dump.stdout, line
    done = subprocess.run(["dcmconv", "+ti", str(outcome.path), str(tmp_path / "implicit.dcm")],
                          capture_output=True, text=True, env=PEER_ENV, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- frames of another size


def _tile_reference(src: Path) -> list[np.ndarray]:
    import imagecodecs

    ds = pydicom.dcmread(src)
    return [imagecodecs.jpeg8_decode(f) for f in generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))]


def test_frames_smaller_than_the_header_are_padded_with_zeros(tmp_path):
    tiles = [(64, 96), (64, 40), (30, 96), (30, 40)]
    src = img.tiled_jpeg(tmp_path, tiles)
    outcome = run(src, tmp_path, "explicit-le")
    assert outcome.changed, outcome.note
    assert "3 of 4 frames smaller than Rows x Columns, padded with 0" in outcome.note
    out = pydicom.dcmread(outcome.path)
    frames = out.pixel_array
    assert frames.shape == (4, 64, 96, 3) and out.PhotometricInterpretation == "RGB"
    for frame, reference, (rows, columns) in zip(frames, _tile_reference(src), tiles):
        # the tile at the top left, as another JPEG decoder sees it, and 0 on the right and below
        diff = np.abs(frame[:rows, :columns].astype(int) - reference)
        assert diff.mean() < 1 and diff.max() <= 40
        assert not frame[rows:].any() and not frame[:, columns:].any()


def test_a_frame_larger_than_the_header_is_refused(tmp_path):
    src = img.tiled_jpeg(tmp_path, [(64, 96), (64, 104)])
    larger = r"frame 2: its codestream declares 64 x 104 pixels, more than Rows x Columns \(64 x 96\)"
    with pytest.raises(TranscodeError, match=larger):
        run(src, tmp_path, "explicit-le")


@pytest.mark.interop
def test_padding_is_what_dcmtk_gives_for_a_tile_of_full_width(tmp_path):
    from tests.interop.conftest import PEER_ENV, require

    require("dcmdjpeg")
    src = img.tiled_jpeg(tmp_path, [(64, 96), (30, 96)])
    done = subprocess.run(["dcmdjpeg", str(src), str(tmp_path / "dcmtk.dcm")], capture_output=True, text=True,
                          env=PEER_ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = pydicom.dcmread(tmp_path / "dcmtk.dcm").pixel_array
    ours = img.pixels(run(src, tmp_path, "explicit-le").path)
    assert not theirs[1][30:].any() and not ours[1][30:].any()
    diff = np.abs(ours.astype(int) - theirs)  # IJG 6b and libjpeg differ in rounding
    assert diff.mean() < 1 and diff.max() <= 40


# ---------------------------------------------------------------- Pixel Data against its header


def _native_with(tmp_path: Path, extra: int) -> Path:
    ds = pydicom.dcmread(img.MR)
    data = ds.PixelData
    ds.PixelData = data + b"\x00" * extra if extra >= 0 else data[:extra]
    return img.write(ds, tmp_path / f"native{extra:+d}.dcm")


@pytest.mark.parametrize("extra", [2, 256, -2, -4096])
def test_native_pixel_data_of_another_length_than_the_header_is_refused(tmp_path, extra):
    src = _native_with(tmp_path, extra)
    expected = len(pydicom.dcmread(img.MR).PixelData)
    for syntax in ("jpeg-ls-lossless", "rle", "implicit-le"):
        with pytest.raises(TranscodeError, match=f"Pixel Data holds {expected + extra} bytes, the header declares "
                                                 f"{expected}"):
            run(src, tmp_path, syntax)


def test_one_pad_byte_after_an_odd_length_is_allowed(tmp_path):
    ds = pydicom.dcmread(img.MR)
    frame = ds.pixel_array[:15, :15].astype(np.uint8)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 15, 15, 8, 8, 7
    ds.PixelData = frame.tobytes() + b"\x00"  # 225 bytes and the pad byte
    src = img.write(ds, tmp_path / "odd.dcm")
    outcome = run(src, tmp_path, "jpeg-ls-lossless")
    assert outcome.changed and np.array_equal(img.pixels(outcome.path), frame)


def test_a_nested_pixel_data_that_disagrees_with_its_header_is_refused(tmp_path):
    src = img.mammogram_with_icon(tmp_path, "jpeg-lossless", icon_syntax="explicit-le")
    ds = pydicom.dcmread(src)
    ds.IconImageSequence[0].PixelData = ds.IconImageSequence[0].PixelData[:-64]
    img.write(ds, tmp_path / "short-icon.dcm")
    with pytest.raises(TranscodeError, match="nested Pixel Data holds 4032 bytes, the header declares 4096"):
        run(tmp_path / "short-icon.dcm", tmp_path, "rle")


def _frames_file(tmp_path: Path, codestreams: int, number_of_frames: int, bot: bool = True) -> Path:
    src = pydicom.dcmread(img.JLS_MF)
    frames = list(generate_frames(src.PixelData, number_of_frames=int(src.NumberOfFrames)))
    data = [frames[i % len(frames)] for i in range(codestreams)]
    src.PixelData = encapsulate(data, has_bot=bot)
    src.NumberOfFrames = number_of_frames
    return img.write(src, tmp_path / f"frames-{codestreams}-{number_of_frames}-{bot}.dcm")


@pytest.mark.parametrize("codestreams,frames,bot", [(10, 9, True), (10, 9, False), (8, 9, True), (8, 9, False),
                                                    (2, 1, False), (2, 1, True)])
def test_encapsulated_frames_other_than_number_of_frames_are_refused(tmp_path, codestreams, frames, bot):
    src = _frames_file(tmp_path, codestreams, frames, bot)
    for syntax in ("rle", "explicit-le", "htj2k-lossless"):
        with pytest.raises(TranscodeError, match=f"Number of Frames.*{frames}"):
            run(src, tmp_path, syntax)


# ---------------------------------------------------------------- decompression bombs


def test_declared_decoded_size_is_bounded_before_anything_is_decoded(tmp_path):
    src = img.jpeg_ls_frames(tmp_path, 40, (1024, 1024))  # a few KB declaring 40 MiB
    assert src.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(TranscodeError,
                           match="declares 41943040 bytes decoded .*more than one image may decode here: 1048576 bytes"):
            transcode_file(src, tmp_path / "out.dcm", Request("explicit-le"), max_decoded_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB allocated"
    # within the bound it goes through
    outcome = transcode_file(src, tmp_path / "out.dcm", Request("rle"), max_decoded_bytes=64 * 2**20)
    assert outcome.changed


def test_nested_pixel_data_counts_in_the_bound(tmp_path):
    src = img.mammogram_with_icon(tmp_path, "jpeg-lossless")
    main = 192 * 160 * 2
    with pytest.raises(TranscodeError, match=f"declares {main + 64 * 64} bytes"):
        transcode_file(src, tmp_path / "out.dcm", Request("rle"), max_decoded_bytes=main)
    assert transcode_file(src, tmp_path / "out.dcm", Request("rle"), max_decoded_bytes=main + 64 * 64).changed


_MEASURE = """
import resource, sys, warnings
warnings.simplefilter("ignore")
from router.request import Request
from router.codecs.transcode import TranscodeError, transcode_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    transcode_file(sys.argv[1], sys.argv[2], Request("explicit-le"))
    print("transcoded", end=" ")
except TranscodeError as exc:
    print("refused", end=" ")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_codestream_declaring_more_than_the_header_is_refused_before_decoding(tmp_path):
    # 64 x 64 in the header, 8192 x 8192 (64 MiB) in each codestream: refused before a decoder
    # allocates what the codestream declares
    src = img.jpeg_ls_frames(tmp_path, 4, (8192, 8192), header=(64, 64))
    with pytest.raises(TranscodeError, match="frame 1: its codestream declares 8192 x 8192 pixels"):
        run(src, tmp_path, "explicit-le")
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / "out.dcm")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    verdict, grown_kb = done.stdout.split()
    assert verdict == "refused"
    assert int(grown_kb) < 24 * 1024, f"peak RSS grew {int(grown_kb) // 1024} MiB"


# ---------------------------------------------------------------- codestream headers


@pytest.mark.parametrize("kind", ["jpeg", "jpeg-12", "jpeg-lossless", "jpeg-ls", "j2k", "jp2", "htj2k", "jpegxl"])
def test_the_size_a_codestream_declares_is_read_without_decoding(kind):
    import imagecodecs

    frame = np.random.default_rng(1).integers(0, 200, (37, 51, 3)).astype(np.uint8)
    gray = frame[..., 0].astype(np.uint16) << 4
    data = {
        "jpeg": lambda: imagecodecs.jpeg8_encode(frame),
        "jpeg-12": lambda: imagecodecs.jpeg8_encode(gray, bitspersample=12),
        "jpeg-lossless": lambda: imagecodecs.jpeg8_encode(gray, lossless=True, predictor=1, bitspersample=12),
        "jpeg-ls": lambda: imagecodecs.jpegls_encode(frame),
        "j2k": lambda: imagecodecs.jpeg2k_encode(frame, codecformat="J2K"),
        "jp2": lambda: imagecodecs.jpeg2k_encode(frame, codecformat="JP2"),
        "htj2k": lambda: imagecodecs.htj2k_encode(frame),
        "jpegxl": lambda: imagecodecs.jpegxl_encode(frame, lossless=True),
    }[kind]()
    components = None if kind == "jpegxl" else (1 if kind in ("jpeg-12", "jpeg-lossless") else 3)
    assert declared(bytes(data)) == Declared(37, 51, components)
    assert declared(b"\x02\x00\x00\x00" + b"\x00" * 60) is None  # RLE says nothing


# ---------------------------------------------------------------- what the exceptions mean


def test_writing_the_output_fails_with_oserror_not_transcode_error(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError) as raised:
        transcode_file(img.MR, tmp_path / "taken", Request("jpeg-ls-lossless"))
    assert not isinstance(raised.value, TranscodeError)


def test_running_out_of_memory_is_not_a_transcode_error(tmp_path, monkeypatch):
    def exhausted(data, image):
        raise MemoryError

    entry = codecs.get("jpeg-ls-lossless")
    from dataclasses import replace

    monkeypatch.setitem(registry._REGISTRY, "jpeg-ls-lossless", replace(entry, decoder=exhausted))
    with pytest.raises(MemoryError):
        run(img.MR, tmp_path, "jpeg-ls-lossless")


def test_a_codec_failing_on_the_data_is_a_transcode_error(tmp_path, monkeypatch):
    def refuses(frame, image, params):
        raise OSError("broken data stream")  # what Pillow raises for bad data: no errno

    entry = codecs.get("jpeg-ls-lossless")
    from dataclasses import replace

    monkeypatch.setitem(registry._REGISTRY, "jpeg-ls-lossless", replace(entry, encoder=refuses))
    with pytest.raises(TranscodeError, match="broken data stream"):
        run(img.MR, tmp_path, "jpeg-ls-lossless")


def test_an_unknown_syntax_is_a_transcode_error(tmp_path):
    with pytest.raises(UnknownSyntax, match="did you mean") as raised:
        run(img.MR, tmp_path, "jpeg-ls")
    assert isinstance(raised.value, TranscodeError) and isinstance(raised.value, KeyError)


def test_a_file_that_is_not_dicom_is_a_transcode_error_and_a_missing_one_is_not(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    with pytest.raises(TranscodeError):
        run(tmp_path / "junk.dcm", tmp_path, "rle")
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "gone.dcm", tmp_path, "rle")


def test_pixel_data_that_disagrees_with_its_header_is_refused_before_decoding(tmp_path):
    from router.codecs import pixeldata

    with pytest.raises(pixeldata.PixelDataError):
        pixeldata.check(pydicom.dcmread(_native_with(tmp_path, 256)), False)
    mr = pydicom.dcmread(img.MR)
    pixels = pixeldata.decode(mr, str(mr.file_meta.TransferSyntaxUID))
    assert len(pixels.frames) == 1 and (pixels.image.rows, pixels.image.columns) == pixels.frames[0].shape


def test_written_files_read_back_in_pydicom_without_warnings(tmp_path, recwarn):
    src = img.mammogram_with_icon(tmp_path, "jpeg-lossless")
    out = pydicom.dcmread(run(src, tmp_path, "jpeg-ls-lossless").path)
    out.pixel_array  # noqa: B018
    img.icon_pixels(out)
    assert not [w for w in recwarn if "pydicom" in str(w.filename)]
