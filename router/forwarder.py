"""Forwarding: one sender per destination association, claiming due jobs in batches.

For each batch: decide (rules), transcode on the codec pool, then send over an association
that is kept open while work keeps coming. Each SOP class is proposed with the chosen syntax
and, in separate presentation contexts, Explicit and Implicit VR Little Endian, so a
destination that refuses the compressed syntax still gets the image, decompressed.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import PresentationContext

from router import log, metrics, syntaxes
from router.config import Destination, DestinationRules, parse_status_range
from router.queue import Job, Queue
from router.rules import Attributes, Context, Decision, decide, request_from_json
from router.spool import Spool
from router.tls import client_context
from router.transcode import Outcome, Request
from router.workers import CodecCrash, CodecPool, Task

MAX_CONTEXTS = 128
IDLE_RELEASE_S = 5.0
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# a destination offered a lossy JPEG also gets the baseline the standard makes the default
_COMPANIONS = {"1.2.840.10008.1.2.4.51": "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57": "1.2.840.10008.1.2.4.70"}

DEFAULT_STATUSES: list[tuple[int, int, str]] = [
    (0x0000, 0x0000, "success"),
    (0x0001, 0x0001, "success"),
    (0xB000, 0xBFFF, "success"),
    (0xA700, 0xA7FF, "retry"),
    (0xA900, 0xA9FF, "permanent"),
    (0xC000, 0xCFFF, "permanent"),
    (0x0122, 0x0122, "permanent"),
    (0x0124, 0x0124, "permanent"),
]


def classify_status(code: int, overrides: dict[str, str] | None = None) -> str:
    """C-STORE status -> 'success' | 'retry' | 'permanent'. Overrides win; unknown codes retry."""
    for key, outcome in (overrides or {}).items():
        low, high = parse_status_range(key)
        if low <= code <= high:
            return outcome
    for low, high, outcome in DEFAULT_STATUSES:
        if low <= code <= high:
            return outcome
    return "retry"


def backoff_delay(attempts: int, backoff_s: float, max_backoff_s: float) -> float:
    """Exponential backoff with jitter: the n-th retry waits about backoff_s * 2**(n-1), capped."""
    base = min(max_backoff_s, backoff_s * (2 ** max(0, attempts - 1)))
    return base / 2 + random.uniform(0, base / 2)


def _park_reactor(assoc, timeout: float = 0.05) -> None:  # noqa: ANN001
    """Make sure pynetdicom's reactor thread is parked before a C-STORE is sent.

    pynetdicom's send_c_store pauses the association's reactor by clearing a checkpoint and
    waiting for a flag, but the flag can be left over from the reactor's previous pass: the
    reactor then takes the C-STORE response off the queue as an "unexpected" message and the
    sender waits for the DIMSE timeout (pynetdicom issues 435, 850). The reactor raises the flag
    right before it waits at the checkpoint; seeing the flag down and then up again after the
    checkpoint was cleared proves it is waiting with the checkpoint closed.
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


@dataclass
class Item:
    job: Job
    log: object
    decision: Decision | None = None
    path: Path | None = None
    transfer_syntax_uid: str = ""
    syntax_label: str = "original"
    outcome: Outcome | None = None
    request: Request | None = None
    task: Task | None = None
    future: Future | None = None
    candidates: set[str] = field(default_factory=set)  # transfer syntaxes the output may be in


