"""The durable queue: one job per (instance, destination), behind one set of verbs.

States: pending -> in_flight -> (delivered: row deleted) | pending again (retry) | dead (kept,
retryable). An instance row and its spool file live as long as any of its jobs does. A job
claimed but not finished (a crash, a shutdown) goes back to pending: delivery is at least once,
never lost.

History: every finished job (delivered, skipped, dead) and every instance no destination wants
("not forwarded") leaves one row, written in the same transaction as the queue change, kept for
`[queue] history_days` (pruned by the queue itself, at most once an hour). It holds UIDs, AE
titles, syntaxes, sizes and times, never patient data; it maps an original SOP Instance UID to
the one that went out (`HistoryEntry.sent_sop_instance_uid`).

Storage commitment requests (`commitment`) live in the same database: a request and its
referenced instances are stored before the modality hears success, and a report is claimed in
one transaction, so that one process alone sends it. With `[commitment] mode = "relay"` so do
the router's own requests to the destinations (`relay`): each with its instances as sent and,
per instance, the destination's answer; one N-ACTION per relay request, claimed in one
transaction; an instance is asked about once per modality request and destination.

The interface is split by concern: `JobQueue` (receiving and forwarding), `HistoryQueue`,
`CommitmentQueue` and `ClusterQueue`; a caller names the part it uses. Backends implement all
of them (`Queue`): `sqlite.SqliteQueue` (the embedded default, in the spool, one
node) and `postgres.PostgresQueue` (several nodes sharing one database and one spool: claims
are leases the owning node renews, and any node takes over a job whose lease expired). The
forwarder and the receiving side know only this interface; `open_queue` picks the backend from
the configuration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from router.request import Outcome, Request

if TYPE_CHECKING:
    from router.config import Loaded

NOT_FORWARDED = "not forwarded"  # the history outcome of an instance no destination wants


@dataclass(frozen=True)
class Instance:
    """A received instance, durable in the spool at `path`."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    called_ae: str
    source_ip: str
    size: int
    received_at: float
    series_instance_uid: str = ""
    series_number: int | None = None  # with instance_number: the order a whole study goes out in
    instance_number: int | None = None


# a job's priority within its destination (router.rules.PRIORITIES), lowest first
HIGH, NORMAL, LOW = 0, 1, 2


@dataclass(frozen=True)
class NewJob:
    """A job to record with its instance: the destination and the request its rules made,
    valid while the destination's rule file carries `rules_tag`."""

    destination: str
    request: Request
    rules_tag: str
    priority: int = NORMAL


@dataclass(frozen=True)
class Holding:
    """What holds a destination's pending jobs besides their retry time, from its rule file:
    each instance for `delay_s` after receipt, each study until none of its instances arrived
    for `study_stable_s` (then the study goes in series and instance number order), but never
    longer than `study_stable_max_s` after the receipt of its first instance still to go
    (0: no such bound)."""

    delay_s: float = 0.0
    study_stable_s: float = 0.0
    study_stable_max_s: float = 0.0




@dataclass(frozen=True)
class Job:
    id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str
    request: Request | None  # None: decide again from the rules in force
    rules_tag: str
    instance: Instance
    priority: int = NORMAL
    taken_over_from: str = ""  # a node whose lease on this claimed job had expired (it may have sent it)


@dataclass(frozen=True)
class Delivery:
    """What the forwarder knows of a finished job, for its history row: how it went out.

    `outcome` is delivered or skipped (dead letters go through `Queue.dead`); the sizes,
    attempts and times the queue takes from the job itself."""

    job_id: int
    outcome: Outcome = Outcome.DELIVERED
    syntax: str = ""  # the syntax name it went out in ("original": as received)
    transfer_syntax_uid: str = ""
    sent_size: int | None = None
    ratio: float | None = None
    sent_sop_instance_uid: str = ""  # only when it went out under another SOP Instance UID
    note: str = ""  # why it was skipped


