"""Workarounds of pynetdicom 3.0 behaviour (see the package docstring)."""

from __future__ import annotations

import errno
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, _config, evt, transport
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer


def stream_datasets_to_files(directory: Path) -> None:
    """Have pynetdicom write each received C-STORE data set to a file in `directory`.

    pynetdicom streams a received data set to disk only when the module-level
    `_config.STORE_RECV_CHUNKED_DATASET` is set (pynetdicom PR #526, from issue #517), and then
    writes it with `NamedTemporaryFile()` in Python's default temporary directory: there is no
    option for the directory. Pointing `tempfile.tempdir` at the spool's `incoming/` makes
    accepting an instance a rename on one filesystem. Process-wide by nature: call it once, from
    the process entry point, never from a library object.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(directory)


def send_datasets_from_files() -> None:
    """Send C-STORE data sets straight from their files (`_config.STORE_SEND_CHUNKED_DATASET`,
    pynetdicom PR #520): a large instance is never held whole in memory."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Let `server.shutdown()` (and `AE.shutdown()`) work for a server made by `AE.make_server`.

    `AE.start_server()` takes no `server_class`, so a server with our own socket options
    (SO_REUSEPORT) must come from `make_server()`, which does not record it in `AE._servers`;
    `ThreadedAssociationServer.shutdown()` then fails removing itself from that list.
    """
    ae._servers.append(server)


def park_reactor(assoc: Association, timeout: float = 0.5) -> None:
    """Make sure pynetdicom's reactor thread is parked before a C-STORE is sent.

    `Association.send_c_store` pauses the association's reactor by clearing a checkpoint and
    waiting for a flag, but the flag can be left over from the reactor's previous pass: the
    reactor then takes the C-STORE response off the queue as an "unexpected" message and the
    sender waits for the DIMSE timeout (pynetdicom issues #435 and #850). The reactor raises the
    flag right before it waits at the checkpoint; seeing the flag down and then up again after
    the checkpoint was cleared proves it is waiting with the checkpoint closed. That takes one
    pass of the reactor, about a millisecond, unless the machine is so loaded that the thread is
    not scheduled: `timeout` is generous, so that the proof is not given up on (and the race
    run) exactly when the machine is busiest; a reactor that has ended is not waited for.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    seen_running = False
    while time.monotonic() < deadline and assoc.is_alive():
        if not assoc._is_paused:
            seen_running = True
        elif seen_running:
            return
        time.sleep(0.0001)


class _HeldCheckpoint:
    """Stands in for an association's reactor checkpoint while `reactor_parked` holds it: the
    `clear()` and `set()` of each `send_c_store` leave the reactor where it is, parked on the
    real checkpoint, which `wait()` passes to."""

    def __init__(self, checkpoint: threading.Event) -> None:
        self._checkpoint = checkpoint

    def clear(self) -> None:
        pass

    def set(self) -> None:
        pass

    def is_set(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> bool:
        return self._checkpoint.wait(timeout)


@contextmanager
def reactor_parked(assoc: Association) -> Iterator[None]:
    """Keep the association's reactor parked for a series of C-STOREs.

    `send_c_store` pauses the reactor and lets it go again around every message; the reactor
    sleeps 1 ms per pass, so each C-STORE first waits for it to come round (about half a
    millisecond, polling every 0.1 ms), and `park_reactor` once more for the flag to prove it.
    Parked once here, the reactor stays parked until the block ends: each C-STORE in it sees
    the reactor paused at once. Nothing else on an outbound storage association needs the
    reactor (the responses are taken by `send_c_store` itself); messages the peer sends
    meanwhile wait in the DIMSE queue and are served when the block ends.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if not isinstance(checkpoint, threading.Event) or not hasattr(assoc, "_is_paused"):
        yield
        return
    park_reactor(assoc)
    assoc._reactor_checkpoint = _HeldCheckpoint(checkpoint)
    try:
        yield
    finally:
        assoc._reactor_checkpoint = checkpoint
        checkpoint.set()


# -- select() and file descriptors above 1023 ---------------------------------------------------------
class PollingSelect:
    """Stands in for the `select` module inside `pynetdicom.transport`: `select()` done with `poll()`."""

    error = OSError

    @staticmethod
    def select(rlist: list, wlist: list, xlist: list, timeout: float | None = None) -> tuple[list, list, list]:
        poller = select.poll()
        wanted: dict[int, tuple[Any, int]] = {}
        for objects, flag in ((rlist, select.POLLIN), (wlist, select.POLLOUT)):
            for obj in objects:
                fd = obj if isinstance(obj, int) else obj.fileno()
                if fd < 0:
                    raise ValueError("file descriptor cannot be a negative integer")
                wanted[fd] = (obj, wanted.get(fd, (obj, 0))[1] | flag)
        for fd, (_, flags) in wanted.items():
            poller.register(fd, flags)
        readable, writable = [], []
        for fd, events in poller.poll(None if timeout is None else timeout * 1000):
            if events & select.POLLNVAL:
                raise OSError(errno.EBADF, "file descriptor is not open")
            obj, flags = wanted[fd]
            if flags & select.POLLIN and events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                readable.append(obj)
            if flags & select.POLLOUT and events & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                writable.append(obj)
        return readable, writable, []


def use_poll() -> None:
    """Make pynetdicom's sockets work whatever their file descriptor number.

    `AssociationSocket.ready` asks `select.select()` whether data waits, and `select()` cannot
    take a descriptor above 1023: in a process with that many files and sockets open, every
    association (inbound and outbound) fails as if the peer had gone. pynetdicom has no option
    for another mechanism; this points the `select` it uses at a `poll()` equivalent.
    Process-wide by nature: call it once, from each process's entry point.
    """
    transport.select = PollingSelect  # type: ignore[assignment]


# -- rejecting from EVT_REQUESTED -------------------------------------------------------------------
def reject_association(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    """Answer an A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ from an `EVT_REQUESTED` handler.

    pynetdicom lets an `EVT_REQUESTED` handler reject with `assoc.acse.send_reject()` (issue
    #408), but as soon as the handler returns it closes the connection
    (`server.shutdown_request`) without waiting for its DUL thread to send the A-ASSOCIATE-RJ:
    the peer sees the connection closed, never the rejection and its reason. Waiting here for
    the DUL to finish, as pynetdicom's own rejections do (`ACSE._negotiate_as_acceptor`), lets
    it go out.
    """
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."  # every composite storage SOP class of the standard is under it


def accept_unknown_storage_classes(enabled: bool) -> None:
    """Accept, as an SCP, a private SOP class, or a storage class of the standard newer than
    pynetdicom, as part of the storage service (pynetdicom 2.0's
    `_config.UNRESTRICTED_STORAGE_SERVICE`, module-level, hence process-wide: call it from the
    receiving process's entry point), with the transfer syntaxes the AE supports for storage.

    pynetdicom's own unrestricted negotiation (`presentation.negotiate_unrestricted`) takes any
    abstract syntax whose keyword its `sop_class` module lacks for storage, Modality Worklist
    FIND among them (pydicom names it differently), and accepts it with whatever transfer syntax
    is proposed first, one the router cannot read included. `_negotiate_storage_like` replaces
    it: the storage-like contexts are negotiated as if supported with the AE's storage transfer
    syntaxes, everything else against the supported contexts only."""
    from pynetdicom import acse

    _config.UNRESTRICTED_STORAGE_SERVICE = enabled
    acse.negotiate_unrestricted = _negotiate_storage_like  # type: ignore[assignment]


def is_storage_like(uid: str) -> bool:
    """A private abstract syntax, or one under the standard's storage root (known or newer)."""
    return not uid.startswith("1.2.840.10008.") or uid.startswith(STORAGE_ROOT)


def _negotiate_storage_like(rq_contexts: list, ac_contexts: list, roles: dict | None = None) -> tuple:
    from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

    supported = {cx.abstract_syntax for cx in ac_contexts}
    storage_syntaxes = next((list(cx.transfer_syntax) for cx in ac_contexts
                             if str(cx.abstract_syntax).startswith(STORAGE_ROOT)), [])
    extra = []
    for abstract in {str(cx.abstract_syntax) for cx in rq_contexts}:
        if abstract not in supported and is_storage_like(abstract):
            context = PresentationContext()
            context.abstract_syntax = abstract
            context.transfer_syntax = storage_syntaxes
            extra.append(context)
    return negotiate_as_acceptor(rq_contexts, list(ac_contexts) + extra, roles)


def throttle_sends(assoc: Association, take: Callable[[int], object], chunk: int) -> None:
    """Pass every byte this association sends through `take` (a bandwidth cap), `chunk` bytes at
    a time, so that one large PDU is paced too.

    pynetdicom has no send hook that can delay: its DUL writes each encoded PDU with
    `AssociationSocket.send` (dul.py, `_send`), which loops on `socket.send` and then triggers
    `EVT_DATA_SENT`. This replaces that method on the association's socket object with the same
    loop, paced. tests/forward/test_throttle.py fails if the DUL stops sending through it.
    """
    sock = assoc.dul.socket
    if sock is None:
        return

    def send(bytestream: bytes) -> None:
        raw = cast(socket.socket, sock.socket)
        try:
            view = memoryview(bytestream)
            for start in range(0, len(view), chunk):
                piece = view[start:start + chunk]
                take(len(piece))
                sent = 0
                while sent < len(piece):
                    sent += raw.send(piece[sent:])
            evt.trigger(assoc, evt.EVT_DATA_SENT, {"data": bytestream})
        except Exception:  # noqa: BLE001 - as upstream: Evt17, transport connection closed
            sock.event_queue.put("Evt17")

    sock.send = send
