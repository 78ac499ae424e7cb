"""What a slow, silent, oversized or broken caller can make a receiving process do: nothing that
stops a real modality. Request and PDU deadlines, the PDU size bound, connections on their way
in kept apart from the associations, and data sets that cannot (or must not) be written to the
spool answered with a failure status, leaving no file behind.

The router runs as a subprocess where only the whole process shows the behaviour; the
receiving side (`scp.Receiver` with a real `Intake`) runs in this process where a test needs to
look inside the spool while a transfer is under way.
"""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from router.compat.pynetdicom import park_reactor, stream_datasets_to_files
from router.config import Listen
from router.receive.intake import Intake
from router.queue.sqlite import SqliteQueue
from router.receive.scp import Receiver
from router.queue.spool import Spool
from tests.support.peers import Destination, data, echo, free_port, metric_value, send, wait_until

RULE = '[[rule]]\nsyntax = "original"\n'
MIB = 1024 * 1024


# -- raw callers ------------------------------------------------------------------------------------
def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the other end closes `sock` within `within` seconds (whatever it sends first)."""
    deadline = time.monotonic() + within
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


class Trickle(threading.Thread):
    """Sends `head`, then one byte every `interval` seconds, until the peer closes or `limit` s."""

    def __init__(self, sock: socket.socket, head: bytes, interval: float = 0.25, limit: float = 20) -> None:
        super().__init__(daemon=True)
        self.sock, self.head, self.interval, self.limit = sock, head, interval, limit
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        try:
            self.sock.sendall(self.head)
            while time.monotonic() < deadline:
                time.sleep(self.interval)
                self.sock.send(b"\x00")
        except OSError:
            pass


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BxL", pdu_type, length)


def associate(port: int, max_pdu: int = 16384):  # noqa: ANN201 - a pynetdicom Association
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER", max_pdu=max_pdu)
    assert assoc.is_established
    return assoc


def rejected(router, reason: str) -> float:  # noqa: ANN001
    return metric_value(router.metrics(), "dicom_router_rejected_total", reason=reason)


# -- the router as a whole ------------------------------------------------------------------------------
def test_silent_and_trickling_callers_are_closed_after_request_timeout_s(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)], listen_extra="request_timeout_s = 1\nprocesses = 1")
    silent = connect(router.port)
    trickling = connect(router.port)
    Trickle(trickling, pdu_header(0x01, 400))  # an A-ASSOCIATE-RQ that never ends
    try:
        started = time.monotonic()
        assert closed_by_peer(silent, 4) and closed_by_peer(trickling, 4)
        assert time.monotonic() - started < 4
    finally:
        silent.close()
        trickling.close()
    wait_until(lambda: rejected(router, "timeout") == 2, 5, what="two request timeouts counted")
    closed = [line for line in router.log().splitlines() if '"event": "connection_closed"' in line]
    assert len(closed) == 2 and all('"cause": "request_timeout"' in line for line in closed), closed
    assert send(router.port, [data("693_UNCR.dcm")]) == [0]


def test_callers_on_their_way_in_never_lock_out_a_modality(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)],
                            listen_extra="max_associations = 2\nprocesses = 1\nrequest_timeout_s = 4")
    waiting = [connect(router.port) for _ in range(4)]
    for sock in waiting[2:]:
        Trickle(sock, pdu_header(0x01, 400))
    try:
        started = time.monotonic()
        assert send(router.port, [data("693_UNCR.dcm")]) == [0]
        assert echo(router.port)
        assert time.monotonic() - started < 3.5  # before any of them timed out
        # beyond max_associations connections on their way in, the one waiting longest is closed
        assert sum(closed_by_peer(sock, 0.2) for sock in waiting) >= 2
        assert all(closed_by_peer(sock, 6) for sock in waiting)  # the others at request_timeout_s
    finally:
        for sock in waiting:
            sock.close()
    wait_until(lambda: rejected(router, "busy") + rejected(router, "timeout") == 4, 5,
               what="the four callers counted as closed")
    assert rejected(router, "busy") >= 2
    wait_until(lambda: pacs.count() == 1, 20, what="the modality's image at the PACS")


def test_a_pdu_that_trickles_is_closed_after_pdu_timeout_s(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)], listen_extra="pdu_timeout_s = 1\nprocesses = 1")
    assoc = associate(router.port)
    started = time.monotonic()
    Trickle(assoc.dul.socket.socket, pdu_header(0x04, 1000))
    wait_until(lambda: not assoc.is_established, 4, what="the router closing the trickling association")
    assert time.monotonic() - started < 4
    wait_until(lambda: rejected(router, "timeout") == 1, 5, what="a PDU timeout counted")
    assert '"cause": "pdu_timeout"' in router.log()
    assert echo(router.port)


def test_a_pdu_declared_larger_than_max_pdu_aborts_the_association_before_it_is_read(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)], listen_extra="max_pdu = 16384\nprocesses = 1")
    assoc = associate(router.port)
    assoc.dul.socket.socket.sendall(pdu_header(0x04, 512 * MIB))
    wait_until(lambda: assoc.is_aborted, 3, what="an A-ABORT from the router")
    wait_until(lambda: rejected(router, "too_large") == 1, 5, what="the oversized PDU counted")
    assert '"cause": "pdu_too_large"' in router.log()
    assert send(router.port, [data("693_UNCR.dcm")]) == [0]


def test_a_message_too_large_to_hold_in_memory_aborts_the_association(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, RULE)], listen_extra="processes = 1")
    assoc = associate(router.port)
    fragment = bytes(60000)  # a command set that never ends: pynetdicom would hold all of it
    pdv = struct.pack(">LBB", 2 + len(fragment), assoc.accepted_contexts[0].context_id, 0x01) + fragment
    sock = assoc.dul.socket.socket
    sock.settimeout(10)
    try:
        for _ in range(100):  # 6 MB
            sock.sendall(pdu_header(0x04, len(pdv)) + pdv)
    except OSError:
        pass  # closed by the router
    wait_until(lambda: assoc.is_aborted, 5, what="an A-ABORT from the router")
    wait_until(lambda: rejected(router, "too_large") == 1, 5, what="the message counted as too large")
    assert '"cause": "message_too_large"' in router.log()
    assert echo(router.port)


# -- the receiving side, in this process ------------------------------------------------------------------
class BudgetSpool(Spool):
    """A spool on a filesystem of `budget` bytes: free space is what the spool's files leave."""

    def __init__(self, root: Path, min_free_mb: int, budget: int) -> None:
        super().__init__(root, min_free_mb)
        self.budget = budget

    def free_bytes(self) -> int:
        used = 0
        for path in self.root.rglob("*"):
            try:
                used += path.stat().st_size if path.is_file() else 0
            except OSError:
                pass  # removed meanwhile
        return self.budget - used


