"""What is due: windows, delay, stable studies and priority, at the queue's claim and in the
forwarder, against a clock the test moves."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from pydicom import dcmread

from router.receive.intake import SUCCESS, Received
from router.queue import HIGH, LOW, NORMAL, Holding, Instance, NewJob
from router.queue.sqlite import SqliteQueue
from router.request import Request
from router.rules import Context
from tests.support.peers import data, make_series, wait_until
from tests.forward.test_forwarder import Site
from tests.support.queues import backend  # noqa: F401 - the fixture

CT = data("693_UNCR.dcm")
ORIGINAL = '[[rule]]\nsyntax = "original"\n'


class Clock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self.now

    def set(self, now: float) -> None:
        with self._lock:
            self.now = now


@pytest.fixture
def queue(backend):  # noqa: F811 - on SQLite and on PostgreSQL
    return backend.open()


def add(queue, uid: str, received_at: float, study: str = "2.25.9", series: str = "2.25.91",  # noqa: ANN001
        series_number: int | None = 1, instance_number: int | None = 1, priority: int = NORMAL) -> None:
    queue.add(Instance(path=f"/spool/{uid}.dcm", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=uid,
                       study_instance_uid=study, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="CT1",
                       called_ae="ROUTER", source_ip="::1", size=1000, received_at=received_at,
                       series_instance_uid=series, series_number=series_number, instance_number=instance_number),
              [NewJob("PACS", Request(syntax="original"), "t", priority)])


def uids(jobs) -> list[str]:  # noqa: ANN001
    return [job.instance.sop_instance_uid for job in jobs]


# -- the queue's claim --------------------------------------------------------------------------------
def test_delay_holds_each_instance_until_its_receipt_plus_the_delay(queue):
    t0 = time.time()
    add(queue, "2.25.1", t0)
    add(queue, "2.25.2", t0 + 20, study="2.25.8")
    thirty_minutes = Holding(delay_s=1800)
    assert queue.claim("PACS", 10, now=t0 + 1799, holding=thirty_minutes) == []
    assert queue.next_due("PACS", thirty_minutes) == pytest.approx(t0 + 1800)
    assert queue.held("PACS", t0 + 1799, thirty_minutes) == {"delay": 2}
    assert queue.due_count("PACS", t0 + 1800, thirty_minutes) == 1
    assert uids(queue.claim("PACS", 10, now=t0 + 1800, holding=thirty_minutes)) == ["2.25.1"]
    assert uids(queue.claim("PACS", 10, now=t0 + 1820, holding=thirty_minutes)) == ["2.25.2"]


def test_a_study_waits_until_none_of_it_arrived_for_study_stable(queue):
    t0 = time.time()
    stable = Holding(study_stable_s=600)
    add(queue, "2.25.1", t0, instance_number=1)
    add(queue, "2.25.2", t0 + 300, instance_number=2)
    assert queue.claim("PACS", 10, now=t0 + 650, holding=stable) == []  # the second came 350 s ago
    assert queue.held("PACS", t0 + 650, stable) == {"study_stable": 2}
    add(queue, "2.25.3", t0 + 800, instance_number=3)  # a late one: the study waits again
    assert queue.next_due("PACS", stable) == pytest.approx(t0 + 1400)
    assert queue.claim("PACS", 10, now=t0 + 1399, holding=stable) == []
    assert uids(queue.claim("PACS", 10, now=t0 + 1400, holding=stable)) == ["2.25.1", "2.25.2", "2.25.3"]


def test_a_study_that_never_becomes_stable_goes_study_stable_max_after_its_first_instance_still_to_go(queue):
    t0 = time.time()
    bounded = Holding(study_stable_s=600, study_stable_max_s=1800)
    for n in range(6):  # an instance every 5 minutes: never 10 minutes quiet
        add(queue, f"2.25.{n}", t0 + 300 * n, instance_number=n)
    assert queue.claim("PACS", 10, now=t0 + 1799, holding=bounded) == []
    assert queue.held("PACS", t0 + 1799, bounded) == {"study_stable": 6}
    assert queue.next_due("PACS", bounded) == pytest.approx(t0 + 1800)
    assert queue.next_due("PACS", Holding(study_stable_s=600)) == pytest.approx(t0 + 2100)  # unbounded: stable only
    add(queue, "2.25.6", t0 + 1800, instance_number=6)
    sent = queue.claim("PACS", 10, now=t0 + 1800, holding=bounded)
    assert uids(sent) == [f"2.25.{n}" for n in range(7)]  # what had come by then, whole and in order
    add(queue, "2.25.7", t0 + 1850, instance_number=7)  # while those are on their way: the same wait, over
    late = queue.claim("PACS", 10, now=t0 + 1850, holding=bounded)
    assert uids(late) == ["2.25.7"]
    queue.complete([job.id for job in sent + late])
    add(queue, "2.25.8", t0 + 1900, instance_number=8)  # the study's first instance still to go: a new wait
    assert queue.claim("PACS", 10, now=t0 + 2499, holding=bounded) == []
    assert uids(queue.claim("PACS", 10, now=t0 + 2500, holding=bounded)) == ["2.25.8"]


def test_a_stable_study_goes_whole_in_series_and_instance_number_order(queue):
    t0 = time.time()
    arrival = [("2.25.23", 2, 3), ("2.25.11", 1, 1), ("2.25.22", 2, 2), ("2.25.13", 1, 3), ("2.25.21", 2, 1),
               ("2.25.12", 1, 2)]
    for index, (uid, series, number) in enumerate(arrival):
        add(queue, uid, t0 + index, series=f"2.25.9{series}", series_number=series, instance_number=number)
    add(queue, "2.25.99", t0 + 1, study="2.25.7")  # another study, stable at the same time
    claimed = queue.claim("PACS", 3, now=t0 + 700, holding=Holding(study_stable_s=600))
    claimed += queue.claim("PACS", 10, now=t0 + 700, holding=Holding(study_stable_s=600))
    assert uids(claimed) == ["2.25.11", "2.25.12", "2.25.13", "2.25.21", "2.25.22", "2.25.23", "2.25.99"]


def test_high_priority_overtakes_the_backlog_and_low_waits_for_it(queue):
    t0 = time.time()
    add(queue, "2.25.1", t0, study="2.25.81", priority=LOW)
    for n in range(2, 6):
        add(queue, f"2.25.{n}", t0, study=f"2.25.8{n}")
    add(queue, "2.25.6", t0, study="2.25.86", priority=HIGH)
    assert queue.due_count("PACS", priority=HIGH) == 1
    order = []
    while batch := queue.claim("PACS", 2):
        order += uids(batch)
    assert order == ["2.25.6", "2.25.2", "2.25.3", "2.25.4", "2.25.5", "2.25.1"]


def test_versions_of_one_instance_stay_in_order_whatever_their_priority(queue):
    t0 = time.time()
    add(queue, "2.25.1", t0, study="2.25.81")
    add(queue, "2.25.1", t0 + 1, study="2.25.81", priority=HIGH)
    [first] = queue.claim("PACS", 10)
    assert first.priority == NORMAL and queue.claim("PACS", 10) == []


def test_the_queue_columns_are_added_to_a_spool_made_before_them(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE instances (id INTEGER PRIMARY KEY, path TEXT NOT NULL, sop_class_uid TEXT NOT NULL, "
                     "sop_instance_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL DEFAULT '', "
                     "transfer_syntax_uid TEXT NOT NULL, calling_ae TEXT NOT NULL DEFAULT '', called_ae TEXT NOT "
                     "NULL DEFAULT '', source_ip TEXT NOT NULL DEFAULT '', size INTEGER NOT NULL, received_at REAL "
                     "NOT NULL); CREATE TABLE jobs (id INTEGER PRIMARY KEY, instance_id INTEGER NOT NULL, destination "
                     "TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL "
                     "NOT NULL, last_error TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL, request TEXT NOT NULL "
                     "DEFAULT '', rules_tag TEXT NOT NULL DEFAULT '');")
    db.execute("INSERT INTO instances VALUES (1, '/p', '1.2', '2.25.1', '2.25.9', '1.2.840.10008.1.2', '', '', '', "
               "1, 1.0)")
    db.execute("INSERT INTO jobs VALUES (1, 1, 'PACS', 'pending', 0, 1.0, '', 1.0, '', '')")
    db.commit()
    db.close()
    queue = SqliteQueue(path)
    [job] = queue.claim("PACS", 10)
    assert job.priority == NORMAL and job.instance.instance_number is None
    queue.close()


# -- intake: where a job's priority comes from ------------------------------------------------------
def test_a_c_store_sent_with_priority_high_is_a_high_priority_job(tmp_path, codec_pool):  # noqa: F811
    s = Site(tmp_path, codec_pool, 104, '[[rule]]\nname = "all"\nsyntax = "original"\npriority = "low"\n')
    files = make_series(CT, 2, tmp_path / "in")
    for path, priority in zip(files, (0, 1)):
        incoming = s.spool.incoming / path.name
        shutil.copyfile(path, incoming)
        ds = dcmread(path, stop_before_pixels=True)
        received = Received(incoming, str(ds.SOPClassUID), str(ds.SOPInstanceUID), Context("CT1", "ROUTER", "::1"),
                            priority=priority)
        assert s.intake.accept(received) == SUCCESS
    jobs = s.queue.jobs("PACS")
    assert [job.priority for job in jobs] == [LOW, HIGH]
    assert [job.instance.instance_number for job in jobs] == [1, 2]
    s.queue.close()


def test_a_rule_s_priority_is_the_job_s(tmp_path, codec_pool):  # noqa: F811
    s = Site(tmp_path, codec_pool, 104, '[[rule]]\nname = "er"\nmatch = { Modality = "CT" }\nsyntax = "original"\n'
                                        'priority = "high"\n')
    s.receive([CT])
    assert [job.priority for job in s.queue.jobs("PACS")] == [HIGH]
    s.queue.close()


# -- the forwarder ------------------------------------------------------------------------------------
def brussels(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=ZoneInfo("Europe/Brussels")).timestamp()


@pytest.fixture
def scheduled(tmp_path, codec_pool):  # noqa: F811
    made: list[Site] = []

    def make(port: int, extra: str, clock: Clock) -> Site:
        s = Site(tmp_path / f"site{len(made)}", codec_pool, port, ORIGINAL, extra)
        s.forwarder.clock = clock.time
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def test_outside_its_window_a_destination_is_sent_nothing_until_the_window_opens(scheduled, pacs):
    clock = Clock(brussels("2027-06-07 12:00"))  # a Monday noon (after the real time: jobs are queued at it)
    s = scheduled(pacs.port, 'schedule = ["Mon-Fri 19:00-07:00"]\ntimezone = "Europe/Brussels"\n', clock)
    s.receive([CT])
    s.forwarder.start()
    time.sleep(1.5)
    assert pacs.count() == 0 and s.queue.counts() == {("PACS", "pending"): 1}
    clock.set(brussels("2027-06-07 19:00"))
    wait_until(lambda: pacs.count() == 1, 20, what="delivery once the window opened")


def test_a_window_that_closes_stops_the_batch_after_the_instance_being_sent(scheduled, pacs_factory, tmp_path):
    pacs = pacs_factory(delay=0.4)
    clock = Clock(brussels("2027-06-08 06:58"))  # Tuesday morning: Monday night's window
    s = scheduled(pacs.port, 'schedule = ["Mon-Fri 19:00-07:00"]\ntimezone = "Europe/Brussels"\n', clock)
    s.receive(make_series(CT, 6, tmp_path / "series"))
    s.forwarder.start()
    wait_until(lambda: pacs.count() >= 1, 20, what="the first instance")
    clock.set(brussels("2027-06-08 07:00"))
    sent = pacs.count()
    time.sleep(2.0)
    assert pacs.count() <= sent + 1  # the one being sent finished; nothing more
    assert s.queue.counts().get(("PACS", "pending"), 0) >= 6 - (sent + 1)
    clock.set(brussels("2027-06-08 19:00"))
    wait_until(lambda: pacs.count() == 6, 30, what="the rest in the next window")


def test_delay_holds_in_the_forwarder_without_busy_waiting(scheduled, pacs, tmp_path):
    t0 = time.time()
    clock = Clock(t0)
    s = scheduled(pacs.port, 'delay = "1h"\n', clock)
    s.receive([CT])
    claims = []
    original = s.queue.claim
    s.queue.claim = lambda *a, **k: claims.append(1) or original(*a, **k)
    s.forwarder.start()
    time.sleep(1.5)
    assert pacs.count() == 0
    assert len(claims) <= 4  # it sleeps until the job is due (at most a second at a time)
    clock.set(t0 + 3601)
    wait_until(lambda: pacs.count() == 1, 20, what="delivery an hour after receipt")


def test_a_high_priority_instance_overtakes_a_batch_being_sent(scheduled, pacs_factory, tmp_path):
    pacs = pacs_factory(delay=0.3)
    s = scheduled(pacs.port, "batch_size = 50\n", Clock(time.time()))
    backlog = make_series(CT, 8, tmp_path / "backlog")
    s.receive(backlog)
    s.forwarder.clock = time.time
    s.forwarder.start()
    wait_until(lambda: pacs.count() >= 1, 20, what="the backlog started")
    urgent = make_series(CT, 1, tmp_path / "urgent")[0]
    incoming = s.spool.incoming / "urgent.dcm"
    shutil.copyfile(urgent, incoming)
    ds = dcmread(urgent, stop_before_pixels=True)
    assert s.intake.accept(Received(incoming, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                    Context("ER", "ROUTER", "::1"), priority=1)) == SUCCESS
    wait_until(lambda: pacs.count() == 9, 30, what="everything")
    order = [r.sop_instance_uid for r in pacs.received]
    assert order.index(str(ds.SOPInstanceUID)) <= 3, order



def test_the_forwarder_sends_a_study_once_stable_whole_and_in_instance_order(scheduled, pacs, tmp_path):
    t0 = time.time()
    clock = Clock(t0)
    s = scheduled(pacs.port, 'study_stable = "10m"\n', clock)
    series = make_series(CT, 4, tmp_path / "series")
    s.receive([series[2], series[0], series[3]])  # received at the real time, as intake stamps it
    s.forwarder.start()
    time.sleep(2.0)
    s.receive([series[1]])  # a late instance: the study waits again, from its receipt
    late = time.time()
    clock.set(t0 + 601)  # the first three alone would be stable by now
    time.sleep(1.5)
    assert pacs.count() == 0
    clock.set(late + 601)
    wait_until(lambda: pacs.count() == 4, 20, what="the stable study")
    expected = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series]
    assert [r.sop_instance_uid for r in pacs.received] == expected


def test_the_forwarder_sends_a_study_still_receiving_once_study_stable_max_passed(scheduled, pacs, tmp_path):
    t0 = time.time()
    clock = Clock(t0)
    s = scheduled(pacs.port, 'study_stable = "10m"\nstudy_stable_max = "10m"\n', clock)
    series = make_series(CT, 3, tmp_path / "series")
    s.receive([series[0]])
    first = time.time()
    s.forwarder.start()
    time.sleep(2.0)
    s.receive([series[1]])  # the study is still receiving: stable 10 minutes after this one at the earliest
    clock.set(first + 590)
    time.sleep(1.5)
    assert pacs.count() == 0
    clock.set(first + 601)  # not stable (the second came less than 10 minutes ago), but 10 minutes after the first
    wait_until(lambda: pacs.count() == 2, 20, what="the study sent at study_stable_max")
    wait_until(lambda: s.queue.counts() == {}, 10, what="both jobs recorded as delivered")
    s.receive([series[2]])  # a later instance of the study starts a wait of its own
    time.sleep(1.5)
    assert pacs.count() == 2
    expected = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series[:2]]
    assert [r.sop_instance_uid for r in pacs.received] == expected


def test_a_batch_keeps_its_claimed_order_across_sop_classes():
    from types import SimpleNamespace

    from router.forward.dimse import groups as _groups

    def item(uid: str, sop_class: str):  # noqa: ANN202
        instance = SimpleNamespace(sop_class_uid=sop_class, calling_ae="CT1", sop_instance_uid=uid)
        return SimpleNamespace(job=SimpleNamespace(instance=instance), possible={"1.2.840.10008.1.2.4.80"})

    ct, sr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.67"
    batch = [item("1", ct), item("2", sr), item("3", ct)]
    assert [[i.job.instance.sop_instance_uid for i in g] for g in _groups(batch)] == [["1", "2", "3"]]
    many = [item(str(n), f"1.2.3.{n}") for n in range(60)]  # 3 contexts each: 42 per association
    assert [len(g) for g in _groups(many)] == [42, 18]
