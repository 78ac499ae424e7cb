"""A DICOMweb destination in-process: the forwarding pipeline with the STOW-RS sender, against a
DICOMweb server the test controls (real sockets, real HTTP): what arrives, and what each kind
of answer makes of each job."""

from __future__ import annotations

import shutil
import ssl
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from router import metrics
from router.codecs.workers import CodecPool
from router.config import ConfigError, load_rule_file
from router.forward.credentials import credentials_for
from router.forward.forwarder import Forwarder
from router.forward.stow import parse_answer, retry_after_s
from router.queue.spool import Spool
from router.queue.sqlite import SqliteQueue
from router.receive.intake import SUCCESS, Intake, Received
from router.rules import Context
from tests.support.peers import data, make_pki, make_series, wait_until
from tests.support.stow_server import Reply, StowServer

CT = data("693_UNCR.dcm")
LOSSLESS = '[[rule]]\nsyntax = "jpeg-ls-lossless"\n'
ORIGINAL = '[[rule]]\nsyntax = "original"\n'
RETRY = "{ max_attempts = 5, backoff_s = 0.1, max_backoff_s = 0.2 }"


class Site:
    """A spool, a queue, intake and one DICOMweb destination's forwarder, as `serve` wires them."""

    def __init__(self, workdir: Path, pool: CodecPool, destination: str, rules: str) -> None:
        (workdir / "rules").mkdir(parents=True)
        self.path = workdir / "rules" / "ARCHIVE.toml"
        self.path.write_text(f"[destination]\n{destination}\n{rules}")
        self.rules = load_rule_file(self.path)
        self.spool = Spool(workdir / "spool")
        self.queue = SqliteQueue(workdir / "spool" / "queue.sqlite")
        self.forwarder = Forwarder("ARCHIVE", lambda name: self.rules, self.queue, self.spool, pool, "ROUTER")
        self.intake = Intake(self.spool, self.queue, lambda: [self.rules],
                             on_enqueued=lambda names: self.forwarder.wake())

    def receive(self, files: list[Path]) -> None:
        for index, source in enumerate(files):
            path = self.spool.incoming / f"rx{time.monotonic_ns()}-{index}.dcm"
            shutil.copyfile(source, path)
            ds = dcmread(source, stop_before_pixels=True)
            received = Received(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), Context("CT1", "ROUTER", "::1"))
            assert self.intake.accept(received) == SUCCESS

    def jobs(self, state: str | None = None):  # noqa: ANN201
        return self.queue.jobs(destination="ARCHIVE", state=state)

    def stop(self) -> None:
        self.forwarder.stop(timeout=10)
        self.queue.close()


