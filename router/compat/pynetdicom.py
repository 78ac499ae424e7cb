"""Workarounds of pynetdicom 3.0 behaviour (see the package docstring)."""

from __future__ import annotations

import errno
import functools
import importlib
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from pydicom.uid import UID
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
    deadline = time.monotonic() + timeout
    if isinstance(checkpoint, _WakingCheckpoint):  # `quiet_reactors`: the reactor says when it waits there
        generation = checkpoint.close()
        while checkpoint.parked != generation and time.monotonic() < deadline and assoc.is_alive():
            time.sleep(0.00005)
        return
    checkpoint.clear()
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


# -- checking each UID once -----------------------------------------------------------------------------
UID_CHECKS_KEPT = 4096  # distinct UIDs whose check is remembered (SOP classes and syntaxes recur)
_MODULES_WITH_SET_UID = ("ae", "dimse_primitives", "pdu_items", "pdu_primitives", "presentation")


def check_uids_once() -> None:
    """Remember pynetdicom's verdict on each UID value (`utils.set_uid`) instead of checking it
    again every time it is seen.

    `set_uid` builds a pydicom `UID` (a regex), runs pynetdicom's own validator (another) and
    `is_valid` (a third) for every UID of every PDU item and primitive, about 15 µs each: an
    A-ASSOCIATE-RQ from a caller that proposes every storage SOP class in three syntaxes
    carries some 500 UIDs, each checked twice (decoded, then put in the primitive), ~8 ms of
    CPU per association, paid per image by a modality that associates for each. The verdict on
    a value never changes: the same value gets the same (immutable) UID back; a value it
    refuses is refused as before, every time. Process-wide by nature: call it once, from each
    process's entry point.
    """
    from pynetdicom import utils

    check = getattr(utils.set_uid, "_router_checks_once", None) or utils.set_uid

    @functools.lru_cache(maxsize=UID_CHECKS_KEPT)
    def remembered(value: str | bytes, name: str, allow_empty: bool, allow_none: bool, validate: bool) -> Any:  # noqa: ANN401
        return check(value, name, allow_empty, allow_none, validate)

    def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,  # noqa: ANN401
                validate: bool = True) -> Any:  # noqa: ANN401
        if type(value) in (str, bytes, UID):  # hashable and immutable; UID("x") and "x" are one key
            return remembered(value, name, allow_empty, allow_none, validate)
        return check(value, name, allow_empty, allow_none, validate)

    set_uid._router_checks_once = check  # type: ignore[attr-defined]
    for name in ("utils", *_MODULES_WITH_SET_UID):
        module = importlib.import_module(f"pynetdicom.{name}")
        if getattr(module, "set_uid", None) is not None:
            module.set_uid = set_uid  # type: ignore[attr-defined]


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


# -- N-EVENT-REPORTs served in their own thread ---------------------------------------------------------
_serving_report = threading.local()


class _PauseFlag:
    """`Association._is_paused`, kept to what the association's own threads say.

    pynetdicom serves a received N-EVENT-REPORT request in a thread of its own (dimse.py:
    "handled immediately ... would block the DUL otherwise"), and that thread runs
    `_serve_request`, which raises `_is_paused` around the handler and lowers it afterwards, as
    if it were the reactor. If the reactor is meanwhile parked at its closed checkpoint (a
    `send_*()` or `release()` waiting for it, or one about to), the lowered flag says it is
    running: the next `release()` or `send_*()` waits for ever for a flag nobody raises again
    (`release()` has no timeout; pynetdicom issue #820, still so in 3.0). The report thread's
    writes are left out: the reactor, free to run, parks itself for any `send_*()` the handler
    makes, as for any other caller."""

    def __get__(self, obj: Any, owner: type | None = None) -> Any:  # noqa: ANN401
        if obj is None:
            return self
        return obj.__dict__.get("_router_is_paused", False)

    def __set__(self, obj: Any, value: bool) -> None:  # noqa: ANN401
        if getattr(_serving_report, "assoc", None) is obj:
            return
        obj.__dict__["_router_is_paused"] = value


def keep_pause_flag_to_the_reactor() -> None:
    """Install `_PauseFlag` (pynetdicom's N-EVENT-REPORT thread). Process-wide by nature."""
    serve = Association._serve_request
    if getattr(serve, "_router_report_aware", False):
        return

    def serve_request(self, msg: Any, context_id: int) -> None:  # noqa: ANN001, ANN401
        if threading.current_thread() is self:
            serve(self, msg, context_id)
            return
        _serving_report.assoc = self  # the N-EVENT-REPORT thread
        try:
            serve(self, msg, context_id)
        finally:
            _serving_report.assoc = None

    serve_request._router_report_aware = True  # type: ignore[attr-defined]
    Association._serve_request = serve_request  # type: ignore[method-assign]
    Association._is_paused = _PauseFlag()  # type: ignore[assignment]


