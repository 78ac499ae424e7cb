"""Outbound associations: one to a destination (`Association`) and a destination's pool of them.

Each SOP class is proposed with the syntaxes its instances may go out in and, in separate
presentation contexts, Explicit and Implicit VR Little Endian, so that a destination that
refuses the compressed syntax still gets the image, decompressed.

The pool uses an open idle association before it opens another: a second one opens only when
every open association is busy sending, so `max_associations` is a ceiling, never a target.
(A destination that serves one association at a time, as a plain storescp does, would
otherwise make the second association wait until the first is released.)

With several nodes on one PostgreSQL queue, each association the pool keeps also holds one of
the destination's `max_associations` slots across the cluster (`Queue.take_slot`), so that a
PACS that allows two associations never sees more than two from all the nodes together.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from pydicom.dataset import Dataset

from router.compat.pynetdicom import reactor_parked, throttle_sends
from router.config import Destination
from router.forward.outbound import NotAssociated, Peer, associate, context, release
from router.forward.throttle import CHUNK, TokenBucket, bytes_per_second
from router.uids import IMPLICIT_LE, UNCOMPRESSED, VERIFICATION

MAX_CONTEXTS = 127  # 128 per association, one of them Verification
# a destination offered a lossy JPEG also gets the syntax the standard makes its default
COMPANIONS = {"1.2.840.10008.1.2.4.51": "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57": "1.2.840.10008.1.2.4.70"}

Contexts = dict[str, set[str]]  # SOP class UID -> transfer syntax UIDs


def contexts_for(sop_class_uid: str, transfer_syntaxes: set[str]) -> Contexts:
    """The presentation contexts to propose for instances of one SOP class that may go out in
    `transfer_syntaxes`: those, their companions and the two uncompressed syntaxes."""
    uids = set(UNCOMPRESSED) | set(transfer_syntaxes)
    uids |= {COMPANIONS[u] for u in transfer_syntaxes if u in COMPANIONS}
    return {sop_class_uid: uids}


def merge(*wanted: Contexts) -> Contexts:
    merged: Contexts = {}
    for contexts in wanted:
        for sop, uids in contexts.items():
            merged.setdefault(sop, set()).update(uids)
    return merged


def count(wanted: Contexts) -> int:
    return sum(len(uids) for uids in wanted.values())


class Association:
    """One association to a destination, re-negotiated when new presentation contexts are needed."""

    def __init__(self, destination: Destination, calling_ae_title: str, bucket: TokenBucket | None = None) -> None:
        self.destination = destination
        self.calling_ae_title = calling_ae_title
        self.bucket = bucket  # the destination's bandwidth cap, shared with its other associations
        self._assoc = None
        self._parking = ExitStack()  # the reactor of the association in force, parked
        self._proposed: set[tuple[str, str]] = set()
        self.last_used = time.monotonic()
        self.slot = None  # the cluster's association slot it holds while it exists (router.queue.Slot)

    def _give_slot(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.give()

    @property
    def is_open(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    def covers(self, wanted: Contexts, calling_ae_title: str | None = None) -> bool:
        return (self.is_open and calling_ae_title in (None, self.calling_ae_title)
                and {(s, t) for s, uids in wanted.items() for t in uids} <= self._proposed)

    def open(self, wanted: Contexts, calling_ae_title: str | None = None) -> str | None:
        """Make sure the association is open, as `calling_ae_title` (default: as it was made),
        and proposed `wanted`; returns an error or None."""
        if self.covers(wanted, calling_ae_title):
            return None
        self.release()
        if calling_ae_title is not None:
            self.calling_ae_title = calling_ae_title
        dest = self.destination
        # Verification too: a destination that refuses every storage context still associates, and
        # says which SOP classes it refuses instead of aborting
        contexts = [context(VERIFICATION, [IMPLICIT_LE])]
        for sop, uids in wanted.items():
            for ts in sorted(uids, key=lambda u: (u in UNCOMPRESSED, u)):
                contexts.append(context(sop, [ts]))
        peer = Peer(dest.host, dest.port, dest.ae_title, dest.tls, dest.max_pdu)
        try:
            assoc = associate(peer, self.calling_ae_title, contexts, dest.timeouts)
        except NotAssociated as exc:
            return str(exc)
        if self.bucket is not None and dest.max_mbps > 0:
            throttle_sends(assoc, self.bucket.take, CHUNK)
        self._assoc = assoc
        # pynetdicom's reactor serves nothing an outbound storage association needs (each C-STORE
        # takes its own response): parked from now until the association ends, each C-STORE
        # goes out at once instead of waiting for the reactor's next pass
        self._parking.enter_context(reactor_parked(assoc))
        self._proposed = {(s, t) for s, uids in wanted.items() for t in uids}
        self.last_used = time.monotonic()
        return None

    def accepts(self, sop_class_uid: str, transfer_syntax_uid: str) -> bool:
        """Whether the destination accepted a presentation context for this pair."""
        return self.is_open and any(
            cx.abstract_syntax == sop_class_uid and cx.transfer_syntax[0] == transfer_syntax_uid
            for cx in self._assoc.accepted_contexts
        )

    def store(self, path) -> Dataset:  # noqa: ANN001
        """Send one file with C-STORE; returns the response's status data set (empty when no
        response came: DIMSE timeout or association aborted). Raises on a local failure."""
        status = self._assoc.send_c_store(path)
        self.last_used = time.monotonic()
        return status

    def release(self) -> None:
        if self._assoc is not None:
            self._parking.close()  # the reactor runs again: it takes part in the release
            release(self._assoc)
            self._assoc = None
            self._proposed = set()

    def abort(self) -> None:
        if self._assoc is not None:
            self._parking.close()  # and then ends with the association
            self._assoc.abort()
            self._assoc = None
            self._proposed = set()

    def discard(self) -> None:
        """Release the association and the cluster slot it holds: the pool no longer keeps it."""
        try:
            self.release()
        finally:
            self._give_slot()


class AssociationPool:
    """A destination's associations, at most `ceiling` of them open at once.

    `acquire` hands out an idle open association, one that already covers the contexts asked for
    if there is one, else a new (closed) one while under the ceiling, else waits for one to come
    back; the caller then calls `open` and, when done, `give_back`.
    """

    def __init__(self, destination: Callable[[], Destination], calling_ae_title: str, ceiling: int,
                 idle_release_s: float = 5.0, slots: Callable[[int], object | None] | None = None,
                 slot_wait_s: float = 0.25) -> None:
        """`slots(ceiling)`: with several nodes, takes one of the destination's association slots
        across the cluster (None when all are taken); every association the pool keeps holds one."""
        self._slots = slots
        self.slot_wait_s = slot_wait_s
        self._destination = destination
        self.calling_ae_title = calling_ae_title
        self.ceiling = ceiling
        self.idle_release_s = idle_release_s
        self._idle: list[Association] = []
        self._busy = 0
        self._cond = threading.Condition()
        # max_mbps: one bucket for all the destination's associations
        self.bucket = TokenBucket(0.0)  # its rate: the rule file in force at each acquire

    def acquire(self, wanted: Contexts, calling_ae_title: str | None = None,
                timeout: float | None = None) -> Association | None:
        """An association to open for `wanted` (the caller calls `open`), preferably one made as
        `calling_ae_title` (default: the router's); None on timeout."""
        destination = self._destination()
        calling = calling_ae_title or destination.calling_ae_title or self.calling_ae_title
        self.bucket.set_rate(bytes_per_second(destination.max_mbps))  # the rule file in force
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                closed = [a for a in self._idle if not a.is_open]  # the peer may have closed one
                if closed:
                    self._idle = [a for a in self._idle if a.is_open]
                    for association in closed:
                        association.discard()
                # one made as the same calling AE title first; another caller's is re-made as this one
                candidates = [a for a in self._idle if a.calling_ae_title == calling] or self._idle
                if candidates:
                    chosen = next((a for a in candidates if a.covers(wanted, calling)), candidates[0])
                    self._idle.remove(chosen)
                    self._busy += 1
                    return chosen
                wait = None
                if self._busy + len(self._idle) < self.ceiling:
                    slot = self._slots(self.ceiling) if self._slots is not None else None
                    if self._slots is None or slot is not None:
                        self._busy += 1
                        association = Association(destination, calling, self.bucket)
                        association.slot = slot
                        return association
                    wait = self.slot_wait_s  # every slot of the cluster is taken: look again soon
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                if wait is not None:
                    remaining = wait if remaining is None else min(wait, remaining)
                self._cond.wait(remaining)

    def give_back(self, association: Association) -> None:
        with self._cond:
            self._busy -= 1
            if association.is_open:
                self._idle.insert(0, association)  # the most recently used first
            else:
                association.discard()
            self._cond.notify()

    def release_idle(self, now: float | None = None) -> None:
        """Release the associations idle for longer than `idle_release_s`."""
        now = time.monotonic() if now is None else now
        with self._cond:
            stale = [a for a in self._idle if now - a.last_used > self.idle_release_s]
            self._idle = [a for a in self._idle if a not in stale]
        for association in stale:
            association.discard()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
        for association in idle:
            association.discard()
