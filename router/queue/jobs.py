"""The job SQL written once for both backends: when a pending job is due (its retry time, the
destination's delay and study_stable, versions of one image in order), the counts and the
verbs whose statements are the same on SQLite and PostgreSQL but for the dialect
(`router.queue.dialect`). What truly differs stays in the backends: adding an instance, the
claim (a plain transaction on SQLite; `SKIP LOCKED` and a lease on PostgreSQL) and completion.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from router.queue import Holding, Instance, Job, NewJob
from router.queue.dialect import CHUNK, SqlDialect, marks
from router.queue.group import GroupCommit
from router.queue.reading import HISTORY_COLUMNS, JOB_COLUMNS, job_from_row
from router.request import Outcome, Reason

# a history row from a job and its instance; the parameters: outcome, syntax, transfer syntax UID,
# sent size, ratio, attempts added to the job's, last error (NULL: the job's), finished at, sent UID, job id
HISTORY_FROM_JOB = (
    f"INSERT INTO history ({HISTORY_COLUMNS}) "
    "SELECT j.destination, ?, ?, ?, i.size, ?, ?, j.attempts + ?, COALESCE(?, j.last_error), i.received_at, ?, "
    "i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid, ?, i.sop_class_uid, i.calling_ae "
    "FROM jobs j JOIN instances i ON i.id = j.instance_id WHERE j.id = ?"
)

# A job waits while an earlier-received instance with the same SOP Instance UID still has a job
# pending or in flight to the same destination: versions of an image arrive in the order received.
IN_ORDER = (
    "NOT EXISTS (SELECT 1 FROM instances e JOIN jobs k ON k.instance_id = e.id "
    "WHERE e.sop_instance_uid = i.sop_instance_uid AND e.id < i.id AND k.destination = j.destination "
    "AND k.state IN ('pending', 'in_flight'))"
)

# Each study's last and first receipt and first instance among the jobs still to go to one
# destination, computed once per query, over `jobs j JOIN instances i`.
_STUDIES = (
    "LEFT JOIN (SELECT e.study_instance_uid AS uid, MAX(e.received_at) AS last, MIN(e.received_at) AS began, "
    "MIN(e.id) AS first "
    "FROM jobs k JOIN instances e ON e.id = k.instance_id WHERE k.destination = ? "
    "AND k.state IN ('pending', 'in_flight') AND e.study_instance_uid != '' GROUP BY e.study_instance_uid) s "
    "ON s.uid = i.study_instance_uid"
)
_FROM_JOBS = "FROM jobs j JOIN instances i ON i.id = j.instance_id"


class JobStore(SqlDialect):
    """The job verbs of `router.queue.JobQueue` that read and write the same way on both
    backends, for a backend that gives its dialect (and `_prune`, `_not_forwarded`: the
    history's, `router.queue.reading`)."""

    # -- receiving
    _made_lock = threading.Lock()

    def add(self, instance: Instance, jobs: Iterable[NewJob]) -> None:
        """Record a received instance and its jobs (none: a history row, "not forwarded"); returns
        once they are durable. Receipts that arrive together share one transaction (group commit)."""
        receipts = self.__dict__.get("_receipts")
        if receipts is None:
            with JobStore._made_lock:
                receipts = self.__dict__.setdefault("_receipts", GroupCommit(self._add_all))
        receipts.submit((instance, list(jobs)))

    def _add_all(self, receipts: list[tuple[Instance, list[NewJob]]]) -> None:
        now = time.time()
        # one receipt: one statement where the backend can (its own transaction); several: one
        # transaction for them all
        with (self._statement() if len(receipts) == 1 else self._writing()) as db:
            self._prune(db, now)
            for instance, jobs in receipts:
                if jobs:
                    self._insert(db, instance, jobs, now)
                else:
                    self._not_forwarded(db, instance, now)

    def _insert(self, db, instance: Instance, jobs: list[NewJob], now: float) -> None:  # noqa: ANN001
        """Record the instance and its jobs on `db`, in the transaction `add` holds."""
        raise NotImplementedError

    # -- when a job is due
    def _studies(self, holding: Holding, destination: str) -> tuple[str, list]:
        """The join that due times and the claim order need under `holding`, and its parameters."""
        return (_STUDIES, [destination]) if holding.study_stable_s > 0 else ("", [])

    def _due_at(self, holding: Holding) -> tuple[str, list[float]]:
        """The SQL expression of a job's due time under `holding`, and its parameters: its retry
        time, its instance's receipt plus the delay, and (study_stable) the last receipt of an
        instance of its study still to go plus study_stable, or the first such receipt plus
        study_stable_max when that comes first (a study that never becomes stable goes then)."""
        if holding.study_stable_s > 0 and holding.study_stable_max_s > 0:
            stable, forced = "COALESCE(s.last, i.received_at) + ?", "COALESCE(s.began, i.received_at) + ?"
            bounds = [holding.study_stable_s, holding.study_stable_max_s]
            return (f"{self._GREATEST}(j.next_attempt_at, i.received_at + ?, "
                    f"CASE WHEN {stable} <= {forced} THEN {stable} ELSE {forced} END)",
                    [holding.delay_s, *bounds, *bounds])
        if holding.study_stable_s > 0:
            return (f"{self._GREATEST}(j.next_attempt_at, i.received_at + ?, COALESCE(s.last, i.received_at) + ?)",
                    [holding.delay_s, holding.study_stable_s])
        if holding.delay_s > 0:
            return f"{self._GREATEST}(j.next_attempt_at, i.received_at + ?)", [holding.delay_s]
        return "j.next_attempt_at", []

    @staticmethod
    def _order_keys(holding: Holding) -> list[str]:
        """High priority first; a stable study whole, in series and instance number order."""
        if holding.study_stable_s > 0:
            return ["j.priority", "COALESCE(s.first, i.id)", "i.series_number", "i.series_instance_uid",
                    "i.instance_number", "j.id"]
        return ["j.priority", "j.next_attempt_at", "j.id"]

    def _due_jobs(self, holding: Holding, destination: str, now: float, pending: str = "j.state = 'pending'",
                  ) -> tuple[str, list]:
        """`FROM ... WHERE ...` of the jobs of `destination` due at `now` (`pending`: which states
        may be claimed), and its parameters."""
        studies, study_args = self._studies(holding, destination)
        due_at, args = self._due_at(holding)
        return (f"{_FROM_JOBS} {studies} WHERE j.destination = ? AND {pending} AND j.next_attempt_at <= ? "
                f"AND {due_at} <= ? AND {IN_ORDER}", [*study_args, destination, now, *args, now])

    def next_due(self, destination: str, holding: Holding = Holding()) -> float | None:
        sql, args = self._next_due_query(destination, holding)
        with self._reading() as db:
            return db.execute(sql, args).fetchone()[0]

    def _next_due_query(self, destination: str, holding: Holding) -> tuple[str, tuple]:
        """The statement of `next_due` (in this backend's placeholders) and its parameters."""
        studies, study_args = self._studies(holding, destination)
        due_at, args = self._due_at(holding)
        return (self._sql(f"SELECT MIN({due_at}) {_FROM_JOBS} {studies} WHERE j.destination = ? "
                          f"AND j.state = 'pending' AND {IN_ORDER}"), (*args, *study_args, destination))

    def due_count(self, destination: str, now: float | None = None, holding: Holding = Holding(),
                  priority: int | None = None) -> int:
        now = time.time() if now is None else now
        where, args = self._due_jobs(holding, destination, now)
        with self._reading() as db:
            return db.execute(self._sql(f"SELECT COUNT(*) {where} AND j.priority <= ?"),
                              (*args, 2 if priority is None else priority)).fetchone()[0]

    def held(self, destination: str, now: float | None = None, holding: Holding = Holding()) -> dict[str, int]:
        now = time.time() if now is None else now
        if holding.delay_s <= 0 and holding.study_stable_s <= 0:
            return {}
        stable_only = Holding(0.0, holding.study_stable_s, holding.study_stable_max_s)
        studies, study_args = self._studies(stable_only, destination)
        stable, stable_args = self._due_at(stable_only)
        with self._reading() as db:
            delayed, in_study = db.execute(self._sql(
                "SELECT COALESCE(SUM(CASE WHEN i.received_at + ? > ? THEN 1 ELSE 0 END), 0), "
                f"COALESCE(SUM(CASE WHEN i.received_at + ? <= ? AND {stable} > ? THEN 1 ELSE 0 END), 0) "
                f"{_FROM_JOBS} {studies} WHERE j.destination = ? AND j.state = 'pending' AND j.next_attempt_at <= ?"),
                (holding.delay_s, now, holding.delay_s, now, *stable_args, now, *study_args, destination, now),
            ).fetchone()
        return {reason.value: int(n) for reason, n in ((Reason.DELAY, delayed), (Reason.STUDY_STABLE, in_study)) if n}

    # -- a job's outcome other than delivered
    def release(self, job_ids: Iterable[int]) -> None:
        ids = list(job_ids)
        if not ids:
            return
        mine, mine_args = self._mine("")
        with self._statement() as db:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                db.execute(self._sql(
                    f"UPDATE jobs SET state = 'pending'{self._UNLEASE}, updated_at = ? "
                    f"WHERE id IN ({marks(chunk)}) AND state = 'in_flight'{mine}"), (time.time(), *chunk, *mine_args))

    def retry(self, job_id: int, error: str, next_attempt_at: float) -> None:
        mine, mine_args = self._mine("")
        with self._statement() as db:
            db.execute(self._sql(
                f"UPDATE jobs SET state = 'pending'{self._UNLEASE}, attempts = attempts + 1, next_attempt_at = ?, "
                f"last_error = ?, updated_at = ? WHERE id = ?{mine}"),
                (next_attempt_at, error, time.time(), job_id, *mine_args))

    def dead(self, job_id: int, error: str) -> None:
        now = time.time()
        mine, mine_args = self._mine("")
        with self._writing() as db:
            if db.execute(self._sql(
                f"UPDATE jobs SET state = 'dead'{self._UNLEASE}, attempts = attempts + 1, last_error = ?, "
                f"updated_at = ? WHERE id = ?{mine}"), (error, now, job_id, *mine_args),
            ).rowcount:
                self._dead_history(db, job_id, now)

    def _dead_history(self, db, job_id: int, now: float) -> None:  # noqa: ANN001 - the backend's connection
        db.execute(self._sql(HISTORY_FROM_JOB), (Outcome.DEAD.value, "", "", None, None, 0, None, now, "", job_id))

    # -- start-up and operation
    def fail_missing_files(self, exists: Callable[[str], bool]) -> int:
        """With several nodes, only this node's receipts: a file another node's view of the shared
        spool lacks is that node's to judge (and the forwarder's, when it comes to send it)."""
        received_here, args = self._received_here()
        with self._reading() as db:
            rows = db.execute(self._sql(f"SELECT id, path FROM instances{received_here}"), args).fetchall()
        missing = [(i, p) for i, p in rows if not exists(p)]
        now = time.time()
        with self._writing() as db:
            for instance_id, path in missing:
                fresh = [r[0] for r in db.execute(self._sql(
                    "SELECT id FROM jobs WHERE instance_id = ? AND state != 'dead'"), (instance_id,))]
                db.execute(self._sql(
                    f"UPDATE jobs SET state = 'dead'{self._UNLEASE}, last_error = ?, updated_at = ? "
                    "WHERE instance_id = ?"), (f"spool file missing: {path}", now, instance_id))
                for job_id in fresh:
                    self._dead_history(db, job_id, now)
        return len(missing)

    def retry_dead(self, destination: str | None = None, job_ids: Iterable[int] | None = None) -> int:
        now = time.time()
        sql = "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ? WHERE state = 'dead'"
        args: list = [now, now]
        if destination:
            sql += " AND destination = ?"
            args.append(destination)
        ids = list(job_ids or [])
        if ids:
            sql += f" AND id IN ({marks(ids)})"
            args.extend(ids)
        with self._statement() as db:
            return db.execute(self._sql(sql), args).rowcount

    def purge_dead(self, destination: str | None = None, older_than: float | None = None) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} {_FROM_JOBS} WHERE j.state = 'dead'"
        args: list = []
        if destination:
            sql += " AND j.destination = ?"
            args.append(destination)
        if older_than is not None:
            sql += " AND j.updated_at < ?"
            args.append(older_than)
        with self._writing() as db:
            purged = [job_from_row(r) for r in db.execute(self._sql(sql + self._LOCK_JOBS), args).fetchall()]
            ids = [job.id for job in purged]
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                db.execute(self._sql(f"DELETE FROM jobs WHERE id IN ({marks(chunk)})"), chunk)
            db.execute("DELETE FROM instances WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.instance_id = instances.id)")
        return purged
