"""A UID that is not a valid UI value (PS3.5 9.1: digits and dots, at most 64 characters), in the
C-STORE request or in the data set's SOP Class, SOP Instance, Study or Series Instance UID: the
modality hears 0xC000, nothing is kept or forwarded, the refusal is one JSON log line with the
value escaped, and the association goes on. pydicom's warnings about such values are JSON log
events too, never raw text on stderr.
"""

from __future__ import annotations

import json

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from router.compat.pynetdicom import park_reactor

from tests.support.peers import Destination, Pacs, RouterProcess, data, metric_value, wait_until

RULE = '[[rule]]\nsyntax = "original"\n'
CT = data("693_UNCR.dcm")
ESC = "\x1b"


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    root = tmp_path_factory.mktemp("uids")
    pacs = Pacs(root / "pacs").start()
    router = RouterProcess(root / "router", [Destination("PACS", pacs.port, RULE)], listen_extra="processes = 1")
    try:
        router.start()
        yield router, pacs
    finally:
        router.kill()
        pacs.stop()


def instance(**uids: str) -> Dataset:
    """The CT slice under a new SOP Instance UID, with `uids` (keyword: value) set as given."""
    ds = dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in uids.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def store(port: int, *datasets: Dataset) -> list[int]:
    """C-STORE each data set on one association (its Affected SOP Instance UID is the data set's)."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER")
    assert assoc.is_established
    try:
        statuses = []
        for ds in datasets:
            park_reactor(assoc)
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        return statuses
    finally:
        if assoc.is_established:
            assoc.release()


BAD = {
    "escape and newline": "1.2.826.0.1.3680043.9.7\x1b[31m\nforged",
    "space": "1.2.826.0.1.3680043.9.7 1",
    "quote": "1.2.826.0.1.3680043.9.7'",
    "letters": "1.2.826.0.1.3680043.9.7a",
    "empty component": "1.2.826..1.3680043.9.7",
    "too long": "1.2." + "9" * 61,
}


CASES = [pytest.param(keyword, value, id=f"{keyword}-{case}") for keyword in ("SOPInstanceUID", "StudyInstanceUID",
                                                                           "SeriesInstanceUID")
         for case, value in BAD.items()
         if (keyword, case) != ("SOPInstanceUID", "too long")]  # pynetdicom sends no request UID over 64


def refusals(router: RouterProcess, sop_instance_uid: str) -> list[dict]:
    events = (json.loads(line) for line in router.log().splitlines() if '"store_refused"' in line)
    return [e for e in events if e.get("sop_instance_uid") == sop_instance_uid]


@pytest.mark.parametrize(("keyword", "value"), CASES)
def test_an_instance_whose_uid_is_not_a_valid_ui_is_refused_with_c000(peers, keyword, value):
    router, pacs = peers
    before = metric_value(router.metrics(), "dicom_router_rejected_total", reason="malformed")
    bad, good = instance(**{keyword: value}), instance()
    assert store(router.port, bad, good) == [0xC000, 0x0000]  # refused, and the association went on
    wait_until(lambda: str(good.SOPInstanceUID) in pacs.by_uid(), 20, what="the good instance at the PACS")
    assert str(bad.SOPInstanceUID) not in pacs.by_uid()
    assert metric_value(router.metrics(), "dicom_router_rejected_total", reason="malformed") == before + 1
    refused = refusals(router, str(bad.SOPInstanceUID))
    assert refused and refused[-1]["status"] == "0xC000" and "UID" in refused[-1]["reason"], refused


def test_a_uid_with_leading_zeros_in_a_component_is_accepted_and_forwarded_unchanged(peers):
    router, pacs = peers
    uid = "1.2.826.0.1.3680043.9.7.0123.045"
    assert store(router.port, instance(SOPInstanceUID=uid)) == [0x0000]
    wait_until(lambda: uid in pacs.by_uid(), 20, what="the instance at the PACS")
    assert str(pacs.by_uid()[uid].dataset().SOPInstanceUID) == uid


def test_what_the_router_writes_to_stderr_is_json_with_no_raw_control_character(peers):
    router, _ = peers
    assert store(router.port, instance(SOPInstanceUID=BAD["escape and newline"]),
                 instance(StudyInstanceUID=BAD["escape and newline"])) == [0xC000, 0xC000]
    text = router.log()
    assert ESC not in text and "\nforged" not in text
    listed = router.cli("queue", "-v").stdout + router.cli("queue", "dead").stdout
    assert "forged" not in listed  # nothing of them was kept
    for line in text.splitlines():
        if line.strip():
            json.loads(line)  # every line an event: pydicom's warnings too
    warned = [json.loads(line) for line in text.splitlines() if '"python_warning"' in line]
    assert warned and all(e["category"] and e["message"] for e in warned)
