"""The queue, tested directly: a job's states, at-least-once delivery, and what recovery does."""

from __future__ import annotations

import threading
import time

import pytest

from router.queue import Instance, NewJob
from router.request import Request
from tests.support.queues import backend  # noqa: F401 - the fixture: each test runs on SQLite and on PostgreSQL


@pytest.fixture
def queue(backend):  # noqa: F811
    return backend.open()


def instance(path: str = "/spool/a.dcm", uid: str = "2.25.1", received_at: float | None = None) -> Instance:
    return Instance(path=path, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=uid,
                    study_instance_uid="2.25.9", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="CT1",
                    called_ae="ROUTER", source_ip="127.0.0.1", size=1234,
                    received_at=time.time() if received_at is None else received_at)


def jobs(*names: str, syntax: str = "jpeg-ls-lossless") -> list[NewJob]:
    return [NewJob(name, Request(syntax=syntax), "tag1") for name in names]


def test_a_claimed_job_carries_the_request_decided_at_receipt(queue):
    queue.add(instance(), [NewJob("PACS", Request(syntax="jpeg-lossy", quality=80, fallback="rle"), "t")])
    [job] = queue.claim("PACS", 10)
    assert job.request == Request(syntax="jpeg-lossy", quality=80, fallback="rle")
    assert job.rules_tag == "t" and job.instance.sop_instance_uid == "2.25.1"
    assert queue.counts() == {("PACS", "in_flight"): 1}


def test_an_instance_stays_until_every_destination_is_done(queue):
    queue.add(instance(), jobs("PACS", "ARCHIVE"))
    [pacs] = queue.claim("PACS", 10)
    assert queue.complete([pacs.id]) == []  # ARCHIVE still needs the file
    [archive] = queue.claim("ARCHIVE", 10)
    assert queue.complete([archive.id]) == ["/spool/a.dcm"]
    assert queue.paths() == [] and queue.counts() == {}


def test_a_claimed_job_is_not_claimed_twice_by_concurrent_senders(queue):
    for index in range(200):
        queue.add(instance(f"/spool/{index}.dcm", f"2.25.{index}"), jobs("PACS"))
    claimed: list[int] = []
    lock = threading.Lock()

    def sender() -> None:
        while batch := queue.claim("PACS", 7):
            with lock:
                claimed.extend(job.id for job in batch)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(claimed) == 200 and len(set(claimed)) == 200


def test_retry_waits_until_due_and_counts_the_attempt(queue):
    queue.add(instance(), jobs("PACS"))
    [job] = queue.claim("PACS", 10)
    now = time.time()
    queue.retry(job.id, "destination answered 0xA700", now + 60)
    assert queue.claim("PACS", 10, now=now) == []
    assert queue.due_count("PACS", now=now) == 0 and queue.due_count("PACS", now=now + 61) == 1
    assert queue.next_due("PACS") == pytest.approx(now + 60)
    [again] = queue.claim("PACS", 10, now=now + 61)
    assert again.attempts == 1 and again.last_error == "destination answered 0xA700"


def test_release_puts_jobs_back_without_counting_an_attempt(queue):
    queue.add(instance(), jobs("PACS"))
    [job] = queue.claim("PACS", 10)
    queue.release([job.id])
    [again] = queue.claim("PACS", 10)
    assert again.id == job.id and again.attempts == 0


def test_dead_letters_are_kept_with_their_error_until_retried(queue):
    queue.add(instance(), jobs("PACS"))
    [job] = queue.claim("PACS", 10)
    queue.dead(job.id, "destination answered 0xC000 (permanent failure)")
    assert queue.claim("PACS", 10) == []
    [dead] = queue.jobs(state="dead")
    assert dead.last_error.startswith("destination answered 0xC000") and dead.attempts == 1
    assert queue.paths() == ["/spool/a.dcm"]  # the file is kept for the retry
    assert queue.retry_dead("PACS") == 1
    [again] = queue.claim("PACS", 10)
    assert again.attempts == 0


def test_recovery_resumes_what_a_crash_left_in_flight(queue, backend):  # noqa: F811
    queue.add(instance(), jobs("PACS"))
    queue.claim("PACS", 10)
    after_crash = backend.open()
    assert after_crash.recover() == 1
    assert [j.state for j in after_crash.claim("PACS", 10)] == ["pending"]


def test_jobs_whose_spool_file_vanished_become_dead_letters(queue):
    queue.add(instance("/spool/gone.dcm"), jobs("PACS"))
    assert queue.fail_missing_files(lambda path: False) == 1
    [dead] = queue.jobs(state="dead")
    assert dead.last_error == "spool file missing: /spool/gone.dcm"


def test_oldest_pending_is_the_age_of_the_oldest_undelivered_instance(queue):
    queue.add(instance(received_at=1000.0), jobs("PACS"))
    queue.add(instance("/spool/b.dcm", "2.25.2", received_at=1500.0), jobs("PACS"))
    assert queue.oldest_pending(now=2000.0) == {"PACS": 1000.0}


def test_a_request_from_an_older_router_still_reads(queue, backend):  # noqa: F811
    """Queues outlive upgrades: a request with a key this version does not know is read without it."""
    queue.add(instance(), jobs("PACS"))
    backend.execute(queue, "UPDATE jobs SET request = ?", '{"syntax":"rle","retired_option":1}')
    [job] = queue.claim("PACS", 10)
    assert job.request == Request(syntax="rle")


def test_versions_of_one_sop_instance_go_out_in_the_order_received(queue):
    """A corrected image resent while the destination was down must not overtake the first one."""
    queue.add(instance("/spool/v1.dcm", "2.25.7"), jobs("PACS", "ARCHIVE"))
    queue.add(instance("/spool/other.dcm", "2.25.8"), jobs("PACS"))
    queue.add(instance("/spool/v2.dcm", "2.25.7"), jobs("PACS", "ARCHIVE"))
    first = queue.claim("PACS", 10)
    assert [j.instance.path for j in first] == ["/spool/v1.dcm", "/spool/other.dcm"]
    [v1] = [j for j in first if j.instance.path == "/spool/v1.dcm"]
    now = time.time()
    queue.retry(v1.id, "destination answered 0xA700", now + 30)
    assert queue.claim("PACS", 10, now=now + 1) == []  # v2 waits for v1, even though v1 waits
    assert queue.due_count("PACS", now=now + 1) == 0
    assert queue.next_due("PACS") == pytest.approx(now + 30)
    assert [j.instance.path for j in queue.claim("ARCHIVE", 10)] == ["/spool/v1.dcm"]  # per destination
    [again] = queue.claim("PACS", 10, now=now + 31)
    assert again.instance.path == "/spool/v1.dcm"
    queue.complete([again.id])
    [v2] = queue.claim("PACS", 10, now=now + 31)
    assert v2.instance.path == "/spool/v2.dcm"


def test_a_dead_earlier_version_does_not_hold_the_later_one(queue):
    queue.add(instance("/spool/v1.dcm", "2.25.7"), jobs("PACS"))
    queue.add(instance("/spool/v2.dcm", "2.25.7"), jobs("PACS"))
    [v1] = queue.claim("PACS", 10)
    queue.dead(v1.id, "destination answered 0xC000 (permanent failure)")
    assert [j.instance.path for j in queue.claim("PACS", 10)] == ["/spool/v2.dcm"]
