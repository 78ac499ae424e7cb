"""The PostgreSQL queue against the embedded SQLite one, and two nodes behind HAProxy: throughput,
CPU per instance of the router and of PostgreSQL, and the database's load per instance.

    python bench/cluster.py [--quick] [--repeat N] [--images N] [--senders N] [--jls]
                            [--scenarios NAME ...] [--loop-seconds S] [--loop-clients N ...]
                            [--loop-batch N] [--quiet-wait S] [--no-statements] [--keep] [--no-json]

The same corpus and peers as bench/run.py: the `ct` study, DCMTK storescu as the modality, DCMTK
storescp +xa as the destination (writing into a tmpfs), the router as received (or JPEG-LS lossless
with --jls). PostgreSQL (fsync on, synchronous_commit on) and HAProxy (the shipped
deploy/haproxy.cfg) are started by the benchmark through tests/support/cluster.py; every run gets a fresh
database, spool and destination; pg_stat_statements counts the router's statements. Scenarios run
--repeat times, interleaved. Then the queue's own
add/claim/complete loop (router.queue.postgres.PostgresQueue) and, when installed, pgbench measure
what this PostgreSQL sustains in commits per second.

Prints markdown tables on stdout, progress on stderr, and writes every run to
bench/results/cluster-<timestamp>.json. See bench/README.md, section bench/cluster.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import corpus  # noqa: E402
import harness  # noqa: E402
from harness import RouterRule, Server  # noqa: E402
from run import _read_through, _split, _spread, _syntax_tally, _tail  # noqa: E402 - the same run mechanics

from tests.support.cluster import POSTGRES_BIN, Haproxy, PostgresServer, haproxy_config  # noqa: E402

RESULTS = harness.BENCH / "results"
CLK_TCK = harness.CLK_TCK
HAPROXY_CHECK_MS = 2000  # the health check interval of the shipped deploy/haproxy.cfg (inter 2s)
KEEP = False  # --keep: leave each run's directory (logs, configurations) in place
SLOW_STATEMENT_MS = 200  # PostgreSQL logs each router statement slower than this (log_min_duration_statement)


# -- scenarios ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    name: str
    queue: str  # "sqlite" | "postgres"
    nodes: int
    senders: int
    haproxy: bool
    versus: str = ""  # the scenario its throughput is compared with

    @property
    def what(self) -> str:
        front = "HAProxy (leastconn) in front" if self.haproxy else "storescu straight to the node"
        return (f"{self.nodes} node{'s' if self.nodes > 1 else ''}, {self.queue} queue, "
                f"{self.senders} storescu at once, {front}")


def scenarios_for(senders: int) -> dict[str, Scenario]:
    many = f"{senders}x"
    return {s.name: s for s in (
        Scenario("sqlite-1node", "sqlite", 1, 1, False),
        Scenario("pg-1node", "postgres", 1, 1, False, "sqlite-1node"),
        Scenario(f"sqlite-1node-{many}", "sqlite", 1, senders, False),
        Scenario(f"pg-1node-{many}", "postgres", 1, senders, False, f"sqlite-1node-{many}"),
        Scenario(f"pg-1node-haproxy-{many}", "postgres", 1, senders, True, f"pg-1node-{many}"),
        Scenario(f"pg-2nodes-haproxy-{many}", "postgres", 2, senders, True, f"pg-1node-{many}"),
    )}


FULL = ["sqlite-1node", "pg-1node", "sqlite-1node-{n}x", "pg-1node-{n}x", "pg-1node-haproxy-{n}x",
        "pg-2nodes-haproxy-{n}x"]
QUICK = ["sqlite-1node", "pg-1node", "pg-1node-{n}x", "pg-2nodes-haproxy-{n}x"]


# -- /proc --------------------------------------------------------------------------------------
def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def own_children_cpu() -> float:
    """CPU of this process's reaped children (the storescu processes once waited for)."""
    t = os.times()
    return t.children_user + t.children_system


def tree_cpu(pid: int | None) -> float:
    return harness.cpu_seconds(harness.descendants(pid)) if pid else 0.0


def wait_quiet(limit_cores: float, timeout: float) -> tuple[float, float]:
    """Wait, at most `timeout` seconds, for half a second in which the machine is busier than
    `limit_cores` by less (between runs nothing of the benchmark's works: that is other people's
    load). Returns (seconds waited, cores busy in the last half second)."""
    start = time.monotonic()
    while True:
        busy0, t = machine_busy(), time.monotonic()
        time.sleep(0.5)
        cores = (machine_busy() - busy0) / (time.monotonic() - t)
        waited = time.monotonic() - start
        if cores < limit_cores or waited >= timeout:
            return waited, cores


def fdatasync_rate(directory: Path, seconds: float = 1.0) -> float:
    """8 KiB write + fdatasync per iteration, as a commit does, on this directory's disk: per second."""
    path = directory / "fdatasync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = os.urandom(8192)
    count, start = 0, time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            count += 1
    finally:
        os.close(fd)
        path.unlink()
    return count / (time.monotonic() - start)


