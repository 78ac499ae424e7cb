"""Storage commitment, in-process: what is committed, failed or pending under each mode, the
durable requests and their one report, and the protocol against a pynetdicom modality (the
report on the association the request came on, or on a new one with the SCP role)."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom.dataset import Dataset

from router.commitment.accept import accept_request
from router.commitment.decide import decide
from router.commitment.messages import (
    CLASS_INSTANCE_CONFLICT, DUPLICATE_TRANSACTION_UID, FAILURES_EXIST, MISSING_ATTRIBUTE, NO_SUCH_ACTION,
    NO_SUCH_OBJECT_INSTANCE, PROCESSING_FAILURE, MalformedRequest, Transaction, event_information, parse_request,
    transaction_ref,
)
from router.commitment.reporter import Reporter
from router.commitment.reports import AssociationReports
from router.config import Commitment, Listen, ReplyAddress
from router.receive.intake import Intake
from router.queue import Delivery, Instance, NewJob
from router.queue.sqlite import SqliteQueue
from router.request import Request
from router.receive.scp import Receiver
from router.queue.spool import Spool
from tests.support.peers import (
    CommittingModality, Destination, Pacs, data, free_port, make_series, metric_value, references, send, wait_until,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def queue(tmp_path):
    q = SqliteQueue(tmp_path / "queue.sqlite")
    yield q
    q.close()


def received(queue: SqliteQueue, uid: str, *destinations: str, sop_class: str = CT) -> None:
    queue.add(Instance(path=f"/spool/{uid}.dcm", sop_class_uid=sop_class, sop_instance_uid=uid,
                       study_instance_uid="2.25.100", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="CT1",
                       called_ae="ROUTER", source_ip="127.0.0.1", size=100, received_at=time.time()),
              [NewJob(name, Request(syntax="original"), "t") for name in destinations])


def deliver(queue: SqliteQueue, destination: str) -> None:
    queue.complete([Delivery(job.id) for job in queue.claim(destination, 100)])


def request_for(queue: SqliteQueue, uids: list[str], transaction_uid: str = "2.25.900", timeout_s: float = 3600,
                sop_class: str = CT):
    accept_request(queue, Transaction(transaction_uid, tuple((sop_class, u) for u in uids)), "CT1", timeout_s)
    return [r for r in queue.pending_commitments() if r.transaction_uid == transaction_uid][-1]


def outcome(answer) -> dict[str, str | int]:  # noqa: ANN001
    found: dict[str, str | int] = {uid: "committed" for _, uid in answer.committed}
    found.update({uid: "pending" for _, uid in answer.pending})
    found.update({uid: reason for (_, uid), reason in answer.failed})
    return found


# -- the request --------------------------------------------------------------------------------------
def _information(**fields) -> Dataset:
    ds = Dataset()
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    return ds


def _item(sop_class: str, uid: str) -> Dataset:
    return _information(ReferencedSOPClassUID=sop_class, ReferencedSOPInstanceUID=uid)


def test_a_request_is_read_from_its_transaction_uid_and_referenced_instances():
    transaction = parse_request(1, _information(TransactionUID="2.25.1", ReferencedSOPSequence=[_item(CT, "2.25.2")]))
    assert transaction == Transaction("2.25.1", ((CT, "2.25.2"),))


@pytest.mark.parametrize(("action_type", "information", "status"), [
    (2, _information(TransactionUID="2.25.1", ReferencedSOPSequence=[_item(CT, "2.25.2")]), NO_SUCH_ACTION),
    (1, None, MISSING_ATTRIBUTE),
    (1, _information(ReferencedSOPSequence=[_item(CT, "2.25.2")]), MISSING_ATTRIBUTE),
    (1, _information(TransactionUID="2.25.1"), MISSING_ATTRIBUTE),
    (1, _information(TransactionUID="2.25.1", ReferencedSOPSequence=[_information(ReferencedSOPClassUID=CT)]),
     MISSING_ATTRIBUTE),
])
def test_a_malformed_request_gets_the_failure_status_that_says_why(action_type, information, status):
    with pytest.raises(MalformedRequest) as refused:
        parse_request(action_type, information)
    assert refused.value.status == status


# -- the decision -------------------------------------------------------------------------------------
def test_delivered_commits_an_instance_once_every_destination_its_rules_name_stored_it(queue):
    received(queue, "2.25.1", "PACS", "ARCHIVE")
    request = request_for(queue, ["2.25.1"])
    assert outcome(decide(queue, "delivered", request, time.time())) == {"2.25.1": "pending"}
    deliver(queue, "PACS")
    assert outcome(decide(queue, "delivered", request, time.time())) == {"2.25.1": "pending"}
    deliver(queue, "ARCHIVE")
    answer = decide(queue, "delivered", request, time.time())
    assert outcome(answer) == {"2.25.1": "committed"} and answer.event_type == 1


def test_dead_letters_fail_with_processing_failure_and_unknown_instances_with_no_such_object(queue):
    received(queue, "2.25.1", "PACS")
    received(queue, "2.25.2", "PACS")
    first, second = queue.claim("PACS", 10)
    queue.complete([first.id])
    queue.dead(second.id, "destination answered 0xC000 (permanent failure)")
    answer = decide(queue, "delivered", request_for(queue, ["2.25.1", "2.25.2", "2.25.404"]), time.time())
    assert outcome(answer) == {"2.25.1": "committed", "2.25.2": PROCESSING_FAILURE,
                               "2.25.404": NO_SUCH_OBJECT_INSTANCE}
    assert answer.event_type == FAILURES_EXIST


def test_a_dead_letter_retried_and_delivered_is_committed(queue):
    received(queue, "2.25.1", "PACS")
    [job] = queue.claim("PACS", 10)
    queue.dead(job.id, "destination answered 0xC000 (permanent failure)")
    request = request_for(queue, ["2.25.1"])
    assert queue.retry_dead("PACS") == 1
    assert outcome(decide(queue, "delivered", request, time.time())) == {"2.25.1": "pending"}
    deliver(queue, "PACS")
    assert outcome(decide(queue, "delivered", request, time.time())) == {"2.25.1": "committed"}


def test_an_instance_received_as_another_sop_class_fails_with_class_instance_conflict(queue):
    received(queue, "2.25.1", "PACS")
    deliver(queue, "PACS")
    answer = decide(queue, "delivered", request_for(queue, ["2.25.1"], sop_class=MR), time.time())
    assert outcome(answer) == {"2.25.1": CLASS_INSTANCE_CONFLICT}


def test_an_instance_no_rule_sends_anywhere_is_committed_once_durable(queue):
    received(queue, "2.25.1")  # no job: not forwarded
    assert outcome(decide(queue, "delivered", request_for(queue, ["2.25.1"]), time.time())) == {"2.25.1": "committed"}


def test_spooled_commits_what_is_durable_before_it_is_delivered(queue):
    received(queue, "2.25.1", "PACS")
    answer = decide(queue, "spooled", request_for(queue, ["2.25.1", "2.25.404"]), time.time())
    assert outcome(answer) == {"2.25.1": "committed", "2.25.404": NO_SUCH_OBJECT_INSTANCE}


def test_past_the_timeout_what_is_still_undelivered_fails_with_processing_failure(queue):
    received(queue, "2.25.1", "PACS")
    received(queue, "2.25.2", "PACS")
    [job] = queue.claim("PACS", 1)
    queue.complete([job.id])
    request = request_for(queue, ["2.25.1", "2.25.2"], timeout_s=60)
    assert outcome(decide(queue, "delivered", request, request.received_at + 59)) == {
        "2.25.1": "committed", "2.25.2": "pending"}
    assert outcome(decide(queue, "delivered", request, request.received_at + 60)) == {
        "2.25.1": "committed", "2.25.2": PROCESSING_FAILURE}


def test_the_event_information_lists_committed_and_failed_instances_with_their_reasons(queue):
    received(queue, "2.25.1")
    answer = decide(queue, "delivered", request_for(queue, ["2.25.1", "2.25.404"]), time.time())
    ds = event_information("2.25.900", answer)
    assert ds.TransactionUID == "2.25.900"
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence] == [(CT, "2.25.1")]
    [failed] = ds.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == ("2.25.404", NO_SUCH_OBJECT_INSTANCE)


# -- durable requests, one report ---------------------------------------------------------------------
def test_a_repeated_request_is_kept_once_and_a_reused_transaction_uid_fails_with_0x0131(queue):
    refs = ((CT, "2.25.1"),)
    assert accept_request(queue, Transaction("2.25.900", refs), "CT1", 3600) == "new"
    assert accept_request(queue, Transaction("2.25.900", refs), "CT1", 3600) == "repeated"
    assert accept_request(queue, Transaction("2.25.900", ((CT, "2.25.2"),)), "CT1", 3600) == "duplicate"
    first, duplicate = queue.pending_commitments()
    assert not first.duplicate and duplicate.duplicate
    assert outcome(decide(queue, "delivered", duplicate, time.time())) == {"2.25.2": DUPLICATE_TRANSACTION_UID}


def test_a_pending_request_survives_a_new_queue_connection(queue, tmp_path):
    accept_request(queue, Transaction("2.25.900", ((CT, "2.25.1"),)), "CT1", 3600, holder="gone-process")
    after_restart = SqliteQueue(tmp_path / "queue.sqlite")
    after_restart.recover()  # the holding association's process is gone
    [request] = after_restart.pending_commitments()
    assert request.transaction_uid == "2.25.900" and request.references == ((CT, "2.25.1"),)
    after_restart.close()


def test_a_report_is_claimed_by_one_process_only_and_a_dead_claimer_s_claim_expires(queue):
    request = request_for(queue, ["2.25.1"])
    assert queue.claim_commitment(request.id, "receiver-1", time.time() + 60)
    assert not queue.claim_commitment(request.id, "reporter", time.time() + 60)
    assert queue.pending_commitments() == []
    queue.commitment_reported(request.id, 1)
    assert not queue.claim_commitment(request.id, "reporter", time.time() + 60)
    other = request_for(queue, ["2.25.2"], transaction_uid="2.25.901")
    assert queue.claim_commitment(other.id, "receiver-1", time.time() - 1)  # its claimer died since
    [again] = queue.pending_commitments()
    assert again.id == other.id and queue.claim_commitment(other.id, "reporter", time.time() + 60)


def test_a_request_held_by_an_open_association_is_not_the_supervisor_s_until_the_hold_ends(queue):
    accept_request(queue, Transaction("2.25.900", ((CT, "2.25.1"),)), "CT1", 3600, holder="assoc-1")
    assert queue.pending_commitments() == []
    assert [r.transaction_uid for r in queue.pending_commitments(holder="assoc-1")] == ["2.25.900"]
    queue.hold_commitments("assoc-1", 0.0)  # the association ended
    assert [r.transaction_uid for r in queue.pending_commitments()] == ["2.25.900"]


# -- the protocol, against a pynetdicom modality -----------------------------------------------------------
@pytest.fixture
def modality():
    m = CommittingModality("CT1").listen()
    yield m
    m.stop()


def test_the_report_goes_on_a_new_association_with_the_router_in_the_scp_role(queue, modality):
    received(queue, "2.25.1", "PACS")
    deliver(queue, "PACS")
    accept_request(queue, Transaction("2.25.900", ((CT, "2.25.1"), (CT, "2.25.404"))), "CT1", 3600)
    config = Commitment(modalities={"CT1": ReplyAddress(host="127.0.0.1", port=modality.port)})
    assert Reporter(queue, config, "ROUTER").once(wait_s=10) == 1
    report = modality.report("2.25.900")
    assert report.committed == ["2.25.1"] and report.failed == {"2.25.404": NO_SUCH_OBJECT_INSTANCE}
    assert report.event_type == FAILURES_EXIST and not report.same_association and report.sender == "ROUTER"
    assert modality.role_selections == [(False, True)]
    assert Reporter(queue, config, "ROUTER").once(wait_s=10) == 0 and modality.count("2.25.900") == 1


def test_a_report_that_cannot_be_delivered_is_retried_with_backoff(queue):
    received(queue, "2.25.1")
    modality = CommittingModality("CT1")  # not listening yet
    accept_request(queue, Transaction("2.25.900", ((CT, "2.25.1"),)), "CT1", 3600)
    config = Commitment(modalities={"CT1": ReplyAddress(host="127.0.0.1", port=modality.port)}, report_retry_s=30)
    clock = [time.time()]
    reporter = Reporter(queue, config, "ROUTER", clock=lambda: clock[0])
    assert reporter.once(wait_s=10) == 0
    [waiting] = queue.pending_commitments(now=clock[0] + 31)
    assert waiting.attempts == 1 and "cannot connect" in waiting.last_error
    modality.listen()
    try:
        assert reporter.once(wait_s=10) == 0  # not due yet
        clock[0] += 31
        assert reporter.once(wait_s=10) == 1
        assert modality.report("2.25.900").committed == ["2.25.1"]
    finally:
        modality.stop()


@pytest.fixture
def receiver(tmp_path, queue):
    started = []

    def start(mode: str = "delivered") -> Receiver:
        commitments = AssociationReports(queue, Commitment(mode=mode), interval=0.05) if mode != "off" else None
        listen = Listen(host="127.0.0.1", port=free_port(), processes=1)
        r = Receiver(listen, Intake(Spool(tmp_path / "spool"), queue, lambda: []), commitments)
        r.start()
        if commitments is not None:
            commitments.start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
        if r.commitments is not None:
            r.commitments.stop()


def test_the_report_goes_on_the_same_association_while_the_modality_holds_it(queue, receiver):
    received(queue, "2.25.1", "PACS")
    router = receiver("delivered")
    modality = CommittingModality("CT1")
    deliver_later = threading.Timer(0.5, deliver, (queue, "PACS"))
    deliver_later.start()
    status, transaction = modality.request(router.port, [(CT, "2.25.1")], keep_open_s=10)
    assert status == 0x0000
    report = modality.report(transaction)
    assert report.same_association and report.committed == ["2.25.1"] and report.event_type == 1
    assert queue.pending_commitments(now=time.time() + 3600) == []  # nothing left for the supervisor


def test_a_request_left_when_the_association_ends_is_the_supervisor_s_to_report(queue, receiver, modality):
    received(queue, "2.25.1", "PACS")
    router = receiver("delivered")
    status, transaction = modality.request(router.port, [(CT, "2.25.1")])
    assert status == 0x0000
    wait_until(lambda: queue.pending_commitments(), 5, what="the hold given up")
    deliver(queue, "PACS")
    config = Commitment(modalities={"CT1": ReplyAddress(host="127.0.0.1", port=modality.port)})
    assert Reporter(queue, config, "ROUTER").once(wait_s=10) == 1
    assert not modality.report(transaction).same_association and modality.count(transaction) == 1


def test_a_malformed_n_action_is_answered_with_a_failure_status(queue, receiver):
    router = receiver("delivered")
    modality = CommittingModality("CT1")
    assert modality.request(router.port, [(CT, "2.25.1")], action_type=2)[0] == NO_SUCH_ACTION
    no_transaction = _information(ReferencedSOPSequence=[_item(CT, "2.25.1")])
    assert modality.request(router.port, [], information=no_transaction)[0] == MISSING_ATTRIBUTE
    assert queue.pending_commitments(now=time.time() + 10) == []


def test_with_commitment_off_the_sop_class_is_not_offered(receiver):
    router = receiver("off")
    assert CommittingModality("CT1").request(router.port, [(CT, "2.25.1")])[0] == -1


# -- the router as it runs (`serve`), a pynetdicom modality and PACS ----------------------------------------
PATIENT_RETRY = "{ max_attempts = 100, backoff_s = 0.2, max_backoff_s = 0.5 }"


def committing_router(router_factory, pacs_port: int, modality: CommittingModality, mode: str = "delivered",
                      timeout_s: float = 3600, retry: str = PATIENT_RETRY):
    return router_factory(
        [Destination("PACS", pacs_port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n', retry=retry)],
        extra=f'[commitment]\nmode = "{mode}"\ntimeout_s = {timeout_s}\nreport_retry_s = 0.5\n'
              f'modalities = {{ CT1 = {{ host = "127.0.0.1", port = {modality.port} }} }}\n',
    )


def test_no_success_while_the_pacs_is_down_and_every_instance_committed_once_it_drained(
        router_factory, modality, tmp_path):
    pacs = Pacs(tmp_path / "pacs")  # not started: the PACS is down
    router = committing_router(router_factory, pacs.port, modality)
    series = make_series(data("693_UNCR.dcm"), 3, tmp_path / "series")
    assert send(router.port, series, calling_ae="CT1") == [0, 0, 0]
    status, transaction = modality.request(router.port, references(series))
    assert status == 0x0000
    time.sleep(2)
    assert modality.report(transaction) is None  # nothing stored at the PACS: nothing committed
    pacs.start()
    try:
        wait_until(lambda: modality.report(transaction), 60, what=f"the report\n{router.log()}")
        report = modality.report(transaction)
        assert report.event_type == 1 and report.failed == {}
        assert sorted(report.committed) == sorted(uid for _, uid in references(series)) == sorted(pacs.by_uid())
        time.sleep(1)
        assert modality.count(transaction) == 1
    finally:
        pacs.stop()


def test_a_dead_letter_fails_with_0x0110_and_an_unknown_instance_with_0x0112(router_factory, pacs_factory, modality,
                                                                             tmp_path):
    pacs = pacs_factory(status=0xC000)
    router = committing_router(router_factory, pacs.port, modality)
    [image] = make_series(data("MR2_UNCR.dcm"), 1, tmp_path / "series")
    assert send(router.port, [image], calling_ae="CT1") == [0]
    [(sop_class, uid)] = references([image])
    status, transaction = modality.request(router.port, [(sop_class, uid), (sop_class, "2.25.404")])
    assert status == 0x0000
    wait_until(lambda: modality.report(transaction), 30, what=f"the report\n{router.log()}")
    report = modality.report(transaction)
    assert report.event_type == 2 and report.committed == []
    assert report.failed == {uid: PROCESSING_FAILURE, "2.25.404": NO_SUCH_OBJECT_INSTANCE}
    def logged() -> list[str]:  # the log line follows the report the modality already has
        return [line for line in router.log().splitlines() if '"commitment_reported"' in line]

    wait_until(logged, 10, what="the report's log event")
    time.sleep(0.5)
    [line] = logged()
    assert transaction_ref(transaction) in line and "0x0110" in line
    assert transaction not in line  # an info line: the Transaction UID would let anyone forge a relayed report


def test_a_commitment_pending_across_a_kill_9_is_answered_after_restart(router_factory, modality, tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    router = committing_router(router_factory, pacs.port, modality)
    series = make_series(data("693_UNCR.dcm"), 2, tmp_path / "series")
    assert send(router.port, series, calling_ae="CT1") == [0, 0]
    status, transaction = modality.request(router.port, references(series))
    assert status == 0x0000
    router.kill()  # SIGKILL: the request was only in the queue database
    pacs.start()
    try:
        router.start()
        wait_until(lambda: modality.report(transaction), 60, what=f"the report after restart\n{router.log()}")
        report = modality.report(transaction)
        assert report.event_type == 1 and sorted(report.committed) == sorted(uid for _, uid in references(series))
    finally:
        pacs.stop()


def test_past_the_timeout_the_undelivered_instances_are_reported_failed(router_factory, modality, tmp_path):
    pacs = Pacs(tmp_path / "pacs")  # down for good
    router = committing_router(router_factory, pacs.port, modality, timeout_s=2)
    [image] = make_series(data("693_UNCR.dcm"), 1, tmp_path / "series")
    assert send(router.port, [image], calling_ae="CT1") == [0]
    status, transaction = modality.request(router.port, references([image]))
    assert status == 0x0000
    wait_until(lambda: modality.report(transaction), 30, what=f"the report\n{router.log()}")
    report = modality.report(transaction)
    assert report.event_type == 2 and report.failed == {references([image])[0][1]: PROCESSING_FAILURE}


def test_the_modality_that_keeps_its_association_hears_on_it_once(router_factory, pacs, modality, tmp_path):
    router = committing_router(router_factory, pacs.port, modality, mode="spooled")
    series = make_series(data("693_UNCR.dcm"), 2, tmp_path / "series")
    assert send(router.port, series, calling_ae="CT1") == [0, 0]
    status, transaction = modality.request(router.port, references(series), keep_open_s=15)
    assert status == 0x0000
    report = modality.report(transaction)
    assert report is not None and report.same_association and report.event_type == 1
    time.sleep(1.5)
    assert modality.count(transaction) == 1
    text = router.metrics()
    assert metric_value(text, "dicom_router_commitment_reports_total", association="same", outcome="committed") == 1
    assert metric_value(text, "dicom_router_commitment_requests_total", result="new") == 1
