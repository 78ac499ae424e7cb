"""Storage commitment with Orthanc as the modality: Orthanc stores through the router, asks it
for commitment (N-ACTION) and receives the report on a new association to its own DICOM port,
as a modality configured for storage commitment does. And with Orthanc as the PACS, for
`[commitment] mode = "relay"`: the router asks Orthanc's own storage commitment SCP, which
reports on a new association to the router (the DICOM node it knows the router as), and the
modality hears what Orthanc answered."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pydicom
import pytest

from tests.interop.conftest import Orthanc, copy_as_series, require
from tests.support.peers import (
    CommittingModality, Destination, Pacs, RouterProcess, data, free_port, make_series, metric_value, references, send,
    wait_until,
)

pytestmark = pytest.mark.interop

PATIENT_RETRY = "{ max_attempts = 100, backoff_s = 0.2, max_backoff_s = 0.5 }"


def _call(orthanc: Orthanc, method: str, path: str, body: object) -> object:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(orthanc.url + path, data=payload, method=method)
    with urllib.request.urlopen(request, timeout=60) as rsp:
        text = rsp.read()
    return json.loads(text) if text.strip() else None


@pytest.fixture
def modality_orthanc(tmp_path):
    require("Orthanc")
    server = Orthanc(tmp_path / "modality", ae_title="ORTHANC_CT").start()
    yield server
    server.stop(signal.SIGKILL)


def _router(tmp_path, pacs_port: int, orthanc: Orthanc, **destination) -> RouterProcess:
    workdir = tmp_path / "router"
    workdir.mkdir()
    router = RouterProcess(
        workdir, [Destination("PACS", pacs_port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n', retry=PATIENT_RETRY,
                              **destination)],
        extra=f'[commitment]\nmode = "delivered"\n'
              f'modalities = {{ {orthanc.ae_title} = {{ host = "127.0.0.1", port = {orthanc.dicom_port} }} }}\n',
    )
    router.start()
    # the router is a DICOM node Orthanc knows: where it stores, and who may send it reports
    _call(orthanc, "PUT", "/modalities/router", {"AET": "ROUTER", "Host": "127.0.0.1", "Port": router.port})
    return router


def _upload(orthanc: Orthanc, files) -> list[str]:  # noqa: ANN001
    return [_call(orthanc, "POST", "/instances", path.read_bytes())["ID"] for path in files]


def _commitment(orthanc: Orthanc, transaction_uid: str) -> dict:
    """Orthanc's view of one of its commitment requests: Status Pending, Success or Failure."""
    return orthanc.get_json(f"/storage-commitment/{transaction_uid}")


def test_orthanc_as_the_modality_hears_committed_only_once_the_pacs_has_every_instance(tmp_path, modality_orthanc):
    pacs = Pacs(tmp_path / "pacs")  # not started: the PACS is down
    router = _router(tmp_path, pacs.port, modality_orthanc)
    try:
        files = copy_as_series([data("693_UNCR.dcm")], tmp_path / "ct", copies=3)
        ids = _upload(modality_orthanc, files)
        assert _call(modality_orthanc, "POST", "/modalities/router/store",
                     {"Resources": ids, "Synchronous": True})["FailedInstancesCount"] == 0
        asked = _call(modality_orthanc, "POST", "/modalities/router/storage-commitment", {"Resources": ids})
        transaction = asked["ID"]
        time.sleep(2)
        assert _commitment(modality_orthanc, transaction)["Status"] == "Pending"  # nothing reached the PACS
        pacs.start()
        wait_until(lambda: _commitment(modality_orthanc, transaction)["Status"] != "Pending", 60,
                   what=f"Orthanc's commitment report\n{router.log()}")
        report = _commitment(modality_orthanc, transaction)
        assert report["Status"] == "Success", report
        uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        assert {item["SOPInstanceUID"] for item in report["Success"]} == uids
        assert set(pacs.by_uid()) == uids
        # counted once the report's association is released, a moment after Orthanc has it
        wait_until(lambda: metric_value(router.metrics(), "dicom_router_commitment_reports_total",
                                        outcome="committed") == 1, 10, what="the report counted")
    finally:
        pacs.stop()
        router.kill()


