"""Codec worker processes: CPU-bound transcoding off the receive path, on every core.

Native codecs can abort or segfault on an image they dislike. Encoding therefore runs in
separate processes: a crash kills a worker, never the router. The image that crashed a worker
is tried once more on its own; if it crashes again it goes out as received.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from router import syntaxes
from router.lifetime import exit_with_parent
from router.transcode import Outcome, Request, transcode_file


class CodecCrash(Exception):
    """The worker process died while transcoding this image (twice: once with others, once alone)."""


@dataclass(frozen=True)
class Task:
    src: Path
    dst: Path
    request: Request


def _start_worker(plugins: list[str], router_pid: int) -> None:
    # a worker waits on a queue whose other end it also holds: without this it would wait forever
    # after the router was killed. (Workers are started by whichever thread submits first, so the
    # kernel's parent-death signal, which follows that thread, would fire too early.)
    exit_with_parent(router_pid)
    syntaxes.load_plugins(plugins)


def _run(task: Task) -> Outcome:
    # spool files were checked by dicomfile.read_header when they were received
    return transcode_file(task.src, task.dst, task.request, checked=True)


class CodecPool:
    def __init__(self, workers: int = 0, plugins: list[str] | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.plugins = list(plugins or [])
        self._lock = threading.Lock()
        # spawned workers are the router's own children, so they can die with it (see _start_worker)
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self._context,
            initializer=_start_worker, initargs=(self.plugins, os.getpid()),
        )

    def submit(self, task: Task) -> Future:
        """Start a task; pass the future to `resolve` for its result."""
        with self._lock:
            try:
                future = self._pool.submit(_run, task)
            except (BrokenProcessPool, RuntimeError):
                self._pool = self._new_pool()
                future = self._pool.submit(_run, task)
            # which pool ran it: a death there must replace that pool, not a newer one
            future.pool = self._pool  # type: ignore[attr-defined]
            return future

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()

    def resolve(self, task: Task, future: Future, retry: bool = True) -> Outcome | BaseException:
        """The task's Outcome or exception. A task whose worker died is run once more, alone;
        a second death gives CodecCrash."""
        try:
            return future.result()
        except BrokenProcessPool:
            self._replace_broken(future.pool)  # type: ignore[attr-defined]
            if retry:
                return self.resolve(task, self.submit(task), retry=False)
            return CodecCrash(f"a codec worker died twice on {task.src.name} ({task.request.syntax})")
        except BaseException as exc:  # noqa: BLE001 - reported per task
            return exc

    def run_many(self, tasks: list[Task]) -> list[Outcome | BaseException]:
        """Transcode in parallel; each result is an Outcome or the exception that task raised."""
        futures = [self.submit(t) for t in tasks]
        return [self.resolve(t, f) for t, f in zip(tasks, futures)]

    def shutdown(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
