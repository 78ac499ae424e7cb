"""Scenario 5: non-image objects of a study (a Basic Text SR, a Grayscale Softcopy Presentation
State, an Encapsulated PDF) pass through to Orthanc and to storescp unchanged, while the study's
image is compressed by each destination's rule.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.interop.conftest import (
    basic_text_sr,
    copy_as_series,
    encapsulated_pdf,
    grayscale_presentation_state,
    storescu,
)
from tests.support.peers import Destination, data, wait_until

pytestmark = pytest.mark.interop

RETRY = "{ max_attempts = 50, backoff_s = 0.5, max_backoff_s = 2 }"


def test_sr_presentation_state_and_pdf_pass_through_unchanged(orthanc, storescp, router_factory, tmp_path):
    scp = storescp("+xa", "+B")
    router = router_factory([
        Destination("ORTHANC", orthanc.dicom_port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n',
                    ae_title=orthanc.ae_title, retry=RETRY),
        Destination("STORESCP", scp.port, '[[rule]]\nsyntax = "jpeg-lossy"\nfallback = "j2k-lossless"\n',
                    ae_title=scp.ae_title, retry=RETRY),
    ])
    (image_path,) = copy_as_series([data("693_UNCR.dcm")], tmp_path / "study", copies=1)
    image = pydicom.dcmread(image_path)
    objects = {"SR": basic_text_sr(image), "PR": grayscale_presentation_state(image, image),
               "DOC": encapsulated_pdf(image)}
    files = [image_path]
    for name, ds in objects.items():
        path = tmp_path / "study" / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files[1:])}

    storescu(router.port, files)
    wait_until(lambda: orthanc.count() >= len(files) and scp.count() >= len(files), 60,
               interval=0.3, what=f"{len(files)} objects at both destinations")

    stored = orthanc.by_uid()
    received = scp.by_uid()
    for destination, got_all in (("Orthanc", {u: ds for u, (_, ds) in stored.items()}), ("storescp", received)):
        for uid, original in originals.items():
            assert uid in got_all, f"{destination} did not receive the {original.Modality} object"
            got = got_all[uid]
            what = f"{destination} {original.SOPClassUID.name}"
            assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, what
            assert got.SOPClassUID == original.SOPClassUID, what
            assert set(got.keys()) == set(original.keys()), (
                f"{what}: elements added {sorted(set(got.keys()) - set(original.keys()))}, "
                f"removed {sorted(set(original.keys()) - set(got.keys()))}"
            )
            assert got == original, f"{what}: content changed"
    for uid, original in originals.items():
        assert stored[uid][0] == original.file_meta.TransferSyntaxUID, "Orthanc's TransferSyntax metadata"
    pdf = next(ds for ds in received.values() if ds.Modality == "DOC")
    assert pdf.EncapsulatedDocument.startswith(b"%PDF-1.4") and b"%%EOF" in pdf.EncapsulatedDocument
    # the image of the same study did go through each destination's rule
    assert stored[str(image.SOPInstanceUID)][0] == "1.2.840.10008.1.2.4.80"
    assert str(image.SOPInstanceUID) in received
    assert received[str(image.SOPInstanceUID)].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
