"""Storage commitment relayed to the destinations (`[commitment] mode = "relay"`), in-process:
the relay requests in the queue (on SQLite and on PostgreSQL), what the modality hears from the
destinations' answers, and the protocol against a pynetdicom archive for what a real PACS
cannot be made to do (answer failures, never answer, refuse, report on the same association)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from router.commitment.accept import accept_request
from router.commitment.decide import decide, relaying
from router.commitment.messages import (
    ALL_COMMITTED, CLASS_INSTANCE_CONFLICT, FAILURES_EXIST, NO_SUCH_OBJECT_INSTANCE, PROCESSING_FAILURE,
    STORAGE_COMMITMENT, Transaction, event_information,
)
from router.commitment.reporter import send_on_new_association
from router.commitment.reports import AssociationReports, send_report
from router.config import (
    Commitment, CommitmentScp, Destination, DestinationRules, Listen, ReplyAddress, Rule, Timeouts,
)
from router.receive.intake import Intake
from router.metrics import StateCollector
from router.queue import Delivery, Instance, NewJob, RelayedInstance
from router.commitment.accept import record_report
from router.commitment.messages import parse_report
from router.commitment.relay import Relayer
from router.request import Request
from router.receive.scp import Receiver
from router.queue.spool import Spool
from tests.support.peers import free_port, make_pki, wait_until
from tests.support.queues import backend  # noqa: F401 - the fixture: queue tests run on SQLite and on PostgreSQL

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def queue(backend):  # noqa: F811
    return backend.open()


def received(queue, uid: str, *destinations: str) -> None:  # noqa: ANN001
    queue.add(Instance(path=f"/spool/{uid}.dcm", sop_class_uid=CT, sop_instance_uid=uid, study_instance_uid="2.25.100",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="CT1", called_ae="ROUTER",
                       source_ip="127.0.0.1", size=100, received_at=time.time()),
              [NewJob(name, Request(syntax="original"), "t") for name in destinations])


def deliver(queue, destination: str, sent_as: dict[str, str] | None = None) -> None:  # noqa: ANN001
    """Every pending job of `destination` delivered; `sent_as`: received UID -> the UID it went out under."""
    sent_as = sent_as or {}
    queue.complete([Delivery(job.id, sent_sop_instance_uid=sent_as.get(job.instance.sop_instance_uid, ""))
                    for job in queue.claim(destination, 100)])


def request_for(queue, uids: list[str], transaction_uid: str = "2.25.900", timeout_s: float = 3600):  # noqa: ANN001
    accept_request(queue, Transaction(transaction_uid, tuple((CT, u) for u in uids)), "CT1", timeout_s)
    return [r for r in queue.open_commitments() if r.transaction_uid == transaction_uid][-1]


def outcome(answer) -> dict[str, str | int]:  # noqa: ANN001
    found: dict[str, str | int] = {uid: "committed" for _, uid in answer.committed}
    found.update({uid: "pending" for _, uid in answer.pending})
    found.update({uid: reason for (_, uid), reason in answer.failed})
    return found


def rule_file(name: str, port: int, commitment: bool | CommitmentScp = True,
              host: str = "127.0.0.1") -> DestinationRules:
    return DestinationRules(name=name, path=Path(f"{name}.toml"), rules=[Rule(syntax="original")],
                            destination=Destination(ae_title=name, host=host, port=port, commitment=commitment,
                                                    timeouts={"connect_s": 2, "acse_s": 5, "dimse_s": 5,
                                                              "network_s": 5}))


# -- the queue: relay requests ----------------------------------------------------------------------
def test_the_history_says_where_each_instance_was_delivered_and_under_which_uid(queue):
    received(queue, "2.25.1", "PACS", "AI")
    received(queue, "2.25.2", "PACS")
    deliver(queue, "PACS", {"2.25.1": "2.25.1001"})
    [job] = queue.claim("AI", 10)
    queue.dead(job.id, "refused")
    found = queue.deliveries(["2.25.1", "2.25.2", "2.25.404"])
    assert set(found) == {"2.25.1", "2.25.2"} and set(found["2.25.1"]) == {"PACS"}  # AI: a dead letter
    assert found["2.25.1"]["PACS"].sop_instance_uid == "2.25.1001" and found["2.25.1"]["PACS"].sop_class_uid == CT
    assert found["2.25.2"]["PACS"].sop_instance_uid == "2.25.2"


def test_an_instance_is_relayed_once_per_request_and_destination(queue):
    request = request_for(queue, ["2.25.1", "2.25.2"])
    one, two = RelayedInstance("2.25.1", CT, "2.25.1"), RelayedInstance("2.25.2", CT, "2.25.2")
    first = queue.add_relay(request.id, "PACS", "2.25.7001", [one], time.time())
    assert first is not None
    assert queue.add_relay(request.id, "PACS", "2.25.7002", [one], time.time()) is None  # another process was first
    second = queue.add_relay(request.id, "PACS", "2.25.7003", [one, two], time.time())
    [due] = [r for r in queue.due_relays() if r.id == second]
    assert due.instances == (two,) and due.transaction_uid == "2.25.7003"
    assert queue.add_relay(request.id, "ARCHIVE", "2.25.7004", [one], time.time()) is not None
    assert queue.relay_results(request.id) == {("PACS", "2.25.1"): None, ("PACS", "2.25.2"): None,
                                               ("ARCHIVE", "2.25.1"): None}


def test_a_relay_request_is_sent_by_one_claimer_and_a_dead_claimer_s_claim_expires(queue):
    request = request_for(queue, ["2.25.1"])
    relay_id = queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")],
                               time.time())
    assert queue.claim_relay(relay_id, "node-a/relay-1", time.time() + 60)
    assert not queue.claim_relay(relay_id, "node-b/relay-2", time.time() + 60)
    assert queue.due_relays() == []
    assert [r.id for r in queue.due_relays(now=time.time() + 61)] == [relay_id]  # its claimer died
    assert queue.claim_relay(relay_id, "node-b/relay-2", time.time() + 60, now=time.time() + 61)
    queue.relay_not_sent(relay_id, "node-a/relay-1", "late word of a claimer that lost its claim", time.time())
    [again] = queue.due_relays(now=time.time() + 61)  # still node-b's, whose claim expires in turn
    assert again.attempts == 0


def test_a_relay_request_not_taken_is_due_again_at_its_retry_time(queue):
    request = request_for(queue, ["2.25.1"])
    relay_id = queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")],
                               time.time())
    assert queue.claim_relay(relay_id, "r", time.time() + 60)
    queue.relay_not_sent(relay_id, "r", "cannot connect", time.time() + 30)
    assert queue.due_relays() == []
    [due] = queue.due_relays(now=time.time() + 31)
    assert due.attempts == 1 and due.last_error == "cannot connect" and due.state == "pending"


def test_a_destination_that_took_the_request_and_sent_no_report_is_asked_again(queue):
    request = request_for(queue, ["2.25.1"])
    relay_id = queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")],
                               time.time())
    assert queue.claim_relay(relay_id, "r", time.time() + 60)
    queue.relay_sent(relay_id, "r", time.time() + 300)
    assert queue.due_relays() == [] and queue.relay_counts() == {("PACS", "awaiting_report"): 1}
    [due] = queue.due_relays(now=time.time() + 301)
    assert due.state == "sent" and due.transaction_uid == "2.25.7001"  # asked again under the same UID
    assert queue.claim_relay(relay_id, "r", time.time() + 60, now=time.time() + 301)


def test_a_report_is_recorded_by_the_uids_as_sent_and_an_instance_it_leaves_out_fails(queue):
    request = request_for(queue, ["2.25.1", "2.25.2", "2.25.3"])
    instances = [RelayedInstance(f"2.25.{n}", CT, f"2.25.100{n}") for n in (1, 2, 3)]
    relay_id = queue.add_relay(request.id, "PACS", "2.25.7001", instances, time.time())
    assert queue.claim_relay(relay_id, "r", time.time() + 60)
    relay = queue.relay_answered("2.25.7001", {"2.25.1001": 0, "2.25.1002": NO_SUCH_OBJECT_INSTANCE},
                                 PROCESSING_FAILURE)
    assert relay is not None and relay.destination == "PACS" and relay.instances == tuple(instances)
    assert queue.relay_results(request.id) == {("PACS", "2.25.1"): 0, ("PACS", "2.25.2"): NO_SUCH_OBJECT_INSTANCE,
                                               ("PACS", "2.25.3"): PROCESSING_FAILURE}
    queue.relay_sent(relay_id, "r", time.time() + 300)  # the report came before the N-ACTION's answer was recorded
    assert queue.due_relays(now=time.time() + 301) == [] and queue.relay_counts() == {}
    assert queue.relay_answered("2.25.404", {}, PROCESSING_FAILURE) is None


def test_a_relay_request_s_destination_is_found_by_its_transaction_uid(queue):
    request = request_for(queue, ["2.25.1"])
    queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")], time.time())
    assert queue.relay_destination("2.25.7001") == "PACS"  # whom its report may come from
    assert queue.relay_destination("2.25.404") is None


def test_a_refused_relay_request_fails_its_unanswered_instances(queue):
    request = request_for(queue, ["2.25.1"])
    relay_id = queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")],
                               time.time())
    assert queue.claim_relay(relay_id, "r", time.time() + 60)
    queue.relay_refused(relay_id, "r", "no storage commitment SCP", PROCESSING_FAILURE)
    assert queue.relay_results(request.id) == {("PACS", "2.25.1"): PROCESSING_FAILURE}
    assert queue.due_relays(now=time.time() + 3600) == []


def test_relay_requests_of_a_reported_or_expired_request_are_left_alone(queue):
    request = request_for(queue, ["2.25.1"], timeout_s=60)
    relay_id = queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")],
                               time.time())
    assert [r.id for r in queue.due_relays()] == [relay_id]
    assert queue.due_relays(now=request.deadline + 1) == [] and queue.open_commitments(now=request.deadline + 1) == []
    assert queue.claim_commitment(request.id, "reporter", time.time() + 60)
    queue.commitment_reported(request.id, FAILURES_EXIST)
    assert queue.due_relays() == [] and queue.open_commitments() == [] and queue.relay_counts() == {}


def test_a_node_starting_again_takes_back_the_relay_requests_it_was_sending(queue, backend):  # noqa: F811
    request = request_for(queue, ["2.25.1"])
    relay_id = queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")],
                               time.time())
    assert queue.claim_relay(relay_id, f"{queue.node or 'local'}/relay-1", time.time() + 600)
    after_kill = backend.open()
    after_kill.recover()
    assert [r.id for r in after_kill.due_relays()] == [relay_id]


def test_pending_requests_are_counted_waiting_or_retrying(queue):
    request_for(queue, ["2.25.1"])
    other = request_for(queue, ["2.25.2"], transaction_uid="2.25.901")
    assert queue.claim_commitment(other.id, "reporter", time.time() + 60)
    queue.commitment_not_reported(other.id, "cannot associate", time.time() + 5)
    assert queue.commitment_counts() == {"waiting": 1, "retrying": 1}


# -- what the modality hears --------------------------------------------------------------------------
def answer(queue, transaction_uid: str, results: dict[str, int]) -> None:  # noqa: ANN001
    assert queue.relay_answered(transaction_uid, results, PROCESSING_FAILURE) is not None


def test_relay_commits_an_instance_once_the_destination_s_commitment_scp_committed_it(queue):
    received(queue, "2.25.1", "PACS", "AI")
    request = request_for(queue, ["2.25.1"])
    relay_to = {"PACS"}  # AI has no storage commitment SCP: its C-STORE success is what counts
    assert outcome(decide(queue, "relay", request, time.time(), relay_to)) == {"2.25.1": "pending"}
    deliver(queue, "PACS", {"2.25.1": "2.25.1001"})
    deliver(queue, "AI")
    assert outcome(decide(queue, "relay", request, time.time(), relay_to)) == {"2.25.1": "pending"}  # not asked yet
    queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1001")], time.time())
    assert outcome(decide(queue, "relay", request, time.time(), relay_to)) == {"2.25.1": "pending"}
    answer(queue, "2.25.7001", {"2.25.1001": 0})
    result = decide(queue, "relay", request, time.time(), relay_to)
    assert outcome(result) == {"2.25.1": "committed"} and result.event_type == ALL_COMMITTED
    assert outcome(decide(queue, "delivered", request, time.time())) == {"2.25.1": "committed"}


def test_the_destination_s_failure_reason_is_carried_over_to_the_modality(queue):
    for uid in ("2.25.1", "2.25.2"):
        received(queue, uid, "PACS")
    deliver(queue, "PACS")
    request = request_for(queue, ["2.25.1", "2.25.2"])
    queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance(u, CT, u) for u in ("2.25.1", "2.25.2")],
                    time.time())
    answer(queue, "2.25.7001", {"2.25.1": 0, "2.25.2": CLASS_INSTANCE_CONFLICT})
    result = decide(queue, "relay", request, time.time(), {"PACS"})
    assert outcome(result) == {"2.25.1": "committed", "2.25.2": CLASS_INSTANCE_CONFLICT}
    assert result.event_type == FAILURES_EXIST


def test_with_relay_a_request_unanswered_at_its_timeout_fails_with_processing_failure(queue):
    received(queue, "2.25.1", "PACS")
    deliver(queue, "PACS")
    request = request_for(queue, ["2.25.1"], timeout_s=60)
    queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")], time.time())
    assert outcome(decide(queue, "relay", request, request.received_at + 59, {"PACS"})) == {"2.25.1": "pending"}
    assert outcome(decide(queue, "relay", request, request.received_at + 60, {"PACS"})) == {
        "2.25.1": PROCESSING_FAILURE}


def test_relay_with_no_destination_having_a_storage_commitment_scp_is_delivered():
    rule_files = [rule_file("PACS", 104, commitment=False), rule_file("ARCHIVE", 104)]
    assert relaying(rule_files) == {"ARCHIVE"}
    scp = rule_file("ARCHIVE", 104, CommitmentScp(port=105, ae_title="ARCHIVE_SC")).destination.commitment_scp
    assert (scp.host, scp.port, scp.ae_title, scp.keep_open_s) == ("127.0.0.1", 105, "ARCHIVE_SC", 5)


# -- the destination's report -------------------------------------------------------------------------------
def _report(transaction_uid: str, committed: list[str] = (), failed: dict[str, int] | None = None) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = []
    for uid in committed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT, uid
        ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = []
        for uid, reason in failed.items():
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID, item.FailureReason = CT, uid, reason
            ds.FailedSOPSequence.append(item)
    return ds


def test_a_report_is_read_as_committed_and_failed_uids():
    uid, results = parse_report(2, _report("2.25.7001", ["2.25.1"], {"2.25.2": NO_SUCH_OBJECT_INSTANCE}))
    assert uid == "2.25.7001" and results == {"2.25.1": 0, "2.25.2": NO_SUCH_OBJECT_INSTANCE}


def test_a_report_of_another_event_type_or_without_transaction_uid_is_refused_and_an_unknown_one_is_taken(queue):
    def record(event_type: int, information: Dataset) -> int:
        return record_report(queue, event_type, information, "PACS", "new", "127.0.0.1", [rule_file("PACS", 104)])

    assert record(3, _report("2.25.7001")) == 0x0113
    assert record(1, Dataset()) == 0x0120
    assert record(1, _report("2.25.404", ["2.25.1"])) == 0x0000


# -- the protocol, against a pynetdicom archive --------------------------------------------------------------
class Archive:
    """A pynetdicom storage commitment SCP: records each N-ACTION, answers `status`, and reports
    (`report`): "new" on a new association to `reply_to` (the router's listener) with the SCP
    role, "same" on the N-ACTION's association, "never"; `failures` fail those SOP Instance UIDs."""

    def __init__(self, report: str = "new", status: int = 0x0000, failures: dict[str, int] | None = None,
                 reply_to: int = 0) -> None:
        self.report, self.status, self.failures, self.reply_to = report, status, failures or {}, reply_to
        self.port = free_port()
        self.requests: list[tuple[str, str, list[tuple[str, str]]]] = []  # (calling AE, Transaction UID, refs)
        self.report_errors: list[str | None] = []
        self._lock = threading.Lock()
        self.server = None

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        info = event.action_information
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in info.ReferencedSOPSequence]
        with self._lock:
            self.requests.append((event.assoc.requestor.ae_title.strip(), str(info.TransactionUID), refs))
        if self.status == 0x0000 and self.report != "never":
            threading.Thread(target=self._send, args=(event.assoc, str(info.TransactionUID), refs)).start()
        return self.status, None

    def _send(self, assoc, transaction_uid: str, refs: list[tuple[str, str]]) -> None:  # noqa: ANN001
        from router.commitment.messages import Answer

        time.sleep(0.2)
        result = Answer(tuple(r for r in refs if r[1] not in self.failures),
                        tuple((r, self.failures[r[1]]) for r in refs if r[1] in self.failures), ())
        info = event_information(transaction_uid, result)
        if self.report == "same":
            error = send_report(assoc, info, result.event_type)
        else:
            error = send_on_new_association("ARCHIVE", ReplyAddress(host="127.0.0.1", port=self.reply_to,
                                                                    ae_title="ROUTER"), "ROUTER", info,
                                            result.event_type)
        with self._lock:
            self.report_errors.append(error)

    def start(self) -> Archive:
        ae = AE(ae_title="ARCHIVE")
        ae.add_supported_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_ACTION, self._on_action)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def router_side(tmp_path):
    """A relay-mode receiver (where destinations report) on a SQLite queue, and a Relayer factory."""
    from router.queue.sqlite import SqliteQueue

    q = SqliteQueue(tmp_path / "queue.sqlite")
    config = Commitment(mode="relay", relay_retry_s=30, relay_reask_s=120)
    in_force: list[DestinationRules] = []  # the rule files, as the receiving processes read them too
    commitments = AssociationReports(q, config, destinations=lambda: list(in_force))
    receiver = Receiver(Listen(host="127.0.0.1", port=free_port(), processes=1),
                        Intake(Spool(tmp_path / "spool"), q, lambda: []), commitments)
    receiver.start()
    started: list[Relayer] = []

    def relayer(*rule_files: DestinationRules, clock=time.time, **settings) -> Relayer:  # noqa: ANN001
        in_force[:] = rule_files
        r = Relayer(q, config.model_copy(update=settings), lambda: list(rule_files), "ROUTER", clock=clock)
        started.append(r)
        return r

    yield q, receiver, relayer
    for r in started:
        r.stop()
    receiver.stop()
    q.close()


