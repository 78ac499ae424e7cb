"""Group commit: receipts that arrive while another is being committed share the next commit,
each caller returns only once its own receipt is committed, and each gets its own error."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from router.queue import Instance, NewJob
from router.queue.group import GroupCommit
from router.request import Request
from tests.support.queues import backend  # noqa: F401 - each test runs on SQLite and on PostgreSQL


def test_items_arriving_during_a_commit_share_the_next_one_and_each_returns_after_its_own():
    groups: list[list[int]] = []
    inside = threading.Event()
    release = threading.Event()
    committed: set[int] = set()

    def commit(items: list[int]) -> None:
        if not groups:  # the first commit holds until the others have queued behind it
            inside.set()
            assert release.wait(10)
        groups.append(list(items))
        committed.update(items)

    group = GroupCommit(commit)
    returned_after_commit: dict[int, bool] = {}

    def submit(n: int) -> None:
        group.submit(n)
        returned_after_commit[n] = n in committed

    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(submit, 0)
        assert inside.wait(10)
        later = [pool.submit(submit, n) for n in range(1, 6)]
        while len(group._waiting) < 5:  # noqa: SLF001 - queued behind the first commit
            threading.Event().wait(0.01)
        release.set()
        for f in [first, *later]:
            f.result(10)
    assert groups[0] == [0] and sorted(groups[1]) == [1, 2, 3, 4, 5] and len(groups) == 2
    assert all(returned_after_commit.values()) and len(returned_after_commit) == 6


def test_a_failing_item_fails_alone_when_its_group_is_tried_again_one_by_one():
    inside, release = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    def commit(items: list[int]) -> None:
        calls.append(list(items))
        if len(calls) == 1:
            inside.set()
            assert release.wait(10)
        if 3 in items:
            raise ValueError("item 3 cannot be recorded")

    group = GroupCommit(commit)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(group.submit, 0)
        assert inside.wait(10)
        others = {n: pool.submit(group.submit, n) for n in (2, 3, 4)}
        while len(group._waiting) < 3:  # noqa: SLF001
            threading.Event().wait(0.01)
        release.set()
        first.result(10)
        with pytest.raises(ValueError, match="item 3"):
            others[3].result(10)
        others[2].result(10)
        others[4].result(10)


def instance(n: int) -> Instance:
    return Instance(path=f"/spool/{n}.dcm", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"2.25.{n}",
                    study_instance_uid="2.25.9", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="CT1",
                    called_ae="ROUTER", source_ip="127.0.0.1", size=10, received_at=1.0)


def test_receipts_from_many_threads_are_all_recorded_once(backend):  # noqa: F811
    queue = backend.open()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: queue.add(instance(n), [NewJob("PACS", Request(syntax="original"), "t")]
                                          if n % 5 else []), range(60)))
    claimed = queue.claim("PACS", 100)
    assert sorted(int(j.instance.sop_instance_uid.split(".")[-1]) for j in claimed) == \
        [n for n in range(60) if n % 5]
