"""The codec registry: what each outbound syntax is, carries and writes."""

import subprocess
import sys

import pytest

from router import codecs
from router.codecs import ImageInfo
from router.request import Params


def image(**kw) -> ImageInfo:
    base = dict(
        rows=64, columns=64, samples_per_pixel=1, bits_allocated=16, bits_stored=12,
        signed=False, photometric="MONOCHROME2", precision=12, minimum=0, maximum=4095,
    )
    base.update(kw)
    return ImageInfo(**base)


def test_names_include_original_and_the_rule_file_vocabulary():
    names = [s.name for s in codecs.all_syntaxes()]
    for name in (
        "original", "explicit-le", "implicit-le", "deflated", "rle", "jpeg-lossy", "jpeg-lossless",
        "jpeg-ls-lossless", "jpeg-ls-near-lossless", "j2k-lossless", "j2k", "htj2k-lossless",
        "htj2k", "jpegxl-lossless", "jpegxl", "jpegxl-jpeg",
    ):
        assert name in names
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    "key,name",
    [
        ("jpeg-ls-lossless", "jpeg-ls-lossless"),
        ("1.2.840.10008.1.2.4.80", "jpeg-ls-lossless"),
        ("1.2.840.10008.1.2.4.50", "jpeg-lossy"),
        ("1.2.840.10008.1.2.4.51", "jpeg-lossy"),
        ("1.2.840.10008.1.2", "implicit-le"),
        ("1.2.840.10008.1.2.4.202", "htj2k-lossless"),
        ("JPEG-LS-LOSSLESS", "jpeg-ls-lossless"),
    ],
)
def test_get_accepts_names_and_transfer_syntax_uids(key, name):
    assert codecs.get(key).name == name


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'jpeg-ls-lossless'"):
        codecs.get("jpeg-ls")


def test_unknown_uid_names_the_transfer_syntax():
    with pytest.raises(KeyError, match="Big Endian"):
        codecs.get("1.2.840.10008.1.2.2")


def test_original_has_no_uid_and_jpeg_lossy_is_the_8_bit_one():
    assert codecs.get("original").uid == ""
    assert codecs.get("jpeg-lossy").uid == codecs.JPEG_BASELINE
    assert codecs.get("jpeg-lossy").uid_for(image(precision=12)) == codecs.JPEG_EXTENDED
    assert codecs.get("jpeg-lossy").uid_for(image(bits_stored=8, precision=8)) == codecs.JPEG_BASELINE


def test_every_lossy_syntax_has_a_method_and_every_compressed_one_an_encoder():
    for s in codecs.all_syntaxes():
        assert s.lossy == (s.method is not None), s.name
        if s.encapsulated and s.repacks is None:
            assert s.encoder is not None and s.decoder is not None, s.name
        if s.repacks is not None:
            assert s.repacker is not None and s.unpacker is not None, s.name
        if s.lossy:
            assert s.uid in codecs.LOSSY_TRANSFER_SYNTAXES


@pytest.mark.parametrize(
    "uid,flag,lossy",
    [
        ("1.2.840.10008.1.2.1", None, False),
        ("1.2.840.10008.1.2.1", "01", True),
        ("1.2.840.10008.1.2.1", "00", False),
        ("1.2.840.10008.1.2.4.50", None, True),
        ("1.2.840.10008.1.2.4.51", "00", True),
        ("1.2.840.10008.1.2.4.81", None, True),
        ("1.2.840.10008.1.2.4.91", None, True),
        ("1.2.840.10008.1.2.4.203", None, True),
        ("1.2.840.10008.1.2.4.112", None, True),
        ("1.2.840.10008.1.2.4.102", None, True),  # MPEG-4
        ("1.2.840.10008.1.2.4.107", None, True),  # HEVC
        ("1.2.840.10008.1.2.4.80", None, False),
        ("1.2.840.10008.1.2.4.90", None, False),
        ("1.2.840.10008.1.2.4.201", None, False),
    ],
)
def test_is_lossy_input(uid, flag, lossy):
    assert codecs.is_lossy_input(uid, flag) is lossy


@pytest.mark.parametrize(
    "name,kw,carried",
    [
        ("jpeg-lossy", dict(), True),
        ("jpeg-lossy", dict(bits_stored=16, precision=16), False),
        ("jpeg-lossy", dict(signed=True), False),
        ("jpeg-lossy", dict(photometric="PALETTE COLOR"), False),
        ("jpeg-lossy", dict(bits_allocated=1, bits_stored=1, precision=1), False),
        ("jpeg-lossy", dict(precision=16), False),  # values above Bits Stored
        ("jpeg-ls-lossless", dict(bits_stored=16, precision=16, signed=True), True),
        ("jpeg-ls-lossless", dict(bits_allocated=32, bits_stored=32, precision=32), False),
        ("jpeg-ls-lossless", dict(samples_per_pixel=3, photometric="RGB", bits_allocated=8, bits_stored=8, precision=8), True),
        ("jpeg-ls-near-lossless", dict(signed=True, minimum=-2048, maximum=100), False),
        ("jpeg-ls-near-lossless", dict(signed=True, minimum=-2000, maximum=2000), True),
        ("rle", dict(samples_per_pixel=3, photometric="RGB", bits_allocated=32, bits_stored=32), True),
        ("rle", dict(samples_per_pixel=3, photometric="RGB", bits_allocated=64, bits_stored=64), False),
        ("jpegxl-lossless", dict(signed=True), False),
        ("j2k-lossless", dict(signed=True, bits_stored=16, precision=16), True),
        ("explicit-le", dict(bits_allocated=1, bits_stored=1, precision=1), True),
    ],
)
def test_what_each_syntax_can_carry(name, kw, carried):
    reason = codecs.get(name).cannot_carry(image(**kw), Params())
    assert (reason is None) is carried, reason


