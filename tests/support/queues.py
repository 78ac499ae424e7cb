"""Both queue backends behind one fixture: the embedded SQLite one and the PostgreSQL one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from router.queue import Queue
from router.queue.sqlite import SqliteQueue

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


class Backend:
    """Opens queues of one kind on one store: as a node restarting would, or as another node."""

    def __init__(self, kind: str, tmp_path: Path, url: str | None) -> None:
        self.kind, self.tmp_path, self.url = kind, tmp_path, url
        self.opened: list[Queue] = []

    def open(self, node: str = "node-a", **kwargs) -> Queue:
        if self.kind == "sqlite":
            queue = SqliteQueue(self.tmp_path / "queue.sqlite", **kwargs)
        else:
            from router.queue.postgres import PostgresQueue

            queue = PostgresQueue(self.url, node=node, **kwargs)
        self.opened.append(queue)
        return queue

    def execute(self, queue: Queue, sql: str, *args) -> None:
        """Write a row as another router version would, on a connection of its own (SQL with ?
        placeholders)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.tmp_path / "queue.sqlite", isolation_level=None, timeout=30) as db:
                db.execute(sql, args)
        else:
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as db:
                db.execute(sql.replace("?", "%s"), args)

    def close(self) -> None:
        for queue in self.opened:
            queue.close()
            if hasattr(queue, "shutdown"):
                queue.shutdown()


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    opened = Backend(request.param, tmp_path, url)
    yield opened
    opened.close()
