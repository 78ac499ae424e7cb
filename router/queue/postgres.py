"""The cluster queue backend: PostgreSQL shared by several router nodes (psycopg 3 and its pool).

Every node receives, queues and forwards; they share this database and one spool directory.

  claim      `SELECT ... FOR UPDATE SKIP LOCKED`: two nodes never claim the same job. A claim is
             a lease (`owner`, `lease_until`, by the database's clock) that the owning node renews
             with its heartbeat (`heartbeat`, every lease_s / 3) while it works.
  takeover   a job in flight whose lease expired (its node died, or lost the database for longer
             than the lease) is claimable by any node like a pending one. Its first owner may have
             sent it before it could record success: delivery is at least once, and the job says
             whom it was taken from (`Job.taken_over_from`), so the forwarder counts the resend.
  a stale owner's late word (retry, dead letter, release) on a job taken over is ignored; its
             "delivered" is kept (the instance did arrive).
  slots      a destination's `max_associations` holds for the cluster: each open association
             holds a PostgreSQL advisory lock (destination, slot number) on a connection of its
             own, released with the association, or by the server when the node dies.
  schema     created and upgraded by the router itself (`schema_version`); a database whose
             schema is newer than this router knows is refused.

Times in the rows are epoch seconds (double precision); due times use the caller's clock like
the embedded backend, leases and heartbeats the database's (nodes' clocks may differ).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from router.queue import (
    Delivery, Holding, Instance, Job, NewJob, Node,
    NodeNameInUse, Queue, Slot,
)
from router.queue import schema
from router.queue.commitments import CommitmentStore
from router.queue.jobs import JobStore
from router.queue.reading import HISTORY_COLUMNS, JOB_COLUMNS, ReadingStore, job_from_row
from router.request import Outcome

SCHEMA_VERSION = 2

MIGRATIONS: tuple[str, ...] = schema.POSTGRES_MIGRATIONS
# a fixed advisory lock key serialising schema changes between nodes starting together
_SCHEMA_LOCK = 0x0D1C0


class SchemaTooNew(RuntimeError):
    """The database was made by a newer router."""


_DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"
UNREACHABLE_WAIT_S = 0.5
CHECK_IDLE_S = 5.0


# finished jobs: deleted, each with its history row, and their instances once no job needs them;
# returns those instances' spool paths
_COMPLETE = (
    "WITH d AS (SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::bigint[], "
    "%s::float8[], %s::int[], %s::text[], %s::text[]) AS d(job_id, outcome, syntax, transfer_syntax_uid, sent_size, "
    "ratio, extra_attempts, note, sent_uid)), "
    "gone AS (DELETE FROM jobs j USING d WHERE j.id = d.job_id RETURNING j.id, j.instance_id, j.destination, "
    "j.attempts, j.last_error, d.outcome, d.syntax, d.transfer_syntax_uid, d.sent_size, d.ratio, d.extra_attempts, "
    "d.note, d.sent_uid), "
    f"written AS (INSERT INTO history ({HISTORY_COLUMNS}) SELECT g.destination, g.outcome, g.syntax, "
    "g.transfer_syntax_uid, i.size, g.sent_size, g.ratio, g.attempts + g.extra_attempts, "
    "COALESCE(g.note, g.last_error), i.received_at, %s, i.study_instance_uid, i.series_instance_uid, "
    "i.sop_instance_uid, g.sent_uid, i.sop_class_uid, i.calling_ae FROM gone g JOIN instances i ON i.id = g.instance_id) "
    "DELETE FROM instances i WHERE i.id IN (SELECT instance_id FROM gone) AND NOT EXISTS "
    "(SELECT 1 FROM jobs k WHERE k.instance_id = i.id AND k.id NOT IN (SELECT id FROM gone)) RETURNING i.path"
)


def _commit_without_waiting(conn: psycopg.Connection) -> None:
    """A new connection of the unsynced pool: its commits return before their WAL is on disk."""
    conn.execute("SET synchronous_commit = off")


def _slot_key(destination: str) -> int:
    """A destination's advisory lock class: a stable signed 32-bit number from its name."""
    value = zlib.crc32(f"dicom-router association slots {destination}".encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def probe(url: str, timeout_s: float = 5.0) -> str:
    """Whether the database at `url` is usable by this router, without changing it: one line for
    `dicom-router check`. Raises with the reason when it is not."""
    with psycopg.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=True) as db:
        server = db.info.server_version
        exists = db.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
        version = db.execute("SELECT version FROM schema_version").fetchone()[0] if exists else 0
        nodes = db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] if exists else 0
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"schema version {version}, newer than this router's {SCHEMA_VERSION}: upgrade the router")
    state = "empty: the router creates its schema at start" if not exists else \
        f"schema version {version}" + (" (upgraded at start)" if version < SCHEMA_VERSION else "") + \
        f", {nodes} node(s) known"
    return f"PostgreSQL {server // 10000}.{server % 10000}: {state}"