@dataclass(frozen=True)
class HistoryEntry:
    """One finished job (or an instance no destination wants): what the history keeps."""

    destination: str  # "" for an instance no destination wants
    outcome: str  # delivered, skipped, dead, not forwarded
    syntax: str
    transfer_syntax_uid: str
    received_size: int
    sent_size: int | None
    ratio: float | None
    attempts: int
    last_error: str
    received_at: float
    finished_at: float  # sent (delivered), or when it became a dead letter or was skipped
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str  # as received
    sent_sop_instance_uid: str  # "" when it went out under the received UID
    sop_class_uid: str
    calling_ae: str


@dataclass(frozen=True)
class Whereabouts:
    """Where the instances with one SOP Instance UID are, as far as the queue and the history
    know: what storage commitment decides on."""

    sop_class_uids: frozenset[str]
    unfinished: int  # jobs pending or in flight
    dead: int  # dead letters: jobs, or destinations whose last outcome in the history is dead
    finished: int  # history rows of the other outcomes (delivered, skipped, not forwarded)


@dataclass(frozen=True)
class StoredCommitment:
    """A storage commitment request as the queue keeps it."""

    id: int
    transaction_uid: str
    calling_ae: str
    references: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID), as requested
    received_at: float
    deadline: float
    duplicate: bool  # a transaction UID already in use for other instances
    attempts: int
    last_error: str


@dataclass(frozen=True)
class Node:
    """A router node of a cluster, as the shared queue knows it."""

    name: str
    host: str
    pid: int
    started_at: float
    heartbeat_age_s: float  # seconds since its last heartbeat, by the database's clock
    jobs_held: int  # jobs in flight under its lease
    alive: bool  # heartbeat younger than the lease


class NodeNameInUse(RuntimeError):
    """Another live node already runs under this node's name."""


class Slot(ABC):
    """One of a destination's association slots, shared by the cluster; held until `give`."""

    @abstractmethod
    def give(self) -> None:
        """Hand the slot back (idempotent)."""


@dataclass(frozen=True)
class Stored:
    """An instance as a destination stored it (its latest delivery there, from the history)."""

    destination: str
    sop_class_uid: str
    sop_instance_uid: str  # as sent: another one than received when it went out under a new UID
    delivered_at: float


@dataclass(frozen=True)
class RelayedInstance:
    """One instance of a relay request: as the modality knows it, and as the destination does."""

    sop_instance_uid: str  # as received
    sop_class_uid: str  # as sent
    sent_sop_instance_uid: str


@dataclass(frozen=True)
class StoredRelay:
    """The router's storage commitment request to one destination, on behalf of one modality
    request: pending (to send), sending (claimed), sent (the destination took the N-ACTION; its
    report awaited), answered (its report recorded) or refused (for good)."""

    id: int
    commitment_id: int
    destination: str
    transaction_uid: str  # the router's own, in the N-ACTION to the destination
    state: str
    instances: tuple[RelayedInstance, ...]
    created_at: float
    attempts: int
    last_error: str


class ClusterQueue(ABC):
    """What several nodes sharing one queue need; the embedded backend is one node, and its
    verbs say so (they do nothing, or report no cluster)."""

    node: str = ""  # this node's name in a cluster; "" for the embedded backend (one node)
    shared = False  # whether several nodes share this queue (and the spool)

    def register(self) -> None:
        """Announce this node (at start-up, before `recover`); raises NodeNameInUse when another
        live node has its name."""

    def heartbeat(self) -> int:
        """Renew this node's heartbeat and the lease of every job it holds in flight; returns
        how many jobs it holds."""
        return 0

    def leave(self) -> None:
        """This node stops: its heartbeat ends (its jobs were given back by the forwarders)."""

    def sweep_orphans(self) -> list[str]:
        """Delete instances no job needs that concurrent finishes on several nodes left behind;
        returns their spool paths (the caller removes the files). Nothing to do on one node."""
        return []

    def nodes(self) -> list[Node]:
        """The nodes sharing the queue, with their heartbeats; empty for one node."""
        return []

    def owners(self, job_ids: Iterable[int]) -> dict[int, str]:
        """Which node holds each of these jobs in flight; empty for one node (this one holds them all)."""
        return {}

    def take_slot(self, destination: str, ceiling: int) -> Slot | None:
        """One of `ceiling` association slots of `destination` across the cluster, or None when
        every one is taken. One node needs no slots: it always has one."""
        return _OneNodeSlot()