def test_orthanc_storing_with_storage_commitment_hears_a_dead_letter_as_a_failure(
        tmp_path, modality_orthanc, pacs_factory):
    pacs = pacs_factory(status=0xC000)  # refuses every instance, permanently
    router = _router(tmp_path, pacs.port, modality_orthanc)
    try:
        files = copy_as_series([data("MR2_UNCR.dcm")], tmp_path / "mr", copies=2)
        ids = _upload(modality_orthanc, files)
        stored = _call(modality_orthanc, "POST", "/modalities/router/store",
                       {"Resources": ids, "Synchronous": True, "StorageCommitment": True})
        transaction = stored["StorageCommitmentTransactionUID"]
        wait_until(lambda: _commitment(modality_orthanc, transaction)["Status"] != "Pending", 60,
                   what=f"Orthanc's commitment report\n{router.log()}")
        report = _commitment(modality_orthanc, transaction)
        assert report["Status"] == "Failure", report
        assert {item["FailureReason"] for item in report["Failures"]} == {0x0110}
        assert len(report["Failures"]) == 2 and not report["Success"]
        # counted once Orthanc has answered the report, a moment after it shows the result
        wait_until(lambda: metric_value(router.metrics(), "dicom_router_commitment_reports_total", outcome="failures",
                                        association="new") == 1, 10, what="the report counted")
        assert metric_value(router.metrics(), "dicom_router_commitment_instances_total", result="failed") == 2
    finally:
        router.kill()


# -- relay: Orthanc as the PACS, asked for its own commitment ----------------------------------------------
NO_SUCH_OBJECT_INSTANCE, PROCESSING_FAILURE = 0x0112, 0x0110
LOSSY = '[[rule]]\nsyntax = "jpeg-ls-near-lossless"\nnear = 2\n'  # goes out under a new SOP Instance UID


@pytest.fixture
def modality():
    m = CommittingModality("CT1").listen()
    yield m
    m.stop()


def _relaying_router(tmp_path, destinations: list[Destination], modalities: str, **commitment: float) -> RouterProcess:
    settings = {"relay_retry_s": 0.5, **commitment}
    workdir = tmp_path / "router"
    workdir.mkdir(exist_ok=True)
    return RouterProcess(
        workdir, destinations,
        extra='[commitment]\nmode = "relay"\nreport_retry_s = 0.5\n'
              + "".join(f"{key} = {value}\n" for key, value in settings.items())
              + f"modalities = {{ {modalities} }}\n",
    )


def _knows_router(pacs: Orthanc, port: int) -> None:
    """The PACS's entry for the router: where it sends its storage commitment reports."""
    _call(pacs, "PUT", "/modalities/router", {"AET": "ROUTER", "Host": "127.0.0.1", "Port": port})


def _logged(router: RouterProcess, event: str) -> list[dict]:
    return [json.loads(line) for line in router.log().splitlines() if f'"{event}"' in line]


