"""Who may connect, how much they may send, DICOM TLS, and what the spool lets others read."""

from __future__ import annotations

import socket
import ssl
import sys
import stat
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.peers import Destination, data, make_pki, metric_value, send, wait_until

RULE = '[[rule]]\nsyntax = "original"\n'


def test_only_allowed_callers_may_store(router_factory, pacs):
    router = router_factory(
        [Destination("PACS", pacs.port, RULE)],
        listen_extra='allowed_callers = ["CT1", { ae_title = "CT2", hosts = ["10.9.0.0/16"] },'
                     ' { ae_title = "CT3", hosts = ["127.0.0.0/8"] }]',
    )
    assert send(router.port, [data("693_UNCR.dcm")], calling_ae="MODALITY") == [-1]
    assert send(router.port, [data("693_UNCR.dcm")], calling_ae="CT2") == [-1]  # right AE, wrong network
    assert send(router.port, [data("693_UNCR.dcm")], calling_ae="CT1") == [0]
    assert send(router.port, [data("MR2_UNCR.dcm")], calling_ae="CT3") == [0]
    wait_until(lambda: pacs.count() == 2, 20, what="allowed callers' instances")
    assert metric_value(router.metrics(), "dicom_router_rejected_total", reason="not_allowed") == 2
    assert router.log().count('"event": "association_rejected"') == 2


def test_a_refused_caller_hears_association_rejected_with_the_reason(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)], listen_extra='allowed_callers = ["CT1"]')
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
    assert assoc.is_rejected, "the caller saw the connection closed, not an A-ASSOCIATE-RJ"
    rj = assoc.acceptor.primitive
    # rejected-permanent, service-user, calling AE title not recognised
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


def test_called_ae_title_must_match(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)])
    assert send(router.port, [data("693_UNCR.dcm")], called_ae="SOMEONE_ELSE") == [-1]
    assert metric_value(router.metrics(), "dicom_router_rejected_total", reason="not_allowed") == 1


def test_association_limit_refuses_clearly(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)], listen_extra="max_associations = 1\nprocesses = 1")
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
    assert held.is_established
    try:
        assert send(router.port, [data("693_UNCR.dcm")]) == [-1]
        assert metric_value(router.metrics(), "dicom_router_rejected_total", reason="busy") == 1
        refused = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
        rj = refused.acceptor.primitive
        # rejected-transient, service provider (presentation), local limit exceeded
        assert refused.is_rejected and (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        held.release()
    assert send(router.port, [data("693_UNCR.dcm")]) == [0]


def test_a_modality_that_associates_again_right_after_a_release_is_not_refused_at_the_limit(router_factory, pacs):
    """An association per image, at max_associations = 1: the association just released still
    has threads ending when the next request arrives; it no longer counts."""
    router = router_factory([Destination("PACS", pacs.port, RULE)], listen_extra="max_associations = 1\nprocesses = 1")
    images = [data("693_UNCR.dcm"), data("MR2_UNCR.dcm")] * 10
    statuses = [send(router.port, [image])[0] for image in images]
    assert statuses == [0] * len(images)
    wait_until(lambda: pacs.count() == len(images), 30, what="every image")
    assert metric_value(router.metrics(), "dicom_router_rejected_total", reason="busy") == 0


def test_instance_size_limit(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)], listen_extra="max_instance_mb = 1")
    assert send(router.port, [data("MR2_UNCR.dcm"), data("693_UNCR.dcm")]) == [0xA700, 0]
    assert metric_value(router.metrics(), "dicom_router_rejected_total", reason="too_large") == 1
    wait_until(lambda: pacs.count() == 1, 20, what="the small instance")


def test_spool_is_owner_only(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)])
    for directory in (router.spool, router.spool / "instances", router.spool / "incoming"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


# -- DICOM TLS -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a certificate for 127.0.0.1/localhost and one for a modality, all made here."""
    return make_pki(tmp_path_factory.mktemp("pki"), {"server": "IP:127.0.0.1,DNS:localhost", "client": "DNS:ct1"})


def _client(pki: Path, with_cert: bool) -> tuple[ssl.SSLContext, str]:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    ctx.check_hostname = False
    if with_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx, "127.0.0.1"


def test_tls_inbound_requires_a_client_certificate_and_outbound_verifies_the_destination(
        router_factory, pacs_factory, pki):
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    server.verify_mode = ssl.CERT_REQUIRED
    pacs = pacs_factory(ssl_context=server)
    tls = (f'{{ cert = "{pki}/server.pem", key = "{pki}/server.key", ca = "{pki}/ca.pem", '
           "require_peer_cert = true }")
    outbound = (f'tls = {{ cert = "{pki}/client.pem", key = "{pki}/client.key", ca = "{pki}/ca.pem", '
                "verify_hostname = true }")
    router = router_factory([Destination("PACS", pacs.port, RULE, extra=outbound)], listen_extra=f"tls = {tls}")
    assert send(router.port, [data("693_UNCR.dcm")], tls_args=_client(pki, with_cert=True)) == [0]
    wait_until(lambda: pacs.count() == 1, 20, what=f"delivery over TLS\n{router.log()}")
    assert send(router.port, [data("693_UNCR.dcm")], tls_args=_client(pki, with_cert=False)) == [-1]
    assert send(router.port, [data("693_UNCR.dcm")]) == [-1]  # plain TCP to a TLS port
    assert pacs.count() == 1


def _tls_echo(port: int, pki: Path, timeout: float) -> bool:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER", tls_args=_client(pki, with_cert=True))
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_silent_connections_do_not_stop_dicom_tls(router_factory, pacs, pki):
    tls = f'{{ cert = "{pki}/server.pem", key = "{pki}/server.key", ca = "{pki}/ca.pem" }}'
    router = router_factory([Destination("PACS", pacs.port, RULE)],
                            listen_extra=f"tls = {tls}\ntls_handshake_timeout_s = 3\nprocesses = 1")
    silent = [socket.create_connection(("127.0.0.1", router.port), timeout=5) for _ in range(2)]
    try:
        started = time.monotonic()
        assert _tls_echo(router.port, pki, timeout=5)
        assert time.monotonic() - started < 2.5  # while both are still waiting for their handshake
        for sock in silent:
            sock.settimeout(6)
            assert sock.recv(1) == b"", "a silent connection was not closed"
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: metric_value(router.metrics(), "dicom_router_rejected_total", reason="timeout") == 2, 5,
               what="two failed TLS handshakes counted")
    assert router.log().count('"cause": "tls_timeout"') == 2


def test_check_reports_missing_certificate_files(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "router.toml").write_text('[listen]\ntls = { cert = "nope.pem", key = "nope.key" }\n')
    result = subprocess.run([sys.executable, "-m", "router", "check", "--config", str(tmp_path / "router.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "field listen.tls.cert: file not found" in result.stderr
