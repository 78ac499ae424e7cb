"""The receiving listener: pynetdicom 3.0's `ThreadedAssociationServer` made to bound what a
caller may make it wait for (see the package docstring). pynetdicom has no such limits: each
accepted connection is read on one thread with no deadline on the association request nor on a
PDU, and any PDU size announced is read whole. tests/compat/test_compat_pynetdicom.py fails when
upstream changes what this relies on.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from router.compat.pynetdicom import PollingSelect

# -- a listener that bounds what a caller may make it wait for ----------------------------------------
PDU_MARGIN = 1024  # bytes a PDU may exceed the advertised maximum by (peers that miscount a header)
REQUEST_PDU_BOUND = 1024 * 1024  # an A-ASSOCIATE-RQ with 128 contexts and user identity is far smaller
_P_DATA_TF, _A_ASSOCIATE_RQ = 0x04, 0x01


def _abort_pdu(reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = 0x02, reason  # service provider
    return pdu.encode()


_ABORT_UNEXPECTED_PDU = _abort_pdu(0x02)
_ABORT_INVALID_PARAMETER = _abort_pdu(0x06)


class Cut(str, Enum):
    """Why the listener closed a connection (`Hooks.closed`)."""

    REQUEST_TIMEOUT = "request_timeout"  # no complete A-ASSOCIATE-RQ within request_timeout
    PDU_TIMEOUT = "pdu_timeout"  # a PDU's last byte came more than pdu_timeout after its first
    PDU_TOO_LARGE = "pdu_too_large"  # a PDU header declared more than max_pdu (+ PDU_MARGIN)
    NOT_A_REQUEST = "not_a_request"  # the first PDU was not an A-ASSOCIATE-RQ
    TLS_TIMEOUT = "tls_timeout"  # no TLS handshake within tls_handshake_timeout
    TLS_FAILED = "tls_failed"  # the TLS handshake failed (no or a wrong certificate, not TLS)
    CROWDED = "crowded"  # more than `pending` connections were still on their way to an association
    MESSAGE_TOO_LARGE = "message_too_large"  # more than HELD_BOUND of one message to be held in memory


@dataclass(frozen=True)
class Limits:
    """What a caller may make one receiving process wait for."""

    request_timeout: float  # from TCP accept to a complete A-ASSOCIATE-RQ
    pdu_timeout: float  # from a PDU's first byte to its last (and to send one)
    max_pdu: int  # the largest P-DATA-TF PDU we advertise; 0: no bound on any PDU
    tls_handshake_timeout: float
    pending: int  # connections without an A-ASSOCIATE-RQ yet, at most; beyond, the oldest is closed

    def pdu_bound(self, pdu_type: int) -> int | None:
        """The largest length a PDU of `pdu_type` may declare, or None for no bound."""
        if not self.max_pdu:
            return None
        largest = self.max_pdu if pdu_type == _P_DATA_TF else max(self.max_pdu, REQUEST_PDU_BOUND)
        return largest + PDU_MARGIN


@dataclass(frozen=True)
class Hooks:
    """What the listener asks of its owner."""

    # a connection the listener closed: why, a sentence for the log, the peer's address
    closed: Callable[[Cut, str, str], None]
    # while a C-STORE data set arrives (at its start, then every RECEIVING_CHECK bytes): a status
    # to refuse it at once, or None to go on (association, Affected SOP Instance UID, bytes so far)
    receiving: Callable[[Association, str, int], int | None]
    # a C-STORE-RQ whose data set pynetdicom cannot write to a file: the status to answer
    unwritable: Callable[[Association, Exception], int]


class _Connection:
    """One accepted TCP connection, from accept to close."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.accepted = time.monotonic()
        self.request = b""  # the A-ASSOCIATE-RQ PDU, once read
        self.cut: tuple[Cut, str] | None = None
        self._lock = threading.Lock()

    def wrap_tls(self, context: ssl.SSLContext) -> ssl.SSLSocket:
        """Wrap the socket for a server-side TLS handshake (not done yet)."""
        with self._lock:  # never a moment when `close_for` would find a detached socket
            self.sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            return self.sock

    def close_for(self, cut: Cut, detail: str, abort: bytes = b"") -> None:
        """Close the connection and remember why (the first reason given is kept).

        `abort`: an A-ABORT PDU to send first; only from the thread that reads the connection.
        """
        with self._lock:
            if self.cut is None:
                self.cut = (cut, detail)
            sock = self.sock
        if abort:
            try:
                sock.settimeout(1.0)
                sock.sendall(abort)
            except OSError:
                pass
        try:
            # the base class's shutdown also for a TLS socket: SSLSocket.shutdown() drops its
            # SSL object, which another thread may be using
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytearray:
    """Up to `size` bytes, fewer when the peer closes; TimeoutError at `deadline`."""
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(min(size - len(data), 65536))
        if not chunk:
            break
        data += chunk
    return data