def test_the_n_action_names_the_instances_as_sent_and_the_report_on_a_new_association_commits(router_side, archives):
    queue, receiver, relayer = router_side
    archive = archives(reply_to=receiver.port)
    for uid in ("2.25.1", "2.25.2"):
        received(queue, uid, "ARCHIVE")
    deliver(queue, "ARCHIVE", {"2.25.1": "2.25.1001"})  # went out lossy, under a new UID
    request = request_for(queue, ["2.25.1", "2.25.2"])
    worker = relayer(rule_file("ARCHIVE", archive.port))
    assert worker.once(wait_s=10) == 1
    [(calling, transaction, refs)] = archive.requests
    assert calling == "ROUTER" and refs == [(CT, "2.25.1001"), (CT, "2.25.2")]
    wait_until(lambda: archive.report_errors, 10, what="the archive's report")
    assert archive.report_errors == [None]  # answered 0x0000: recorded
    result = decide(queue, "relay", request, time.time(), {"ARCHIVE"})
    assert outcome(result) == {"2.25.1": "committed", "2.25.2": "committed"}
    assert worker.once(wait_s=10) == 0 and len(archive.requests) == 1  # asked once


def test_an_archive_answering_failures_has_its_reasons_reach_the_modality(router_side, archives):
    queue, receiver, relayer = router_side
    archive = archives(reply_to=receiver.port, failures={"2.25.2": NO_SUCH_OBJECT_INSTANCE})
    for uid in ("2.25.1", "2.25.2"):
        received(queue, uid, "ARCHIVE")
    deliver(queue, "ARCHIVE")
    request = request_for(queue, ["2.25.1", "2.25.2"])
    assert relayer(rule_file("ARCHIVE", archive.port)).once(wait_s=10) == 1
    wait_until(lambda: None not in queue.relay_results(request.id).values(), 10, what="the report recorded")
    result = decide(queue, "relay", request, time.time(), {"ARCHIVE"})
    assert outcome(result) == {"2.25.1": "committed", "2.25.2": NO_SUCH_OBJECT_INSTANCE}
    assert result.event_type == FAILURES_EXIST


