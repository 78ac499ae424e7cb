"""The router's processes seen from /proc: its codec workers, the memory a process used, and
processes stopped on purpose (SIGSTOP)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.support.peers import descendants


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory process `pid` has used so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmHWM for process {pid}")


def codec_workers(router_pid: int) -> list[int]:
    """The router's codec worker processes: its children started by multiprocessing (spawn)."""
    found = []
    for pid in descendants(router_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(pid)
    return found


def is_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def resume_and_kill(pids: list[int]) -> None:
    """Clean up after a test that stopped processes (SIGSTOP): kill those still there."""
    for pid in pids:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
