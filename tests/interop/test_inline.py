"""Inline between a modality and its PACS: private and unknown storage SOP classes go through
untouched, non-storage services are still refused, and the PACS can see the modality's own
calling AE title."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification  # type: ignore

from tests.interop.conftest import copy_as_series, storescu
from tests.support.peers import Destination, data, send, wait_until

pytestmark = pytest.mark.interop

CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage


def private_instance(path, sop_class: str = CSA_NON_IMAGE) -> bytes:
    """A vendor-private storage object: no pixel data, a private block of binary data."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "INLINE1", "Inline^Test", "MR"
    ds.InstanceNumber = 1
    block = ds.private_block(0x0029, "SIEMENS CSA NON-IMAGE", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * 16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_a_private_sop_class_reaches_orthanc_and_storescp_untouched(router_factory, orthanc, storescp, tmp_path):
    promiscuous = storescp("-pm", "+B", ae_title="STORESCP")
    router = router_factory([
        Destination("ORTHANC", orthanc.dicom_port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n', ae_title=orthanc.ae_title),
        Destination("STORESCP", promiscuous.port, '[[rule]]\nsyntax = "original"\n', ae_title="STORESCP"),
    ])
    sent = tmp_path / "csa.dcm"
    original = private_instance(sent)
    assert send(router.port, [sent]) == [0]
    wait_until(lambda: orthanc.count() == 1 and promiscuous.count() == 1, 60, what="both destinations")
    uid = str(pydicom.dcmread(sent).SOPInstanceUID)
    [(_, at_orthanc)] = orthanc.by_uid().values()
    [at_storescp] = promiscuous.files()
    for got in (at_orthanc, pydicom.dcmread(at_storescp)):
        assert got.SOPClassUID == CSA_NON_IMAGE and got.SOPInstanceUID == uid
        assert got[0x0029, 0x1010].value == pydicom.dcmread(sent)[0x0029, 0x1010].value
    # storescp +B writes the data set exactly as it arrived: the bytes the modality sent
    assert at_storescp.read_bytes()[-4096:] == original[-4096:]


def test_a_destination_that_refuses_the_class_gets_a_dead_letter_that_says_so(router_factory, pacs, tmp_path):
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')])
    sent = tmp_path / "csa.dcm"
    private_instance(sent)
    assert send(router.port, [sent]) == [0]
    wait_until(lambda: "dead" in router.cli("queue", "dead").stdout.split("\n", 1)[-1], 30, what="a dead letter")
    listing = router.cli("queue", "dead").stdout
    assert f"accepts no presentation context for SOP class {CSA_NON_IMAGE}" in listing


def test_unknown_classes_can_be_refused_and_other_services_always_are(router_factory, pacs, tmp_path):
    strict = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')],
                            listen_extra="accept_unknown_sop_classes = false")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CSA_NON_IMAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(Verification)
    for router, private_accepted in ((strict, False), (router_factory([Destination("PACS", pacs.port,
                                                                          '[[rule]]\nsyntax = "original"\n')]), True)):
        assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
        assert assoc.is_established
        try:
            results = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts + assoc.accepted_contexts}
            assert (results[CSA_NON_IMAGE] == 0) is private_accepted, results
            assert results[str(StudyRootQueryRetrieveInformationModelFind)] == 3  # abstract syntax not supported
            assert results[str(Verification)] == 0
        finally:
            assoc.release()


def test_orthanc_sees_the_modality_s_calling_ae_title(router_factory, orthanc, tmp_path):
    router = router_factory([
        Destination("ORTHANC", orthanc.dicom_port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n', ae_title=orthanc.ae_title,
                    extra="forward_calling_ae_title = true"),
    ])
    ct = copy_as_series([data("693_UNCR.dcm")], tmp_path / "ct", copies=2)
    mr = copy_as_series([data("MR2_UNCR.dcm")], tmp_path / "mr", copies=2)
    storescu(router.port, ct, calling_ae="CT_ROOM2")
    storescu(router.port, mr, calling_ae="MR_3T")
    wait_until(lambda: orthanc.count() == 4, 60, what="four instances at Orthanc")
    seen = {}
    for instance_id in orthanc.instances():
        modality = orthanc.dataset(instance_id).Modality
        seen.setdefault(modality, set()).add(orthanc.get(f"/instances/{instance_id}/metadata/RemoteAET").decode())
    assert seen == {"CT": {"CT_ROOM2"}, "MR": {"MR_3T"}}
