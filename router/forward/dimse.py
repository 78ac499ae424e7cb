"""The DIMSE sender: C-STORE over the destination's association pool (`forward.association`).

A batch is split so that no association needs more than 128 presentation contexts (and, with
`forward_calling_ae_title`, so that each association carries one modality's instances); each
part goes over an association from the pool, re-negotiated when it needs contexts the open one
was not proposed. The C-STORE status decides each item: success and the warnings the standard
defines, a retry (0xA7xx and unknown codes) or a permanent failure, with the destination's own
`statuses` overrides, read when its rule file loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from router import codecs
from router.config import Destination, is_valid_ae_title
from router.forward.association import MAX_CONTEXTS, AssociationPool, Contexts, contexts_for, count, merge
from router.forward.sender import Outgoing, Ready, ReadyCheck, Sender, Sent
from router.request import Outcome
from router.uids import UNCOMPRESSED

# PS3.7 Annex C: the warning statuses (0001, 0107, 0116, Bxxx) all mean "stored"
WARNINGS: list[tuple[int, int]] = [(0x0001, 0x0001), (0x0107, 0x0107), (0x0116, 0x0116), (0xB000, 0xBFFF)]
DEFAULT_STATUSES: list[tuple[int, int, str]] = [
    (0x0000, 0x0000, "success"),
    *((low, high, "success") for low, high in WARNINGS),
    (0xA700, 0xA7FF, "retry"),
    (0xA900, 0xA9FF, "permanent"),
    (0xC000, 0xCFFF, "permanent"),
    (0x0122, 0x0122, "permanent"),
    (0x0124, 0x0124, "permanent"),
]


def classify_status(code: int, overrides: list[tuple[int, int, str]] = ()) -> str:
    """C-STORE status -> 'success' | 'retry' | 'permanent'. Overrides (parsed ranges) win;
    unknown codes retry."""
    for low, high, outcome in (*overrides, *DEFAULT_STATUSES):
        if low <= code <= high:
            return outcome
    return "retry"


class DimseSender(Sender):
    """C-STORE to one destination, over its pool of associations."""

    def __init__(self, name: str, destination: Callable[[], Destination], pool: AssociationPool) -> None:
        self.name = name
        self._destination = destination  # the rule file in force
        self.associations = pool
        self._accepted: dict[str, frozenset[str]] = {}  # SOP class -> syntaxes the last association took
        self._refused: dict[str, frozenset[str]] = {}  # SOP class -> syntaxes it was offered and did not take

    def accepted(self, sop_class_uid: str) -> frozenset[str] | None:
        return self._accepted.get(sop_class_uid)

    def refused(self, sop_class_uid: str) -> frozenset[str]:
        return self._refused.get(sop_class_uid, frozenset())

    def idle(self) -> None:
        self.associations.release_idle()

    def close(self) -> None:
        self.associations.close()

    def send(self, batch: list[Outgoing], ready: ReadyCheck) -> Iterator[Sent]:
        destination = self._destination()
        for group in groups(batch, destination.forward_calling_ae_title):
            stopped = yield from self._send_group(destination, group, ready)
            if stopped:
                return

    def _calling_ae_title(self, destination: Destination, item: Outgoing) -> str:
        """The modality's own calling AE title with `forward_calling_ae_title` (when it is a valid
        one), else the configured one."""
        if destination.forward_calling_ae_title and is_valid_ae_title(item.job.instance.calling_ae):
            return item.job.instance.calling_ae
        return destination.calling_ae_title or self.associations.calling_ae_title

    def _send_group(self, destination: Destination, group: list[Outgoing], ready: ReadyCheck) -> Iterator[Sent]:
        wanted = merge(*(contexts_for(item.job.instance.sop_class_uid, item.possible) for item in group))
        calling = self._calling_ae_title(destination, group[0])
        association = self.associations.acquire(wanted, calling)
        try:
            error = association.open(wanted, calling)
            if error:
                group[0].log.warning("association_failed", error=error, host=destination.host, port=destination.port)
                for item in group:
                    yield Sent(item, Outcome.RETRY, error)
                return False
            for sop in wanted:
                self._accepted[sop] = frozenset(ts for ts in wanted[sop] if association.accepts(sop, ts))
                self._refused[sop] = frozenset(wanted[sop]) - self._accepted[sop]
            for item in group:
                if not association.is_open:
                    return False
                go = ready(item)
                if go is Ready.STOP:
                    return True
                if go is Ready.SKIP:
                    continue
                sent = self._store(destination, association, item, ready)
                if sent is not None:
                    yield sent
            return False
        finally:
            self.associations.give_back(association)

    def _store(self, destination: Destination, association, item: Outgoing,  # noqa: ANN001
               ready: ReadyCheck) -> Sent | None:
        """C-STORE one item; None when the forwarder recorded it instead (it could not fall back)."""
        sop = item.job.instance.sop_class_uid
        if not association.accepts(sop, item.transfer_syntax_uid):
            accepted = tuple(codecs.get(ts).name for ts in UNCOMPRESSED if association.accepts(sop, ts))
            if ready(item, refused=accepted) is not Ready.SEND:
                return None
            if not association.accepts(sop, item.transfer_syntax_uid):
                return Sent(item, Outcome.DEAD, f"destination accepts no presentation context for SOP class {sop}")
        size = item.path.stat().st_size
        started = time.monotonic()
        try:
            status = association.store(item.path)
        except Exception as exc:  # noqa: BLE001 - unreadable file, encoding problem, lost peer
            association.abort()
            return Sent(item, Outcome.RETRY, f"C-STORE failed: {exc}")
        elapsed = time.monotonic() - started
        if "Status" not in status:
            association.abort()
            return Sent(item, Outcome.RETRY, "no C-STORE response (DIMSE timeout or association aborted)",
                        seconds=elapsed)
        code = int(status.Status)
        verdict = classify_status(code, destination.status_ranges)
        if verdict == "success":
            if any(low <= code <= high for low, high in WARNINGS):
                item.log.warning("stored_with_warning", status=f"0x{code:04X}",
                                 comment=str(status.get("ErrorComment", "") or ""))
            return Sent(item, Outcome.DELIVERED, size=size, seconds=elapsed, status=f"0x{code:04X}")
        if verdict == "retry":
            return Sent(item, Outcome.RETRY, f"destination answered 0x{code:04X}", seconds=elapsed)
        return Sent(item, Outcome.DEAD, f"destination answered 0x{code:04X} (permanent failure)", seconds=elapsed)


def groups(items: list[Outgoing], by_caller: bool = False) -> list[list[Outgoing]]:
    """Split a batch so that no association needs more than 128 presentation contexts, and,
    `by_caller`, so that each association carries the instances of one calling AE title.
    Without `by_caller` the batch keeps the order it was claimed in (a stable study goes in
    series and instance number order, whatever its SOP classes)."""

    def contexts(item: Outgoing) -> Contexts:
        return contexts_for(item.job.instance.sop_class_uid, item.possible)

    if not by_caller:
        in_order: list[list[Outgoing]] = []
        wanted: Contexts = {}
        for item in items:
            with_item = merge(wanted, contexts(item))
            if not in_order or count(with_item) > MAX_CONTEXTS:
                in_order.append([])
                with_item = merge(contexts(item))
            in_order[-1].append(item)
            wanted = with_item
        return in_order
    by_key: dict[tuple[str, str], list[Outgoing]] = {}
    for item in items:
        by_key.setdefault((item.job.instance.calling_ae, item.job.instance.sop_class_uid), []).append(item)
    found: list[list[Outgoing]] = []
    group: list[Outgoing] = []
    for caller, sop_class in sorted(by_key, key=lambda key: key[0]):
        class_items = by_key[(caller, sop_class)]
        if group and (count(merge(*(contexts(i) for i in group + class_items))) > MAX_CONTEXTS
                      or group[0].job.instance.calling_ae != caller):
            found.append(group)
            group = []
        group.extend(class_items)
    if group:
        found.append(group)
    return found
