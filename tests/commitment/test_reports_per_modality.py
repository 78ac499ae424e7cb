"""Storage commitment reports on new associations: each modality's on its own, so that a modality
whose reply address accepts TCP and never answers delays only its own reports. In-process
against pynetdicom modalities and a black hole (a listener that accepts and never answers), and
end to end through `dicom-router serve`."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from router.commitment.accept import accept_request
from router.commitment.messages import Transaction
from router.commitment.reporter import Reporter
from router.config import Commitment, ReplyAddress, Timeouts
from router.queue import Instance
from router.queue.sqlite import SqliteQueue
from tests.support.peers import (
    CommittingModality, Destination, Pacs, data, make_series, references, send, wait_until,
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
