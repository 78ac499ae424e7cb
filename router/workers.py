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

from router import codecs
from router.lifetime import exit_with_parent
from router.request import Request
from router.transcode import Transcoded, transcode_file


class CodecCrash(Exception):
    """The worker process died while transcoding this image (twice: once with others, once alone)."""


@dataclass(frozen=True)
class Submitted:
    """A transcode handed to the pool; pass it to `CodecPool.result`."""

    src: Path
    dst: Path
    request: Request
    future: Future
    pool: ProcessPoolExecutor  # the pool that runs it: a death there replaces that pool, not a newer one

    def cancel(self) -> None:
        self.future.cancel()


def _start_worker(plugins: list[str], router_pid: int) -> None:
    # a worker waits on a queue whose other end it also holds: without this it would wait forever
    # after the router was killed. (Workers are started by whichever thread submits first, so the
    # kernel's parent-death signal, which follows that thread, would fire too early.)
    exit_with_parent(router_pid)
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


def _started() -> int:
    return os.getpid()


def _run(src: Path, dst: Path, request: Request) -> Transcoded:
    # spool files were checked by dicomfile.read_header when they were received
    return transcode_file(src, dst, request, checked=True)


class CodecPool:
    def __init__(self, workers: int = 0, plugins: list[str] | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.plugins = list(plugins or [])
        self._lock = threading.Lock()
        # spawned workers are the router's own children, so they can die with it (see _start_worker)
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self._context,
            initializer=_start_worker, initargs=(self.plugins, os.getpid()),
        )
        for _ in range(self.workers):  # start the workers now, not when the first image comes
            pool.submit(_started)
        return pool

    def submit(self, src: Path, dst: Path, request: Request) -> Submitted:
        """Start transcoding `src` to `dst`; pass the result to `result`."""
        with self._lock:
            try:
                future = self._pool.submit(_run, src, dst, request)
            except (BrokenProcessPool, RuntimeError):
                self._pool = self._new_pool()
                future = self._pool.submit(_run, src, dst, request)
            return Submitted(src, dst, request, future, self._pool)

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()

    def result(self, submitted: Submitted, retry: bool = True) -> Transcoded | BaseException:
        """The Transcoded or the exception the transcode raised. A transcode whose worker died is
        run once more, alone; a second death gives CodecCrash."""
        try:
            return submitted.future.result()
        except BrokenProcessPool:
            self._replace_broken(submitted.pool)
            if retry:
                return self.result(self.submit(submitted.src, submitted.dst, submitted.request), retry=False)
            return CodecCrash(f"a codec worker died twice on {submitted.src.name} ({submitted.request.syntax})")
        except BaseException as exc:  # noqa: BLE001 - reported per transcode
            return exc

    def run(self, src: Path, dst: Path, request: Request) -> Transcoded | BaseException:
        """Transcode on the pool and wait for it."""
        return self.result(self.submit(src, dst, request))

    def shutdown(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
