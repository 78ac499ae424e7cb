"""Files the router writes are read by other implementations: DCMTK, GDCM, OpenJPEG.

Lossless output must decode to the original pixels in every one of them; lossy
output must decode in them to what pydicom decodes, within the small differences
between JPEG decoders.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from router import codecs
from router.request import Request
from router.codecs.transcode import transcode_file
from tests.support import transcode_images as img

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not img.CT.exists(), reason="pydicom-data is not installed"),
]

DCMTK = {
    "jpeg-lossy": ["dcmdjpeg"],
    "jpeg-lossless": ["dcmdjpeg"],
    "jpeg-ls-lossless": ["dcmdjpls"],
    "jpeg-ls-near-lossless": ["dcmdjpls"],
    "rle": ["dcmdrle"],
    "deflated": ["dcmconv", "+te"],
    "implicit-le": ["dcmconv", "+te"],
}
GDCM_READS = set(DCMTK) | {"j2k-lossless", "j2k"}

IMAGES = {
    "ct-signed14": img.CT,
    "mr12": img.MR,
    "us-rgb": img.US,
    "mr-multiframe": img.MULTIFRAME,
}

# what each syntax is tried on; lossy JPEG cannot carry the signed CT
CASES = [
    (syntax, image)
    for syntax in ["jpeg-lossless", "jpeg-ls-lossless", "jpeg-ls-near-lossless", "rle", "deflated",
                   "implicit-le", "j2k-lossless", "j2k", "jpeg-lossy"]
    for image in IMAGES
    if not (syntax == "jpeg-lossy" and image == "ct-signed14")
]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install dcmtk libgdcm-tools)")
    return path


def _pixels(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    return ds.pixel_array


def _tolerance(syntax: str) -> tuple[int, float]:
    """(max, mean) absolute difference allowed between two decoders of one file."""
    if syntax == "jpeg-lossy":
        # IDCT and chroma upsampling differ between libjpeg-turbo and IJG 6b
        return 40, 1.0
    if codecs.get(syntax).lossy:
        return 1, 0.01
    return 0, 0.0


def _compare(decoded: np.ndarray, expected: np.ndarray, syntax: str, who: str) -> None:
    assert decoded.shape == expected.shape, who
    diff = np.abs(decoded.astype(np.int64) - expected.astype(np.int64))
    most, mean = _tolerance(syntax)
    assert diff.max() <= most and diff.mean() <= mean, f"{who}: max {diff.max()} mean {diff.mean():.3f}"


def _expected(out: Path, src: Path, syntax: str) -> np.ndarray:
    # lossless: the original; lossy: what pydicom makes of our file
    return img.pixels(out if codecs.get(syntax).lossy else src)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crosscheck")
    cache: dict[tuple[str, str], Path] = {}

    def get(syntax: str, image: str) -> Path:
        key = (syntax, image)
        if key not in cache:
            transcoded = transcode_file(IMAGES[image], tmp / f"{image}.{syntax}.dcm", Request(syntax))
            assert transcoded.changed, transcoded.note
            cache[key] = transcoded.path
        return cache[key]

    return get


@pytest.mark.parametrize("syntax,image", [c for c in CASES if c[0] in DCMTK])
def test_dcmtk_decodes_what_we_write(written, tmp_path, syntax, image):
    command = DCMTK[syntax]
    tool = _tool(command[0])
    out = written(syntax, image)
    decoded = tmp_path / "dcmtk.dcm"
    run = subprocess.run([tool, *command[1:], str(out), str(decoded)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    _compare(_pixels(decoded), _expected(out, IMAGES[image], syntax), syntax, f"DCMTK {command[0]}")


@pytest.mark.parametrize("syntax,image", [c for c in CASES if c[0] in GDCM_READS])
def test_gdcm_decodes_what_we_write(written, tmp_path, syntax, image):
    tool = _tool("gdcmconv")
    out = written(syntax, image)
    decoded = tmp_path / "gdcm.dcm"
    run = subprocess.run([tool, "--raw", str(out), str(decoded)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    _compare(_pixels(decoded), _expected(out, IMAGES[image], syntax), syntax, "GDCM gdcmconv --raw")


@pytest.mark.parametrize("image", list(IMAGES))
@pytest.mark.parametrize("syntax", ["htj2k-lossless", "htj2k"])
def test_htj2k_decodes_in_openjpeg(written, syntax, image):
    # DCMTK 3.6.7 and GDCM 3.0 cannot read HTJ2K: OpenJPEG is the second decoder
    import imagecodecs
    import openjpeg

    out = written(syntax, image)
    ds = pydicom.dcmread(out)
    original = img.pixels(IMAGES[image])
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    decoded = np.stack([openjpeg.decode(f) for f in frames]) if len(frames) > 1 else openjpeg.decode(frames[0])
    if syntax == "htj2k-lossless":
        assert np.array_equal(decoded.reshape(original.shape), original)
        # imagecodecs (OpenJPH) agrees on lossless streams
        assert np.array_equal(imagecodecs.htj2k_decode(frames[0]).reshape(original[0].shape if len(frames) > 1 else original.shape),
                              original[0] if len(frames) > 1 else original)
    else:
        diff = np.abs(decoded.reshape(original.shape).astype(np.int64) - original)
        assert diff.mean() < 2 and diff.max() < 64
    # and pydicom's own HTJ2K pipeline reads it as OpenJPEG does
    assert np.array_equal(ds.pixel_array, decoded.reshape(ds.pixel_array.shape))


@pytest.mark.parametrize("image", ["mr12", "us-rgb", "mr-multiframe"])
def test_jpegxl_decodes_in_a_second_library(written, image):
    try:
        import pillow_jxl  # noqa: F401 - registers libjxl's decoder with Pillow
        from PIL import Image
    except ImportError:
        pytest.skip("pillow-jxl-plugin is not installed (pip install '.[test]' installs it)")
    import io

    out = written("jpegxl-lossless", image)
    ds = pydicom.dcmread(out)
    frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    decoded = np.asarray(Image.open(io.BytesIO(frame)))
    original = img.pixels(IMAGES[image])
    original = original[0] if int(ds.get("NumberOfFrames", 1)) > 1 else original
    if decoded.dtype == np.uint16 and int(ds.BitsStored) < 16:
        # Pillow scales a 12-bit codestream to the full 16-bit range (bit replication)
        decoded = decoded >> (16 - int(ds.BitsStored))
    assert np.array_equal(decoded, original)


def test_jpeg_ls_signed_ct_three_decoders_agree(written, tmp_path):
    """The trap that crashed Orthanc: signed 14-bit CT in JPEG-LS, decoded by
    pydicom (pyjpegls and pylibjpeg), DCMTK and GDCM to the same values."""
    out = written("jpeg-ls-lossless", "ct-signed14")
    original = img.pixels(img.CT)
    ds = pydicom.dcmread(out)
    for plugin in ("pyjpegls", "pylibjpeg"):
        try:
            from pydicom.pixels import pixel_array

            arr = pixel_array(out, decoding_plugin=plugin)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            if "plugin" in str(exc):
                continue
            raise
        assert np.array_equal(arr, original), plugin
    assert np.array_equal(ds.pixel_array, original)
    for command in (["dcmdjpls"], ["gdcmconv", "--raw"]):
        tool = _tool(command[0])
        decoded = tmp_path / f"{command[0]}.dcm"
        subprocess.run([tool, *command[1:], str(out), str(decoded)], check=True, capture_output=True, timeout=60)
        assert np.array_equal(_pixels(decoded), original), command[0]