def test_the_report_on_the_n_action_s_association_is_taken_and_the_association_released(router_side, archives):
    queue, _, relayer = router_side
    archive = archives(report="same")
    received(queue, "2.25.1", "ARCHIVE")
    deliver(queue, "ARCHIVE")
    request = request_for(queue, ["2.25.1"])
    worker = relayer(rule_file("ARCHIVE", archive.port, CommitmentScp(keep_open_s=10)))
    assert worker.once(wait_s=10) == 1
    wait_until(lambda: archive.report_errors, 10, what="the report")
    assert archive.report_errors == [None] and queue.relay_results(request.id) == {("ARCHIVE", "2.25.1"): 0}
    worker.once(wait_s=10)
    assert worker._open == []  # noqa: SLF001 - released once the report came, well before keep_open_s


def test_a_destination_down_is_asked_again_with_backoff_then_commits(router_side, archives):
    queue, receiver, relayer = router_side
    archive = Archive(reply_to=receiver.port)  # not listening yet
    received(queue, "2.25.1", "ARCHIVE")
    deliver(queue, "ARCHIVE")
    request = request_for(queue, ["2.25.1"])
    clock = [time.time()]
    worker = relayer(rule_file("ARCHIVE", archive.port), clock=lambda: clock[0])
    assert worker.once(wait_s=10) == 0
    [waiting] = queue.due_relays(now=time.time() + 31)
    assert waiting.attempts == 1 and "cannot connect" in waiting.last_error
    assert queue.relay_counts() == {("ARCHIVE", "sending"): 1}
    archive.start()
    try:
        assert worker.once(wait_s=10) == 0  # not due before relay_retry_s
        clock[0] += 31
        assert worker.once(wait_s=10) == 1
        wait_until(lambda: queue.relay_results(request.id) == {("ARCHIVE", "2.25.1"): 0}, 10, what="the report")
    finally:
        archive.stop()