# -- PostgreSQL ---------------------------------------------------------------------------------
class Database:
    """The benchmark's PostgreSQL: one server for the whole benchmark, a fresh database per run."""

    def __init__(self, root: Path, statements: bool = True) -> None:
        self.server = PostgresServer(root).start()
        try:
            self._setup(statements)
        except BaseException:
            self.server.stop()
            raise

    def _setup(self, statements: bool) -> None:
        import psycopg

        self.statements_on = statements
        if statements:
            # pg_stat_statements counts each statement as it ends (the cumulative statistics lag):
            # a restart with the library loaded, every other setting as tests/support/cluster.py has it
            self.server.stop()
            with open(self.server.data / "postgresql.auto.conf", "a") as conf:
                conf.write("shared_preload_libraries = 'pg_stat_statements'\n"
                           "pg_stat_statements.track_utility = on\n")
            self.server.start()
        self.admin = psycopg.connect(self.server.url, autocommit=True, connect_timeout=5)
        if statements:
            self.admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.version = self.admin.execute("SHOW server_version").fetchone()[0]
        self.settings = {name: self.admin.execute(f"SHOW {name}").fetchone()[0] for name in (
            "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers", "max_wal_size",
            "checkpoint_timeout", "full_page_writes")}

    def url(self, db: str) -> str:
        return f"postgresql://router@127.0.0.1:{self.server.port}/{db}"

    def create(self, db: str) -> str:
        self.admin.execute(f'CREATE DATABASE "{db}"')
        self.admin.execute(f'ALTER DATABASE "{db}" SET log_min_duration_statement = {SLOW_STATEMENT_MS}')
        self.admin.execute(f'ALTER DATABASE "{db}" SET log_lock_waits = on')
        return self.url(db)

    def drop(self, db: str) -> None:
        self.admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    def cpu(self) -> float:
        """User + system CPU of the postmaster and all its children (live and reaped)."""
        return tree_cpu(self.server.pid)

    def instant(self) -> dict[str, int]:
        """Counters read at once, without the cumulative statistics' delay: the next transaction
        ID (write transactions: each gets one) and the WAL position."""
        xid, lsn = self.admin.execute(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()
        return {"next_xid": xid, "wal_bytes": lsn}

    def stats(self, db: str) -> dict[str, int]:
        """pg_stat_database for `db` and pg_stat_wal. A backend reports these when its transaction
        ends, at most once a second, and an idle one with something unreported within 10 s, so
        they are exact only once the clients have disconnected."""
        row = self.admin.execute(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_returned, "
            "tup_fetched, blks_hit, blks_read, sessions FROM pg_stat_database WHERE datname = %s", (db,)).fetchone()
        names = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted", "tup_returned",
                 "tup_fetched", "blks_hit", "blks_read", "sessions")
        out = dict(zip(names, (int(v) for v in row))) if row else {}
        wal = self.admin.execute("SELECT wal_records, wal_fpi, wal_sync, wal_write FROM pg_stat_wal").fetchone()
        out.update(zip(("wal_records", "wal_fpi", "wal_sync", "wal_write"), (int(v) for v in wal)))
        return out

    def reset_statements(self) -> None:
        if self.statements_on:
            self.admin.execute("SELECT pg_stat_statements_reset()")

    def statements(self, db: str) -> list[dict]:
        """Every statement run in `db` since the last reset: calls, mean and max milliseconds."""
        if not self.statements_on:
            return []
        rows = self.admin.execute(
            "SELECT s.query, s.calls, s.total_exec_time, s.max_exec_time, s.rows FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s ORDER BY s.calls DESC", (db,)).fetchall()
        return [{"query": " ".join(q.split()), "calls": int(c), "total_ms": float(t), "max_ms": float(m),
                 "rows": int(r)} for q, c, t, m, r in rows]

    def wait_disconnected(self, db: str, timeout: float = 10.0) -> int:
        """Wait until no client is connected to `db` (their statistics are then reported)."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.admin.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s", (db,)).fetchone()[0]
            if n == 0 or time.monotonic() > deadline:
                return n
            time.sleep(0.05)

    def log_size(self) -> int:
        try:
            return self.server.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.server.log_path, "rb") as fp:
                fp.seek(offset)
                return fp.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            self.admin.close()
        finally:
            self.server.stop()


def slow_statements(log: str) -> list[dict]:
    """Statements PostgreSQL logged as slower than SLOW_STATEMENT_MS, and lock waits."""
    found = []
    for line in log.splitlines():
        m = re.search(r"duration: ([\d.]+) ms\s+(?:statement|execute [^:]*):\s*(.*)", line)
        if m:
            found.append({"ms": float(m.group(1)), "statement": m.group(2)[:160]})
        elif "still waiting for" in line or "deadlock detected" in line:
            found.append({"ms": None, "statement": line.split("LOG:", 1)[-1].strip()[:160]})
    return found


# -- the router's nodes -------------------------------------------------------------------------
def start_node(workdir: Path, dest_port: int, rule: RouterRule, spool: Path, queue_url: str | None,
               node: str) -> tuple[Server, int]:
    """`dicom-router serve` as harness.start_router starts it, with [queue] for PostgreSQL and the
    spool directory given (shared by the nodes). Returns the server and its metrics port."""
    metrics_port = harness.free_port()
    queue = f'[queue]\nurl = "{queue_url}"\nnode = "{node}"\nlease_s = 30\n' if queue_url else ""
    server = harness.start_router(workdir, dest_port, rule, workers=0, metrics_port=metrics_port, spool=spool,
                                  extra=queue, name=f"router-{node}")
    return server, metrics_port


def metric_total(metrics_port: int, name: str) -> float:
    """Sum over labels of a counter from the node's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == name:
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def log_findings(text: str) -> dict[str, int]:
    """Warnings and errors of a router's JSON log, counted by level and event, and tracebacks
    printed outside the logger (not JSON), by exception."""
    found: Counter[str] = Counter()
    where = ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            # a traceback on stderr: counted once, by its exception and the router's last frame
            frame = re.match(r'File "[^"]*/(router/[^"]+)", line \d+, in (\w+)', line)
            if frame:
                where = f"{frame.group(1)} {frame.group(2)}"
            error = re.match(r"([A-Za-z_.]*(?:Error|Exception|Exit|Interrupt))(?::|$)", line)
            if error:
                found[f"traceback outside the log: {error.group(1)}" + (f" in {where}" if where else "")] += 1
                where = ""
            continue
        if not isinstance(event, dict):
            continue
        level = str(event.get("level", "")).lower()
        if level in ("warning", "error", "critical", "exception"):
            found[f"{level}: {event.get('event', '?')}"] += 1
    return dict(found)


