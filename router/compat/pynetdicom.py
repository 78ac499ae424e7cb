"""Workarounds of pynetdicom 3.0 behaviour (see the package docstring)."""

from __future__ import annotations

import errno
import os
import select
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, _config, evt, transport
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
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


def park_reactor(assoc: Association, timeout: float = 0.05) -> None:
    """Make sure pynetdicom's reactor thread is parked before a C-STORE is sent.

    `Association.send_c_store` pauses the association's reactor by clearing a checkpoint and
    waiting for a flag, but the flag can be left over from the reactor's previous pass: the
    reactor then takes the C-STORE response off the queue as an "unexpected" message and the
    sender waits for the DIMSE timeout (pynetdicom issues #435 and #850). The reactor raises the
    flag right before it waits at the checkpoint; seeing the flag down and then up again after
    the checkpoint was cleared proves it is waiting with the checkpoint closed.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    seen_running = False
    while time.monotonic() < deadline:
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


# -- reactors that wake for their work --------------------------------------------------------------
class _Wakeup:
    """What one reactor thread waits on instead of sleeping: set by the queues that bring it work
    (an eventfd, so that a DUL thread waits on it and on its socket at once)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poller = select.poll()  # used by its reactor thread alone
        self.poller.register(self.fd, select.POLLIN)
        self.socket_fd = -1  # the DUL's socket, once it has one

    def watch(self, fd: int) -> None:
        """Also end the wait when `fd` (the DUL's socket) has data."""
        if fd != self.socket_fd:
            if self.socket_fd >= 0:
                try:
                    self.poller.unregister(self.socket_fd)
                except (KeyError, OSError, ValueError):
                    pass
            if fd >= 0:
                self.poller.register(fd, select.POLLIN)
            self.socket_fd = fd

    def set(self) -> None:
        if self.fd >= 0:
            try:
                os.eventfd_write(self.fd, 1)
            except OSError:
                pass

    def clear(self) -> None:
        if self.fd >= 0:
            try:
                os.eventfd_read(self.fd)
            except OSError:
                pass  # nothing was written since the last clear

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _waking(q: Any, wakeup: _Wakeup) -> None:
    """Make each `put` on `q` also wake `wakeup`'s reactor (an instance attribute: a put in
    progress on the class's method completes into the same queue)."""
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wakeup.set()

    q.put = put_and_wake


_wakeups: weakref.WeakKeyDictionary[threading.Thread, _Wakeup] = weakref.WeakKeyDictionary()
_wakeups_lock = threading.Lock()


def _wakeup_of(thread: threading.Thread) -> _Wakeup | None:
    """The wakeup of a DUL or association reactor thread, made at its first sleep."""
    wakeup = _wakeups.get(thread)
    if wakeup is not None:
        return wakeup
    with _wakeups_lock:
        wakeup = _wakeups.get(thread)
        if wakeup is None:
            try:
                if isinstance(thread, DULServiceProvider):
                    queues = [thread.to_provider_queue]
                else:
                    queues = [thread.dimse.msg_queue, thread.dul.to_user_queue]
            except AttributeError:
                return None
            wakeup = _Wakeup()
            for q in queues:
                _waking(q, wakeup)
            weakref.finalize(thread, wakeup.close)
            _wakeups[thread] = wakeup
    return wakeup


class ReactorTime:
    """Stands in for the `time` module inside `pynetdicom.dul` and `pynetdicom.association`.

    Each association has two reactor threads, and both poll: the DUL sleeps 1 ms whenever a pass
    found nothing to do, the association reactor 1 ms before every pass. A message therefore
    waits up to a millisecond at each of them, on its way in and on its way out: on one
    association, where the modality waits for each response, a large share of every exchange.
    Here a reactor thread's sleep ends as soon as work arrives: a primitive to send or, for the
    DUL, data on its socket; a received message or the peer's PDU for the association reactor.
    It never lasts longer than asked. Any other thread sleeps as before.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        # poll() counts whole milliseconds: a shorter sleep is left as it is
        if seconds < 0.001 or not isinstance(thread, (DULServiceProvider, Association)):
            self._real.sleep(seconds)
            return
        wakeup = _wakeup_of(thread)
        if wakeup is None or wakeup.fd < 0:
            self._real.sleep(seconds)
            return
        if isinstance(thread, DULServiceProvider):
            try:
                fd = thread.socket.socket.fileno() if thread.socket and thread.socket.socket else -1
            except (AttributeError, OSError, ValueError):
                fd = -1
            wakeup.watch(fd)
        if any(fd == wakeup.fd for fd, _ in wakeup.poller.poll(seconds * 1000)):
            wakeup.clear()


def wake_reactors() -> None:
    """Let pynetdicom's reactor threads wake for their work instead of polling (`ReactorTime`).
    Process-wide by nature: call it once, from each process's entry point."""
    for module in (dul_module, association_module):
        if not isinstance(module.time, ReactorTime):
            module.time = ReactorTime(module.time)  # type: ignore[assignment]


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


def accept_unknown_storage_classes(enabled: bool) -> None:
    """Accept, as an SCP, every private or unknown abstract syntax as part of the storage service
    (pynetdicom 2.0's `_config.UNRESTRICTED_STORAGE_SERVICE`, module-level, hence process-wide:
    call it from the receiving process's entry point). Known non-storage services (C-FIND,
    C-MOVE, N-ACTION...) are still negotiated against the supported contexts only."""
    _config.UNRESTRICTED_STORAGE_SERVICE = enabled


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
