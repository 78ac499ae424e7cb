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
from collections.abc import Callable, Iterable
from pathlib import Path

from router.queue import (
    HELD_BY_DELAY, HELD_FOR_STABLE_STUDY, Delivery, Holding, Instance, Job, NewJob, Queue,
)
from router.queue.commitments import CommitmentStore
from router.queue.reading import HISTORY_COLUMNS, JOB_COLUMNS, ReadingStore, job_from_row
from router.request import Outcome

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
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    outcome TEXT NOT NULL,
    syntax TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid TEXT NOT NULL DEFAULT '',
    received_size INTEGER NOT NULL,
    sent_size INTEGER,
    ratio REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    series_instance_uid TEXT NOT NULL DEFAULT '',
    sop_instance_uid TEXT NOT NULL,
    sent_sop_instance_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS history_sop ON history (sop_instance_uid);
CREATE INDEX IF NOT EXISTS history_sent_sop ON history (sent_sop_instance_uid);
CREATE INDEX IF NOT EXISTS history_study ON history (study_instance_uid);
CREATE INDEX IF NOT EXISTS history_series ON history (series_instance_uid);
CREATE INDEX IF NOT EXISTS history_finished ON history (finished_at);
CREATE TABLE IF NOT EXISTS commitments (
    id INTEGER PRIMARY KEY,
    transaction_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    deadline REAL NOT NULL,
    duplicate INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('pending', 'reporting', 'reported')),
    holder TEXT NOT NULL DEFAULT '',
    held_until REAL NOT NULL DEFAULT 0,
    claimed_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    event_type INTEGER,
    reported_at REAL
);
CREATE INDEX IF NOT EXISTS commitments_state ON commitments (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS commitments_transaction ON commitments (transaction_uid);
CREATE TABLE IF NOT EXISTS commitment_instances (
    commitment_id INTEGER NOT NULL REFERENCES commitments(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (commitment_id, position)
);
CREATE TABLE IF NOT EXISTS relays (
    id INTEGER PRIMARY KEY,
    commitment_id INTEGER NOT NULL REFERENCES commitments(id) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    transaction_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'answered', 'refused')),
    created_at REAL NOT NULL,
    claimer TEXT NOT NULL DEFAULT '',
    claimed_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    answered_at REAL
);
CREATE INDEX IF NOT EXISTS relays_state ON relays (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS relays_commitment ON relays (commitment_id);
CREATE TABLE IF NOT EXISTS relay_instances (
    relay_id INTEGER NOT NULL REFERENCES relays(id) ON DELETE CASCADE,
    commitment_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sent_sop_instance_uid TEXT NOT NULL,
    result INTEGER,
    UNIQUE (commitment_id, destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS relay_instances_relay ON relay_instances (relay_id);
"""
# columns added after the first release: (table, column, definition)
_ADDED_COLUMNS = (
    ("instances", "series_instance_uid", "TEXT NOT NULL DEFAULT ''"),
    ("instances", "series_number", "INTEGER"),
    ("instances", "instance_number", "INTEGER"),
    ("jobs", "priority", "INTEGER NOT NULL DEFAULT 1"),
)
# indexes on added columns, made once the columns exist
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS jobs_by_priority ON jobs (destination, state, priority, next_attempt_at);"


# a history row from a job and its instance; the parameters: outcome, syntax, transfer syntax UID,
# sent size, ratio, attempts added to the job's, last error (NULL: the job's), finished at, sent UID, job id
_HISTORY_FROM_JOB = (
    f"INSERT INTO history ({HISTORY_COLUMNS}) "
    "SELECT j.destination, ?, ?, ?, i.size, ?, ?, j.attempts + ?, COALESCE(?, j.last_error), i.received_at, ?, "
    "i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid, ?, i.sop_class_uid, i.calling_ae "
    "FROM jobs j JOIN instances i ON i.id = j.instance_id WHERE j.id = ?"
)

# A job waits while an earlier-received instance with the same SOP Instance UID still has a job
# pending or in flight to the same destination: versions of an image arrive in the order received.
_IN_ORDER = (
    "NOT EXISTS (SELECT 1 FROM instances e JOIN jobs k ON k.instance_id = e.id "
    "WHERE e.sop_instance_uid = i.sop_instance_uid AND e.id < i.id AND k.destination = j.destination "
    "AND k.state IN ('pending', 'in_flight'))"
)





# When a pending job is due, in SQL over `jobs j JOIN instances i` and `_studies`: its retry time,
# its instance's receipt plus the destination's delay, and (study_stable) the last receipt of an
# instance of its study still to go to the destination plus study_stable.
_STUDIES = (
    "LEFT JOIN (SELECT e.study_instance_uid AS uid, MAX(e.received_at) AS last, MIN(e.id) AS first "
    "FROM jobs k JOIN instances e ON e.id = k.instance_id WHERE k.destination = ? "
    "AND k.state IN ('pending', 'in_flight') AND e.study_instance_uid != '' GROUP BY e.study_instance_uid) s "
    "ON s.uid = i.study_instance_uid"
)


def _studies(holding: Holding, destination: str) -> tuple[str, list]:
    """The join that due times and the claim order need under `holding` (each study's last
    receipt and first instance, computed once per query), and its parameters."""
    return (_STUDIES, [destination]) if holding.study_stable_s > 0 else ("", [])


def _due_at(holding: Holding) -> tuple[str, list[float]]:
    """The SQL expression of a job's due time under `holding`, and its parameters."""
    if holding.study_stable_s > 0:
        return ("MAX(j.next_attempt_at, i.received_at + ?, COALESCE(s.last, i.received_at) + ?)",
                [holding.delay_s, holding.study_stable_s])
    if holding.delay_s > 0:
        return "MAX(j.next_attempt_at, i.received_at + ?)", [holding.delay_s]
    return "j.next_attempt_at", []


def _claim_order(holding: Holding) -> str:
    """High priority first; a stable study whole, in series and instance number order."""
    if holding.study_stable_s > 0:
        return "j.priority, COALESCE(s.first, i.id), i.series_number, i.series_instance_uid, i.instance_number, j.id"
    return "j.priority, j.next_attempt_at, j.id"


class SqliteQueue(ReadingStore, CommitmentStore, Queue):
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
        jobs = list(jobs)
        with self._tx() as db:
            self._prune(db, now)
            if not jobs:
                self._not_forwarded(db, instance, now)
                return
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
        studies, study_args = _studies(holding, destination)
        due_at, args = _due_at(holding)
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs j JOIN instances i ON i.id = j.instance_id {studies} "
                f"WHERE j.destination = ? AND j.state = 'pending' AND j.next_attempt_at <= ? AND {due_at} <= ? "
                f"AND {_IN_ORDER} ORDER BY {_claim_order(holding)} LIMIT ?",
                (*study_args, destination, now, *args, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = 'in_flight', updated_at = ? WHERE id = ?", [(now, r[0]) for r in rows]
            )
        return [job_from_row(r) for r in rows]

    def next_due(self, destination: str, holding: Holding = Holding()) -> float | None:
        studies, study_args = _studies(holding, destination)
        due_at, args = _due_at(holding)
        row = self._db().execute(
            f"SELECT MIN({due_at}) FROM jobs j JOIN instances i ON i.id = j.instance_id {studies} "
            f"WHERE j.destination = ? AND j.state = 'pending' AND {_IN_ORDER}", (*args, *study_args, destination)
        ).fetchone()
        return row[0]

    def due_count(self, destination: str, now: float | None = None, holding: Holding = Holding(),
                  priority: int | None = None) -> int:
        now = time.time() if now is None else now
        studies, study_args = _studies(holding, destination)
        due_at, args = _due_at(holding)
        return self._db().execute(
            f"SELECT COUNT(*) FROM jobs j JOIN instances i ON i.id = j.instance_id {studies} "
            f"WHERE j.destination = ? AND j.state = 'pending' AND j.next_attempt_at <= ? AND {due_at} <= ? "
            f"AND j.priority <= ? AND {_IN_ORDER}",
            (*study_args, destination, now, *args, now, 2 if priority is None else priority),
        ).fetchone()[0]

    def held(self, destination: str, now: float | None = None, holding: Holding = Holding()) -> dict[str, int]:
        now = time.time() if now is None else now
        if holding.delay_s <= 0 and holding.study_stable_s <= 0:
            return {}
        stable_only = Holding(0.0, holding.study_stable_s)
        studies, study_args = _studies(stable_only, destination)
        stable, stable_args = _due_at(stable_only)
        delayed, in_study = self._db().execute(
            "SELECT COALESCE(SUM(i.received_at + ? > ?), 0), "
            f"COALESCE(SUM(i.received_at + ? <= ? AND {stable} > ?), 0) "
            f"FROM jobs j JOIN instances i ON i.id = j.instance_id {studies} "
            "WHERE j.destination = ? AND j.state = 'pending' AND j.next_attempt_at <= ?",
            (holding.delay_s, now, holding.delay_s, now, *stable_args, now, *study_args, destination, now),
        ).fetchone()
        return {reason: n for reason, n in ((HELD_BY_DELAY, delayed), (HELD_FOR_STABLE_STUDY, in_study)) if n}

    def complete(self, deliveries: Iterable[Delivery | int]) -> list[str]:
        now = time.time()
        with self._tx() as db:
            paths = [self._finish(db, d if isinstance(d, Delivery) else Delivery(d), now) for d in deliveries]
        return [p for p in paths if p]

    def _finish(self, db: sqlite3.Connection, delivery: Delivery, now: float) -> str | None:
        job_id = delivery.job_id
        skipped = delivery.outcome is Outcome.SKIPPED
        db.execute(_HISTORY_FROM_JOB, (
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
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'dead', attempts = attempts + 1, last_error = ?, updated_at = ? WHERE id = ?",
                (error, now, job_id),
            )
            self._dead_history(db, job_id, now)

    @staticmethod
    def _dead_history(db: sqlite3.Connection, job_id: int, now: float) -> None:
        db.execute(_HISTORY_FROM_JOB, (Outcome.DEAD.value, "", "", None, None, 0, None, now, "", job_id))

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

    def fail_missing_files(self, exists: Callable[[str], bool]) -> int:
        missing = [(i, p) for i, p in self._db().execute("SELECT id, path FROM instances") if not exists(p)]
        now = time.time()
        with self._tx() as db:
            for instance_id, path in missing:
                fresh = [r[0] for r in db.execute(
                    "SELECT id FROM jobs WHERE instance_id = ? AND state != 'dead'", (instance_id,))]
                db.execute(
                    "UPDATE jobs SET state = 'dead', last_error = ?, updated_at = ? WHERE instance_id = ?",
                    (f"spool file missing: {path}", now, instance_id),
                )
                for job_id in fresh:
                    self._dead_history(db, job_id, now)
        return len(missing)

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

    def purge_dead(self, destination: str | None = None, older_than: float | None = None) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs j JOIN instances i ON i.id = j.instance_id WHERE j.state = 'dead'"
        args: list = []
        if destination:
            sql += " AND j.destination = ?"
            args.append(destination)
        if older_than is not None:
            sql += " AND j.updated_at < ?"
            args.append(older_than)
        with self._tx() as db:
            rows = db.execute(sql, args).fetchall()
            purged = [job_from_row(r) for r in rows]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(job.id,) for job in purged])
            db.execute("DELETE FROM instances WHERE id NOT IN (SELECT instance_id FROM jobs)")
        return purged

    # -- history ----------------------------------------------------------------------------

    # -- the dialect of the verbs both backends share (router.queue.dialect) ---------------------
    def _reading(self) -> AbstractContextManager[sqlite3.Connection]:
        return nullcontext(self._db())

    def _writing(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._tx()
