"""Storage commitment in the queue database, written once for both backends.

The verbs of `Queue`'s storage commitment sections (requests from modalities, their reports, and
the requests relayed to the destinations) run the same SQL on SQLite and on PostgreSQL; each
backend gives its dialect (`router.queue.dialect.SqlDialect`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from router.queue import RelayedInstance, Stored, StoredCommitment, StoredRelay
from router.queue.dialect import CHUNK as _CHUNK
from router.queue.dialect import SqlDialect
from router.queue.dialect import marks as _marks
from router.request import Outcome

_COMMITMENT_COLUMNS = "id, transaction_uid, calling_ae, received_at, deadline, duplicate, attempts, last_error"
_RELAY_COLUMNS = "r.id, r.commitment_id, r.destination, r.transaction_uid, r.state, r.created_at, r.attempts, " \
                 "r.last_error"
# a relay to send: pending and due, claimed by a claimer that died, or sent without a report in time
_RELAY_DUE = ("((r.state IN ('pending', 'sent') AND r.next_attempt_at <= ?) "
              "OR (r.state = 'sending' AND r.claimed_until < ?))")


class CommitmentStore(SqlDialect):
    """The storage commitment verbs of `router.queue.Queue`, for a backend that gives its
    dialect."""

    # -- requests from modalities and their reports --------------------------------------------
    def add_commitment(self, transaction_uid: str, calling_ae: str, references: Iterable[tuple[str, str]],
                       received_at: float, deadline: float, holder: str = "", held_until: float = 0.0) -> str:
        references = [tuple(r) for r in references]
        q = self._sql
        with self._writing() as db:
            self._one_request_at_a_time(db, transaction_uid)
            earlier = db.execute(q(
                "SELECT id, state FROM commitments WHERE transaction_uid = ? AND duplicate = ? ORDER BY id DESC LIMIT 1"),
                (transaction_uid, False),
            ).fetchone()
            duplicate = False
            if earlier is not None:
                same = [tuple(r) for r in db.execute(q(
                    "SELECT sop_class_uid, sop_instance_uid FROM commitment_instances WHERE commitment_id = ? "
                    "ORDER BY position"), (earlier[0],))] == references
                if same and earlier[1] != "reported":
                    if earlier[1] == "pending" and holder:
                        db.execute(q("UPDATE commitments SET holder = ?, held_until = ? WHERE id = ?"),
                                   (holder, held_until, earlier[0]))
                    return "repeated"
                duplicate = not same
            commitment_id = db.execute(q(
                "INSERT INTO commitments (transaction_uid, calling_ae, received_at, deadline, duplicate, state, holder, "
                "held_until) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?) RETURNING id"),
                (transaction_uid, calling_ae, received_at, deadline, duplicate, holder, held_until),
            ).fetchone()[0]
            self._many(db, q("INSERT INTO commitment_instances (commitment_id, position, sop_class_uid, "
                             "sop_instance_uid) VALUES (?, ?, ?, ?)"),
                       [(commitment_id, index, sop_class, uid) for index, (sop_class, uid) in enumerate(references)])
        return "duplicate" if duplicate else "new"

    def hold_commitments(self, holder: str, held_until: float) -> None:
        with self._writing() as db:
            db.execute(self._sql("UPDATE commitments SET held_until = ? WHERE holder = ? AND state = 'pending'"),
                       (held_until, holder))

    def pending_commitments(self, now: float | None = None, holder: str | None = None) -> list[StoredCommitment]:
        now = time.time() if now is None else now
        with self._reading() as db:
            if holder is not None:
                rows = db.execute(self._sql(
                    f"SELECT {_COMMITMENT_COLUMNS} FROM commitments WHERE state = 'pending' AND holder = ? ORDER BY id"),
                    (holder,)).fetchall()
            else:
                rows = db.execute(self._sql(
                    f"SELECT {_COMMITMENT_COLUMNS} FROM commitments WHERE (state = 'pending' AND held_until < ? AND "
                    "next_attempt_at <= ?) OR (state = 'reporting' AND claimed_until < ?) ORDER BY id"),
                    (now, now, now)).fetchall()
            return self._commitments(db, rows)

    def claim_commitment(self, commitment_id: int, claimer: str, until: float) -> bool:
        now = time.time()
        with self._writing() as db:
            return db.execute(self._sql(
                "UPDATE commitments SET state = 'reporting', holder = ?, claimed_until = ? WHERE id = ? AND "
                "((state = 'pending' AND (held_until < ? OR holder = ?)) OR (state = 'reporting' AND claimed_until < ?))"),
                (claimer, until, commitment_id, now, claimer, now),
            ).rowcount == 1

    def commitment_reported(self, commitment_id: int, event_type: int) -> None:
        with self._writing() as db:
            db.execute(self._sql("UPDATE commitments SET state = 'reported', event_type = ?, reported_at = ?, "
                                 "attempts = attempts + 1 WHERE id = ?"), (event_type, time.time(), commitment_id))

    def commitment_not_reported(self, commitment_id: int, error: str, next_attempt_at: float) -> None:
        with self._writing() as db:
            db.execute(self._sql(
                "UPDATE commitments SET state = 'pending', holder = '', held_until = 0, claimed_until = 0, "
                "attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE id = ? AND state = 'reporting'"),
                (error, next_attempt_at, commitment_id))

    def _commitments(self, db: Any, rows: list[tuple]) -> list[StoredCommitment]:
        """The requests of `rows` (_COMMITMENT_COLUMNS) with their referenced instances."""
        references: dict[int, list[tuple[str, str]]] = {row[0]: [] for row in rows}
        ids = list(references)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            for cid, sop_class, uid in db.execute(self._sql(
                "SELECT commitment_id, sop_class_uid, sop_instance_uid FROM commitment_instances "
                f"WHERE commitment_id IN ({_marks(chunk)}) ORDER BY commitment_id, position"), chunk,
            ):
                references[cid].append((sop_class, uid))
        return [StoredCommitment(cid, transaction_uid, calling_ae, tuple(references[cid]), received_at, deadline,
                                 bool(duplicate), attempts, last_error)
                for cid, transaction_uid, calling_ae, received_at, deadline, duplicate, attempts, last_error in rows]

    def open_commitments(self, now: float | None = None) -> list[StoredCommitment]:
        now = time.time() if now is None else now
        with self._reading() as db:
            rows = db.execute(self._sql(f"SELECT {_COMMITMENT_COLUMNS} FROM commitments WHERE state != 'reported' "
                                        "AND duplicate = ? AND deadline > ? ORDER BY id"), (False, now)).fetchall()
            return self._commitments(db, rows)

    def commitment_counts(self) -> dict[str, int]:
        counts = {"waiting": 0, "retrying": 0}
        with self._reading() as db:
            for retrying, n in db.execute(
                    "SELECT attempts > 0, COUNT(*) FROM commitments WHERE state != 'reported' GROUP BY attempts > 0"):
                counts["retrying" if retrying else "waiting"] += n
        return counts

    # -- storage commitment relayed to the destinations ----------------------------------------
    def deliveries(self, sop_instance_uids: Iterable[str]) -> dict[str, dict[str, Stored]]:
        uids = sorted(set(sop_instance_uids))
        latest: dict[tuple[str, str], tuple[str, str, str, float]] = {}
        with self._reading() as db:
            for start in range(0, len(uids), _CHUNK):
                chunk = uids[start:start + _CHUNK]
                for uid, destination, outcome, sop_class, sent_uid, finished_at in db.execute(self._sql(
                    "SELECT sop_instance_uid, destination, outcome, sop_class_uid, sent_sop_instance_uid, finished_at "
                    f"FROM history WHERE sop_instance_uid IN ({_marks(chunk)}) AND destination != '' ORDER BY id"),
                    chunk,
                ):
                    latest[(uid, destination)] = (outcome, sop_class, sent_uid or uid, finished_at)
        found: dict[str, dict[str, Stored]] = {}
        for (uid, destination), (outcome, sop_class, sent_uid, finished_at) in latest.items():
            if outcome == Outcome.DELIVERED.value:
                found.setdefault(uid, {})[destination] = Stored(destination, sop_class, sent_uid, finished_at)
        return found

    def add_relay(self, commitment_id: int, destination: str, transaction_uid: str,
                  instances: Iterable[RelayedInstance], now: float) -> int | None:
        instances = list(instances)
        q = self._sql
        with self._writing() as db:
            relay_id = db.execute(q(
                "INSERT INTO relays (commitment_id, destination, transaction_uid, state, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?) RETURNING id"),
                (commitment_id, destination, transaction_uid, now, now)).fetchone()[0]
            added = 0
            for item in instances:
                added += db.execute(q(
                    "INSERT INTO relay_instances (relay_id, commitment_id, destination, sop_instance_uid, "
                    "sop_class_uid, sent_sop_instance_uid) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (commitment_id, destination, sop_instance_uid) DO NOTHING"),
                    (relay_id, commitment_id, destination, item.sop_instance_uid, item.sop_class_uid,
                     item.sent_sop_instance_uid),
                ).rowcount
            if not added:
                db.execute(q("DELETE FROM relays WHERE id = ?"), (relay_id,))
                return None
        return relay_id

    def relay_results(self, commitment_id: int) -> dict[tuple[str, str], int | None]:
        with self._reading() as db:
            return {(destination, uid): result for destination, uid, result in db.execute(self._sql(
                "SELECT destination, sop_instance_uid, result FROM relay_instances WHERE commitment_id = ?"),
                (commitment_id,))}

    def _relays(self, db: Any, rows: list[tuple]) -> list[StoredRelay]:
        """The relay requests of `rows` (_RELAY_COLUMNS) with their instances, in the order added."""
        found = []
        for rid, commitment_id, destination, transaction_uid, state, created_at, attempts, last_error in rows:
            instances = tuple(RelayedInstance(*row) for row in db.execute(self._sql(
                "SELECT sop_instance_uid, sop_class_uid, sent_sop_instance_uid FROM relay_instances WHERE relay_id = ? "
                f"ORDER BY {self._INSERTION_ORDER}"), (rid,)))
            found.append(StoredRelay(rid, commitment_id, destination, transaction_uid, state, instances, created_at,
                                     attempts, last_error))
        return found

    def due_relays(self, now: float | None = None) -> list[StoredRelay]:
        now = time.time() if now is None else now
        with self._reading() as db:
            rows = db.execute(self._sql(
                f"SELECT {_RELAY_COLUMNS} FROM relays r JOIN commitments c ON c.id = r.commitment_id "
                f"WHERE {_RELAY_DUE} AND c.state != 'reported' AND c.deadline > ? ORDER BY r.id"),
                (now, now, now)).fetchall()
            return self._relays(db, rows)

    def claim_relay(self, relay_id: int, claimer: str, until: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._writing() as db:
            return db.execute(self._sql(
                f"UPDATE relays SET state = 'sending', claimer = ?, claimed_until = ? WHERE id = ? AND "
                f"{_RELAY_DUE.replace('r.', '')}"), (claimer, until, relay_id, now, now),
            ).rowcount == 1

    def relay_sent(self, relay_id: int, claimer: str, ask_again_at: float) -> None:
        with self._writing() as db:
            db.execute(self._sql(
                "UPDATE relays SET state = 'sent', claimer = '', claimed_until = 0, attempts = attempts + 1, "
                "last_error = '', next_attempt_at = ? WHERE id = ? AND state = 'sending' AND claimer = ?"),
                (ask_again_at, relay_id, claimer))

    def relay_not_sent(self, relay_id: int, claimer: str, error: str, next_attempt_at: float) -> None:
        with self._writing() as db:
            db.execute(self._sql(
                "UPDATE relays SET state = 'pending', claimer = '', claimed_until = 0, attempts = attempts + 1, "
                "last_error = ?, next_attempt_at = ? WHERE id = ? AND state = 'sending' AND claimer = ?"),
                (error, next_attempt_at, relay_id, claimer))

    def relay_refused(self, relay_id: int, claimer: str, error: str, reason: int) -> None:
        q = self._sql
        with self._writing() as db:
            if db.execute(q("UPDATE relays SET state = 'refused', claimer = '', claimed_until = 0, attempts = "
                            "attempts + 1, last_error = ?, answered_at = ? WHERE id = ? AND state = 'sending' AND "
                            "claimer = ?"), (error, time.time(), relay_id, claimer)).rowcount:
                db.execute(q("UPDATE relay_instances SET result = ? WHERE relay_id = ? AND result IS NULL"),
                           (reason, relay_id))

    def relay_answered(self, transaction_uid: str, results: dict[str, int], unlisted: int,
                       now: float | None = None) -> StoredRelay | None:
        now = time.time() if now is None else now
        q = self._sql
        with self._writing() as db:
            rows = db.execute(q(f"SELECT {_RELAY_COLUMNS} FROM relays r WHERE r.transaction_uid = ?{self._FOR_UPDATE}"),
                              (transaction_uid,)).fetchall()
            if not rows:
                return None
            [relay] = self._relays(db, rows)
            self._many(db, q("UPDATE relay_instances SET result = ? WHERE relay_id = ? AND sent_sop_instance_uid = ?"),
                       [(results.get(item.sent_sop_instance_uid, unlisted), relay.id, item.sent_sop_instance_uid)
                        for item in relay.instances])
            db.execute(q("UPDATE relays SET state = 'answered', claimer = '', claimed_until = 0, answered_at = ? "
                         "WHERE id = ?"), (now, relay.id))
        return relay

    def relay_destination(self, transaction_uid: str) -> str | None:
        with self._reading() as db:
            row = db.execute(self._sql("SELECT destination FROM relays WHERE transaction_uid = ? ORDER BY id LIMIT 1"),
                             (transaction_uid,)).fetchone()
        return row[0] if row is not None else None

    def relay_counts(self, now: float | None = None) -> dict[tuple[str, str], int]:
        now = time.time() if now is None else now
        counts: dict[tuple[str, str], int] = {}
        with self._reading() as db:
            for destination, state, n in db.execute(self._sql(
                "SELECT r.destination, CASE r.state WHEN 'sent' THEN 'awaiting_report' ELSE 'sending' END, COUNT(*) "
                "FROM relays r JOIN commitments c ON c.id = r.commitment_id "
                "WHERE r.state IN ('pending', 'sending', 'sent') AND c.state != 'reported' AND c.deadline > ? "
                "GROUP BY 1, 2"), (now,),
            ):
                counts[(destination, state)] = n
        return counts
