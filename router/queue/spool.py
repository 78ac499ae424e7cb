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
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.config import Loaded


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
        _fsync_dir(self.instances)
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
