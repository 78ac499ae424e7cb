"""Each pynetdicom workaround in router.compat.pynetdicom: a test that fails the day pynetdicom
changes what it relies on or fixes what it works around (then adapt or remove it), and a test
that it works."""

from __future__ import annotations

import copy
import errno
import inspect
import io
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt, fsm
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler, ThreadedAssociationServer

from router.compat import listener
from router.compat import pynetdicom as compat
from tests.support.peers import REPO, data, free_port
from tests.receive.test_network_limits import closed_by_peer, store_request


@pytest.fixture
def restore_pynetdicom_config():
    saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET, tempfile.tempdir)
    yield
    _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET, tempfile.tempdir = saved


def test_upstream_receive_streaming_has_no_directory_option():
    """stream_datasets_to_files points tempfile at the spool because pynetdicom offers no
    directory for STORE_RECV_CHUNKED_DATASET; when it grows one, use it instead."""
    assert hasattr(_config, "STORE_RECV_CHUNKED_DATASET")
    assert not [name for name in dir(_config) if name.startswith("STORE_RECV_CHUNKED") and "DIR" in name.upper()]


def test_received_data_sets_are_streamed_into_the_given_directory(tmp_path, restore_pynetdicom_config):
    compat.stream_datasets_to_files(tmp_path)
    assert _config.STORE_RECV_CHUNKED_DATASET is True
    assert tempfile.NamedTemporaryFile(delete=False).name.startswith(str(tmp_path))


def test_upstream_make_server_still_does_not_register_its_server():
    """register_server exists because AE.make_server() leaves AE._servers alone while
    ThreadedAssociationServer.shutdown() removes itself from it."""
    ae = AE()
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", free_port()))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    assert isinstance(ae._servers, list) and server not in ae._servers
    with pytest.raises(ValueError):
        server.shutdown()  # what the router's stop would meet without the workaround


def test_a_registered_server_shuts_down_cleanly():
    class SharedPort(ThreadedAssociationServer):
        def server_bind(self) -> None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            super().server_bind()

    ae = AE()
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", free_port()), server_class=SharedPort)
    compat.register_server(ae, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.shutdown()
    assert ae._servers == []


def test_upstream_send_c_store_still_pauses_the_reactor_through_its_checkpoint_and_stays_correct_parked():
    """reactor_parked swaps Association._reactor_checkpoint for one whose clear()/set() do
    nothing: send_c_store must still only clear, wait for _is_paused and set it (pynetdicom's
    reactor loop sleeps 1 ms per pass). Inside the block C-STOREs succeed with the reactor
    parked throughout; after it the reactor runs again and serves the association (release)."""
    source = inspect.getsource(Association.send_c_store)
    assert "self._reactor_checkpoint.clear()" in source and "while not self._is_paused" in source
    ae = AE()
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(Verification)
    port = free_port()
    stored = []
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: stored.append(event.request) or 0x0000)])
    try:
        scu = AE()
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port)
        assert assoc.is_established
        checkpoint = assoc._reactor_checkpoint
        try:
            ds = dcmread(data("693_UNCR.dcm"))
            with compat.reactor_parked(assoc):
                for _ in range(3):
                    assert assoc.send_c_store(ds).Status == 0x0000
                    assert assoc._is_paused and not checkpoint.is_set()
            assert assoc._reactor_checkpoint is checkpoint and checkpoint.is_set()
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        assert assoc.is_released and len(stored) == 3
    finally:
        server.shutdown()


def test_upstream_reactor_state_park_reactor_relies_on_is_still_there():
    """park_reactor reads Association._reactor_checkpoint and _is_paused (pynetdicom #435,
    #850); if these are renamed it silently does nothing and the response race is back."""
    ae = AE()
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        scu = AE()
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port)
        assert assoc.is_established
        try:
            assert hasattr(assoc, "_reactor_checkpoint") and hasattr(assoc, "_is_paused")
            compat.park_reactor(assoc)
            assert assoc._is_paused and not assoc._reactor_checkpoint.is_set()
            assoc._reactor_checkpoint.set()  # as send_c_store does when it is done
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        server.shutdown()



