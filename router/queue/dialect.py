"""What the parts of the queue written once for both backends (`jobs`, `reading`, `commitments`) need
from a backend: how it reads, writes and spells its SQL."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any


class SqlDialect:
    """The hooks a backend gives; statements are written with `?` placeholders."""

    _FOR_UPDATE = ""  # locks the rows a write transaction reads ("" where the transaction does)
    _LOCK_JOBS = ""  # the same for the jobs of a `jobs j JOIN instances i` read
    _INSERTION_ORDER = "rowid"  # the column that orders a table's rows as inserted
    _GREATEST = "MAX"  # the largest of several values (a scalar function)
    _UNLEASE = ""  # the assignments that end a job's lease, when it leaves in_flight

    def _mine(self, alias: str) -> tuple[str, list]:
        """The condition (" AND ...") that a job in flight is this node's to finish, and its
        parameters; nothing where one node owns every job."""
        return "", []

    def _received_here(self) -> tuple[str, list]:
        """The condition (" WHERE ...") on instances received by this node, and its parameters."""
        return "", []

    def _reading(self) -> AbstractContextManager[Any]:
        """A connection to read with."""
        raise NotImplementedError

    def _writing(self) -> AbstractContextManager[Any]:
        """A connection in a write transaction, committed at exit (rolled back on an error)."""
        raise NotImplementedError

    def _statement(self) -> AbstractContextManager[Any]:
        """A connection to run one write statement on (its own transaction)."""
        return self._writing()

    def _sql(self, text: str) -> str:
        """The statement with the backend's placeholders."""
        return text

    def _many(self, db: Any, sql: str, rows: list[tuple]) -> None:
        """One statement for each row."""
        db.executemany(sql, rows)

    def _one_request_at_a_time(self, db: Any, transaction_uid: str) -> None:
        """Storage commitment requests with one Transaction UID are decided one after the other
        (nothing to do where write transactions never overlap)."""


def marks(values: list) -> str:
    """The placeholders of an IN (...) list of `values`."""
    return ", ".join("?" * len(values))


CHUNK = 500  # values per IN (...) list
