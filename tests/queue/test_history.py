"""The history: every job's outcome is kept after it finished, found by study, series or either
SOP Instance UID, written with the queue change, pruned after history_days."""

from __future__ import annotations

import time

import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLSNearLossless

from router.queue import NOT_FORWARDED, Delivery, Instance, NewJob
from router.queue import sqlite as sqlite_queue
from router.queue.sqlite import SqliteQueue
from router.request import Outcome, Request
from tests.support.peers import data, make_series, wait_until
from tests.forward.test_forwarder import site  # noqa: F401 - a fixture
from tests.support.queues import backend  # noqa: F401 - the fixture

CT = data("693_UNCR.dcm")


@pytest.fixture
def queue(backend):  # noqa: F811 - on SQLite and on PostgreSQL
    return backend.open()


def instance(uid: str = "2.25.1", study: str = "2.25.100", series: str = "2.25.200", size: int = 1000) -> Instance:
    return Instance(path=f"/spool/{uid}.dcm", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=uid,
                    study_instance_uid=study, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="CT1",
                    called_ae="ROUTER", source_ip="127.0.0.1", size=size, received_at=1000.0,
                    series_instance_uid=series)


def test_a_delivered_job_leaves_its_outcome_syntax_sizes_attempts_and_times(queue):
    queue.add(instance(), [NewJob("PACS", Request(syntax="jpeg-ls-lossless"), "t")])
    [job] = queue.claim("PACS", 10)
    queue.retry(job.id, "destination answered 0xA700", 0)
    [job] = queue.claim("PACS", 10)
    before = time.time()
    queue.complete([Delivery(job.id, Outcome.DELIVERED, syntax="jpeg-ls-lossless",
                             transfer_syntax_uid="1.2.840.10008.1.2.4.80", sent_size=400, ratio=2.5)])
    [row] = queue.history(sop="2.25.1")
    assert (row.destination, row.outcome, row.syntax, row.transfer_syntax_uid) == (
        "PACS", "delivered", "jpeg-ls-lossless", "1.2.840.10008.1.2.4.80")
    assert (row.received_size, row.sent_size, row.ratio, row.attempts) == (1000, 400, 2.5, 2)
    assert row.last_error == "destination answered 0xA700"
    assert row.received_at == 1000.0 and row.finished_at >= before
    assert (row.study_instance_uid, row.series_instance_uid, row.sop_class_uid, row.calling_ae) == (
        "2.25.100", "2.25.200", "1.2.840.10008.5.1.4.1.1.2", "CT1")
    assert row.sent_sop_instance_uid == ""


def test_dead_letters_and_skips_are_history_too(queue):
    queue.add(instance(), [NewJob("PACS", Request(syntax="original"), "t"), NewJob("ARCHIVE", Request(syntax="rle"), "t")])
    [pacs] = queue.claim("PACS", 10)
    [archive] = queue.claim("ARCHIVE", 10)
    queue.dead(pacs.id, "destination answered 0xC000 (permanent failure)")
    queue.complete([Delivery(archive.id, Outcome.SKIPPED, note="rule 'no CT' says skip")])
    rows = {row.destination: row for row in queue.history(study="2.25.100")}
    assert rows["PACS"].outcome == "dead" and rows["PACS"].attempts == 1
    assert rows["PACS"].last_error == "destination answered 0xC000 (permanent failure)"
    assert rows["ARCHIVE"].outcome == "skipped" and rows["ARCHIVE"].last_error == "rule 'no CT' says skip"
    assert rows["ARCHIVE"].sent_size is None


def test_an_instance_no_destination_wants_is_history_as_not_forwarded(queue):
    queue.add(instance(), [])
    assert queue.paths() == [] and queue.counts() == {}
    [row] = queue.history(series="2.25.200")
    assert row.outcome == NOT_FORWARDED and row.destination == ""


