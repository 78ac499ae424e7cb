"""Storage commitment (Push Model, PS3.4 Annex J): whether a modality may delete its copies.

    request   an N-ACTION (Action Type 1) names a Transaction UID and the instances. It is stored
              in the queue database (`accept_request`) before the N-ACTION is answered 0x0000.
    decide    per instance: committed, failed (with its Failure Reason) or still pending, by the
              mode (`decide`):
                delivered  every destination the rules send it to answered C-STORE success (the
                           history says so); an instance no rule sends anywhere once it is durable
                relay      as delivered, and then each of those destinations that has a storage
                           commitment SCP (`[destination] commitment`) committed it when asked
                           (`router.relay`); its Failure Reason is carried over
                spooled    durable in the router (its jobs or its history exist)
              A dead letter fails with 0x0110 (processing failure), an instance the router never
              received with 0x0112 (no such object instance), one received as another SOP class
              with 0x0119, every instance of a reused Transaction UID with 0x0131. Past
              `[commitment] timeout_s`, what is still pending fails with 0x0110.
    report    once nothing is pending (or the timeout passed), one N-EVENT-REPORT (Event Type 1:
              all committed, 2: failures exist): on the association the request came on while
              the modality holds it (`AssociationReports`, in the receiving process that holds
              it), else on a new association to the modality's configured address, the router
              keeping the SCP role (`Reporter`, in the supervisor), retried with backoff. The
              process that sends a report claims it in the database first: one report per
              transaction, whatever the number of processes; a claim dies with its process.

Logs and metrics carry the Transaction UID, AE titles and counts, never patient data.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.association import Association

from router import log, metrics
from router.compat.pynetdicom import park_reactor
from router.config import Commitment, DestinationRules, ReplyAddress
from router.queue import Queue, StoredCommitment
from router.tls import client_context

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs

# Failure Reasons (0008,1197)
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
DUPLICATE_TRANSACTION_UID = 0x0131

# N-ACTION statuses
SUCCESS = 0x0000
NO_SUCH_ACTION = 0x0123
MISSING_ATTRIBUTE = 0x0120
INVALID_ATTRIBUTE_VALUE = 0x0106

HOLD_S = 5.0  # a receiving process renews its hold on its associations' requests within this
CLAIM_S = 120.0  # a claimed report not sent within this (its process died) can be claimed again
MAX_RETRY_S = 600.0

_log = log.get("commitment")

Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


class MalformedRequest(ValueError):
    """An N-ACTION the router cannot take as a storage commitment request; `status` answers it."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Transaction:
    """A storage commitment request as the modality sent it."""

    transaction_uid: str
    references: tuple[Reference, ...]


def read_uid(value: object, what: str) -> str:
    text = str(value or "").strip().rstrip("\0")
    if not text:
        raise MalformedRequest(MISSING_ATTRIBUTE, f"{what} missing or empty")
    if len(text) > 64 or not all(c.isdigit() or c == "." for c in text):
        raise MalformedRequest(INVALID_ATTRIBUTE_VALUE, f"{what} is not a UID")
    return text


def parse_request(action_type_id: int | None, information: Dataset | None) -> Transaction:
    """The transaction an N-ACTION asks to commit; raises MalformedRequest with the status to
    answer for one that is not a storage commitment request the router can take."""
    if action_type_id != REQUEST_STORAGE_COMMITMENT:
        raise MalformedRequest(NO_SUCH_ACTION, f"action type {action_type_id} is not Request Storage Commitment (1)")
    if information is None:
        raise MalformedRequest(MISSING_ATTRIBUTE, "no Action Information")
    try:
        transaction_uid = read_uid(information.get("TransactionUID"), "Transaction UID")
        items = information.get("ReferencedSOPSequence")
        if not items:
            raise MalformedRequest(MISSING_ATTRIBUTE, "Referenced SOP Sequence missing or empty")
        references = tuple(
            (read_uid(item.get("ReferencedSOPClassUID"), f"Referenced SOP Class UID of item {index + 1}"),
             read_uid(item.get("ReferencedSOPInstanceUID"), f"Referenced SOP Instance UID of item {index + 1}"))
            for index, item in enumerate(items)
        )
    except MalformedRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises decoding a broken value
        raise MalformedRequest(INVALID_ATTRIBUTE_VALUE, f"Action Information cannot be read: {exc}") from None
    return Transaction(transaction_uid, references)


