"""Codec worker processes: CPU-bound transcoding off the receive path, on every core.

Native codecs can abort, segfault or hang on an image they dislike. Encoding therefore runs in
separate processes: a crash kills a worker, never the router. The image that crashed a worker
is tried once more on its own; if it crashes again the caller gets `CodecCrash`. A transcode
that runs past its deadline (`timeout_s` + `timeout_s_per_mb` per MB of the instance, counted
from the moment a worker starts it) has its worker killed and replaced, and the caller gets
`CodecTimeout`. A pool that stops making progress, wherever its workers stopped (one frozen
while idle holds the queue every worker takes its tasks from; one stopped between taking a task
and starting it), is found the same way: a task no worker started within its deadline, counted
from its submission or from the pool's last sign of life if later, while no worker is inside a
transcode within its own deadline. Then every worker is killed, the pool replaced, and the task
run again alone, as for a crash (a second stall gives `CodecTimeout`). Each replacement is
logged and counted in `dicom_router_codec_pool_restarts_total{reason}` (crash, timeout, stall).
Shutdown waits a bounded time for the workers, then kills them.

One image may declare at most `max_decoded_mb` of decoded pixel data, and no more than each
worker can afford when all decode at once (`image_limit_bytes`: a quarter of the machine's
memory shared by the workers, a worker holding about four bytes per decoded byte at its peak):
above that it is refused before anything is decoded (`TranscodeError`), and goes to its fallback
or as received.
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
from dataclasses import dataclass, field
from pathlib import Path

from router import codecs, log, metrics
from router.compat.futures import manager_thread, worker_processes
from router.lifetime import exit_with_parent
from router.request import Request
from router.codecs.transcode import Transcoded, transcode_file

_log = log.get("workers")
_POLL_S = 0.5
# how long a new pool's workers may take to start (spawn, import every codec) before the first
# of them is ready; a task's stall deadline runs only after that
_STARTUP_S = 30.0
# what a worker holds at its peak per byte of decoded pixel data it produces (the decoded frames,
# the values fitted to their precision, the output's bytes, the codec's own buffers): measured
# with a 12-frame JPEG-LS image decompressed to Explicit VR Little Endian
_PEAK_PER_DECODED_BYTE = 4
# the share of the machine's memory all the workers together may use for the images they decode
_MEMORY_SHARE = 0.25
RESTART_REASONS = ("crash", "timeout", "stall")


class CodecCrash(Exception):
    """The worker process died while transcoding this image (twice: once with others, once alone)."""


class CodecTimeout(CodecCrash):
    """The transcode ran past its deadline (or the pool stalled twice on it); its worker was killed."""


class PoolClosed(RuntimeError):
    """The pool was shut down (the router is stopping): the transcode did not happen."""


def machine_memory_bytes() -> int:
    """This machine's memory (its physical pages), or the limit of this process's cgroup when lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return total
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.strip().lstrip("/")
        if controllers == "":  # cgroup v2
            limit_file = Path("/sys/fs/cgroup", path, "memory.max")
        elif "memory" in controllers.split(","):  # cgroup v1
            limit_file = Path("/sys/fs/cgroup/memory", path, "memory.limit_in_bytes")
        else:
            continue
        try:
            limit = limit_file.read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def image_limit_bytes(workers: int, max_decoded_mb: int | None) -> int:
    """The most decoded pixel data one image may declare: `max_decoded_mb`, and no more than
    each of `workers` workers decoding at once can afford within `_MEMORY_SHARE` of the
    machine's memory, at `_PEAK_PER_DECODED_BYTE` bytes of worker memory per decoded byte."""
    affordable = int(machine_memory_bytes() * _MEMORY_SHARE) // (max(1, workers) * _PEAK_PER_DECODED_BYTE)
    return min(max_decoded_mb * 1024 * 1024, affordable) if max_decoded_mb else affordable


@dataclass(eq=False)
class _Generation:
    """One set of worker processes, replaced as a whole, and what the pool knows of it."""

    executor: ProcessPoolExecutor
    started: object  # multiprocessing queue: where its workers say which task they start
    progress_at: float  # when it was made, or one of its workers last became ready, started or ended a task
    ready: bool = False  # a worker has started and loaded the codecs
    retired: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Task:
    generation: _Generation
    submitted_at: float
    deadline_s: float
    started: tuple[int, float] | None = None  # (worker pid, when), CLOCK_MONOTONIC in every process