@pytest.fixture
def servers():
    started: list[StowServer] = []

    def make(answer=None, **kwargs) -> StowServer:  # noqa: ANN001
        server = StowServer(answer, **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def site(tmp_path, codec_pool):
    made: list[Site] = []

    def make(server: StowServer, rules: str = LOSSLESS, extra: str = "", url: str | None = None) -> Site:
        destination = (f'url = "{url or server.url}"\nretry = {RETRY}\n'
                       "timeouts = { connect_s = 2, acse_s = 5, dimse_s = 5, network_s = 5 }\n" + extra)
        s = Site(tmp_path / f"site{len(made)}", codec_pool, destination, rules)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def counter(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()  # noqa: SLF001


def dead_or_pending_after_attempt(s: Site, count: int) -> None:
    wait_until(lambda: sum(1 for j in s.jobs() if j.attempts or j.state == "dead") >= count, 30,
               what="every job answered")


# -- delivered --------------------------------------------------------------------------------------
def test_a_series_goes_in_requests_of_instances_per_request_with_each_part_s_syntax(site, servers, tmp_path):
    server = servers()
    requests = counter(metrics.STOW_REQUESTS, destination="ARCHIVE", status="2xx")
    s = site(server, extra="instances_per_request = 4")
    files = make_series(CT, 10, tmp_path / "series")
    s.receive(files)
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 10, 30, what="every instance stored")
    wait_until(lambda: s.queue.counts() == {}, 10, what="every job recorded as delivered")
    assert sorted(len(r.parts) for r in server.requests) == [2, 4, 4]
    for request in server.requests:
        assert request.path == "/dicom-web/studies"
        assert request.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
        assert request.headers["accept"] == "application/dicom+json"
        for part in request.parts:
            assert part.content_type == f"application/dicom; transfer-syntax={JPEGLSLossless}"
    original = dcmread(CT).pixel_array
    for part in server.stored.values():
        assert part.transfer_syntax == JPEGLSLossless
        assert np.array_equal(part.dataset.pixel_array, original)
    assert counter(metrics.STOW_REQUESTS, destination="ARCHIVE", status="2xx") == requests + 3


def test_an_instance_the_response_does_not_list_is_not_delivered(site, servers, tmp_path):
    files = make_series(CT, 3, tmp_path / "series")
    left_out = str(dcmread(files[1]).SOPInstanceUID)
    server = servers(lambda request: Reply(200, stored=[u for u in request.uids if u != left_out]))
    s = site(server, ORIGINAL)
    s.receive(files)
    s.forwarder.start()
    # the deliveries of a request are recorded together once its outcomes are all known
    wait_until(lambda: len(s.jobs()) == 1 and s.jobs()[0].attempts, 30,
               what="the two listed delivered and the unlisted one retried")
    [job] = s.jobs()
    assert job.instance.sop_instance_uid == left_out
    assert "not listed in the STOW-RS response (HTTP 200)" in job.last_error


# -- per-instance outcomes ------------------------------------------------------------------------------
def test_202_gives_each_instance_its_own_outcome_from_its_reason(site, servers, tmp_path):
    files = make_series(CT, 4, tmp_path / "series")
    uids = [str(dcmread(f).SOPInstanceUID) for f in files]
    busy, bad, warned, fine = uids

    def answer(request):  # noqa: ANN001, ANN202
        return Reply(202, stored=[u for u in request.uids if u in (warned, fine)],
                     failed={u: code for u, code in ((busy, 0xA700), (bad, 0xC000)) if u in request.uids},
                     warnings={warned: 0xB000})

    server = servers(answer)
    s = site(server, ORIGINAL)
    s.receive(files)
    s.forwarder.start()
    wait_until(lambda: {j.instance.sop_instance_uid for j in s.jobs()} == {busy, bad}
               and all(j.attempts or j.state == "dead" for j in s.jobs()), 30, what="the two failures recorded")
    by_uid = {j.instance.sop_instance_uid: j for j in s.jobs()}
    assert by_uid[bad].state == "dead"
    assert "Failure Reason 0xC000 (HTTP 202), a permanent failure" in by_uid[bad].last_error
    assert by_uid[busy].state == "pending"
    assert "Failure Reason 0xA700 (HTTP 202)" in by_uid[busy].last_error
    assert {warned, fine} <= set(server.stored)


def test_409_with_every_instance_failed_makes_dead_letters(site, servers):
    server = servers(lambda request: Reply(409, stored=[], failed={u: 0xA900 for u in request.uids}))
    s = site(server, ORIGINAL)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: s.jobs("dead"), 30, what="the dead letter")
    assert "Failure Reason 0xA900 (HTTP 409)" in s.jobs("dead")[0].last_error


def test_a_status_override_applies_to_failure_reasons(site, servers):
    server = servers(lambda request: Reply(409, stored=[], failed={u: 0xC000 for u in request.uids}))
    s = site(server, ORIGINAL, extra='statuses = { "0xC000" = "retry" }')
    s.receive([CT])
    s.forwarder.start()
    dead_or_pending_after_attempt(s, 1)
    [job] = s.jobs()
    assert job.state == "pending" and "0xC000" in job.last_error


# -- the syntax refused ------------------------------------------------------------------------------
def _refuse_compressed(status: int):  # noqa: ANN202
    def answer(request):  # noqa: ANN001, ANN202
        if all(p.transfer_syntax == ExplicitVRLittleEndian for p in request.parts):
            return Reply(200)
        if status == 415:
            return Reply(415, body=b"")
        return Reply(409, stored=[], failed={u: 0xC122 for u in request.uids})
    return answer


