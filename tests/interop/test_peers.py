"""The peers on their own, without the router: if these fail, the peer setup is at fault."""

from __future__ import annotations

import pydicom
import pytest

from tests.interop.conftest import assert_pixels_equal, copy_as_series, echoscu, storescu
from tests.support.peers import data

pytestmark = pytest.mark.interop


def test_storescu_sends_uncompressed_and_compressed_files_to_storescp(storescp, tmp_path):
    scp = storescp("+xa", "+B")
    assert echoscu(scp.port, scp.ae_title).returncode == 0
    files = copy_as_series([data("MR2_UNCR.dcm"), data("MR2_J2KI.dcm"), data("emri_small_jpeg_ls_lossless.dcm")],
                           tmp_path / "in", copies=1)
    storescu(scp.port, files, called_ae=scp.ae_title)
    received = scp.by_uid()
    for path in files:
        original = pydicom.dcmread(path)
        got = received[str(original.SOPInstanceUID)]
        assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert got.PixelData == original.PixelData


def test_storescu_sends_to_orthanc_and_rest_reads_it_back(orthanc, tmp_path):
    files = copy_as_series([data("693_UNCR.dcm"), data("MR2_J2KI.dcm")], tmp_path / "in", copies=1)
    storescu(orthanc.dicom_port, files, called_ae=orthanc.ae_title)
    assert orthanc.count() == 2
    stored = orthanc.by_uid()
    for path in files:
        original = pydicom.dcmread(path)
        ts, got = stored[str(original.SOPInstanceUID)]
        assert ts == original.file_meta.TransferSyntaxUID
        assert got.PixelData == original.PixelData
        assert_pixels_equal(original, got, path.name)
