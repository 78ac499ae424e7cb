"""Encoder parameters: each syntax declares those it takes, checked once where a request is made.

Every declared parameter is tried at its bounds, on a real image, straight from the registry's
declarations: a new syntax or parameter is covered without editing this file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from router import codecs
from router.codecs import Param, ParameterError, Syntax, check_params
from router.config import ConfigError, load_rule_file
from router.request import PARAMETER_NAMES, Params, Reason, Request, fallback
from router.codecs.transcode import transcode_file
from tests.support import transcode_images as img
from tests.support.peers import REPO

DECLARED = [(s, p) for s in codecs.all_syntaxes() for p in s.params]
UNDECLARED = [(s, name) for s in codecs.all_syntaxes() for name in PARAMETER_NAMES
              if all(p.name != name for p in s.params)]


def _id(value: object) -> str:
    return value.name if isinstance(value, (Syntax, Param)) else str(value)


def toml(value: int | float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def beyond(param: Param, bound: int | float, direction: int) -> int | float:
    step = 1 if param.type is int else 0.01
    return bound + direction * step


def rule_file(tmp_path: Path, syntax: str, **params: int | float) -> Path:
    lines = "".join(f"{name} = {toml(value)}\n" for name, value in params.items())
    path = tmp_path / "PACS.toml"
    path.write_text('[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
                    f'[[rule]]\nname = "tuned"\nsyntax = "{syntax}"\n{lines}')
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Small real images: signed 16-bit CT, the MR as the unsigned 12-bit image it is (every
    value is positive), colour, and a JPEG baseline for the syntaxes that re-pack one."""
    tmp = tmp_path_factory.mktemp("images")
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    assert 0 <= mr.pixel_array.min() and mr.pixel_array.max() < 4096
    mr.PixelRepresentation, mr.BitsStored, mr.HighBit = 0, 12, 11
    candidates = [Path(get_testdata_file("CT_small.dcm")), img.write(mr, tmp / "mr12.dcm")]
    return candidates + [p for p in (img.US, img.JPEG_BASELINE) if p.exists()]


@pytest.fixture(scope="module")
def image_for(images, tmp_path_factory):
    """The first image each syntax carries with its defaults."""
    tmp = tmp_path_factory.mktemp("defaults")
    chosen: dict[str, Path] = {}

    def pick(syntax: Syntax) -> Path:
        if syntax.name not in chosen:
            for src in images:
                result = transcode_file(src, tmp / f"{syntax.name}.dcm", Request(syntax.name))
                if result.changed and result.fallback_reason is None:
                    chosen[syntax.name] = src
                    break
            else:
                pytest.fail(f"{syntax.name} carries none of the test images with its defaults")
        return chosen[syntax.name]

    return pick


# ---------------------------------------------------------------- every declared bound


@pytest.mark.parametrize("bound", ["minimum", "maximum"])
@pytest.mark.parametrize("syntax,param", DECLARED, ids=_id)
def test_every_declared_parameter_at_its_bounds_loads_and_transcodes(tmp_path, image_for, syntax, param, bound):
    value = getattr(param, bound)
    rules = load_rule_file(rule_file(tmp_path, syntax.name, **{param.name: value}))
    rule = rules.rules[0]
    assert getattr(rule, param.name) == value
    request = Request(rule.syntax, quality=rule.quality, near=rule.near, ratio=rule.ratio)
    result = transcode_file(image_for(syntax), tmp_path / "out.dcm", request)
    assert result.changed, result.note
    assert result.fallback_reason is None, result.note
    assert result.syntax == syntax.name


@pytest.mark.parametrize("bound,direction", [("minimum", -1), ("maximum", 1)])
@pytest.mark.parametrize("syntax,param", DECLARED, ids=_id)
def test_just_beyond_each_bound_the_rule_file_is_refused_naming_rule_and_field(tmp_path, syntax, param, bound,
                                                                               direction):
    value = beyond(param, getattr(param, bound), direction)
    with pytest.raises(ConfigError) as refused:
        load_rule_file(rule_file(tmp_path, syntax.name, **{param.name: value}))
    message = str(refused.value)
    assert "PACS.toml: rule 1 ('tuned'), field " + param.name in message, message
    assert ("greater than or equal to" if direction < 0 else "less than or equal to") in message


