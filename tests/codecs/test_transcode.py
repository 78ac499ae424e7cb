import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_fragments

from router import codecs
from router.codecs import registry
from router.request import Params, Reason, Request
from router.codecs.transcode import Transcoded, TranscodeError, transcode_file
from tests.support import transcode_images as img

pytestmark = pytest.mark.skipif(not img.CT.exists(), reason="pydicom-data is not installed")

LOSSLESS = ["rle", "jpeg-lossless", "jpeg-ls-lossless", "j2k-lossless", "htj2k-lossless"]


def run(src: Path, tmp_path: Path, syntax: str, **kw) -> Transcoded:
    return transcode_file(src, tmp_path / f"out-{syntax}.dcm", Request(syntax, **kw))


def read(outcome: Transcoded) -> pydicom.Dataset:
    return pydicom.dcmread(outcome.path)


def assert_same_pixels(outcome: Transcoded, src: Path) -> None:
    assert np.array_equal(img.pixels(outcome.path), img.pixels(src))


def max_error(outcome: Transcoded, src: Path) -> int:
    a = img.pixels(outcome.path).astype(np.int64)
    b = img.pixels(src).astype(np.int64)
    return int(np.abs(a - b).max())


# ---------------------------------------------------------------- lossless


@pytest.mark.parametrize("syntax", LOSSLESS)
@pytest.mark.parametrize("src", [img.CT, img.MR, img.US], ids=["ct-signed14", "mr12", "us-rgb"])
def test_lossless_syntaxes_give_back_the_same_pixels(tmp_path, src, syntax):
    outcome = run(src, tmp_path, syntax)
    assert outcome.changed, outcome.note
    assert outcome.syntax == syntax
    assert outcome.transfer_syntax_uid == codecs.get(syntax).uid
    assert outcome.ratio and outcome.ratio > 1.5
    assert outcome.fallback_reason is None
    assert_same_pixels(outcome, src)
    ds = read(outcome)
    assert ds.file_meta.TransferSyntaxUID == codecs.get(syntax).uid
    # lossless keeps the identity of the image
    assert ds.SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID == outcome.sop_instance_uid
    assert "LossyImageCompression" not in ds or ds.LossyImageCompression == "00"


def test_encapsulation_has_offset_table_even_fragments_and_ob(tmp_path):
    outcome = run(img.MULTIFRAME, tmp_path, "jpeg-ls-lossless")
    ds = read(outcome)
    assert ds["PixelData"].VR == "OB"
    assert ds["PixelData"].is_undefined_length
    from pydicom.encaps import generate_frames

    fragments = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert len(list(generate_fragments(ds.PixelData))) == int(ds.NumberOfFrames) + 1  # BOT item + one per frame
    assert all(len(f) % 2 == 0 for f in fragments)
    # first item is a Basic Offset Table with one offset per frame
    bot_length = int.from_bytes(ds.PixelData[4:8], "little")
    assert bot_length == 4 * int(ds.NumberOfFrames)
    assert_same_pixels(outcome, img.MULTIFRAME)
    raw = outcome.path.read_bytes()
    assert raw[128:132] == b"DICM"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("syntax", ["jpeg-ls-lossless", "jpeg-lossless", "j2k-lossless", "rle"])
def test_odd_rows_and_columns(tmp_path, syntax):
    src = img.odd_size(tmp_path)
    assert_same_pixels(run(src, tmp_path, syntax), src)


@pytest.mark.parametrize("syntax", ["jpeg-ls-lossless", "jpeg-lossless", "j2k-lossless", "htj2k-lossless", "rle"])
def test_signed_16_bit(tmp_path, syntax):
    src = img.signed16(tmp_path)
    outcome = run(src, tmp_path, syntax)
    assert outcome.changed, outcome.note
    assert_same_pixels(outcome, src)


@pytest.mark.parametrize("syntax", ["jpeg-ls-lossless", "jpeg-lossless", "j2k-lossless"])
def test_signed_12_bit_stored_without_sign_extension(tmp_path, syntax):
    src = img.signed12_masked(tmp_path)
    outcome = run(src, tmp_path, syntax)
    assert outcome.changed, outcome.note
    got = img.pixels(outcome.path)
    assert got.min() < 0
    assert np.array_equal(got, img.pixels(src))


