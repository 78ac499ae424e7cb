"""Files a rule reads while it runs (a de-identification key, a coercion map), read again when
they change on disk (their size or modification time), so that a fixed file takes effect at the
next instance without a restart; read once otherwise."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Watched(Generic[T]):
    """`read(path)` parsed by `parse`, kept per path until the file changes."""

    def __init__(self, parse: Callable[[Path], T]) -> None:
        self._parse = parse
        self._cache: dict[Path, tuple[tuple[int, int], T]] = {}
        self._lock = threading.Lock()

    def read(self, path: Path) -> T:
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(path)
            if cached is None or cached[0] != key:
                self._cache[path] = cached = (key, self._parse(path))
            return cached[1]