def test_a_destination_without_a_storage_commitment_scp_fails_its_instances_with_0x0110(router_side, pacs_factory):
    queue, _, relayer = router_side
    plain = pacs_factory()  # a storage SCP only: no Storage Commitment presentation context
    received(queue, "2.25.1", "PACS")
    deliver(queue, "PACS")
    request = request_for(queue, ["2.25.1"])
    assert relayer(rule_file("PACS", plain.port)).once(wait_s=10) == 0
    assert queue.relay_results(request.id) == {("PACS", "2.25.1"): PROCESSING_FAILURE}
    assert queue.due_relays(now=time.time() + 3600) == []  # never asked again
    assert outcome(decide(queue, "relay", request, time.time(), {"PACS"})) == {"2.25.1": PROCESSING_FAILURE}


def test_an_n_action_refused_with_a_status_no_retry_changes_fails_at_once(router_side, archives):
    queue, _, relayer = router_side
    archive = archives(status=0x0124)  # not authorised
    received(queue, "2.25.1", "ARCHIVE")
    deliver(queue, "ARCHIVE")
    request = request_for(queue, ["2.25.1"])
    assert relayer(rule_file("ARCHIVE", archive.port)).once(wait_s=10) == 0
    assert queue.relay_results(request.id) == {("ARCHIVE", "2.25.1"): PROCESSING_FAILURE}