# -- use_poll ---------------------------------------------------------------------------------------
HIGH_FDS = """
import os, resource, sys
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from router.compat import pynetdicom as compat
from tests.support.peers import data, free_port

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
dummies = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # new sockets get numbers above 1023
if sys.argv[1] == "poll":
    compat.use_poll()
fds = []

def on_store(event):
    fds.append(event.assoc.dul.socket.socket.fileno())
    return 0x0000

def storage_ae(title):
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax)
        ae.add_requested_context(cx.abstract_syntax) if len(ae.requested_contexts) < 127 else None
    ae.add_supported_context(Verification)
    return ae

ds = dcmread(data("693_UNCR.dcm"))
results = []
# each side stores to the other: both the accepting and the requesting sockets are above 1023
a, b = storage_ae("A"), storage_ae("B")
ports = [free_port(), free_port()]
servers = [x.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
           for x, port in ((a, ports[0]), (b, ports[1]))]
for scu, port in ((a, ports[1]), (b, ports[0])):
    scu.requested_contexts = []
    scu.add_requested_context(Verification)
    scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = scu.associate("127.0.0.1", port)
    if not assoc.is_established:
        results.append("no association")
        continue
    fds.append(assoc.dul.socket.socket.fileno())
    echo = assoc.send_c_echo()
    store = assoc.send_c_store(ds)
    results.append((echo.get("Status"), store.get("Status")))
    assoc.release()
for server in servers:
    server.shutdown()
print(results, min(fds or [0]))
"""


def _run_script(script: str, mode: str, timeout: float) -> str:
    """Run `script` in a process of its own (what it installs is process-wide): its last line."""
    result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=timeout,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def _associate_with_high_fds(mode: str) -> str:
    return _run_script(HIGH_FDS, mode, 120)


def test_upstream_association_socket_still_asks_select():
    """use_poll replaces the `select` module pynetdicom.transport uses; when AssociationSocket.ready
    stops calling select.select(), it can go."""
    assert "select.select(" in inspect.getsource(AssociationSocket.ready.fget)
    assert _associate_with_high_fds("select").startswith("['no association', 'no association']")


def test_associations_work_with_file_descriptors_above_1023():
    out = _associate_with_high_fds("poll")
    assert out.startswith("[(0, 0), (0, 0)]"), out
    assert int(out.split()[-1]) > 1023, out


# -- reject_association -------------------------------------------------------------------------------
def _rejections(on_requested) -> list:  # noqa: ANN001
    ae = AE()
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_REQUESTED, on_requested)])
    try:
        heard = []
        for _ in range(3):
            scu = AE(ae_title="NOBODY")
            scu.add_requested_context(Verification)
            scu.acse_timeout = 5
            assoc = scu.associate("127.0.0.1", port)
            rj = assoc.acceptor.primitive if assoc.is_rejected else None
            heard.append(None if rj is None else (rj.result, rj.result_source, rj.diagnostic))
        return heard
    finally:
        server.shutdown()


def test_upstream_still_closes_before_a_reject_from_evt_requested_goes_out():
    """reject_association waits for the A-ASSOCIATE-RJ to be sent; when send_reject() from an
    EVT_REQUESTED handler reaches the peer by itself, it can go."""
    assert None in _rejections(lambda event: event.assoc.acse.send_reject(0x01, 0x01, 0x03))


def test_a_rejection_from_evt_requested_reaches_the_peer():
    assert _rejections(lambda event: compat.reject_association(event.assoc, 0x01, 0x01, 0x03)) == [(1, 1, 3)] * 3


# -- check_uids_once -------------------------------------------------------------------------------------------
UID_CHECKS = """
import sys
from pydicom.uid import UID
from pynetdicom import AE, utils
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from router.compat import pynetdicom as compat
from tests.support.peers import free_port

if sys.argv[1] == "once":
    compat.check_uids_once()
    compat.check_uids_once()  # a second call adds no second layer
refused = 0
for _ in range(3):  # refused every time (longer than 64): never remembered as valid
    for bad in ("1" * 70, b"2" * 65):
        try:
            utils.set_uid(bad, "Abstract Syntax")
        except ValueError:
            refused += 1
good = utils.set_uid(b"1.2.840.10008.5.1.4.1.1.2", "Abstract Syntax")
again = utils.set_uid("1.2.840.10008.5.1.4.1.1.2", "Abstract Syntax")
assert isinstance(good, UID) and good == again == CTImageStorage
# associations proposing several contexts, one of them not supported: negotiated alike each time
ae = AE()
ae.add_supported_context(CTImageStorage)
ae.add_supported_context(Verification)
port = free_port()
server = ae.start_server(("127.0.0.1", port), block=False)
accepted = []
for _ in range(2):
    scu = AE()
    for sop in (CTImageStorage, MRImageStorage, Verification):
        scu.add_requested_context(sop)
    assoc = scu.associate("127.0.0.1", port)
    accepted.append(sorted(cx.abstract_syntax for cx in assoc.accepted_contexts))
    assert assoc.send_c_echo().Status == 0
    assoc.release()
server.shutdown()
print(refused, accepted[0] == accepted[1] == sorted([CTImageStorage, Verification]))
"""

