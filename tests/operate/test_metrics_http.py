"""The metrics endpoint's own limits: idle or trickling clients are closed, and only
`max_connections` are served at once, so that no client can pile up threads and file
descriptors in the router (`metrics.serve_http`, in this process)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from router import metrics
from tests.support.peers import free_port
from tests.receive.test_network_limits import closed_by_peer


@pytest.fixture
def endpoint():
    """Serves the endpoints with at most 3 connections and a 1-second idle timeout; yields the port."""
    port = free_port()
    server = metrics.serve_http("127.0.0.1", port, lambda: (True, "ready"), max_connections=3, idle_timeout_s=1)
    yield port
    server.shutdown()
    server.server_close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as rsp:
        return rsp.status


def test_an_idle_connection_is_closed_after_idle_timeout_s(endpoint):
    idle = connect(endpoint)
    try:
        started = time.monotonic()
        assert closed_by_peer(idle, 3)
        assert 0.8 < time.monotonic() - started < 3
    finally:
        idle.close()


def test_a_request_trickled_byte_by_byte_is_closed_after_idle_timeout_s(endpoint):
    sock = connect(endpoint)
    stop = threading.Event()

    def trickle() -> None:
        try:
            for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 100:
                if stop.wait(0.1):
                    return
                sock.send(bytes([byte]))
        except OSError:
            pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        assert closed_by_peer(sock, 4)
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_connections_beyond_max_connections_are_closed_at_once_and_the_endpoint_comes_back(endpoint):
    held = [connect(endpoint) for _ in range(3)]
    extra = connect(endpoint)
    try:
        assert closed_by_peer(extra, 0.5)
    finally:
        extra.close()
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            assert healthz(endpoint) == 200
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_scrape_is_served_next_to_idle_connections(endpoint):
    idle = [connect(endpoint) for _ in range(2)]
    try:
        assert healthz(endpoint) == 200
    finally:
        for sock in idle:
            sock.close()