def test_a_lost_report_is_asked_for_again_and_one_never_sent_ends_at_the_timeout(router_side, archives):
    queue, _, relayer = router_side
    archive = archives(report="never")
    received(queue, "2.25.1", "ARCHIVE")
    deliver(queue, "ARCHIVE")
    request = request_for(queue, ["2.25.1"], timeout_s=600)
    clock = [time.time()]
    worker = relayer(rule_file("ARCHIVE", archive.port, CommitmentScp(keep_open_s=0)), clock=lambda: clock[0],
                     relay_reask_s=120)
    assert worker.once(wait_s=10) == 1 and worker.once(wait_s=10) == 0
    assert queue.relay_counts() == {("ARCHIVE", "awaiting_report"): 1}
    clock[0] += 121
    assert worker.once(wait_s=10) == 1  # the same N-ACTION again
    first, second = archive.requests
    assert first[1] == second[1] and first[2] == second[2]
    result = decide(queue, "relay", request, request.deadline, {"ARCHIVE"})
    assert outcome(result) == {"2.25.1": PROCESSING_FAILURE}
    clock[0] = request.deadline + 1
    assert worker.once(wait_s=10) == 0 and len(archive.requests) == 2  # nothing more asked for an ended request


def test_instances_still_on_their_way_are_gathered_into_one_n_action(router_side, archives):
    queue, receiver, relayer = router_side
    archive = archives(reply_to=receiver.port)
    received(queue, "2.25.1", "ARCHIVE")
    received(queue, "2.25.2", "ARCHIVE")
    [job, _] = queue.claim("ARCHIVE", 10)
    queue.complete([job.id])
    queue.release([j.id for j in queue.jobs("ARCHIVE", "in_flight")])
    request = request_for(queue, ["2.25.1", "2.25.2"])
    clock = [time.time()]
    worker = relayer(rule_file("ARCHIVE", archive.port), clock=lambda: clock[0])
    assert worker.once(wait_s=10) == 0  # one delivered, one on its way: wait for it
    deliver(queue, "ARCHIVE")
    assert worker.once(wait_s=10) == 1
    [(_, _, refs)] = archive.requests
    assert sorted(uid for _, uid in refs) == ["2.25.1", "2.25.2"]
    wait_until(lambda: outcome(decide(queue, "relay", request, time.time(), {"ARCHIVE"})) ==
               {"2.25.1": "committed", "2.25.2": "committed"}, 10, what="both committed")