@pytest.mark.parametrize("status", [415, 0xC122], ids=["http-415", "failure-reason-C122"])
def test_a_refused_syntax_goes_again_decompressed_and_is_not_encoded_again(site, servers, tmp_path, status):
    server = servers(_refuse_compressed(status))
    fallbacks = counter(metrics.FALLBACKS, destination="ARCHIVE", reason="refused_by_destination")
    s = site(server)
    first, *later = make_series(CT, 3, tmp_path / "series")
    s.receive([first])
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 1, 30, what="the first instance, decompressed")
    encoded = metrics.TRANSCODE_SECONDS.labels(syntax="jpeg-ls-lossless")._sum.get()  # noqa: SLF001
    s.receive(later)
    wait_until(lambda: len(server.stored) == 3, 30, what="the later instances")
    for part in server.stored.values():
        assert part.transfer_syntax == ExplicitVRLittleEndian
        assert np.array_equal(part.dataset.pixel_array, dcmread(CT).pixel_array)
    assert counter(metrics.FALLBACKS, destination="ARCHIVE", reason="refused_by_destination") == fallbacks + 3
    # the later ones went decompressed at once: no JPEG-LS request, no encode
    assert metrics.TRANSCODE_SECONDS.labels(syntax="jpeg-ls-lossless")._sum.get() == encoded  # noqa: SLF001
    assert sum(1 for r in server.requests if r.parts[0].transfer_syntax == JPEGLSLossless) == 1


def test_415_for_an_uncompressed_instance_is_a_dead_letter(site, servers):
    server = servers(lambda request: Reply(415, body=b""))
    s = site(server, ORIGINAL)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: s.jobs("dead"), 30, what="the dead letter")
    assert "does not take transfer syntax 1.2.840.10008.1.2.1 (HTTP 415" in s.jobs("dead")[0].last_error


# -- the server busy, down, or not answering ----------------------------------------------------------------
def test_429_honours_retry_after(site, servers):
    server = servers(lambda request: Reply(429, body=b"", headers={"Retry-After": "120"}))
    s = site(server, ORIGINAL)
    s.receive([CT])
    s.forwarder.start()
    dead_or_pending_after_attempt(s, 1)
    [job] = s.jobs()
    assert job.state == "pending"
    assert "HTTP 429" in job.last_error and "Retry-After 120 s" in job.last_error
    assert job.next_attempt_at > time.time() + 100  # the backoff alone would be 0.1 s
    assert len(server.requests) == 1


@pytest.mark.parametrize("reply", [Reply(503, body=b"down"), Reply(200, body=b"<html>proxy error</html>",
                                                                        headers={"Content-Type": "text/html"})],
                         ids=["503", "not-json"])
def test_a_server_error_or_an_answer_that_is_not_dicom_json_is_retried(site, servers, reply):
    server = servers(lambda request: reply)
    s = site(server, ORIGINAL)
    s.receive([CT])
    s.forwarder.start()
    dead_or_pending_after_attempt(s, 1)
    [job] = s.jobs()
    assert job.state in ("pending", "dead") and job.attempts >= 1 or job.state == "dead"
    assert f"HTTP {reply.status}" in job.last_error
    assert s.forwarder.alive()


def test_a_server_that_never_answers_times_out_and_the_forwarder_goes_on(site, servers):
    server = servers(lambda request: Reply(hang=True))
    s = site(server, ORIGINAL)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: any(j.attempts for j in s.jobs()), 30, what="the request timed out")
    assert "no answer within the timeout" in s.jobs()[0].last_error
    assert s.forwarder.alive()


