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
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Iterable
from pathlib import Path

from router.queue import Delivery, Holding, Instance, Job, NewJob, Queue
from router.queue import schema
from router.queue.commitments import CommitmentStore
from router.queue.jobs import HISTORY_FROM_JOB, JobStore
from router.queue.reading import JOB_COLUMNS, ReadingStore, job_from_row
from router.request import Outcome

SCHEMA = schema.SQLITE
# columns added after the first release: (table, column, definition)
_ADDED_COLUMNS = (
    ("instances", "series_instance_uid", "TEXT NOT NULL DEFAULT ''"),
    ("instances", "series_number", "INTEGER"),
    ("instances", "instance_number", "INTEGER"),
    ("jobs", "priority", "INTEGER NOT NULL DEFAULT 1"),
)
# indexes on added columns, made once the columns exist
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS jobs_by_priority ON jobs (destination, state, priority, next_attempt_at);"


class SqliteQueue(JobStore, ReadingStore, CommitmentStore, Queue):
    """Thread-safe: each thread gets its own SQLite connection."""

    def __init__(self, path: Path, history_days: float = 7) -> None:
        self.path = Path(path)
        self.history_s = history_days * 86400
        self._pruned_at = 0.0
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._lock_fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            db = self._db()
            db.executescript(SCHEMA)
            for table, column, definition in _ADDED_COLUMNS:
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            db.executescript(_ADDED_INDEXES)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _db(self, durable: bool = True) -> sqlite3.Connection:
        """This thread's connection; `durable=False`: its other one, whose COMMITs are not
        fsynced (synchronous=NORMAL: a crash of the process loses nothing, a power cut the
        last of them, until a durable COMMIT or `sync`)."""
        name = "db" if durable else "db_unsynced"
        db = getattr(self._local, name, None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            setattr(self._local, name, db)
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

    def _tx(self, durable: bool = True) -> _Tx:
        """A write transaction; `durable=False` for one whose loss at a power cut costs nothing
        (its COMMIT is not fsynced: WAL with synchronous=NORMAL; a crash of the process loses
        nothing either way, and the next durable COMMIT makes it durable too)."""
        return self._Tx(self._db(durable), self._write_lock, self._lock_fd)

    def sync(self) -> None:
        """fsync the write-ahead log: the commits made without one (synchronous=NORMAL) are in it,
        or were checkpointed into the database, which a checkpoint syncs."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no log: every commit so far was checkpointed, and synced with it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        for name in ("db", "db_unsynced"):
            db = getattr(self._local, name, None)
            if db is not None:
                db.close()
                setattr(self._local, name, None)

    # -- receiving -------------------------------------------------------------------------
    @property
    def location(self) -> str:
        return str(self.path)

    def _insert(self, db: sqlite3.Connection, instance: Instance, jobs: list[NewJob], now: float) -> None:
        """The instance and its jobs (see `JobStore.add`)."""
        cur = db.execute(
            "INSERT INTO instances (path, sop_class_uid, sop_instance_uid, study_instance_uid, "
            "transfer_syntax_uid, calling_ae, called_ae, source_ip, size, received_at, series_instance_uid, "
            "series_number, instance_number) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                instance.series_instance_uid,
                instance.series_number,
                instance.instance_number,
            ),
        )
        instance_id = int(cur.lastrowid)
        db.executemany(
            "INSERT INTO jobs (instance_id, destination, state, next_attempt_at, updated_at, request, rules_tag, "
            "priority) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?)",
            [(instance_id, j.destination, now, now, j.request.to_json(), j.rules_tag, j.priority) for j in jobs],
        )

    # -- forwarding ------------------------------------------------------------------------
    def claim(self, destination: str, limit: int, now: float | None = None,
              holding: Holding = Holding()) -> list[Job]:
        now = time.time() if now is None else now
        where, args = self._due_jobs(holding, destination, now)
        # 'in_flight' is undone by recover() at start-up whatever was made durable: no fsync
        with self._tx(durable=False) as db:
            rows = db.execute(
                f"SELECT {JOB_COLUMNS} {where} ORDER BY {', '.join(self._order_keys(holding))} LIMIT ?",
                (*args, limit),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = 'in_flight', updated_at = ? WHERE id = ?", [(now, r[0]) for r in rows]
            )
        return [job_from_row(r) for r in rows]

    def complete(self, deliveries: Iterable[Delivery | int], durable: bool = True) -> list[str]:
        now = time.time()
        with self._tx(durable) as db:
            paths = [self._finish(db, d if isinstance(d, Delivery) else Delivery(d), now) for d in deliveries]
        return [p for p in paths if p]

    def _finish(self, db: sqlite3.Connection, delivery: Delivery, now: float) -> str | None:
        job_id = delivery.job_id
        skipped = delivery.outcome is Outcome.SKIPPED
        db.execute(HISTORY_FROM_JOB, (
            delivery.outcome.value, delivery.syntax, delivery.transfer_syntax_uid, delivery.sent_size, delivery.ratio,
            0 if skipped else 1, delivery.note if skipped else None, now, delivery.sent_sop_instance_uid, job_id,
        ))
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

    # -- start-up and operation -------------------------------------------------------------
    def recover(self) -> int:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'pending', next_attempt_at = MIN(next_attempt_at, ?) WHERE state = 'in_flight'",
                (time.time(),),
            )
            resumed = cur.rowcount
            # no process holds an association or a report claim across a restart
            db.execute("UPDATE commitments SET state = 'pending', holder = '', held_until = 0, claimed_until = 0 "
                       "WHERE state IN ('pending', 'reporting')")
            db.execute("UPDATE relays SET state = 'pending', claimer = '', claimed_until = 0 WHERE state = 'sending'")
            # instances whose every job finished but whose row survived (should not happen)
            db.execute("DELETE FROM instances WHERE id NOT IN (SELECT instance_id FROM jobs)")
            return resumed

    # -- the dialect of the verbs both backends share (router.queue.dialect) ---------------------
    def _reading(self) -> AbstractContextManager[sqlite3.Connection]:
        return nullcontext(self._db())

    def _writing(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._tx()
