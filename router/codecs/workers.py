"""Codec worker processes: CPU-bound transcoding off the receive path, on every core.

Native codecs can abort, segfault or hang on an image they dislike. Encoding therefore runs in
separate processes: a crash kills a worker, never the router. The image that crashed a worker
is tried once more on its own; if it crashes again the caller gets `CodecCrash`. A transcode
that runs past its deadline (`timeout_s` + `timeout_s_per_mb` per MB of the instance, counted
from the moment a worker starts it) has its worker killed and replaced, and the caller gets
`CodecTimeout`. Shutdown waits a bounded time for the workers, then kills them.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue as queue_module
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from router import codecs, log
from router.compat.futures import worker_processes
from router.lifetime import exit_with_parent
from router.request import Request
from router.codecs.transcode import Transcoded, transcode_file

_log = log.get("workers")
_POLL_S = 0.5


class CodecCrash(Exception):
    """The worker process died while transcoding this image (twice: once with others, once alone)."""


class CodecTimeout(CodecCrash):
    """The transcode ran past its deadline; its worker was killed."""


class PoolClosed(RuntimeError):
    """The pool was shut down (the router is stopping): the transcode did not happen."""


@dataclass(frozen=True)
class Submitted:
    """A transcode handed to the pool; pass it to `CodecPool.result`."""

    task_id: int
    src: Path
    dst: Path
    request: Request
    future: Future
    pool: ProcessPoolExecutor  # the pool that runs it: a death there replaces that pool, not a newer one
    deadline_s: float

    def cancel(self) -> None:
        self.future.cancel()


# set in each worker by _start_worker: where a worker says which task it starts
_started_queue = None


def _start_worker(plugins: list[str], router_pid: int, started) -> None:  # noqa: ANN001
    # a worker waits on a queue whose other end it also holds: without this it would wait forever
    # after the router was killed. (Workers are started by whichever thread submits first, so the
    # kernel's parent-death signal, which follows that thread, would fire too early.)
    global _started_queue
    exit_with_parent(router_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the router's terminal: the router drains
    _started_queue = started
    codecs.load_plugins(plugins)
    _load_backends()


def _load_backends() -> None:
    """Import every codec library now, so that the first image does not wait for it."""
    import importlib

    for syntax in codecs.all_syntaxes():
        for backend in (syntax.encoder, syntax.decoder):
            if isinstance(backend, str):
                try:
                    module = importlib.import_module(backend.partition(":")[0])
                    for dependency in getattr(module, "DEPENDENCIES", ()):
                        importlib.import_module(dependency)
                except ImportError:
                    pass  # reported per image by Syntax.cannot_carry


def _ready() -> int:
    return os.getpid()


def _run(task_id: int, src: Path, dst: Path, request: Request, max_decoded_bytes: int | None) -> Transcoded:
    if _started_queue is not None:
        _started_queue.put((task_id, os.getpid(), time.monotonic()))
    # spool files were checked by dicomfile.read_header when they were received
    return transcode_file(src, dst, request, checked=True, max_decoded_bytes=max_decoded_bytes)


class CodecPool:
    def __init__(self, workers: int = 0, plugins: list[str] | None = None, timeout_s: float = 60.0,
                 timeout_s_per_mb: float = 2.0, max_decoded_mb: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.plugins = list(plugins or [])
        self.timeout_s, self.timeout_s_per_mb = timeout_s, timeout_s_per_mb
        self.max_decoded_bytes = max_decoded_mb * 1024 * 1024 if max_decoded_mb else None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # which worker started which task, and when (CLOCK_MONOTONIC is the same in every process)
        self._started: dict[int, tuple[int, float]] = {}
        self._killed: set[int] = set()
        # spawned workers are the router's own children, so they can die with it (see _start_worker)
        self._context = multiprocessing.get_context("spawn")
        self._started_queue = self._context.SimpleQueue()
        self._closed = threading.Event()
        self._closing = False
        threading.Thread(target=self._note_starts, name="codec-starts", daemon=True).start()
        self._pool = self._new_pool()

    def _note_starts(self) -> None:
        while not self._closed.is_set():
            try:
                task_id, pid, at = self._started_queue.get()
            except (EOFError, OSError, queue_module.Empty):
                return
            with self._lock:
                self._started[task_id] = (pid, at)

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self._context,
            initializer=_start_worker, initargs=(self.plugins, os.getpid(), self._started_queue),
        )
        for _ in range(self.workers):  # start the workers now, not when the first image comes
            pool.submit(_ready)
        return pool

    def deadline_s(self, src: Path) -> float:
        try:
            size_mb = os.path.getsize(src) / (1024 * 1024)
        except OSError:
            size_mb = 0.0
        return self.timeout_s + self.timeout_s_per_mb * size_mb

    def submit(self, src: Path, dst: Path, request: Request) -> Submitted:
        """Start transcoding `src` to `dst`; pass the result to `result`."""
        task_id = next(self._ids)
        args = (_run, task_id, src, dst, request, self.max_decoded_bytes)
        with self._lock:
            if self._closing:
                raise PoolClosed("the codec pool is shut down")
            try:
                future = self._pool.submit(*args)
            except (BrokenProcessPool, RuntimeError):
                self._pool = self._new_pool()
                future = self._pool.submit(*args)
            return Submitted(task_id, src, dst, request, future, self._pool, self.deadline_s(src))

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken and not self._closing:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()

    def _overdue(self, submitted: Submitted) -> tuple[int, float] | None:
        """(worker pid, seconds over) when the task started and its deadline has passed."""
        with self._lock:
            started = self._started.get(submitted.task_id)
        if started is None:
            return None
        over = time.monotonic() - started[1] - submitted.deadline_s
        return (started[0], over) if over > 0 else None

    def result(self, submitted: Submitted, retry: bool = True) -> Transcoded | BaseException:
        """The Transcoded or the exception the transcode raised. A transcode whose worker died is
        run once more, alone; a second death gives CodecCrash; one past its deadline CodecTimeout."""
        try:
            while True:
                try:
                    return submitted.future.result(timeout=_POLL_S)
                except FutureTimeout:
                    overdue = self._overdue(submitted)
                    if overdue is not None:
                        self._kill(overdue[0], submitted)
                        return CodecTimeout(f"transcoding {submitted.src.name} to {submitted.request.syntax} "
                                            f"took more than {submitted.deadline_s:.0f} s: its worker was stopped")
        except BrokenProcessPool:
            if self._closing:
                raise PoolClosed("the codec pool was shut down during the transcode") from None
            self._replace_broken(submitted.pool)
            if retry:
                return self.result(self.submit(submitted.src, submitted.dst, submitted.request), retry=False)
            return CodecCrash(f"a codec worker died twice on {submitted.src.name} ({submitted.request.syntax})")
        except BaseException as exc:  # noqa: BLE001 - reported per transcode
            if self._closing:
                raise PoolClosed("the codec pool was shut down during the transcode") from exc
            return exc
        finally:
            with self._lock:
                self._started.pop(submitted.task_id, None)

    def _kill(self, pid: int, submitted: Submitted) -> None:
        _log.error("codec_timeout", file=submitted.src.name, syntax=submitted.request.syntax,
                   deadline_s=round(submitted.deadline_s, 1), action="worker stopped and replaced")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._replace_broken(submitted.pool)  # its other tasks see a broken pool and run again alone

    def run(self, src: Path, dst: Path, request: Request) -> Transcoded | BaseException:
        """Transcode on the pool and wait for it."""
        return self.result(self.submit(src, dst, request))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the workers: those still busy after `timeout` seconds are killed. Waiting callers
        and later submissions get PoolClosed."""
        with self._lock:
            self._closing = True
            pool = self._pool
        processes = list(worker_processes(pool))
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(2)
        self._closed.set()