def test_a_destination_whose_scp_never_answers_delays_no_other_destination_s_n_action(router_side, archives):
    from tests.commitment.test_reports_per_modality import BlackHole

    queue, receiver, relayer = router_side
    hole, archive = BlackHole(), archives(reply_to=receiver.port)
    silent = rule_file("SILENT", hole.port)
    silent = silent.model_copy(update={"destination": silent.destination.model_copy(
        update={"timeouts": Timeouts(connect_s=2, acse_s=30, dimse_s=30, network_s=30)})})
    worker = relayer(silent, rule_file("ARCHIVE", archive.port))
    worker.interval = 0.1
    received(queue, "2.25.1", "SILENT")
    deliver(queue, "SILENT")
    request_for(queue, ["2.25.1"])
    worker.start()
    try:
        wait_until(lambda: hole.connections() == 1, 10, what="the N-ACTION to the silent destination on its way")
        received(queue, "2.25.2", "ARCHIVE")  # later, for another destination
        deliver(queue, "ARCHIVE")
        request = request_for(queue, ["2.25.2"], transaction_uid="2.25.901")
        wait_until(lambda: queue.relay_results(request.id) == {("ARCHIVE", "2.25.2"): 0}, 10,
                   what="ARCHIVE asked and answered while SILENT never answers")
        assert hole.connections() == 1  # SILENT, still busy, was not waited for nor asked again
    finally:
        hole.close()
        worker.stop()


