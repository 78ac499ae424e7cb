"""Every association the router opens: to a destination (C-STORE, `forward.association`), to a
modality (its storage commitment report, `commitment.reporter`) and to a destination's storage
commitment SCP (`commitment.relay`). One place sets the calling AE title, the timeouts, DICOM
TLS and TCP_NODELAY, and says why an association was not made; one backoff paces the retries
of all three.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from router.config import Timeouts, Tls
from router.tls import client_context

VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class Peer:
    """Where an association goes: the peer's address, its AE title, and how to reach it."""

    host: str
    port: int
    ae_title: str
    tls: Tls | None = None
    max_pdu: int = 0  # the largest PDU the router takes from the peer; 0: no bound

    @property
    def where(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class NotAssociated(ConnectionError):
    """The association was not made; the message says why (for the log and the job's last error)."""


def context(abstract_syntax: str, transfer_syntaxes: Sequence[str]) -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = list(transfer_syntaxes)
    return cx


def associate(peer: Peer, calling_ae_title: str, contexts: Iterable[PresentationContext], timeouts: Timeouts,
              ext_neg: list | None = None, evt_handlers: list | None = None) -> Association:
    """An established association to `peer` as `calling_ae_title`, proposing `contexts`; raises
    NotAssociated saying why not (no connection, rejected and by whom, aborted, no answer)."""
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    ae.requested_contexts = list(contexts)
    connected = threading.Event()
    handlers = [(evt.EVT_CONN_OPEN, lambda event: connected.set()), *(evt_handlers or [])]
    tls_args = (client_context(peer.tls), peer.host) if peer.tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, max_pdu=peer.max_pdu, ext_neg=ext_neg,
                         tls_args=tls_args, evt_handlers=handlers)
    if not assoc.is_established:
        if not connected.is_set():
            raise NotAssociated(f"cannot connect to {peer.host}:{peer.port}")
        if assoc.is_rejected:
            result = assoc.acceptor.primitive
            detail = f" (result {result.result}, source {result.result_source}, reason {result.diagnostic})" \
                if result is not None else ""
            raise NotAssociated(f"association rejected by {peer.where}{detail}")
        if assoc.is_aborted:
            raise NotAssociated(f"association aborted by {peer.where}")
        raise NotAssociated(f"association with {peer.where} not established (ACSE timeout)")
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def release(assoc: Association | None) -> None:
    """Release `assoc` if it is still established; abort it when the release fails."""
    if assoc is None:
        return
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # noqa: BLE001 - the peer may already be gone
        assoc.abort()


def backoff_delay(attempts: int, backoff_s: float, max_backoff_s: float, jitter: bool = True) -> float:
    """The wait before the next try after `attempts` failed ones: about backoff_s * 2**(attempts-1),
    capped at max_backoff_s; with `jitter`, between half of that and all of it, so that peers
    failing together do not retry together."""
    base = min(max_backoff_s, backoff_s * (2 ** max(0, attempts - 1)))
    return base / 2 + random.uniform(0, base / 2) if jitter else base