REMEMBERED = """
import sys
from pynetdicom import pdu_items, utils
from router.compat import pynetdicom as compat
calls = []
real = utils.set_uid
def counting(*args, **kwargs):
    calls.append(args[0])
    return real(*args, **kwargs)
utils.set_uid = counting  # pynetdicom's check, counted
if sys.argv[1] == "once":
    compat.check_uids_once()
else:
    pdu_items.set_uid = counting
for _ in range(50):
    pdu_items.set_uid(b"1.2.840.10008.1.2.1", "Transfer Syntax Name")
print(len(calls))
"""


def test_upstream_modules_still_import_set_uid_by_name():
    """check_uids_once replaces `set_uid` in each module that imported it by name."""
    from pynetdicom import utils

    for name in compat._MODULES_WITH_SET_UID:
        module = __import__(f"pynetdicom.{name}", fromlist=["set_uid"])
        assert getattr(module, "set_uid", None) is utils.set_uid, name


@pytest.mark.parametrize("mode", ["upstream", "once"])
def test_uids_checked_once_are_refused_or_accepted_as_before(mode):
    """Invalid UIDs refused every time, valid ones the same UID, associations negotiated alike."""
    assert _run_script(UID_CHECKS, mode, 60) == "6 True"


@pytest.mark.parametrize("mode, checks", [("upstream", "50"), ("once", "1")])
def test_a_uid_seen_again_is_not_checked_again(mode, checks):
    assert _run_script(REMEMBERED, mode, 60) == checks


# -- GuardedAssociationServer ---------------------------------------------------------------------------------
def test_upstream_handshakes_tls_in_the_accept_loop():
    """GuardedAssociationServer moves the handshake to the connection's thread; when
    AssociationServer.get_request stops wrapping the socket itself, see whether it can go."""
    assert "wrap_socket" in inspect.getsource(AssociationServer.get_request)


def test_upstream_counts_connections_without_a_request_as_associations():
    ae = AE()
    ae.add_supported_context(Verification)
    ae.maximum_associations = 1
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        time.sleep(0.2)
        scu = AE()
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port)
        assert assoc.is_rejected  # the idle connection took the only slot
    finally:
        idle.close()
        server.shutdown()


def test_upstream_reads_a_pdu_without_deadline_or_bound():
    """A header declaring 512 MB, then silence: upstream waits for the body (ARTIM is not looked
    at while the DUL reads), whatever the ACSE timeout and the maximum PDU size."""
    ae = AE()
    ae.add_supported_context(Verification)
    ae.acse_timeout = 0.5
    ae.maximum_pdu_size = 16384
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(struct.pack(">BxL", 0x01, 512 * 1024 * 1024))
        assert not closed_by_peer(sock, 1.5)
    finally:
        sock.close()
        server.shutdown()


def test_upstream_request_handler_makes_its_own_association_socket():
    """The guarded handler replaces the AssociationSocket `_create_association` made and the
    "transport connection open" event it queued (Evt5); both must still be there."""
    ae = AE()
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", free_port()))
    a, b = socket.socketpair()
    try:
        handler = RequestHandler.__new__(RequestHandler)
        handler.request, handler.client_address, handler.server = a, ("127.0.0.1", 1), server
        assoc = handler._create_association()
        assert type(assoc.dul.socket) is AssociationSocket
        assert list(assoc.dul.event_queue.queue) == ["Evt5"]
    finally:
        a.close()
        b.close()
        server.server_close()