def test_signed_ct_jpeg_ls_codes_sign_extended_words(tmp_path):
    # signed 14-bit CT goes out as whole 16-bit words, sign-extended: a decoder returns the stored
    # values whatever it does with Bits Stored (masking a 14-bit pattern coded at 16 bits would
    # make -2000 read as 14384 in pydicom's decoders)
    outcome = run(img.CT, tmp_path, "jpeg-ls-lossless")
    out = read(outcome)
    assert (out.BitsStored, out.PixelRepresentation) == (14, 1)
    frame = list(generate_fragments(out.PixelData))[1]
    sof = frame.find(b"\xff\xf7")
    assert frame[sof + 4] == 16
    import imagecodecs

    words = imagecodecs.jpegls_decode(frame)
    assert np.array_equal(words.view(np.int16), img.pixels(img.CT))
    for plugin in ("pylibjpeg", "pyjpegls"):
        ds = read(outcome)
        try:
            arr = ds.pixel_array_options(decoding_plugin=plugin) or ds.pixel_array
        except Exception as exc:  # pragma: no cover - plugin missing
            pytest.skip(f"{plugin}: {exc}")
        assert np.array_equal(ds.pixel_array, img.pixels(img.CT)), plugin


def test_values_above_bits_stored_are_never_truncated(tmp_path):
    src = img.high_bits(tmp_path)
    stored = np.frombuffer(pydicom.dcmread(src).PixelData, "<u2").reshape(img.pixels(src).shape)
    assert stored.max() > 0x0FFF
    outcome = run(src, tmp_path, "jpeg-ls-lossless")
    assert outcome.changed, outcome.note
    assert "above Bits Stored" in outcome.note
    frame = list(generate_fragments(read(outcome).PixelData))[1]
    import imagecodecs

    assert np.array_equal(imagecodecs.jpegls_decode(frame), stored)
    # a reader masking to Bits Stored sees what it saw before
    assert np.array_equal(img.pixels(outcome.path) & 0x0FFF, img.pixels(src))


def test_values_above_bits_stored_cannot_go_to_12_bit_jpeg(tmp_path):
    src = img.high_bits(tmp_path)
    outcome = run(src, tmp_path, "jpeg-lossy", fallback="jpeg-ls-lossless")
    assert outcome.fallback_reason == "codec_cannot_carry"
    assert outcome.syntax == "jpeg-ls-lossless"
    assert "above Bits Stored" in outcome.note


def test_multiframe_rgb_and_planar_input(tmp_path):
    for syntax in ("jpeg-ls-lossless", "rle"):
        outcome = run(img.RGB_2FRAME, tmp_path, syntax)
        assert outcome.changed
        assert_same_pixels(outcome, img.RGB_2FRAME)
        assert read(outcome).PlanarConfiguration == 0


def test_32_bit_rgb_goes_to_rle_only(tmp_path):
    assert run(img.RGB_32BIT, tmp_path, "jpeg-ls-lossless").fallback_reason == "codec_cannot_carry"
    outcome = run(img.RGB_32BIT, tmp_path, "jpeg-ls-lossless", fallback="rle")
    assert outcome.syntax == "rle" and outcome.fallback_reason == "codec_cannot_carry"
    assert_same_pixels(outcome, img.RGB_32BIT)


def test_ybr_full_stays_ybr_full_in_lossless_jpeg_ls(tmp_path):
    outcome = run(img.YBR_FULL, tmp_path, "jpeg-ls-lossless")
    ds = read(outcome)
    assert ds.PhotometricInterpretation == "YBR_FULL"
    src = pydicom.dcmread(img.YBR_FULL)
    assert np.array_equal(ds.pixel_array, src.pixel_array)


def test_palette_colour_lossless_keeps_the_palette(tmp_path):
    outcome = run(img.PALETTE, tmp_path, "jpeg-ls-lossless")
    ds = read(outcome)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    assert ds.RedPaletteColorLookupTableData == pydicom.dcmread(img.PALETTE).RedPaletteColorLookupTableData
    assert_same_pixels(outcome, img.PALETTE)


@pytest.mark.parametrize("src", [img.RLE_MF, img.J2K_LOSSLESS, img.JLS_MF], ids=["rle", "j2k", "jls"])
def test_compressed_lossless_input_recompressed(tmp_path, src):
    outcome = run(src, tmp_path, "htj2k-lossless")
    assert outcome.changed
    assert_same_pixels(outcome, src)