def wait_up(proxy: Haproxy, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = proxy.server_status()
            if len(status) == count and set(status.values()) == {"UP"}:
                return
        except OSError:
            status = {}
        if time.monotonic() > deadline:
            raise RuntimeError(f"HAProxy: nodes not UP within {timeout}s: {status}")
        time.sleep(0.1)


# -- one run -------------------------------------------------------------------------------------
@dataclass
class Setup:
    scp: Server | None = None
    nodes: list[tuple[Server, int]] = field(default_factory=list)  # (server, metrics port)
    proxy: Haproxy | None = None
    db: str | None = None

    def servers(self) -> list[Server]:
        return [s for s in [self.scp, *(n for n, _ in self.nodes)] if s is not None]


def run_once(scenario: Scenario, study: corpus.Study, root: Path, dest_root: Path | None, database: Database | None,
             rule: RouterRule, index: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=scenario.name + "-", dir=root))
    dest = (dest_root / work.name if dest_root is not None else work) / "dest"
    n = len(study.files)
    result: dict = {"scenario": scenario.name, "images": n, "input_bytes": study.bytes}
    setup = Setup()
    senders: list[subprocess.Popen] = []
    try:
        url = None
        if scenario.queue == "postgres":
            if database is None:
                raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
            setup.db = f"bench_{index}"
            url = database.create(setup.db)
        setup.scp = harness.start_storescp(work / "storescp", dest)
        spool = work / "spool"
        for i in range(scenario.nodes):
            name = f"node-{chr(ord('a') + i)}"
            setup.nodes.append(start_node(work / name, setup.scp.port, rule, spool, url, name))
        port = setup.nodes[0][0].port
        if scenario.haproxy:
            config = haproxy_config([(f"node-{chr(ord('a') + i)}", s.port, m) for i, (s, m) in enumerate(setup.nodes)],
                                    dicom_port=harness.free_port(), stats_port=harness.free_port(),
                                    check_interval_ms=HAPROXY_CHECK_MS)
            setup.proxy = Haproxy(config, work / "haproxy").start()
            wait_up(setup.proxy, scenario.nodes)
            port = setup.proxy.port
        timeout = 60 + 0.4 * n * max(1, study.bytes / n / 1e6)

        # warm-up, each node directly: imports, codec workers, the outbound association
        warm = [harness.storescu(study.warmup[i::len(setup.nodes)], s.port, work, "ROUTER", f"-warmup{i}")
                for i, (s, _) in enumerate(setup.nodes)]
        codes = harness.wait_procs(warm, 120)
        if any(codes):
            raise RuntimeError(f"warm-up storescu exited {codes}\n{_tail(work / 'storescu-warmup0.log')}")
        _wait_count(dest, len(study.warmup), 120, setup.servers())
        before = set(os.listdir(dest))
        _read_through(study.files)

        received0 = [metric_total(m, "dicom_router_received_instances") for _, m in setup.nodes]
        pg_log0 = database.log_size() if database else 0
        busy0, kids0 = machine_busy(), own_children_cpu()
        router0 = [tree_cpu(s.proc.pid) for s, _ in setup.nodes]
        scp0 = tree_cpu(setup.scp.proc.pid)
        proxy0 = tree_cpu(setup.proxy.pid) if setup.proxy else 0.0
        pg_cpu0 = database.cpu() if url else 0.0
        instant0 = database.instant() if url else {}
        stats0 = database.stats(setup.db) if url else {}
        if url:
            database.reset_statements()
        t0 = time.monotonic()
        senders = [harness.storescu(chunk, port, work, "ROUTER", f"-{i}")
                   for i, chunk in enumerate(_split(study.files, scenario.senders))]
        t_send = t_done = None
        deadline = t0 + timeout
        seen, seen_at, pause = len(before), t0, 0.0  # the longest time no new image arrived
        while t_done is None:
            now = time.monotonic()
            count = harness.count_files(dest)
            if count > seen:
                pause, seen, seen_at = max(pause, now - seen_at), count, now
            if t_send is None and all(p.poll() is not None for p in senders):
                t_send = now - t0
                codes = [p.returncode for p in senders]
                if any(codes):
                    logs = "\n".join(_tail(work / f"storescu-{i}.log") for i in range(len(senders)))
                    raise RuntimeError(f"storescu exited {codes}\n{logs}")
            if count >= len(before) + n:
                t_done = now - t0
            for s in setup.servers():
                if not s.alive():
                    raise RuntimeError(f"{s.name} exited with {s.proc.returncode}\n{s.log_tail()}")
            if now > deadline:
                got = harness.count_files(dest) - len(before)
                raise RuntimeError(f"timed out after {timeout:.0f}s with {got}/{n} images at the destination")
            time.sleep(0.02)
        wall, busy = time.monotonic() - t0, machine_busy() - busy0
        router_cpu = sum(tree_cpu(s.proc.pid) for s, _ in setup.nodes) - sum(router0)
        pg_cpu = database.cpu() - pg_cpu0 if url else 0.0
        instant1 = database.instant() if url else {}
        statements = database.statements(setup.db) if url else []
        proxy_cpu = tree_cpu(setup.proxy.pid) - proxy0 if setup.proxy else 0.0
        scp_cpu = tree_cpu(setup.scp.proc.pid) - scp0
        harness.wait_procs(senders, 5)  # reaped: their CPU is in this process's children's
        storescu_cpu = own_children_cpu() - kids0
        received = [metric_total(m, "dicom_router_received_instances") - r0
                    for (_, m), r0 in zip(setup.nodes, received0)]
        ours = router_cpu + pg_cpu + proxy_cpu + scp_cpu + storescu_cpu
        result.update(
            ok=True, seconds=t_done, sender_seconds=t_send if t_send is not None else t_done, longest_pause_s=pause,
            instances_per_s=n / t_done, mb_per_s=study.bytes / t_done / 1e6,
            router_cpu_s=router_cpu, router_cpu_ms_per_instance=router_cpu / n * 1000,
            router_processes=sum(len(s.tree()) for s, _ in setup.nodes),
            router_peak_rss_mb=sum(harness.peak_rss_mb(s.tree()) for s, _ in setup.nodes),
            pg_cpu_s=pg_cpu, pg_cpu_ms_per_instance=pg_cpu / n * 1000 if url else None,
            haproxy_cpu_ms_per_instance=proxy_cpu / n * 1000 if setup.proxy else None,
            storescp_cpu_s=scp_cpu, storescu_cpu_s=storescu_cpu,
            machine_busy_cores=busy / wall, others_cores=max(0.0, busy - ours) / wall,
            received_per_node=[int(r) for r in received],
        )
        if url:
            result.update(
                write_transactions=instant1["next_xid"] - instant0["next_xid"],
                write_transactions_per_instance=(instant1["next_xid"] - instant0["next_xid"]) / n,
                wal_bytes=instant1["wal_bytes"] - instant0["wal_bytes"],
                wal_kb_per_instance=(instant1["wal_bytes"] - instant0["wal_bytes"]) / n / 1024,
                statements=statements,
            )
            commits = sum(st["calls"] for st in statements if st["query"].upper() == "COMMIT")
            if statements:
                result["explicit_commits_per_instance"] = commits / n
        time.sleep(0.1)  # storescp writes in place: let the last file be complete
        new = [dest / f for f in os.listdir(dest) if f not in before and not f.startswith(".")]
        result["dest_syntaxes"] = _syntax_tally(new)
    except Exception as exc:  # noqa: BLE001 - a failed run is a result, not the end of the benchmark
        result.update(ok=False, error=str(exc))
    finally:
        harness.wait_procs([p for p in senders if p.poll() is None], 0.1) if senders else None
        if setup.proxy is not None:
            setup.proxy.stop()
        findings: Counter[str] = Counter()
        for server, _ in setup.nodes:
            code = server.stop()
            if code not in (0, None, -15):
                result.setdefault("notes", []).append(f"{server.name} exit code {code} at stop")
            findings.update(log_findings(server.log_path.read_text(errors="replace")
                                         if server.log_path.exists() else ""))
        result["router_log"] = dict(findings)
        if setup.scp is not None:
            setup.scp.stop()
        if setup.db is not None and database is not None:
            try:
                left = database.wait_disconnected(setup.db)
                if result.get("ok") and stats0:
                    stats1 = database.stats(setup.db)
                    delta = {k: stats1[k] - stats0.get(k, 0) for k in stats1}
                    result["pg_stats"] = delta
                    result["commits_per_instance"] = delta["xact_commit"] / n
                    result["tuples_written_per_instance"] = (
                        delta["tup_inserted"] + delta["tup_updated"] + delta["tup_deleted"]) / n
                    result["wal_syncs_per_instance"] = delta["wal_sync"] / n
                    if left:
                        result.setdefault("notes", []).append(f"{left} connections still open when read")
                result["pg_slow"] = slow_statements(database.log_since(pg_log0))
                database.drop(setup.db)
            except Exception as exc:  # noqa: BLE001
                result.setdefault("notes", []).append(f"database statistics: {exc}")
        if KEEP:
            result["work_dir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if dest_root is not None:
            shutil.rmtree(dest_root / work.name, ignore_errors=True)
    return result


def _wait_count(directory: Path, count: int, timeout: float, servers: list[Server]) -> None:
    deadline = time.monotonic() + timeout
    while harness.count_files(directory) < count:
        for s in servers:
            if not s.alive():
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode}\n{s.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {harness.count_files(directory)}/{count} images at the destination after "
                               f"{timeout}s")
        time.sleep(0.02)