@pytest.mark.slow
def test_relay_orthanc_to_orthanc_committed_only_once_the_pacs_committed_what_it_received(tmp_path, modality_orthanc):
    pacs = Orthanc(tmp_path / "pacs", ae_title="PACS")  # not started: the PACS is down
    router = _relaying_router(
        tmp_path, [Destination("PACS", pacs.dicom_port, LOSSY, retry=PATIENT_RETRY, extra="commitment = true\n")],
        f'{modality_orthanc.ae_title} = {{ host = "127.0.0.1", port = {modality_orthanc.dicom_port} }}')
    router.start()
    _call(modality_orthanc, "PUT", "/modalities/router", {"AET": "ROUTER", "Host": "127.0.0.1", "Port": router.port})
    try:
        files = copy_as_series([data("693_UNCR.dcm")], tmp_path / "ct", copies=3)
        ids = _upload(modality_orthanc, files)
        stored = _call(modality_orthanc, "POST", "/modalities/router/store",
                       {"Resources": ids, "Synchronous": True, "StorageCommitment": True})
        transaction = stored["StorageCommitmentTransactionUID"]
        time.sleep(2)
        assert _commitment(modality_orthanc, transaction)["Status"] == "Pending"  # nothing reached the PACS
        assert metric_value(router.metrics(), "dicom_router_commitment_pending_requests", state="waiting") == 1
        pacs.start()
        _knows_router(pacs, router.port)
        wait_until(lambda: _commitment(modality_orthanc, transaction)["Status"] != "Pending", 60,
                   what=f"Orthanc's commitment report\n{router.log()}\n{pacs.log()}")
        report = _commitment(modality_orthanc, transaction)
        assert report["Status"] == "Success", report
        uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        assert {item["SOPInstanceUID"] for item in report["Success"]} == uids  # as the modality sent them
        at_pacs = set(pacs.by_uid())
        assert len(at_pacs) == 3 and not at_pacs & uids  # lossy copies, under new UIDs: asked for as sent
        [answered] = _logged(router, "commitment_relay_answered")
        assert answered["association"] == "new" and answered["calling_ae"] == "PACS" and answered["committed"] == 3
        text = router.metrics()
        assert metric_value(text, "dicom_router_commitment_relayed_instances_total", destination="PACS",
                            result="committed") == 3
        assert metric_value(text, "dicom_router_commitment_relay_requests") == 0
    finally:
        pacs.stop()
        router.kill()


def test_relay_an_instance_the_pacs_no_longer_has_fails_with_the_pacs_s_reason(tmp_path, orthanc_factory, modality):
    pacs = orthanc_factory("PACS")
    router = _relaying_router(
        tmp_path, [Destination("PACS", pacs.dicom_port, LOSSY, extra="commitment = true\n")],
        f'CT1 = {{ host = "127.0.0.1", port = {modality.port} }}')
    router.start()
    _knows_router(pacs, router.port)
    try:
        series = make_series(data("693_UNCR.dcm"), 2, tmp_path / "series")
        assert send(router.port, series, calling_ae="CT1") == [0, 0]
        wait_until(lambda: pacs.count() == 2, 30, what=f"both at the PACS\n{router.log()}")
        [lost] = [i for i in pacs.instances()
                  if pacs.get_json(f"/instances/{i}/simplified-tags")["InstanceNumber"] == "2"]
        _call(pacs, "DELETE", f"/instances/{lost}", b"")  # the archive lost it before anyone asked
        status, transaction = modality.request(router.port, references(series))
        assert status == 0x0000
        wait_until(lambda: modality.report(transaction), 30, what=f"the report\n{router.log()}")
        report = modality.report(transaction)
        first, second = (uid for _, uid in references(series))
        assert report.event_type == 2 and report.committed == [first]
        assert report.failed == {second: NO_SUCH_OBJECT_INSTANCE}  # Orthanc's reason, under the modality's UID
    finally:
        router.kill()


def test_relay_with_a_plain_storescp_counts_its_c_store_or_fails_when_said_to_have_commitment(
        tmp_path, orthanc_factory, storescp, modality):
    pacs = orthanc_factory("PACS")
    workstation = storescp(ae_title="WORKSTATION")  # no commitment option: its C-STORE success counts
    viewer = storescp("--fork", ae_title="VIEWER")  # said to have a storage commitment SCP, which it has not
    router = _relaying_router(tmp_path, [
        Destination("PACS", pacs.dicom_port, '[[rule]]\nsyntax = "original"\n', extra="commitment = true\n"),
        Destination("WORKSTATION", workstation.port, '[[rule]]\nsyntax = "original"\n', ae_title="WORKSTATION"),
        Destination("VIEWER", viewer.port, '[[rule]]\nmatch = { InstanceNumber = 2 }\nsyntax = "original"\n',
                    ae_title="VIEWER", extra="commitment = true\n"),
    ], f'CT1 = {{ host = "127.0.0.1", port = {modality.port} }}')
    router.start()
    _knows_router(pacs, router.port)
    try:
        series = make_series(data("693_UNCR.dcm"), 2, tmp_path / "series")
        assert send(router.port, series, calling_ae="CT1") == [0, 0]
        status, transaction = modality.request(router.port, references(series))
        assert status == 0x0000
        wait_until(lambda: modality.report(transaction), 30, what=f"the report\n{router.log()}")
        report = modality.report(transaction)
        first, second = (uid for _, uid in references(series))
        assert report.committed == [first] and report.failed == {second: PROCESSING_FAILURE}
        assert workstation.count() == 2 and viewer.count() == 1 and pacs.count() == 2
        [refused] = _logged(router, "commitment_relay_refused")
        assert refused["destination"] == "VIEWER" and "no storage commitment SCP" in refused["error"]
    finally:
        router.kill()


