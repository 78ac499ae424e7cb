"""IHE ATNA audit messages: DICOM PS3.15 A.5 audit messages, RFC 5424 syslog framing, sent to the
site's audit record repository over TLS (RFC 5425), TCP or UDP (RFC 5426).

    record   each process that sees an event (`application`, `instances_transferred`, `export`,
             `security_alert`) writes its message, framed, to the audit spool: `audit.db` in the
             spool directory, SQLite, shared by the receiving processes and the forwarding one.
             Never on a C-STORE's critical path: what a modality sent is audited when its
             association ends, one message per study. Past `max_spool_mb` a new record is dropped
             and counted (`dicom_router_audit_dropped_total`): the images are never held back for
             the audit trail.
    send     one thread of the forwarding process (`AuditSender`) sends the records in the order
             they were written. Over TCP and TLS a record is removed only once the connection
             stayed up `confirm_s` after it was written (syslog has no acknowledgement: a
             repository that stops reads nothing more, and what it had not read is sent again
             on the next connection, with the same sequenceId); an unreachable repository is
             tried again after `retry_s`, doubling up to a minute. Over UDP a record is removed
             once sent.

Nothing here is configured without `[audit] url`: every function is then a no-op.
"""

from __future__ import annotations

import base64
import datetime
import os
import select
import socket
import sqlite3
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from router import log, metrics
from router.config import Audit

_log = log.get("audit")

SPOOL_FILE = "audit.db"
PRI = "<85>"  # facility 10 (security/authorization), severity 5 (notice), as IHE ITI TF-2 asks
APP_NAME = "dicom-router"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class Event:
    """One kind of audit message, as the conformance statement lists it."""

    title: str
    code: str
    meaning: str
    when: str


EVENTS = (
    Event("Application Activity", "110100", "Application Activity",
          "the router starts (110120 Application Start) and stops (110121 Application Stop)"),
    Event("DICOM Instances Transferred", "110104", "DICOM Instances Transferred",
          "an association that sent instances ends (one message per study, action C), and a destination "
          "stored instances (one message per study and batch, action R, the UIDs as sent)"),
    Event("Export", "110106", "Export", "a de-identified copy was stored at its destination (action R)"),
    Event("Security Alert", "110113", "Security Alert",
          "a caller refused (110132 Use of Restricted Function), a failed TLS handshake (110126 Node "
          "Authentication), a storage commitment report refused (110126), rules reloaded (110131 Software "
          "Configuration)"),
)

OUTCOME = {"success": "0", "minor": "4", "serious": "8", "major": "12"}


# -- the message -------------------------------------------------------------------------------------

def _code(parent: ET.Element, tag: str, code: str, meaning: str, system: str = "DCM") -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


@dataclass(frozen=True)
class Participant:
    user_id: str
    requestor: bool
    role: tuple[str, str] | None = None  # (code, meaning): 110153 Source Role ID, ...
    alternative: str = ""  # "AETITLES=ROUTER"
    address: str = ""  # host name (1) or IP address (2)
    name: str = ""


@dataclass(frozen=True)
class Study:
    """A study as an audit message names it, with the patient the audit channel may name."""

    uid: str
    sop_classes: dict[str, int] = field(default_factory=dict)  # SOP Class UID -> number of instances
    patient_id: str = ""
    patient_name: str = ""
    anonymized: bool = False  # a de-identified copy


