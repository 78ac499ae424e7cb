"""What the receiving side stores of storage commitment, before it answers: a modality's request
(N-ACTION, `accept_request`) and, in relay mode, a destination's report (N-EVENT-REPORT,
`record_report`). Both are durable in the queue database before the status goes back.
"""

from __future__ import annotations

import time

from pydicom.dataset import Dataset

from router import log, metrics
from router.commitment.messages import PROCESSING_FAILURE, SUCCESS, MalformedRequest, Transaction, failure_tally, parse_report
from router.queue import CommitmentQueue

HOLD_S = 5.0  # a receiving process renews its hold on its associations' requests within this

_log = log.get("commitment")


def accept_request(queue: CommitmentQueue, transaction: Transaction, calling_ae: str, timeout_s: float,
                   holder: str = "", now: float | None = None) -> str:
    """Store a request durably; returns "new", "repeated" (the same request again while it is
    pending: one report answers both) or "duplicate" (a Transaction UID in use for other
    instances: reported failed with 0x0131). `holder` names the association that may report it."""
    now = time.time() if now is None else now
    return queue.add_commitment(transaction.transaction_uid, calling_ae, transaction.references, now,
                                now + timeout_s, holder, now + HOLD_S if holder else 0.0)


def record_report(queue: CommitmentQueue, event_type_id: int | None, information: Dataset | None, calling_ae: str,
                  association: str) -> int:
    """Record a destination's N-EVENT-REPORT (on the N-ACTION's association: "same", or on one
    it opened to the router: "new"); returns the status to answer it with, 0x0000 once recorded.
    A report of a Transaction UID no relay request has is answered 0x0000 and logged."""
    bound = _log.bind(calling_ae=calling_ae, association=association)
    try:
        transaction_uid, results = parse_report(event_type_id, information)
    except MalformedRequest as exc:
        bound.error("commitment_relay_report_refused", reason=str(exc), status=f"0x{exc.status:04X}")
        return exc.status
    try:
        relay = queue.relay_answered(transaction_uid, results, PROCESSING_FAILURE)
    except Exception as exc:  # noqa: BLE001 - the queue is unavailable: the destination may send it again
        bound.exception("commitment_relay_report_refused", transaction_uid=transaction_uid,
                        reason=f"cannot record the report: {exc}", status=f"0x{PROCESSING_FAILURE:04X}")
        return PROCESSING_FAILURE
    if relay is None:
        bound.warning("commitment_relay_report_unknown", transaction_uid=transaction_uid,
                      reason="no relay request has this Transaction UID")
        return SUCCESS
    committed = sum(1 for item in relay.instances if results.get(item.sent_sop_instance_uid) == 0)
    reasons = failure_tally(reason for item in relay.instances
                            if (reason := results.get(item.sent_sop_instance_uid, PROCESSING_FAILURE)))
    failed = len(relay.instances) - committed
    metrics.COMMITMENT_RELAYED_INSTANCES.labels(destination=relay.destination, result="committed").inc(committed)
    metrics.COMMITMENT_RELAYED_INSTANCES.labels(destination=relay.destination, result="failed").inc(failed)
    listed = sum(1 for item in relay.instances if item.sent_sop_instance_uid in results)
    bound.info("commitment_relay_answered", destination=relay.destination, transaction_uid=transaction_uid,
               event_type=event_type_id, committed=committed, failed=failed, failure_reasons=reasons,
               not_in_report=(len(relay.instances) - listed) or None,
               waited_s=round(time.time() - relay.created_at, 2))
    return SUCCESS
