"""What both queue backends do the same way with the jobs and the history: read the jobs and
their counts, the history, and where an instance is (`whereabouts`); record an instance no
destination wants, and prune the history. The rows' columns are defined here once, for the
backends' own statements too."""

from __future__ import annotations

import time
from collections.abc import Iterable

from router.queue import NOT_FORWARDED, HistoryEntry, Instance, Job, Whereabouts
from router.queue.dialect import CHUNK, SqlDialect, marks
from router.request import Outcome, Request

HISTORY_COLUMNS = (
    "destination, outcome, syntax, transfer_syntax_uid, received_size, sent_size, ratio, attempts, last_error, "
    "received_at, finished_at, study_instance_uid, series_instance_uid, sop_instance_uid, sent_sop_instance_uid, "
    "sop_class_uid, calling_ae"
)
JOB_COLUMNS = (
    "j.id, j.destination, j.state, j.attempts, j.next_attempt_at, j.last_error, j.request, j.rules_tag, "
    "i.path, i.sop_class_uid, i.sop_instance_uid, i.study_instance_uid, i.transfer_syntax_uid, "
    "i.calling_ae, i.called_ae, i.source_ip, i.size, i.received_at, i.series_instance_uid, i.series_number, "
    "i.instance_number, j.priority"
)


PRUNE_EVERY_S = 3600.0


def job_from_row(row: tuple, taken_over_from: str = "") -> Job:
    """A `Job` from a row of JOB_COLUMNS."""
    request = Request.from_json(row[6]) if row[6] else None
    return Job(*row[:6], request, row[7], instance=Instance(*row[8:-1]), priority=row[-1],
               taken_over_from=taken_over_from)


class ReadingStore(SqlDialect):
    """The reading verbs of `router.queue.Queue`, and the history rows written the same way, for
    a backend that gives its dialect (and sets `history_s` and `_pruned_at`)."""

    history_s: float
    _pruned_at: float

    def _not_forwarded(self, db, instance: Instance, now: float) -> None:  # noqa: ANN001 - the backend's connection
        """The history row of an instance no destination wants."""
        db.execute(self._sql(
            f"INSERT INTO history ({HISTORY_COLUMNS}) VALUES (?, ?, '', '', ?, NULL, NULL, 0, '', ?, ?, ?, ?, ?, '', "
            "?, ?)"),
            ("", NOT_FORWARDED, instance.size, instance.received_at, now, instance.study_instance_uid,
             instance.series_instance_uid, instance.sop_instance_uid, instance.sop_class_uid, instance.calling_ae),
        )

    def _prune(self, db, now: float) -> None:  # noqa: ANN001 - the backend's connection
        """Drop history and reported commitment requests older than history_days, at most once
        an hour per process."""
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        cutoff = now - self.history_s
        db.execute(self._sql("DELETE FROM history WHERE finished_at < ?"), (cutoff,))
        db.execute(self._sql("DELETE FROM commitments WHERE state = 'reported' AND reported_at < ?"), (cutoff,))

    def paths(self) -> list[str]:
        with self._reading() as db:
            return [r[0] for r in db.execute("SELECT path FROM instances")]

    def counts(self) -> dict[tuple[str, str], int]:
        with self._reading() as db:
            return {(d, s): n for d, s, n in db.execute(
                "SELECT destination, state, COUNT(*) FROM jobs GROUP BY destination, state")}

    def oldest_pending(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        with self._reading() as db:
            return {d: max(0.0, now - t) for d, t in db.execute(
                "SELECT j.destination, MIN(i.received_at) FROM jobs j JOIN instances i ON i.id = j.instance_id "
                "WHERE j.state IN ('pending', 'in_flight') GROUP BY j.destination")}

    def jobs(self, destination: str | None = None, state: str | None = None, limit: int = 1000,
             study: str | None = None, series: str | None = None, sop: str | None = None) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs j JOIN instances i ON i.id = j.instance_id WHERE 1 = 1"
        args: list = []
        for column, value in (("j.destination", destination), ("j.state", state), ("i.study_instance_uid", study),
                              ("i.series_instance_uid", series), ("i.sop_instance_uid", sop)):
            if value:
                sql += f" AND {column} = ?"
                args.append(value)
        sql += " ORDER BY j.id LIMIT ?"
        args.append(limit)
        with self._reading() as db:
            return [job_from_row(r) for r in db.execute(self._sql(sql), args)]

    def history(self, study: str | None = None, series: str | None = None, sop: str | None = None,
                limit: int = 10000) -> list[HistoryEntry]:
        sql = f"SELECT {HISTORY_COLUMNS} FROM history WHERE 1 = 1"
        args: list = []
        if study:
            sql += " AND study_instance_uid = ?"
            args.append(study)
        if series:
            sql += " AND series_instance_uid = ?"
            args.append(series)
        if sop:
            sql += " AND (sop_instance_uid = ? OR sent_sop_instance_uid = ?)"
            args.extend((sop, sop))
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        with self._reading() as db:
            return [HistoryEntry(*row) for row in db.execute(self._sql(sql), args)]

    def whereabouts(self, sop_instance_uids: Iterable[str]) -> dict[str, Whereabouts]:
        uids = sorted(set(sop_instance_uids))
        classes: dict[str, set[str]] = {}
        unfinished: dict[str, int] = {}
        dead: dict[str, set[str]] = {}
        finished: dict[str, int] = {}
        last: dict[tuple[str, str], str] = {}  # (uid, destination) -> its latest outcome in the history
        with self._reading() as db:
            for start in range(0, len(uids), CHUNK):
                chunk = uids[start:start + CHUNK]
                for uid, sop_class, destination, state in db.execute(self._sql(
                    "SELECT i.sop_instance_uid, i.sop_class_uid, j.destination, j.state FROM jobs j "
                    f"JOIN instances i ON i.id = j.instance_id WHERE i.sop_instance_uid IN ({marks(chunk)})"), chunk,
                ):
                    classes.setdefault(uid, set()).add(sop_class)
                    if state == "dead":
                        dead.setdefault(uid, set()).add(destination)
                    else:
                        unfinished[uid] = unfinished.get(uid, 0) + 1
                for uid, sop_class, destination, outcome in db.execute(self._sql(
                    "SELECT sop_instance_uid, sop_class_uid, destination, outcome FROM history "
                    f"WHERE sop_instance_uid IN ({marks(chunk)}) ORDER BY id"), chunk,
                ):
                    classes.setdefault(uid, set()).add(sop_class)
                    last[(uid, destination)] = outcome
        for (uid, destination), outcome in last.items():
            if outcome == Outcome.DEAD.value:
                dead.setdefault(uid, set()).add(destination)
            else:
                finished[uid] = finished.get(uid, 0) + 1
        return {
            uid: Whereabouts(frozenset(found), unfinished.get(uid, 0), len(dead.get(uid, ())), finished.get(uid, 0))
            for uid, found in classes.items()
        }