def accept_request(queue: Queue, transaction: Transaction, calling_ae: str, timeout_s: float,
                   holder: str = "", now: float | None = None) -> str:
    """Store a request durably; returns "new", "repeated" (the same request again while it is
    pending: one report answers both) or "duplicate" (a Transaction UID in use for other
    instances: reported failed with 0x0131). `holder` names the association that may report it."""
    now = time.time() if now is None else now
    return queue.add_commitment(transaction.transaction_uid, calling_ae, transaction.references, now,
                                now + timeout_s, holder, now + HOLD_S if holder else 0.0)


# -- the decision ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """What can be said of a request now."""

    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int], ...]  # with its Failure Reason
    pending: tuple[Reference, ...]

    @property
    def event_type(self) -> int:
        return FAILURES_EXIST if self.failed else ALL_COMMITTED


def relaying(destinations: Iterable[DestinationRules]) -> frozenset[str]:
    """The destinations `relay` asks: those with a storage commitment SCP."""
    return frozenset(d.name for d in destinations if d.destination.commitment_scp is not None)


def decide(queue: Queue, mode: str, request: StoredCommitment, now: float,
           relay_to: Collection[str] = frozenset()) -> Answer:
    """Each referenced instance committed, failed or pending under `mode` (delivered, relay or
    spooled; `relay_to`: the destinations relay asks); past the request's deadline nothing is
    pending any more."""
    committed: list[Reference] = []
    failed: list[tuple[Reference, int]] = []
    pending: list[Reference] = []
    if request.duplicate:
        return Answer((), tuple((ref, DUPLICATE_TRANSACTION_UID) for ref in request.references), ())
    where = queue.whereabouts(uid for _, uid in request.references)
    relayed = mode == "relay" and bool(relay_to)
    stored = queue.deliveries(uid for _, uid in request.references) if relayed else {}
    answered = queue.relay_results(request.id) if relayed else {}
    for ref in request.references:
        sop_class, uid = ref
        found = where.get(uid)
        if found is None:
            failed.append((ref, NO_SUCH_OBJECT_INSTANCE))
        elif sop_class not in found.sop_class_uids:
            failed.append((ref, CLASS_INSTANCE_CONFLICT))
        elif mode == "spooled":
            committed.append(ref)
        elif found.unfinished:
            pending.append(ref)
        elif found.dead:
            failed.append((ref, PROCESSING_FAILURE))
        elif relayed:
            # each destination that has a storage commitment SCP: its answer (None: none yet)
            answers = [answered.get((name, uid)) for name in sorted(stored.get(uid, {})) if name in relay_to]
            if None in answers:
                pending.append(ref)
            elif any(answers):
                failed.append((ref, next(reason for reason in answers if reason)))
            else:
                committed.append(ref)
        else:
            committed.append(ref)
    if pending and now >= request.deadline:
        failed.extend((ref, PROCESSING_FAILURE) for ref in pending)
        pending = []
    return Answer(tuple(committed), tuple(failed), tuple(pending))


