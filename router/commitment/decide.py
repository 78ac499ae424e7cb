"""What is committed: per instance of a storage commitment request, committed, failed (with its
Failure Reason) or still pending, by `[commitment] mode`.

    delivered  every destination the rules send it to answered C-STORE success (the history
               says so); an instance no rule sends anywhere once it is durable
    relay      as delivered, and then each of those destinations that has a storage commitment
               SCP (`[destination] commitment`) committed it when asked (`commitment.relay`);
               its Failure Reason is carried over
    spooled    durable in the router (its jobs or its history exist)

A dead letter fails with 0x0110 (processing failure), an instance the router never received
with 0x0112 (no such object instance), one received as another SOP class with 0x0119, every
instance of a reused Transaction UID with 0x0131. Past `[commitment] timeout_s`, what is still
pending fails with 0x0110.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from router.commitment.messages import (
    CLASS_INSTANCE_CONFLICT, DUPLICATE_TRANSACTION_UID, NO_SUCH_OBJECT_INSTANCE, PROCESSING_FAILURE, Answer,
    Reference,
)
from router.config import DestinationRules
from router.queue import CommitmentQueue, StoredCommitment


def relaying(destinations: Iterable[DestinationRules]) -> frozenset[str]:
    """The destinations `relay` asks: those with a storage commitment SCP."""
    return frozenset(d.name for d in destinations if d.destination.commitment_scp is not None)


def decide(queue: CommitmentQueue, mode: str, request: StoredCommitment, now: float,
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


def due(queue: CommitmentQueue, mode: str, request: StoredCommitment, now: float,
         relay_to: Collection[str] = frozenset()) -> Answer | None:
    """The answer to report now, or None while instances are pending within the deadline."""
    answer = decide(queue, mode, request, now, relay_to)
    return None if answer.pending else answer
