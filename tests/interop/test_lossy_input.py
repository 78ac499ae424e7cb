"""Scenario 2: a study that includes images already compressed lossily (JPEG baseline
ultrasound, 120 frames; irreversible JPEG 2000 MR) reaches every destination without being
compressed again: same transfer syntax, same SOP Instance UID, pixel data byte for byte.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.interop.conftest import assert_pixels_equal, copy_as_series, storescu
from tests.support.peers import Destination, data, wait_until

pytestmark = pytest.mark.interop

RETRY = "{ max_attempts = 50, backoff_s = 0.5, max_backoff_s = 2 }"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"


def test_lossy_images_reach_every_destination_without_recompression(orthanc, storescp, router_factory, tmp_path):
    scp = storescp("+xa", "+B")
    router = router_factory([
        Destination("ORTHANC", orthanc.dicom_port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n',
                    ae_title=orthanc.ae_title, retry=RETRY),
        Destination("STORESCP", scp.port,
                    '[[rule]]\nsyntax = "jpeg-lossy"\nquality = 80\nfallback = "jpeg-ls-lossless"\n',
                    ae_title=scp.ae_title, retry=RETRY),
    ])
    study = pydicom.uid.generate_uid()
    lossy = copy_as_series([data("color3d_jpeg_baseline.dcm"), data("MR2_J2KI.dcm")], tmp_path / "study",
                           copies=1, study_uid=study, series_prefix="lossy_")
    # 0028,2110 = "01" in an uncompressed file: it was lossy once, so it is not compressed again
    lossy += copy_as_series([data("MR2_UNCI.dcm")], tmp_path / "study", copies=1, study_uid=study,
                            series_prefix="lossy_")
    fresh = copy_as_series([data("MR2_UNCR.dcm")], tmp_path / "study", copies=1, study_uid=study)
    files = lossy + fresh
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    lossy_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in lossy}

    storescu(router.port, files)
    wait_until(lambda: orthanc.count() >= len(files) and scp.count() >= len(files), 120,
               interval=0.5, what=f"{len(files)} instances at both destinations")

    stored = {uid: ds for uid, (_, ds) in orthanc.by_uid().items()}
    received = scp.by_uid()
    assert lossy_uids <= set(stored), "Orthanc is missing an already-lossy instance (or it got a new UID)"
    assert lossy_uids <= set(received), "storescp is missing an already-lossy instance (or it got a new UID)"
    for destination, got_all in (("Orthanc", stored), ("storescp", received)):
        assert len(got_all) == len(files), f"{destination}: {len(got_all)} instances of {len(files)}"
        for uid in lossy_uids:
            original, got = originals[uid], got_all[uid]
            what = f"{destination} {original.SOPClassUID.name} {original.file_meta.TransferSyntaxUID.name}"
            assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, what
            assert got.PixelData == original.PixelData, f"{what}: pixel data changed"
            for keyword in ("LossyImageCompression", "LossyImageCompressionRatio",
                            "LossyImageCompressionMethod", "ImageType"):
                assert got.get(keyword) == original.get(keyword), f"{what}: {keyword} changed"

    # the uncompressed MR of the same study did get each destination's own syntax
    (fresh_uid,) = set(originals) - lossy_uids
    assert stored[fresh_uid].file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
    assert_pixels_equal(originals[fresh_uid], stored[fresh_uid], "Orthanc fresh MR")
    (lossy_copy,) = set(received) - set(originals)
    assert received[lossy_copy].file_meta.TransferSyntaxUID == JPEG_EXTENDED