# -- what this PostgreSQL sustains ---------------------------------------------------------------
LOOP_DESTINATION = "DEST"


def queue_loop(url: str, node: str, seconds: float, batch: int) -> None:
    """One client of the capacity loop (run as a child process): the router's own verbs on the
    PostgreSQL queue, as a node does for each instance: `add` (receiving, one transaction per
    instance), then `claim` of a batch and `complete` of it (forwarding). Prints a JSON line."""
    from pydicom.uid import generate_uid

    from router.queue import Delivery, Instance, NewJob
    from router.queue.postgres import PostgresQueue
    from router.request import Request

    queue = PostgresQueue(url, node=node, lease_s=30)
    queue.register()
    request = Request(syntax="original")
    study, series = generate_uid(), generate_uid()
    added = completed = claims = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(batch):
            added += 1
            queue.add(Instance(
                path=f"/spool/instances/{node}-{added}.dcm", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=f"{generate_uid()}", study_instance_uid=study,
                transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="MODALITY", called_ae="ROUTER",
                source_ip="127.0.0.1", size=526000, received_at=time.time(), series_instance_uid=series,
                series_number=1, instance_number=added), [NewJob(LOOP_DESTINATION, request, "bench")])
        jobs = queue.claim(LOOP_DESTINATION, batch)
        claims += 1
        if jobs:
            queue.complete([Delivery(j.id, syntax="original", transfer_syntax_uid="1.2.840.10008.1.2.1",
                                     sent_size=526000, ratio=1.0) for j in jobs])
            completed += len(jobs)
    elapsed = time.monotonic() - start
    queue.leave()
    queue.shutdown()
    print(json.dumps({"node": node, "added": added, "completed": completed, "claims": claims, "seconds": elapsed}))