@dataclass(frozen=True)
class Submitted:
    """A transcode handed to the pool; pass it to `CodecPool.result`."""

    task_id: int
    src: Path
    dst: Path
    request: Request
    future: Future
    generation: _Generation  # the workers that run it: a death there replaces them, not newer ones
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
        self.max_decoded_bytes = image_limit_bytes(self.workers, max_decoded_mb)
        # re-entrant: a new generation's callbacks may run at once, in the thread that holds it
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._tasks: dict[int, _Task] = {}  # submitted and not ended
        # spawned workers are the router's own children, so they can die with it (see _start_worker)
        self._context = multiprocessing.get_context("spawn")
        self._closing = False
        self._generation = self._new_generation()

    # -- generations of workers

    def _new_generation(self) -> _Generation:
        # a queue of its own: a worker killed while it held the queue's lock leaves it locked for good
        started = self._context.Queue()
        executor = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self._context,
            initializer=_start_worker, initargs=(self.plugins, os.getpid(), started),
        )
        generation = _Generation(executor, started, time.monotonic())
        threading.Thread(target=self._note_starts, args=(generation,), name="codec-starts", daemon=True).start()
        for _ in range(self.workers):  # start the workers now, not when the first image comes
            executor.submit(_ready).add_done_callback(lambda _, g=generation: self._note_ready(g))
        return generation

    def _note_ready(self, generation: _Generation) -> None:
        with self._lock:
            generation.ready = True
            generation.progress_at = time.monotonic()

    def _note_starts(self, generation: _Generation) -> None:
        while not generation.retired.is_set():
            try:
                task_id, pid, at = generation.started.get(timeout=_POLL_S)
            except queue_module.Empty:
                continue
            except (EOFError, OSError, ValueError):
                return
            with self._lock:
                generation.progress_at = time.monotonic()
                task = self._tasks.get(task_id)
                if task is not None:
                    task.started = (pid, at)
        generation.started.close()

    def _note_end(self, task_id: int) -> None:
        with self._lock:
            task = self._tasks.pop(task_id, None)
            if task is not None:
                task.generation.progress_at = time.monotonic()

    def _replace(self, generation: _Generation, reason: str) -> None:
        """Kill the workers of `generation` and put a new one in its place, unless that was done
        already; its tasks that had not ended see a broken pool and run again alone."""
        with self._lock:
            if self._generation is not generation or self._closing:
                return
            self._generation = self._new_generation()
        self._retire(generation)
        metrics.CODEC_POOL_RESTARTS.labels(reason=reason).inc()

    def _retire(self, generation: _Generation) -> None:
        generation.retired.set()
        # SIGKILL stops a worker whatever it does, stopped (SIGSTOP) included; the executor then
        # fails the futures it still holds with BrokenProcessPool, which their callers run again
        for process in worker_processes(generation.executor):
            try:
                process.kill()
            except (OSError, ValueError):
                pass
        generation.executor.shutdown(wait=False)

    # -- transcodes

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
        deadline_s = self.deadline_s(src)
        broken = None
        with self._lock:
            if self._closing:
                raise PoolClosed("the codec pool is shut down")
            try:
                future = self._generation.executor.submit(*args)
            except (BrokenProcessPool, RuntimeError):
                broken, self._generation = self._generation, self._new_generation()
                future = self._generation.executor.submit(*args)
            generation = self._generation
            self._tasks[task_id] = _Task(generation, time.monotonic(), deadline_s)
        if broken is not None:
            self._retire(broken)
            metrics.CODEC_POOL_RESTARTS.labels(reason="crash").inc()
        future.add_done_callback(lambda _: self._note_end(task_id))
        return Submitted(task_id, src, dst, request, future, generation, deadline_s)

    def _overdue(self, submitted: Submitted) -> tuple[int, float] | None:
        """(worker pid, seconds over) when the task started and its deadline has passed."""
        with self._lock:
            task = self._tasks.get(submitted.task_id)
            started = task.started if task is not None else None
        if started is None:
            return None
        over = time.monotonic() - started[1] - submitted.deadline_s
        return (started[0], over) if over > 0 else None

    def _stalled(self, submitted: Submitted) -> float | None:
        """Seconds the task has waited for a worker, when no worker started it within its deadline
        (from its submission, or from its pool's last sign of life if later) while none of them
        is inside a transcode within its own deadline: the pool has stopped."""
        now = time.monotonic()
        with self._lock:
            task = self._tasks.get(submitted.task_id)
            if task is None or task.started is not None:
                return None
            generation = task.generation
            if any(t.generation is generation and t.started is not None and now - t.started[1] <= t.deadline_s
                   for t in self._tasks.values()):
                return None  # a worker is busy, within its deadline: the pool goes on
            quiet = now - max(task.submitted_at, generation.progress_at)
            allowed = task.deadline_s + (0.0 if generation.ready else _STARTUP_S)
            return now - task.submitted_at if quiet > allowed else None

    def result(self, submitted: Submitted, retry: bool = True) -> Transcoded | BaseException:
        """The Transcoded or the exception the transcode raised. A transcode whose worker died, or
        that no worker started because the pool stalled, is run once more, alone; a second death
        gives CodecCrash; one past its deadline (or a second stall) CodecTimeout."""
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
                    waited = self._stalled(submitted)
                    if waited is not None:
                        return self._after_stall(submitted, waited, retry)
        except BrokenProcessPool:
            if self._closing:
                raise PoolClosed("the codec pool was shut down during the transcode") from None
            self._replace(submitted.generation, "crash")
            if retry:
                return self.result(self.submit(submitted.src, submitted.dst, submitted.request), retry=False)
            return CodecCrash(f"a codec worker died twice on {submitted.src.name} ({submitted.request.syntax})")
        except BaseException as exc:  # noqa: BLE001 - reported per transcode
            if self._closing:
                raise PoolClosed("the codec pool was shut down during the transcode") from exc
            return exc
        finally:
            with self._lock:
                self._tasks.pop(submitted.task_id, None)

    def _after_stall(self, submitted: Submitted, waited: float, retry: bool) -> Transcoded | BaseException:
        _log.error("codec_pool_stalled", file=submitted.src.name, syntax=submitted.request.syntax,
                   waited_s=round(waited, 1), deadline_s=round(submitted.deadline_s, 1),
                   action="workers stopped and replaced; the transcode runs again" if retry
                   else "workers stopped and replaced; fallback")
        self._replace(submitted.generation, "stall")
        if self._closing:
            raise PoolClosed("the codec pool was shut down during the transcode")
        if retry:
            return self.result(self.submit(submitted.src, submitted.dst, submitted.request), retry=False)
        return CodecTimeout(f"no codec worker started {submitted.src.name} ({submitted.request.syntax}) within "
                            f"{submitted.deadline_s:.0f} s, twice: the pool had stalled")

    def _kill(self, pid: int, submitted: Submitted) -> None:
        _log.error("codec_timeout", file=submitted.src.name, syntax=submitted.request.syntax,
                   deadline_s=round(submitted.deadline_s, 1), action="worker stopped and replaced")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._replace(submitted.generation, "timeout")  # its other tasks see a broken pool and run again alone

    def run(self, src: Path, dst: Path, request: Request) -> Transcoded | BaseException:
        """Transcode on the pool and wait for it."""
        return self.result(self.submit(src, dst, request))

    def worker_pids(self) -> list[int]:
        """The process ids of the current workers (those started so far)."""
        return [p.pid for p in worker_processes(self._generation.executor) if p.pid is not None]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the workers: those still busy after `timeout` seconds are killed. Waiting callers
        and later submissions get PoolClosed."""
        with self._lock:
            self._closing = True
            generation = self._generation
        processes = list(worker_processes(generation.executor))
        manager = manager_thread(generation.executor)
        generation.executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(2)
        if manager is not None:
            manager.join(5)  # it also waits on the killed workers: their exit status is then known
        generation.retired.set()