class _Recorded:
    def __init__(self) -> None:
        self.closed: list[listener.Cut] = []
        self.unwritable: list[Exception] = []

    def hooks(self, receiving_status: int | None = None) -> listener.Hooks:
        return listener.Hooks(
            closed=lambda cut, detail, address: self.closed.append(cut),
            receiving=lambda assoc, uid, received: receiving_status,
            unwritable=lambda assoc, exc: self.unwritable.append(exc) or 0xC000,
        )


def _guarded(recorded: _Recorded, **limits) -> tuple[AE, listener.GuardedAssociationServer, int]:  # noqa: ANN003
    ae = AE()
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    given = {"request_timeout": 1.0, "pdu_timeout": 1.0, "max_pdu": 16384, "tls_handshake_timeout": 1.0,
             "pending": 4, **limits}
    server = ae.make_server(("127.0.0.1", port), server_class=listener.GuardedAssociationServer,
                            limits=listener.Limits(**given), hooks=recorded.hooks())
    compat.register_server(ae, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return ae, server, port


def test_a_guarded_server_closes_slow_silent_and_oversized_callers_and_still_associates():
    recorded = _Recorded()
    _, server, port = _guarded(recorded, pending=2)
    oversized = socket.create_connection(("127.0.0.1", port), timeout=5)
    idle: list[socket.socket] = []
    try:
        oversized.sendall(struct.pack(">BxL", 0x01, 512 * 1024 * 1024))
        assert closed_by_peer(oversized, 3)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        scu = AE()
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port)  # closes the idle connection waiting longest
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert all(closed_by_peer(sock, 3) for sock in idle)
        deadline = time.monotonic() + 3
        while len(recorded.closed) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        oversized.close()
        for sock in idle:
            sock.close()
        server.shutdown()
    assert recorded.closed[0] == listener.Cut.PDU_TOO_LARGE
    assert sorted(recorded.closed[1:]) == [listener.Cut.CROWDED, listener.Cut.CROWDED, listener.Cut.REQUEST_TIMEOUT]


def test_upstream_gives_each_association_a_deep_copy_of_the_servers_contexts():
    """`_SupportedContexts.__deepcopy__` is the copy each accepted association gets only while
    upstream copies `server.contexts` with deepcopy; when it stops, see whether it can go."""
    assert "deepcopy(self.server.contexts)" in inspect.getsource(RequestHandler._create_association)


def _negotiated(contexts: list) -> list[tuple]:
    return [(c.abstract_syntax, list(c.transfer_syntax), c.context_id, c.result, c.scu_role, c.scp_role)
            for c in contexts]


def test_each_accepted_association_negotiates_on_its_own_copy_of_the_supported_contexts():
    """Associations one after the other, each proposing other syntaxes: each is answered from
    the server's table, and negotiating leaves that table as it was (a copy shared with an
    association would carry its context IDs and results into the next one)."""
    from router.config import Listen
    from router.receive.scp import listening_ae

    table = listening_ae(Listen(), "off").supported_contexts
    copied = copy.deepcopy(listener._SupportedContexts(table))
    assert _negotiated(copied) == _negotiated(table)
    assert all(a is not b and a.transfer_syntax is not b.transfer_syntax for a, b in zip(copied, table))

    _, server, port = _guarded(_Recorded())
    before = _negotiated(server.contexts)
    try:
        for offered in ([ExplicitVRLittleEndian], ["1.2.840.10008.1.2.4.80"], [ExplicitVRLittleEndian]):
            scu = AE()
            scu.add_requested_context(Verification)
            scu.add_requested_context(CTImageStorage, offered)
            assoc = scu.associate("127.0.0.1", port)
            assert assoc.is_established
            accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
            assert accepted == ([ExplicitVRLittleEndian] if offered == [ExplicitVRLittleEndian] else [])
            assoc.release()
    finally:
        server.shutdown()
    assert _negotiated(server.contexts) == before
    assert isinstance(server.contexts, listener._SupportedContexts)


def _upstream_storage_server(directory: Path) -> tuple[ThreadedAssociationServer, int]:
    """pynetdicom's own server, its received data sets streamed to files in `directory`."""
    compat.stream_datasets_to_files(directory)
    ae = AE()
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    return ae.start_server(("127.0.0.1", port), block=False), port


