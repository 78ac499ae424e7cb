"""Storage commitment relayed to the destinations (`[commitment] mode = "relay"`): a modality
hears "committed" only once the archive itself committed the instance.

    plan     for each modality request not reported yet (`Queue.open_commitments`), the
             instances delivered to a destination that has a storage commitment SCP
             (`[destination] commitment`) and not asked about yet for that request become a
             relay request: one per (request, destination), up to MAX_REFERENCES instances, with
             the SOP Class and Instance UIDs as sent (a transcoded instance may have gone out under
             a new SOP Instance UID: the history has it). It waits until none of the request's
             instances is still on its way anywhere, or GATHER_S after the last delivery, so that
             a study is usually one N-ACTION. Stored first (`Queue.add_relay`): an instance is
             asked about once per request and destination, however many processes plan.
    ask      a relay request is claimed in the database (`Queue.claim_relay`) and one N-ACTION
             (Action Type 1, the router's own Transaction UID) goes to the destination's SCP as
             the router's `[listen] ae_title`, the AE title the destination reports to; each
             destination's on a thread of its own, so one slow to answer delays no other (while
             it is busy, later passes leave it out instead of waiting for it). Not
             taken (no connection, no answer, a transient status): sent again after
             `relay_retry_s`, doubling up to 10 minutes. Refused for good (no Storage Commitment
             presentation context: the destination has no such SCP; or a status no retry
             changes): its instances fail with 0x0110. Taken: the report is awaited; the
             association stays open `keep_open_s` for a report on it.
    answer   the destination's N-EVENT-REPORT, on that association or on a new one it opens to
             the router's listener (any receiving process; the router accepts the SCU role for
             the SOP class), is recorded per instance (`record_report`) before it is answered:
             committed, or failed with the destination's Failure Reason, carried over to the
             modality. An instance the report leaves out fails with 0x0110. Only the destination
             asked is believed: a report whose calling AE title is not that destination's storage
             commitment SCP's, or that comes from an address its host does not resolve to, is
             answered 0x0110, logged and counted, and changes nothing (`accept.not_from`).
    again    a destination that took the N-ACTION but sent no report within `relay_reask_s` (it
             was lost, e.g. while the router was down) is asked again with the same Transaction
             UID; past the modality request's `timeout_s`, `commitment.decide` fails what is still
             unanswered with 0x0110 and nothing more is asked for it.

A claim dies with its process (CLAIM_S, or at once at the next start of the same node): a relay
request is sent at least once, never lost. `commitment.decide` reads the answers; the modality's
report goes out as in every mode (`commitment.Reporter`, `commitment.AssociationReports`).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.association import Association

from router import log, metrics
from router.commitment.accept import record_report
from router.commitment.messages import (
    PROCESSING_FAILURE, REQUEST_STORAGE_COMMITMENT, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, SUCCESS,
    action_information, transaction_ref,
)
from router.commitment.reports import Periodic
from router.compat.pynetdicom import park_reactor
from router.config import Commitment, CommitmentScp, Destination, DestinationRules, Timeouts
from router.forward.outbound import NotAssociated, Peer, associate, backoff_delay, context, release
from router.queue import CommitmentQueue, RelayedInstance, StoredRelay
from router.uids import IMPLICIT_LE, UNCOMPRESSED, VERIFICATION

GATHER_S = 10.0  # a relay request waits this long after its last delivery while other instances are on their way
MAX_REFERENCES = 1000  # instances per N-ACTION
CLAIM_S = 120.0  # a claimed relay request not recorded within this (or its N-ACTION's timeouts) can be claimed again
MAX_RETRY_S = 600.0
MAX_THREADS = 8  # destinations asked at once
STOP_WAIT_S = 5.0  # stop() waits this long for the N-ACTIONs on their way
# N-ACTION statuses that sending again cannot change (PS3.7 C.4, PS3.4 J.3.2): the destination
# cannot take this request at all
PERMANENT_STATUSES = frozenset({0x0105, 0x0106, 0x0112, 0x0117, 0x0118, 0x0119, 0x0120, 0x0122, 0x0123, 0x0124})
# N-ACTION warnings: the request was taken
WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})

_log = log.get("commitment")


# -- asking the destination -----------------------------------------------------------------------
@dataclass
class Asked:
    """How an N-ACTION went: an error (and whether sending again could change it), or the
    association it was taken on, still open."""

    error: str | None = None
    permanent: bool = False
    association: Association | None = None


ReportHandler = Callable[[evt.Event], "tuple[int, None]"]


def ask(scp: CommitmentScp, calling_ae: str, relay: StoredRelay, timeouts: Timeouts,
        on_report: ReportHandler | None = None) -> Asked:
    """Send one relay request's N-ACTION to the destination's storage commitment SCP. A report
    that comes on the association goes to `on_report`; the caller releases the association."""
    peer = Peer(scp.host, scp.port, scp.ae_title, scp.tls)
    where = peer.where
    # Verification too: a destination without the SOP class still associates and says it refuses it
    contexts = [context(STORAGE_COMMITMENT, UNCOMPRESSED), context(VERIFICATION, [IMPLICIT_LE])]
    handlers = [(evt.EVT_N_EVENT_REPORT, on_report)] if on_report is not None else []
    try:
        assoc = associate(peer, calling_ae, contexts, timeouts, evt_handlers=handlers)
    except NotAssociated as exc:
        return Asked(str(exc))
    if not any(cx.abstract_syntax == STORAGE_COMMITMENT for cx in assoc.accepted_contexts):
        assoc.release()
        return Asked(f"{where} accepts no Storage Commitment Push Model presentation context: it has no storage "
                     "commitment SCP there", permanent=True)
    try:
        park_reactor(assoc)  # else the reactor may take the N-ACTION response as unexpected
        status, _ = assoc.send_n_action(action_information(relay), REQUEST_STORAGE_COMMITMENT, STORAGE_COMMITMENT,
                                        STORAGE_COMMITMENT_INSTANCE)
    except Exception as exc:  # noqa: BLE001 - lost peer, encoding
        assoc.abort()
        return Asked(f"N-ACTION to {where} failed: {exc}")
    if "Status" not in status:
        if assoc.is_established:
            assoc.abort()
        return Asked(f"no N-ACTION response from {where} (DIMSE timeout or association aborted; does it know the "
                     f"router as {calling_ae}?)")
    code = int(status.Status)
    if code != SUCCESS and code not in WARNING_STATUSES and not 0xB000 <= code <= 0xBFFF:
        assoc.release()
        return Asked(f"{where} answered the N-ACTION with 0x{code:04X}", permanent=code in PERMANENT_STATUSES)
    return Asked(association=assoc)


def peer_address(assoc: Association) -> str:
    """The IP address the router reached on an association it opened (the peer's name resolved)."""
    sock = getattr(assoc.dul.socket, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else str(assoc.acceptor.address)
    except OSError:  # the peer is gone
        return str(assoc.acceptor.address)


# -- the worker -------------------------------------------------------------------------------------
@dataclass
class _Open:
    """An N-ACTION's association kept open for a report on it."""

    association: Association
    until: float  # monotonic
    reported: threading.Event = field(default_factory=threading.Event)


class Relayer(Periodic):
    """In the supervisor: plans the relay requests, sends their N-ACTIONs, asks again when a
    report is overdue. Several nodes may run one each: the database decides who sends what."""

    thread_name = "commitment-relay"

    def __init__(self, queue: CommitmentQueue, config: Commitment, destinations: Callable[[], list[DestinationRules]],
                 ae_title: str, interval: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        super().__init__(interval)
        self.queue = queue
        self.config = config
        self.destinations = destinations
        self.ae_title = ae_title
        self.clock = clock
        # named after the node: a node starting again takes back its own claims at once
        self.claimer = f"{queue.node or 'local'}/relay-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._open: list[_Open] = []
        self._open_lock = threading.Lock()
        # destination -> the thread sending its relay requests and what it took (passes only)
        self._sending: dict[str, tuple[threading.Thread, list[int]]] = {}

    def stop(self) -> None:
        super().stop()
        deadline = time.monotonic() + STOP_WAIT_S  # an N-ACTION on its way finishes; a silent destination is left
        for thread, _ in list(self._sending.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._release(everything=True)

    def once(self, wait_s: float = 0.0) -> int:
        """One pass: plan, start sending what is due (`send_due`); returns how many N-ACTIONs
        were taken within `wait_s`."""
        self._release()
        relay_to = {d.name: d.destination for d in self.destinations() if d.destination.commitment_scp is not None}
        if not relay_to:
            return 0
        now = self.clock()
        self.plan(now, set(relay_to))
        return self.send_due(now, relay_to, wait_s)

    def plan(self, now: float, relay_to: set[str]) -> list[int]:
        """Store the relay requests due now; returns their ids."""
        planned = []
        for request in self.queue.open_commitments(now):
            uids = {uid for _, uid in request.references}
            where = self.queue.whereabouts(uids)
            stored = self.queue.deliveries(uids)
            asked = self.queue.relay_results(request.id)
            settled = all(found.unfinished == 0 for found in where.values())
            ready: dict[str, dict[str, RelayedInstance]] = {}
            newest: dict[str, float] = {}
            for sop_class, uid in request.references:
                found = where.get(uid)
                if found is None or sop_class not in found.sop_class_uids or found.dead:
                    continue  # it fails whatever a destination says
                for name, delivery in stored.get(uid, {}).items():
                    if name in relay_to and (name, uid) not in asked:
                        ready.setdefault(name, {})[uid] = RelayedInstance(uid, delivery.sop_class_uid,
                                                                          delivery.sop_instance_uid)
                        newest[name] = max(newest.get(name, 0.0), delivery.delivered_at)
            for name, items in sorted(ready.items()):
                if not settled and now - newest[name] < GATHER_S:
                    continue
                batch = list(items.values())
                for start in range(0, len(batch), MAX_REFERENCES):
                    part = batch[start:start + MAX_REFERENCES]
                    relay_id = self.queue.add_relay(request.id, name, generate_uid(), part, now)
                    if relay_id is not None:
                        planned.append(relay_id)
        return planned

    def send_due(self, now: float, relay_to: dict[str, Destination], wait_s: float = 0.0) -> int:
        """Start sending every relay request due now that this process can claim, each
        destination's on a thread of its own (one slow to answer delays no other); a destination
        whose thread is still busy is left for a later pass, not waited for. Waits up to `wait_s`
        for the threads started now; returns how many N-ACTIONs they had taken by then."""
        by_destination: dict[str, list[StoredRelay]] = {}
        for relay in self.queue.due_relays(now):
            if relay.destination in relay_to:  # else no storage commitment SCP any more: its C-STORE success counts
                by_destination.setdefault(relay.destination, []).append(relay)

        def send(relays: list[StoredRelay], taken: list[int]) -> None:
            for relay in relays:
                if self._stop.is_set():
                    break
                try:
                    timeouts = relay_to[relay.destination].timeouts  # the claim outlasts the longest N-ACTION
                    claim_s = max(CLAIM_S, timeouts.connect_s + timeouts.acse_s + timeouts.dimse_s + CLAIM_S / 4)
                    if self.queue.claim_relay(relay.id, self.claimer, time.time() + claim_s, now):
                        taken.append(self._send(relay, relay_to[relay.destination]))
                except Exception as exc:  # noqa: BLE001 - the queue failed: a later pass tries again
                    _log.exception("commitment_error", error=str(exc), destination=relay.destination)
                    break

        self._sending = {name: busy for name, busy in self._sending.items() if busy[0].is_alive()}
        started: list[tuple[threading.Thread, list[int]]] = []
        for name, relays in by_destination.items():
            if name in self._sending or len(self._sending) >= MAX_THREADS:
                continue  # still busy with its earlier requests (or too many are): a later pass takes it
            taken: list[int] = []
            thread = threading.Thread(target=send, args=(relays, taken), name=f"{self.thread_name}-{name}",
                                      daemon=True)
            self._sending[name] = (thread, taken)
            started.append((thread, taken))
            thread.start()
        deadline = time.monotonic() + wait_s
        count = 0
        for thread, taken in started:
            thread.join(max(0.0, deadline - time.monotonic()))
            if not thread.is_alive():
                count += sum(taken)
        return count

    def _send(self, relay: StoredRelay, destination: Destination) -> int:
        scp = destination.commitment_scp
        assert scp is not None
        bound = _log.bind(destination=relay.destination, transaction=transaction_ref(relay.transaction_uid))
        reported = threading.Event()

        def on_report(event: evt.Event) -> tuple[int | Dataset, None]:
            try:
                information = event.event_information
            except Exception:  # noqa: BLE001 - undecodable: malformed
                information = None
            # on the association the router opened: the SCP it called, at the address it reached
            status = record_report(self.queue, event.event_type, information, event.assoc.acceptor.ae_title.strip(),
                                   "same", peer_address(event.assoc), self.destinations())
            reported.set()
            return status, None

        try:
            asked = ask(scp, self.ae_title, relay, destination.timeouts, on_report)
        except Exception as exc:  # noqa: BLE001 - never leave the claim behind
            asked = Asked(f"cannot send the N-ACTION: {exc}")
        instances = len(relay.instances)
        if asked.error is not None:
            if asked.permanent:
                self.queue.relay_refused(relay.id, self.claimer, asked.error, PROCESSING_FAILURE)
                metrics.COMMITMENT_RELAYED_INSTANCES.labels(destination=relay.destination,
                                                            result="failed").inc(instances)
                bound.error("commitment_relay_refused", transaction_uid=relay.transaction_uid, error=asked.error,
                            instances=instances, failure_reason=f"0x{PROCESSING_FAILURE:04X}")
            else:
                delay = backoff_delay(relay.attempts + 1, self.config.relay_retry_s, MAX_RETRY_S, jitter=False)
                self.queue.relay_not_sent(relay.id, self.claimer, asked.error, time.time() + delay)
                bound.warning("commitment_relay_failed", transaction_uid=relay.transaction_uid, error=asked.error,
                              instances=instances, attempts=relay.attempts + 1, retry_in_s=round(delay, 1))
            return 0
        self.queue.relay_sent(relay.id, self.claimer, time.time() + self.config.relay_reask_s)
        bound.info("commitment_relay_sent", instances=instances, attempts=relay.attempts + 1,
                   asked_again=relay.state == "sent" or None)
        assert asked.association is not None
        if scp.keep_open_s > 0 and not reported.is_set():
            with self._open_lock:
                self._open.append(_Open(asked.association, time.monotonic() + scp.keep_open_s, reported))
        else:
            release(asked.association)
        return 1

    def _release(self, everything: bool = False) -> None:
        """Release the kept associations whose report came, whose time is up, or (`everything`) all."""
        now = time.monotonic()
        with self._open_lock:
            done = [held for held in self._open
                    if everything or held.reported.is_set() or now >= held.until or not held.association.is_established]
            self._open = [held for held in self._open if held not in done]
        for held in done:
            release(held.association)