# -- reactors that wait for work instead of waking every millisecond ----------------------------------
WAKE_AFTER_PDUS = 8  # a waiting reactor is woken once this many PDUs are queued (or a message ends)
IDLE_WAIT_S = 0.02  # the longest a reactor waits with nothing to do (timers are checked this often)


class _ReactorTime:
    """Stands in for the `time` module inside `pynetdicom.dul` (`module="dul"`) or
    `pynetdicom.association` (`module="association"`).

    Both reactor loops sleep 1 ms whenever a pass found nothing to do, so every open association
    costs two threads waking a thousand times a second: about 5% of a core for each end of an
    idle association, and the same between the PDUs of a busy one. Here a reactor thread's
    `sleep(0.001)` in its own loop waits for its work instead, up to IDLE_WAIT_S: the DUL thread
    for its socket to be readable, a primitive or an event to be queued (`_wake_dul`), the
    association thread for its DUL to have handled an event (a DIMSE message, a release or an
    abort request), its stop flag, or its checkpoint to be closed by a `send_*()`/`release()`.

    Nothing of pynetdicom's pause handshake (`_reactor_checkpoint`, `_is_paused`) is touched:
    a waiting association thread is woken by the checkpoint's `clear()` and then takes the same
    steps as upstream's, raising `_is_paused` only on its way to the closed checkpoint. Any other
    thread, and any other sleep, sleeps as before.
    """

    def __init__(self, module: str) -> None:
        self.module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == 0.001:
            thread = threading.current_thread()
            if self.module == "dul":
                wake_fd = getattr(thread, "_router_wake_fd", None)
                if wake_fd is not None:
                    _wait_dul(thread, wake_fd)
                    return
            else:
                wake = getattr(thread, "_router_wake", None)
                if wake is not None and getattr(thread, "_router_waiting", False):
                    if wake.wait(IDLE_WAIT_S):
                        wake.clear()  # whoever set it changed the state first: this pass sees it
                    return
        time.sleep(seconds)


def _wait_dul(dul: Any, wake_fd: int) -> None:  # noqa: ANN401 - a pynetdicom DULServiceProvider
    # raised before the queues are looked at: a PDU queued after the look finds it raised and
    # wakes the poll; one queued before it is seen by the look (`send_pdu_waking`)
    dul._router_waiting = True
    try:
        if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
            return
        _poll_dul(dul, wake_fd)
    finally:
        dul._router_waiting = False


def _poll_dul(dul: Any, wake_fd: int) -> None:  # noqa: ANN401
    assoc_socket = getattr(dul, "socket", None)
    if getattr(assoc_socket, "buffered", 0):
        return  # bytes already read from the socket (a socket that reads ahead)
    sock = getattr(assoc_socket, "socket", None)
    poller = select.poll()
    poller.register(wake_fd, select.POLLIN)
    if sock is not None:
        try:
            if getattr(sock, "pending", None) is not None and sock.pending():
                return  # TLS: data already decrypted, the socket itself may stay quiet
            fd = sock.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd >= 0:
            poller.register(fd, select.POLLIN | select.POLLPRI)
    poller.poll(IDLE_WAIT_S * 1000)
    try:
        os.eventfd_read(wake_fd)
    except BlockingIOError:
        pass


def _ends_message(primitive: Any) -> bool:  # noqa: ANN401
    """Whether a primitive handed to the DUL is anything but a P-DATA that only carries
    fragments before a message's last (PS3.8 E.2: bit 1 of the control header)."""
    values = getattr(primitive, "presentation_data_value_list", None)
    if not values:
        return True
    return any(not data or data[0] & 0x02 for _, data in values)


def _wake_dul(dul: Any) -> None:  # noqa: ANN401
    fd = getattr(dul, "_router_wake_fd", None)
    if fd is not None:
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            pass


def _wake_association(assoc: Any) -> None:  # noqa: ANN401
    wake = getattr(assoc, "_router_wake", None)
    if wake is not None:
        wake.set()


