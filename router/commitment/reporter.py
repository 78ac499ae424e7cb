"""In the supervisor: the storage commitment reports no association holds any more, each sent on
a new association to the modality's configured address (the router keeping the SCP role),
retried with backoff.

Reports to different modalities never wait for each other: each modality (calling AE title)
with a reply address gets a thread of its own for its reports, oldest first, at most
MAX_MODALITIES at once. A modality whose thread is still busy (its address accepts TCP and never
answers: up to the timeouts per attempt) is left out of the passes until it is done; the other
modalities' reports go out meanwhile. A request whose modality has no reply address fails at
once, without a thread.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import build_role

from router import log
from router.commitment.decide import due, relaying
from router.commitment.messages import STORAGE_COMMITMENT
from router.commitment.reports import Periodic, Send, report, send_report
from router.config import Commitment, DestinationRules, ReplyAddress, Timeouts
from router.forward.outbound import NotAssociated, Peer, associate, context, release
from router.queue import CommitmentQueue, StoredCommitment
from router.uids import UNCOMPRESSED

MAX_MODALITIES = 32  # modalities whose reports are being sent at once, each on its own thread
STOP_WAIT_S = 5.0  # stop() waits this long for the reports on their way

_log = log.get("commitment")


def send_on_new_association(ae_title: str, address: ReplyAddress, calling_ae: str, information: Dataset,
                            event_type: int, timeouts: Timeouts = Timeouts()) -> str | None:
    """Open an association to the modality at `address` as the Storage Commitment SCP (SCP/SCU
    Role Selection, PS3.7 D.3.3.4), send the report, release; an error, or None."""
    peer = Peer(address.host, address.port, address.ae_title or calling_ae, address.tls)
    role = build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
    try:
        assoc = associate(peer, ae_title, [context(STORAGE_COMMITMENT, UNCOMPRESSED)], timeouts, ext_neg=[role])
    except NotAssociated as exc:
        return str(exc)
    try:
        if not any(cx.abstract_syntax == STORAGE_COMMITMENT for cx in assoc.accepted_contexts):
            return "the modality accepted no Storage Commitment presentation context in the SCP role"
        return send_report(assoc, information, event_type)
    finally:
        release(assoc)


@dataclass
class _Sending:
    """One modality's reports being sent on its thread."""

    thread: threading.Thread | None = None
    sent: int = 0  # delivered, once the thread is done

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Reporter(Periodic):
    """In the supervisor: reports the requests no association holds any more, on a new
    association to each modality's configured address, retried with backoff; each modality's
    on a thread of its own (one that does not answer delays no other)."""

    thread_name = "commitment-reporter"

    def __init__(self, queue: CommitmentQueue, config: Commitment, ae_title: str, timeouts: Timeouts = Timeouts(),
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
        self._sending: dict[str, _Sending] = {}  # calling AE title -> its thread, while it sends (passes only)

    def stop(self) -> None:
        super().stop()
        deadline = time.monotonic() + STOP_WAIT_S  # a report on its way finishes; a silent modality is left
        for sending in list(self._sending.values()):
            if sending.thread is not None:
                sending.thread.join(max(0.0, deadline - time.monotonic()))

    def once(self, wait_s: float = 0.0) -> int:
        """Start reporting every request that is decided (or past its deadline), each modality's
        on its own thread; a modality still busy with earlier reports is left for a later pass,
        not waited for. Waits up to `wait_s` for the threads started now; returns how many
        reports they (and the requests without a reply address) delivered by then."""
        now = self.clock()
        relay_to = relaying(self.destinations())
        by_modality: dict[str, list[StoredCommitment]] = {}
        for request in self.queue.pending_commitments(now):
            by_modality.setdefault(request.calling_ae, []).append(request)
        sent = 0
        started: list[_Sending] = []
        self._sending = {ae: sending for ae, sending in self._sending.items() if sending.busy}
        for calling_ae, requests in by_modality.items():
            if self._stop.is_set():
                break
            if calling_ae not in self.config.modalities:
                sent += self._report(requests, relay_to)  # fails at once: nowhere to send it
            elif calling_ae not in self._sending and len(self._sending) < MAX_MODALITIES:
                self._sending[calling_ae] = sending = self._start(calling_ae, requests, relay_to)
                started.append(sending)
            # else still busy with its earlier reports (or too many are): a later pass takes it
        deadline = time.monotonic() + wait_s
        for sending in started:
            assert sending.thread is not None
            sending.thread.join(max(0.0, deadline - time.monotonic()))
            if not sending.busy:
                sent += sending.sent
        return sent

    def _start(self, calling_ae: str, requests: list[StoredCommitment], relay_to: Collection[str]) -> _Sending:
        sending = _Sending()

        def run() -> None:
            try:
                sending.sent = self._report(requests, relay_to)
            except Exception as exc:  # noqa: BLE001 - the queue failed: a later pass tries again
                _log.exception("commitment_error", error=str(exc), calling_ae=calling_ae)

        sending.thread = threading.Thread(target=run, name=f"{self.thread_name}-{calling_ae}", daemon=True)
        sending.thread.start()
        return sending

    def _report(self, requests: list[StoredCommitment], relay_to: Collection[str]) -> int:
        """Report one modality's requests that are due, oldest first; returns how many went out."""
        sent = 0
        for request in requests:
            if self._stop.is_set():
                break
            answer = due(self.queue, self.config.mode, request, self.clock(), relay_to)
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
