"""Destinations on hold: `dicom-router pause DEST` / `resume DEST`, for a PACS's maintenance.

A paused destination keeps receiving into its queue; its forwarder claims nothing until it is
resumed. The hold is a file per destination under the spool's `paused/` (written atomically),
so it survives restarts and every process (and every node sharing the spool) sees the same.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

DIRECTORY = "paused"


class Holds:
    def __init__(self, spool_dir: Path) -> None:
        self.directory = Path(spool_dir) / DIRECTORY

    def _marker(self, destination: str) -> Path:
        if not destination or "/" in destination or destination.startswith("."):
            raise ValueError(f"not a destination name: {destination!r}")
        return self.directory / destination

    def pause(self, destination: str) -> bool:
        """Put `destination` on hold; False when it already was."""
        marker = self._marker(destination)
        if marker.exists():
            return False
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".pause-")
        with os.fdopen(fd, "w") as out:
            out.write(f"{time.time():.3f}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, marker)
        return True

    def resume(self, destination: str) -> bool:
        """Take `destination` off hold; False when it was not on hold."""
        try:
            os.unlink(self._marker(destination))
            return True
        except FileNotFoundError:
            return False

    def is_paused(self, destination: str) -> bool:
        return self._marker(destination).exists()

    def paused(self) -> dict[str, float]:
        """Destinations on hold, with the time each was paused."""
        found: dict[str, float] = {}
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return found
        for marker in entries:
            if marker.name.startswith("."):
                continue
            try:
                found[marker.name] = float(marker.read_text().strip() or 0)
            except (OSError, ValueError):
                found[marker.name] = 0.0
        return found
