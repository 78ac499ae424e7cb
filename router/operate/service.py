"""The running router: the only module that knows every process and wires them.

- the supervising process (`Router`): recovery at start-up, the codec pool, one forwarder per
  destination, the storage commitment reports sent on new associations (`commitment.reporter.Reporter`)
  and, in relay mode, the requests to the destinations (`commitment.relay.Relayer`), metrics over HTTP, and
  the receiving processes it starts and restarts;
- the receiving processes (`operate.receiving`), each a `receive.scp.Receiver` on the shared
  port, which tell the supervisor which destinations have new work.

SIGTERM/SIGINT drain (stop accepting, finish the C-STORE in progress, put the rest back to
pending) and exit; SIGHUP reloads the rule files, keeping the previous rules if any is broken.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from router import config as config_mod
from router import audit, log, metrics
from router.codecs.workers import CodecPool
from router.commitment.relay import Relayer
from router.commitment.reporter import Reporter
from router.compat.pynetdicom import check_uids_once, quiet_reactors, send_datasets_from_files, use_poll
from router.config import ConfigError, DestinationRules, Loaded, Timeouts
from router.forward.forwarder import Forwarder
from router.forward.waiting import waiting
from router.operate.web import StatusPage
from router.queue import open_queue
from router.queue.holds import Holds
from router.queue.spool import spool_for

_log = log.get("service")


class Router:
    def __init__(self, cfg: Loaded, log_format: str = "json", log_level: str = "info") -> None:
        self.cfg = cfg
        self._destinations: dict[str, DestinationRules] = {d.name: d for d in cfg.destinations}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.spool = spool_for(cfg)
        # forwarders' sender threads, the reporter, the heartbeat and the status page share the pool
        self.queue = open_queue(cfg, pool_size=8 + sum(d.destination.ceiling for d in cfg.destinations))
        self._heartbeat: threading.Thread | None = None
        self.pool: CodecPool | None = None
        self.forwarders: dict[str, Forwarder] = {}
        self.receivers: list[subprocess.Popen] = []
        self._ready_pids: set[int] = set()
        self._stopping = threading.Event()
        self._wake_socket: socket.socket | None = None
        self._wake_name = ""
        self.log_format, self.log_level = log_format, log_level
        self.http = None
        self.status_page: StatusPage | None = None
        self.reporter: Reporter | None = None
        self.relayer: Relayer | None = None
        self.audit_sender: audit.AuditSender | None = None

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
        audit.security_alert(("110131", "Software Configuration"),
                             f"rules reloaded from {self.cfg.router.rules.dir}: destinations "
                             f"{', '.join(sorted(self._destinations)) or '(none)'}", outcome="success")
        return True

    # -- lifecycle ----------------------------------------------------------------------------------
    def recover(self) -> None:
        """Make the spool and the queue agree after whatever stopped the previous run (with
        several nodes: this node's own work only)."""
        self.queue.register()
        resumed = self.queue.recover()
        missing = self.queue.fail_missing_files(lambda p: Path(p).exists())
        orphans = self.spool.sweep(self.queue.paths())
        _log.info("recovered", resumed_in_flight=resumed, orphan_files_removed=len(orphans),
                  missing_files=missing, queue=self.queue.location)

    def _beat(self) -> None:
        """With several nodes: renew this node's heartbeat and the leases of the jobs it holds,
        three times per lease, for as long as the router runs."""
        interval = self.cfg.router.queue.lease_s / 3
        failing = False
        while not self._stopped.wait(interval):
            try:
                self.queue.heartbeat()
                for path in self.queue.sweep_orphans():
                    self.spool.remove(path)
            except Exception as exc:  # noqa: BLE001 - the database is unreachable: its leases may expire
                if not failing:
                    _log.error("heartbeat_failed", error=str(exc),
                               action="retrying; past lease_s other nodes take this node's jobs over")
                failing = True
                continue
            if failing:
                _log.info("heartbeat_resumed")
            failing = False

    def _start_forwarders(self) -> None:
        metrics.declare(list(self._destinations))
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

    # -- receiving processes ----------------------------------------------------------------------
    def _receiver_count(self) -> int:
        listen = self.cfg.router.listen
        if listen.port == 0:
            return 1  # each process would pick a port of its own
        return listen.processes or os.cpu_count() or 1

    def _listen_for_wakeups(self) -> None:
        while not self._stopped.is_set():
            try:
                data = self._wake_socket.recv(65536)
            except OSError:
                return
            if data.startswith(b"\0ready "):
                with self._lock:
                    self._ready_pids.add(int(data.split()[1]))
            else:
                self._wake(data.decode(errors="replace").split())

    def _spawn_receiver(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "router.operate.receiving", str(self.cfg.path), self._wake_name, self.log_format,
             self.log_level],
        )

    def _start_receivers(self, timeout: float = 60.0) -> None:
        self._wake_name = f"dicom-router-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._wake_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._wake_socket.bind("\0" + self._wake_name)
        threading.Thread(target=self._listen_for_wakeups, name="wakeups", daemon=True).start()
        self.receivers = [self._spawn_receiver() for _ in range(self._receiver_count())]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(p.pid in self._ready_pids for p in self.receivers):
                    break
            if any(p.poll() is not None for p in self.receivers):
                raise RuntimeError("a receiving process exited at start-up (see the log above)")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"receiving processes not listening after {timeout:.0f}s")
        threading.Thread(target=self._supervise_receivers, name="receivers", daemon=True).start()

    def _supervise_receivers(self) -> None:
        while not self._stopped.wait(0.5):
            for index, proc in enumerate(self.receivers):
                if proc.poll() is not None and not self._stopping.is_set():
                    _log.error("receiver_died", pid=proc.pid, exit_code=proc.returncode, action="restarting")
                    self.receivers[index] = self._spawn_receiver()

    def _stop_receivers(self, timeout: float = 10.0) -> None:
        for proc in self.receivers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.receivers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def ready(self) -> tuple[bool, str]:
        problems = []
        with self._lock:
            listening = bool(self.receivers) and all(
                p.poll() is None and p.pid in self._ready_pids for p in self.receivers)
        if not listening:
            problems.append("not listening")
        if not self.spool.writable():
            problems.append("spool not writable")
        elif not self.spool.has_room():
            problems.append("spool below min_free_mb: C-STORE answers 0xA700")
        stopped = sorted(name for name, forwarder in self.forwarders.items() if not forwarder.alive())
        if stopped and not self._stopping.is_set():
            problems.append(f"forwarder not running: {', '.join(stopped)}")
        try:
            self.queue.counts()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"queue unavailable: {exc}")
        return (not problems, "; ".join(problems) or "ready")

    def _held(self) -> dict[tuple[str, str], int]:
        """Pending jobs each destination holds back, by reason (router.forward.waiting)."""
        found: dict[tuple[str, str], int] = {}
        for rule_file in self.destinations():
            for reason, count in waiting(rule_file.name, rule_file.destination, self.queue).held.items():
                found[(rule_file.name, reason)] = count
        return found

    def start(self) -> None:
        use_poll()
        quiet_reactors()
        check_uids_once()
        self.recover()
        auditor = audit.configure(self.cfg.router.audit, self.cfg.spool_dir, self.cfg.router.listen.ae_title,
                                  self.cfg.router.queue.node if self.cfg.router.queue.url else "")
        if auditor is not None:
            self.audit_sender = audit.AuditSender(auditor).start()
            audit.application(started=True)
        if self.queue.shared:
            self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._heartbeat.start()
        send_datasets_from_files()
        transcode = self.cfg.router.transcode
        self.pool = CodecPool(transcode.workers, transcode.plugins, transcode.timeout_s, transcode.timeout_s_per_mb,
                              transcode.max_decoded_mb)
        metrics.install_state_collector(
            metrics.StateCollector(
                queue_counts=self.queue.counts,
                oldest_pending=self.queue.oldest_pending,
                spool_free_bytes=self.spool.free_bytes,
                destinations=lambda: [d.name for d in self.destinations()],
                paused=Holds(self.spool.root).paused,
                held=self._held,
                nodes=self.queue.nodes,
                commitments=self.queue.commitment_counts,
                relays=self.queue.relay_counts,
                node=self.cfg.router.queue.node,
            )
        )
        self._start_forwarders()
        commitment = self.cfg.router.commitment
        if commitment.mode != "off":
            listen = self.cfg.router.listen
            self.reporter = Reporter(self.queue, commitment, listen.ae_title,
                                     Timeouts(acse_s=listen.acse_timeout_s, dimse_s=listen.dimse_timeout_s,
                                              network_s=listen.network_timeout_s), destinations=self.destinations)
            self.reporter.start()
        if self.cfg.router.metrics.port:
            self.status_page = StatusPage(self.queue, self.destinations, Holds(self.spool.root),
                                          metrics.forwarded_by_destination)
            self.status_page.start_sampling()
            self.http = metrics.serve_http(self.cfg.router.metrics.host, self.cfg.router.metrics.port, self.ready,
                                           max_connections=self.cfg.router.metrics.max_connections,
                                           idle_timeout_s=self.cfg.router.metrics.idle_timeout_s,
                                           pages=self.status_page.handle,
                                           page_connections=self.cfg.router.metrics.page_connections)
        self._start_receivers()
        if commitment.mode == "relay":  # once listening: the PACS's report to an N-ACTION comes to our port
            self.relayer = Relayer(self.queue, commitment, self.destinations, self.cfg.router.listen.ae_title)
            self.relayer.start()
        _log.info("listening", ae_title=self.cfg.router.listen.ae_title, host=self.cfg.router.listen.host,
                  port=self.cfg.router.listen.port, processes=len(self.receivers),
                  destinations=sorted(self._destinations),
                  metrics_port=self.cfg.router.metrics.port or None, spool=str(self.cfg.spool_dir))

    def stop(self, timeout: float = 20.0) -> None:
        started = time.monotonic()
        self._stopping.set()
        self._stop_receivers()
        for forwarder in self.forwarders.values():
            forwarder.signal_stop()
        for forwarder in self.forwarders.values():  # what is being sent finishes
            forwarder.join(max(0.0, timeout - (time.monotonic() - started)))
        if self.reporter is not None:
            self.reporter.stop()
        if self.relayer is not None:
            self.relayer.stop()
        if self.pool is not None:
            self.pool.shutdown()  # a worker still busy (a hung codec) is killed; its job stays queued
        for forwarder in self.forwarders.values():
            forwarder.stop(timeout=5.0)
        if self.http is not None:
            self.http.shutdown()
        if self.status_page is not None:
            self.status_page.stop()
        if self.audit_sender is not None:
            audit.application(started=False)
            self.audit_sender.stop(timeout=min(5.0, max(1.0, timeout - (time.monotonic() - started))))
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.join(5.0)
            try:
                self.queue.leave()
            except Exception as exc:  # noqa: BLE001 - its heartbeat simply ages
                _log.warning("leave_failed", error=str(exc))
        self.queue.shutdown()
        if self._wake_socket is not None:
            self._wake_socket.close()
        _log.info("stopped", seconds=round(time.monotonic() - started, 2))

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the rules."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        reload_requested = threading.Event()
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
        self.start()
        # the codec workers' CPU is counted per stage from their results; this process forwards
        cpu = metrics.ProcessCpu("send")
        while not stop.is_set():
            stop.wait(0.5)
            cpu.tick()
            if reload_requested.is_set():
                reload_requested.clear()
                self.reload()
                for proc in self.receivers:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGHUP)
        _log.info("stopping", reason="signal")
        self.stop()
        cpu.tick()
