"""The embedded queue backend: SQLite in the spool (WAL, synchronous=FULL), one node.

Threads of one process serialise writes on a lock, processes (several receivers, the
forwarders) on a file lock next to the database, so that SQLite's busy handler never sleeps.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from router.queue import Instance, Job, NewJob, Queue
from router.request import Request

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    called_ae TEXT NOT NULL DEFAULT '',
    source_ip TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    instance_id INTEGER NOT NULL REFERENCES instances(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'in_flight', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    request TEXT NOT NULL DEFAULT '',
    rules_tag TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_instance ON jobs (instance_id);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (sop_instance_uid);
"""

# A job waits while an earlier-received instance with the same SOP Instance UID still has a job
# pending or in flight to the same destination: versions of an image arrive in the order received.
_IN_ORDER = (
    "NOT EXISTS (SELECT 1 FROM instances e JOIN jobs k ON k.instance_id = e.id "
    "WHERE e.sop_instance_uid = i.sop_instance_uid AND e.id < i.id AND k.destination = j.destination "
    "AND k.state IN ('pending', 'in_flight'))"
)


_JOB_COLUMNS = (
    "j.id, j.destination, j.state, j.attempts, j.next_attempt_at, j.last_error, j.request, j.rules_tag, "
    "i.path, i.sop_class_uid, i.sop_instance_uid, i.study_instance_uid, i.transfer_syntax_uid, "
    "i.calling_ae, i.called_ae, i.source_ip, i.size, i.received_at"
)


def _job(row: tuple) -> Job:
    request = Request.from_json(row[6]) if row[6] else None
    return Job(*row[:6], request, row[7], instance=Instance(*row[8:]))


