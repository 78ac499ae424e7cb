"""What the receiving side stores of storage commitment, before it answers: a modality's request
(N-ACTION, `accept_request`) and, in relay mode, a destination's report (N-EVENT-REPORT,
`record_report`). Both are durable in the queue database before the status goes back. A report
is believed only from the destination its relay request went to (`not_from`): its storage
commitment SCP's AE title, from an address its host resolves to.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterable

from pydicom.dataset import Dataset

from router import log, metrics
from router.commitment.messages import (
    PROCESSING_FAILURE, SUCCESS, MalformedRequest, Transaction, failure_tally, parse_report, transaction_ref,
)
from router.config import DestinationRules
from router.queue import CommitmentQueue

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REFUSED_COMMENT = "report refused: not from the destination asked"  # Error Comment (LO: 64 characters at most)

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
                  association: str, address: str, destinations: Iterable[DestinationRules]) -> int | Dataset:
    """Record a destination's N-EVENT-REPORT (on the N-ACTION's association: "same", or on one
    it opened to the router: "new"), sent by `calling_ae` from `address`; returns the status to
    answer it with, 0x0000 once recorded. A report is taken only from the destination its relay
    request went to: the AE title and a resolved address of that destination's storage
    commitment SCP in the rule files in force (`destinations`); from anyone else it is refused
    with 0x0110 and an Error Comment saying why, logged and counted, and changes nothing. A
    report of a Transaction UID no relay request has is answered 0x0000 and logged."""
    bound = _log.bind(calling_ae=calling_ae, source_ip=address, association=association)
    try:
        transaction_uid, results = parse_report(event_type_id, information)
    except MalformedRequest as exc:
        metrics.COMMITMENT_RELAY_REPORTS_REFUSED.labels(reason="malformed").inc()
        bound.error("commitment_relay_report_refused", reason=str(exc), status=f"0x{exc.status:04X}")
        return exc.status
    try:
        destination = queue.relay_destination(transaction_uid)
        refused = not_from(destination, calling_ae, address, destinations) if destination is not None else None
        relay = None if destination is None or refused else queue.relay_answered(transaction_uid, results,
                                                                                   PROCESSING_FAILURE)
    except Exception as exc:  # noqa: BLE001 - the queue is unavailable: the destination may send it again
        bound.exception("commitment_relay_report_refused", transaction_uid=transaction_uid,
                        reason=f"cannot record the report: {exc}", status=f"0x{PROCESSING_FAILURE:04X}")
        return PROCESSING_FAILURE
    if refused is not None:
        reason, why = refused
        metrics.COMMITMENT_RELAY_REPORTS_REFUSED.labels(reason=reason).inc()
        bound.warning("commitment_relay_report_refused", destination=destination, transaction_uid=transaction_uid,
                      reason=why, cause=reason, status=f"0x{PROCESSING_FAILURE:04X}")
        from router import audit

        audit.security_alert(("110126", "Node Authentication"),
                             f"storage commitment report for {destination} refused: {why}",
                             audit.peer_ae(calling_ae, address))
        status = Dataset()
        status.Status = PROCESSING_FAILURE
        status.ErrorComment = REFUSED_COMMENT
        return status
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
    bound.info("commitment_relay_answered", destination=relay.destination, transaction=transaction_ref(transaction_uid),
               event_type=event_type_id, committed=committed, failed=failed, failure_reasons=reasons,
               not_in_report=(len(relay.instances) - listed) or None,
               waited_s=round(time.time() - relay.created_at, 2))
    return SUCCESS


def not_from(destination: str, calling_ae: str, address: str,
             destinations: Iterable[DestinationRules]) -> tuple[str, str] | None:
    """Why a report from `calling_ae` at `address` is not from `destination`'s storage commitment
    SCP: (the reason counted, what to log), or None when it is."""
    scp = next((d.destination.commitment_scp for d in destinations if d.name == destination), None)
    if scp is None or scp.host is None or scp.ae_title is None:
        return "unknown_destination", (f"the relay request went to {destination!r}, which has no storage commitment "
                                       "SCP in the rule files in force")
    if calling_ae.strip() != scp.ae_title.strip():
        return "ae_title", (f"the relay request went to {destination!r}, whose storage commitment SCP is "
                            f"{scp.ae_title.strip()!r}, not {calling_ae.strip()!r}")
    if _ip(address) not in host_addresses(scp.host):
        return "address", (f"the relay request went to {destination!r}, whose storage commitment SCP is at "
                           f"{scp.host}, not {address}")
    return None


def host_addresses(host: str) -> frozenset[IPAddress]:
    """The IP addresses `host` (a name or an address) resolves to now; none when it does not."""
    try:
        return frozenset(ip for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
                         if (ip := _ip(str(info[4][0]))) is not None)
    except (OSError, UnicodeError):
        return frozenset()


def _ip(text: str) -> IPAddress | None:
    """An address as compared: IPv4 for an IPv4-mapped IPv6 address, no zone; None if not one."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
