"""Several nodes on one PostgreSQL queue: leases, takeover, a stale owner's late word, each
node's own recovery, node names, association slots and the schema version.

Lease expiry is made to happen by moving a lease's end into the past in the database (the
database's clock is the one leases are read against), never by waiting."""

from __future__ import annotations

import threading

import psycopg
import pytest

from router.queue import NodeNameInUse
from router.queue.postgres import SCHEMA_VERSION, PostgresQueue, SchemaTooNew
from tests.queue.test_queue import instance, jobs

pytestmark = pytest.mark.postgres


@pytest.fixture
def cluster(postgres_url):
    opened: list[PostgresQueue] = []

    def node(name: str, **kwargs) -> PostgresQueue:
        queue = PostgresQueue(postgres_url, node=name, **kwargs)
        opened.append(queue)
        return queue

    yield node
    for queue in opened:
        queue.shutdown()


def expire_leases(url: str, node: str) -> None:
    """What a node that stopped renewing its leases for lease_s leaves behind."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("UPDATE jobs SET lease_until = 0 WHERE owner = %s", (node,))
        db.execute("UPDATE nodes SET heartbeat_at = 0 WHERE name = %s", (node,))


def test_nodes_claiming_at_once_never_get_the_same_job(cluster):
    a, b, c = cluster("a"), cluster("b"), cluster("c")
    for index in range(300):
        a.add(instance(f"/spool/{index}.dcm", f"2.25.{index}"), jobs("PACS"))
    claimed: list[int] = []
    lock = threading.Lock()

    def sender(queue: PostgresQueue) -> None:
        while batch := queue.claim("PACS", 5):
            with lock:
                claimed.extend(job.id for job in batch)

    threads = [threading.Thread(target=sender, args=(q,)) for q in (a, b, c, a, b, c)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(claimed) == 300 and len(set(claimed)) == 300


def test_a_live_lease_is_renewed_and_not_taken_over(cluster, postgres_url):
    a, b = cluster("a", lease_s=30), cluster("b", lease_s=30)
    a.register(), b.register()
    a.add(instance(), jobs("PACS"))
    [job] = a.claim("PACS", 10)
    assert b.claim("PACS", 10) == []
    assert a.heartbeat() == 1  # one job held, its lease renewed
    held = {n.name: (n.jobs_held, n.alive) for n in b.nodes()}
    assert held == {"a": (1, True), "b": (0, True)}


def test_a_dead_node_s_jobs_are_taken_over_once_its_lease_expires(cluster, postgres_url):
    a, b = cluster("a"), cluster("b")
    a.register(), b.register()
    a.add(instance(), jobs("PACS"))
    [job] = a.claim("PACS", 10)
    assert b.claim("PACS", 10) == []
    assert b.next_due("PACS") is not None  # b knows when a's lease runs out: it does not sleep past it
    expire_leases(postgres_url, "a")
    [taken] = b.claim("PACS", 10)
    assert taken.id == job.id and taken.taken_over_from == "a"
    assert {n.name: n.alive for n in b.nodes()} == {"a": False, "b": True}
    # the first owner comes back and says it failed, or gives the job back: it is not its job any more
    a.retry(job.id, "destination answered 0xA700", 0)
    a.release([job.id])
    a.dead(job.id, "destination answered 0xC000")
    assert b.jobs(state="in_flight")[0].id == job.id and b.history() == []
    # ... but what it delivered stays delivered, and the taker finds the job gone
    assert a.complete([job.id]) == ["/spool/a.dcm"]
    assert b.complete([taken.id]) == []
    assert [h.outcome for h in b.history()] == ["delivered"]


def test_a_restarting_node_recovers_its_own_jobs_only(cluster):
    a, b = cluster("a"), cluster("b")
    for index in range(4):
        a.add(instance(f"/spool/{index}.dcm", f"2.25.{index}"), jobs("PACS"))
    a_jobs = a.claim("PACS", 2)
    b_jobs = b.claim("PACS", 2)
    a_again = cluster("a")  # node a restarted after a crash
    assert a_again.recover() == 2
    states = {j.id: j.state for j in b.jobs()}
    assert all(states[j.id] == "pending" for j in a_jobs)
    assert all(states[j.id] == "in_flight" for j in b_jobs)  # b is alive: its work is untouched


def test_a_node_checks_only_its_own_receipts_for_missing_files(cluster):
    a, b = cluster("a"), cluster("b")
    a.add(instance("/spool/a.dcm", "2.25.1"), jobs("PACS"))
    b.add(instance("/spool/b.dcm", "2.25.2"), jobs("PACS"))
    assert a.fail_missing_files(lambda path: False) == 1
    assert {j.instance.path: j.state for j in b.jobs()} == {"/spool/a.dcm": "dead", "/spool/b.dcm": "pending"}


def test_a_second_live_node_with_the_same_name_is_refused(cluster, postgres_url):
    cluster("a").register()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE nodes SET host = 'elsewhere' WHERE name = 'a'")
    with pytest.raises(NodeNameInUse, match="node name 'a' is in use by a live node"):
        cluster("a").register()
    expire_leases(postgres_url, "a")  # that node died: its name is free again
    cluster("a").register()


def test_association_slots_hold_for_the_whole_cluster(cluster):
    a, b = cluster("a"), cluster("b")
    first, second = a.take_slot("PACS", 2), b.take_slot("PACS", 2)
    assert first is not None and second is not None
    assert a.take_slot("PACS", 2) is None and b.take_slot("PACS", 2) is None
    assert a.take_slot("OTHER", 2) is not None  # per destination
    second.give()
    third = a.take_slot("PACS", 2)
    assert third is not None
    first.give(), third.give()


def test_a_dead_node_s_slots_are_freed_with_its_connections(cluster, postgres_url):
    a = cluster("a")
    slot = a.take_slot("PACS", 1)
    assert cluster("b").take_slot("PACS", 1) is None
    with psycopg.connect(postgres_url, autocommit=True) as db:  # the node's process is gone
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND pid IS NOT NULL")
    assert cluster("b").take_slot("PACS", 1) is not None
    slot.give()  # idempotent on a connection already gone


def test_a_schema_newer_than_the_router_knows_is_refused(cluster, postgres_url):
    cluster("a")
    with psycopg.connect(postgres_url, autocommit=True) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}"):
        cluster("b")


def test_nodes_starting_together_create_the_schema_once(postgres_url):
    errors: list[Exception] = []
    opened: list[PostgresQueue] = []

    def start(name: str) -> None:
        try:
            opened.append(PostgresQueue(postgres_url, node=name))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(f"n{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for queue in opened:
        queue.shutdown()
    assert errors == [] and len(opened) == 4


def test_check_says_whether_the_queue_database_is_usable(postgres_url, tmp_path):
    from tests.support.peers import free_port
    from tests.operate.test_check import DEST, run_check, write

    cfg = write(tmp_path, DEST + '[[rule]]\nsyntax = "original"\n',
                f'[queue]\nurl = "{postgres_url}"\nnode = "router-a"\n')
    result = run_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queue: node router-a on PostgreSQL 1" in result.stdout and "empty: the router creates its schema" \
        in result.stdout
    PostgresQueue(postgres_url, node="router-a").shutdown()
    assert f"schema version {SCHEMA_VERSION}, 0 node(s) known" in run_check(cfg).stdout
    unreachable = write(tmp_path, DEST + '[[rule]]\nsyntax = "original"\n',
                        f'[queue]\nurl = "postgresql://router@127.0.0.1:{free_port()}/router"\n')
    result = run_check(unreachable)
    assert result.returncode == 1 and "queue: cannot use 127.0.0.1" in result.stdout, result.stdout


def test_a_node_name_must_be_a_plain_word(tmp_path):
    from tests.operate.test_check import DEST, run_check, write

    cfg = write(tmp_path, DEST + '[[rule]]\nsyntax = "original"\n',
                '[queue]\nurl = "postgresql://router@db/router"\nnode = "a/b"\n')
    result = run_check(cfg)
    assert result.returncode == 2 and "node" in result.stderr + result.stdout


def test_an_instance_two_nodes_finished_at_once_is_swept_with_its_file(cluster, postgres_url):
    a, b = cluster("a"), cluster("b")
    a.add(instance("/spool/both.dcm", "2.25.5"), jobs("PACS", "ARCHIVE"))
    [pacs], [archive] = a.claim("PACS", 1), b.claim("ARCHIVE", 1)
    with psycopg.connect(postgres_url, autocommit=True) as db:  # what two finishes at once can leave
        db.execute("DELETE FROM jobs")
    assert a.complete([pacs.id]) == [] and b.complete([archive.id]) == []
    assert a.paths() == ["/spool/both.dcm"]
    assert b.sweep_orphans() == ["/spool/both.dcm"] and a.paths() == []
    a.add(instance("/spool/new.dcm", "2.25.6"), jobs("PACS"))
    assert a.sweep_orphans() == [] and a.paths() == ["/spool/new.dcm"]  # an instance with its jobs stays


def test_a_job_taken_over_is_sent_again_and_counted_as_a_possible_duplicate(cluster, postgres_url, tmp_path,
                                                                            pacs):
    """Node a claimed two instances and died; node b's forwarder sends them once a's lease expired,
    and counts each in dicom_router_duplicate_sends_total (a may have sent them already); an
    instance nobody had claimed is not counted."""
    import shutil

    from pydicom import dcmread

    from router import metrics
    from router.config import load_rule_file
    from router.forward.forwarder import Forwarder
    from router.receive.intake import SUCCESS, Intake, Received
    from router.rules import Context
    from router.queue.spool import Spool
    from router.codecs.workers import CodecPool
    from tests.support.peers import data, make_series, wait_until

    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "PACS.toml").write_text(
        f'[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n[[rule]]\nsyntax = "original"\n')
    rules = load_rule_file(rules_dir / "PACS.toml")
    a, b = cluster("a"), cluster("b")
    spool_a, spool_b = Spool(tmp_path / "spool", node="a"), Spool(tmp_path / "spool", node="b")
    intake = Intake(spool_a, a, lambda: [rules])
    series = make_series(data("693_UNCR.dcm"), 3, tmp_path / "series")
    for index, source in enumerate(series):
        path = spool_a.incoming / f"rx{index}.dcm"
        shutil.copyfile(source, path)
        ds = dcmread(source, stop_before_pixels=True)
        assert intake.accept(Received(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                      Context("CT1", "ROUTER", "::1"))) == SUCCESS
    assert len(a.claim("PACS", 2)) == 2  # then node a dies with them in flight
    expire_leases(postgres_url, "a")
    counted = metrics.DUPLICATE_SENDS.labels(destination="PACS")._value.get()  # noqa: SLF001
    pool = CodecPool(workers=1)
    forwarder = Forwarder("PACS", lambda name: rules, b, spool_b, pool, "ROUTER")
    try:
        forwarder.start()
        wait_until(lambda: pacs.count() == 3, 30, what="the three instances at the PACS")
        wait_until(lambda: b.counts() == {}, 10, what="the queue drained")
    finally:
        forwarder.stop(timeout=10)
        pool.shutdown()
    assert metrics.DUPLICATE_SENDS.labels(destination="PACS")._value.get() - counted == 2  # noqa: SLF001
    assert not list((tmp_path / "spool" / "instances").iterdir())  # node b removed node a's files once delivered