READ_AHEAD = 256 * 1024  # bytes asked of the socket at once: a data set's PDUs arrive several per read


class _GuardedSocket(AssociationSocket):
    """An association's socket that bounds each PDU's size and the time it takes to arrive,
    and that first hands over the A-ASSOCIATE-RQ the listener already read.

    It reads ahead (READ_AHEAD bytes at a time, into `_buffer` from `_pos` on): pynetdicom asks
    for a PDU's 6-byte header, then its body, two system calls per PDU otherwise, and
    `_DataSetGuard.read_pdu` takes whole P-DATA-TF PDUs from what is already here."""

    def __init__(self, assoc: Association, connection: _Connection, limits: Limits) -> None:
        super().__init__(assoc, client_socket=connection.sock)
        self._connection = connection
        self._limits = limits
        self._buffer = bytearray(connection.request)
        self._pos = 0  # where the bytes not handed over yet start in `_buffer`
        self._left = 0  # bytes of the current PDU's body still to come
        self._deadline = 0.0

    @property
    def buffered(self) -> int:
        """Bytes read from the socket and not handed over yet (`_poll_dul` does not wait then)."""
        return len(self._buffer) - self._pos

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            return False
        if self._pos < len(self._buffer):
            return True
        if isinstance(self.socket, ssl.SSLSocket) and self.socket.pending():
            return True
        try:
            return bool(PollingSelect.select([self.socket], [], [], 0)[0])
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed, as upstream does
            return False

    def _fill(self, size: int, deadline: float) -> bool:
        """Read until `size` bytes are buffered; False when the peer closed first, TimeoutError
        at `deadline`."""
        buffer = self._buffer
        if self._pos:
            del buffer[:self._pos]
            self._pos = 0
        sock = cast(socket.socket, self.socket)
        while len(buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(max(size - len(buffer), READ_AHEAD))
            if not chunk:
                return False
            buffer += chunk
        return True

    def _take(self, size: int) -> bytearray:
        """Up to `size` buffered bytes, handed over."""
        data = self._buffer[self._pos:self._pos + size]
        self._pos += len(data)
        return data

    def _timed_out(self) -> None:
        self._connection.close_for(Cut.PDU_TIMEOUT, f"a PDU took more than {self._limits.pdu_timeout:g}s")

    def _too_large(self, pdu_type: int, length: int) -> bool:
        """Whether a PDU header declares more than the bound of its type (the connection is then closed)."""
        bound = self._limits.pdu_bound(pdu_type)
        if bound is None or length <= bound:
            return False
        self._connection.close_for(
            Cut.PDU_TOO_LARGE, f"PDU of type 0x{pdu_type:02X} declares {length} bytes, more than {bound}",
            abort=_ABORT_INVALID_PARAMETER)
        return True

    def recv(self, nr_bytes: int) -> bytearray:
        header = self._left == 0  # pynetdicom reads a PDU as its 6-byte header, then its body
        if header:
            self._deadline = time.monotonic() + self._limits.pdu_timeout
        if len(self._buffer) - self._pos < nr_bytes:
            try:
                self._fill(nr_bytes, self._deadline)
            except TimeoutError:
                self._timed_out()
                return bytearray()  # short: pynetdicom treats the connection as closed
        data = self._take(nr_bytes)
        if not header:
            self._left -= len(data)
        elif len(data) == 6:
            pdu_type, length = struct.unpack(">BxL", data)
            if self._too_large(pdu_type, length):
                return bytearray()
            self._left = length
        return data

    def next_data_pdu(self, wait: bool) -> int | None:
        """The length of the P-DATA-TF PDU that comes next once it is all buffered (reading it
        within `pdu_timeout` when `wait`), its body then at `_buffer[_pos + 6:]`; None when what
        comes next is anything else, is not all here (not `wait`), or ends the connection:
        `recv` then reads it as pynetdicom does."""
        if self._left:  # in the middle of a PDU pynetdicom is reading
            return None
        available = len(self._buffer) - self._pos
        deadline = time.monotonic() + self._limits.pdu_timeout
        try:
            if available < 6 and not (wait and self._fill(6, deadline)):
                return None
            pdu_type, length = struct.unpack_from(">BxL", self._buffer, self._pos)
            bound = self._limits.pdu_bound(pdu_type)
            if pdu_type != _P_DATA_TF or (bound is not None and length > bound):
                return None  # `recv` closes the connection for a PDU too large
            if len(self._buffer) - self._pos < 6 + length and not (wait and self._fill(6 + length, deadline)):
                return None
        except TimeoutError:
            self._timed_out()
            return None
        return length

    def send(self, bytestream: bytes) -> None:
        if self.socket is not None:
            self.socket.settimeout(self._limits.pdu_timeout)  # recv() leaves its own timeouts behind
        super().send(bytestream)


RECEIVING_CHECK = 1024 * 1024  # bytes of a data set received between two `Hooks.receiving` checks
HELD_BOUND = 4 * 1024 * 1024  # bytes of one DIMSE message held in memory (any but a data set written to a file)


class _DataSetGuard:
    """Watches the C-STORE data sets one association writes to files.

    pynetdicom writes each to a `NamedTemporaryFile(delete=False)` (`STORE_RECV_CHUNKED_DATASET`)
    and removes it only after the C-STORE handler ran: an association that ends mid-transfer
    leaves its file behind. A C-STORE-RQ whose Affected SOP Instance UID is missing or empty
    makes writing the file's meta information raise in the DUL thread, which aborts the
    association and leaves the file; so does a write that fails (a full disk). Once a data
    set has started there is no way to stop receiving it. And every other message (a command
    set, any data set but a C-STORE's) is held in memory whatever its size. This guard sits
    between the DUL and `DIMSEServiceProvider.receive_primitive`: it notes the file of each data
    set, asks `Hooks.receiving` as the data arrive, turns a data set that cannot (or must not)
    be written into a skipped one answered with a failure status, the association going on, and
    aborts the association when a message held in memory passes HELD_BOUND.
    """

    def __init__(self, assoc: Association, connection: _Connection, hooks: Hooks, sock: _GuardedSocket) -> None:
        self.assoc = assoc
        self.dimse = assoc.dimse
        self.connection = connection
        self.hooks = hooks
        self.socket = sock
        self._held = 0  # bytes of the current message held in memory
        self._receive = assoc.dimse.receive_primitive
        assoc.dimse.receive_primitive = self.receive_primitive  # type: ignore[method-assign]
        dul = assoc.dul
        self._read_upstream = dul._read_pdu_data
        # pynetdicom tells nothing of a P-DATA-TF received but to handlers bound to it (its
        # own standard one logs nothing for it): with none, data set PDUs may take the short way
        pdu_handlers = {handler for handler, _ in assoc.get_handlers(evt.EVT_PDU_RECV)}
        if not assoc.get_handlers(evt.EVT_DATA_RECV) and pdu_handlers <= {standard_pdu_recv_handler}:
            dul._read_pdu_data = self.read_pdu  # type: ignore[method-assign]
        self._files: list[tuple[Any, tuple[int, int]]] = []  # (open file, (device, inode))
        self._message: Any = None
        self._received = 0
        self._next_check = 0
        self._skipping: tuple[int, Dataset, int] | None = None  # (context ID, command set, status)

    def receive_primitive(self, primitive: P_DATA) -> None:
        pdvs = primitive.presentation_data_value_list
        if self._skipping is not None:
            self._skip(pdvs)
            return
        try:
            self._receive(primitive)
        except Exception as exc:  # noqa: BLE001 - whatever writing the data set raised
            message = self.dimse.message
            accepted = {cx.context_id for cx in self.assoc.accepted_contexts}
            if not isinstance(message, C_STORE_RQ) or message.context_id not in accepted:
                raise  # not a data set being written: the DUL aborts the association, as upstream
            self._abandon(message, self.hooks.unwritable(self.assoc, exc), _data_after_command(pdvs))
            return
        message = self.dimse.message
        if message is None:
            self._held = 0  # complete: handed to the service that answers it
            return
        if not isinstance(message, C_STORE_RQ) or message._data_set_file is None:
            self._held += sum(len(data) - 1 for _, data in pdvs)
            if self._held > HELD_BOUND:
                self.connection.close_for(Cut.MESSAGE_TOO_LARGE,
                                          f"a DIMSE message of more than {HELD_BOUND} bytes to hold in memory",
                                          abort=_ABORT_INVALID_PARAMETER)
            return
        self._held = 0
        if message is not self._message:
            self._start(message)
        self._count(message, sum(len(data) - 1 for _, data in pdvs if not data[0] & 1))

    def _count(self, message: Any, size: int) -> None:
        """`size` more bytes of `message`'s data set written: ask `Hooks.receiving` when due."""
        self._received += size
        if self._received >= self._next_check:
            self._next_check = self._received + RECEIVING_CHECK
            uid = str(message.command_set.get("AffectedSOPInstanceUID", "") or "")
            status = self.hooks.receiving(self.assoc, uid, self._received)
            if status is not None:
                self._abandon(message, status, [])

    def read_pdu(self) -> None:
        """The DUL's `_read_pdu_data`: the P-DATA-TF PDUs in the middle of a data set being
        written to its file (every fragment a data set one, none its last) have their fragments
        written straight to the file, as many as are already read, with no PDU object, state
        machine event or P-DATA primitive for each; anything else is read by pynetdicom.

        pynetdicom's own path for such a PDU (DT-2 in Sta6) does nothing but write those
        fragments, in order, to the same file."""
        dul = self.assoc.dul
        message = self.dimse.message
        if (message is None or message is not self._message or self._skipping is not None
                or message._data_set_file is None or dul.state_machine.current_state != "Sta6"
                or not dul.event_queue.empty() or not dul._recv_pdu.empty()):
            self._read_upstream()
            return
        sock, fragments, size = self.socket, [], 0
        while size < READ_AHEAD and (length := sock.next_data_pdu(wait=not fragments)) is not None:
            middle = _middle_fragments(sock._buffer, sock._pos + 6, sock._pos + 6 + length)
            if middle is None:
                break
            fragments += middle
            size += length
            sock._pos += 6 + length
        if not fragments:
            self._read_upstream()
            return
        try:
            message._data_set_file.file.write(b"".join(fragments))
        except Exception as exc:  # noqa: BLE001 - whatever writing the data set raised (a full disk)
            self._abandon(message, self.hooks.unwritable(self.assoc, exc), [])
            return
        self._count(message, sum(len(fragment) for fragment in fragments))

    def _start(self, message: Any) -> None:
        self._files = [(f, ids) for f, ids in self._files if not f.closed]
        file = message._data_set_file
        stat = os.fstat(file.fileno())
        self._files.append((file, (stat.st_dev, stat.st_ino)))
        self._message, self._received, self._next_check = message, 0, 0

    def _abandon(self, message: Any, status: int, pdvs: list[tuple[int, bytes]]) -> None:
        """Stop writing `message`'s data set: remove its file, skip the rest, answer `status`."""
        file = message._data_set_file
        if file is not None:
            file.close()
            _unlink(file.name)
        self.dimse.message = None
        self._message = None
        self._skipping = (message.context_id, message.command_set, status)
        self._skip(pdvs)

    def _skip(self, pdvs: list[tuple[int, bytes]]) -> None:
        if not any(not data[0] & 1 and data[0] & 2 for _, data in pdvs):
            return  # the data set's last fragment is still to come
        context_id, command_set, status = cast(tuple[int, Dataset, int], self._skipping)
        self._skipping = None
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = command_set.get("MessageID", 0)
        rsp.AffectedSOPClassUID = command_set.get("AffectedSOPClassUID") or None
        rsp.AffectedSOPInstanceUID = command_set.get("AffectedSOPInstanceUID") or None
        rsp.Status = status
        self.dimse.send_msg(rsp, context_id)

    def remove_partial_files(self) -> None:
        """Once the association has ended: remove the files of data sets that never reached the
        C-STORE handler (a file the handler kept was renamed away, and is left alone)."""
        for file, ids in self._files:
            if file.closed:
                continue
            file.close()
            try:
                stat = os.stat(file.name)
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) == ids:
                _unlink(file.name)
        self._files = []