# ---------------------------------------------------------------- uncompressed targets


@pytest.mark.parametrize("src", [img.JLS_MF, img.RLE_MF, img.BIG_ENDIAN_MF, img.J2K_LOSSLESS])
@pytest.mark.parametrize("syntax", ["explicit-le", "implicit-le", "deflated"])
def test_uncompressed_targets_decompress(tmp_path, src, syntax):
    outcome = run(src, tmp_path, syntax)
    assert outcome.changed
    ds = read(outcome)
    assert ds.file_meta.TransferSyntaxUID == codecs.get(syntax).uid
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    assert_same_pixels(outcome, src)


def test_big_endian_palette_keeps_its_lookup_tables(tmp_path):
    outcome = run(img.BIG_ENDIAN, tmp_path, "explicit-le")
    ds = read(outcome)
    little = pydicom.dcmread(img.PALETTE)
    assert ds.RedPaletteColorLookupTableData == little.RedPaletteColorLookupTableData
    assert np.array_equal(ds.pixel_array, little.pixel_array)


def test_lossy_input_decompressed_keeps_lossy_flag(tmp_path):
    outcome = run(img.JPEG_BASELINE, tmp_path, "explicit-le")
    assert outcome.changed
    ds = read(outcome)
    assert ds.LossyImageCompression == "01"
    # YBR_FULL_422 decompresses to RGB, interleaved
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.PlanarConfiguration == 0
    assert ds.SOPInstanceUID == pydicom.dcmread(img.JPEG_BASELINE).SOPInstanceUID
    assert max_error(outcome, img.JPEG_BASELINE) == 0


def test_lossy_flagged_input_decompressed_keeps_its_history(tmp_path):
    src = img.lossy_flagged(tmp_path)
    outcome = run(src, tmp_path, "jpeg-ls-lossless")
    ds = read(outcome)
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"


def test_implicit_le_for_an_object_without_pixels(tmp_path):
    src = img.no_pixels(tmp_path)
    outcome = run(src, tmp_path, "implicit-le")
    assert outcome.changed
    ds = read(outcome)
    assert ds.file_meta.TransferSyntaxUID == codecs.IMPLICIT_LE
    assert ds.PatientName == pydicom.dcmread(src).PatientName


def test_deflated_is_smaller_and_reads_back(tmp_path):
    outcome = run(img.MR, tmp_path, "deflated")
    assert outcome.path.stat().st_size < img.MR.stat().st_size
    assert_same_pixels(outcome, img.MR)


# ---------------------------------------------------------------- unchanged


def test_original_is_forwarded_as_received(tmp_path):
    outcome = run(img.CT, tmp_path, "original")
    assert outcome == Transcoded(
        path=img.CT, changed=False, transfer_syntax_uid=codecs.EXPLICIT_LE, syntax="original",
        sop_instance_uid=pydicom.dcmread(img.CT).SOPInstanceUID, ratio=None,
        note=outcome.note, fallback_reason=None, seconds=outcome.seconds,
    )
    assert not (tmp_path / "out-original.dcm").exists()


def test_same_syntax_as_input_is_unchanged(tmp_path):
    assert not run(img.JLS_MF, tmp_path, "jpeg-ls-lossless").changed
    assert not run(img.CT, tmp_path, "1.2.840.10008.1.2.1").changed


@pytest.mark.parametrize("syntax", ["jpeg-lossy", "jpeg-ls-near-lossless", "j2k", "htj2k"])
def test_lossy_input_is_never_recompressed(tmp_path, syntax):
    outcome = run(img.J2K_LOSSY, tmp_path, syntax)
    assert not outcome.changed and outcome.path == img.J2K_LOSSY
    assert "already lossy" in outcome.note
    outcome = run(img.lossy_flagged(tmp_path), tmp_path, syntax)
    assert not outcome.changed
    assert "already lossy (0028,2110=01)" in outcome.note


@pytest.mark.parametrize("maker", [img.no_pixels, img.float_pixels])
def test_objects_without_pixel_data_are_unchanged_for_compressed_targets(tmp_path, maker):
    outcome = run(maker(tmp_path), tmp_path, "jpeg-ls-lossless")
    assert not outcome.changed and outcome.fallback_reason is None
    assert "no pixel data" in outcome.note