@pytest.mark.parametrize("syntax,name", UNDECLARED, ids=_id)
def test_a_parameter_the_syntax_does_not_take_is_refused_naming_the_field(tmp_path, syntax, name):
    takers = [p for s in codecs.all_syntaxes() for p in s.params if p.name == name]
    value = takers[0].minimum if takers else 1
    with pytest.raises(ConfigError) as refused:
        load_rule_file(rule_file(tmp_path, syntax.name, **{name: value}))
    message = str(refused.value)
    assert f"rule 1 ('tuned'), field {name}: '{name}' applies to" in message, message
    assert f"not to {syntax.name!r}" in message


# ---------------------------------------------------------------- the messages


def test_near_zero_is_refused_with_the_lossless_syntax_as_hint(tmp_path):
    # near = 0 used to pass `check` and then make every image fall back
    with pytest.raises(ConfigError, match="field near: .*near = 0 is lossless: use syntax = 'jpeg-ls-lossless'"):
        load_rule_file(rule_file(tmp_path, "jpeg-ls-near-lossless", near=0))


def test_check_command_refuses_near_zero(tmp_path):
    (tmp_path / "rules").mkdir()
    rule_file(tmp_path / "rules", "jpeg-ls-near-lossless", near=0)
    (tmp_path / "router.toml").write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n')
    result = subprocess.run([sys.executable, "-m", "router", "check", "--config", str(tmp_path / "router.toml")],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "rule 1 ('tuned'), field near" in result.stderr and "jpeg-ls-lossless" in result.stderr


def test_near_on_another_syntax_names_the_syntax_that_takes_it():
    with pytest.raises(ParameterError, match="'near' applies to jpeg-ls-near-lossless, not to 'jpeg-lossy'") as e:
        check_params(codecs.get("jpeg-lossy"), Params(near=2))
    assert e.value.field == "near"


def test_quality_on_a_lossless_syntax_says_it_is_lossless():
    with pytest.raises(ParameterError, match=r"'quality' applies to .*jpeg-lossy.*not to 'jpeg-ls-lossless' \(a lossless"):
        check_params(codecs.get("jpeg-ls-lossless"), Params(quality=90))


def test_a_whole_number_parameter_refuses_a_fraction():
    with pytest.raises(ParameterError, match="quality must be a whole number"):
        check_params(codecs.get("jpeg-lossy"), Params(quality=90.5))  # type: ignore[arg-type]
    check_params(codecs.get("j2k"), Params(ratio=10))  # a whole number is a number


def test_no_parameter_is_fine_everywhere():
    for syntax in codecs.all_syntaxes():
        check_params(syntax, Params())


def test_every_declared_default_is_within_its_bounds():
    for syntax, param in DECLARED:
        if param.default is not None:
            param.check(param.default, syntax.name)


def test_transcode_command_refuses_a_bad_parameter_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "router", "transcode", "--syntax", "jpeg-ls-near-lossless",
                             "--near", "0", str(img.MR), str(tmp_path / "out.dcm")],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--near" in result.stderr and "jpeg-ls-lossless" in result.stderr
    assert not (tmp_path / "out.dcm").exists()


# ---------------------------------------------------------------- the one fallback decision


def test_a_codec_that_cannot_carry_falls_back_to_the_rules_fallback():
    request = Request("jpeg-lossy", quality=80, fallback="jpeg-ls-lossless", keep_sop_instance_uid=True)
    for reason in (Reason.CODEC_CANNOT_CARRY, Reason.CODEC_ERROR, Reason.CODEC_CRASH, Reason.VERIFY_MISMATCH):
        assert fallback(request, reason) == Request("jpeg-ls-lossless", keep_sop_instance_uid=True)


def test_without_another_fallback_the_instance_goes_as_received():
    assert fallback(Request("jpeg-lossy"), Reason.CODEC_CANNOT_CARRY) is None
    assert fallback(Request("rle", fallback="rle"), Reason.CODEC_ERROR) is None
    # a fallback's own fallback is never tried: it has none
    first = fallback(Request("jpeg-lossy", fallback="jpeg-ls-lossless"), Reason.CODEC_CANNOT_CARRY)
    assert first is not None and fallback(first, Reason.CODEC_CANNOT_CARRY) is None


def test_a_destination_refusing_the_syntax_gets_the_first_uncompressed_one_it_accepts():
    request = Request("jpeg-ls-lossless", fallback="rle")
    refused = Reason.REFUSED_BY_DESTINATION
    assert fallback(request, refused, ["implicit-le", "explicit-le"]) == Request("explicit-le")
    assert fallback(request, refused, ["implicit-le"]) == Request("implicit-le")
    assert fallback(request, refused, ["rle"]) is None
    assert fallback(request, refused) is None
    assert fallback(Request("explicit-le"), refused, ["explicit-le", "implicit-le"]) == Request("implicit-le")
