"""Receiving: the C-STORE / C-ECHO service class provider.

The network layer writes each incoming dataset to a file in the spool's `incoming/` without
decoding it. The handler reads only the header (for the rules), makes the file durable, records
the instance and its jobs, and only then answers success.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from router import log, metrics
from router.config import CONTEXT_KEYS, AllowedCaller, DestinationRules, Listen
from router.dicomfile import read_header
from router.lifetime import die_with_parent
from router.queue import Instance, Queue
from router.rules import Attributes, Context, decide, request_to_json
from router.spool import Spool
from router.tls import server_context

OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SUCCESS = 0x0000

_log = log.get("scp")


def _caller_allowed(allowed: list[str | AllowedCaller], ae_title: str, address: str) -> bool:
    if not allowed:
        return True
    for entry in allowed:
        if isinstance(entry, str):
            if entry.strip() == ae_title.strip():
                return True
            continue
        if entry.ae_title.strip() != ae_title.strip():
            continue
        if not entry.hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if any(ip in ipaddress.ip_network(h, strict=False) for h in entry.hosts):
            return True
    return False


class _SharedPortServer(ThreadedAssociationServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class Receiver:
    """The inbound side: owns the pynetdicom AE and the C-STORE handler."""

    def __init__(
        self,
        listen: Listen,
        spool: Spool,
        queue: Queue,
        destinations: Callable[[], list[DestinationRules]],
        on_enqueued: Callable[[list[str]], None] = lambda names: None,
    ) -> None:
        self.listen = listen
        self.spool = spool
        self.queue = queue
        self.destinations = destinations
        self.on_enqueued = on_enqueued
        self.server = None
        self.spool_cpu = 0.0  # CPU seconds of the C-STORE handler so far (the "spool" stage)

    # -- handlers ----------------------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title
        address = event.assoc.requestor.address
        active = [a for a in event.assoc.ae.active_associations if a.is_acceptor]
        if len(active) > self.listen.max_associations:
            # pynetdicom refuses it (local limit exceeded); say so in our log and metrics
            metrics.REJECTED.labels(reason="busy").inc()
            _log.warning("association_rejected", reason=f"more than {self.listen.max_associations} associations",
                         calling_ae=calling, source_ip=address)
            return
        called = event.assoc.requestor.primitive.called_ae_title
        if self.listen.require_called_ae_title and called.strip() != self.listen.ae_title.strip():
            metrics.REJECTED.labels(reason="not_allowed").inc()
            _log.warning("association_rejected", reason=f"called AE title {called.strip()!r} is not ours",
                         calling_ae=calling, source_ip=address)
            return
        if not _caller_allowed(self.listen.allowed_callers, calling, address):
            metrics.REJECTED.labels(reason="not_allowed").inc()
            _log.warning("association_rejected", reason="calling AE title or address not allowed",
                         calling_ae=calling, source_ip=address)
            # rejected-permanent, service-user, calling AE title not recognised
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)

    def _on_established(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.labels(caller=event.assoc.requestor.ae_title.strip()).inc()

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        cpu = time.thread_time()
        try:
            return self._store(event)
        finally:
            spent = time.thread_time() - cpu
            self.spool_cpu += spent
            metrics.CPU_SECONDS.labels(stage="spool").inc(spent)

    def _store(self, event: evt.Event) -> int:
        started = time.monotonic()
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        context = Context(calling_ae=calling, called_ae=assoc.acceptor.ae_title.strip(),
                          source_ip=assoc.requestor.address)
        request = event.request
        bound = _log.bind(calling_ae=calling, association=assoc.native_id,
                          sop_instance_uid=str(request.AffectedSOPInstanceUID))
        received = Path(event.dataset_path)
        try:
            size = received.stat().st_size
            limit = self.listen.max_instance_mb * 1024 * 1024
            if limit and size > limit:
                metrics.REJECTED.labels(reason="too_large").inc()
                bound.error("store_refused", reason=f"instance of {size} bytes exceeds max_instance_mb "
                            f"({self.listen.max_instance_mb})", status="0xA700")
                return OUT_OF_RESOURCES
            if not self.spool.has_room(0):
                metrics.REJECTED.labels(reason="disk_full").inc()
                bound.error("store_refused", reason="spool below min_free_mb", status="0xA700",
                            free_bytes=self.spool.free_bytes())
                return OUT_OF_RESOURCES
            synced = self.spool.sync_soon(received)  # the fsync runs while the header is read
            destinations = self.destinations()
            keys = {k for d in destinations for r in d.rules for k in r.match if k not in CONTEXT_KEYS}
            try:
                header = read_header(received, str(request.AffectedSOPInstanceUID),
                                     decode=("StudyInstanceUID", *sorted(keys)))
                transfer_syntax = str(header.file_meta.TransferSyntaxUID)
                study = str(header.get("StudyInstanceUID", ""))
                attributes = Attributes(header, context)
                decisions = [(d, decide(d.rules, attributes, d.destination.keep_sop_instance_uid))
                             for d in destinations]
            except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on broken input
                metrics.REJECTED.labels(reason="malformed").inc()
                bound.error("store_refused", reason=f"data set cannot be understood: {exc}", status="0xC000")
                return CANNOT_UNDERSTAND
            targets = []
            for dest, decision in decisions:
                if decision.forward:
                    targets.append((dest.name, request_to_json(decision.request), dest.tag))
                else:
                    metrics.SKIPPED.labels(destination=dest.name).inc()
            final = self.spool.accept(received, synced)
            instance = Instance(
                path=str(final),
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                study_instance_uid=study,
                transfer_syntax_uid=transfer_syntax,
                calling_ae=calling,
                called_ae=context.called_ae,
                source_ip=context.source_ip,
                size=size,
                received_at=time.time(),
            )
            try:
                if targets:
                    self.queue.add(instance, targets)
            except Exception:
                self.spool.remove(final)
                raise
            if not targets:
                # no destination wants it: nothing to keep once it has been accepted
                self.spool.remove(final)
        except OSError as exc:
            metrics.REJECTED.labels(reason="disk_full" if exc.errno in (28, 122) else "error").inc()
            bound.error("store_refused", reason=f"cannot spool: {exc}", status="0xA700")
            return OUT_OF_RESOURCES
        except Exception as exc:  # the queue is unavailable: the modality must retry
            metrics.REJECTED.labels(reason="error").inc()
            bound.exception("store_refused", reason=f"cannot record in queue: {exc}", status="0xA700")
            return OUT_OF_RESOURCES
        metrics.RECEIVED_INSTANCES.labels(caller=calling).inc()
        metrics.RECEIVED_BYTES.labels(caller=calling).inc(size)
        names = [name for name, _, _ in targets]
        bound.info("stored", study_instance_uid=study, transfer_syntax=transfer_syntax, size=size,
                   destinations=names, duration=round(time.monotonic() - started, 4))
        if names:
            self.on_enqueued(names)
        return SUCCESS

    # -- lifecycle ---------------------------------------------------------------------------
    def make_ae(self) -> AE:
        ae = AE(ae_title=self.listen.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.require_called_aet = self.listen.require_called_ae_title
        ae.maximum_associations = self.listen.max_associations
        ae.maximum_pdu_size = self.listen.max_pdu
        ae.acse_timeout = self.listen.acse_timeout_s
        ae.dimse_timeout = self.listen.dimse_timeout_s
        ae.network_timeout = self.listen.network_timeout_s
        return ae

    def start(self, reuse_port: bool = False) -> None:
        """Listen; with `reuse_port`, several processes share the port (SO_REUSEPORT)."""
        # incoming datasets stream to files on the spool's filesystem so that accepting one is a rename
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.spool.incoming)
        ae = self.make_ae()
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
        ]
        ssl_context = server_context(self.listen.tls) if self.listen.tls is not None else None
        self.server = ae.make_server((self.listen.host, self.listen.port), evt_handlers=handlers,
                                     ssl_context=ssl_context,
                                     server_class=_SharedPortServer if reuse_port else ThreadedAssociationServer)
        ae._servers.append(self.server)  # pynetdicom's shutdown() expects to find it there
        threading.Thread(target=self.server.serve_forever, name="dicom-accept", daemon=True).start()
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def run_receiver_process(config_path: str, wake: str) -> int:
    """One of the receiving processes `serve` starts: listens on the shared port until SIGTERM
    or until its parent goes away; SIGHUP reloads the rule files. `wake` names the parent's
    abstract Unix socket, told which destinations have new work (and, once, that we listen)."""
    import signal

    from router import config as config_mod
    from router.service import open_queue

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

    spool = Spool(cfg.spool_dir, cfg.router.storage.min_free_mb)
    queue = open_queue(cfg)
    receiver = Receiver(cfg.router.listen, spool, queue, destinations, notify)
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    # this process's CPU other than the handler's is the network receive
    cpu = metrics.ProcessCpu("receive", lambda: receiver.spool_cpu)
    receiver.start(reuse_port=True)
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
            except config_mod.ConfigError as exc:
                _log.error("reload_rejected", error=str(exc), action="previous rules stay in force")
                continue
            with lock:
                state["destinations"] = fresh
    receiver.stop()
    cpu.tick()
    return 0
