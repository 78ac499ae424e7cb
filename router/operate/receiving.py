"""A receiving process (`python -m router.operate.receiving`, started by `service.Router`): a
`receive.scp.Receiver` on the shared port feeding a `receive.intake.Intake`, which tells the
supervisor which destinations have new work, and the storage commitment requests with their
reports on the requests' own associations (`commitment.reports.AssociationReports`).

It loads neither the forwarder, the association pool, the codecs nor numpy: pydicom 3.0 imports
numpy whenever it is installed (`pydicom.config`), so the entry point hides it before pydicom
loads; nothing here decodes pixels.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading



class _WithoutNumpy:
    """Makes `import numpy` fail, so that pydicom runs without it. A finder rather than a None
    in sys.modules: libraries that look for numpy there (psycopg) find nothing and go on."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError("numpy is not loaded in a receiving process", name=name)


if __name__ == "__main__":  # before pydicom: a receiving process never needs numpy
    sys.meta_path.insert(0, _WithoutNumpy)  # type: ignore[arg-type]

from router import config as config_mod  # noqa: E402
from router import audit, log, metrics  # noqa: E402
from router.commitment.reports import AssociationReports  # noqa: E402
from router.compat.pynetdicom import (  # noqa: E402
    accept_unknown_storage_classes, check_uids_once, quiet_reactors, stream_datasets_to_files, use_poll,
)
from router.config import ConfigError, DestinationRules  # noqa: E402
from router.lifetime import die_with_parent  # noqa: E402
from router.queue import open_queue  # noqa: E402
from router.queue.spool import spool_for  # noqa: E402
from router.receive.intake import Intake  # noqa: E402
from router.receive.scp import Receiver  # noqa: E402

_log = log.get("receiving")


def run_receiver_process(config_path: str, wake: str) -> int:
    """One of the receiving processes `serve` starts: listens on the shared port until SIGTERM
    or until its parent goes away; SIGHUP reloads the rule files. `wake` names the parent's
    abstract Unix socket, told which destinations have new work (and, once, that we listen)."""
    use_poll()
    quiet_reactors()
    check_uids_once()
    parent = os.getppid()
    # a receiver that outlived the router would accept images no forwarder sends until the next start
    die_with_parent()
    if os.getppid() != parent:
        return 1
    cfg = config_mod.load(config_path)
    lock = threading.Lock()
    state = {"destinations": cfg.destinations}

    def destinations() -> list[DestinationRules]:
        with lock:
            return state["destinations"]

    address = "\0" + wake
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def notify(names: list[str]) -> None:
        try:
            sock.sendto(" ".join(names).encode(), address)
        except OSError:
            pass  # the forwarders also poll the queue

    spool = spool_for(cfg)
    # incoming data sets stream to files on the spool's filesystem, so accepting one is a rename
    stream_datasets_to_files(spool.incoming)
    accept_unknown_storage_classes(cfg.router.listen.accept_unknown_sop_classes)
    queue = open_queue(cfg, pool_size=min(8, cfg.router.listen.max_associations))
    # this process writes the audit records of what it receives (the forwarding process sends them)
    audit.configure(cfg.router.audit, cfg.spool_dir, cfg.router.listen.ae_title,
                    cfg.router.queue.node if cfg.router.queue.url else "")
    intake = Intake(spool, queue, destinations, cfg.router.listen.max_instance_mb, notify)
    commitments = AssociationReports(queue, cfg.router.commitment, destinations=destinations) \
        if cfg.router.commitment.mode != "off" else None
    receiver = Receiver(cfg.router.listen, intake, commitments)
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    # this process's CPU other than intake's is the network receive
    cpu = metrics.ProcessCpu("receive", lambda: intake.cpu_seconds)
    receiver.start(reuse_port=True)
    if commitments is not None:
        commitments.start()
    sock.sendto(f"\0ready {os.getpid()}".encode(), address)
    while not stop.wait(0.5):
        cpu.tick()
        if os.getppid() != parent:
            _log.error("receiver_orphaned", action="stopping")
            break
        if reload_requested.is_set():
            reload_requested.clear()
            try:
                fresh = config_mod.load_rules_dir(cfg.router.rules.dir)
            except ConfigError as exc:
                _log.error("reload_rejected", error=str(exc), action="previous rules stay in force")
                continue
            with lock:
                state["destinations"] = fresh
    receiver.stop()
    if commitments is not None:
        commitments.stop()
    queue.shutdown()
    cpu.tick()
    return 0


if __name__ == "__main__":  # started by service.Router._spawn_receiver
    _, _config_path, _wake, _log_format, _log_level = sys.argv
    log.configure(_log_format, _log_level)
    sys.exit(run_receiver_process(_config_path, _wake))
