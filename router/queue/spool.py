"""The spool: one file per received instance, made durable before the sender hears success.

Layout under the spool directory (created owner-only):
  incoming/   files being received (the network layer writes here); never trusted after a crash
  instances/  durable instances, named by a random id; the queue refers to them by path
  out/        transcoded copies waiting to be sent; always re-creatable, swept at start-up

Several nodes may share one spool directory (with the PostgreSQL queue). Each then has its own
`incoming/NODE/` and `out/NODE/`, names its instances `NODE@<random>.dcm`, and sweeps only its
own files at start-up: another live node's receptions in progress are never touched. Free space
is the shared filesystem's.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from router import log
from router.queue.group import GroupCommit

if TYPE_CHECKING:
    from router.config import Loaded

_log = log.get("spool")


class Spool:
    def __init__(self, root: Path, min_free_mb: int = 0, node: str = "") -> None:
        """`node`: this node's name when several share the directory ("" for one node)."""
        self.root = Path(root)
        self.node = node
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.incoming = self.root / "incoming" / node if node else self.root / "incoming"
        self.instances = self.root / "instances"
        self.out = self.root / "out" / node if node else self.root / "out"
        self._prefix = f"{node}@" if node else ""  # "@" is in no node name
        for directory in (self.root, self.incoming, self.instances, self.out):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._syncer: ThreadPoolExecutor | None = None
        self._syncer_lock = threading.Lock()
        # renames into instances/ that happen together are made durable by one fsync of it
        self._renamed: GroupCommit[Path] = GroupCommit(lambda _: _fsync_dir(self.instances))

    def sync_soon(self, received: Path) -> Future:
        """Start flushing a received file to disk in the background (fsync releases the GIL), so
        that it overlaps with reading its header; pass the future to `accept`."""
        with self._syncer_lock:
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-fsync")
        fd = os.open(received, os.O_RDONLY)  # opened now: the file may be removed meanwhile
        return self._syncer.submit(_fsync_close, fd)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self) -> bool:
        """Whether the spool's filesystem still has at least `min_free_mb` free."""
        return self.free_bytes() >= self.min_free_bytes

    def writable(self) -> bool:
        return os.access(self.instances, os.W_OK | os.X_OK)

    def accept(self, received: Path, synced: Future | None = None) -> Path:
        """Make a fully received file durable in `instances/` and return its new path.

        The file is fsynced (or `synced`, from `sync_soon`, is waited for), renamed (atomic on one
        filesystem) and the directory fsynced, so after this returns the instance survives a crash
        or power loss.
        """
        if synced is not None:
            synced.result()  # raises the fsync's OSError, if any
        else:
            _fsync_close(os.open(received, os.O_RDONLY))
        final = self.instances / f"{self._prefix}{uuid.uuid4().hex}.dcm"
        try:
            os.rename(received, final)
        except OSError:
            # a different filesystem: copy, then the same guarantees
            shutil.copyfile(received, final)
            fd = os.open(final, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._renamed.submit(final)
        return final

    def out_path(self, job_id: int, suffix: str = "") -> Path:
        return self.out / f"{job_id}{suffix}.dcm"

    def remove(self, path: Path | str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def sweep(self, known: Iterable[str]) -> list[Path]:
        """Delete what no queue row refers to: partial receptions, orphan instances, stale outputs.

        An instance file without a queue row was never acknowledged (the crash came between the
        rename and the commit), so the sender was not told success and will send it again.
        Returns the instance files removed.
        With several nodes sharing the spool, only this node's own files are swept.
        """
        keep = {os.path.realpath(p) for p in known}
        removed = []
        for path in self.instances.iterdir():
            if path.is_dir():
                continue
            if self.node and not path.name.startswith(self._prefix):
                continue  # another node's: perhaps being received right now
            if os.path.realpath(path) not in keep:
                self.remove(path)
                removed.append(path)
        for directory in (self.incoming, self.out):
            for path in directory.iterdir():
                if not path.is_dir():  # incoming/NODE/ and out/NODE/ are other nodes'
                    self.remove(path)
        return removed


class LateRemoval:
    """Spool files freed by completions committed without an fsync, removed in the background.

    A completion (job done, history written) need not be durable at once: lost at a power cut,
    its job is pending again and its instance is sent once more. Its file must therefore stay
    until the completion is durable. Paths given to `remove` wait here; every `interval_s` (or
    sooner, once `group` are waiting) one `sync()` of the queue makes every completion so far
    durable, then their files go: one fsync for the group instead of one per completion, and
    the unlinks off the sending thread. `flush()` does it at once (at stop). After a crash the
    files left are those the start-up sweep finds without a row, or whose jobs are pending.
    """

    def __init__(self, spool: Spool, sync: Callable[[], None], interval_s: float = 0.25, group: int = 256) -> None:
        self.spool, self.sync = spool, sync
        self.interval_s, self.group = interval_s, group
        self._waiting: list[str] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._due = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def remove(self, paths: Iterable[str]) -> None:
        with self._lock:
            self._waiting.extend(paths)
            waiting = len(self._waiting)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="spool-removal", daemon=True)
                self._thread.start()
        if waiting >= self.group:
            self._due.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._due.wait(self.interval_s)
            self._due.clear()
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - the queue cannot sync now: the files wait
                _log.warning("spool_removal_deferred", error=str(exc), action="tried again shortly")

    def flush(self) -> None:
        """Make the completions so far durable, then remove their files."""
        with self._flush_lock:
            with self._lock:
                paths, self._waiting = self._waiting, []
            if not paths:
                return
            try:
                self.sync()
            except BaseException:
                with self._lock:
                    self._waiting[:0] = paths
                raise
            for path in paths:
                self.spool.remove(path)

    def close(self) -> None:
        self._closed.set()
        self._due.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.flush()


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def spool_for(cfg: Loaded) -> Spool:
    """The spool: this node's part of a shared one when several nodes share the queue."""
    node = cfg.router.queue.node if cfg.router.queue.url else ""
    return Spool(cfg.spool_dir, cfg.router.storage.min_free_mb, node=node)