@pytest.fixture
def receiving(tmp_path):
    """Starts a `Receiver` on a `BudgetSpool` (floor 1 MiB); yields a function of the budget."""
    saved = (_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir)
    started: list[tuple[Receiver, SqliteQueue]] = []

    def start(budget: int = 1 << 40) -> tuple[Receiver, BudgetSpool]:
        spool = BudgetSpool(tmp_path / "spool", 1, budget)
        queue = SqliteQueue(tmp_path / "queue.sqlite")
        stream_datasets_to_files(spool.incoming)
        listen = Listen(host="127.0.0.1", port=free_port(), max_pdu=65536, processes=1)
        receiver = Receiver(listen, Intake(spool, queue, lambda: []))
        receiver.start()
        started.append((receiver, queue))
        return receiver, spool

    yield start
    for receiver, queue in started:
        receiver.stop()
        queue.close()
    _config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = saved


def incoming(spool: Spool) -> list[Path]:
    return list(spool.incoming.iterdir())


def store_request(ds: Dataset, sop_instance_uid: str | None = None) -> C_STORE_RQ:
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID if sop_instance_uid is None else sop_instance_uid
    req.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    return message


def storage_association(port: int, ds: Dataset):  # noqa: ANN201 - a pynetdicom Association
    ae = AE(ae_title="MODALITY")
    ae.dimse_timeout = 10
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER")
    assert assoc.is_established
    return assoc


def context_id(assoc, ds: Dataset) -> int:  # noqa: ANN001
    return next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID)


def explicit(name: str) -> Dataset:
    ds = dcmread(data(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_an_aborted_transfer_leaves_no_file_and_does_not_hold_the_floor(receiving):
    big, good = explicit("RG1_UNCR.dcm"), explicit("693_UNCR.dcm")
    partial = 3 * MIB
    good_size = len(encode(good, False, True))
    # room for the partial data set and half the good one above the floor: were the partial
    # file kept, the good instance would push the spool below its floor
    receiver, spool = receiving(budget=MIB + partial + good_size // 2)
    assoc = storage_association(receiver.port, big)
    sent = 0
    for p_data in store_request(big).encode_msg(context_id(assoc, big), assoc.acceptor.maximum_length):
        assoc.dul.send_pdu(p_data)
        sent += sum(len(pdv) - 1 for _, pdv in p_data.presentation_data_value_list if not pdv[0] & 1)
        if sent >= partial:
            break
    wait_until(lambda: sum(p.stat().st_size for p in incoming(spool)) >= partial, 5, what="the partial file")
    assoc.abort()
    wait_until(lambda: not incoming(spool), 5, what="the partial file removed once the association ended")

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(good.SOPClassUID, ExplicitVRLittleEndian)
    after = ae.associate("127.0.0.1", receiver.port, ae_title="ROUTER")
    try:
        assert after.send_c_store(good).Status == 0x0000
    finally:
        after.release()


def test_a_data_set_crossing_the_floor_is_refused_while_it_arrives(receiving):
    big = explicit("RG1_UNCR.dcm")  # 7 MB
    receiver, spool = receiving(budget=MIB + 2 * MIB)
    largest = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            largest[0] = max([largest[0], *(p.stat().st_size for p in incoming(spool) if p.exists())])
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assoc = storage_association(receiver.port, big)
    try:
        assert assoc.send_c_store(big).Status == 0xA700
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        done.set()
        watcher.join(5)
        assoc.release()
    assert largest[0] < 4 * MIB, f"the spool took {largest[0]} bytes of a data set refused at its floor"
    assert not incoming(spool)


@pytest.mark.parametrize("uid", ["", "\x00"], ids=["empty", "nul"])
def test_a_c_store_without_an_affected_sop_instance_uid_is_refused_and_the_association_goes_on(receiving, uid):
    receiver, spool = receiving()
    ds = explicit("693_UNCR.dcm")
    assoc = storage_association(receiver.port, ds)
    try:
        park_reactor(assoc)
        for p_data in store_request(ds, uid).encode_msg(context_id(assoc, ds), assoc.acceptor.maximum_length):
            assoc.dul.send_pdu(p_data)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        assert 0xC000 <= rsp.Status <= 0xCFFF
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
    assert not incoming(spool)
