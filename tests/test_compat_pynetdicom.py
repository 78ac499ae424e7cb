"""Each pynetdicom workaround in router.compat.pynetdicom: a test that fails the day pynetdicom
changes what it relies on or fixes what it works around (then adapt or remove it), and a test
that it works."""

from __future__ import annotations

import socket
import tempfile
import threading

import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from router.compat import pynetdicom as compat
from tests.peers import free_port


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

