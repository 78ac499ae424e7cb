"""The durable queue: one job per (instance, destination), behind one set of verbs.

States: pending -> in_flight -> (delivered: row deleted) | pending again (retry) | dead (kept,
retryable). An instance row and its spool file live as long as any of its jobs does. A job
claimed but not finished (a crash, a shutdown) goes back to pending: delivery is at least once,
never lost.

Backends implement `Queue`: `sqlite.SqliteQueue` (the embedded default, in the spool). The
forwarder and the receiving side know only this interface; `open_queue` picks the backend from
the configuration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from router.request import Request

if TYPE_CHECKING:
    from router.config import Loaded

STATES = ("pending", "in_flight", "dead")


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


@dataclass(frozen=True)
class NewJob:
    """A job to record with its instance: the destination and the request its rules made,
    valid while the destination's rule file carries `rules_tag`."""

    destination: str
    request: Request
    rules_tag: str


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


class Queue(ABC):
    """The verbs every backend offers; all are safe to call from several threads."""

    # -- receiving
    @abstractmethod
    def add(self, instance: Instance, jobs: Iterable[NewJob]) -> None:
        """Record an instance and its jobs in one committed transaction."""

    # -- forwarding
    @abstractmethod
    def claim(self, destination: str, limit: int, now: float | None = None) -> list[Job]:
        """Move up to `limit` due pending jobs of `destination` to in_flight and return them."""

    @abstractmethod
    def next_due(self, destination: str) -> float | None:
        """When the earliest pending job of `destination` is due (epoch seconds), or None."""

    @abstractmethod
    def due_count(self, destination: str, now: float | None = None) -> int:
        """How many pending jobs of `destination` are due now."""

    @abstractmethod
    def complete(self, job_ids: Iterable[int]) -> list[str]:
        """Delete delivered (or skipped) jobs in one transaction; returns the spool paths that
        no job needs any more."""

    @abstractmethod
    def release(self, job_ids: Iterable[int]) -> None:
        """Put claimed jobs back to pending without counting an attempt."""

    @abstractmethod
    def retry(self, job_id: int, error: str, next_attempt_at: float) -> None:
        """Count a failed attempt; the job is due again at `next_attempt_at`."""

    @abstractmethod
    def dead(self, job_id: int, error: str) -> None:
        """Count a failed attempt and keep the job as a dead letter with `error`."""

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
    def jobs(self, destination: str | None = None, state: str | None = None, limit: int = 1000) -> list[Job]:
        """Jobs in id order, optionally of one destination and state."""

    @abstractmethod
    def retry_dead(self, destination: str | None = None, job_ids: Iterable[int] | None = None) -> int:
        """Put dead letters back to pending with a fresh attempt count; returns how many."""

    @abstractmethod
    def close(self) -> None:
        """Release this thread's connection."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the queue lives, for logs."""


QUEUE_FILE = "queue.sqlite"


def open_queue(cfg: Loaded) -> Queue:
    """The queue the configuration names: SQLite in the spool directory."""
    from router.queue.sqlite import SqliteQueue

    return SqliteQueue(Path(cfg.spool_dir) / QUEUE_FILE)