class _AdvisorySlot(Slot):
    """An association slot: an advisory lock held by a connection of its own."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn: psycopg.Connection | None = conn
        self._lock = threading.Lock()

    def give(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # the session's advisory locks go with it
            except Exception:  # noqa: BLE001 - a connection already broken holds no lock either
                pass


class PostgresQueue(JobStore, ReadingStore, CommitmentStore, Queue):
    shared = True

    def __init__(self, url: str, node: str, lease_s: float = 30.0, history_days: float = 7, pool_size: int = 10,
                 connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.node = node
        self.lease_s = float(lease_s)
        self.history_s = history_days * 86400
        self._pruned_at = 0.0
        self._connect = {
            "connect_timeout": max(1, int(connect_timeout_s)),
            "application_name": f"dicom-router {node}",
            # a database that vanished without closing the connection is noticed within ~20 s
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 2,
        }
        self._timeout = connect_timeout_s
        self._reachable = True
        self._spare: psycopg.Connection | None = None  # for trying association slots
        self._spare_lock = threading.Lock()
        self._returned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection -> when last given back
        self._pool = self._new_pool(f"queue-{node}", 1, pool_size)
        # sessions whose commits do not wait for their WAL to reach the disk (`_unsynced`): a
        # connection is opened only once a statement needs one (a receiving process never does)
        self._unsynced_pool = self._new_pool(f"queue-{node}-unsynced", 0, pool_size, _commit_without_waiting)
        try:
            self._migrate()
        except BaseException:
            self._pool.close(timeout=1.0)
            self._unsynced_pool.close(timeout=1.0)
            raise

    # -- connections and schema -------------------------------------------------------------
    def _new_pool(self, name: str, min_size: int, pool_size: int, configure=None) -> ConnectionPool:  # noqa: ANN001
        """A pool of autocommit connections, opened (its connections are made in the background)."""
        pool = ConnectionPool(
            self.url, min_size=min_size, max_size=max(2, pool_size), kwargs={**self._connect, "autocommit": True},
            open=False, configure=configure, check=self._check, reset=self._stamp, timeout=self._timeout,
            name=name, reconnect_timeout=24 * 3600,
        )
        pool.open(wait=False)
        return pool

    def _stamp(self, conn: psycopg.Connection) -> None:
        self._returned[conn] = time.monotonic()

    def _check(self, conn: psycopg.Connection) -> None:
        """A pooled connection idle for a while is tried before use (the database may have
        restarted since); one used a moment ago is not, which saves a round trip per call."""
        if time.monotonic() - self._returned.get(conn, 0.0) > CHECK_IDLE_S:
            ConnectionPool.check_connection(conn)

    @contextmanager
    def _one(self, pool: ConnectionPool | None = None) -> Iterator[psycopg.Connection]:
        """A connection in autocommit: each statement is its own transaction (one round trip).
        While the database is unreachable, callers (a C-STORE, /readyz, a scrape) learn it
        within UNREACHABLE_WAIT_S instead of the whole connect timeout; the pool keeps
        reconnecting meanwhile."""
        timeout = self._timeout if self._reachable else UNREACHABLE_WAIT_S
        try:
            with (pool or self._pool).connection(timeout=timeout) as db:
                yield db
        except (PoolTimeout, psycopg.OperationalError):
            self._reachable = False
            raise
        self._reachable = True

    def _unsynced(self) -> AbstractContextManager[psycopg.Connection]:
        """A connection in autocommit whose commits do not wait for their WAL to reach the disk
        (its session has `synchronous_commit` off): for a statement whose loss when PostgreSQL
        itself stops abruptly costs nothing but a send again; `sync` makes it durable. One
        statement, one round trip (a transaction with SET LOCAL would take three, and its
        client CPU ten times a statement's)."""
        return self._one(self._unsynced_pool)

    def sync(self) -> None:
        """A transaction that writes (it takes a transaction id) commits with its WAL flushed,
        and every commit before it with it."""
        with self._one() as db:
            db.execute("SELECT pg_current_xact_id()")

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        """A connection in a transaction, committed at exit (rolled back on an error)."""
        with self._one() as db, db.transaction():
            yield db

    def _migrate(self) -> None:
        with self._conn() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the queue database {self.location} has schema version {version}; this router knows up to "
                    f"{SCHEMA_VERSION}: upgrade the router (every node) before starting it on this database")
            for step in MIGRATIONS[version:]:
                db.execute(step)
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))

    @property
    def location(self) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info.pop("password", None)
        return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', 5432)}/" \
               f"{info.get('dbname', '')} (node {self.node})"

    def close(self) -> None:
        """Pooled connections belong to the queue, not to a thread: nothing to do per thread."""

    def shutdown(self) -> None:
        """Close every connection (the process is ending)."""
        with self._spare_lock:
            if self._spare is not None:
                self._spare.close()
                self._spare = None
        self._unsynced_pool.close(timeout=2.0)
        self._pool.close(timeout=2.0)

    # -- the cluster -----------------------------------------------------------------------
    def register(self) -> None:
        host = socket.gethostname()
        with self._conn() as db:
            row = db.execute(
                f"SELECT host, pid, {_DB_NOW} - heartbeat_at FROM nodes WHERE name = %s FOR UPDATE", (self.node,)
            ).fetchone()
            if row is not None:
                other_host, other_pid, age = row
                live = age < self.lease_s and (
                    other_host != host or (other_pid != os.getpid() and _pid_alive(other_pid)))
                if live:
                    raise NodeNameInUse(
                        f"node name {self.node!r} is in use by a live node (host {other_host}, pid {other_pid}, "
                        f"heartbeat {age:.0f} s ago): give each node its own [queue] node")
            db.execute(
                f"INSERT INTO nodes (name, host, pid, started_at, heartbeat_at) VALUES (%s, %s, %s, {_DB_NOW}, "
                f"{_DB_NOW}) ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, "
                "started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at",
                (self.node, host, os.getpid()),
            )

    def heartbeat(self) -> int:
        with self._one() as db:
            return db.execute(
                f"WITH beat AS (UPDATE nodes SET heartbeat_at = {_DB_NOW} WHERE name = %s) "
                f"UPDATE jobs SET lease_until = {_DB_NOW} + %s WHERE owner = %s AND state = 'in_flight'",
                (self.node, self.lease_s, self.node),
            ).rowcount

    def leave(self) -> None:
        with self._one() as db:
            db.execute("UPDATE nodes SET heartbeat_at = 0 WHERE name = %s AND pid = %s", (self.node, os.getpid()))

    def nodes(self) -> list[Node]:
        with self._one() as db:
            rows = db.execute(
                f"SELECT n.name, n.host, n.pid, n.started_at, {_DB_NOW} - n.heartbeat_at, "
                "(SELECT COUNT(*) FROM jobs j WHERE j.owner = n.name AND j.state = 'in_flight' "
                f"AND j.lease_until >= {_DB_NOW}) FROM nodes n ORDER BY n.name"
            ).fetchall()
        return [Node(name, host, pid, started, max(0.0, age), held, age < self.lease_s)
                for name, host, pid, started, age, held in rows]

    def take_slot(self, destination: str, ceiling: int) -> Slot | None:
        """Tried on a spare connection kept for the purpose: the one that gets a lock becomes the
        slot's, and only then is another opened (a node waiting for a slot does not open a
        connection per try)."""
        key = _slot_key(destination)
        with self._spare_lock:
            conn, self._spare = self._spare, None
            if conn is None or conn.closed:
                conn = psycopg.connect(self.url, autocommit=True, **self._connect)
            try:
                for number in range(max(1, ceiling)):
                    if conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (key, number)).fetchone()[0]:
                        return _AdvisorySlot(conn)
            except BaseException:
                conn.close()
                raise
            self._spare = conn
            return None

    # -- receiving -------------------------------------------------------------------------
    def _insert(self, db: psycopg.Connection, instance: Instance, jobs: list[NewJob], now: float) -> None:
        """The instance and its jobs in one statement: one round trip, one commit."""
        db.execute(
            "WITH i AS (INSERT INTO instances (path, sop_class_uid, sop_instance_uid, study_instance_uid, "
            "transfer_syntax_uid, calling_ae, called_ae, source_ip, size, received_at, series_instance_uid, "
            "series_number, instance_number, node) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "%s) RETURNING id) "
            "INSERT INTO jobs (instance_id, destination, state, next_attempt_at, updated_at, request, rules_tag, "
            "priority) SELECT i.id, d.destination, 'pending', %s, %s, d.request, d.rules_tag, d.priority FROM i, "
            "unnest(%s::text[], %s::text[], %s::text[], %s::int[]) AS d(destination, request, rules_tag, priority)",
            (instance.path, instance.sop_class_uid, instance.sop_instance_uid, instance.study_instance_uid,
             instance.transfer_syntax_uid, instance.calling_ae, instance.called_ae, instance.source_ip,
             instance.size, instance.received_at, instance.series_instance_uid, instance.series_number,
             instance.instance_number, self.node, now, now,
             [j.destination for j in jobs], [j.request.to_json() for j in jobs], [j.rules_tag for j in jobs],
             [j.priority for j in jobs]),
        )

    # -- forwarding ------------------------------------------------------------------------
    def _claimable(self) -> str:
        """Pending, or in flight under a lease that expired (its node is gone)."""
        return f"(j.state = 'pending' OR (j.state = 'in_flight' AND j.lease_until < {_DB_NOW}))"

    def claim(self, destination: str, limit: int, now: float | None = None,
              holding: Holding = Holding()) -> list[Job]:
        now = time.time() if now is None else now
        # pending, or in flight under a lease that expired (its node is gone)
        where, args = self._due_jobs(holding, destination, now, pending=(
            f"(j.state = 'pending' OR (j.state = 'in_flight' AND j.lease_until < {_DB_NOW}))"))
        order = self._order_keys(holding)
        keys = ", ".join(f"{expression} AS k{n}" for n, expression in enumerate(order))
        # one statement: pick and lock, lease, and return the jobs. Its commit is not waited for:
        # a claim lost with the database gives its jobs back to pending, to be sent (again)
        with self._unsynced() as db:
            rows = db.execute(self._sql(
                f"WITH picked AS (SELECT j.id, j.state AS was, j.owner AS was_owner, {keys} {where} "
                f"ORDER BY {', '.join(order)} LIMIT ? FOR UPDATE OF j SKIP LOCKED) "
                f"UPDATE jobs j SET state = 'in_flight', owner = ?, lease_until = {_DB_NOW} + ?, updated_at = ? "
                f"FROM picked p, instances i WHERE j.id = p.id AND i.id = j.instance_id "
                f"RETURNING {JOB_COLUMNS}, p.was, p.was_owner, {', '.join(f'p.k{n}' for n in range(len(order)))}"),
                (*args, limit, self.node, self.lease_s, now),
            ).fetchall()
        width = len(JOB_COLUMNS.split(", "))
        # the claim order (RETURNING keeps none); NULLs last, as PostgreSQL orders them
        rows.sort(key=lambda r: tuple((v is None, 0 if v is None else v) for v in r[width + 2:]))
        # as the embedded backend: each job as it was when claimed (pending, or in flight elsewhere)
        return [job_from_row((*r[:2], r[width], *r[3:width]), r[width + 1] if r[width] == "in_flight" else "") for r in rows]

    def next_due(self, destination: str, holding: Holding = Holding()) -> float | None:
        """As on one node, and a job in flight on another node is due for takeover when its lease
        ends (database time, expressed on this node's clock)."""
        sql, args = self._next_due_query(destination, holding)
        with self._one() as db:  # one round trip for both
            pending, expires = db.execute(
                f"SELECT ({sql}), (SELECT MIN(lease_until) - {_DB_NOW} FROM jobs WHERE destination = %s "
                "AND state = 'in_flight' AND owner != %s)", (*args, destination, self.node)).fetchone()
        if expires is not None:
            takeover = time.time() + max(0.0, expires)
            pending = takeover if pending is None else min(pending, takeover)
        return pending

    def complete(self, deliveries: Iterable[Delivery | int], durable: bool = True) -> list[str]:
        """Delivered is delivered, whoever holds the lease now (a node that took the job over
        sends it again and finds it gone). The whole batch in one statement; `durable=False`:
        its commit is not waited for (see `JobQueue.complete`)."""
        batch = [d if isinstance(d, Delivery) else Delivery(d) for d in deliveries]
        if not batch:
            return []
        now = time.time()
        ids = [d.job_id for d in batch]
        skipped = [d.outcome is Outcome.SKIPPED for d in batch]
        # one statement, one round trip. Two nodes finishing an instance's last two jobs at the
        # same moment may each still see the other's job and both keep the instance: the
        # heartbeat's `sweep_orphans` removes such an instance (and its file) soon after.
        with (self._one() if durable else self._unsynced()) as db:
            rows = db.execute(_COMPLETE, (
                ids, [d.outcome.value for d in batch], [d.syntax for d in batch],
                [d.transfer_syntax_uid for d in batch], [d.sent_size for d in batch], [d.ratio for d in batch],
                [0 if skip else 1 for skip in skipped], [d.note if skip else None for d, skip in zip(batch, skipped)],
                [d.sent_sop_instance_uid for d in batch], now,
            )).fetchall()
        return [r[0] for r in rows]

    def sweep_orphans(self) -> list[str]:
        """Instances no job needs any more that a concurrent finish left behind (see
        `complete`): deleted; returns their spool paths for the caller to remove. An instance
        always gets its jobs in the statement that records it, so none is ever caught here on
        its way in."""
        with self._one() as db:
            return [r[0] for r in db.execute(
                "DELETE FROM instances i WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.instance_id = i.id) "
                "RETURNING i.path")]

    # -- start-up and operation -------------------------------------------------------------
    def recover(self) -> int:
        """This node's own jobs left in flight go back to pending; other nodes' are theirs until
        their leases expire. Storage commitment claims and holds end by their own times, but for
        this node's relay requests being sent (claimers are named after their node)."""
        with self._conn() as db:
            db.execute("UPDATE relays SET state = 'pending', claimer = '', claimed_until = 0 WHERE state = 'sending' "
                       "AND starts_with(claimer, %s)", (f"{self.node}/",))
            return db.execute(
                "UPDATE jobs SET state = 'pending', owner = '', lease_until = 0, next_attempt_at = "
                "LEAST(next_attempt_at, %s) WHERE state = 'in_flight' AND owner = %s", (time.time(), self.node),
            ).rowcount

    def owners(self, job_ids: Iterable[int]) -> dict[int, str]:
        """Which node holds each of these jobs in flight (for `dicom-router queue`)."""
        with self._one() as db:
            return dict(db.execute("SELECT id, owner FROM jobs WHERE id = ANY(%s) AND state = 'in_flight'",
                                   (list(job_ids),)).fetchall())

    # -- the dialect of the verbs both backends share (router.queue.dialect) ---------------------
    _FOR_UPDATE = " FOR UPDATE"
    _LOCK_JOBS = " FOR UPDATE OF j"
    _INSERTION_ORDER = "id"
    _GREATEST = "GREATEST"
    _UNLEASE = ", owner = '', lease_until = 0"

    def _mine(self, alias: str) -> tuple[str, list]:
        """A stale owner's late word (retry, dead letter, release) on a job taken over is ignored."""
        return f" AND {alias}owner = ?", [self.node]

    def _received_here(self) -> tuple[str, list]:
        return " WHERE node = ?", [self.node]

    def _statement(self) -> AbstractContextManager[psycopg.Connection]:
        return self._one()

    def _reading(self) -> AbstractContextManager[psycopg.Connection]:
        return self._one()

    def _writing(self) -> AbstractContextManager[psycopg.Connection]:
        return self._conn()

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def _many(self, db: psycopg.Connection, sql: str, rows: list[tuple]) -> None:
        with db.cursor() as cur:
            cur.executemany(sql, rows)

    def _one_request_at_a_time(self, db: psycopg.Connection, transaction_uid: str) -> None:
        """Requests with one Transaction UID are decided one after the other, across nodes."""
        db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_SCHEMA_LOCK, _slot_key(transaction_uid)))
