"""IHE ATNA audit messages for real: the router sends them to rsyslog (Debian's, with
rsyslog-gnutls) over mutual TLS, TCP or UDP; every message is valid against the PS3.15 A.5.1
schema (tests/data/audit, its source named there) and says who sent what where; a repository
that stops loses nothing; a full audit spool drops records and counts them, never an image."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import lxml.etree as ET
import pydicom
import pytest

from router import audit, metrics
from router.config import Audit
from tests.support.peers import Destination, Pacs, data, make_series, metric_value, send, wait_until
from tests.support.syslog_server import SyslogServer

pytestmark = pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="rsyslog (scripts/install-peers.sh)")

SCHEMA = ET.RelaxNG(ET.parse(str(Path(__file__).resolve().parents[1] / "data" / "audit" / "dicom-audit-message.rng")))
CT = data("693_UNCR.dcm")
HEADER = re.compile(r'^<85>1 \S+ \S+ dicom-router \d+ IHE\+RFC-3881 \[meta sequenceId="(\d+)"\] \ufeff(<\?xml.*)$')


@pytest.fixture
def repository(tmp_path):
    servers: list[SyslogServer] = []

    def make(transport: str = "tls") -> SyslogServer:
        server = SyslogServer(tmp_path / f"syslog-{len(servers)}", transport=transport)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


def audit_config(server: SyslogServer, **extra: object) -> str:
    lines = [f'url = "{server.transport}://127.0.0.1:{server.port}"', 'source_id = "ROUTER-A"',
             "retry_s = 0.1", "confirm_s = 0.2"]
    if server.transport == "tls":
        lines.append(f'tls = {{ ca = "{server.ca_file}", cert = "{server.pki / "client.pem"}", '
                     f'key = "{server.pki / "client.key"}" }}')
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "[audit]\n" + "\n".join(lines) + "\n"


def parsed(server: SyslogServer) -> list[tuple[int, ET._Element]]:
    """Each message: its sequenceId and its AuditMessage, checked against the schema."""
    out = []
    for line in server.messages():
        found = HEADER.match(line)
        assert found, line[:200]
        document = ET.fromstring(found[2].encode())
        assert SCHEMA.validate(document), (SCHEMA.error_log.last_error, found[2][:500])
        out.append((int(found[1]), document))
    return out


def events(server: SyslogServer) -> list[ET._Element]:
    return [document for _, document in parsed(server)]


def event_id(document: ET._Element) -> str:
    return document.find("EventIdentification/EventID").get("csd-code")


def of(documents: list[ET._Element], code: str, action: str | None = None) -> list[ET._Element]:
    return [d for d in documents if event_id(d) == code
            and (action is None or d.find("EventIdentification").get("EventActionCode") == action)]


def participant(document: ET._Element, role: str) -> ET._Element:
    [found] = [p for p in document.findall("ActiveParticipant") if p.find("RoleIDCode") is not None
               and p.find("RoleIDCode").get("csd-code") == role]
    return found


def objects(document: ET._Element, type_code: str) -> list[ET._Element]:
    return [o for o in document.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCode") == type_code]


def test_received_and_forwarded_instances_start_stop_and_a_refused_caller_over_mutual_tls(
        repository, router_factory, tmp_path):
    server = repository("tls")
    pacs = Pacs(tmp_path / "pacs").start()
    try:
        router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')],
                                listen_extra='allowed_callers = ["MODALITY"]\n', extra=audit_config(server))
        series = make_series(CT, 3, tmp_path / "series")
        assert send(router.port, series) == [0, 0, 0]
        assert send(router.port, series[:1], calling_ae="STRANGER") == [-1]  # refused
        wait_until(lambda: len(pacs.by_uid()) == 3, 30, what="the series at the PACS")
        wait_until(lambda: of(events(server), "110104", "C") and of(events(server), "110113") and sum(
            int(c.get("NumberOfInstances")) for d in of(events(server), "110104", "R")
            for c in d.iter("SOPClass")) == 3, 30, what="the transfers and the alert at the repository")
        router.terminate()
        wait_until(lambda: len(of(events(server), "110100")) == 2, 30, what="Application Stop")
    finally:
        pacs.stop()
    documents = events(server)
    start, stop = of(documents, "110100")
    assert start.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
    assert stop.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"
    assert participant(start, "110150").get("AlternativeUserID") == "AETITLES=ROUTER"
    assert {d.find("AuditSourceIdentification").get("AuditSourceID") for d in documents} == {"ROUTER-A"}
    import pydicom

    original = pydicom.dcmread(series[0])
    [received] = of(documents, "110104", "C")
    source = participant(received, "110153")
    assert source.get("UserID") == "MODALITY" and source.get("UserIsRequestor") == "true"
    assert source.get("NetworkAccessPointID") == "127.0.0.1" and source.get("NetworkAccessPointTypeCode") == "2"
    assert participant(received, "110152").get("UserID") == "ROUTER"
    [study] = objects(received, "2")
    assert study.get("ParticipantObjectID") == original.StudyInstanceUID
    [sop_class] = study.findall("ParticipantObjectDescription/SOPClass")
    assert sop_class.get("UID") == original.SOPClassUID and sop_class.get("NumberOfInstances") == "3"
    [patient] = objects(received, "1")
    assert patient.get("ParticipantObjectID") == str(original.PatientID)
    forwarded = of(documents, "110104", "R")  # one per study and batch sent
    for sent in forwarded:
        assert participant(sent, "110153").get("UserID") == "ROUTER"
        assert participant(sent, "110152").get("UserID") == "PACS"
        assert participant(sent, "110152").get("UserIsRequestor") == "false"
        assert objects(sent, "2")[0].get("ParticipantObjectID") == original.StudyInstanceUID
    assert sum(int(c.get("NumberOfInstances")) for sent in forwarded
               for c in objects(sent, "2")[0].findall("ParticipantObjectDescription/SOPClass")) == 3
    [alert] = of(documents, "110113")
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110132"
    [subject] = objects(alert, "2")
    description = base64.b64decode(subject.find("ParticipantObjectDetail").get("value")).decode()
    assert "association refused: calling AE title or address not allowed" in description
    assert any(p.get("UserID") == "STRANGER" and p.get("UserIsRequestor") == "false"
               for p in alert.findall("ActiveParticipant"))


def test_a_reload_a_failed_tls_handshake_and_a_de_identified_copy_are_audited(repository, router_factory, tmp_path):
    import signal
    import ssl

    import pydicom

    from tests.support.peers import make_pki

    server = repository("tcp")
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki, {"router": "IP:127.0.0.1", "modality": "IP:127.0.0.1"})
    (tmp_path / "deid.key").write_text("the research key, long enough\n")
    pacs = Pacs(tmp_path / "pacs").start()
    try:
        router = router_factory(
            [Destination("RESEARCH", pacs.port, f'[[rule]]\nsyntax = "original"\n'
                                                f'deidentify = {{ secret_file = "{tmp_path / "deid.key"}" }}\n')],
            listen_extra=f'tls = {{ cert = "{pki / "router.pem"}", key = "{pki / "router.key"}", ca = "{pki / "ca.pem"}" }}\n',
            extra=audit_config(server))
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        context.check_hostname = False
        assert send(router.port, [CT], tls_args=(context, "127.0.0.1")) == [-1]  # no client certificate
        context.load_cert_chain(str(pki / "modality.pem"), str(pki / "modality.key"))
        series = make_series(CT, 2, tmp_path / "series")
        assert send(router.port, series, tls_args=(context, "127.0.0.1")) == [0, 0]
        wait_until(lambda: len(pacs.by_uid()) == 2, 30, what="the de-identified copies")
        router.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: of(events(server), "110106") and len(of(events(server), "110113")) >= 2, 30,
                   what="the export and the alerts")
    finally:
        pacs.stop()
    documents = events(server)
    codes = {a.find("EventIdentification/EventTypeCode").get("csd-code"): a for a in of(documents, "110113")}
    assert "TLS handshake failed" in base64.b64decode(
        objects(codes["110126"], "2")[0].find("ParticipantObjectDetail").get("value")).decode()
    assert codes["110131"].find("EventIdentification").get("EventOutcomeIndicator") == "0"
    original = pydicom.dcmread(series[0])
    [stored] = {str(r.dataset().StudyInstanceUID) for r in pacs.by_uid().values()}
    assert stored != original.StudyInstanceUID
    for export in of(documents, "110106"):  # one per study and batch sent
        assert export.find("EventIdentification").get("EventActionCode") == "R"
        assert participant(export, "110154").get("UserID") == "PACS"
        studies = objects(export, "2")
        as_sent = [s.get("ParticipantObjectID") for s in studies
                   if s.findtext("ParticipantObjectName") == "de-identified copy"]
        assert as_sent == [stored]
        assert original.StudyInstanceUID in [s.get("ParticipantObjectID") for s in studies]
        # the audit channel is the one place the patient's identity may go
        assert objects(export, "1")[0].get("ParticipantObjectID") == str(original.PatientID)
    assert not of(documents, "110104", "R")  # the copy is an export, not a plain transfer


def test_a_repository_stopped_mid_burst_gets_every_record_after_restart_in_order(repository, router_factory,
                                                                                 tmp_path):
    server = repository("tls")
    pacs = Pacs(tmp_path / "pacs").start()
    try:
        router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')],
                                extra=audit_config(server))
        studies = [make_series(CT, 1, tmp_path / f"s{n}") for n in range(12)]
        sent = {str(pydicom.dcmread(files[0]).StudyInstanceUID) for files in studies}

        def received_studies() -> set[str]:
            return {objects(d, "2")[0].get("ParticipantObjectID") for d in of(events(server), "110104", "C")}

        for files in studies[:4]:
            assert send(router.port, files) == [0]
        wait_until(lambda: len(of(events(server), "110104", "C")) == 4, 30, what="the first records")
        server.stop()
        for files in studies[4:]:  # the repository is down: the router goes on, its records wait
            assert send(router.port, files) == [0]
        wait_until(lambda: len(pacs.by_uid()) == 12, 30, what="every image delivered meanwhile")
        wait_until(lambda: metric_value(router.metrics(), "dicom_router_audit_send_failures_total") >= 1, 30,
                   what="the outage noticed")
        server.restart()
        # a record the repository had written before it stopped may come twice: count studies, not messages
        wait_until(lambda: received_studies() == sent, 60, what="every study's record after restart")
    finally:
        pacs.stop()
    sequence = [number for number, _ in parsed(server)]
    first_seen = list(dict.fromkeys(sequence))
    assert first_seen == sorted(first_seen)  # in the order written; a record sent twice keeps its sequenceId
    assert set(first_seen) >= set(range(first_seen[0], max(first_seen) + 1))  # none missing


def test_udp_sends_one_message_per_datagram(repository, router_factory, tmp_path):
    server = repository("udp")
    router = router_factory([Destination("PACS", 1, '[[rule]]\nsyntax = "original"\n')], extra=audit_config(server))
    wait_until(lambda: of(events(server), "110100"), 30, what="Application Start over UDP")
    router.terminate()
    wait_until(lambda: len(of(events(server), "110100")) == 2, 30, what="Application Stop over UDP")


def test_a_full_audit_spool_drops_new_records_counts_them_and_keeps_the_old(tmp_path):
    dropped = metrics.AUDIT_DROPPED._value.get()
    auditor = audit.configure(Audit(url="tcp://127.0.0.1:9", max_spool_mb=1), tmp_path, "ROUTER", "node-a")
    try:
        for _ in range(2000):  # ~1 KB each: past 1 MB
            audit.application(started=True)
        kept = auditor.spool.pending(limit=5000)
        assert 500 < len(kept) < 2000
        assert sum(len(frame) for _, frame in kept) <= 1024 * 1024
        assert [number for number, _ in kept] == list(range(1, len(kept) + 1))  # the oldest stay, in order
        assert metrics.AUDIT_DROPPED._value.get() - dropped == 2000 - len(kept)
    finally:
        audit.configure(Audit(), tmp_path, "ROUTER")


def test_the_alert_rules_say_when_audit_records_are_lost():
    rules = (Path(__file__).resolve().parents[2] / "dashboards" / "alerts.yml").read_text()
    assert "dicom_router_audit_dropped_total" in rules and "DicomRouterAuditRecordsDropped" in rules
