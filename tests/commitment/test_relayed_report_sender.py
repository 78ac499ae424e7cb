"""Relayed storage commitment (`[commitment] mode = "relay"`): a destination's report is believed
only from the destination the relay request went to, its storage commitment SCP's AE title from
an address its host resolves to, on a new association or on the N-ACTION's own; any other is
refused (0x0110, with an Error Comment), logged with who sent it, counted, and commits nothing.
And no info-level log line carries a Transaction UID, which is all a forger would need."""

from __future__ import annotations

import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from structlog.testing import capture_logs

from router import metrics
from router.commitment.decide import decide
from router.commitment.messages import (
    STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, Answer, event_information, transaction_ref,
)
from router.commitment.relay import Relayer
from router.commitment.reporter import send_on_new_association
from router.commitment.reports import AssociationReports
from router.config import Commitment, CommitmentScp, DestinationRules, Listen, ReplyAddress
from router.queue.spool import Spool
from router.queue.sqlite import SqliteQueue
from router.receive.intake import Intake
from router.receive.scp import Receiver
from tests.commitment.test_commitment_relay import CT, Archive, deliver, outcome, received, request_for, rule_file
from tests.support.peers import Destination, free_port, metric_value, wait_until

REFUSED = 0x0110


def refused_count(reason: str) -> float:
    return metrics.COMMITMENT_RELAY_REPORTS_REFUSED.labels(reason=reason)._value.get()  # noqa: SLF001


@pytest.fixture
def router_side(tmp_path):
    """A relay-mode receiver (where destinations report) and a Relayer, both reading `in_force`."""
    queue = SqliteQueue(tmp_path / "queue.sqlite")
    config = Commitment(mode="relay", relay_retry_s=30, relay_reask_s=120)
    in_force: list[DestinationRules] = []
    receiver = Receiver(Listen(host="127.0.0.1", port=free_port(), processes=1),
                        Intake(Spool(tmp_path / "spool"), queue, list),
                        AssociationReports(queue, config, destinations=lambda: list(in_force)))
    receiver.start()
    relayer = Relayer(queue, config, lambda: list(in_force), "ROUTER")
    yield queue, receiver, relayer, in_force
    relayer.stop()
    receiver.stop()
    queue.close()