def test_the_pending_gauges_come_from_the_queue(router_side):
    queue, _, _ = router_side
    request = request_for(queue, ["2.25.1"])
    queue.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")], time.time())
    collector = StateCollector(queue.counts, queue.oldest_pending, lambda: 0, lambda: [],
                               commitments=queue.commitment_counts, relays=queue.relay_counts)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in collector.collect()
               for s in family.samples}
    assert samples[("dicom_router_commitment_pending_requests", (("state", "waiting"),))] == 1
    assert samples[("dicom_router_commitment_relay_requests", (("destination", "PACS"), ("state", "sending")))] == 1
    assert samples[("dicom_router_commitment_relay_requests",
                    (("destination", "PACS"), ("state", "awaiting_report")))] == 0


# -- configuration -----------------------------------------------------------------------------------------
def test_relay_settings_load_with_tls_files_relative_to_their_file(tmp_path):
    from router import config

    (tmp_path / "rules").mkdir()
    for name in ("ca.pem", "router.pem", "router.key"):
        (tmp_path / name).write_text("x")
        (tmp_path / "rules" / name).write_text("x")
    (tmp_path / "rules" / "PACS.toml").write_text(
        '[destination]\nae_title = "PACS"\nhost = "pacs"\nport = 104\n'
        'commitment = { port = 105, tls = { ca = "ca.pem" } }\n[[rule]]\nsyntax = "original"\n')
    (tmp_path / "rules" / "AI.toml").write_text(
        '[destination]\nae_title = "AI"\nhost = "ai"\nport = 104\n[[rule]]\nsyntax = "original"\n')
    (tmp_path / "router.toml").write_text(
        '[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n[commitment]\nmode = "relay"\n'
        'modalities = { CT1 = { host = "ct1", port = 104, tls = { ca = "ca.pem", cert = "router.pem", '
        'key = "router.key" } } }\n')
    loaded = config.load(tmp_path / "router.toml")
    assert loaded.router.commitment.mode == "relay"
    assert loaded.router.commitment.modalities["CT1"].tls.ca == (tmp_path / "ca.pem").resolve()
    scp = loaded.destination("PACS").destination.commitment_scp
    assert (scp.host, scp.port, scp.ae_title, scp.tls.ca) == ("pacs", 105, "PACS", (tmp_path / "rules" / "ca.pem"))
    assert loaded.destination("AI").destination.commitment_scp is None
    assert relaying(loaded.destinations) == {"PACS"}
    (tmp_path / "rules" / "ca.pem").unlink()
    with pytest.raises(config.ConfigError, match="PACS.toml: field destination.commitment.tls.ca: file not found"):
        config.load(tmp_path / "router.toml")