def test_a_request_refused_whole_is_sent_again_one_instance_at_a_time(site, servers, tmp_path):
    files = make_series(CT, 3, tmp_path / "series")
    bad = str(dcmread(files[0]).SOPInstanceUID)

    def answer(request):  # noqa: ANN001, ANN202
        return Reply(400, body=b"bad request") if bad in request.uids else Reply(200)

    server = servers(answer)
    s = site(server, ORIGINAL)
    s.receive(files)
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 2, 30, what="the two good instances")
    wait_until(lambda: len(s.jobs()) == 1 and s.jobs()[0].attempts, 30, what="the good ones recorded, the bad one retried")
    assert [j.instance.sop_instance_uid for j in s.jobs()] == [bad]


# -- a server that ignores parts carrying transfer-syntax= -----------------------------------------------
def _ignores_parameter(request):  # noqa: ANN001, ANN202
    if any("transfer-syntax=" in p.content_type for p in request.parts):
        return Reply(200, stored=[])  # Orthanc 1.10 with DICOMweb 1.7: 200, nothing stored, nothing said
    return Reply(200)


def test_a_server_that_ignores_parts_with_the_parameter_is_detected_and_sent_without_it(site, servers, tmp_path):
    server = servers(_ignores_parameter)
    s = site(server)
    s.receive(make_series(CT, 4, tmp_path / "series"))
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 4, 30, what="every instance stored")
    wait_until(lambda: s.queue.counts() == {}, 10, what="delivered")
    for part in server.stored.values():
        assert part.content_type == "application/dicom" and part.transfer_syntax == JPEGLSLossless
    assert sum(1 for r in server.requests if "transfer-syntax=" in r.parts[0].content_type) == 1


def test_part_transfer_syntax_false_never_sends_the_parameter(site, servers):
    server = servers()
    s = site(server, extra="part_transfer_syntax = false")
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 1, 30, what="stored")
    assert server.requests[0].parts[0].content_type == "application/dicom"


def test_part_transfer_syntax_true_does_not_work_around_the_server(site, servers):
    server = servers(_ignores_parameter)
    s = site(server, extra="part_transfer_syntax = true")
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: any(j.attempts for j in s.jobs()), 30, what="retried")
    assert "part_transfer_syntax = false" in s.jobs()[0].last_error
    assert server.stored == {}


# -- credentials ------------------------------------------------------------------------------------------
def _basic_only(user: str, password: str):  # noqa: ANN202
    import base64

    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return lambda request: Reply(200) if request.headers.get("authorization") == expected else Reply(401, body=b"")


def test_a_wrong_password_makes_dead_letters_and_once_fixed_they_go(site, servers, tmp_path):
    server = servers(_basic_only("router", "right"))
    secret = tmp_path / "archive.password"
    secret.write_text("wrong\n")
    s = site(server, ORIGINAL, extra=f'auth = {{ username = "router", password_file = "{secret}" }}')
    s.receive(make_series(CT, 2, tmp_path / "series"))
    s.forwarder.start()
    wait_until(lambda: len(s.jobs("dead")) == 2, 30, what="dead letters")
    assert all("HTTP 401" in j.last_error and "credentials" in j.last_error for j in s.jobs("dead"))
    assert "wrong" not in s.jobs("dead")[0].last_error
    secret.write_text("right\n")  # fixed on disk: no restart
    assert s.queue.retry_dead("ARCHIVE") == 2
    s.forwarder.wake()
    wait_until(lambda: len(server.stored) == 2, 30, what="the retried dead letters delivered")


def test_a_bearer_token_file_is_read_again_when_it_changes(site, servers, tmp_path):
    server = servers()
    token = tmp_path / "token"
    token.write_text("first\n")
    s = site(server, ORIGINAL, extra=f'auth = {{ token_file = "{token}" }}')
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: len(server.requests) == 1, 30, what="the first request")
    token.write_text("second-token\n")
    s.receive(make_series(CT, 1, tmp_path / "later"))
    wait_until(lambda: len(server.requests) == 2, 30, what="the second request")
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer first", "Bearer second-token"]


