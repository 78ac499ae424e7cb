"""In the supervisor: the storage commitment reports no association holds any more, each sent on
a new association to the modality's configured address (the router keeping the SCP role),
retried with backoff.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import build_role

from router.commitment.decide import due, relaying
from router.commitment.messages import STORAGE_COMMITMENT
from router.commitment.reports import Periodic, Send, report, send_report
from router.config import Commitment, DestinationRules, ReplyAddress, Timeouts
from router.forward.outbound import NotAssociated, Peer, associate, context, release
from router.queue import CommitmentQueue, StoredCommitment
from router.uids import UNCOMPRESSED


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


class Reporter(Periodic):
    """In the supervisor: reports the requests no association holds any more, on a new
    association to each modality's configured address, retried with backoff."""

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

    def once(self) -> int:
        """Report every request that is decided (or past its deadline); returns how many went out."""
        sent = 0
        now = self.clock()
        relay_to = relaying(self.destinations())
        for request in self.queue.pending_commitments(now):
            if self._stop.is_set():
                break
            answer = due(self.queue, self.config.mode, request, now, relay_to)
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
