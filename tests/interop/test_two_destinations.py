"""Scenario 1: one study, two destinations with different rules.

Orthanc gets JPEG-LS lossless; a DCMTK storescp gets lossy JPEG (12-bit extended for the MR,
8-bit baseline for the RGB ultrasound) with the signed 14-bit CT, which lossy JPEG cannot
carry, going out in the rule's lossless fallback.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.interop.conftest import (
    assert_pixels_equal,
    copy_as_series,
    decode_elsewhere,
    psnr,
    storescu,
)
from tests.support.peers import Destination, data, wait_until

pytestmark = pytest.mark.interop

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
RETRY = "{ max_attempts = 50, backoff_s = 0.5, max_backoff_s = 2 }"


def test_one_study_reaches_two_destinations_each_in_its_own_syntax(orthanc, storescp, router_factory, tmp_path):
    scp = storescp("+xa", "+B")
    router = router_factory([
        Destination("ORTHANC", orthanc.dicom_port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n',
                    ae_title=orthanc.ae_title, retry=RETRY),
        Destination("STORESCP", scp.port,
                    '[[rule]]\nsyntax = "jpeg-lossy"\nquality = 90\nfallback = "jpeg-ls-lossless"\n',
                    ae_title=scp.ae_title, retry=RETRY),
    ])
    files = copy_as_series([data("MR2_UNCR.dcm"), data("693_UNCR.dcm"), data("US1_UNCR.dcm")],
                           tmp_path / "study", copies=3)
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    by_position = {(str(ds.SeriesInstanceUID), int(ds.InstanceNumber)): ds for ds in originals.values()}

    storescu(router.port, files)
    wait_until(lambda: orthanc.count() >= len(files) and scp.count() >= len(files), 120,
               interval=0.5, what=f"{len(files)} instances at both destinations")

    # Orthanc: everything, JPEG-LS lossless, same UIDs, pixels equal (also as DCMTK decodes them)
    stored = orthanc.by_uid()
    assert set(stored) == set(originals), "Orthanc did not receive exactly the study"
    for uid, (ts, got) in stored.items():
        original = originals[uid]
        assert ts == JPEG_LS_LOSSLESS, f"{uid}: Orthanc stored {ts}"
        assert got.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
        assert "LossyImageCompressionMethod" not in got
        assert_pixels_equal(original, got, f"Orthanc {original.Modality} {uid}")
        assert_pixels_equal(original, decode_elsewhere(got, tmp_path / "dcmdjpls"), f"dcmdjpls {uid}")

    # storescp: lossy JPEG where it can carry the image, with the standard's bookkeeping
    received = scp.by_uid()
    assert len(received) == len(files), f"storescp got {len(received)} distinct instances of {len(files)}"
    for uid, got in received.items():
        original = by_position[(str(got.SeriesInstanceUID), int(got.InstanceNumber))]
        ts = str(got.file_meta.TransferSyntaxUID)
        what = f"storescp {original.Modality} #{got.InstanceNumber}"
        if original.Modality == "CT":
            assert ts == JPEG_LS_LOSSLESS, f"{what}: signed 14-bit CT should take the fallback, got {ts}"
            assert uid == original.SOPInstanceUID
            assert_pixels_equal(original, got, what)
            continue
        expected = JPEG_EXTENDED if original.BitsStored == 12 else JPEG_BASELINE
        assert ts == expected, f"{what}: {ts}, expected {expected}"
        assert uid != original.SOPInstanceUID and uid not in originals, f"{what}: lossy copy kept its UID"
        assert got.file_meta.MediaStorageSOPInstanceUID == uid
        assert got.LossyImageCompression == "01"
        assert list(_values(got.LossyImageCompressionMethod)) == [
            *_values(original.get("LossyImageCompressionMethod")), "ISO_10918_1"]
        ratios = list(_values(got.LossyImageCompressionRatio))
        assert len(ratios) == len(list(_values(original.get("LossyImageCompressionRatio")))) + 1
        assert float(ratios[-1]) > 1
        assert got.ImageType[0] == "DERIVED"
        assert got.StudyInstanceUID == original.StudyInstanceUID
        assert got.SeriesInstanceUID == original.SeriesInstanceUID
        if original.SamplesPerPixel == 3:
            assert got.PhotometricInterpretation in ("YBR_FULL_422", "YBR_FULL")
        decoded = decode_elsewhere(got, tmp_path / "dcmdjpeg")
        floor = 30 if original.SamplesPerPixel == 3 else 45  # colour loses chroma resolution (4:2:2)
        assert psnr(original, got) > floor, f"{what}: PSNR {psnr(original, got):.1f} dB at quality 90"
        assert psnr(original, decoded) > floor, f"{what}: as DCMTK decodes it, PSNR {psnr(original, decoded):.1f} dB"


def _values(value):  # noqa: ANN001, ANN202
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]