def report_as(port: int, calling_ae: str, transaction_uid: str, uids: list[str], source: str = "127.0.0.1") -> Dataset:
    """Send a report "all committed" to the router's listener as `calling_ae`, from `source`;
    returns the N-EVENT-REPORT response's status data set."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER", bind_address=(source, 0),
                         ext_neg=[build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)])
    assert assoc.is_established
    try:
        information = event_information(transaction_uid, Answer(tuple((CT, uid) for uid in uids), (), ()))
        status, _ = assoc.send_n_event_report(information, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
    finally:
        assoc.release()
    return status


def test_a_report_from_another_ae_title_or_address_is_refused_and_commits_nothing(router_side, archives):
    queue, receiver, relayer, in_force = router_side
    archive = archives(report="never")
    in_force[:] = [rule_file("ARCHIVE", archive.port, host="localhost")]  # the SCP's host is a name
    received(queue, "2.25.1", "ARCHIVE")
    deliver(queue, "ARCHIVE")
    request = request_for(queue, ["2.25.1"])
    assert relayer.once(wait_s=10) == 1
    [(_, transaction_uid, _)] = archive.requests  # as it would be read off the wire or from a log
    before = {reason: refused_count(reason) for reason in ("ae_title", "address")}
    with capture_logs() as logged:
        forged_title = report_as(receiver.port, "EVIL", transaction_uid, ["2.25.1"])
        forged_address = report_as(receiver.port, "ARCHIVE", transaction_uid, ["2.25.1"], source="127.0.0.2")
    for status in (forged_title, forged_address):
        assert status.Status == REFUSED and "not from the destination asked" in status.ErrorComment
    assert queue.relay_results(request.id) == {("ARCHIVE", "2.25.1"): None}
    assert outcome(decide(queue, "relay", request, time.time(), {"ARCHIVE"})) == {"2.25.1": "pending"}
    assert refused_count("ae_title") == before["ae_title"] + 1
    assert refused_count("address") == before["address"] + 1
    refusals = [e for e in logged if e["event"] == "commitment_relay_report_refused"]
    assert [(e["log_level"], e["calling_ae"], e["source_ip"], e["cause"]) for e in refusals] == [
        ("warning", "EVIL", "127.0.0.1", "ae_title"), ("warning", "ARCHIVE", "127.0.0.2", "address")]
    # the destination asked, from an address its name resolves to: believed
    error = send_on_new_association("ARCHIVE", ReplyAddress(host="127.0.0.1", port=receiver.port, ae_title="ROUTER"),
                                    "ROUTER", event_information(transaction_uid, Answer(((CT, "2.25.1"),), (), ())), 1)
    assert error is None
    assert outcome(decide(queue, "relay", request, time.time(), {"ARCHIVE"})) == {"2.25.1": "committed"}


class Impostor(Archive):
    """A storage commitment SCP that answers the router's N-ACTION, on its association, with a
    report of another Transaction UID (`forge`)."""

    forge = ""

    def _send(self, assoc, transaction_uid: str, refs: list[tuple[str, str]]) -> None:  # noqa: ANN001
        super()._send(assoc, self.forge, refs)


def test_a_destination_cannot_report_for_another_on_its_own_n_action_s_association(router_side, archives):
    queue, _, relayer, in_force = router_side
    archive = archives(report="never")
    impostor = Impostor(report="same").start()
    try:
        in_force[:] = [rule_file("ARCHIVE", archive.port),
                       rule_file("AI", impostor.port, CommitmentScp(keep_open_s=10))]
        received(queue, "2.25.1", "ARCHIVE", "AI")
        deliver(queue, "ARCHIVE")
        deliver(queue, "AI")
        request = request_for(queue, ["2.25.1"])
        relayer.plan(time.time(), {"ARCHIVE", "AI"})
        impostor.forge = next(r.transaction_uid for r in queue.due_relays() if r.destination == "ARCHIVE")
        before = refused_count("ae_title")
        assert relayer.once(wait_s=10) == 2
        wait_until(lambda: impostor.report_errors, 10, what="the impostor's report")
        assert impostor.report_errors == [f"modality answered the N-EVENT-REPORT with 0x{REFUSED:04X}"]
        assert refused_count("ae_title") == before + 1
        assert queue.relay_results(request.id) == {("ARCHIVE", "2.25.1"): None, ("AI", "2.25.1"): None}
    finally:
        impostor.stop()


def test_no_info_line_carries_a_transaction_uid(router_side, archives):
    queue, receiver, relayer, in_force = router_side
    archive = archives(reply_to=receiver.port)
    in_force[:] = [rule_file("ARCHIVE", archive.port)]
    received(queue, "2.25.1", "ARCHIVE")
    deliver(queue, "ARCHIVE")
    reports = AssociationReports(queue, Commitment(mode="relay"), destinations=lambda: list(in_force))
    with capture_logs() as logged:
        assert reports.accept(1, event_information("2.25.900", Answer(((CT, "2.25.1"),), (), ())), "CT1") == 0
        assert relayer.once(wait_s=10) == 1
        wait_until(lambda: archive.report_errors, 10, what="the archive's report")
    [(_, relayed_uid, _)] = archive.requests
    info = [e for e in logged if e["log_level"] == "info"]
    for event in info:
        assert "2.25.900" not in repr(event) and relayed_uid not in repr(event), event
    named = {e["event"]: e["transaction"] for e in info if e["event"].startswith("commitment_")}
    assert named == {"commitment_requested": transaction_ref("2.25.900"),
                     "commitment_relay_sent": transaction_ref(relayed_uid),
                     "commitment_relay_answered": transaction_ref(relayed_uid)}


def test_the_refused_reports_counter_is_exported_from_the_start(router_factory):
    router = router_factory([Destination("PACS", free_port(), '[[rule]]\nsyntax = "original"\n')],
                            extra='[commitment]\nmode = "relay"\n')
    text = router.metrics()
    for reason in metrics.RELAY_REPORT_REFUSED_REASONS:
        assert f'dicom_router_commitment_relay_reports_refused_total{{reason="{reason}"}}' in text
        assert metric_value(text, "dicom_router_commitment_relay_reports_refused_total", reason=reason) == 0


def test_a_forged_report_is_a_security_alert_in_the_audit_trail(router_side, archives, tmp_path):
    import base64
    from pathlib import Path

    import lxml.etree as ET

    from router import audit
    from router.config import Audit

    queue, receiver, relayer, in_force = router_side
    archive = archives(report="never")
    in_force[:] = [rule_file("ARCHIVE", archive.port, host="localhost")]
    received(queue, "2.25.1", "ARCHIVE")
    deliver(queue, "ARCHIVE")
    request_for(queue, ["2.25.1"])
    assert relayer.once(wait_s=10) == 1
    [(_, transaction_uid, _)] = archive.requests
    auditor = audit.configure(Audit(url="tcp://127.0.0.1:9"), tmp_path / "audit", "ROUTER", "node-a")
    try:
        assert report_as(receiver.port, "EVIL", transaction_uid, ["2.25.1"]).Status == REFUSED
        [(_, frame)] = auditor.spool.pending()
    finally:
        audit.configure(Audit(), tmp_path, "ROUTER")
    schema = ET.RelaxNG(ET.parse(str(Path(__file__).resolve().parents[1] / "data" / "audit" /
                                     "dicom-audit-message.rng")))
    document = ET.fromstring(frame.split(b"\xef\xbb\xbf", 1)[1])
    assert schema.validate(document), schema.error_log.last_error
    assert document.find("EventIdentification/EventID").get("csd-code") == "110113"
    assert document.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    assert any(p.get("UserID") == "EVIL" and p.get("NetworkAccessPointID") == "127.0.0.1"
               for p in document.findall("ActiveParticipant"))
    detail = document.find("ParticipantObjectIdentification/ParticipantObjectDetail").get("value")
    assert "storage commitment report for ARCHIVE refused" in base64.b64decode(detail).decode()
    assert transaction_uid.encode() not in frame  # the Transaction UID stays out of the audit trail too
