"""Storage commitment with Orthanc as the modality: Orthanc stores through the router, asks it
for commitment (N-ACTION) and receives the report on a new association to its own DICOM port,
as a modality configured for storage commitment does."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pydicom
import pytest

from tests.interop.conftest import Orthanc, copy_as_series, require
from tests.peers import Destination, Pacs, RouterProcess, data, metric_value, wait_until

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
        assert metric_value(router.metrics(), "dicom_router_commitment_reports_total", outcome="committed") == 1
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
        text = router.metrics()
        assert metric_value(text, "dicom_router_commitment_reports_total", outcome="failures", association="new") == 1
        assert metric_value(text, "dicom_router_commitment_instances_total", result="failed") == 2
    finally:
        router.kill()

