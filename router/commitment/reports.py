"""Storage commitment (Push Model, PS3.4 Annex J): whether a modality may delete its copies.

    request   an N-ACTION (Action Type 1) names a Transaction UID and the instances. It is stored
              in the queue database (`accept_request`) before the N-ACTION is answered 0x0000.
    decide    per instance: committed, failed (with its Failure Reason) or still pending, by the
              mode (`decide`):
                delivered  every destination the rules send it to answered C-STORE success (the
                           history says so); an instance no rule sends anywhere once it is durable
                relay      as delivered, and then each of those destinations that has a storage
                           commitment SCP (`[destination] commitment`) committed it when asked
                           (`commitment.relay`); its Failure Reason is carried over
                spooled    durable in the router (its jobs or its history exist)
              A dead letter fails with 0x0110 (processing failure), an instance the router never
              received with 0x0112 (no such object instance), one received as another SOP class
              with 0x0119, every instance of a reused Transaction UID with 0x0131. Past
              `[commitment] timeout_s`, what is still pending fails with 0x0110.
    report    once nothing is pending (or the timeout passed), one N-EVENT-REPORT (Event Type 1:
              all committed, 2: failures exist): on the association the request came on while
              the modality holds it (`AssociationReports`, in the receiving process that holds
              it), else on a new association to the modality's configured address, the router
              keeping the SCP role (`Reporter`, in the supervisor), retried with backoff. Each
              held association's reports, and each modality's on new associations, go on a
              thread of their own: one modality that never answers delays only its own. The
              process that sends a report claims it in the database first: one report per
              transaction, whatever the number of processes; a claim dies with its process.

Logs and metrics carry AE titles and counts, never patient data. Info-level log lines name a
transaction by `messages.transaction_ref` (a hash), never by its Transaction UID, which warnings
and errors carry: a destination's report naming the UID is believed in relay mode.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from router import log, metrics
from router.commitment.accept import HOLD_S, accept_request
from router.commitment.decide import due, relaying
from router.commitment.messages import (
    ALL_COMMITTED, PROCESSING_FAILURE, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, SUCCESS, Answer,
    MalformedRequest, event_information, failure_tally, parse_request, transaction_ref,
)
from router.compat.pynetdicom import park_reactor
from router.config import Commitment, DestinationRules
from router.forward.outbound import backoff_delay
from router.queue import CommitmentQueue, StoredCommitment

CLAIM_S = 120.0  # a claimed report not sent within this (its process died) can be claimed again
MAX_RETRY_S = 600.0

_log = log.get("commitment")


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


def report(queue: CommitmentQueue, request: StoredCommitment, answer: Answer, claimer: str, send: Send, association: str,
           retry_s: float) -> bool:
    """Claim the request's report, send it, record the result: the one place a report is
    recorded. False when another process has the report, or it could not be delivered (then
    it is retried after a backoff)."""
    if not queue.claim_commitment(request.id, claimer, time.time() + CLAIM_S):
        return False
    bound = _log.bind(transaction=transaction_ref(request.transaction_uid), calling_ae=request.calling_ae,
                      association=association)
    try:
        error = send(event_information(request.transaction_uid, answer), answer.event_type)
    except Exception as exc:  # noqa: BLE001 - never leave the claim behind
        error = f"cannot send the report: {exc}"
    if error:
        delay = backoff_delay(request.attempts + 1, retry_s, MAX_RETRY_S, jitter=False)
        queue.commitment_not_reported(request.id, error, time.time() + delay)
        metrics.COMMITMENT_REPORT_FAILURES.inc()
        bound.warning("commitment_report_failed", transaction_uid=request.transaction_uid, error=error,
                      attempts=request.attempts + 1, retry_in_s=round(delay, 1))
        return False
    queue.commitment_reported(request.id, answer.event_type)
    outcome = "committed" if answer.event_type == ALL_COMMITTED else "failures"
    metrics.COMMITMENT_REPORTS.labels(outcome=outcome, association=association).inc()
    metrics.COMMITMENT_INSTANCES.labels(result="committed").inc(len(answer.committed))
    metrics.COMMITMENT_INSTANCES.labels(result="failed").inc(len(answer.failed))
    bound.info("commitment_reported", event_type=answer.event_type, committed=len(answer.committed),
               failed=len(answer.failed), failure_reasons=failure_tally(reason for _, reason in answer.failed),
               waited_s=round(time.time() - request.received_at, 2))
    return True


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

    def __init__(self, queue: CommitmentQueue, config: Commitment, interval: float = 0.2,
                 destinations: Callable[[], list[DestinationRules]] = list) -> None:
        super().__init__(interval)
        self.queue = queue
        self.config = config
        self.destinations = destinations  # the rule files in force (relay asks some of them)
        self._held: dict[str, Association] = {}
        self._renewed: dict[str, float] = {}
        self._reporting: dict[str, threading.Thread] = {}  # holder -> the thread reporting on it (passes only)
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
        bound.info("commitment_requested", transaction=transaction_ref(transaction.transaction_uid),
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
        """One pass over the held associations: renew the holds, and report what is decided on
        each association's own thread (a modality that never answers its report holds back no
        other; while its thread is busy, its association is left out of the reporting)."""
        with self._lock:
            held = list(self._held.items())
        relay_to = relaying(self.destinations())
        for holder, assoc in held:
            if not assoc.is_established:
                with self._lock:
                    self._held.pop(holder, None)
                    self._renewed.pop(holder, None)
                self._reporting.pop(holder, None)  # a report still on its way ends with the association
                self._give_up(holder)
                continue
            if time.monotonic() - self._renewed.get(holder, 0) > HOLD_S / 3:
                self.queue.hold_commitments(holder, time.time() + HOLD_S)
                self._renewed[holder] = time.monotonic()
            busy = self._reporting.get(holder)
            if busy is not None and busy.is_alive():
                continue
            current = time.time() if now is None else now
            requests = self.queue.pending_commitments(current, holder=holder)
            if requests:
                thread = threading.Thread(target=self._report, args=(holder, assoc, requests, current, relay_to),
                                          name=f"{self.thread_name}-{holder}", daemon=True)
                self._reporting[holder] = thread
                thread.start()
            else:
                self._reporting.pop(holder, None)

    def _report(self, holder: str, assoc: Association, requests: list[StoredCommitment], now: float,
                relay_to: frozenset[str]) -> None:
        """Report an association's requests that are due, on it, oldest first."""
        try:
            for request in requests:
                answer = due(self.queue, self.config.mode, request, now, relay_to)
                if answer is not None:
                    report(self.queue, request, answer, holder,
                           lambda information, event_type: send_report(assoc, information, event_type),
                           "same", self.config.report_retry_s)
        except Exception as exc:  # noqa: BLE001 - the queue failed: a later pass tries again
            _log.exception("commitment_error", error=str(exc))