class Forwarder:
    """Sends one destination's jobs; runs `max_associations` sender threads."""

    def __init__(
        self,
        name: str,
        rules: Callable[[str], DestinationRules | None],
        queue: Queue,
        spool: Spool,
        pool: CodecPool,
        calling_ae_title: str,
    ) -> None:
        self.name = name
        self.rules = rules
        self.queue = queue
        self.spool = spool
        self.pool = pool
        self.calling_ae_title = calling_ae_title
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.log = log.get("forwarder").bind(destination=name)

    def start(self) -> None:
        _config.STORE_SEND_CHUNKED_DATASET = True
        dest = self.rules(self.name)
        count = dest.destination.max_associations if dest else 1
        for index in range(count):
            thread = threading.Thread(target=self._run, name=f"forward-{self.name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the sender loop ----------------------------------------------------------------------
    def _run(self) -> None:
        sender = _Sender(self)
        try:
            while not self._stop.is_set():
                dest = self.rules(self.name)
                if dest is None:
                    break
                jobs = self.queue.claim(self.name, dest.destination.batch_size)
                if not jobs:
                    sender.release_if_idle()
                    due = self.queue.next_due(self.name)
                    wait = 1.0 if due is None else min(1.0, max(0.02, due - time.time()))
                    self._wake.wait(wait)
                    self._wake.clear()
                    continue
                try:
                    sender.process(dest, jobs)
                except Exception as exc:  # noqa: BLE001 - never let one batch kill the sender
                    self.log.exception("batch_failed", error=str(exc))
                    sender.abort()
                    for job in sender.unresolved:
                        self._retry(dest.destination, job, f"internal error: {exc}")
                    sender.unresolved.clear()
        finally:
            if sender.unresolved:
                self.queue.release([j.id for j in sender.unresolved])
            sender.release()

    # -- job outcomes ---------------------------------------------------------------------------
    def _retry(self, dest: Destination, job: Job, error: str) -> None:
        attempts = job.attempts + 1
        if attempts >= dest.retry.max_attempts:
            self.queue.dead(job.id, error)
            metrics.FORWARD_FAILURES.labels(destination=self.name, outcome="dead").inc()
            self.log.error("dead_letter", sop_instance_uid=job.instance.sop_instance_uid, attempts=attempts,
                           error=error)
            return
        delay = backoff_delay(attempts, dest.retry.backoff_s, dest.retry.max_backoff_s)
        self.queue.retry(job.id, error, time.time() + delay)
        metrics.FORWARD_FAILURES.labels(destination=self.name, outcome="retry").inc()
        self.log.warning("retry_scheduled", sop_instance_uid=job.instance.sop_instance_uid, attempts=attempts,
                         retry_in_s=round(delay, 1), error=error)

    def _dead(self, job: Job, error: str) -> None:
        self.queue.dead(job.id, error)
        metrics.FORWARD_FAILURES.labels(destination=self.name, outcome="dead").inc()
        self.log.error("dead_letter", sop_instance_uid=job.instance.sop_instance_uid, error=error)


class _Sender:
    """One association slot of a forwarder: prepares a batch, then sends each instance as soon as
    its transcoding is done, while the codec workers go on with the next ones."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.f = forwarder
        self.assoc = None
        self.proposed: set[tuple[str, str]] = set()
        self.last_used = 0.0
        self.unresolved: list[Job] = []
        self.delivered: list[tuple[Item, int]] = []

    # -- preparing ----------------------------------------------------------------------------
    def _decision(self, dest: DestinationRules, job: Job, item_log) -> Decision:  # noqa: ANN001
        if job.request and job.rules_tag == dest.tag:
            return Decision(True, "", None, request_from_json(job.request), "decided at receipt")
        inst = job.instance
        context = Context(inst.calling_ae, inst.called_ae, inst.source_ip)
        try:
            header = dcmread(inst.path, stop_before_pixels=True)
            return decide(dest.rules, Attributes(header, context), dest.destination.keep_sop_instance_uid)
        except Exception as exc:  # noqa: BLE001 - it was accepted: send it as received
            item_log.warning("header_unreadable", error=str(exc), action="forwarded as received")
            return Decision(True, "", None, Request(syntax="original"), f"header unreadable: {exc}")

    def _prepare(self, dest: DestinationRules, jobs: list[Job]) -> list[Item]:
        f = self.f
        items: list[Item] = []
        for job in jobs:
            inst = job.instance
            item_log = f.log.bind(sop_instance_uid=inst.sop_instance_uid, study_instance_uid=inst.study_instance_uid)
            src = Path(inst.path)
            if not src.exists():
                f._dead(job, f"spool file missing: {src}")
                self.unresolved.remove(job)
                continue
            decision = self._decision(dest, job, item_log)
            if not decision.forward:
                metrics.SKIPPED.labels(destination=f.name).inc()
                item_log.info("skipped", reason=decision.reason)
                path = f.queue.complete(job.id)
                if path:
                    f.spool.remove(path)
                self.unresolved.remove(job)
                continue
            item = Item(job=job, log=item_log, decision=decision, request=decision.request)
            syntax = syntaxes.get(decision.request.syntax)
            item.candidates = {inst.transfer_syntax_uid}
            if syntax.name == "original" or syntax.uid == inst.transfer_syntax_uid:
                item.path, item.transfer_syntax_uid, item.syntax_label = src, inst.transfer_syntax_uid, "original"
            else:
                item.candidates.update(syntax.uids)
                if decision.request.fallback:
                    item.candidates.update(syntaxes.get(decision.request.fallback).uids)
                item.task = Task(src, f.spool.out_path(job.id), decision.request)
                item.future = f.pool.submit(item.task)
            items.append(item)
        return items

    def _finish_transcode(self, item: Item) -> None:
        if item.future is None:
            return
        result = self.f.pool.resolve(item.task, item.future)
        item.future = None
        self._apply(item, item.task, result)

    def _apply(self, item: Item, task: Task, result: Outcome | BaseException) -> None:
        f = self.f
        if isinstance(result, BaseException):
            reason = "codec_crash" if isinstance(result, CodecCrash) else "codec_error"
            metrics.FALLBACKS.labels(destination=f.name, reason=reason).inc()
            fallback = task.request.fallback
            if fallback:
                retry = Task(task.src, task.dst, Request(syntax=fallback,
                                                         keep_sop_instance_uid=task.request.keep_sop_instance_uid))
                second = f.pool.run_many([retry])[0]
                if not isinstance(second, BaseException):
                    item.log.error("transcode_failed", syntax=task.request.syntax,
                                   error=str(result) or type(result).__name__, action=f"fallback {fallback}")
                    self._apply(item, retry, second)
                    return
            item.log.error("transcode_failed", syntax=task.request.syntax, error=str(result) or type(result).__name__,
                           action="forwarded as received")
            item.path, item.transfer_syntax_uid, item.syntax_label = (
                task.src, item.job.instance.transfer_syntax_uid, "original")
            return
        item.outcome = result
        item.path = result.path
        item.transfer_syntax_uid = result.transfer_syntax_uid
        item.syntax_label = result.syntax
        for stage, seconds in result.cpu.items():  # spent in a codec worker
            metrics.CPU_SECONDS.labels(stage=stage).inc(seconds)
        if result.changed:
            metrics.TRANSCODE_SECONDS.labels(syntax=result.syntax).observe(result.seconds)
        if result.fallback_reason:
            metrics.FALLBACKS.labels(destination=f.name, reason=result.fallback_reason).inc()
            item.log.warning("fallback", reason=result.fallback_reason, note=result.note, syntax=result.syntax)

    # -- associations ---------------------------------------------------------------------------
    @staticmethod
    def _wanted(items: list[Item]) -> dict[str, set[str]]:
        wanted: dict[str, set[str]] = {}
        for item in items:
            uids = wanted.setdefault(item.job.instance.sop_class_uid, set(UNCOMPRESSED))
            uids.update(item.candidates)
            for uid in item.candidates:
                if uid in _COMPANIONS:
                    uids.add(_COMPANIONS[uid])
        return wanted

    def _groups(self, items: list[Item]) -> list[list[Item]]:
        """Split a batch so that no association needs more than 128 presentation contexts."""
        by_class: dict[str, list[Item]] = {}
        for item in items:
            by_class.setdefault(item.job.instance.sop_class_uid, []).append(item)
        groups: list[list[Item]] = []
        current: list[Item] = []
        for class_items in by_class.values():
            if current and sum(len(v) for v in self._wanted(current + class_items).values()) > MAX_CONTEXTS:
                groups.append(current)
                current = []
            current.extend(class_items)
        if current:
            groups.append(current)
        return groups

    def _associate(self, dest: Destination, wanted: dict[str, set[str]]) -> str | None:
        """Make sure an association covering `wanted` is open; returns an error or None."""
        pairs = {(sop, ts) for sop, uids in wanted.items() for ts in uids}
        if self.assoc is not None and self.assoc.is_established and pairs <= self.proposed:
            return None
        self.release()
        ae = AE(ae_title=dest.calling_ae_title or self.f.calling_ae_title)
        ae.acse_timeout = dest.timeouts.acse_s
        ae.dimse_timeout = dest.timeouts.dimse_s
        ae.network_timeout = dest.timeouts.network_s
        ae.connection_timeout = dest.timeouts.connect_s
        contexts = []
        for sop, uids in wanted.items():
            for ts in sorted(uids, key=lambda u: (u in UNCOMPRESSED, u)):
                cx = PresentationContext()
                cx.abstract_syntax = sop
                cx.transfer_syntax = [ts]
                contexts.append(cx)
        ae.requested_contexts = contexts
        connected = threading.Event()
        tls_args = (client_context(dest.tls), dest.host) if dest.tls is not None else None
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=dest.max_pdu, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set())])
        if not assoc.is_established:
            if not connected.is_set():
                return f"cannot connect to {dest.host}:{dest.port}"
            if assoc.is_rejected:
                result = assoc.acceptor.primitive
                detail = f" (result {result.result}, source {result.result_source}, reason {result.diagnostic})" \
                    if result is not None else ""
                return f"association rejected by the destination{detail}"
            if assoc.is_aborted:
                return "association aborted by the destination"
            return "association not established (ACSE timeout)"
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.assoc, self.proposed = assoc, pairs
        return None

    def release(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            except Exception:  # noqa: BLE001 - the peer may already be gone
                self.assoc.abort()
            self.assoc = None
            self.proposed = set()

    def abort(self) -> None:
        if self.assoc is not None:
            self.assoc.abort()
            self.assoc = None
            self.proposed = set()

    def release_if_idle(self) -> None:
        if self.assoc is not None and time.monotonic() - self.last_used > IDLE_RELEASE_S:
            self.release()

    def _accepted(self, sop: str, ts: str) -> bool:
        return any(
            cx.abstract_syntax == sop and cx.transfer_syntax[0] == ts for cx in self.assoc.accepted_contexts
        )

    # -- sending ----------------------------------------------------------------------------------
    def process(self, dest: DestinationRules, jobs: list[Job]) -> None:
        f = self.f
        self.unresolved = list(jobs)
        items: list[Item] = []
        completed = False
        try:
            items = self._prepare(dest, jobs)
            for group in self._groups(items):
                if f._stop.is_set():
                    break
                error = self._associate(dest.destination, self._wanted(group))
                if error:
                    f.log.warning("association_failed", error=error, host=dest.destination.host,
                                  port=dest.destination.port)
                    for item in group:
                        self._cancel(item)
                        f._retry(dest.destination, item.job, error)
                        self.unresolved.remove(item.job)
                    continue
                for item in group:
                    if f._stop.is_set() or self.assoc is None or not self.assoc.is_established:
                        break
                    self._finish_transcode(item)
                    self._send(dest.destination, item)
                    self.unresolved.remove(item.job)
                    self.last_used = time.monotonic()
                self.flush()
            completed = True
        finally:
            self.flush()
            for item in items:
                self._cancel(item)
            if completed and self.unresolved:
                # cut short by shutdown or a lost association: not an attempt
                f.queue.release([j.id for j in self.unresolved])
                self.unresolved = []

    def _cancel(self, item: Item) -> None:
        if item.future is not None:
            item.future.cancel()
            item.future = None

    def flush(self) -> None:
        """Mark what the destination stored as done, in one transaction for the whole group.

        A crash before this point sends those instances again: at least once, never lost.
        """
        if not self.delivered:
            return
        f = self.f
        delivered, self.delivered = self.delivered, []
        for path in f.queue.complete_many([item.job.id for item, _ in delivered]):
            f.spool.remove(path)
        now = time.time()
        for item, size in delivered:
            if item.path is not None and item.path != Path(item.job.instance.path):
                f.spool.remove(item.path)
            metrics.FORWARDED_INSTANCES.labels(destination=f.name, syntax=item.syntax_label).inc()
            metrics.FORWARDED_BYTES.labels(destination=f.name, syntax=item.syntax_label).inc(size)
            metrics.END_TO_END_SECONDS.labels(destination=f.name).observe(max(0.0, now - item.job.instance.received_at))

    def _send(self, dest: Destination, item: Item) -> None:
        f = self.f
        sop = item.job.instance.sop_class_uid
        if not self._accepted(sop, item.transfer_syntax_uid):
            fallback = next((ts for ts in UNCOMPRESSED if self._accepted(sop, ts)), None)
            if fallback is None:
                f._dead(item.job, f"destination accepts no presentation context for SOP class {sop}")
                return
            refused = item.transfer_syntax_uid
            name = syntaxes.get(fallback).name
            request = Request(syntax=name, keep_sop_instance_uid=dest.keep_sop_instance_uid)
            task = Task(Path(item.job.instance.path), f.spool.out_path(item.job.id, "-" + name), request)
            result = f.pool.run_many([task])[0]
            if isinstance(result, BaseException):
                f._retry(dest, item.job, f"cannot decompress for a destination that refused {refused}: {result}")
                return
            if item.path is not None and item.path != Path(item.job.instance.path):
                f.spool.remove(item.path)
            item.path, item.transfer_syntax_uid, item.syntax_label = result.path, result.transfer_syntax_uid, name
            metrics.FALLBACKS.labels(destination=f.name, reason="refused_by_destination").inc()
            item.log.warning("syntax_refused", refused=refused, sent_as=result.transfer_syntax_uid,
                             action="decompressed and sent")
        size = item.path.stat().st_size
        started = time.monotonic()
        try:
            _park_reactor(self.assoc)
            status = self.assoc.send_c_store(item.path)
        except Exception as exc:  # noqa: BLE001 - unreadable file, encoding problem, lost peer
            self.abort()
            f._retry(dest, item.job, f"C-STORE failed: {exc}")
            return
        elapsed = time.monotonic() - started
        metrics.FORWARD_SECONDS.labels(destination=f.name).observe(elapsed)
        if "Status" not in status:
            self.abort()
            f._retry(dest, item.job, "no C-STORE response (DIMSE timeout or association aborted)")
            return
        code = int(status.Status)
        outcome = classify_status(code, dest.statuses)
        if outcome == "success":
            self.delivered.append((item, size))
            ratio = item.outcome.ratio if item.outcome else None
            item.log.info("forwarded", syntax=item.syntax_label, transfer_syntax=item.transfer_syntax_uid,
                          status=f"0x{code:04X}", size=size, ratio=round(ratio, 2) if ratio else None,
                          duration=round(elapsed, 4))
        elif outcome == "retry":
            self._discard_output(item)
            f._retry(dest, item.job, f"destination answered 0x{code:04X}")
        else:
            self._discard_output(item)
            f._dead(item.job, f"destination answered 0x{code:04X} (permanent failure)")

    def _discard_output(self, item: Item) -> None:
        if item.path is not None and item.path != Path(item.job.instance.path):
            self.f.spool.remove(item.path)