def test_history_is_found_by_study_series_or_either_sop_instance_uid(queue):
    queue.add(instance("2.25.1"), [NewJob("PACS", Request(syntax="jpeg-lossy"), "t")])
    queue.add(instance("2.25.2", series="2.25.201"), [NewJob("PACS", Request(syntax="original"), "t")])
    queue.add(instance("2.25.3", study="2.25.101", series="2.25.202"), [])
    first, second = queue.claim("PACS", 10)
    queue.complete([Delivery(first.id, syntax="jpeg-lossy", sent_sop_instance_uid="2.25.1001"),
                    Delivery(second.id, syntax="original")])
    assert [r.sop_instance_uid for r in queue.history(study="2.25.100")] == ["2.25.1", "2.25.2"]
    assert [r.sop_instance_uid for r in queue.history(series="2.25.201")] == ["2.25.2"]
    assert [r.sent_sop_instance_uid for r in queue.history(sop="2.25.1001")] == ["2.25.1001"]  # the sent UID
    assert [r.sop_instance_uid for r in queue.history(sop="2.25.1")] == ["2.25.1"]  # the received one
    assert [r.sop_instance_uid for r in queue.history(study="2.25.101", sop="2.25.3")] == ["2.25.3"]
    assert len(queue.history(limit=2)) == 2


def test_history_older_than_history_days_is_pruned_at_most_once_an_hour(tmp_path, monkeypatch):
    queue = SqliteQueue(tmp_path / "queue.sqlite", history_days=2)
    now = [1_000_000.0]
    monkeypatch.setattr(sqlite_queue.time, "time", lambda: now[0])
    start = now[0]
    queue.add(instance("2.25.1"), [])
    now[0] = start + 1.5 * 86400
    queue.add(instance("2.25.2"), [])
    now[0] = start + 3.5 * 86400 - 600  # the first is past 2 days, the second 10 minutes short of it
    queue.add(instance("2.25.3"), [])
    assert [r.sop_instance_uid for r in queue.history()] == ["2.25.2", "2.25.3"]
    now[0] += 1200  # the second is past 2 days too, but the queue pruned 20 minutes ago
    queue.add(instance("2.25.4"), [])
    assert [r.sop_instance_uid for r in queue.history()] == ["2.25.2", "2.25.3", "2.25.4"]
    now[0] += 3600
    queue.add(instance("2.25.5"), [])
    assert [r.sop_instance_uid for r in queue.history()] == ["2.25.3", "2.25.4", "2.25.5"]
    queue.close()


def test_a_queue_database_of_an_earlier_version_gains_the_series_column(tmp_path):
    import sqlite3

    path = tmp_path / "queue.sqlite"
    db = sqlite3.connect(path)
    db.execute(  # the instances table as the first release made it
        "CREATE TABLE instances (id INTEGER PRIMARY KEY, path TEXT NOT NULL, sop_class_uid TEXT NOT NULL, "
        "sop_instance_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL DEFAULT '', transfer_syntax_uid TEXT NOT NULL, "
        "calling_ae TEXT NOT NULL DEFAULT '', called_ae TEXT NOT NULL DEFAULT '', source_ip TEXT NOT NULL DEFAULT '', "
        "size INTEGER NOT NULL, received_at REAL NOT NULL)")
    db.commit()
    db.close()
    queue = SqliteQueue(path)
    queue.add(instance(), [NewJob("PACS", Request(syntax="original"), "t")])
    [job] = queue.claim("PACS", 10)
    assert job.instance.series_instance_uid == "2.25.200"
    queue.close()


def test_a_lossy_copy_maps_the_received_uid_to_the_one_sent(site, pacs, tmp_path):  # noqa: F811
    s = site(pacs.port, '[[rule]]\nsyntax = "jpeg-ls-near-lossless"\nnear = 2\n')
    [source] = make_series(CT, 1, tmp_path / "series")
    s.receive([source])
    s.forwarder.start()
    wait_until(lambda: pacs.count() == 1, 30, what="delivery")
    received_uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    wait_until(lambda: s.queue.history(sop=received_uid), 10, what="the history row")
    [row] = s.queue.history(sop=received_uid)
    [at_pacs] = pacs.received
    assert at_pacs.transfer_syntax_uid == JPEGLSNearLossless
    assert row.outcome == "delivered" and row.syntax == "jpeg-ls-near-lossless"
    assert row.sent_sop_instance_uid == at_pacs.sop_instance_uid != received_uid
    assert s.queue.history(sop=at_pacs.sop_instance_uid) == [row]
    assert row.series_instance_uid == str(dcmread(source, stop_before_pixels=True).SeriesInstanceUID)
    assert row.sent_size and row.sent_size < row.received_size
    assert row.ratio and row.ratio > 1
