"""Storage commitment reports: each modality's on its own, so that a modality that never answers
delays only its own reports, whether its reply address accepts TCP and never answers or it keeps
its association and never answers the report on it. In-process against pynetdicom modalities and
a black hole (a listener that accepts and never answers), and end to end through `dicom-router
serve`."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from router.commitment.accept import accept_request
from router.commitment.messages import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, Transaction
from router.commitment.reporter import Reporter
from router.commitment.reports import AssociationReports
from router.compat.pynetdicom import keep_pause_flag_to_the_reactor
from router.config import Commitment, Listen, ReplyAddress, Timeouts
from router.queue import Instance
from router.queue.spool import Spool
from router.queue.sqlite import SqliteQueue
from router.receive.intake import Intake
from router.receive.scp import Receiver
from tests.support.peers import (
    CommittingModality, Destination, Pacs, data, free_port, make_series, references, send, wait_until,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
SILENT_TIMEOUTS = Timeouts(connect_s=2, acse_s=30, dimse_s=30, network_s=30)  # 30 s per attempt to a black hole


class BlackHole:
    """A listener that accepts TCP connections, reads nothing and never answers; `close()` drops
    them all."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="black-hole", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted.append(conn)

    def connections(self) -> int:
        with self._lock:
            return len(self.accepted)

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(): nothing more is taken
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in self.accepted:
                conn.close()


@pytest.fixture
def black_hole():
    hole = BlackHole()
    yield hole
    hole.close()


@pytest.fixture
def queue(tmp_path):
    q = SqliteQueue(tmp_path / "queue.sqlite")
    yield q
    q.close()


@pytest.fixture
def modality():
    m = CommittingModality("CT1").listen()
    yield m
    m.stop()


def asked(queue: SqliteQueue, calling_ae: str, transaction_uid: str) -> None:
    """A request from `calling_ae` for an instance the router holds and sends nowhere: committed."""
    uid = f"{transaction_uid}.1"
    queue.add(Instance(path=f"/spool/{uid}.dcm", sop_class_uid=CT, sop_instance_uid=uid, study_instance_uid="2.25.100",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae=calling_ae, called_ae="ROUTER",
                       source_ip="127.0.0.1", size=100, received_at=time.time()), [])
    accept_request(queue, Transaction(transaction_uid, ((CT, uid),)), calling_ae, 3600)


def test_a_modality_that_never_answers_delays_no_other_modality_s_reports(queue, modality, black_hole):
    for n in range(4):  # the silent modality's reports come first, oldest first
        asked(queue, "CT_OFF", f"2.25.90{n}")
    asked(queue, "CT1", "2.25.910")
    config = Commitment(modalities={"CT_OFF": ReplyAddress(host="127.0.0.1", port=black_hole.port),
                                    "CT1": ReplyAddress(host="127.0.0.1", port=modality.port)})
    reporter = Reporter(queue, config, "ROUTER", SILENT_TIMEOUTS, interval=0.1)
    reporter.start()
    try:
        wait_until(lambda: modality.report("2.25.910"), 10, what="CT1's report while CT_OFF never answers")
        wait_until(lambda: black_hole.connections() == 1, 5, what="CT_OFF's oldest report on its way")
        asked(queue, "CT1", "2.25.911")  # and CT1's next one is not held behind it either
        wait_until(lambda: modality.report("2.25.911"), 10, what="CT1's next report while CT_OFF never answers")
        assert black_hole.connections() == 1  # CT_OFF, busy with its oldest report, was not waited for
        assert modality.report("2.25.910").committed == ["2.25.910.1"]
        # CT1's recorded as reported (just after CT1 has them); CT_OFF's are kept for it
        wait_until(lambda: queue.commitment_counts() == {"waiting": 4, "retrying": 0}, 5, what="CT_OFF's kept")
    finally:
        black_hole.close()  # its attempt ends at once
        reporter.stop()


# -- on the association the request came on --------------------------------------------------------------
def ask_and_hold_silently(port: int, calling_ae: str, transaction_uid: str, uid: str,
                          answer: threading.Event) -> tuple[Association, threading.Event]:
    """A modality that asks for commitment, keeps its association, and answers no N-EVENT-REPORT
    on it until `answer` is set; returns the association and an event set when a report came."""
    came = threading.Event()
    keep_pause_flag_to_the_reactor()  # its release() after the report (pynetdicom #820, see CommittingModality)

    def on_report(event: evt.Event) -> tuple[int, None]:
        came.set()
        answer.wait(60)
        return 0x0000, None

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    information = Dataset()
    information.TransactionUID = transaction_uid
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT, uid
    information.ReferencedSOPSequence = [item]
    status, _ = assoc.send_n_action(information, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
    assert status.Status == 0x0000
    return assoc, came


def test_a_modality_that_never_answers_on_its_association_delays_no_other_s_report_on_theirs(queue, tmp_path):
    commitments = AssociationReports(queue, Commitment(mode="spooled"), interval=0.05)
    router = Receiver(Listen(host="127.0.0.1", port=free_port(), processes=1),
                      Intake(Spool(tmp_path / "spool"), queue, list), commitments)
    router.start()
    commitments.start()
    answer = threading.Event()
    held: list[Association] = []
    try:
        asked(queue, "CT_SLOW", "2.25.900")
        silent, came = ask_and_hold_silently(router.port, "CT_SLOW", "2.25.900", "2.25.900.1", answer)
        held.append(silent)
        assert came.wait(10)  # its report is on its way, and will wait the DIMSE timeout (60 s) for an answer
        asked(queue, "CT1", "2.25.910")
        modality = CommittingModality("CT1")
        status, transaction = modality.request(router.port, [(CT, "2.25.910.1")], "2.25.910", keep_open_s=10)
        assert status == 0x0000
        report = modality.report(transaction)
        assert report is not None and report.same_association and report.committed == ["2.25.910.1"]
    finally:
        answer.set()
        for assoc in held:
            assoc.release()
        commitments.stop()
        router.stop()


# -- the router as it runs --------------------------------------------------------------------------------
def test_with_a_silent_modality_the_router_still_reports_to_the_others(router_factory, modality, black_hole,
                                                                        tmp_path):
    pacs = Pacs(tmp_path / "pacs")  # down until every request is in: then all are decided in one pass
    router = router_factory(
        [Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n',
                     retry="{ max_attempts = 100, backoff_s = 0.2, max_backoff_s = 0.5 }")],
        extra=('[commitment]\nmode = "delivered"\nreport_retry_s = 0.5\n'
               f'modalities = {{ CT_OFF = {{ host = "127.0.0.1", port = {black_hole.port} }}, '
               f'CT1 = {{ host = "127.0.0.1", port = {modality.port} }} }}\n'))
    [image] = make_series(data("693_UNCR.dcm"), 1, tmp_path / "series")
    assert send(router.port, [image], calling_ae="CT1") == [0]
    silent = CommittingModality("CT_OFF")  # switched off: its reply address accepts and never answers
    for _ in range(4):
        assert silent.request(router.port, references([image]))[0] == 0x0000
    status, transaction = modality.request(router.port, references([image]))  # the newest of five
    assert status == 0x0000
    pacs.start()
    try:
        wait_until(lambda: modality.report(transaction), 15, what=f"CT1's report\n{router.log()}")
        report = modality.report(transaction)
        assert report.committed == [references([image])[0][1]] and not report.same_association
        wait_until(lambda: black_hole.connections() >= 1, 5, what="CT_OFF's reports tried meanwhile")
    finally:
        pacs.stop()
