"""Scenario 3: a legacy workstation (DCMTK storescp +xi) accepts Implicit VR Little Endian
only. Whether the rule asks for JPEG-LS lossless or lossy JPEG, every image still arrives,
decompressed from the original (so pixels equal, same SOP Instance UID), and an image that was
lossy once still says so.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.interop.conftest import assert_pixels_equal, copy_as_series, storescu
from tests.support.peers import Destination, data, metric_value, wait_until

pytestmark = pytest.mark.interop

IMPLICIT_LE = "1.2.840.10008.1.2"
J2K = "1.2.840.10008.1.2.4.91"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
SOURCES = [
    "693_UNCR.dcm",                    # CT, signed, 14 of 16 bits
    "MR2_UNCR.dcm",                    # MR, 12 of 16 bits
    "US1_UNCR.dcm",                    # RGB
    "OBXXXX1A.dcm",                    # palette colour
    "emri_small.dcm",                  # enhanced MR, 10 frames
    "emri_small_RLE.dcm",              # RLE lossless in, nothing accepted but native out
    "emri_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless in
    "MR2_J2KI.dcm",                    # lossy JPEG 2000 in: decompressed, still marked lossy
]


@pytest.mark.parametrize("syntax", ["jpeg-ls-lossless", "jpeg-lossy"])
def test_workstation_that_takes_only_implicit_le_gets_every_image_decompressed(syntax, storescp, router_factory,
                                                                               tmp_path):
    scp = storescp("+xi", ae_title="LEGACY")
    router = router_factory([
        Destination("LEGACY", scp.port, f'[[rule]]\nsyntax = "{syntax}"\nfallback = "jpeg-ls-lossless"\n',
                    ae_title=scp.ae_title,
                    retry="{ max_attempts = 50, backoff_s = 0.5, max_backoff_s = 2 }"),
    ])
    files = copy_as_series([data(name) for name in SOURCES], tmp_path / "study", copies=1)
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}

    storescu(router.port, files)
    wait_until(lambda: scp.count() >= len(files), 120, interval=0.5, what=f"{len(files)} instances at storescp +xi")

    received = scp.by_uid()
    assert set(received) == set(originals), "the workstation did not get exactly the images sent, same UIDs"
    for uid, got in received.items():
        original = originals[uid]
        what = f"{original.SOPClassUID.name} from {original.file_meta.TransferSyntaxUID.name}"
        assert got.file_meta.TransferSyntaxUID == IMPLICIT_LE, f"{what}: {got.file_meta.TransferSyntaxUID}"
        assert_pixels_equal(original, got, what)
        if original.get("LossyImageCompression") == "01" or original.file_meta.TransferSyntaxUID == J2K:
            assert got.LossyImageCompression == "01", f"{what}: lossy history lost"
    text = router.metrics()
    refused = metric_value(text, "dicom_router_fallbacks_total", destination="LEGACY", reason="refused_by_destination")
    assert refused == len(files), f"fallbacks counted as refused_by_destination: {refused} of {len(files)}"
    sent = metric_value(text, "dicom_router_forwarded_instances_total", destination="LEGACY", syntax="implicit-le")
    assert sent == len(files), f"forwarded as implicit-le: {sent} of {len(files)}"


def test_pacs_that_does_not_know_htj2k_gets_the_images_all_the_same(orthanc, router_factory, tmp_path):
    """Orthanc before 1.12 has never heard of HTJ2K: it refuses the context, the router falls back."""
    router = router_factory([
        Destination("ORTHANC", orthanc.dicom_port, '[[rule]]\nsyntax = "htj2k-lossless"\n',
                    ae_title=orthanc.ae_title, retry="{ max_attempts = 50, backoff_s = 0.5, max_backoff_s = 2 }"),
    ])
    files = copy_as_series([data("693_UNCR.dcm"), data("US1_UNCR.dcm")], tmp_path / "study", copies=2)
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}

    storescu(router.port, files)
    wait_until(lambda: orthanc.count() >= len(files), 60, interval=0.3, what=f"{len(files)} instances at Orthanc")

    stored = orthanc.by_uid()
    assert set(stored) == set(originals)
    for uid, (ts, got) in stored.items():
        assert ts in (HTJ2K_LOSSLESS, EXPLICIT_LE, IMPLICIT_LE), f"Orthanc stored {ts}"
        assert_pixels_equal(originals[uid], got, f"Orthanc {ts}")