def capacity_loop(database: Database, clients: int, seconds: float, batch: int) -> dict:
    """`clients` processes running queue_loop together on a fresh database: commits/s and
    instances/s, and the CPU of PostgreSQL and of the clients."""
    db = f"bench_loop_{clients}_{batch}"
    url = database.create(db)
    procs: list[subprocess.Popen] = []
    out: dict = {"clients": clients, "batch": batch, "seconds": seconds}
    try:
        # the schema first, so that the clients do not queue on the migration lock inside the timing
        setup = subprocess.run([harness.PYTHON, "-c", "import sys; from router.queue.postgres import PostgresQueue; "
                                "PostgresQueue(sys.argv[1], node='schema').shutdown()", url],
                               cwd=harness.REPO, capture_output=True, text=True, timeout=60)
        if setup.returncode:
            raise RuntimeError(f"schema: {setup.stderr[-500:]}")
        stats0, instant0 = database.stats(db), database.instant()
        pg0, busy0, kids0 = database.cpu(), machine_busy(), own_children_cpu()
        start = time.monotonic()
        procs = [subprocess.Popen([harness.PYTHON, str(Path(__file__).resolve()), "--queue-loop", url,
                                   f"loop-{i}", str(seconds), str(batch)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=harness.REPO)
                 for i in range(clients)]
        results, errors = [], []
        for p in procs:
            try:
                stdout, stderr = p.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate(timeout=10)
            if p.returncode == 0 and stdout.strip():
                results.append(json.loads(stdout.strip().splitlines()[-1]))
            else:
                errors.append(f"exit {p.returncode}: {stderr[-300:]}")
        wall = time.monotonic() - start
        pg_cpu, busy = database.cpu() - pg0, machine_busy() - busy0
        instant1 = database.instant()
        clients_cpu = own_children_cpu() - kids0
        database.wait_disconnected(db)
        stats1 = database.stats(db)
        delta = {k: stats1[k] - stats0.get(k, 0) for k in stats1}
        busy_s = max(r["seconds"] for r in results) if results else wall
        completed = sum(r["completed"] for r in results)
        commits = delta["xact_commit"]
        writes = instant1["next_xid"] - instant0["next_xid"]
        out.update(
            ok=not errors, errors=errors, completed=completed,
            instances_per_s=completed / busy_s, commits=commits, commits_per_s=commits / busy_s,
            write_transactions_per_s=writes / busy_s, commits_per_instance=commits / completed if completed else None,
            pg_cpu_ms_per_commit=pg_cpu / commits * 1000 if commits else None,
            pg_cpu_ms_per_instance=pg_cpu / completed * 1000 if completed else None,
            pg_cores=pg_cpu / wall, clients_cores=clients_cpu / wall, machine_busy_cores=busy / wall,
            wal_syncs_per_s=delta["wal_sync"] / busy_s, pg_stats=delta,
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        try:
            database.wait_disconnected(db)
            database.drop(db)
        except Exception:  # noqa: BLE001
            pass
    return out


def pgbench(database: Database, clients: int, seconds: float) -> dict | None:
    """pgbench's built-in simple-update (-N: three small writes and a read per transaction), a
    C client: this server's commits per second for small write transactions."""
    if POSTGRES_BIN is None or not (POSTGRES_BIN / "pgbench").exists():
        return None
    db = "bench_pgbench"
    database.create(db)
    base = [str(POSTGRES_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(database.server.port), "-U", "router"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    try:
        init = subprocess.run([*base, "-i", "-s", "1", "-q", db], capture_output=True, text=True, timeout=120,
                              env=env)
        if init.returncode:
            return {"ok": False, "error": init.stderr[-300:]}
        pg0, busy0, kids0 = database.cpu(), machine_busy(), own_children_cpu()
        start = time.monotonic()
        done = subprocess.run([*base, "-N", "-c", str(clients), "-j", "2", "-T", str(int(seconds)), db],
                              capture_output=True, text=True, timeout=seconds + 60, env=env)
        wall = time.monotonic() - start
        pg_cpu, busy, client = database.cpu() - pg0, machine_busy() - busy0, own_children_cpu() - kids0
        m = re.search(r"tps = ([\d.]+)", done.stdout)
        if done.returncode or not m:
            return {"ok": False, "error": (done.stdout + done.stderr)[-300:]}
        tps = float(m.group(1))
        return {"ok": True, "clients": clients, "seconds": seconds, "tps": tps,
                "pg_cpu_ms_per_commit": pg_cpu / (tps * wall) * 1000, "pg_cores": pg_cpu / wall,
                "client_cores": client / wall,
                "machine_busy_cores": busy / wall}
    finally:
        try:
            database.drop(db)
        except Exception:  # noqa: BLE001
            pass


# -- report --------------------------------------------------------------------------------------
def _values(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs if r.get("ok") and r.get(key) is not None]


def _med(runs: list[dict], key: str, fmt: str = ".1f") -> str:
    values = _values(runs, key)
    return format(statistics.median(values), fmt) if values else "—"


def paired_ratios(runs: list[dict], num: str, den: str) -> list[float]:
    """inst/s of `num` ÷ inst/s of `den`, repetition by repetition (the two ran minutes apart at most)."""
    out = []
    for rep in sorted({r["repetition"] for r in runs}):
        a = [r for r in runs if r["scenario"] == num and r["repetition"] == rep and r.get("ok")]
        b = [r for r in runs if r["scenario"] == den and r["repetition"] == rep and r.get("ok")]
        if a and b:
            out.append(a[0]["instances_per_s"] / b[0]["instances_per_s"])
    return out


def throughput_table(runs: list[dict], scenarios: list[Scenario]) -> str:
    head = ("| scenario | inst/s | ÷ inst/s of | last image at dest, s | modality done, s "
            "| longest pause at dest, s | router CPU ms/inst | PostgreSQL CPU ms/inst | HAProxy CPU ms/inst "
            "| received per node | other load, cores |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for scenario in scenarios:
        key = scenario.name
        mine = [r for r in runs if r["scenario"] == key]
        ok = [r for r in mine if r.get("ok")]
        if not ok:
            error = mine[0].get("error", "not run").splitlines()[0] if mine else "not run"
            lines.append(f"| {key} | FAILED: {error[:200]} |" + " |" * (head.count("|") - 3))
            continue
        failed = len(mine) - len(ok)
        ratios = paired_ratios(runs, key, scenario.versus) if scenario.versus else []
        per_node = [statistics.median(r["received_per_node"][i] for r in ok)
                    for i in range(len(ok[0]["received_per_node"]))]
        pg = _values(ok, "pg_cpu_ms_per_instance")
        lines.append(
            f"| {key}{f' ({failed} failed)' if failed else ''} | {_spread(_values(ok, 'instances_per_s'), '.1f')} "
            f"| {(_spread(ratios, '.2f') + ' ' + scenario.versus) if ratios else '—'} "
            f"| {_spread(_values(ok, 'seconds'), '.2f')} | {_spread(_values(ok, 'sender_seconds'), '.2f')} "
            f"| {_spread(_values(ok, 'longest_pause_s'), '.2f')} "
            f"| {_spread(_values(ok, 'router_cpu_ms_per_instance'), '.1f')} "
            f"| {_spread(pg, '.2f') if pg else '—'} "
            f"| {_med(ok, 'haproxy_cpu_ms_per_instance', '.2f')} "
            f"| {' / '.join(f'{v:.0f}' for v in per_node)} "
            f"| {_spread(_values(ok, 'others_cores'), '.2f')} |"
        )
    return "\n".join(lines)


def database_table(runs: list[dict], order: list[str]) -> str:
    head = ("| scenario | commits/inst (xact_commit) | write transactions/inst | WAL syncs/inst | tuples written/inst "
            "| WAL KB/inst | commits/s during the run | connections opened | statements > "
            f"{SLOW_STATEMENT_MS} ms |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for key in order:
        ok = [r for r in runs if r["scenario"] == key and r.get("ok") and r.get("commits_per_instance") is not None]
        if not ok:
            continue
        rate = [r["commits_per_instance"] * r["instances_per_s"] for r in ok]
        slow = [len([s for s in r.get("pg_slow", []) if s["ms"] is not None]) for r in ok]
        lines.append(
            f"| {key} | {_spread(_values(ok, 'commits_per_instance'), '.2f')} "
            f"| {_spread(_values(ok, 'write_transactions_per_instance'), '.2f')} "
            f"| {_spread(_values(ok, 'wal_syncs_per_instance'), '.2f')} "
            f"| {_spread(_values(ok, 'tuples_written_per_instance'), '.1f')} "
            f"| {_spread(_values(ok, 'wal_kb_per_instance'), '.1f')} | {_spread(rate, '.0f')} "
            f"| {_spread([r['pg_stats']['sessions'] for r in ok], '.0f')} "
            f"| {sum(slow)} in {len(ok)} runs |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


# what each of the queue's statements is for (best effort; any other statement shows as its start)
VERBS: list[tuple[str, str]] = [
    (r"^SELECT j\.id, j\.state, j\.owner FROM jobs", "claim: pick due jobs (FOR UPDATE SKIP LOCKED)"),
    (r"^UPDATE jobs SET state = \S+ owner = \S+ lease_until = EXTRACT", "claim: mark them in flight"),
    (r"^UPDATE jobs SET state = \S+ owner = \S+ lease_until = \S+ attempts", "retry"),
    (r"^UPDATE jobs SET state = \S+ owner = \S+ lease_until = \S+ updated_at", "release"),
    (r"^SELECT j\.id, j\.destination", "claim: read them"),
    (r"^INSERT INTO instances", "add: the instance"),
    (r"^INSERT INTO jobs", "add: its jobs"),
    (r"^SELECT j\.instance_id, i\.path", "complete: lock the job"),
    (r"^INSERT INTO history", "complete: history row"),
    (r"^DELETE FROM jobs", "complete: delete the job"),
    (r"^SELECT (?:\$\d+|1) FROM instances WHERE id", "complete: lock the instance"),
    (r"^SELECT (?:\$\d+|1) FROM jobs WHERE instance_id", "complete: any job left?"),
    (r"^DELETE FROM instances", "complete: delete the instance"),
    (r"^SELECT COUNT\(\*\) FROM jobs j JOIN instances", "due_count (overtaking check, waiting reasons)"),
    (r"^SELECT \(SELECT MIN\(", "next_due (pending, and leases elsewhere)"),
    (r"^SELECT MIN\(", "next_due: pending"),
    (r"pg_try_advisory_lock", "take_slot (a connection of its own)"),
    (r"^UPDATE nodes SET heartbeat_at", "heartbeat: the node"),
    (r"^UPDATE jobs SET lease_until", "heartbeat: its leases"),
    (r"^DELETE FROM history", "prune the history"),
    (r"^(BEGIN|COMMIT|ROLLBACK)$", "\\1"),
]


def verb(query: str) -> str:
    for pattern, label in VERBS:
        m = re.search(pattern, query)
        if m:
            return m.expand(label)
    return query[:60]


def statements_table(runs: list[dict], order: list[str], top: int = 20) -> str:
    """Calls per instance (median over runs) and mean / max ms of the router's statements, by scenario."""
    keys = [k for k in order if any(r["scenario"] == k and r.get("ok") and r.get("statements") for r in runs)]
    if not keys:
        return ""
    per: dict[str, dict[str, list[tuple[float, float, float]]]] = {}  # verb -> scenario -> [(calls/inst, mean, max)]
    for r in runs:
        if r["scenario"] not in keys or not r.get("ok"):
            continue
        merged: dict[str, list[float]] = {}
        for st in r.get("statements", []):
            m = merged.setdefault(verb(st["query"]), [0, 0.0, 0.0])
            m[0] += st["calls"]
            m[1] += st["total_ms"]
            m[2] = max(m[2], st["max_ms"])
        for name, (calls, total, worst) in merged.items():
            per.setdefault(name, {}).setdefault(r["scenario"], []).append(
                (calls / r["images"], total / calls if calls else 0.0, worst))
    ranked = sorted(per, key=lambda v: -max(statistics.median(c for c, _, _ in x) for x in per[v].values()))
    head = "| statement | " + " | ".join(f"{k}: calls/inst, mean ms, max ms" for k in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for name in ranked[:top]:
        cells = []
        for k in keys:
            got = per[name].get(k)
            if not got:
                cells.append("—")
                continue
            cells.append(f"{statistics.median(c for c, _, _ in got):.2f}, "
                         f"{statistics.median(m for _, m, _ in got):.2f}, {max(w for _, _, w in got):.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def capacity_table(loops: list[dict], bench: dict | None) -> str:
    lines = ["| load | clients | commits/s | write transactions/s | instances/s | commits/inst "
             "| PostgreSQL CPU ms/commit | PostgreSQL cores | clients, cores | machine busy, cores |",
             "|---" * 10 + "|"]
    for r in loops:
        if not r.get("ok"):
            lines.append(f"| PostgresQueue add/claim/complete, batch {r['batch']} | {r['clients']} "
                         f"| FAILED: {'; '.join(r.get('errors', []))[:200]} | | | | | | |")
            continue
        lines.append(
            f"| PostgresQueue add ×{r['batch']}, claim, complete | {r['clients']} | {r['commits_per_s']:.0f} "
            f"| {r['write_transactions_per_s']:.0f} | {r['instances_per_s']:.0f} | {r['commits_per_instance']:.2f} "
            f"| {r['pg_cpu_ms_per_commit']:.3f} | {r['pg_cores']:.2f} | {r['clients_cores']:.2f} "
            f"| {r['machine_busy_cores']:.2f} |")
    if bench and bench.get("ok"):
        lines.append(f"| pgbench -N (simple update) | {bench['clients']} | {bench['tps']:.0f} | {bench['tps']:.0f} "
                     f"| — | — | {bench['pg_cpu_ms_per_commit']:.3f} | {bench['pg_cores']:.2f} "
                     f"| {bench['client_cores']:.2f} | {bench['machine_busy_cores']:.2f} |")
    elif bench:
        lines.append(f"| pgbench -N | | FAILED: {bench.get('error', '')[:200]} | | | | | | | |")
    return "\n".join(lines)


def _versions(database: Database | None) -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version(), "cpus": str(os.cpu_count()), "kernel": platform.release()}
    for dist in ("pydicom", "pynetdicom", "psycopg", "psycopg-pool", "dicom-router"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if database is not None:
        out["postgresql"] = database.version
    for tool, argv in (("dcmtk", ["storescu", "--version"]), ("haproxy", ["haproxy", "-v"])):
        try:
            out[tool] = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            out[tool] = "not found"
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--queue-loop"]:
        url, node, seconds, batch = argv[1:5]
        queue_loop(url, node, float(seconds), int(batch))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 CT slices, 1 run of " + " ".join(QUICK)
                        + ", a 3 s capacity loop (about a minute)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per scenario (default 3; --quick: 1)")
    parser.add_argument("--images", type=int, default=None, help="at most this many CT slices (default 500; "
                                                                  "--quick: 150)")
    parser.add_argument("--senders", type=int, default=4, help="storescu processes at once in the -Nx scenarios")
    parser.add_argument("--jls", action="store_true", help="the rule sends JPEG-LS lossless instead of as received")
    parser.add_argument("--scenarios", nargs="+", default=None,
                        help="names, {n} for --senders; default: " + " ".join(FULL))
    parser.add_argument("--loop-seconds", type=float, default=None, help="capacity loop length (default 6; quick 3)")
    parser.add_argument("--loop-clients", type=int, nargs="+", default=None,
                        help="client processes of each capacity loop (default 2 8; quick 4)")
    parser.add_argument("--loop-batch", type=int, default=8, help="instances added per claim in the capacity loop")
    parser.add_argument("--corpus-dir", type=Path, default=corpus.DEFAULT_CACHE)
    parser.add_argument("--dest-dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where storescp writes (default /dev/shm; 'none': beside the spool)")
    parser.add_argument("--quiet-wait", type=float, default=5.0,
                        help="before each run, wait at most this many seconds for the machine to be quieter than "
                             "--quiet-cores (other people's load); 0: do not wait")
    parser.add_argument("--quiet-cores", type=float, default=0.5)
    parser.add_argument("--no-statements", action="store_true",
                        help="PostgreSQL without pg_stat_statements (no statement table)")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory (router, HAProxy and "
                                                           "PostgreSQL logs) and print where")
    parser.add_argument("--no-json", action="store_true")
    args = parser.parse_args(argv)
    global KEEP
    KEEP = args.keep
    repeat = args.repeat or (1 if args.quick else 3)
    images = args.images or (150 if args.quick else 500)
    loop_seconds = args.loop_seconds if args.loop_seconds is not None else (3.0 if args.quick else 6.0)
    loop_clients = args.loop_clients or ([4] if args.quick else [2, 8])
    known = scenarios_for(args.senders)
    names = [s.format(n=args.senders) for s in (args.scenarios or (QUICK if args.quick else FULL))]
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(known)}")
    scenarios = [known[n] for n in names]
    rule = RouterRule("jpeg-ls-lossless") if args.jls else RouterRule("original")

    started = time.monotonic()
    study = corpus.load("ct", args.corpus_dir).head(images)
    print(f"corpus ct: {len(study.files)} images, {study.bytes / 1e6:.0f} MB; rule: {rule.syntax}", file=sys.stderr)
    dest_root = None
    if args.dest_dir is not None and str(args.dest_dir) != "none" and \
            shutil.disk_usage(args.dest_dir).free > 2 * study.bytes:
        dest_root = Path(tempfile.mkdtemp(prefix="dicom-router-bench-dest-", dir=args.dest_dir))
    root = Path(tempfile.mkdtemp(prefix="dicom-router-cluster-"))
    database = None
    runs: list[dict] = []
    loops: list[dict] = []
    bench = None
    fsyncs = fdatasync_rate(root)
    try:
        if any(s.queue == "postgres" for s in scenarios) or loop_seconds > 0:
            if POSTGRES_BIN is None:
                print("PostgreSQL is not installed: only the SQLite scenarios run", file=sys.stderr)
            else:
                database = Database(root / "postgres", statements=not args.no_statements)
                print(f"PostgreSQL {database.version} on port {database.server.port}: {database.settings}",
                      file=sys.stderr)
        index = 0
        for rep in range(repeat):
            for scenario in scenarios:
                index += 1
                waited, load = wait_quiet(args.quiet_cores, args.quiet_wait) if args.quiet_wait > 0 else (0.0, 0.0)
                try:
                    result = run_once(scenario, study, root, dest_root, database, rule, index)
                except Exception as exc:  # noqa: BLE001 - keep the other runs
                    result = {"scenario": scenario.name, "ok": False, "error": f"harness: {exc}"}
                result.update(repetition=rep, quiet_wait_s=waited, load_before_cores=load)
                runs.append(result)
                if result.get("ok"):
                    status = (f"{result['instances_per_s']:.1f} inst/s, router "
                              f"{result['router_cpu_ms_per_instance']:.1f} ms/inst")
                    if result.get("pg_cpu_ms_per_instance") is not None:
                        status += (f", PostgreSQL {result['pg_cpu_ms_per_instance']:.2f} ms/inst, "
                                   f"{result.get('commits_per_instance', float('nan')):.2f} commits/inst")
                    status += f", per node {result['received_per_node']}, others {result['others_cores']:.2f} cores"
                else:
                    status = "FAILED: " + result["error"][:300]
                print(f"[{rep + 1}/{repeat}] {scenario.name}: {status}", file=sys.stderr)
        if database is not None and loop_seconds > 0:
            for clients in loop_clients:
                loops.append(capacity_loop(database, clients, loop_seconds, args.loop_batch))
                r = loops[-1]
                print(f"capacity loop, {clients} clients: " + (
                    f"{r['commits_per_s']:.0f} commits/s, {r['instances_per_s']:.0f} inst/s" if r.get("ok")
                    else f"FAILED {r.get('errors')}"), file=sys.stderr)
            bench = pgbench(database, 8, loop_seconds)
            if bench:
                print(f"pgbench -N: {bench}", file=sys.stderr)
    finally:
        if database is not None:
            database.stop()
        if KEEP:
            print(f"kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
        if dest_root is not None:
            shutil.rmtree(dest_root, ignore_errors=True)

    order = [s.name for s in scenarios]
    print(f"\n## Throughput and CPU ({repeat} run(s) each, interleaved; median (min–max)); {len(study.files)} CT "
          f"slices, {rule.syntax}\n")
    print(throughput_table(runs, scenarios))
    print()
    for s in scenarios:
        ratios = paired_ratios(runs, s.name, s.versus) if s.versus else []
        if ratios:
            print(f"- {s.name} ÷ {s.versus}, inst/s, run by run: {', '.join(f'{r:.3f}' for r in ratios)}; "
                  f"median {statistics.median(ratios):.3f}")
    arrived: Counter[str] = Counter()
    for r in runs:
        arrived.update(r.get("dest_syntaxes", {}))
    print("- at the destination, all runs: " + (", ".join(f"{k} ×{v}" for k, v in arrived.most_common()) or "—"))
    table = database_table(runs, order)
    if table:
        print("\n## Database load per instance (commits: pg_stat_database.xact_commit, read-only ones included; "
              "write transactions: transaction IDs assigned; WAL syncs: pg_stat_wal)\n")
        print(table)
    table = statements_table(runs, order)
    if table:
        print("\n## The router's statements during the timed part (pg_stat_statements; the most called first)\n")
        print(table)
    if loops or bench:
        print(f"\n## What this PostgreSQL sustains ({loop_seconds:.0f} s each; clients on the same 2 cores)\n")
        print(capacity_table(loops, bench))
    print(f"\nfdatasync of 8 KiB on the spool's disk: {fsyncs:.0f}/s")
    logs: Counter[str] = Counter()
    for r in runs:
        logs.update(r.get("router_log", {}))
    slow = [s for r in runs for s in r.get("pg_slow", [])]
    print("\nRouter log warnings/errors over all runs: " + (
        ", ".join(f"{k} ×{v}" for k, v in logs.most_common()) if logs else "none"))
    print(f"PostgreSQL statements slower than {SLOW_STATEMENT_MS} ms, lock waits: {len(slow)}"
          + "".join(f"\n  {s['ms']} ms: {s['statement']}" for s in sorted(
              slow, key=lambda s: -(s['ms'] or 0))[:5]))
    for r in runs:
        for note in r.get("notes", []):
            print(f"note ({r['scenario']}, run {r['repetition'] + 1}): {note}")
    print("\nScenarios:")
    for s in scenarios:
        print(f"- {s.name}: {s.what}")
    elapsed = time.monotonic() - started
    print(f"\n{len(runs)} runs in {elapsed:.0f} s")
    if not args.no_json:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"cluster-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({
            "command": sys.argv, "versions": _versions(database), "repeat": repeat, "rule": rule.syntax,
            "postgres_settings": database.settings if database else None, "fdatasync_per_s": fsyncs,
            "corpus": {"images": len(study.files), "bytes": study.bytes, "description": study.description},
            "runs": runs, "capacity_loops": loops, "pgbench": bench, "seconds": elapsed,
        }, indent=2))
        print(f"JSON: {path}")
    return 0 if all(r.get("ok") for r in runs) and all(r.get("ok") for r in loops) else 1


if __name__ == "__main__":
    raise SystemExit(main())
