"""The parts a cluster of router nodes stands on, as real programs: the private PostgreSQL the
queue tests use, and the shipped HAProxy configuration (`deploy/haproxy.cfg`) in front of
stand-in nodes that answer C-ECHO and /readyz."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.cluster import HAPROXY_CFG, Haproxy, PostgresServer, haproxy_config, require
from tests.support.peers import alive, descendants, free_port, wait_until

pytestmark = pytest.mark.interop


# -- PostgreSQL -------------------------------------------------------------------------------------
def test_postgres_runs_unprivileged_and_keeps_committed_rows_through_a_crash(tmp_path):
    require("postgres")
    server = PostgresServer(tmp_path / "pg")
    with server:
        uid = int(Path(f"/proc/{server.pid}/status").read_text().split("Uid:")[1].split()[0])
        assert uid != 0, "PostgreSQL runs as root"
        assert server.url == f"postgresql://router@127.0.0.1:{server.port}/router"
        with server.connect() as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            conn.execute("CREATE TABLE kept (value text)")
            conn.execute("INSERT INTO kept VALUES ('acknowledged')")
        port, crashed = server.port, server.pid
        server.kill()
        assert not alive(crashed)

        server.start()
        assert server.port == port and server.pid != crashed
        with server.connect() as conn:
            assert conn.execute("SELECT value FROM kept").fetchall() == [("acknowledged",)]
        postmaster, children = server.pid, descendants(server.pid)
        assert children, "a running PostgreSQL has background processes"
    assert server.pid is None
    assert not alive(postmaster) and not any(alive(pid) for pid in children)


# -- the shipped HAProxy configuration ---------------------------------------------------------------
def test_shipped_haproxy_config_is_valid_as_shipped(tmp_path):
    require("haproxy")
    rc, output = Haproxy(HAPROXY_CFG.read_text(), tmp_path).check_config()
    assert rc == 0, output
    assert "WARNING" not in output and "ALERT" not in output, output


def test_generated_haproxy_config_is_the_shipped_one_with_local_nodes(tmp_path):
    require("haproxy")
    text = haproxy_config([("node-1", 20001, 30001), ("node-2", 20002, 30002), ("node-3", 20003, 30003)],
                          dicom_port=20000, stats_port=20100, check_interval_ms=250)
    rc, output = Haproxy(text, tmp_path).check_config()
    assert rc == 0, output
    assert "WARNING" not in output and "ALERT" not in output, output

    def kept(config: str) -> list[str]:
        return [line for line in config.splitlines() if line.split()[:1] not in (["bind"], ["server"])]

    assert kept(text) == kept(HAPROXY_CFG.read_text())
    servers = [line.split() for line in text.splitlines() if line.split()[:1] == ["server"]]
    assert servers == [["server", f"node-{i}", f"127.0.0.1:{20000 + i}", "check", "port", str(30000 + i),
                        "inter", "250ms", "fall", "2", "rise", "2"] for i in (1, 2, 3)]
    binds = [line.split() for line in text.splitlines() if line.split()[:1] == ["bind"]]
    assert binds == [["bind", "127.0.0.1:20000"], ["bind", "127.0.0.1:20100"]]
    without_stats = haproxy_config([("node-1", 20001, 30001)], dicom_port=20000).splitlines()
    assert "frontend dicom" in without_stats and "frontend stats" not in without_stats


# -- HAProxy in front of stand-in nodes -----------------------------------------------------------------
class Node:
    """A stand-in router node: a pynetdicom Verification SCP, and /readyz on its own HTTP port
    answering 200 or 503 as the test sets `ready`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dicom_port = free_port()
        self.ready = True
        self.echoes = 0  # C-ECHOs answered, by association or not
        self._lock = threading.Lock()
        ae = AE(ae_title="ROUTER")
        ae.add_supported_context(Verification)
        self.scp = ae.start_server(("127.0.0.1", self.dicom_port), block=False,
                                   evt_handlers=[(evt.EVT_C_ECHO, self._on_echo)])
        node = self

        class Readyz(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                code = 200 if self.path == "/readyz" and node.ready else 503 if self.path == "/readyz" else 404
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Readyz)
        self.http.daemon_threads = True
        self.metrics_port = self.http.server_address[1]
        self._http_thread = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05},
                                             daemon=True)
        self._http_thread.start()

    def _on_echo(self, event: evt.Event) -> int:
        with self._lock:
            self.echoes += 1
        return 0x0000

    def stop(self) -> None:
        self.scp.shutdown()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def cluster(tmp_path):
    """Two stand-in nodes behind HAProxy running the shipped configuration, both UP."""
    require("haproxy")
    nodes = [Node("node-a"), Node("node-b")]
    text = haproxy_config([(n.name, n.dicom_port, n.metrics_port) for n in nodes], dicom_port=free_port(),
                          stats_port=free_port(), check_interval_ms=100)
    proxy = Haproxy(text, tmp_path / "haproxy")
    try:
        proxy.start()
        wait_for_status(proxy, {"node-a": "UP", "node-b": "UP"})
        yield proxy, {n.name: n for n in nodes}
    finally:
        proxy.stop()
        for node in nodes:
            node.stop()