@pytest.mark.slow
def test_relay_a_report_lost_while_the_router_was_killed_is_asked_for_again_after_restart(
        tmp_path, orthanc_factory, modality):
    pacs = orthanc_factory("PACS")
    router = _relaying_router(
        tmp_path, [Destination("PACS", pacs.dicom_port, '[[rule]]\nsyntax = "original"\n',
                               extra="commitment = true\n")],
        f'CT1 = {{ host = "127.0.0.1", port = {modality.port} }}', relay_reask_s=3)
    router.start()
    _knows_router(pacs, free_port())  # the PACS's entry for the router is wrong: its report is lost
    try:
        series = make_series(data("693_UNCR.dcm"), 2, tmp_path / "series")
        assert send(router.port, series, calling_ae="CT1") == [0, 0]
        status, transaction = modality.request(router.port, references(series))
        assert status == 0x0000
        wait_until(lambda: _logged(router, "commitment_relay_sent"), 30, what=f"the N-ACTION\n{router.log()}")
        assert metric_value(router.metrics(), "dicom_router_commitment_relay_requests", destination="PACS",
                            state="awaiting_report") == 1
        router.kill()  # SIGKILL: the relay request was only in the queue database
        _knows_router(pacs, router.port)
        router.start()
        wait_until(lambda: modality.report(transaction), 60, what=f"the report after restart\n{router.log()}")
        report = modality.report(transaction)
        assert report.event_type == 1 and sorted(report.committed) == sorted(uid for _, uid in references(series))
        asked = _logged(router, "commitment_relay_sent")
        assert len(asked) == 2 and asked[0]["transaction"] == asked[1]["transaction"], router.log()  # asked again
        # ... only once the restarted router listens: a report to an N-ACTION sent before would find no one
        assert asked[1]["timestamp"] > _logged(router, "listening")[-1]["timestamp"], router.log()
    finally:
        router.kill()


def test_relay_to_a_pacs_that_does_not_know_the_router_is_retried_until_it_does(tmp_path, orthanc_factory, modality):
    pacs = orthanc_factory("PACS")  # no entry for the router yet: Orthanc drops its N-ACTION
    router = _relaying_router(
        tmp_path, [Destination("PACS", pacs.dicom_port, '[[rule]]\nsyntax = "original"\n',
                               extra="commitment = true\n")],
        f'CT1 = {{ host = "127.0.0.1", port = {modality.port} }}')
    router.start()
    try:
        series = make_series(data("693_UNCR.dcm"), 1, tmp_path / "series")
        assert send(router.port, series, calling_ae="CT1") == [0]
        status, transaction = modality.request(router.port, references(series))
        assert status == 0x0000
        wait_until(lambda: _logged(router, "commitment_relay_failed"), 30, what=f"a failed N-ACTION\n{router.log()}")
        assert "does it know the router as ROUTER" in _logged(router, "commitment_relay_failed")[0]["error"]
        assert modality.report(transaction) is None
        _knows_router(pacs, router.port)
        wait_until(lambda: modality.report(transaction), 30, what=f"the report\n{router.log()}")
        assert modality.report(transaction).committed == [uid for _, uid in references(series)]
    finally:
        router.kill()
