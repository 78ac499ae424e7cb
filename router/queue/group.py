"""Group commit: what several threads make durable at the same moment, made durable once.

Receipts on concurrent associations each end with an fsync (their queue row's COMMIT, the spool
directory after the rename). A thread that arrives while another is inside that fsync waits;
when the fsync ends, the first of those waiting commits everything that arrived meanwhile in one
go and the others return with it. Each caller still returns only once its own item is durable,
and each gets its own error: when a group fails, its items are tried again one by one. One
association alone never waits for anyone: its group is itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Entry(Generic[T]):
    __slots__ = ("item", "wake", "finished", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.wake = threading.Event()  # set when it is done, or when it is to lead the next group
        self.finished = False
        self.error: BaseException | None = None


class GroupCommit(Generic[T]):
    """`submit(item)` runs `commit([...])` on a group of items that includes `item`, and returns
    once that group's commit returned (or raises what committing `item` raised)."""

    def __init__(self, commit: Callable[[list[T]], None]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._waiting: list[_Entry[T]] = []
        self._leading = False  # a thread is committing a group; the next group waits for it

    def submit(self, item: T) -> None:
        entry = _Entry(item)
        with self._lock:
            self._waiting.append(entry)
            lead = not self._leading
            self._leading = True
        if not lead:
            entry.wake.wait()
        if not entry.finished:  # this thread commits what has arrived, its own item included
            with self._lock:
                group, self._waiting = self._waiting, []
            try:
                self._run(group)
            finally:
                with self._lock:
                    if self._waiting:
                        self._waiting[0].wake.set()  # it leads the group that came meanwhile
                    else:
                        self._leading = False
        if entry.error is not None:
            raise entry.error

    def _run(self, group: list[_Entry[T]]) -> None:
        try:
            self._commit([e.item for e in group])
        except BaseException as exc:
            if len(group) == 1:
                group[0].error = exc
            else:
                for entry in group:  # each its own outcome: one bad item does not fail the others
                    try:
                        self._commit([entry.item])
                    except BaseException as alone:  # noqa: BLE001 - handed to its caller
                        entry.error = alone
        for entry in group:
            entry.finished = True
            entry.wake.set()
