"""Codec worker processes: CPU-bound transcoding off the receive path, on every core.

Native codecs can abort or segfault on an image they dislike. Encoding therefore runs in
separate processes: a crash kills a worker, never the router. The image that crashed a worker
is tried once more on its own; if it crashes again it goes out as received.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from router import syntaxes
from router.transcode import Outcome, Request, transcode_file


class CodecCrash(Exception):
    """The worker process died while transcoding this image (twice: once with others, once alone)."""


@dataclass(frozen=True)
class Task:
    src: Path
    dst: Path
    request: Request


def _run(task: Task) -> Outcome:
    # spool files were checked by dicomfile.read_header when they were received
    return transcode_file(task.src, task.dst, task.request, checked=True)


class CodecPool:
    def __init__(self, workers: int = 0, plugins: list[str] | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.plugins = list(plugins or [])
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("forkserver")
        # the fork server's socket lives in the temporary directory of the moment: start it now,
        # before the receiver points that directory at the spool
        forkserver.ensure_running()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self._context,
            initializer=syntaxes.load_plugins, initargs=(self.plugins,),
        )

    def _submit(self, task: Task) -> Future:
        with self._lock:
            try:
                return self._pool.submit(_run, task)
            except (BrokenProcessPool, RuntimeError):
                self._pool = self._new_pool()
                return self._pool.submit(_run, task)

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()

    def submit(self, task: Task) -> Future:
        """Start a task; pass the future to `resolve` for its result."""
        return self._submit(task)

    def resolve(self, task: Task, future: Future) -> Outcome | BaseException:
        """The task's Outcome or exception; a worker death is retried once with the task alone."""
        pool = self._pool
        try:
            return future.result()
        except BrokenProcessPool:
            self._replace_broken(pool)
            return self._run_alone(task)
        except BaseException as exc:  # noqa: BLE001 - reported per task
            return exc

    def run_many(self, tasks: list[Task]) -> list[Outcome | BaseException]:
        """Transcode in parallel; each result is an Outcome or the exception that task raised.

        A task whose worker died is retried alone; a second death gives CodecCrash.
        """
        pool = self._pool
        futures = [self._submit(t) for t in tasks]
        results: list[Outcome | BaseException] = []
        crashed: list[int] = []
        for index, future in enumerate(futures):
            try:
                results.append(future.result())
            except BrokenProcessPool:
                results.append(CodecCrash("worker died"))
                crashed.append(index)
            except BaseException as exc:  # noqa: BLE001 - reported per task
                results.append(exc)
        if crashed:
            self._replace_broken(pool)
            for index in crashed:
                results[index] = self._run_alone(tasks[index])
        return results

    def _run_alone(self, task: Task) -> Outcome | BaseException:
        pool = self._pool
        try:
            return self._submit(task).result()
        except BrokenProcessPool:
            self._replace_broken(pool)
            return CodecCrash(f"a codec worker died twice on {task.src.name} ({task.request.syntax})")
        except BaseException as exc:  # noqa: BLE001
            return exc

    def run(self, task: Task) -> Outcome:
        result = self.run_many([task])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def shutdown(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