class _OneNodeSlot(Slot):
    def give(self) -> None:
        pass


class JobQueue(ABC):
    """The jobs: what the receiving side records and the forwarders claim and finish. Every
    verb is safe to call from several threads."""

    # -- receiving
    @abstractmethod
    def add(self, instance: Instance, jobs: Iterable[NewJob]) -> None:
        """Record an instance and its jobs in one committed transaction; an instance with no
        job (no destination wants it) is recorded in the history only, as not forwarded."""

    # -- forwarding
    @abstractmethod
    def claim(self, destination: str, limit: int, now: float | None = None,
              holding: Holding = Holding()) -> list[Job]:
        """Move up to `limit` due pending jobs of `destination` to in_flight and return them,
        high priority first; a job is due once its retry time has come and `holding` no longer
        holds it. With `holding.study_stable_s`, a study's jobs come in series and instance
        number order."""

    @abstractmethod
    def next_due(self, destination: str, holding: Holding = Holding()) -> float | None:
        """When the earliest pending job of `destination` is due (epoch seconds), or None."""

    @abstractmethod
    def due_count(self, destination: str, now: float | None = None, holding: Holding = Holding(),
                  priority: int | None = None) -> int:
        """How many pending jobs of `destination` (of at most `priority`, the number) are due now."""

    @abstractmethod
    def held(self, destination: str, now: float | None = None, holding: Holding = Holding()) -> dict[str, int]:
        """Pending jobs of `destination` past their retry time that `holding` holds, by reason
        (Reason.DELAY, Reason.STUDY_STABLE; a job held by both counts as delayed)."""

    @abstractmethod
    def complete(self, deliveries: Iterable[Delivery | int], durable: bool = True) -> list[str]:
        """Delete delivered (or skipped) jobs and write their history rows in one transaction
        (a bare job id: delivered, how unknown); returns the spool paths no job needs any more.
        `durable=False`: the transaction may be lost at a power cut until the next `sync()`; the
        caller keeps the returned files until then (`spool.LateRemoval`)."""

    def sync(self) -> None:
        """Make every transaction committed so far durable (a backend whose commits are all
        durable has nothing to do)."""

    @abstractmethod
    def release(self, job_ids: Iterable[int]) -> None:
        """Put claimed jobs back to pending without counting an attempt."""

    @abstractmethod
    def retry(self, job_id: int, error: str, next_attempt_at: float) -> None:
        """Count a failed attempt; the job is due again at `next_attempt_at`."""

    @abstractmethod
    def dead(self, job_id: int, error: str) -> None:
        """Count a failed attempt and keep the job as a dead letter with `error`, and write its
        history row, in one transaction."""

    # -- start-up and operation
    @abstractmethod
    def recover(self) -> int:
        """Jobs left in flight by a crash go back to pending; returns how many."""

    @abstractmethod
    def paths(self) -> list[str]:
        """The spool paths of every instance still queued."""

    @abstractmethod
    def fail_missing_files(self, exists: Callable[[str], bool]) -> int:
        """Jobs whose spool file vanished become dead letters saying so; returns how many."""

    @abstractmethod
    def counts(self) -> dict[tuple[str, str], int]:
        """Jobs by (destination, state)."""

    @abstractmethod
    def oldest_pending(self, now: float | None = None) -> dict[str, float]:
        """Per destination, the age in seconds of the oldest instance not yet delivered."""

    @abstractmethod
    def jobs(self, destination: str | None = None, state: str | None = None, limit: int = 1000,
             study: str | None = None, series: str | None = None, sop: str | None = None) -> list[Job]:
        """Jobs in id order, optionally of one destination and state, and of one study, series or
        SOP Instance UID (as received)."""

    @abstractmethod
    def retry_dead(self, destination: str | None = None, job_ids: Iterable[int] | None = None) -> int:
        """Put dead letters back to pending with a fresh attempt count; returns how many."""

    @abstractmethod
    def purge_dead(self, destination: str | None = None, older_than: float | None = None) -> list[Job]:
        """Delete dead letters (of `destination`, dead before the epoch time `older_than`), and
        the instances no job needs any more; returns the jobs deleted (their instances' spool
        files are the caller's to remove when `paths()` no longer lists them)."""

    @abstractmethod
    def close(self) -> None:
        """Release this thread's connection."""

    def shutdown(self) -> None:
        """Close every connection: the process is ending."""
        self.close()

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the queue lives, for logs."""


class HistoryQueue(ABC):
    """What became of the instances: the history of finished jobs, and where an instance is."""

    @abstractmethod
    def history(self, study: str | None = None, series: str | None = None, sop: str | None = None,
                limit: int = 10000) -> list[HistoryEntry]:
        """History rows, oldest first, of a study, a series or a SOP Instance UID (matching the
        received or the sent UID); the conditions given must all hold."""

    @abstractmethod
    def whereabouts(self, sop_instance_uids: Iterable[str]) -> dict[str, Whereabouts]:
        """For each received SOP Instance UID the queue or the history knows, where it is."""

    @abstractmethod
    def deliveries(self, sop_instance_uids: Iterable[str]) -> dict[str, dict[str, Stored]]:
        """For each received SOP Instance UID, by destination, its latest delivery there (when
        the destination's latest outcome for it in the history is delivered)."""


class CommitmentQueue(HistoryQueue):
    """Storage commitment: the modalities' requests and their reports, and (relay mode) the
    router's own requests to the destinations; what is committed is decided on the history."""

    node: str = ""

    @abstractmethod
    def add_commitment(self, transaction_uid: str, calling_ae: str, references: Iterable[tuple[str, str]],
                       received_at: float, deadline: float, holder: str = "", held_until: float = 0.0) -> str:
        """Store a storage commitment request durably; returns "new", "repeated" (the same
        request while it is still pending: nothing more stored) or "duplicate" (its transaction
        UID is in use for other instances: stored to be reported failed). `holder` names the
        association that may report it while `held_until` has not passed."""

    @abstractmethod
    def hold_commitments(self, holder: str, held_until: float) -> None:
        """Renew (or, with 0, give up) the hold of `holder` on its pending requests."""

    @abstractmethod
    def pending_commitments(self, now: float | None = None, holder: str | None = None) -> list[StoredCommitment]:
        """Requests not reported yet and due for a try: held by `holder`, or (None) held by no
        live association, not claimed, and past their next attempt time."""

    @abstractmethod
    def claim_commitment(self, commitment_id: int, claimer: str, until: float) -> bool:
        """Take the right to send one request's report until `until`; False when another
        process has it, or it was reported."""

    @abstractmethod
    def commitment_reported(self, commitment_id: int, event_type: int) -> None:
        """The report went out: the request is done (kept, with the history, for history_days)."""

    @abstractmethod
    def commitment_not_reported(self, commitment_id: int, error: str, next_attempt_at: float) -> None:
        """The report could not be delivered: give up the claim and try again at `next_attempt_at`."""

    @abstractmethod
    def open_commitments(self, now: float | None = None) -> list[StoredCommitment]:
        """Requests not reported yet, neither duplicates nor past their deadline, whoever holds
        or claims them: those a relay may still serve."""

    @abstractmethod
    def commitment_counts(self) -> dict[str, int]:
        """Requests not reported yet, by state: "waiting" (never failed to report), "retrying"
        (a report could not be delivered and is tried again)."""

    # -- relayed to the destinations
    @abstractmethod
    def add_relay(self, commitment_id: int, destination: str, transaction_uid: str,
                  instances: Iterable[RelayedInstance], now: float) -> int | None:
        """Store a relay request (pending, due at once) of the instances not yet in a relay of
        the same commitment request and destination; returns its id, or None when every one is
        (another process relayed them first)."""

    @abstractmethod
    def relay_results(self, commitment_id: int) -> dict[tuple[str, str], int | None]:
        """Per (destination, received SOP Instance UID) relayed for a commitment request: the
        destination's answer: 0 committed, a Failure Reason, or None while unanswered."""

    @abstractmethod
    def due_relays(self, now: float | None = None) -> list[StoredRelay]:
        """Relay requests to send now, of commitment requests still open: pending and past their
        next attempt time, sending under a claim that expired, or sent and past the time to ask
        again (no report came)."""

    @abstractmethod
    def claim_relay(self, relay_id: int, claimer: str, until: float, now: float | None = None) -> bool:
        """Take the right to send one relay request's N-ACTION until `until`; False when another
        process has it, or it is no longer due."""

    @abstractmethod
    def relay_sent(self, relay_id: int, claimer: str, ask_again_at: float) -> None:
        """The destination took the N-ACTION: its report is awaited until `ask_again_at` (a
        report already recorded stays)."""

    @abstractmethod
    def relay_not_sent(self, relay_id: int, claimer: str, error: str, next_attempt_at: float) -> None:
        """The N-ACTION failed: give up the claim and send it again at `next_attempt_at`."""

    @abstractmethod
    def relay_refused(self, relay_id: int, claimer: str, error: str, reason: int) -> None:
        """The destination refused for good: its unanswered instances fail with `reason`."""

    @abstractmethod
    def relay_answered(self, transaction_uid: str, results: dict[str, int], unlisted: int,
                       now: float | None = None) -> StoredRelay | None:
        """Record a destination's report, by SOP Instance UID as sent (0 committed, else the
        Failure Reason); the relay's instances it does not list get `unlisted`. Returns the
        relay request as it was, or None for a Transaction UID no relay request has."""

    @abstractmethod
    def relay_destination(self, transaction_uid: str) -> str | None:
        """The destination a relay request with this Transaction UID was sent to (its rule file's
        name), or None when no relay request has it: whom its report may come from."""

    @abstractmethod
    def relay_counts(self, now: float | None = None) -> dict[tuple[str, str], int]:
        """Relay requests of open commitment requests not answered yet, by (destination,
        "sending" (pending or sending) | "awaiting_report" (sent))."""



class Queue(JobQueue, CommitmentQueue, ClusterQueue):
    """A backend: every verb of every concern. Callers name the part they use (`JobQueue`,
    `HistoryQueue`, `CommitmentQueue`, `ClusterQueue`)."""


QUEUE_FILE = "queue.sqlite"


def open_queue(cfg: Loaded, pool_size: int = 10) -> Queue:
    """The queue the configuration names: PostgreSQL when `[queue] url` is set, else SQLite in
    the spool directory. `pool_size`: at most that many database connections at once."""
    settings = cfg.router.queue
    if settings.url:
        from router.queue.postgres import PostgresQueue

        return PostgresQueue(settings.url, node=settings.node, lease_s=settings.lease_s,
                             history_days=settings.history_days, pool_size=pool_size)
    from router.queue.sqlite import SqliteQueue

    return SqliteQueue(Path(cfg.spool_dir) / QUEUE_FILE, history_days=settings.history_days)
