"""Workaround of concurrent.futures behaviour (see the package docstring)."""

from __future__ import annotations

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
