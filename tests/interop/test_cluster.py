"""Several router nodes on one PostgreSQL queue and one spool directory, behind HAProxy running the
shipped deploy/haproxy.cfg: a node killed, the database stopped, a destination's association
limit, and a node restarting next to live ones.

Every process is real: PostgreSQL (as an unprivileged user), HAProxy, `dicom-router serve` nodes,
DCMTK storescu and storescp, Orthanc, and pynetdicom modalities and PACS where the test must count
per instance (statuses, duplicates, associations at once)."""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.support.cluster import Haproxy, PostgresServer, haproxy_config, require
from tests.interop.conftest import storescu
from tests.support.peers import Destination, RouterProcess, alive, descendants, make_series, metric_value, send, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.postgres, pytest.mark.slow]

LEASE_S = 3
AS_RECEIVED = '[[rule]]\nname = "all"\nsyntax = "original"\n'
RETRY = "{ max_attempts = 1000, backoff_s = 0.2, max_backoff_s = 1 }"


class Cluster:
    """`count` router nodes sharing one spool and one database, HAProxy in front."""

    def __init__(self, root: Path, url: str, destinations: list[Destination], count: int = 3,
                 lease_s: float = LEASE_S) -> None:
        self.root, self.url = root, url
        self.spool = root / "spool"
        self.nodes: dict[str, RouterProcess] = {}
        for index in range(count):
            name = f"node-{chr(ord('a') + index)}"
            self.nodes[name] = RouterProcess(
                root / name, destinations, spool_dir=self.spool,
                listen_extra="processes = 1",
                extra=f'[queue]\nurl = "{url}"\nnode = "{name}"\nlease_s = {lease_s}\n[transcode]\nworkers = 1\n',
            )
        self.haproxy: Haproxy | None = None

    def start(self) -> Cluster:
        for node in self.nodes.values():
            node.start()
        self.haproxy = Haproxy(haproxy_config(
            [(name, node.port, node.metrics_port) for name, node in self.nodes.items()],
            dicom_port=_free_port(), stats_port=_free_port()), self.root / "haproxy").start()
        wait_until(lambda: set(self.haproxy.server_status().values()) == {"UP"}, 20,
                   what="every node UP in HAProxy")
        return self

    @property
    def port(self) -> int:
        return self.haproxy.port

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for node in self.nodes.values():
            node.kill()

    def sql(self, query: str, *args):  # noqa: ANN201
        with psycopg.connect(self.url, autocommit=True) as db:
            return db.execute(query, args).fetchall()

    def logs(self) -> str:
        return "\n".join(node.log() for node in self.nodes.values())

    def taken_over(self) -> int:
        return len(re.findall(r'"event": "job_taken_over"', self.logs()))


def _free_port() -> int:
    from tests.support.cluster import free_port

    return free_port()


@pytest.fixture
def cluster_factory(tmp_path, postgres_url):
    require("postgres", "haproxy")
    made: list[Cluster] = []

    def make(destinations: list[Destination], url: str | None = None, **kwargs) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(made)}", url or postgres_url, destinations, **kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()