def _middle_fragments(buffer: bytearray, start: int, end: int) -> list[bytearray] | None:
    """The data set fragments of the P-DATA-TF body `buffer[start:end]` when each of its
    presentation data values is a data set fragment other than the last, else None."""
    if start >= end:
        return None
    fragments = []
    while start < end:
        if end - start < 6:
            return None
        (length,) = struct.unpack_from(">L", buffer, start)
        if length < 2 or start + 4 + length > end or buffer[start + 5] & 3:
            return None  # malformed (pynetdicom refuses it), a command fragment, or a last one
        fragments.append(buffer[start + 6:start + 4 + length])
        start += 4 + length
    return fragments


def _data_after_command(pdvs: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The data set fragments of a P-DATA that follow its last command fragment."""
    last_command = max((i for i, (_, data) in enumerate(pdvs) if data[0] & 1), default=-1)
    return pdvs[last_command + 1:]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _SupportedContexts(list):
    """The contexts a server supports, copied for each association it accepts.

    pynetdicom gives each association `deepcopy(server.contexts)`; for every storage SOP class
    in every transfer syntax (171 contexts, 7,695 transfer syntax UIDs) that takes ~50 ms of CPU
    per association, a cost a modality that opens an association per image pays per image.
    The copy here is what the association may change (each context and its list of syntaxes);
    the UIDs, immutable strings, are shared."""

    def __deepcopy__(self, memo: dict) -> list[PresentationContext]:
        copies = []
        for cx in self:
            copy = PresentationContext.__new__(PresentationContext)
            copy.__dict__.update(cx.__dict__)
            copy._transfer_syntax = list(cx._transfer_syntax)
            copies.append(copy)
        return copies


class _GuardedRequestHandler(RequestHandler):
    """Serves one connection whose A-ASSOCIATE-RQ the listener has read: the association runs
    on pynetdicom's threads, this one waits for its end and removes its partial files."""

    server: GuardedAssociationServer

    def setup(self) -> None:
        self.connection = cast(_Connection, self.request)
        self.request = self.connection.sock

    def handle(self) -> None:
        assoc = self._create_association()
        # pynetdicom wraps the socket in an AssociationSocket of its own, which queued the
        # "transport connection open" event: ours replaces it and queues its own
        assoc.dul.event_queue.get_nowait()
        assoc.dul.socket = None
        sock = _GuardedSocket(assoc, self.connection, self.server.limits)
        assoc.set_socket(sock)
        guard = _DataSetGuard(assoc, self.connection, self.server.hooks, sock)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        if assoc.dul.is_alive():
            assoc.dul.join(timeout=5)
        guard.remove_partial_files()


class GuardedAssociationServer(ThreadedAssociationServer):
    """A `ThreadedAssociationServer` that a slow, silent or oversized caller cannot stall.

    What upstream lacks (pynetdicom 3.0): the TLS handshake runs in the accept loop, on a
    blocking socket (`AssociationServer.get_request`), so one silent connection stops every
    other; each accepted connection becomes an association thread counted against
    `maximum_associations` before it has sent anything; the DUL reads a PDU with blocking
    `recv()` calls and no deadline (issue #272), whatever length its header declares.

    Here each connection gets a thread of its own that does the TLS handshake
    (`tls_handshake_timeout`) and reads the A-ASSOCIATE-RQ (`request_timeout`, bounded in
    size) before any association exists, so a connection still on its way counts against
    `Limits.pending` only, never against the associations; of those, the one waiting longest
    is closed when there are too many. The association then runs as upstream, on a socket
    that bounds each PDU (`pdu_timeout`, `max_pdu`), with a data set guard (`_DataSetGuard`,
    made for data sets streamed to files: `stream_datasets_to_files`). Every connection closed
    by these limits is reported to `Hooks.closed`.
    """

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list | None = None,
        *,
        limits: Limits,
        hooks: Hooks,
    ) -> None:
        self.limits = limits
        self.hooks = hooks
        self._pending: dict[_Connection, None] = {}
        self._pending_lock = threading.Lock()
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=_GuardedRequestHandler)
        self.contexts = _SupportedContexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, Any]:
        return cast(socket.socket, self.socket).accept()  # the TLS handshake is the connection thread's

    def process_request(self, request: Any, client_address: Any) -> None:
        connection = _Connection(request, client_address[0])
        with self._pending_lock:
            self._pending[connection] = None
            while len(self._pending) > self.limits.pending:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                oldest.close_for(Cut.CROWDED, f"more than {self.limits.pending} connections without an association "
                                              "request; closed the one waiting longest")
        threading.Thread(target=self._serve, args=(connection, client_address), name="dicom-connection",
                         daemon=True).start()

    def _serve(self, connection: _Connection, client_address: Any) -> None:
        try:
            if self._read_request(connection):
                with self._pending_lock:
                    # once out of `_pending`, nothing but the association closes it
                    still_pending = self._pending.pop(connection, False) is None
                if still_pending and connection.cut is None:
                    connection.sock.settimeout(None)
                    self.RequestHandlerClass(connection, client_address, self)
        except Exception:  # noqa: BLE001 - one connection's failure is not the listener's
            self.handle_error(connection.sock, client_address)
        finally:
            with self._pending_lock:
                self._pending.pop(connection, None)
            connection.sock.close()  # the same socket object as the association's: closing twice is harmless
            if connection.cut is not None:
                self.hooks.closed(*connection.cut, connection.address)

    def _read_request(self, connection: _Connection) -> bool:
        """TLS handshake, then the A-ASSOCIATE-RQ into `connection.request`; False if the
        connection was closed instead."""
        limits = self.limits
        if self.ssl_context is not None:
            tls = connection.wrap_tls(self.ssl_context)
            try:
                tls.settimeout(limits.tls_handshake_timeout)
                tls.do_handshake()
            except TimeoutError:
                connection.close_for(Cut.TLS_TIMEOUT, f"no TLS handshake within {limits.tls_handshake_timeout:g}s")
                return False
            except OSError as exc:  # ssl.SSLError included
                connection.close_for(Cut.TLS_FAILED, f"TLS handshake failed: {exc}")
                return False
        deadline = connection.accepted + limits.request_timeout
        try:
            header = _recv_exactly(connection.sock, 6, deadline)
            if len(header) < 6:
                return False  # the caller went away
            pdu_type, length = struct.unpack(">BxL", header)
            if pdu_type != _A_ASSOCIATE_RQ:
                connection.close_for(Cut.NOT_A_REQUEST, f"first PDU of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                                     abort=_ABORT_UNEXPECTED_PDU)
                return False
            bound = limits.pdu_bound(pdu_type)
            if bound is not None and length > bound:
                connection.close_for(Cut.PDU_TOO_LARGE, f"A-ASSOCIATE-RQ declares {length} bytes, more than {bound}",
                                     abort=_ABORT_INVALID_PARAMETER)
                return False
            body = _recv_exactly(connection.sock, length, deadline)
        except TimeoutError:
            connection.close_for(Cut.REQUEST_TIMEOUT,
                                 f"no complete A-ASSOCIATE-RQ within {limits.request_timeout:g}s of connecting")
            return False
        except OSError:
            return False  # reset by the caller, or closed as crowded
        if len(body) < length:
            return False
        connection.request = bytes(header + body)
        return True