class SqliteQueue(Queue):
    """Thread-safe: each thread gets its own SQLite connection."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._lock_fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._db().executescript(SCHEMA)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    class _Tx:
        """A write transaction. Threads of one process queue on a lock instead of SQLite's busy
        handler, which sleeps in steps of up to 100 ms when writers collide."""

        def __init__(self, db: sqlite3.Connection, lock: threading.Lock, lock_fd: int) -> None:
            self.db, self.lock, self.lock_fd = db, lock, lock_fd

        def __enter__(self) -> sqlite3.Connection:
            self.lock.acquire()
            try:
                # and processes (several receivers, the forwarders) queue on a file lock
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
                try:
                    self.db.execute("BEGIN IMMEDIATE")
                except BaseException:
                    fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
                    raise
            except BaseException:
                self.lock.release()
                raise
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
            try:
                self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
                self.lock.release()

    def _tx(self) -> _Tx:
        return self._Tx(self._db(), self._write_lock, self._lock_fd)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- receiving -------------------------------------------------------------------------
    @property
    def location(self) -> str:
        return str(self.path)

    def add(self, instance: Instance, jobs: Iterable[NewJob]) -> None:
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO instances (path, sop_class_uid, sop_instance_uid, study_instance_uid, "
                "transfer_syntax_uid, calling_ae, called_ae, source_ip, size, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    instance.path,
                    instance.sop_class_uid,
                    instance.sop_instance_uid,
                    instance.study_instance_uid,
                    instance.transfer_syntax_uid,
                    instance.calling_ae,
                    instance.called_ae,
                    instance.source_ip,
                    instance.size,
                    instance.received_at,
                ),
            )
            instance_id = int(cur.lastrowid)
            db.executemany(
                "INSERT INTO jobs (instance_id, destination, state, next_attempt_at, updated_at, request, rules_tag) "
                "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                [(instance_id, j.destination, now, now, j.request.to_json(), j.rules_tag) for j in jobs],
            )

    # -- forwarding ------------------------------------------------------------------------
    def claim(self, destination: str, limit: int, now: float | None = None) -> list[Job]:
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN instances i ON i.id = j.instance_id "
                f"WHERE j.destination = ? AND j.state = 'pending' AND j.next_attempt_at <= ? AND {_IN_ORDER} "
                "ORDER BY j.next_attempt_at, j.id LIMIT ?",
                (destination, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = 'in_flight', updated_at = ? WHERE id = ?", [(now, r[0]) for r in rows]
            )
        return [_job(r) for r in rows]

    def next_due(self, destination: str) -> float | None:
        row = self._db().execute(
            "SELECT MIN(j.next_attempt_at) FROM jobs j JOIN instances i ON i.id = j.instance_id "
            f"WHERE j.destination = ? AND j.state = 'pending' AND {_IN_ORDER}", (destination,)
        ).fetchone()
        return row[0]

    def due_count(self, destination: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return self._db().execute(
            "SELECT COUNT(*) FROM jobs j JOIN instances i ON i.id = j.instance_id "
            f"WHERE j.destination = ? AND j.state = 'pending' AND j.next_attempt_at <= ? AND {_IN_ORDER}",
            (destination, now),
        ).fetchone()[0]

    def complete(self, job_ids: Iterable[int]) -> list[str]:
        with self._tx() as db:
            paths = [self._finish(db, job_id) for job_id in job_ids]
        return [p for p in paths if p]

    def _finish(self, db: sqlite3.Connection, job_id: int) -> str | None:
        row = db.execute(
            "SELECT j.instance_id, i.path FROM jobs j JOIN instances i ON i.id = j.instance_id WHERE j.id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            return None
        instance_id, path = row
        db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        if db.execute("SELECT 1 FROM jobs WHERE instance_id = ? LIMIT 1", (instance_id,)).fetchone():
            return None
        db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
        return path

    def release(self, job_ids: Iterable[int]) -> None:
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET state = 'pending', updated_at = ? WHERE id = ? AND state = 'in_flight'",
                [(now, i) for i in job_ids],
            )

    def retry(self, job_id: int, error: str, next_attempt_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'pending', attempts = attempts + 1, next_attempt_at = ?, last_error = ?, "
                "updated_at = ? WHERE id = ?",
                (next_attempt_at, error, time.time(), job_id),
            )

    def dead(self, job_id: int, error: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'dead', attempts = attempts + 1, last_error = ?, updated_at = ? WHERE id = ?",
                (error, time.time(), job_id),
            )

    # -- start-up and operation -------------------------------------------------------------
    def recover(self) -> int:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'pending', next_attempt_at = MIN(next_attempt_at, ?) WHERE state = 'in_flight'",
                (time.time(),),
            )
            # instances whose every job finished but whose row survived (should not happen)
            db.execute("DELETE FROM instances WHERE id NOT IN (SELECT instance_id FROM jobs)")
            return cur.rowcount

    def paths(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT path FROM instances")]

    def fail_missing_files(self, exists: Callable[[str], bool]) -> int:
        missing = [(i, p) for i, p in self._db().execute("SELECT id, path FROM instances") if not exists(p)]
        with self._tx() as db:
            for instance_id, path in missing:
                db.execute(
                    "UPDATE jobs SET state = 'dead', last_error = ?, updated_at = ? WHERE instance_id = ?",
                    (f"spool file missing: {path}", time.time(), instance_id),
                )
        return len(missing)

    def counts(self) -> dict[tuple[str, str], int]:
        return {
            (d, s): n
            for d, s, n in self._db().execute("SELECT destination, state, COUNT(*) FROM jobs GROUP BY destination, state")
        }

    def oldest_pending(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        return {
            d: max(0.0, now - t)
            for d, t in self._db().execute(
                "SELECT j.destination, MIN(i.received_at) FROM jobs j JOIN instances i ON i.id = j.instance_id "
                "WHERE j.state IN ('pending', 'in_flight') GROUP BY j.destination"
            )
        }

    def jobs(self, destination: str | None = None, state: str | None = None, limit: int = 1000) -> list[Job]:
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN instances i ON i.id = j.instance_id WHERE 1=1"
        args: list = []
        if destination:
            sql += " AND j.destination = ?"
            args.append(destination)
        if state:
            sql += " AND j.state = ?"
            args.append(state)
        sql += " ORDER BY j.id LIMIT ?"
        args.append(limit)
        return [_job(r) for r in self._db().execute(sql, args)]

    def retry_dead(self, destination: str | None = None, job_ids: Iterable[int] | None = None) -> int:
        sql = "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ? WHERE state = 'dead'"
        now = time.time()
        args: list = [now, now]
        if destination:
            sql += " AND destination = ?"
            args.append(destination)
        ids = list(job_ids or [])
        if ids:
            sql += f" AND id IN ({','.join('?' * len(ids))})"
            args.extend(ids)
        with self._tx() as db:
            return db.execute(sql, args).rowcount