def _participant(root: ET.Element, p: Participant) -> None:
    attributes = {"UserID": p.user_id or "unknown", "UserIsRequestor": "true" if p.requestor else "false"}
    if p.alternative:
        attributes["AlternativeUserID"] = p.alternative
    if p.name:
        attributes["UserName"] = p.name
    if p.address:
        attributes["NetworkAccessPointID"] = p.address
        attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(p.address) else "1"
    element = ET.SubElement(root, "ActiveParticipant", attributes)
    if p.role is not None:
        _code(element, "RoleIDCode", *p.role)


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def message(event: tuple[str, str], action: str, outcome: str, participants: Iterable[Participant], source_id: str,
            studies: Iterable[Study] = (), type_code: tuple[str, str] | None = None, description: str = "",
            objects: Iterable[tuple[str, str, str, tuple[str, str, str], str, dict[str, str]]] = (),
            when: datetime.datetime | None = None) -> bytes:
    """One AuditMessage (PS3.15 A.5.1), UTF-8 XML. `objects`: more participant objects as
    (ID, type code, type code role, (ID type code, system, meaning), name, details)."""
    root = ET.Element("AuditMessage")
    moment = (when or datetime.datetime.now(datetime.UTC)).isoformat(timespec="milliseconds")
    identification = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": moment.replace("+00:00", "Z"),
        "EventOutcomeIndicator": OUTCOME[outcome]})
    _code(identification, "EventID", *event)
    if type_code is not None:
        _code(identification, "EventTypeCode", *type_code)
    if description:
        ET.SubElement(identification, "EventOutcomeDescription").text = description
    for p in participants:
        _participant(root, p)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
    for study in studies:
        element = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": study.uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        _code(element, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        ET.SubElement(element, "ParticipantObjectName").text = "Study"
        description_element = ET.SubElement(element, "ParticipantObjectDescription")
        for sop_class, count in sorted(study.sop_classes.items()):
            ET.SubElement(description_element, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)})
        if study.anonymized:
            ET.SubElement(description_element, "Anonymized").text = "true"
    patients = {(s.patient_id, s.patient_name) for s in studies if s.patient_id or s.patient_name}
    for patient_id, patient_name in sorted(patients):
        element = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": patient_id or "unknown", "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(element, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
        ET.SubElement(element, "ParticipantObjectName").text = patient_name or patient_id
    for object_id, type_code_, role, id_type, name, details in objects:
        element = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code_,
            "ParticipantObjectTypeCodeRole": role})
        code, system, meaning = id_type
        _code(element, "ParticipantObjectIDTypeCode", code, meaning, system)
        ET.SubElement(element, "ParticipantObjectName").text = name
        for key, value in details.items():  # the schema's ValuePair: the value base64
            ET.SubElement(element, "ParticipantObjectDetail",
                          {"type": key, "value": base64.b64encode(value.encode()).decode()})
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="utf-8", xml_declaration=False)


