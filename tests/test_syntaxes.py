import pytest

from router import syntaxes
from router.syntaxes import ImageInfo, Params


def image(**kw) -> ImageInfo:
    base = dict(
        rows=64, columns=64, samples_per_pixel=1, bits_allocated=16, bits_stored=12,
        signed=False, photometric="MONOCHROME2", precision=12, minimum=0, maximum=4095,
    )
    base.update(kw)
    return ImageInfo(**base)


def test_names_include_original_and_the_rule_file_vocabulary():
    names = syntaxes.names()
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
    assert syntaxes.get(key).name == name


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'jpeg-ls-lossless'"):
        syntaxes.get("jpeg-ls")


def test_unknown_uid_names_the_transfer_syntax():
    with pytest.raises(KeyError, match="Big Endian"):
        syntaxes.get("1.2.840.10008.1.2.2")


def test_original_has_no_uid_and_jpeg_lossy_is_the_8_bit_one():
    assert syntaxes.get("original").uid == ""
    assert syntaxes.get("jpeg-lossy").uid == syntaxes.JPEG_BASELINE
    assert syntaxes.get("jpeg-lossy").uid_for(image(precision=12)) == syntaxes.JPEG_EXTENDED
    assert syntaxes.get("jpeg-lossy").uid_for(image(bits_stored=8, precision=8)) == syntaxes.JPEG_BASELINE


def test_every_lossy_syntax_has_a_method_and_every_compressed_one_an_encoder():
    for s in syntaxes.all_syntaxes():
        assert s.lossy == (s.method is not None), s.name
        if s.encapsulated and s.name != "jpegxl-jpeg":
            assert s.encode is not None and s.decode is not None, s.name
        if s.lossy:
            assert s.uid in syntaxes.LOSSY_TRANSFER_SYNTAXES


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
    assert syntaxes.is_lossy_input(uid, flag) is lossy


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
    reason = syntaxes.get(name).cannot_carry(image(**kw), Params())
    assert (reason is None) is carried, reason


def test_cannot_carry_reason_names_the_syntax_and_the_problem():
    reason = syntaxes.get("jpeg-lossy").cannot_carry(image(bits_stored=16, precision=16))
    assert reason == "jpeg-lossy cannot carry 16-bit pixels"
    reason = syntaxes.get("jpeg-lossy").cannot_carry(image(precision=16))
    assert "above Bits Stored" in reason


def test_rgb_goes_out_as_ybr_full_422_in_jpeg_and_ybr_rct_in_lossless_j2k():
    rgb = image(samples_per_pixel=3, photometric="RGB", bits_allocated=8, bits_stored=8, precision=8)
    assert syntaxes.get("jpeg-lossy").photometric_for(rgb) == "YBR_FULL_422"
    assert syntaxes.get("j2k-lossless").photometric_for(rgb) == "YBR_RCT"
    assert syntaxes.get("j2k").photometric_for(rgb) == "YBR_ICT"
    assert syntaxes.get("jpeg-ls-lossless").photometric_for(rgb) == "RGB"
    assert syntaxes.get("rle").photometric_for(rgb) == "RGB"