def test_cannot_carry_reason_names_the_syntax_and_the_problem():
    reason = codecs.get("jpeg-lossy").cannot_carry(image(bits_stored=16, precision=16))
    assert reason == "jpeg-lossy cannot carry 16-bit pixels"
    reason = codecs.get("jpeg-lossy").cannot_carry(image(precision=16))
    assert "above Bits Stored" in reason


def test_rgb_goes_out_as_ybr_full_422_in_jpeg_and_ybr_rct_in_lossless_j2k():
    rgb = image(samples_per_pixel=3, photometric="RGB", bits_allocated=8, bits_stored=8, precision=8)
    assert codecs.get("jpeg-lossy").photometric_for(rgb) == "YBR_FULL_422"
    assert codecs.get("j2k-lossless").photometric_for(rgb) == "YBR_RCT"
    assert codecs.get("j2k").photometric_for(rgb) == "YBR_ICT"
    assert codecs.get("jpeg-ls-lossless").photometric_for(rgb) == "RGB"
    assert codecs.get("rle").photometric_for(rgb) == "RGB"


def test_importing_the_registry_loads_neither_numpy_nor_pydicom():
    code = ("import sys, router.codecs, router.codecs.registry; "
            "assert 'numpy' not in sys.modules and 'pydicom' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_backend_named_in_the_registry_exists():
    for s in codecs.all_syntaxes():
        for hook in ("encoder", "decoder", "repacker", "unpacker", "check", "pick_uid", "photometric_out",
                     "bits_allocated_out"):
            ref = getattr(s, hook)
            if isinstance(ref, str):
                module, _, name = ref.partition(":")
                assert callable(getattr(__import__(module, fromlist=[name]), name)), (s.name, hook, ref)


def test_jpeg_baseline_output_is_allocated_8_bits_and_extended_keeps_its_words():
    jpeg = codecs.get("jpeg-lossy")
    assert jpeg.bits_allocated_for(image(bits_stored=8, precision=8)) == 8
    assert jpeg.bits_allocated_for(image(precision=12)) == 16
    assert codecs.get("jpeg-ls-lossless").bits_allocated_for(image(bits_stored=8, precision=8)) == 16


def test_the_setting_in_derivation_description_comes_from_the_declared_parameters():
    assert codecs.get("jpeg-lossy").describe(Params()) == "quality 90"
    assert codecs.get("jpeg-lossy").describe(Params(quality=70)) == "quality 70"
    assert codecs.get("jpeg-ls-near-lossless").describe(Params()) == "near=2"
    assert codecs.get("j2k").describe(Params(ratio=20)) == "target ratio 20"
    assert codecs.get("htj2k").describe(Params(ratio=12.5, quality=80)) == "target ratio 12.5"
    assert codecs.get("htj2k").describe(Params(quality=80)) == "quality 80"
    assert codecs.get("rle").describe(Params()) == ""


def test_only_jpeg_ls_near_lossless_promises_an_error_bound():
    assert codecs.get("jpeg-ls-near-lossless").promised_error(Params()) == 2
    assert codecs.get("jpeg-ls-near-lossless").promised_error(Params(near=5)) == 5
    for s in codecs.all_syntaxes():
        if s.name != "jpeg-ls-near-lossless":
            assert s.promised_error(Params(near=5)) is None, s.name


def test_near_beyond_half_the_sample_range_cannot_be_carried():
    near = codecs.get("jpeg-ls-near-lossless")
    eight = image(bits_allocated=8, bits_stored=8, precision=8, maximum=255)
    assert near.cannot_carry(eight, Params(near=127)) is None
    assert "near at most 127" in near.cannot_carry(eight, Params(near=128))
    assert near.cannot_carry(image(), Params(near=255)) is None


def test_a_re_packing_syntax_is_not_asked_to_encode_pixels():
    jxl = codecs.get("jpegxl-jpeg")
    assert jxl.repacks == codecs.JPEG_BASELINE and jxl.decodes_to_rgb
    assert "only re-packs JPEG Baseline" in jxl.cannot_carry(image(bits_allocated=8, bits_stored=8, precision=8))
