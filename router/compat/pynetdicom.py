"""Workarounds of pynetdicom 3.0 behaviour (see the package docstring)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer


def stream_datasets_to_files(directory: Path) -> None:
    """Have pynetdicom write each received C-STORE data set to a file in `directory`.

    pynetdicom streams a received data set to disk only when the module-level
    `_config.STORE_RECV_CHUNKED_DATASET` is set (pynetdicom PR #526, from issue #517), and then
    writes it with `NamedTemporaryFile()` in Python's default temporary directory: there is no
    option for the directory. Pointing `tempfile.tempdir` at the spool's `incoming/` makes
    accepting an instance a rename on one filesystem. Process-wide by nature: call it once, from
    the process entry point, never from a library object.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(directory)


def send_datasets_from_files() -> None:
    """Send C-STORE data sets straight from their files (`_config.STORE_SEND_CHUNKED_DATASET`,
    pynetdicom PR #520): a large instance is never held whole in memory."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Let `server.shutdown()` (and `AE.shutdown()`) work for a server made by `AE.make_server`.

    `AE.start_server()` takes no `server_class`, so a server with our own socket options
    (SO_REUSEPORT) must come from `make_server()`, which does not record it in `AE._servers`;
    `ThreadedAssociationServer.shutdown()` then fails removing itself from that list.
    """
    ae._servers.append(server)


def park_reactor(assoc: Association, timeout: float = 0.05) -> None:
    """Make sure pynetdicom's reactor thread is parked before a C-STORE is sent.

    `Association.send_c_store` pauses the association's reactor by clearing a checkpoint and
    waiting for a flag, but the flag can be left over from the reactor's previous pass: the
    reactor then takes the C-STORE response off the queue as an "unexpected" message and the
    sender waits for the DIMSE timeout (pynetdicom issues #435 and #850). The reactor raises the
    flag right before it waits at the checkpoint; seeing the flag down and then up again after
    the checkpoint was cleared proves it is waiting with the checkpoint closed.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    seen_running = False
    while time.monotonic() < deadline:
        if not assoc._is_paused:
            seen_running = True
        elif seen_running:
            return
        time.sleep(0.0001)