def test_oauth2_client_credentials_token_is_cached_and_renewed_on_401(site, servers, tmp_path):
    refused_once = []

    def answer(request):  # noqa: ANN001, ANN202
        if request.headers.get("authorization") == "Bearer token-1" and not refused_once:
            if len(server.requests) >= 2:
                refused_once.append(True)
                return Reply(401, body=b"")  # the server revoked the first token
        return Reply(200) if request.headers.get("authorization", "").startswith("Bearer token-") else Reply(401)

    server = servers(answer)
    secret = tmp_path / "client.secret"
    secret.write_text("s3cret\n")
    s = site(server, ORIGINAL, extra=(f'auth = {{ token_url = "{server.token_url}", client_id = "router", '
                                      f'client_secret_file = "{secret}", scope = "stow" }}\ninstances_per_request = 1'))
    s.receive(make_series(CT, 3, tmp_path / "series"))
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 3, 30, what="every instance stored")
    assert server.tokens_granted == 2  # one for the first two requests, one after the 401
    grant = server.token_requests[0]
    assert grant["grant_type"] == "client_credentials" and grant["scope"] == "stow"
    assert grant["authorization"].startswith("Basic ")


def test_an_oauth2_token_is_renewed_when_it_expires_on_the_clock():
    server = StowServer(token_lifetime_s=100)
    try:
        import httpx

        from router.config import OAuth2Auth

        secret = Path("/proc/self/cwd")  # replaced below
        now = [1000.0]
        tmp = Path(__import__("tempfile").mkdtemp())
        secret = tmp / "secret"
        secret.write_text("x")
        credentials = credentials_for(OAuth2Auth(token_url=server.token_url, client_id="c", client_secret_file=secret),
                                      clock=lambda: now[0])
        with httpx.Client(trust_env=False) as client:
            assert credentials.header(client) == "Bearer token-1"
            now[0] += 60  # within the lifetime, less the margin
            assert credentials.header(client) == "Bearer token-1"
            now[0] += 15  # 75 s: past 100 - 30
            assert credentials.header(client) == "Bearer token-2"
        shutil.rmtree(tmp)
    finally:
        server.stop()


def test_a_token_endpoint_refusing_the_client_makes_dead_letters(site, servers, tmp_path):
    server = servers()
    server.token_reply = (401, {"error": "invalid_client"})
    secret = tmp_path / "client.secret"
    secret.write_text("nope\n")
    s = site(server, ORIGINAL, extra=(f'auth = {{ token_url = "{server.token_url}", client_id = "router", '
                                      f'client_secret_file = "{secret}" }}'))
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: s.jobs("dead"), 30, what="the dead letter")
    assert "refused the client credentials: HTTP 401 invalid_client" in s.jobs("dead")[0].last_error
    assert server.requests == []


# -- TLS ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), {"archive": "IP:127.0.0.1", "router": "DNS:router"})


def _server_tls(pki: Path, client_cert: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "archive.pem", pki / "archive.key")
    if client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki / "ca.pem")
    return context


def test_https_with_the_site_ca_and_a_client_certificate(site, servers, pki):
    server = servers(tls=_server_tls(pki, client_cert=True))
    s = site(server, ORIGINAL, extra=(f'tls = {{ ca_file = "{pki / "ca.pem"}", cert_file = "{pki / "router.pem"}", '
                                      f'key_file = "{pki / "router.key"}" }}'))
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 1, 30, what="stored over HTTPS")


def test_https_without_the_ca_is_refused_and_retried(site, servers, pki):
    server = servers(tls=_server_tls(pki, client_cert=False))
    s = site(server, ORIGINAL)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: any(j.attempts for j in s.jobs()), 30, what="the failed handshake recorded")
    assert "CERTIFICATE_VERIFY_FAILED" in s.jobs()[0].last_error or "certificate" in s.jobs()[0].last_error.lower()
    assert server.requests == []


# -- max_mbps -----------------------------------------------------------------------------------------------------
def test_max_mbps_paces_the_request_bodies(site, servers, tmp_path):
    server = servers()
    s = site(server, ORIGINAL, extra="max_mbps = 40")  # 5 MB/s; the series is 2.1 MB
    s.receive(make_series(CT, 4, tmp_path / "series"))
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 4, 30, what="stored")
    assert s.forwarder.sender.bucket.waited_s > 0.05