def wait_for_status(proxy: Haproxy, expected: dict[str, str], timeout: float = 5) -> None:
    seen: dict[str, str] = {}

    def reached() -> bool:
        seen.update(proxy.server_status())
        return all(seen.get(name) == status for name, status in expected.items())

    try:
        wait_until(reached, timeout, interval=0.05, what=f"HAProxy to see {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}\n{proxy.log_text()}") from None


def associate(proxy: Haproxy):  # noqa: ANN201 - a pynetdicom Association
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    assoc = ae.associate("127.0.0.1", proxy.port, ae_title="ROUTER")
    assert assoc.is_established, "no association through HAProxy"
    return assoc


def echo_lands_on(proxy: Haproxy, nodes: dict[str, Node], assoc=None) -> str:  # noqa: ANN001
    """The node that answered one C-ECHO (on `assoc`, or on a new association released after)."""
    before = {name: n.echoes for name, n in nodes.items()}
    own = assoc is None
    assoc = assoc or associate(proxy)
    try:
        status = assoc.send_c_echo()
        assert status and status.Status == 0x0000, f"C-ECHO through HAProxy answered {status}"
    finally:
        if own:
            assoc.release()
    landed = [name for name, n in nodes.items() if n.echoes != before[name]]
    assert len(landed) == 1, f"one C-ECHO reached {landed}"
    return landed[0]


def test_haproxy_sends_each_new_association_to_the_node_with_fewest_open(cluster):
    proxy, nodes = cluster
    held = [associate(proxy) for _ in range(4)]
    try:
        landed = [echo_lands_on(proxy, nodes, assoc) for assoc in held]
        assert landed[0] != landed[1], "the second association went to the node already holding one"
        assert sorted(landed) == ["node-a", "node-a", "node-b", "node-b"]
    finally:
        for assoc in held:
            assoc.release()


def test_a_node_not_ready_gets_no_new_associations_keeps_its_open_ones_and_comes_back(cluster):
    proxy, nodes = cluster
    held, node = None, None
    try:
        # an association open on node-b when it turns not ready
        for _ in range(4):
            held = associate(proxy)
            node = echo_lands_on(proxy, nodes, held)
            if node == "node-b":
                break
            held.release()
        assert node == "node-b", "no association reached node-b"

        nodes["node-b"].ready = False
        wait_for_status(proxy, {"node-b": "DOWN", "node-a": "UP"})
        assert [echo_lands_on(proxy, nodes) for _ in range(4)] == ["node-a"] * 4
        assert echo_lands_on(proxy, nodes, held) == "node-b", "the open association did not stay on its node"

        nodes["node-b"].ready = True
        wait_for_status(proxy, {"node-b": "UP"})
        held.release()
        held = None
        landed = [echo_lands_on(proxy, nodes) for _ in range(2)]
        assert "node-b" in landed, f"node-b got no association once ready again: {landed}"
    finally:
        if held is not None:
            held.release()


def test_haproxy_exports_its_view_of_the_nodes_for_prometheus(cluster):
    import urllib.request

    proxy, nodes = cluster
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.stats_port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    assert 'haproxy_backend_active_servers{proxy="routers"} 2' in text, text[:2000]