def test_one_bit_cannot_be_carried_by_codecs(tmp_path):
    outcome = run(img.ONE_BIT, tmp_path, "jpeg-ls-lossless", fallback="jpeg-lossy")
    assert not outcome.changed
    assert outcome.fallback_reason == "codec_cannot_carry"
    outcome = run(img.ONE_BIT, tmp_path, "jpeg-ls-lossless", fallback="explicit-le")
    assert not outcome.changed  # already Explicit VR LE
    outcome = run(img.ONE_BIT, tmp_path, "jpeg-ls-lossless", fallback="implicit-le")
    assert outcome.changed and outcome.syntax == "implicit-le"
    assert_same_pixels(outcome, img.ONE_BIT)


def test_16_bit_to_jpeg_lossy_falls_back(tmp_path):
    outcome = run(img.CT, tmp_path, "jpeg-lossy", fallback="jpeg-ls-lossless")
    assert outcome.changed
    assert outcome.syntax == "jpeg-ls-lossless"
    assert outcome.fallback_reason == "codec_cannot_carry"
    assert "jpeg-lossy cannot carry" in outcome.note and "fallback jpeg-ls-lossless" in outcome.note
    assert_same_pixels(outcome, img.CT)


def test_cannot_carry_without_fallback_is_unchanged(tmp_path):
    outcome = run(img.CT, tmp_path, "jpeg-lossy")
    assert not outcome.changed and outcome.path == img.CT
    assert outcome.fallback_reason == "codec_cannot_carry"


def test_verify_mismatch_sends_the_original(tmp_path, monkeypatch):
    entry = codecs.get("jpeg-ls-lossless")
    broken = lambda data, image: np.zeros((image.rows, image.columns), np.uint16)  # noqa: E731
    monkeypatch.setitem(registry._REGISTRY, "jpeg-ls-lossless", _replace(entry, decoder=broken))
    outcome = run(img.MR, tmp_path, "jpeg-ls-lossless")
    assert not outcome.changed and outcome.fallback_reason == "verify_mismatch"


def _replace(entry, **kw):
    from dataclasses import replace

    return replace(entry, **kw)


def test_max_error_exceeded_is_a_verify_mismatch(tmp_path):
    outcome = run(img.MR, tmp_path, "jpeg-lossy", quality=5, max_error=1)
    assert not outcome.changed
    assert outcome.fallback_reason == "verify_mismatch"
    assert "exceeds max_error 1" in outcome.note


# ---------------------------------------------------------------- lossy


def test_jpeg_lossy_12_bit_uses_extended_and_bookkeeping(tmp_path):
    outcome = run(img.MR, tmp_path, "jpeg-lossy", quality=90)
    assert outcome.changed
    assert outcome.transfer_syntax_uid == codecs.JPEG_EXTENDED
    assert outcome.syntax == "jpeg-lossy"
    src = pydicom.dcmread(img.MR)
    ds = read(outcome)
    assert ds.LossyImageCompression == "01"
    assert float(ds.LossyImageCompressionRatio) == pytest.approx(outcome.ratio, rel=0.01)
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert ds.ImageType[0] == "DERIVED"
    assert list(ds.ImageType[1:]) == list(src.ImageType[1:])
    assert f"{outcome.ratio:.2f}:1" in ds.DerivationDescription
    assert ds.SOPInstanceUID != src.SOPInstanceUID == ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert outcome.sop_instance_uid == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert 0 < max_error(outcome, img.MR) < 100
    assert outcome.ratio > 4


def test_jpeg_lossy_8_bit_uses_baseline(tmp_path):
    src = img.eight_bit_mono(tmp_path)
    outcome = run(src, tmp_path, "jpeg-lossy")
    assert outcome.transfer_syntax_uid == codecs.JPEG_BASELINE
    assert max_error(outcome, src) < 30


def test_jpeg_lossy_rgb_goes_out_as_ybr_full_422(tmp_path):
    outcome = run(img.US, tmp_path, "jpeg-lossy", quality=95)
    ds = read(outcome)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    got = ds.pixel_array  # pydicom converts to RGB
    want = img.pixels(img.US)
    assert np.abs(got.astype(int) - want).mean() < 3


def test_quality_changes_the_ratio(tmp_path):
    low = run(img.MR, tmp_path, "jpeg-lossy", quality=30).ratio
    high = transcode_file(img.MR, tmp_path / "q95.dcm", Request("jpeg-lossy", quality=95)).ratio
    assert low > high * 1.5