def syslog_frame(xml: bytes, host: str, sequence: int, when: datetime.datetime | None = None) -> bytes:
    """The RFC 5424 message carrying `xml`: header, a `meta` sequenceId (RFC 5424 7.3.1, so that a
    record sent again can be told), the XML as MSG after a BOM."""
    moment = (when or datetime.datetime.now(datetime.UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = f"{PRI}1 {moment} {_token(host, 255)} {APP_NAME} {os.getpid()} {MSGID} [meta sequenceId=\"{sequence}\"] "
    return header.encode() + BOM + xml


def _token(text: str, limit: int) -> str:
    cleaned = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


# -- the spool ---------------------------------------------------------------------------------------

class AuditSpool:
    """The records waiting for the repository, in order: SQLite, shared by the router's processes."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self._local = threading.local()
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS record (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "frame BLOB NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def add(self, make: callable) -> bool:  # type: ignore[valid-type]
        """Write the record `make(sequence)` returns (its sequence: the row's id); False when the
        spool is full and it was dropped."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            used = db.execute("SELECT COALESCE(SUM(LENGTH(frame)), 0) FROM record").fetchone()[0]
            sequence = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM sqlite_sequence WHERE name = 'record'"
                                  ).fetchone()[0]
            frame = make(sequence)
            if used + len(frame) > self.max_bytes:
                db.execute("ROLLBACK")
                return False
            db.execute("INSERT INTO record (id, frame) VALUES (?, ?)", (sequence, frame))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return True

    def pending(self, limit: int = 100, after: int = 0) -> list[tuple[int, bytes]]:
        return self._db().execute("SELECT id, frame FROM record WHERE id > ? ORDER BY id LIMIT ?",
                                  (after, limit)).fetchall()

    def remove(self, up_to: int) -> None:
        self._db().execute("DELETE FROM record WHERE id <= ?", (up_to,))

    def count(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM record").fetchone()[0]


# -- the process-wide recorder -------------------------------------------------------------------------

class Auditor:
    """What this process records, with who it is (`source_id`, the router's AE title and host)."""

    def __init__(self, config: Audit, spool_dir: Path, ae_title: str, node: str) -> None:
        self.config = config
        self.spool = AuditSpool(spool_dir / SPOOL_FILE, config.max_spool_mb * 1024 * 1024)
        self.ae_title = ae_title
        self.host = node or socket.gethostname()
        self.source_id = config.source_id or self.host

    def router(self, requestor: bool = False, role: tuple[str, str] | None = None) -> Participant:
        return Participant(user_id=self.ae_title, requestor=requestor, role=role, alternative=f"AETITLES={self.ae_title}",
                           address=self.host)

    def write(self, xml: bytes) -> bool:
        written = self.spool.add(lambda sequence: syslog_frame(xml, self.host, sequence))
        if written:
            metrics.AUDIT_RECORDS.inc()
        else:
            metrics.AUDIT_DROPPED.inc()
            _log.error("audit_record_dropped", reason=f"audit spool full ({self.config.max_spool_mb} MB)",
                       action="raise [audit] max_spool_mb or bring the repository back")
        return written


_auditor: Auditor | None = None


def configure(config: Audit, spool_dir: Path, ae_title: str, node: str = "") -> Auditor | None:
    """Make this process record audit messages (none without `[audit] url`)."""
    global _auditor
    _auditor = Auditor(config, spool_dir, ae_title, node) if config.url else None
    return _auditor


def current() -> Auditor | None:
    return _auditor


def _record(make: callable) -> None:  # type: ignore[valid-type]
    auditor = _auditor
    if auditor is None:
        return
    try:
        auditor.write(make(auditor))
    except Exception as exc:  # noqa: BLE001 - the audit trail never stops the router's work
        metrics.AUDIT_DROPPED.inc()
        _log.error("audit_record_failed", error=f"{type(exc).__name__}: {exc}")


def application(started: bool) -> None:
    """Application Activity: the router started or is stopping."""
    type_code = ("110120", "Application Start") if started else ("110121", "Application Stop")
    _record(lambda a: message(("110100", "Application Activity"), "E", "success",
                              [a.router(role=("110150", "Application"))], a.source_id, type_code=type_code))


def instances_transferred(received: bool, peer: Participant, studies: list[Study], outcome: str = "success",
                          description: str = "") -> None:
    """DICOM Instances Transferred: `received` from the peer (action C) or sent to it (action R)."""
    def make(a: Auditor) -> bytes:
        if received:
            source = Participant(peer.user_id, True, ("110153", "Source Role ID"), peer.alternative, peer.address)
            destination = a.router(role=("110152", "Destination Role ID"))
        else:
            source = a.router(requestor=True, role=("110153", "Source Role ID"))
            destination = Participant(peer.user_id, False, ("110152", "Destination Role ID"), peer.alternative,
                                      peer.address)
        return message(("110104", "DICOM Instances Transferred"), "C" if received else "R", outcome,
                       [source, destination], a.source_id, studies=studies, description=description)

    _record(make)


def export(peer: Participant, studies: list[Study], exported: list[Study]) -> None:
    """Export: a de-identified copy of `studies` (as received) stored at the peer as `exported`."""
    def make(a: Auditor) -> bytes:
        source = a.router(requestor=True, role=("110153", "Source Role ID"))
        destination = Participant(peer.user_id, False, ("110154", "Destination Media"), peer.alternative,
                                  peer.address)
        copies = [(s.uid, "2", "3", ("110180", "DCM", "Study Instance UID"), "de-identified copy", {})
                  for s in exported]
        return message(("110106", "Export"), "R", "success", [source, destination], a.source_id, studies=studies,
                       objects=copies)

    _record(make)


def security_alert(type_code: tuple[str, str], description: str, peer: Participant | None = None,
                   outcome: str = "minor") -> None:
    """Security Alert: what happened (`type_code`), who caused it (`peer`, when known)."""
    def make(a: Auditor) -> bytes:
        # the router reports; the peer performed it (UserIsRequestor false); the subject is the
        # node it came from, with the alert's description
        participants = [a.router(requestor=True, role=("110150", "Application"))]
        if peer is not None:
            participants.append(Participant(peer.user_id, False, None, peer.alternative, peer.address))
        node = (peer.address if peer is not None and peer.address else a.host)
        subject = (node, "2", "13", ("110182", "DCM", "Node ID"), peer.user_id if peer is not None else a.host,
                   {"Alert Description": description})
        return message(("110113", "Security Alert"), "E", outcome, participants, a.source_id, type_code=type_code,
                       description=description, objects=[subject])

    _record(make)


def peer_ae(ae_title: str, address: str) -> Participant:
    """A DICOM peer as an audit message names it: its AE title, and the address it came from."""
    title = ae_title.strip()
    return Participant(user_id=title or "unknown", requestor=False, alternative=f"AETITLES={title}" if title else "",
                       address=address)


# -- the sender -------------------------------------------------------------------------------------

class AuditSender:
    """Sends the spooled records to the repository, in order (see the module docstring)."""

    def __init__(self, auditor: Auditor, clock: callable = time.monotonic) -> None:  # type: ignore[valid-type]
        self.auditor, self.config, self.clock = auditor, auditor.config, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | ssl.SSLSocket | None = None
        self._unconfirmed: list[tuple[int, float]] = []  # (record id, when written)
        self._sent_up_to = 0
        self._backoff = self.config.retry_s

    def start(self) -> AuditSender:
        self._thread = threading.Thread(target=self._run, name="audit-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is waiting for up to `timeout`, then stop."""
        deadline = self.clock() + timeout
        while self.auditor.spool.count() and self.clock() < deadline and self._sock is not None:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout + 5)
        self._close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.step():
                    self._stop.wait(0.05)
            except OSError as exc:
                self._failed(exc)

    def step(self) -> bool:
        """One turn: confirm what stayed up long enough, send what is waiting; True when it sent."""
        transport = self.config.transport
        if transport != "udp" and self._sock is not None and self._closed_by_peer():
            raise ConnectionResetError("the repository closed the connection")
        self._confirm()
        records = self.auditor.spool.pending(100, after=self._sent_up_to)
        if not records:
            return False
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        for record_id, frame in records:
            if transport == "udp":
                self._sock.send(frame)
                self.auditor.spool.remove(record_id)
            else:
                self._sock.sendall(str(len(frame)).encode() + b" " + frame)
                self._unconfirmed.append((record_id, self.clock()))
            self._sent_up_to = record_id
            metrics.AUDIT_SENT.inc()
        self._backoff = self.config.retry_s
        return True

    def _confirm(self) -> None:
        now = self.clock()
        done = [record_id for record_id, at in self._unconfirmed if now - at >= self.config.confirm_s]
        if done:
            self.auditor.spool.remove(max(done))
            self._unconfirmed = [(i, at) for i, at in self._unconfirmed if i > max(done)]

    def _closed_by_peer(self) -> bool:
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], 0)
        if not readable:
            return False
        try:
            return self._sock.recv(1024) == b""
        except ssl.SSLWantReadError:
            return False
        except OSError:
            return True

    def _connect(self) -> None:
        host, port = self.config.address
        transport = self.config.transport
        if transport == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((host, port))
            self._sock = sock
            return
        sock = socket.create_connection((host, port), timeout=10)
        if transport == "tls":
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.config.tls.ca)
                                                 if self.config.tls is not None and self.config.tls.ca else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            tls = self.config.tls
            if tls is not None:
                context.check_hostname = tls.verify_hostname
                if tls.cert is not None and tls.key is not None:
                    context.load_cert_chain(str(tls.cert), str(tls.key))
            sock = context.wrap_socket(sock, server_hostname=host)
        sock.settimeout(10)
        self._sock = sock
        _log.info("audit_connected", repository=self.config.url)

    def _failed(self, exc: OSError) -> None:
        metrics.AUDIT_SEND_FAILURES.inc()
        _log.warning("audit_repository_unreachable", repository=self.config.url, error=str(exc),
                     retry_in_s=round(self._backoff, 2), waiting=self.auditor.spool.count())
        self._close()
        # what was written and not confirmed goes again, in order, on the next connection
        self._unconfirmed = []
        self._sent_up_to = 0
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


