"""Workaround of concurrent.futures behaviour (see the package docstring)."""

from __future__ import annotations

import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.process import BaseProcess


def worker_processes(pool: ProcessPoolExecutor) -> list[BaseProcess]:
    """The worker processes of `pool`.

    `ProcessPoolExecutor.shutdown()` has no timeout: with a worker stuck in native code it waits
    forever (cpython issue #94440 asks for a way to terminate workers; Python 3.14 adds
    `terminate_workers()`/`kill_workers()`). Until then the only handle on the workers is the
    private `_processes` mapping (pid -> Process).
    """
    processes = getattr(pool, "_processes", None) or {}
    return list(processes.values())


def manager_thread(pool: ProcessPoolExecutor) -> threading.Thread | None:
    """The thread of `pool` that joins its workers once it is shut down (None after `shutdown()`).

    That thread and a caller both waiting on a killed worker race for its exit status: the one
    that loses sees no such child and leaves the worker's `returncode` unset, so `is_alive()`
    says True until the winner records it. Joining this thread after killing the workers ends
    the race. Private attribute of `ProcessPoolExecutor` (the same as above).
    """
    return getattr(pool, "_executor_manager_thread", None)