def event_information(transaction_uid: str, answer: Answer) -> Dataset:
    """The N-EVENT-REPORT's Event Information (PS3.4 J.3.3.1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid

    def item(ref: Reference) -> Dataset:
        entry = Dataset()
        entry.ReferencedSOPClassUID, entry.ReferencedSOPInstanceUID = ref
        return entry

    if answer.committed:
        ds.ReferencedSOPSequence = [item(ref) for ref in answer.committed]
    if answer.failed:
        failed = []
        for ref, reason in answer.failed:
            entry = item(ref)
            entry.FailureReason = reason
            failed.append(entry)
        ds.FailedSOPSequence = failed
    return ds


# -- reporting ----------------------------------------------------------------------------------------
Send = Callable[[Dataset, int], "str | None"]  # event information, event type -> an error, or None


def send_report(assoc: Association, information: Dataset, event_type: int) -> str | None:
    """Send one N-EVENT-REPORT on an established association; an error, or None when the
    modality answered success."""
    if not assoc.is_established:
        return "association no longer established"
    try:
        park_reactor(assoc)  # else the reactor may take the N-EVENT-REPORT response as unexpected
        status, _ = assoc.send_n_event_report(information, event_type, STORAGE_COMMITMENT,
                                              STORAGE_COMMITMENT_INSTANCE)
    except Exception as exc:  # noqa: BLE001 - lost peer, refused context, encoding
        return f"N-EVENT-REPORT failed: {exc}"
    if "Status" not in status:
        return "no N-EVENT-REPORT response (DIMSE timeout or association aborted)"
    if int(status.Status) != SUCCESS:
        return f"modality answered the N-EVENT-REPORT with 0x{int(status.Status):04X}"
    return None


def report(queue: Queue, request: StoredCommitment, answer: Answer, claimer: str, send: Send, association: str,
           retry_s: float) -> bool:
    """Claim the request's report, send it, record the result: the one place a report is
    recorded. False when another process has the report, or it could not be delivered (then
    it is retried after a backoff)."""
    if not queue.claim_commitment(request.id, claimer, time.time() + CLAIM_S):
        return False
    bound = _log.bind(transaction_uid=request.transaction_uid, calling_ae=request.calling_ae, association=association)
    try:
        error = send(event_information(request.transaction_uid, answer), answer.event_type)
    except Exception as exc:  # noqa: BLE001 - never leave the claim behind
        error = f"cannot send the report: {exc}"
    if error:
        delay = min(MAX_RETRY_S, retry_s * 2 ** request.attempts)
        queue.commitment_not_reported(request.id, error, time.time() + delay)
        metrics.COMMITMENT_REPORT_FAILURES.inc()
        bound.warning("commitment_report_failed", error=error, attempts=request.attempts + 1,
                      retry_in_s=round(delay, 1))
        return False
    queue.commitment_reported(request.id, answer.event_type)
    outcome = "committed" if answer.event_type == ALL_COMMITTED else "failures"
    metrics.COMMITMENT_REPORTS.labels(outcome=outcome, association=association).inc()
    metrics.COMMITMENT_INSTANCES.labels(result="committed").inc(len(answer.committed))
    metrics.COMMITMENT_INSTANCES.labels(result="failed").inc(len(answer.failed))
    reasons: dict[str, int] = {}
    for _, reason in answer.failed:
        reasons[f"0x{reason:04X}"] = reasons.get(f"0x{reason:04X}", 0) + 1
    bound.info("commitment_reported", event_type=answer.event_type, committed=len(answer.committed),
               failed=len(answer.failed), failure_reasons=reasons or None,
               waited_s=round(time.time() - request.received_at, 2))
    return True


def _due(queue: Queue, mode: str, request: StoredCommitment, now: float,
         relay_to: Collection[str] = frozenset()) -> Answer | None:
    """The answer to report now, or None while instances are pending within the deadline."""
    answer = decide(queue, mode, request, now, relay_to)
    return None if answer.pending else answer


class Periodic:
    """A daemon thread calling `once()` every `interval` seconds until `stop()`; an error (the
    queue unavailable) is logged and the next pass tries again."""

    thread_name = "commitment"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.once()
            except Exception as exc:  # noqa: BLE001 - the queue failed: try again later
                _log.exception("commitment_error", error=str(exc))

    def once(self) -> object:
        raise NotImplementedError


class AssociationReports(Periodic):
    """In a receiving process: takes the requests (`accept`) and reports on the association a
    request came on, for as long as the modality keeps it open. When the association ends its
    requests are left to the supervisor's `Reporter`."""

    thread_name = "commitment-same-association"

    def __init__(self, queue: Queue, config: Commitment, interval: float = 0.2,
                 destinations: Callable[[], list[DestinationRules]] = list) -> None:
        super().__init__(interval)
        self.queue = queue
        self.config = config
        self.destinations = destinations  # the rule files in force (relay asks some of them)
        self._held: dict[str, Association] = {}
        self._renewed: dict[str, float] = {}
        self._lock = threading.Lock()

    def accept(self, action_type_id: int | None, information: Dataset | None, calling_ae: str,
               assoc: Association | None = None) -> int:
        """Store one N-ACTION's request durably; returns the N-ACTION status."""
        bound = _log.bind(calling_ae=calling_ae)
        try:
            transaction = parse_request(action_type_id, information)
        except MalformedRequest as exc:
            metrics.COMMITMENT_REQUESTS.labels(result="refused").inc()
            bound.error("commitment_refused", reason=str(exc), status=f"0x{exc.status:04X}")
            return exc.status
        holder = self._hold(assoc) if assoc is not None else ""
        try:
            result = accept_request(self.queue, transaction, calling_ae, self.config.timeout_s, holder)
        except Exception as exc:  # noqa: BLE001 - the queue is unavailable: the modality must ask again
            metrics.COMMITMENT_REQUESTS.labels(result="refused").inc()
            bound.exception("commitment_refused", transaction_uid=transaction.transaction_uid,
                            reason=f"cannot record the request: {exc}", status=f"0x{PROCESSING_FAILURE:04X}")
            return PROCESSING_FAILURE
        metrics.COMMITMENT_REQUESTS.labels(result=result).inc()
        bound.info("commitment_requested", transaction_uid=transaction.transaction_uid,
                   instances=len(transaction.references), result=result)
        return SUCCESS

    def _hold(self, assoc: Association) -> str:
        with self._lock:
            for holder, held in self._held.items():
                if held is assoc:
                    return holder
            holder = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self._held[holder] = assoc
            self._renewed[holder] = time.monotonic()
            return holder

    def stop(self) -> None:
        super().stop()
        with self._lock:
            holders, self._held = list(self._held), {}
        for holder in holders:
            self._give_up(holder)

    def _give_up(self, holder: str) -> None:
        try:
            self.queue.hold_commitments(holder, 0.0)  # the supervisor reports them from now on
        except Exception as exc:  # noqa: BLE001 - the hold expires by itself
            _log.warning("commitment_hold_not_released", error=str(exc))

    def once(self, now: float | None = None) -> None:
        """One pass over the held associations: report what is decided, renew the holds."""
        with self._lock:
            held = list(self._held.items())
        for holder, assoc in held:
            if not assoc.is_established:
                with self._lock:
                    self._held.pop(holder, None)
                    self._renewed.pop(holder, None)
                self._give_up(holder)
                continue
            if time.monotonic() - self._renewed.get(holder, 0) > HOLD_S / 3:
                self.queue.hold_commitments(holder, time.time() + HOLD_S)
                self._renewed[holder] = time.monotonic()
            current = time.time() if now is None else now
            for request in self.queue.pending_commitments(current, holder=holder):
                answer = _due(self.queue, self.config.mode, request, current, relaying(self.destinations()))
                if answer is not None:
                    report(self.queue, request, answer, holder,
                           lambda information, event_type: send_report(assoc, information, event_type),
                           "same", self.config.report_retry_s)


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0