def test_an_archive_that_never_answers_holds_back_no_other_destination(router_factory, pacs, servers, tmp_path):
    from tests.support.peers import Destination, send

    hung = servers(lambda request: Reply(hang=True))
    router = router_factory([
        Destination("ARCHIVE", 0, ORIGINAL, url=hung.url,
                    timeouts="{ connect_s = 2, acse_s = 5, dimse_s = 60, network_s = 60 }"),
        Destination("PACS", pacs.port, ORIGINAL),
    ])
    files = make_series(CT, 20, tmp_path / "series")
    assert send(router.port, files) == [0] * 20
    wait_until(lambda: pacs.count() == 20, 30, what="every instance at the other destination")
    assert hung.stored == {} and len(hung.requests) >= 1  # still waiting for its first answer


# -- a reload that changes the protocol ----------------------------------------------------------------------------
def test_a_rule_file_reloaded_from_dicomweb_to_dimse_and_back_uses_the_protocol_in_force(site, servers, pacs,
                                                                                        tmp_path):
    server = servers()
    s = site(server, ORIGINAL)
    first, second, third = make_series(CT, 3, tmp_path / "series")
    s.receive([first])
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 1, 30, what="the first instance by STOW-RS")
    dicomweb = s.path.read_text()
    s.path.write_text(f'[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n{ORIGINAL}')
    s.rules = load_rule_file(s.path)
    s.receive([second])
    wait_until(lambda: pacs.count() == 1, 30, what="the second instance by C-STORE")
    s.path.write_text(dicomweb)
    s.rules = load_rule_file(s.path)
    s.receive([third])
    wait_until(lambda: len(server.stored) == 2, 30, what="the third instance by STOW-RS again")
    assert pacs.received[0].dataset().SOPInstanceUID == dcmread(second).SOPInstanceUID


# -- the rule file ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("destination", "message"), [
    ('url = "https://a.example/dicom-web"\nae_title = "PACS"', "field destination.ae_title: ae_title is for a DIMSE"),
    ('url = "ftp://a.example/"', "field destination.url: 'ftp://a.example/' is not an http:// or https:// URL"),
    ('url = "https://user:pw@a.example/"', "credentials do not go in the URL"),
    ('url = "https://a.example/"\nmax_associations = 4', "use max_requests"),
    ('url = "https://a.example/"\ncommitment = true', "a DICOMweb destination has no storage commitment SCP"),
    ('ae_title = "PACS"\nhost = "h"\nport = 104\nmax_requests = 2', "max_requests is for a DICOMweb destination"),
    ('url = "https://a.example/"\nauth = { username = "r", password_file = "missing.pw" }',
     "field destination.auth.password_file: file not found"),
    ('host = "h"\nport = 104', "ae_title is required (or url"),
])
def test_a_malformed_dicomweb_destination_is_refused_naming_the_field(tmp_path, destination, message):
    path = tmp_path / "ARCHIVE.toml"
    path.write_text(f"[destination]\n{destination}\n{ORIGINAL}")
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    assert message in str(caught.value)


def test_parse_answer_and_retry_after():
    assert parse_answer(b"not json") is None
    answer = parse_answer(b'{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]}, '
                          b'"00081196": {"vr": "US", "Value": [45056]}}]}, "00081198": {"vr": "SQ", "Value": '
                          b'[{"00081155": {"vr": "UI", "Value": ["1.3"]}, "00081197": {"vr": "US", "Value": [272]}}]}}')
    assert answer.referenced == {"1.2": 0xB000} and answer.failed == {"1.3": 0x0110}
    assert retry_after_s("30") == 30.0
    assert retry_after_s("Wed, 02 Dec 2026 20:00:30 GMT", now=lambda: 1796241600.0) == 30.0
    assert retry_after_s("soon") == 0.0


