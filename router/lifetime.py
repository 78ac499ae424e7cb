"""Child processes of the router never outlive it, even when it is killed with SIGKILL."""

from __future__ import annotations

import ctypes
import os
import threading


def die_with_parent() -> None:
    """Have the kernel send SIGKILL to this process when the thread that started it ends (Linux).

    Only for children started by a thread that lives as long as the router: the kernel follows
    the parent *thread*, not the parent process.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass  # not Linux: callers keep their own watch on the parent


def exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Exit within `interval` seconds of process `parent` (ours) going away, whichever thread
    started us; at once if it is already gone."""
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            threading.Event().wait(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
