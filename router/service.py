"""The running router: wires spool, queue, receiver, forwarders, codec pool and metrics.

SIGTERM/SIGINT drain (stop accepting, finish the C-STORE in progress, put the rest back to
pending) and exit; SIGHUP reloads the rule files, keeping the previous rules if any is broken.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from router import config as config_mod
from router import log, metrics
from router.config import ConfigError, DestinationRules, Loaded
from router.forwarder import Forwarder
from router.queue import Queue
from router.scp import Receiver
from router.spool import Spool
from router.workers import CodecPool

_log = log.get("service")
QUEUE_FILE = "queue.sqlite"


def open_queue(cfg: Loaded) -> Queue:
    return Queue(cfg.spool_dir / QUEUE_FILE)


class Router:
    def __init__(self, cfg: Loaded) -> None:
        self.cfg = cfg
        self._destinations: dict[str, DestinationRules] = {d.name: d for d in cfg.destinations}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.spool = Spool(cfg.spool_dir, cfg.router.storage.min_free_mb)
        self.queue = open_queue(cfg)
        self.pool: CodecPool | None = None
        self.forwarders: dict[str, Forwarder] = {}
        self.receiver: Receiver | None = None
        self.http = None

    # -- the rules the other parts read ---------------------------------------------------------
    def destinations(self) -> list[DestinationRules]:
        with self._lock:
            return list(self._destinations.values())

    def destination(self, name: str) -> DestinationRules | None:
        with self._lock:
            return self._destinations.get(name)

    def reload(self) -> bool:
        """Re-read the rule files; on any error keep the rules in force and log why."""
        try:
            fresh = config_mod.load_rules_dir(self.cfg.router.rules.dir)
        except ConfigError as exc:
            _log.error("reload_rejected", error=str(exc), action="previous rules stay in force")
            return False
        with self._lock:
            self._destinations = {d.name: d for d in fresh}
        for name in list(self.forwarders):
            if name not in self._destinations:
                self.forwarders.pop(name).stop(timeout=0)
        self._start_forwarders()
        _log.info("rules_reloaded", destinations=sorted(self._destinations))
        return True

    # -- lifecycle ----------------------------------------------------------------------------------
    def recover(self) -> None:
        """Make the spool and the queue agree after whatever stopped the previous run."""
        resumed = self.queue.recover()
        missing = self.queue.fail_missing_files(lambda p: Path(p).exists())
        orphans = self.spool.sweep(self.queue.paths())
        _log.info("recovered", resumed_in_flight=resumed, orphan_files_removed=len(orphans),
                  missing_files=missing, queue=str(self.queue.path))

    def _start_forwarders(self) -> None:
        for name in self._destinations:
            if name not in self.forwarders:
                forwarder = Forwarder(name, self.destination, self.queue, self.spool, self.pool,
                                      self.cfg.router.listen.ae_title)
                self.forwarders[name] = forwarder
                forwarder.start()

    def _wake(self, names: list[str]) -> None:
        for name in names:
            forwarder = self.forwarders.get(name)
            if forwarder is not None:
                forwarder.wake()

    def ready(self) -> tuple[bool, str]:
        problems = []
        if self.receiver is None or self.receiver.server is None:
            problems.append("not listening")
        if not self.spool.writable():
            problems.append("spool not writable")
        try:
            self.queue.counts()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"queue unavailable: {exc}")
        return (not problems, "; ".join(problems) or "ready")

    def start(self) -> None:
        self.recover()
        self.pool = CodecPool(self.cfg.router.transcode.workers, self.cfg.router.transcode.plugins)
        metrics.install_state_collector(
            metrics.StateCollector(
                queue_counts=self.queue.counts,
                oldest_pending=self.queue.oldest_pending,
                spool_free_bytes=self.spool.free_bytes,
                destinations=lambda: [d.name for d in self.destinations()],
            )
        )
        self._start_forwarders()
        self.receiver = Receiver(self.cfg.router.listen, self.spool, self.queue, self.destinations, self._wake)
        self.receiver.start()
        if self.cfg.router.metrics.port:
            self.http = metrics.serve_http(self.cfg.router.metrics.host, self.cfg.router.metrics.port, self.ready)
        _log.info("listening", ae_title=self.cfg.router.listen.ae_title, host=self.cfg.router.listen.host,
                  port=self.receiver.port, destinations=sorted(self._destinations),
                  metrics_port=self.cfg.router.metrics.port or None, spool=str(self.cfg.spool_dir))

    def stop(self, timeout: float = 20.0) -> None:
        started = time.monotonic()
        if self.receiver is not None:
            self.receiver.stop()
        for forwarder in self.forwarders.values():
            forwarder._stop.set()
            forwarder.wake()
        for forwarder in self.forwarders.values():
            forwarder.stop(timeout=max(0.0, timeout - (time.monotonic() - started)))
        if self.pool is not None:
            self.pool.shutdown()
        if self.http is not None:
            self.http.shutdown()
        self.queue.close()
        self._stopped.set()
        _log.info("stopped", seconds=round(time.monotonic() - started, 2))

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the rules."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        reload_requested = threading.Event()
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
        self.start()
        while not stop.is_set():
            stop.wait(0.5)
            if reload_requested.is_set():
                reload_requested.clear()
                self.reload()
        _log.info("stopping", reason="signal")
        self.stop()