def readyz(node: RouterProcess) -> tuple[int, str]:
    """The node's /readyz: its status and what it says."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/readyz", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def small_series(count: int, directory: Path) -> list[Path]:
    return make_series(Path(get_testdata_file("CT_small.dcm")), count, directory)


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Modality:
    """Sends files through the front door in associations of `per_association`, as a scanner
    would: what did not get success is sent again later. Records each success and when."""

    def __init__(self, port: int, files: list[Path], per_association: int = 10, pause_s: float = 0.0) -> None:
        self.port, self.files = port, files
        self.per_association, self.pause_s = per_association, pause_s
        self.succeeded: dict[Path, float] = {}  # file -> when its C-STORE success came
        self.refused: list[tuple[float, int]] = []  # (when, status) of every answer other than success
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = threading.Event()

    def start(self) -> Modality:
        self.thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + 240
        while not self.stop.is_set() and time.monotonic() < deadline:
            todo = [f for f in self.files if f not in self.succeeded]
            if not todo:
                return
            for start in range(0, len(todo), self.per_association):
                chunk = todo[start:start + self.per_association]
                for path, status in zip(chunk, send(self.port, chunk)):
                    now = time.time()
                    if status == 0:
                        self.succeeded[path] = now
                    else:
                        self.refused.append((now, status))
                if self.stop.wait(self.pause_s):
                    return
            self.stop.wait(0.2)

    @property
    def done(self) -> bool:
        return len(self.succeeded) == len(self.files)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


def test_three_nodes_behind_haproxy_deliver_a_storescu_study_to_storescp_and_orthanc(
        cluster_factory, storescp, orthanc, tmp_path):
    scp = storescp("+xa", "+B", "--fork", ae_title="STORESCP")
    cluster = cluster_factory([Destination("STORESCP", scp.port, AS_RECEIVED, ae_title="STORESCP"),
                               Destination("ORTHANC", orthanc.dicom_port, AS_RECEIVED, ae_title="ORTHANC")])
    series = small_series(60, tmp_path / "series")
    senders = [threading.Thread(target=storescu, args=(cluster.port, series[i::3])) for i in range(3)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    sent = {uid_of(p): p for p in series}
    wait_until(lambda: scp.count() >= len(sent) and orthanc.count() >= len(sent), 60,
               what=f"the study at both destinations\n{cluster.logs()[-3000:]}")
    at_scp = scp.by_uid()
    assert set(at_scp) == set(sent) and scp.count() == len(sent)  # each once
    for uid, path in sent.items():
        assert at_scp[uid].PixelData == dcmread(path).PixelData
    assert set(orthanc.by_uid()) == set(sent)
    receiving = [name for name, node in cluster.nodes.items()
                 if metric_value(node.metrics(), "dicom_router_received_instances_total", caller="MODALITY") > 0]
    assert len(receiving) >= 2, "HAProxy spread the three associations over the nodes"
    listing = cluster.nodes["node-a"].cli("queue")
    assert listing.returncode == 0, listing.stderr
    for name in cluster.nodes:
        assert re.search(rf"^{name}\s+\S+\s+\d+\s+\d+s ago\s+\d+\s+alive$", listing.stdout, re.M), listing.stdout
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.nodes['node-b'].metrics_port}/", timeout=10) as rsp:
        page = rsp.read().decode()
    for name in cluster.nodes:  # the status page lists every node of the cluster, alive
        assert re.search(rf'<tr id="node-{name}"><td>{name}( \(this node\))?</td>.*?alive', page), page
    assert "node-b (this node)" in page
    scraped = cluster.nodes["node-b"].metrics()
    assert metric_value(scraped, "dicom_router_queue_up") == 1
    for name in cluster.nodes:
        assert f'dicom_router_node_heartbeat_age_seconds{{node="{name}"}}' in scraped
        assert metric_value(scraped, "dicom_router_node_heartbeat_age_seconds", node=name) < LEASE_S
    # the shared spool is empty once everything is delivered
    wait_until(lambda: not list((cluster.spool / "instances").iterdir()), 10, what="the shared spool emptied")


def test_kill_9_of_nodes_mid_burst_loses_nothing_and_their_jobs_are_taken_over(cluster_factory, pacs_factory,
                                                                                tmp_path):
    pacs = pacs_factory(delay=0.01)
    cluster = cluster_factory([Destination("PACS", pacs.port, AS_RECEIVED, retry=RETRY,
                                           extra="max_associations = 2\nbatch_size = 16")])
    series = small_series(500, tmp_path / "series")
    modality = Modality(cluster.port, series, per_association=10, pause_s=0.5).start()
    rng = random.Random(os.environ.get("ROUTER_TEST_SEED", "cluster"))
    takeovers: list[float] = []
    for _ in range(5):
        time.sleep(rng.uniform(0.5, 2.5))
        assert not modality.done, "the burst ended before every kill: nothing would be tested"
        held = dict(cluster.sql("SELECT owner, COUNT(*) FROM jobs WHERE state = 'in_flight' GROUP BY owner"))
        name = max(cluster.nodes, key=lambda n: (held.get(n, 0), rng.random()))
        node = cluster.nodes[name]
        children = descendants(node.proc.pid)
        node.kill()
        killed_at = time.monotonic()
        wait_until(lambda: not any(alive(pid) for pid in children), 10, what=f"{name}'s processes gone")
        claimed = [row[0] for row in cluster.sql(
            "SELECT id FROM jobs WHERE owner = %s AND state = 'in_flight'", name)]
        # another node sends what the dead one had claimed once its lease expired
        wait_until(lambda: not cluster.sql("SELECT 1 FROM jobs WHERE id = ANY(%s)", claimed), LEASE_S + 15,
                   what=f"{len(claimed)} jobs of {name} taken over and delivered\n{cluster.logs()[-3000:]}")
        takeovers.append(time.monotonic() - killed_at)
        node.start()
    modality.join(240)
    assert modality.done, f"{len(modality.succeeded)} of {len(series)} acknowledged"
    sent = {uid_of(p) for p in series}
    wait_until(lambda: sent <= set(pacs.by_uid()), 90, what=f"every instance at the PACS\n{cluster.logs()[-3000:]}")
    wait_until(lambda: cluster.sql("SELECT COUNT(*) FROM jobs")[0][0] == 0, 30, what="the queue drained")
    counts = collections.Counter(r.sop_instance_uid for r in pacs.received)
    duplicates = sum(n - 1 for n in counts.values())
    taken_over = cluster.taken_over()
    print(f"500 instances, 5 kills: takeover within {max(takeovers):.1f} s at most (lease {LEASE_S} s), "
          f"{taken_over} jobs taken over and sent again, {duplicates} duplicates at the PACS")
    assert max(takeovers) <= LEASE_S + 15
    assert duplicates <= taken_over  # every duplicate was a job taken over, and counted as such


def test_postgresql_stopped_for_20_s_mid_burst_means_no_success_and_everything_drains(
        cluster_factory, pacs_factory, tmp_path):
    server = PostgresServer(tmp_path / "postgres").start()
    try:
        pacs = pacs_factory()
        cluster = cluster_factory([Destination("PACS", pacs.port, AS_RECEIVED, retry=RETRY)], url=server.url,
                                  count=2)
        series = small_series(150, tmp_path / "series")
        modality = Modality(cluster.port, series, per_association=5, pause_s=0.3).start()
        wait_until(lambda: len(modality.succeeded) >= 20, 60, what="the burst under way")
        server.stop()
        stopped_at = time.time()
        node = next(iter(cluster.nodes.values()))
        wait_until(lambda: readyz(node)[0] == 503, 20, what="/readyz 503 while the database is down")
        assert "queue unavailable" in readyz(node)[1]
        assert metric_value(node.metrics(), "dicom_router_queue_up") == 0
        wait_until(lambda: any(t > stopped_at for t, _ in modality.refused), 30, what="a C-STORE refused")
        time.sleep(max(0.0, 20 - (time.time() - stopped_at)))
        restarting_at = time.time()
        server.start()
        modality.join(240)
        assert modality.done, f"{len(modality.succeeded)} of {len(series)} acknowledged"
        down = [t for t in modality.succeeded.values() if stopped_at + 1 < t < restarting_at]
        assert down == [], f"{len(down)} C-STORE successes while the database was down"
        statuses = collections.Counter(status for t, status in modality.refused if stopped_at < t < restarting_at)
        assert statuses and set(statuses) <= {0xA700, -1}, statuses
        sent = {uid_of(p) for p in series}
        wait_until(lambda: sent <= set(pacs.by_uid()), 90, what=f"everything delivered\n{cluster.logs()[-3000:]}")
        wait_until(lambda: all(readyz(n)[0] == 200 for n in cluster.nodes.values()), 30,
                   what="every node ready again")
        print(f"database down {restarting_at - stopped_at:.0f} s: C-STORE answers then {dict(statuses)}")
    finally:
        server.stop()


def test_a_destination_allowing_two_associations_never_sees_more_from_the_cluster(cluster_factory, pacs_factory,
                                                                                   tmp_path):
    pacs = pacs_factory(delay=0.02)
    cluster = cluster_factory([Destination("PACS", pacs.port, AS_RECEIVED, retry=RETRY,
                                           extra="max_associations = 2\nbatch_size = 4")])
    series = small_series(120, tmp_path / "series")
    senders = [threading.Thread(target=send, args=(cluster.port, series[i::3])) for i in range(3)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    wait_until(lambda: len(pacs.by_uid()) == len(series), 90, what="every instance at the PACS")
    assert pacs.most_at_once <= 2, f"{pacs.most_at_once} associations at once from the cluster"
    assert pacs.most_at_once == 2, "the backlog used both slots"


def test_a_node_restarting_after_a_crash_leaves_the_live_nodes_work_alone(cluster_factory, pacs_factory, tmp_path):
    pacs = pacs_factory(delay=0.05)
    cluster = cluster_factory([Destination("PACS", pacs.port, AS_RECEIVED, retry=RETRY,
                                           extra="batch_size = 8")], count=2)
    a, b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    # what node-a has on the shared spool besides its queued instances: a reception under way
    # and an instance file about to be committed
    receiving = cluster.spool / "incoming" / "node-a" / "receiving.part"
    receiving.write_bytes(b"a reception under way")
    committing = cluster.spool / "instances" / "node-a@committing.dcm"
    committing.write_bytes(b"renamed, its queue row about to be committed")
    series = small_series(60, tmp_path / "series")
    assert send(a.port, series) == [0] * len(series)
    wait_until(lambda: cluster.sql("SELECT COUNT(*) FROM jobs WHERE owner = 'node-a' AND state = 'in_flight'")[0][0]
               > 0, 30, what="node-a sending")
    b.kill()
    a_in_flight = [row[0] for row in cluster.sql(
        "SELECT id FROM jobs WHERE owner = 'node-a' AND state = 'in_flight'")]
    b.start()  # its recovery runs before it answers ready
    after = dict(cluster.sql("SELECT id, owner FROM jobs WHERE id = ANY(%s)", a_in_flight))
    assert all(owner == "node-a" for owner in after.values()), after  # delivered meanwhile, or still node-a's
    assert receiving.exists() and committing.exists()
    sent = {uid_of(p) for p in series}
    wait_until(lambda: sent <= set(pacs.by_uid()), 60, what="every instance at the PACS")
    duplicates = sum(n - 1 for n in collections.Counter(r.sop_instance_uid for r in pacs.received).values())
    assert duplicates == 0