def _store_without_instance_uid(port: int) -> tuple[int | None, bool]:
    """C-STORE-RQ with no Affected SOP Instance UID: (status or None, association still up)."""
    ds = dcmread(data("693_UNCR.dcm"))
    scu = AE()
    scu.dimse_timeout = 3
    scu.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", port)
    assert assoc.is_established
    compat.park_reactor(assoc)
    context_id = assoc.accepted_contexts[0].context_id
    for p_data in store_request(ds, "").encode_msg(context_id, assoc.acceptor.maximum_length):
        assoc.dul.send_pdu(p_data)
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    time.sleep(0.2)
    up = assoc.is_established
    if up:
        assoc.release()
    else:
        assoc.abort()
    return (None if rsp is None else int(rsp.Status)), up


def test_upstream_dul_dies_on_a_c_store_without_affected_sop_instance_uid(tmp_path, restore_pynetdicom_config):
    """The data set guard answers such a request itself; when upstream answers it (or refuses
    it cleanly), see whether the guard can go."""
    server, port = _upstream_storage_server(tmp_path)
    try:
        assert _store_without_instance_uid(port)[0] is None
        assert list(tmp_path.iterdir()), "upstream no longer leaves the file behind"
    finally:
        server.shutdown()


def test_a_guarded_server_answers_a_c_store_without_affected_sop_instance_uid(tmp_path, restore_pynetdicom_config):
    compat.stream_datasets_to_files(tmp_path)
    recorded = _Recorded()
    _, server, port = _guarded(recorded)
    try:
        assert _store_without_instance_uid(port) == (0xC000, True)
    finally:
        server.shutdown()
    assert len(recorded.unwritable) == 1
    assert not list(tmp_path.iterdir())


def test_upstream_leaves_the_file_of_an_aborted_transfer(tmp_path, restore_pynetdicom_config):
    """The data set guard removes it when the association ends; when upstream does, it can go."""
    server, port = _upstream_storage_server(tmp_path)
    try:
        _abort_mid_transfer(port)
        time.sleep(1)
        assert list(tmp_path.iterdir())
    finally:
        server.shutdown()


