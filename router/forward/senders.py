"""Which sender reaches a destination: the one place that knows the protocols (DIMSE C-STORE,
DICOMweb STOW-RS). A destination protocol is one more module and one more line here."""

from __future__ import annotations

from collections.abc import Callable

from router.config import Destination
from router.forward.association import AssociationPool
from router.forward.dimse import DimseSender
from router.forward.sender import Sender
from router.forward.stow import StowSender
from router.queue import ClusterQueue

SHARED_IDLE_RELEASE_S = 1.0  # with several nodes: an idle association's slot is another node's after this


def sender_for(name: str, destination: Callable[[], Destination], queue: ClusterQueue,
               calling_ae_title: str) -> Sender:
    """The sender of destination `name`; `destination()` is its rule file in force."""
    try:
        in_force = destination()
    except LookupError:  # its rule file went meanwhile: the forwarder stops at once
        in_force = None
    if in_force is not None and in_force.protocol == "dicomweb":
        return StowSender(name, destination)
    ceiling = in_force.max_associations if in_force is not None else 1
    # with several nodes, max_associations holds for the cluster: each association takes a slot
    # and an idle association gives its slot back sooner, so that another node with work does
    # not wait for it
    slots = (lambda n: queue.take_slot(name, n)) if queue.shared else None
    pool = AssociationPool(destination, calling_ae_title, ceiling, slots=slots,
                           idle_release_s=SHARED_IDLE_RELEASE_S if queue.shared else 5.0)
    return DimseSender(name, destination, pool)