# -- DICOM TLS: the report to a modality, the N-ACTION to a destination ------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA and a certificate for 127.0.0.1 (peers) and one for the router, all made here."""
    return make_pki(tmp_path_factory.mktemp("pki"), {"peer": "IP:127.0.0.1", "router": "DNS:router"})


def _server_context(pki: Path):  # noqa: ANN202
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "peer.pem"), str(pki / "peer.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED  # the router must show its certificate
    return ctx


def _router_tls(pki: Path):  # noqa: ANN202
    from router.config import Tls

    return Tls(ca=pki / "ca.pem", cert=pki / "router.pem", key=pki / "router.key", verify_hostname=True)


def test_a_modality_listening_with_tls_gets_its_report_over_tls(tmp_path, pki):
    from router.commitment.reporter import Reporter
    from router.queue.sqlite import SqliteQueue

    reports: list[str] = []
    ae = AE(ae_title="CT1")
    ae.add_supported_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                             scu_role=False, scp_role=True)
    port = free_port()
    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append(str(event.event_information.TransactionUID))
        return 0, None

    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=_server_context(pki),
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    q = SqliteQueue(tmp_path / "queue.sqlite")
    try:
        received(q, "2.25.1")
        accept_request(q, Transaction("2.25.900", ((CT, "2.25.1"),)), "CT1", 3600)
        plain = Commitment(modalities={"CT1": ReplyAddress(host="127.0.0.1", port=port)})
        assert Reporter(q, plain, "ROUTER").once(wait_s=10) == 0  # plain TCP to a TLS port: not delivered
        assert reports == []
        tls = Commitment(modalities={"CT1": ReplyAddress(host="127.0.0.1", port=port, tls=_router_tls(pki))})
        assert Reporter(q, tls, "ROUTER", clock=lambda: time.time() + 60).once(wait_s=10) == 1
        assert reports == ["2.25.900"]
    finally:
        server.shutdown()
        q.close()


def test_the_n_action_goes_over_tls_to_a_destination_that_speaks_it(router_side, pki):
    queue, _, relayer = router_side
    archive = Archive(report="same")
    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", archive.port), block=False, ssl_context=_server_context(pki),
                             evt_handlers=[(evt.EVT_N_ACTION, archive._on_action)])  # noqa: SLF001
    try:
        received(queue, "2.25.1", "ARCHIVE")
        deliver(queue, "ARCHIVE")
        request = request_for(queue, ["2.25.1"])
        destination = rule_file("ARCHIVE", archive.port)
        destination = destination.model_copy(update={"destination": destination.destination.model_copy(
            update={"tls": _router_tls(pki)})})  # the destination's tls serves its storage commitment SCP too
        assert relayer(destination).once(wait_s=10) == 1
        wait_until(lambda: archive.report_errors, 10, what="the report on the TLS association")
        assert archive.report_errors == [None]
        assert queue.relay_results(request.id) == {("ARCHIVE", "2.25.1"): 0}
    finally:
        server.shutdown()


def test_a_queue_database_from_before_relay_gains_its_tables_and_keeps_its_requests(backend):  # noqa: F811
    old = backend.open()
    accept_request(old, Transaction("2.25.900", ((CT, "2.25.1"),)), "CT1", 3600)
    backend.execute(old, "DROP TABLE relay_instances")  # as an earlier version left it
    backend.execute(old, "DROP TABLE relays")
    if backend.kind == "postgres":
        backend.execute(old, "UPDATE schema_version SET version = 1")
    old.close()
    upgraded = backend.open()
    [request] = upgraded.open_commitments()
    assert request.transaction_uid == "2.25.900"
    assert upgraded.add_relay(request.id, "PACS", "2.25.7001", [RelayedInstance("2.25.1", CT, "2.25.1")],
                              time.time()) is not None