class _WakingFlag:
    """A reactor's stop flag (`DULServiceProvider._kill_thread`, `Association._kill`) that
    wakes the waiting reactor when it is raised, from whichever thread raises it."""

    def __init__(self, name: str, wake: Callable[[Any], None]) -> None:
        self.name, self.wake = name, wake

    def __get__(self, obj: Any, owner: type | None = None) -> Any:  # noqa: ANN401
        if obj is None:
            return self
        return obj.__dict__.get(self.name, False)

    def __set__(self, obj: Any, value: bool) -> None:  # noqa: ANN401
        obj.__dict__[self.name] = value
        if value:
            self.wake(obj)


class _WakingCheckpoint(threading.Event):
    """An association's reactor checkpoint whose `clear()` (the first step of every pause:
    `send_*()`, `release()`, `park_reactor`) wakes the waiting reactor, so that it comes round
    to the checkpoint at once rather than at the end of its wait; and which tells `park_reactor`
    when the reactor has come to wait at it after a given `close()` (`parked`)."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._router_wake = wake
        self.generation = self.parked = 0
        self.set()

    def close(self) -> int:
        """Clear, and return the generation a reactor waiting from now on records."""
        self.generation += 1  # before the flag goes down: a reactor that sees it down records this one
        super().clear()
        self._router_wake.set()
        return self.generation

    def clear(self) -> None:
        self.close()

    def wait(self, timeout: float | None = None) -> bool:
        if not self.is_set():
            self.parked = self.generation  # only a set() lets it pass from here
        return super().wait(timeout)


def quiet_reactors() -> None:
    """Make pynetdicom's reactors wait for work (`_ReactorTime`). Process-wide by nature: call
    it once, from each process's entry point, before any association is made."""
    from pynetdicom import association, dul, fsm

    keep_pause_flag_to_the_reactor()  # a reactor woken at once reaches its checkpoint before the report thread is done
    if isinstance(dul.time, _ReactorTime):
        return
    dul.time = _ReactorTime("dul")  # type: ignore[assignment]
    association.time = _ReactorTime("association")  # type: ignore[assignment]
    provider = dul.DULServiceProvider
    run_dul, send_pdu = provider.run_reactor, provider.send_pdu

    def run_reactor_waiting(self) -> None:  # noqa: ANN001
        self._router_wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            run_dul(self)
        finally:
            fd, self._router_wake_fd = self._router_wake_fd, None
            os.close(fd)

    def send_pdu_waking(self, primitive: Any) -> None:  # noqa: ANN001, ANN401
        send_pdu(self, primitive)
        # only a reactor that waits needs the wake, and only once there is a message's end or
        # a burst to send: a data set's PDUs go out WAKE_AFTER_PDUS at a time rather than each
        # waking the reactor (and handing it the GIL) on its own
        if getattr(self, "_router_waiting", True) and (
                _ends_message(primitive) or self.to_provider_queue.qsize() >= WAKE_AFTER_PDUS):
            _wake_dul(self)

    provider.run_reactor = run_reactor_waiting  # type: ignore[method-assign]
    provider.send_pdu = send_pdu_waking  # type: ignore[method-assign]
    provider._kill_thread = _WakingFlag("_router_kill_thread", _wake_dul)  # type: ignore[assignment]

    init_association, run_association = association.Association.__init__, association.Association._run_reactor

    def init_waking(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN001, ANN401
        self._router_wake = threading.Event()
        init_association(self, *args, **kwargs)
        self._reactor_checkpoint = _WakingCheckpoint(self._router_wake)

    def association_waiting(self) -> None:  # noqa: ANN001
        self._router_waiting = True  # only the reactor loop itself waits (not a handler, not kill())
        try:
            run_association(self)
        finally:
            self._router_waiting = False

    association.Association.__init__ = init_waking  # type: ignore[method-assign]
    association.Association._run_reactor = association_waiting  # type: ignore[method-assign]
    association.Association._kill = _WakingFlag("_router_kill", _wake_association)  # type: ignore[assignment]
    close = transport.AssociationSocket.close

    def close_waking(self) -> None:  # noqa: ANN001
        close(self)  # Evt17 for the DUL, from whichever thread closes it
        assoc = getattr(self, "_assoc", None) or getattr(self, "assoc", None)
        if assoc is not None:
            _wake_dul(assoc.dul)

    transport.AssociationSocket.close = close_waking  # type: ignore[method-assign]
    do_action = fsm.StateMachine.do_action

    def do_action_waking(self, event: str) -> None:  # noqa: ANN001
        do_action(self, event)
        _wake_association(self.dul.assoc)

    fsm.StateMachine.do_action = do_action_waking  # type: ignore[method-assign]