def send_on_new_association(ae_title: str, address: ReplyAddress, calling_ae: str, information: Dataset,
                            event_type: int, timeouts: Timeouts = Timeouts()) -> str | None:
    """Open an association to the modality at `address` as the Storage Commitment SCP (SCP/SCU
    Role Selection, PS3.7 D.3.3.4), send the report, release; an error, or None."""
    ae = AE(ae_title=ae_title)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = timeouts.acse_s, timeouts.dimse_s, timeouts.network_s
    ae.add_requested_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    role = build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
    tls_args = (client_context(address.tls), address.host) if address.tls is not None else None
    assoc = ae.associate(address.host, address.port, ae_title=address.ae_title or calling_ae, ext_neg=[role],
                         tls_args=tls_args)
    if not assoc.is_established:
        return f"cannot associate with {address.host}:{address.port} " + (
            "(rejected)" if assoc.is_rejected else "(aborted)" if assoc.is_aborted else "(no answer)")
    try:
        if not any(cx.abstract_syntax == STORAGE_COMMITMENT for cx in assoc.accepted_contexts):
            return "the modality accepted no Storage Commitment presentation context in the SCP role"
        return send_report(assoc, information, event_type)
    finally:
        if assoc.is_established:
            assoc.release()


class Reporter(Periodic):
    """In the supervisor: reports the requests no association holds any more, on a new
    association to each modality's configured address, retried with backoff."""

    thread_name = "commitment-reporter"

    def __init__(self, queue: Queue, config: Commitment, ae_title: str, timeouts: Timeouts = Timeouts(),
                 interval: float = 0.5, clock: Callable[[], float] = time.time,
                 destinations: Callable[[], list[DestinationRules]] = list) -> None:
        super().__init__(interval)
        self.queue = queue
        self.config = config
        self.ae_title = ae_title
        self.destinations = destinations  # the rule files in force (relay asks some of them)
        self.timeouts = timeouts
        self.clock = clock
        self.claimer = f"reporter-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def once(self) -> int:
        """Report every request that is decided (or past its deadline); returns how many went out."""
        sent = 0
        now = self.clock()
        relay_to = relaying(self.destinations())
        for request in self.queue.pending_commitments(now):
            if self._stop.is_set():
                break
            answer = _due(self.queue, self.config.mode, request, now, relay_to)
            if answer is None:
                continue
            sent += report(self.queue, request, answer, self.claimer, self._sender(request), "new",
                           self.config.report_retry_s)
        return sent

    def _sender(self, request: StoredCommitment) -> Send:
        address = self.config.modalities.get(request.calling_ae)

        def send(information: Dataset, event_type: int) -> str | None:
            if address is None:
                return (f"no reply address for {request.calling_ae!r}: add it to [commitment] modalities "
                        "(or keep the association open until the report comes)")
            return send_on_new_association(self.ae_title, address, request.calling_ae, information, event_type,
                                           self.timeouts)

        return send
