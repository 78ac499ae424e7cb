"""Storage commitment messages (Push Model, PS3.4 Annex J): the UIDs, statuses and Failure
Reasons, and the data sets of the N-ACTION and N-EVENT-REPORT, read and written here only.

`parse_request` reads a modality's N-ACTION, `event_information` writes the report the router
sends it; `action_information` writes the router's own N-ACTION to a destination (relay mode)
and `parse_report` reads that destination's report. Reading raises `MalformedRequest` with the
status to answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from router.queue import StoredRelay

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

NO_SUCH_EVENT_TYPE = 0x0113

Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


def failure_tally(reasons: Iterable[int]) -> dict[str, int] | None:
    """How many instances failed with each Failure Reason ("0x0110": 2), for the log; None for none."""
    tally: dict[str, int] = {}
    for reason in reasons:
        tally[f"0x{reason:04X}"] = tally.get(f"0x{reason:04X}", 0) + 1
    return tally or None


def transaction_ref(transaction_uid: str) -> str:
    """How info-level log lines name a transaction: the first 12 hex digits of the SHA-256 of its
    Transaction UID. Whoever has the UID finds its lines; the log does not give the UID away (a
    destination's report naming it is what relay mode believes)."""
    return hashlib.sha256(transaction_uid.encode()).hexdigest()[:12]


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


@dataclass(frozen=True)
class Answer:
    """What can be said of a request now."""

    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int], ...]  # with its Failure Reason
    pending: tuple[Reference, ...]

    @property
    def event_type(self) -> int:
        return FAILURES_EXIST if self.failed else ALL_COMMITTED


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


def parse_report(event_type_id: int | None, information: Dataset | None) -> tuple[str, dict[str, int]]:
    """The Transaction UID of a Storage Commitment N-EVENT-REPORT and, by SOP Instance UID, 0 for
    committed or the Failure Reason; raises MalformedRequest with the status to answer."""
    if event_type_id not in (ALL_COMMITTED, FAILURES_EXIST):
        raise MalformedRequest(NO_SUCH_EVENT_TYPE, f"event type {event_type_id} is not 1 or 2")
    if information is None:
        raise MalformedRequest(MISSING_ATTRIBUTE, "no Event Information")
    try:
        transaction_uid = read_uid(information.get("TransactionUID"), "Transaction UID")
        results: dict[str, int] = {}
        for index, item in enumerate(information.get("ReferencedSOPSequence") or []):
            uid = read_uid(item.get("ReferencedSOPInstanceUID"), f"Referenced SOP Instance UID of item {index + 1}")
            results[uid] = 0
        for index, item in enumerate(information.get("FailedSOPSequence") or []):
            uid = read_uid(item.get("ReferencedSOPInstanceUID"), f"Failed SOP Instance UID of item {index + 1}")
            reason = item.get("FailureReason")
            results[uid] = int(reason) if reason else PROCESSING_FAILURE
    except MalformedRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises decoding a broken value
        raise MalformedRequest(INVALID_ATTRIBUTE_VALUE, f"Event Information cannot be read: {exc}") from None
    return transaction_uid, results


def action_information(relay: StoredRelay) -> Dataset:
    """The N-ACTION's Action Information (PS3.4 J.3.2.1): the instances as the destination has them."""
    ds = Dataset()
    ds.TransactionUID = relay.transaction_uid
    items = []
    for item in relay.instances:
        entry = Dataset()
        entry.ReferencedSOPClassUID = item.sop_class_uid
        entry.ReferencedSOPInstanceUID = item.sent_sop_instance_uid
        items.append(entry)
    ds.ReferencedSOPSequence = items
    return ds