# -- what is gathered before a message is written -------------------------------------------------------

class Transfers:
    """Instances received on each association, by study, until the association ends: then one
    DICOM Instances Transferred message per study (`end`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, tuple[Participant, dict[str, tuple[dict[str, int], str, str]]]] = {}

    def add(self, association: int, peer: Participant, study: str, sop_class: str, patient_id: str,
            patient_name: str) -> None:
        with self._lock:
            _, studies = self._open.setdefault(association, (peer, {}))
            classes, _, _ = studies.setdefault(study, ({}, patient_id, patient_name))
            classes[sop_class] = classes.get(sop_class, 0) + 1

    def end(self, association: int) -> None:
        with self._lock:
            opened = self._open.pop(association, None)
        if opened is None:
            return
        peer, studies = opened
        for uid, (classes, patient_id, patient_name) in studies.items():
            instances_transferred(True, peer, [Study(uid, classes, patient_id, patient_name)])


def sent_studies(items: Iterable[tuple[str, str, str, str, bool]]) -> tuple[list[Study], list[Study], bool]:
    """What a destination stored, by study: `items` as (Study Instance UID as received, file as
    received, file as sent, SOP class, de-identified). The studies as received and as sent, the
    patient and the UID as sent read from one file of each study, and whether any was
    de-identified."""
    import pydicom

    def header(path: str) -> tuple[str, str, str]:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["StudyInstanceUID", "PatientID", "PatientName"])
        return (str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("PatientID", "") or ""),
                str(ds.get("PatientName", "") or ""))

    studies: dict[str, tuple[dict[str, int], str, str, bool]] = {}
    for study, source, output, sop_class, deidentified in items:
        classes, _, _, _ = studies.setdefault(study, ({}, source, output, deidentified))
        classes[sop_class] = classes.get(sop_class, 0) + 1
    as_received, as_sent = [], []
    for study, (classes, source, output, deidentified) in studies.items():
        _, patient_id, patient_name = header(source)
        as_received.append(Study(study, classes, patient_id, patient_name))
        sent_uid, sent_id, sent_name = header(output) if output != source else (study, patient_id, patient_name)
        as_sent.append(Study(sent_uid or study, classes, sent_id, sent_name, deidentified))
    return as_received, as_sent, any(s.anonymized for s in as_sent)