def test_keep_sop_instance_uid(tmp_path):
    outcome = run(img.MR, tmp_path, "jpeg-lossy", keep_sop_instance_uid=True)
    assert read(outcome).SOPInstanceUID == pydicom.dcmread(img.MR).SOPInstanceUID
    assert read(outcome).LossyImageCompression == "01"


def test_lossy_history_is_appended(tmp_path):
    first = run(img.MR, tmp_path, "jpeg-ls-near-lossless")
    second = transcode_file(first.path, tmp_path / "again.dcm", Request("explicit-le"))
    ds = read(second)
    # decompressing keeps the flag and the history
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_14495_1"
    # a history already present gets the new step appended
    src = pydicom.dcmread(img.MR)
    src.LossyImageCompressionRatio = "3.0"
    src.LossyImageCompressionMethod = "ISO_10918_1"
    src.LossyImageCompression = "00"
    img.write(src, tmp_path / "hist.dcm")
    ds = read(run(tmp_path / "hist.dcm", tmp_path, "jpeg-ls-near-lossless"))
    assert list(ds.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_14495_1"]
    assert len(ds.LossyImageCompressionRatio) == 2


@pytest.mark.parametrize("near", [1, 3])
def test_near_lossless_error_bound_on_signed_ct(tmp_path, near):
    outcome = run(img.CT, tmp_path, "jpeg-ls-near-lossless", near=near, verify=True)
    assert outcome.changed, outcome.note
    assert max_error(outcome, img.CT) <= near
    assert read(outcome).LossyImageCompressionMethod == "ISO_14495_1"


@pytest.mark.parametrize("syntax,method", [("j2k", "ISO_15444_1"), ("htj2k", "ISO_15444_15")])
def test_j2k_lossy_quality_and_ratio(tmp_path, syntax, method):
    outcome = run(img.CT, tmp_path, syntax)
    assert outcome.changed and read(outcome).LossyImageCompressionMethod == method
    assert max_error(outcome, img.CT) < 50
    target = transcode_file(img.CT, tmp_path / "r.dcm", Request(syntax, ratio=20))
    assert 14 <= target.ratio <= 21


def test_rgb_lossy_j2k_is_ybr_ict(tmp_path):
    outcome = run(img.US, tmp_path, "j2k")
    assert read(outcome).PhotometricInterpretation == "YBR_ICT"
    assert np.abs(img.pixels(outcome.path).astype(int) - img.pixels(img.US)).mean() < 2


def test_jpegxl_round_trip_through_the_transcoder(tmp_path):
    outcome = run(img.MR, tmp_path, "jpegxl-lossless")
    assert outcome.changed and outcome.transfer_syntax_uid == codecs.JPEGXL_LOSSLESS
    back = transcode_file(outcome.path, tmp_path / "back.dcm", Request("explicit-le"))
    assert_same_pixels(back, img.MR)
    lossy = run(img.US, tmp_path, "jpegxl", quality=90)
    assert lossy.changed and read(lossy).LossyImageCompressionMethod == "ISO_18181_1"


def test_jpegxl_jpeg_repacks_baseline_without_loss(tmp_path):
    outcome = run(img.JPEG_BASELINE, tmp_path, "jpegxl-jpeg")
    assert outcome.changed, outcome.note
    assert outcome.ratio > 1.05
    import imagecodecs

    ours = list(generate_fragments(read(outcome).PixelData))[1:]
    theirs = list(generate_fragments(pydicom.dcmread(img.JPEG_BASELINE).PixelData))[1:]
    assert imagecodecs.jpegxl_decode_jpeg(ours[0]).rstrip(b"\0") == theirs[0].rstrip(b"\0")
    assert read(outcome).SOPInstanceUID == pydicom.dcmread(img.JPEG_BASELINE).SOPInstanceUID
    assert run(img.MR, tmp_path, "jpegxl-jpeg").fallback_reason == "codec_cannot_carry"


# ---------------------------------------------------------------- errors and contract


def test_undecodable_input_raises(tmp_path):
    with pytest.raises(TranscodeError):
        run(img.truncated(tmp_path), tmp_path, "jpeg-ls-lossless")
    with pytest.raises(TranscodeError):
        run(img.TOO_SHORT, tmp_path, "explicit-le")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(TranscodeError):
        run(tmp_path / "junk.dcm", tmp_path, "jpeg-ls-lossless")


def test_bad_request_values_are_refused_where_the_request_is_made(tmp_path):
    # a Request is checked where it is made (rule file, command line): see tests/codecs/test_parameters.py
    with pytest.raises(ValueError):
        registry.check_params(codecs.get("jpeg-lossy"), Params(quality=0))
    with pytest.raises(KeyError, match="did you mean"):
        run(img.MR, tmp_path, "jpeg-ls")
    with pytest.raises(KeyError):
        codecs.get("nope")


def test_fallback_reasons_are_reason_members(tmp_path):
    assert run(img.CT, tmp_path, "jpeg-lossy").fallback_reason is Reason.CODEC_CANNOT_CARRY
    outcome = run(img.MR, tmp_path, "jpeg-lossy", quality=5, max_error=1)
    assert outcome.fallback_reason is Reason.VERIFY_MISMATCH


def test_a_lossless_fallback_is_verified_exactly_whatever_the_rules_max_error(tmp_path, monkeypatch):
    # max_error is about the rule's lossy syntax; the fallback is a request of its own
    entry = codecs.get("jpeg-ls-lossless")
    off_by_one = lambda data, image: entry.decode(data, image) + 1  # noqa: E731
    monkeypatch.setitem(registry._REGISTRY, "jpeg-ls-lossless", _replace(entry, decoder=off_by_one))
    outcome = run(img.CT, tmp_path, "jpeg-lossy", max_error=1000, fallback="jpeg-ls-lossless")
    assert not outcome.changed and "different pixels" in outcome.note
    assert outcome.fallback_reason is Reason.CODEC_CANNOT_CARRY


def test_request_and_outcome_are_picklable(tmp_path):
    request = Request("jpeg-lossy", quality=80, fallback="jpeg-ls-lossless")
    assert pickle.loads(pickle.dumps(request)) == request
    outcome = transcode_file(img.MR, tmp_path / "o.dcm", request)
    assert pickle.loads(pickle.dumps(outcome)) == outcome
    assert outcome.seconds > 0


def test_runs_in_a_process_pool(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        futures = [
            pool.submit(transcode_file, src, tmp_path / f"{i}.dcm", Request("jpeg-ls-lossless"))
            for i, src in enumerate([img.CT, img.MR, img.US])
        ]
        outcomes = [f.result() for f in futures]
    assert all(o.changed for o in outcomes)


@pytest.mark.slow
def test_cr_15_bit(tmp_path):
    outcome = run(img.CR, tmp_path, "jpeg-ls-lossless")
    assert outcome.changed and outcome.ratio > 1.5
    assert_same_pixels(outcome, img.CR)
    assert run(img.CR, tmp_path, "jpeg-lossy").fallback_reason == "codec_cannot_carry"


@pytest.mark.parametrize("syntax", ["jpeg-ls-lossless", "htj2k-lossless", "rle"])
def test_lossless_output_keeps_every_other_element_as_received(tmp_path, syntax):
    # a data element after Pixel Data too (trailing padding): it must survive in place
    ds = pydicom.dcmread(img.CT)
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 64)
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    outcome = run(src, tmp_path, syntax)
    assert outcome.changed, outcome.note
    before, after = pydicom.dcmread(src), read(outcome)
    assert after.file_meta.TransferSyntaxUID == codecs.get(syntax).uid
    assert after.file_meta.MediaStorageSOPInstanceUID == before.SOPInstanceUID
    assert [e.tag for e in after] == [e.tag for e in before]
    for elem in before:
        if elem.tag != 0x7FE00010:
            assert after[elem.tag].VR == elem.VR and after[elem.tag].value == elem.value, elem.tag
    assert np.array_equal(after.pixel_array, before.pixel_array)


def test_a_stale_pixel_group_length_is_dropped(tmp_path):
    ds = pydicom.dcmread(img.CT)
    ds.add_new(0x7FE00000, "UL", len(ds.PixelData) + 12)  # retired, but some old files carry it
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    outcome = run(src, tmp_path, "jpeg-ls-lossless")
    out = read(outcome)
    assert 0x7FE00000 not in out
    assert np.array_equal(out.pixel_array, img.pixels(img.CT))
