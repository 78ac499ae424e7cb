"""Deliveries committed without an fsync: their spool files stay until a sync made them durable,
and a process killed right after such a commit has still recorded the delivery."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from router.queue import Delivery, Instance, NewJob
from router.queue.spool import LateRemoval, Spool
from router.queue.sqlite import SqliteQueue
from router.request import Request
from tests.support.peers import REPO
from tests.support.queues import backend  # noqa: F401 - each test runs on SQLite and on PostgreSQL


def spooled(spool: Spool, name: str = "a") -> str:
    incoming = spool.incoming / f"{name}.part"
    incoming.write_bytes(b"instance " + name.encode())
    return str(spool.accept(incoming))


def instance(path: str, uid: str = "2.25.1") -> Instance:
    return Instance(path=path, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=uid,
                    study_instance_uid="2.25.9", transfer_syntax_uid="1.2.840.10008.1.2.1",
                    calling_ae="CT1", called_ae="ROUTER", source_ip="127.0.0.1", size=10, received_at=1.0)


def test_a_file_freed_by_a_delivery_goes_only_after_the_queue_synced(backend, tmp_path):  # noqa: F811
    queue, spool = backend.open(), Spool(tmp_path / "spool")
    path = spooled(spool)
    queue.add(instance(path), [NewJob("PACS", Request(syntax="original"), "t")])
    [job] = queue.claim("PACS", 10)
    present_at_sync = []

    def sync() -> None:
        present_at_sync.append(spool.instances.joinpath(path).exists())
        queue.sync()

    removal = LateRemoval(spool, sync, interval_s=3600)
    removal.remove(queue.complete([Delivery(job.id)], durable=False))
    assert queue.counts() == {}
    assert list(spool.instances.iterdir()) != [], "removed before the delivery was durable"
    removal.close()
    assert present_at_sync == [True]
    assert list(spool.instances.iterdir()) == []


def test_files_wait_while_the_queue_cannot_sync_and_go_once_it_can(tmp_path):
    queue, spool = SqliteQueue(tmp_path / "queue.sqlite"), Spool(tmp_path / "spool")
    paths = [spooled(spool, n) for n in "abc"]
    failing = [True]

    def sync() -> None:
        if failing[0]:
            raise OSError(5, "Input/output error")
        queue.sync()

    removal = LateRemoval(spool, sync, interval_s=3600)
    removal.remove(paths)
    with pytest.raises(OSError):
        removal.flush()
    assert len(list(spool.instances.iterdir())) == 3
    failing[0] = False
    removal.close()
    assert list(spool.instances.iterdir()) == []
    queue.close()


def test_a_delivery_committed_without_fsync_survives_the_process_being_killed(tmp_path):
    db = tmp_path / "queue.sqlite"
    queue = SqliteQueue(db)
    queue.add(instance(str(tmp_path / "a.dcm")), [NewJob("PACS", Request(syntax="original"), "t")])
    queue.close()
    script = textwrap.dedent(f"""
        import os, signal
        from router.queue import Delivery
        from router.queue.sqlite import SqliteQueue
        queue = SqliteQueue({str(db)!r})
        [job] = queue.claim("PACS", 10)
        queue.complete([Delivery(job.id)], durable=False)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60)
    assert result.returncode == -9
    reopened = SqliteQueue(db)
    reopened.recover()
    assert reopened.counts() == {} and reopened.claim("PACS", 10) == []
    reopened.close()