# -- header rules on the way out --------------------------------------------------------------------------------
def test_header_rules_reach_the_destination_and_are_counted_by_rule_and_action(site, servers, tmp_path):
    server = servers()
    changes = counter(metrics.HEADER_CHANGES, destination="ARCHIVE", rule="north", action="template")
    s = site(server, '[[rule]]\nname = "north"\nsyntax = "jpeg-ls-lossless"\n'
                     'set = { InstitutionName = "North Clinic" }\ntemplate = { PatientID = "N-{PatientID}" }\n')
    s.receive([CT])
    [spooled] = list(s.spool.instances.iterdir())
    before = spooled.read_bytes()
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 1, 30, what="stored")
    [part] = server.stored.values()
    ds = part.dataset
    assert ds.InstitutionName == "North Clinic" and ds.PatientID == f"N-{dcmread(CT).PatientID}"
    assert part.transfer_syntax == JPEGLSLossless
    assert np.array_equal(ds.pixel_array, dcmread(CT).pixel_array)
    assert counter(metrics.HEADER_CHANGES, destination="ARCHIVE", rule="north", action="template") == changes + 1
    assert dcmread(__import__("io").BytesIO(before)).PatientID == dcmread(CT).PatientID  # the spool unchanged


def test_an_unmapped_value_with_on_unmapped_dead_is_a_dead_letter_never_sent(site, servers, tmp_path):
    server = servers()
    table = tmp_path / "ids.csv"
    table.write_text("someone-else,ENT-1\n")
    refusals = counter(metrics.HEADER_REFUSALS, destination="ARCHIVE", reason="unmapped")
    s = site(server, f'[[rule]]\nname = "ids"\nsyntax = "original"\nmap = {{ PatientID = "{table}" }}\n'
                     'on_unmapped = "dead"\n')
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: s.jobs("dead"), 30, what="the dead letter")
    error = s.jobs("dead")[0].last_error
    assert "header rules (ids): PatientID is not in ids.csv" in error and str(dcmread(CT).PatientID) not in error
    assert server.requests == []
    assert counter(metrics.HEADER_REFUSALS, destination="ARCHIVE", reason="unmapped") == refusals + 1


def test_a_de_identified_copy_reaches_the_destination_and_burned_in_pixels_are_a_dead_letter(site, servers, tmp_path):
    server = servers()
    (tmp_path / "deid.key").write_text("a research key of more than sixteen bytes\n")
    changes = counter(metrics.HEADER_CHANGES, destination="ARCHIVE", rule="research", action="deidentify")
    refusals = counter(metrics.HEADER_REFUSALS, destination="ARCHIVE", reason="burned_in_annotation")
    s = site(server, f'[[rule]]\nname = "research"\nsyntax = "jpeg-ls-lossless"\n'
                     f'deidentify = {{ secret_file = "{tmp_path / "deid.key"}" }}\n')
    s.receive([CT, data("US1_UNCR.dcm")])
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 1 and s.jobs("dead"), 30, what="one stored, one dead letter")
    [part] = server.stored.values()
    assert part.dataset.PatientIdentityRemoved == "YES" and part.transfer_syntax == JPEGLSLossless
    assert str(dcmread(CT).PatientName).encode() not in part.data
    assert np.array_equal(part.dataset.pixel_array, dcmread(CT).pixel_array)
    [dead] = s.jobs("dead")
    assert "header rules (research): de-identification: the pixels may carry identity" in dead.last_error
    assert counter(metrics.HEADER_REFUSALS, destination="ARCHIVE", reason="burned_in_annotation") == refusals + 1
    assert counter(metrics.HEADER_CHANGES, destination="ARCHIVE", rule="research", action="deidentify") > changes + 10


def test_a_refused_syntax_decompressed_keeps_its_header_rules(site, servers, tmp_path):
    server = servers(_refuse_compressed(415))
    s = site(server, '[[rule]]\nname = "north"\nsyntax = "jpeg-ls-lossless"\nset = { InstitutionName = "N" }\n')
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: len(server.stored) == 1, 30, what="stored decompressed")
    [part] = server.stored.values()
    assert part.transfer_syntax == ExplicitVRLittleEndian and part.dataset.InstitutionName == "N"