def test_a_guarded_server_removes_the_file_of_an_aborted_transfer(tmp_path, restore_pynetdicom_config):
    compat.stream_datasets_to_files(tmp_path)
    _, server, port = _guarded(_Recorded())
    try:
        _abort_mid_transfer(port)
        deadline = time.monotonic() + 5
        while list(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not list(tmp_path.iterdir())
    finally:
        server.shutdown()


def _abort_mid_transfer(port: int) -> None:
    ds = dcmread(data("693_UNCR.dcm"))
    scu = AE()
    scu.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", port, max_pdu=16384)
    assert assoc.is_established
    for index, p_data in enumerate(store_request(ds).encode_msg(assoc.accepted_contexts[0].context_id, 16384)):
        if index == 8:
            break
        assoc.dul.send_pdu(p_data)
    time.sleep(0.3)
    assoc.abort()


def test_upstream_data_set_state_the_guard_reads_is_still_there():
    """The guard reads DIMSEServiceProvider.message, DIMSEMessage._data_set_file and its
    command_set / context_id, and replaces receive_primitive on the provider instance."""
    message = DIMSEMessage()
    assert hasattr(message, "_data_set_file") and hasattr(message, "command_set") and hasattr(message, "context_id")
    assert "dimse.receive_primitive(" in inspect.getsource(fsm.DT_2)
    assert "self.message" in inspect.getsource(DIMSEServiceProvider.receive_primitive)



# -- quiet_reactors -----------------------------------------------------------------------------------
QUIET = """
import json, sys, threading, time
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from router.compat import pynetdicom as compat
from tests.support.peers import data, free_port

COMMITMENT, COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1", "1.2.840.10008.1.20.1.1"
if sys.argv[1] == "quiet":
    compat.quiet_reactors()
compat.keep_pause_flag_to_the_reactor()  # in both: the reports below would otherwise run pynetdicom's own race
compat.use_poll()
ds = dcmread(data("693_UNCR.dcm"))
stored = []
scp = AE(ae_title="SCP")
scp.add_supported_context(Verification)
scp.add_supported_context(COMMITMENT)
scp.add_supported_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
port = free_port()
server = scp.start_server(("127.0.0.1", port), block=False,
                          evt_handlers=[(evt.EVT_C_STORE, lambda e: stored.append(1) or 0x0000)])
threads_before = threading.active_count()
scu = AE(ae_title="SCU")
scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 5
scu.add_requested_context(Verification)
scu.add_requested_context(COMMITMENT)
scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
out = {"statuses": [], "ends": [], "slow": 0, "releases": []}
begun = time.monotonic()
for n in range(60):
    assoc = scu.associate("127.0.0.1", port)
    if not assoc.is_established:
        out["statuses"].append("no association")
        continue
    if n % 10 == 0:
        time.sleep(0.15)  # both ends' reactors wait with nothing to do, then have to wake for the request
    started = time.monotonic()
    echo = assoc.send_c_echo()
    compat.park_reactor(assoc)
    store = assoc.send_c_store(ds)
    out["statuses"].append([echo.get("Status"), store.get("Status")])
    if n % 2:
        assoc.release()
    else:
        assoc.abort()
    out["slow"] += time.monotonic() - started > 4  # a lost wake-up waits for a timeout
    out["ends"].append(assoc.is_released or assoc.is_aborted)

# A report on the requestor's own association (storage commitment on the same association): the
# requestor's reactor runs the N-EVENT-REPORT handler, with pynetdicom's pause flag raised, and the
# requestor releases as soon as its answer is out (its reactor on its way back to waiting), or once
# its reactor waits again. (Releasing while the handler still runs is wrong upstream too: the answer
# would follow the A-RELEASE-RQ, an event pynetdicom's state machine refuses.)
def release_after_report(where):
    answered_out = threading.Event()

    def on_sent(event):
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            answered_out.set()

    assoc = scu.associate("127.0.0.1", port, evt_handlers=[
        (evt.EVT_N_EVENT_REPORT, lambda event: (0x0000, None)), (evt.EVT_DIMSE_SENT, on_sent)])
    assert assoc.is_established
    ours = assoc.dul.socket.socket.getsockname()[1]  # the acceptor's end of this very connection
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        fresh = [a for a in server.active_associations if a.is_established and a.requestor.port == ours]
        if fresh:
            break
        time.sleep(0.001)
    [acceptor] = fresh
    info = Dataset()
    info.TransactionUID = "2.25.1"
    answered = []

    def report():
        compat.park_reactor(acceptor)
        status, _ = acceptor.send_n_event_report(info, 1, COMMITMENT, COMMITMENT_INSTANCE)
        answered.append(status.get("Status"))

    reporter = threading.Thread(target=report)
    reporter.start()
    answered_out.wait(5)
    if where == "idle":
        time.sleep(0.1)  # its reactor is back waiting for work
    started = time.monotonic()
    assoc.release()
    reporter.join(10)
    return {"where": where, "released": assoc.is_released, "answered": answered,
            "seconds": round(time.monotonic() - started, 2)}

out["first_part_s"] = round(time.monotonic() - begun, 1)
for n in range(30):
    out["releases"].append(release_after_report("idle" if n % 5 == 0 else "just after its answer"))

# the server goes away under an idle association: the requestor notices
assoc = scu.associate("127.0.0.1", port)
server.shutdown()
deadline = time.monotonic() + 10
while assoc.is_established and time.monotonic() < deadline:
    time.sleep(0.01)
out["noticed_shutdown"] = not assoc.is_established
deadline = time.monotonic() + 10
while threading.active_count() > threads_before - 1 and time.monotonic() < deadline:  # the server's thread has gone too
    time.sleep(0.01)
out["threads_left"] = threading.active_count() - (threads_before - 1)
out["stored"] = len(stored)
print(json.dumps(out))
"""


def _quiet_run(mode: str) -> dict:
    import json

    return json.loads(_run_script(QUIET, mode, 240))


def test_upstream_reactors_still_sleep_a_millisecond_through_their_module_time():
    """quiet_reactors replaces the `time` the two reactor loops sleep through and wakes the
    association's reactor from its checkpoint's clear(); the day they stop calling
    time.sleep(0.001), or pause another way, it must be adapted or can go."""
    from pynetdicom import association, dul

    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(dul.DULServiceProvider.run_reactor)
    assert "self._run_loop_delay = 0.001" in inspect.getsource(dul.DULServiceProvider.__init__)
    loop = inspect.getsource(association.Association._run_reactor)
    assert "time.sleep(0.001)" in loop and "self._reactor_checkpoint.wait()" in loop
    assert "self._reactor_checkpoint.clear()" in inspect.getsource(association.Association.release)
    assert dul.time is time or isinstance(dul.time, compat._ReactorTime)


@pytest.mark.parametrize("mode", ["quiet", "upstream"])
def test_reactors_that_wait_for_work_still_associate_store_report_release_abort_and_notice_a_closed_peer(mode):
    out = _quiet_run(mode)
    assert out["statuses"] == [[0, 0]] * 60, out
    assert all(out["ends"]) and out["slow"] == 0, out
    assert out["stored"] == 60
    for release in out["releases"]:  # a release never waits for a reactor that is not coming
        assert release["released"] and release["answered"] == [0] and release["seconds"] < 4, release
    assert out["noticed_shutdown"], out
    assert out["threads_left"] == 0, out  # no reactor thread left waiting


REPORT_FLAG = """
import json, sys, threading, time
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from router.compat import pynetdicom as compat
from tests.support.peers import free_port

COMMITMENT, COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1", "1.2.840.10008.1.20.1.1"
if sys.argv[1] == "kept":
    compat.keep_pause_flag_to_the_reactor()
scp = AE(ae_title="SCP")
scp.add_supported_context(COMMITMENT)
port = free_port()
server = scp.start_server(("127.0.0.1", port), block=False)
scu = AE(ae_title="SCU")
scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 5
scu.add_requested_context(COMMITMENT)
assoc = scu.associate("127.0.0.1", port, evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda event: (0x0000, None))])
deadline = time.monotonic() + 5
while not server.active_associations and time.monotonic() < deadline:
    time.sleep(0.001)
[acceptor] = server.active_associations
compat.park_reactor(assoc)  # the requestor's reactor waits at its closed checkpoint, its pause flag up
out = {"parked": assoc._is_paused}
info = Dataset()
info.TransactionUID = "2.25.1"
compat.park_reactor(acceptor)
status, _ = acceptor.send_n_event_report(info, 1, COMMITMENT, COMMITMENT_INSTANCE)
out["answered"] = status.get("Status")
deadline = time.monotonic() + 5  # the thread pynetdicom served the report in has ended
while any("serve_request" in t.name for t in threading.enumerate()) and time.monotonic() < deadline:
    time.sleep(0.001)
out["flag_after_report"] = assoc._is_paused
out["still_parked"] = not assoc._reactor_checkpoint.is_set() and assoc.is_alive()
if out["flag_after_report"]:
    assoc.release()  # would wait for ever on a lowered flag
    out["released"] = assoc.is_released
else:
    assoc.abort()
server.shutdown()
print(json.dumps(out))
"""


def _report_flag_run(mode: str) -> dict:
    import json

    return json.loads(_run_script(REPORT_FLAG, mode, 60))


def test_upstream_the_thread_an_n_event_report_is_served_in_still_lowers_the_reactors_pause_flag():
    """pynetdicom serves an N-EVENT-REPORT in a thread of its own that writes the reactor's
    `_is_paused`; with the reactor parked, the flag then says "running" and the next release()
    waits for ever. The day this fails, keep_pause_flag_to_the_reactor can go."""
    out = _report_flag_run("upstream")
    assert out["parked"] and out["answered"] == 0 and out["still_parked"], out
    assert out["flag_after_report"] is False, out


def test_a_report_served_while_the_reactor_is_parked_leaves_its_pause_flag_up_and_release_works():
    out = _report_flag_run("kept")
    assert out == {"parked": True, "answered": 0, "flag_after_report": True, "still_parked": True,
                   "released": True}, out


# -- a data set's P-DATA-TF PDUs written straight to its file (`_DataSetGuard.read_pdu`) ------------
def test_upstream_dt_2_only_hands_the_pdu_to_dimse_which_writes_data_fragments_to_the_file():
    """The short way for a data set's middle PDUs skips DT-2 and DIMSE's decode, sure that they
    do nothing but write those fragments to the data set's file; when upstream does more, see
    what the short way must do too."""
    assert "dul.assoc.dimse.receive_primitive(" in inspect.getsource(fsm.DT_2)
    decode = inspect.getsource(DIMSEMessage.decode_msg)
    assert "self._data_set_file.write(data[1:])" in decode
    assert "if control_header_byte & 2 != 0:" in decode


def _storing_server(recorded: _Recorded, max_pdu: int = 1 << 20) -> tuple[listener.GuardedAssociationServer, int,
                                                                          list[bytes]]:
    """A guarded server whose C-STORE handler keeps each received file's bytes."""
    stored: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        stored.append(Path(event.dataset_path).read_bytes())
        return 0x0000

    ae = AE()
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    limits = listener.Limits(request_timeout=5.0, pdu_timeout=5.0, max_pdu=max_pdu, tls_handshake_timeout=5.0,
                             pending=4)
    server = ae.make_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)],
                            server_class=listener.GuardedAssociationServer, limits=limits, hooks=recorded.hooks())
    compat.register_server(ae, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port, stored


def _p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, fragment) values."""
    items = b"".join(struct.pack(">LBB", len(fragment) + 2, context, control) + fragment
                     for context, control, fragment in pdvs)
    return struct.pack(">BxL", 0x04, len(items)) + items


def _ct_association(port: int):  # noqa: ANN202 - a pynetdicom Association
    scu = AE()
    scu.dimse_timeout = 10
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port)
    assert assoc.is_established
    return assoc


def test_data_set_pdus_of_every_shape_and_cut_anywhere_arrive_whole(tmp_path, restore_pynetdicom_config):
    """Several fragments per PDU, the command's end with the data set's start in one PDU, the
    last fragment after middle ones in one PDU, and the byte stream cut at every kind of place
    (inside a PDU header, a fragment header, a fragment): the file holds the data set as sent."""
    compat.stream_datasets_to_files(tmp_path)
    server, port, stored = _storing_server(_Recorded())
    ds = dcmread(data("693_UNCR.dcm"))
    assoc = _ct_association(port)
    try:
        context = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        command = data_set = b""
        for p_data in store_request(ds).encode_msg(context, 0):
            for _, value in p_data.presentation_data_value_list:
                if value[0] & 1:
                    command += value[1:]
                else:
                    data_set += value[1:]
        cuts = [100, 7000, 7001, 6999, 40000, 40000, 1, 1, 2, 65536, 65536, 65536, 65536, 20000, 3]
        assert sum(cuts) < len(data_set)
        pieces, at = [], 0
        for size in cuts:
            pieces.append(data_set[at:at + size])
            at += size
        rest = data_set[at:]
        stream = _p_data([(context, 0x03, command), (context, 0x00, pieces[0])])  # command's end + data
        stream += _p_data([(context, 0x00, piece) for piece in pieces[1:4]])  # three middle fragments
        stream += b"".join(_p_data([(context, 0x00, piece)]) for piece in pieces[4:-1])
        stream += _p_data([(context, 0x00, pieces[-1]), (context, 0x02, rest)])  # middle, then the last
        compat.park_reactor(assoc)
        sock = assoc.dul.socket.socket
        sizes = [1, 5, 7, 3, 11, 4099, 65537, 6, 131072]
        at, turn = 0, 0
        while at < len(stream):  # each piece its own segment
            size = sizes[turn % len(sizes)]
            sock.sendall(stream[at:at + size])
            at, turn = at + size, turn + 1
            if turn % 5 == 0:
                time.sleep(0.001)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None and rsp.Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000  # and pynetdicom's own PDUs after it
    finally:
        assoc.release()
        server.shutdown()
    assert len(stored) == 2
    for file in stored:
        assert file.endswith(data_set) and file[128:132] == b"DICM"
        assert dcmread(io.BytesIO(file)).PixelData == ds.PixelData


def test_a_data_set_write_that_fails_midway_is_answered_and_the_association_goes_on(
        tmp_path, restore_pynetdicom_config):
    """A write refused by the system in the middle of a data set (here: past the file size
    limit, EFBIG; a full disk is ENOSPC) is a failure status for that C-STORE, its file removed."""
    compat.stream_datasets_to_files(tmp_path)
    recorded = _Recorded()
    server, port, stored = _storing_server(recorded, max_pdu=16384)  # the data set in 33 PDUs
    ds = dcmread(data("693_UNCR.dcm"))  # 525 KB
    assoc = _ct_association(port)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limit[1]))
        try:
            status = assoc.send_c_store(ds).Status
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        assert 0xC000 <= status <= 0xCFFF
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        signal.signal(signal.SIGXFSZ, ignored)
        assoc.release()
        server.shutdown()
    assert [getattr(exc, "errno", None) for exc in recorded.unwritable] == [errno.EFBIG]
    assert len(stored) == 1 and list(tmp_path.iterdir()) == []
