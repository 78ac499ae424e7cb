"""Forwarding: one pipeline per destination, read top to bottom.

    claim      due jobs of the destination, a batch at a time (`queue.claim`)
    prepare    the request of each job (decided at receipt, or again if the rules changed) and
               its transcode, started on the codec pool
    send       over an association from the destination's pool (`association.AssociationPool`),
               each instance as soon as its transcode is done
    record     the outcome of each job: queue, metric and log together (`Forwarder.record`)

Sender threads, at most `max_associations` of them, each run this pipeline; they share the
destination's association pool, so an idle open association is used before another is opened.
When a job cannot go out in its rule's syntax, `request.fallback` alone says what is tried next.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from router import codecs, log, metrics
from router.association import MAX_CONTEXTS, UNCOMPRESSED, Association, AssociationPool, Contexts, contexts_for, \
    count, merge
from router.config import Destination, DestinationRules, is_valid_ae_title, parse_status_range
from router.holds import Holds
from router.intake import decide_for
from router.queue import HIGH, Delivery, Job, Queue
from router.request import ORIGINAL, Outcome, Reason, Request, fallback
from router.rules import Context, Decision
from router.spool import Spool
from router.transcode import TranscodeError, Transcoded
from router.waiting import holding_of
from router.workers import CodecCrash, CodecPool, CodecTimeout, PoolClosed, Submitted

# PS3.7 Annex C: the warning statuses (0001, 0107, 0116, Bxxx) all mean "stored"
WARNINGS: list[tuple[int, int]] = [(0x0001, 0x0001), (0x0107, 0x0107), (0x0116, 0x0116), (0xB000, 0xBFFF)]
DEFAULT_STATUSES: list[tuple[int, int, str]] = [
    (0x0000, 0x0000, "success"),
    *((low, high, "success") for low, high in WARNINGS),
    (0xA700, 0xA7FF, "retry"),
    (0xA900, 0xA9FF, "permanent"),
    (0xC000, 0xCFFF, "permanent"),
    (0x0122, 0x0122, "permanent"),
    (0x0124, 0x0124, "permanent"),
]


OVERTAKE_CHECK_S = 0.25
SHARED_IDLE_RELEASE_S = 1.0  # with several nodes: an idle association's slot is another node's after this


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


@dataclass
class _Outgoing:
    """One claimed job on its way: the file to send and what it is."""

    job: Job
    log: object
    request: Request
    path: Path
    transfer_syntax_uid: str
    syntax: str = ORIGINAL  # the syntax name it goes out in, for metrics and logs
    transcoded: Transcoded | None = None
    submitted: Submitted | None = None
    contexts: Contexts = field(default_factory=dict)

    @property
    def source(self) -> Path:
        return Path(self.job.instance.path)


class Forwarder:
    """Sends one destination's jobs."""

    def __init__(
        self,
        name: str,
        rule_file: Callable[[str], DestinationRules | None],
        queue: Queue,
        spool: Spool,
        pool: CodecPool,
        calling_ae_title: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.clock = clock  # epoch seconds: what the schedule, delay and study_stable are read against
        self.rule_file = rule_file  # the destination's rule file in force, by destination name
        self.queue = queue
        self.spool = spool
        self.codecs = pool
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._held_back: list[int] = []  # claimed jobs the queue could not take back yet
        self._unrecorded: list[Delivery] = []  # deliveries the queue could not record yet
        # per sender thread: when it last looked for a job to overtake, and whether its last
        # batch took every due job
        self._checked = threading.local()
        self._held_back_lock = threading.Lock()
        self.log = log.get("forwarder").bind(destination=name)
        self.holds = Holds(spool.root)  # `dicom-router pause` puts a destination on hold
        in_force = rule_file(name)
        ceiling = in_force.destination.max_associations if in_force else 1
        # with several nodes, max_associations holds for the cluster: each association takes a slot
        # and an idle association gives its slot back sooner, so that another node with work
        # does not wait for it
        slots = (lambda n: queue.take_slot(name, n)) if queue.shared else None
        self.associations = AssociationPool(self._destination, calling_ae_title, ceiling, slots=slots,
                                            idle_release_s=SHARED_IDLE_RELEASE_S if queue.shared else 5.0)

    def _destination(self) -> Destination:
        rule_file = self.rule_file(self.name)
        if rule_file is None:
            raise LookupError(f"destination {self.name} has no rule file any more")
        return rule_file.destination

    def start(self) -> None:
        for index in range(self.associations.ceiling):
            thread = threading.Thread(target=self._run, name=f"forward-{self.name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def signal_stop(self) -> None:
        """Stop claiming; the instance being sent finishes."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the sender threads to end (after `signal_stop`)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 10.0) -> None:
        self.signal_stop()
        self.join(timeout)
        self.associations.close()

    # -- the pipeline -----------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether every sender thread still runs (after `start`, until `stop`)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        """A sender thread: never ends on an error, only on stop or when the rule file goes."""
        while not self._stop.is_set():
            try:
                if not self._once():
                    return
            except Exception as exc:  # noqa: BLE001 - the queue or the disk failed: wait, then go on
                self.log.exception("forwarder_error", error=str(exc), action="retrying in 1 s")
                self._stop.wait(1.0)

    def _once(self) -> bool:
        """Claim and forward one batch, or wait for work; False when the destination is gone."""
        self._release_held_back()
        rule_file = self.rule_file(self.name)
        if rule_file is None:
            return False
        if self.holds.is_paused(self.name):
            self.associations.release_idle()
            self._wake.wait(1.0)
            self._wake.clear()
            return True
        destination, now = rule_file.destination, self.clock()
        opens = destination.sending_schedule.next_open(now)
        if opens != now:  # outside every window: nothing is claimed until the next one opens
            self.associations.release_idle()
            self._wake.wait(1.0 if opens is None else min(1.0, max(0.02, opens - now)))
            self._wake.clear()
            return True
        holding = holding_of(destination)
        # after a batch that took every due job, claim again only once woken or when the next is
        # due: an empty claim per instance would double the queue's work when it keeps up
        short, self._checked.short = getattr(self._checked, "short", False), False
        if short and self._wake.is_set():  # woken meanwhile: new work, claim it now
            self._wake.clear()
            short = False
        jobs = [] if short else self.queue.claim(self.name, destination.batch_size, now=now, holding=holding)
        for job in jobs:
            if job.taken_over_from:
                self.log.warning("job_taken_over", from_node=job.taken_over_from,
                                 sop_instance_uid=job.instance.sop_instance_uid,
                                 action="sent again: the node whose lease expired may have sent it already")
        if not jobs:
            self.associations.release_idle()
            due = self.queue.next_due(self.name, holding)
            self._wake.wait(1.0 if due is None else min(1.0, max(0.02, due - now)))
            self._wake.clear()
            return True
        self._batch(rule_file, jobs)
        self._checked.short = len(jobs) < destination.batch_size
        return True

    def _release_held_back(self) -> None:
        """Record the deliveries and give back the jobs that a failing queue could not take
        before (a delivery not recorded would be sent again)."""
        with self._held_back_lock:
            unrecorded, self._unrecorded = self._unrecorded, []
        if unrecorded:
            try:
                for path in self.queue.complete(unrecorded):
                    self.spool.remove(path)
            except Exception:
                with self._held_back_lock:
                    self._unrecorded.extend(unrecorded)
                raise
        with self._held_back_lock:
            ids, self._held_back = self._held_back, []
        if ids:
            try:
                self.queue.release(ids)
            except Exception:
                with self._held_back_lock:
                    self._held_back.extend(ids)
                raise

    def _batch(self, rule_file: DestinationRules, jobs: list[Job]) -> None:
        """Prepare, send and record one claimed batch; whatever is left unresolved (shutdown,
        lost association, an error) goes back to pending without counting an attempt."""
        unresolved = {job.id: job for job in jobs}
        outgoing: list[_Outgoing] = []
        try:
            for job in jobs:
                item = self._prepare(rule_file, job, unresolved)
                if item is not None:
                    outgoing.append(item)
            by_caller = rule_file.destination.forward_calling_ae_title
            for group in _groups(outgoing, by_caller):
                if self._stop.is_set():
                    break
                self._send_group(rule_file.destination, group, unresolved)
        except PoolClosed:
            self.log.info("batch_interrupted", reason="stopping", action="jobs back to pending")
        except Exception as exc:  # noqa: BLE001 - one batch never kills the sender
            self.log.exception("batch_failed", error=str(exc), action="jobs back to pending")
        finally:
            for item in outgoing:
                if item.submitted is not None:
                    item.submitted.cancel()
                if item.job.id in unresolved:
                    self._discard_output(item)
            if unresolved:
                try:
                    self.queue.release(list(unresolved))
                except Exception:
                    with self._held_back_lock:
                        self._held_back.extend(unresolved)
                    raise

    def _prepare(self, rule_file: DestinationRules, job: Job, unresolved: dict[int, Job]) -> _Outgoing | None:
        inst = job.instance
        item_log = self.log.bind(sop_instance_uid=inst.sop_instance_uid, study_instance_uid=inst.study_instance_uid)
        source = Path(inst.path)
        if not source.exists():
            self.record(rule_file.destination, job, Outcome.DEAD, f"spool file missing: {source}")
            unresolved.pop(job.id)
            return None
        decision = self._decision(rule_file, job, item_log)
        if decision.request is None:
            self.record(rule_file.destination, job, Outcome.SKIPPED, decision.reason)
            unresolved.pop(job.id)
            return None
        item = _Outgoing(job, item_log, decision.request, source, inst.transfer_syntax_uid)
        syntax = codecs.get(item.request.syntax)
        possible = {inst.transfer_syntax_uid}
        if syntax.name != ORIGINAL and inst.transfer_syntax_uid not in syntax.uids:
            possible.update(syntax.uids)
            if item.request.fallback:
                possible.update(codecs.get(item.request.fallback).uids)
            item.submitted = self.codecs.submit(source, self.spool.out_path(job.id), item.request)
        item.contexts = contexts_for(inst.sop_class_uid, possible)
        return item

    def _decision(self, rule_file: DestinationRules, job: Job, item_log) -> Decision:  # noqa: ANN001
        if job.request is not None and job.rules_tag == rule_file.tag:
            return Decision("", job.request, "decided at receipt")
        inst = job.instance
        context = Context(inst.calling_ae, inst.called_ae, inst.source_ip)
        try:
            _, decisions = decide_for(Path(inst.path), context, [rule_file])
            return decisions[0][1]
        except Exception as exc:  # noqa: BLE001 - it was accepted: send it as received
            item_log.warning("header_unreadable", error=str(exc), action="forwarded as received")
            return Decision("", Request(syntax=ORIGINAL), f"header unreadable: {exc}")

    def _send_group(self, destination: Destination, group: list[_Outgoing], unresolved: dict[int, Job]) -> None:
        wanted = merge(*(item.contexts for item in group))
        calling = self._calling_ae_title(destination, group[0])
        association = self.associations.acquire(wanted, calling)
        try:
            error = association.open(wanted, calling)
            if error:
                self.log.warning("association_failed", error=error, host=destination.host, port=destination.port)
                for item in group:
                    if item.submitted is not None:
                        item.submitted.cancel()
                        item.submitted = None
                    self.record(destination, item.job, Outcome.RETRY, error)
                    unresolved.pop(item.job.id)
                return
            delivered: list[tuple[_Outgoing, int]] = []
            try:
                for item in group:
                    if self._stop.is_set() or not association.is_open or self._sends_later(destination, item):
                        break
                    if not self._finish_transcode(destination, item):
                        unresolved.pop(item.job.id)
                        continue
                    size = self._send(destination, association, item)
                    if size is None:
                        unresolved.pop(item.job.id)  # recorded as retry or dead
                    else:
                        delivered.append((item, size))
            finally:
                self._delivered(delivered)
                for item, _ in delivered:  # recorded: no longer the batch's to give back
                    unresolved.pop(item.job.id)
        finally:
            self.associations.give_back(association)

    def _sends_later(self, destination: Destination, item: _Outgoing) -> bool:
        """Whether the rest of the batch goes back to the queue before `item`: its window closed,
        or a job of higher priority became due (it overtakes the batch at the next claim)."""
        now = self.clock()
        if not destination.sending_schedule.is_open(now):
            item.log.info("window_closed", action="the rest of the batch waits for the next window")
            return True
        higher = item.job.priority - 1
        if item.job.priority == HIGH:
            return False
        # asked at most every OVERTAKE_CHECK_S per sender thread: an urgent job waits that long at
        # most, and a busy destination does not cost a query per instance
        checked = time.monotonic()
        if checked - getattr(self._checked, "at", 0.0) < OVERTAKE_CHECK_S:
            return False
        self._checked.at = checked
        # the first count is cheap (an index range): the second, with what holds jobs, only if needed
        if self.queue.due_count(self.name, now, priority=higher) and \
                self.queue.due_count(self.name, now, holding_of(destination), priority=higher):
            item.log.info("overtaken", action="a job of higher priority goes first")
            return True
        return False

    def _calling_ae_title(self, destination: Destination, item: _Outgoing) -> str:
        """The calling AE title of the association: the modality's own with
        `forward_calling_ae_title` (when it is a valid one), else the configured one."""
        if destination.forward_calling_ae_title and is_valid_ae_title(item.job.instance.calling_ae):
            return item.job.instance.calling_ae
        return destination.calling_ae_title or self.associations.calling_ae_title

    def _finish_transcode(self, destination: Destination, item: _Outgoing) -> bool:
        """Wait for the item's transcode. A codec failure (the data, a crash, a hang) goes to the
        fallback at once, else the instance is sent as received; a failure of the machine (no
        disk space, no memory) is a retry later. False when the job was recorded as a retry."""
        if item.submitted is None:
            return True
        result = self.codecs.result(item.submitted)
        item.submitted = None
        while isinstance(result, BaseException):
            if isinstance(result, (OSError, MemoryError)):
                self._discard_output(item)
                self.record(destination, item.job, Outcome.RETRY, f"cannot transcode now: {result}")
                return False
            reason = (Reason.CODEC_TIMEOUT if isinstance(result, CodecTimeout)
                      else Reason.CODEC_CRASH if isinstance(result, CodecCrash) else Reason.CODEC_ERROR)
            metrics.FALLBACKS.labels(destination=self.name, reason=reason.value).inc()
            failed, item.request = item.request, fallback(item.request, reason)
            error = str(result) or type(result).__name__
            if item.request is None:
                item.log.error("transcode_failed", syntax=failed.syntax, error=error, action="forwarded as received")
                item.request = Request(syntax=ORIGINAL)
                return True
            item.log.error("transcode_failed", syntax=failed.syntax, error=error, action=f"fallback {item.request.syntax}")
            result = self.codecs.run(item.source, self.spool.out_path(item.job.id), item.request)
        self._use(item, result)
        return True

    def _use(self, item: _Outgoing, result: Transcoded) -> None:
        item.transcoded = result
        item.path, item.transfer_syntax_uid, item.syntax = result.path, result.transfer_syntax_uid, result.syntax
        for stage, seconds in result.cpu.items():  # spent in a codec worker
            metrics.CPU_SECONDS.labels(stage=stage).inc(seconds)
        if result.changed:
            metrics.TRANSCODE_SECONDS.labels(syntax=result.syntax).observe(result.seconds)
        if result.fallback_reason:
            metrics.FALLBACKS.labels(destination=self.name, reason=str(result.fallback_reason)).inc()
            item.log.warning("fallback", reason=str(result.fallback_reason), note=result.note, syntax=result.syntax)

    def _refused_syntax(self, destination: Destination, association: Association, item: _Outgoing) -> bool:
        """The destination accepted no context for the item's syntax: decompress for one it did
        accept. False when the job was recorded (dead or retry) instead."""
        sop = item.job.instance.sop_class_uid
        accepted = [codecs.get(ts).name for ts in UNCOMPRESSED if association.accepts(sop, ts)]
        instead = fallback(item.request, Reason.REFUSED_BY_DESTINATION, accepted)
        if instead is None:
            self.record(destination, item.job, Outcome.DEAD,
                        f"destination accepts no presentation context for SOP class {sop}")
            return False
        refused = item.transfer_syntax_uid
        result = self.codecs.run(item.source, self.spool.out_path(item.job.id, "-" + instead.syntax), instead)
        if isinstance(result, BaseException):
            # a transcode error is in the data: it will not change, so no retries
            outcome = Outcome.DEAD if isinstance(result, TranscodeError) else Outcome.RETRY
            self.record(destination, item.job, outcome,
                        f"cannot decompress for a destination that refused {refused}: {result}")
            return False
        self._discard_output(item)
        item.request, item.transcoded = instead, result
        item.path, item.transfer_syntax_uid, item.syntax = result.path, result.transfer_syntax_uid, instead.syntax
        metrics.FALLBACKS.labels(destination=self.name, reason=Reason.REFUSED_BY_DESTINATION.value).inc()
        item.log.warning("syntax_refused", refused=refused, sent_as=result.transfer_syntax_uid,
                         action="decompressed and sent")
        return True

    def _send(self, destination: Destination, association: Association, item: _Outgoing) -> int | None:
        """C-STORE one item; returns its size when the destination stored it (recorded later, with
        the rest of the group), None when the job was recorded otherwise."""
        if not association.accepts(item.job.instance.sop_class_uid, item.transfer_syntax_uid):
            if not self._refused_syntax(destination, association, item):
                return None
        size = item.path.stat().st_size
        started = time.monotonic()
        try:
            status = association.store(item.path)
        except Exception as exc:  # noqa: BLE001 - unreadable file, encoding problem, lost peer
            association.abort()
            self._discard_output(item)
            self.record(destination, item.job, Outcome.RETRY, f"C-STORE failed: {exc}")
            return None
        elapsed = time.monotonic() - started
        metrics.FORWARD_SECONDS.labels(destination=self.name).observe(elapsed)
        if "Status" not in status:
            association.abort()
            self._discard_output(item)
            self.record(destination, item.job, Outcome.RETRY, "no C-STORE response (DIMSE timeout or association aborted)")
            return None
        code = int(status.Status)
        verdict = classify_status(code, destination.statuses)
        if verdict == "success":
            ratio = item.transcoded.ratio if item.transcoded else None
            if any(low <= code <= high for low, high in WARNINGS):
                item.log.warning("stored_with_warning", status=f"0x{code:04X}",
                                 comment=str(status.get("ErrorComment", "") or ""))
            item.log.info("forwarded", syntax=item.syntax, transfer_syntax=item.transfer_syntax_uid,
                          status=f"0x{code:04X}", size=size, ratio=round(ratio, 2) if ratio else None,
                          duration=round(elapsed, 4))
            return size
        self._discard_output(item)
        if verdict == "retry":
            self.record(destination, item.job, Outcome.RETRY, f"destination answered 0x{code:04X}")
        else:
            self.record(destination, item.job, Outcome.DEAD, f"destination answered 0x{code:04X} (permanent failure)")
        return None

    def _discard_output(self, item: _Outgoing) -> None:
        if item.path != item.source:
            self.spool.remove(item.path)

    # -- record: the one place an outcome reaches the queue, the metrics and the log ---------
    def _delivered(self, delivered: list[tuple[_Outgoing, int]]) -> None:
        """Record what the destination stored, in one transaction for the whole group.

        A crash before this point sends those instances again: at least once, never lost.
        """
        if not delivered:
            return
        deliveries = [_delivery(item, size) for item, size in delivered]
        try:
            for path in self.queue.complete(deliveries):
                self.spool.remove(path)
        except Exception as exc:  # noqa: BLE001 - the queue is unreachable: record it when it is back
            self.log.warning("delivery_not_recorded", error=str(exc), jobs=len(deliveries),
                             action="recorded when the queue answers again")
            with self._held_back_lock:
                self._unrecorded.extend(deliveries)
        now = time.time()
        for item, size in delivered:
            if item.job.taken_over_from:
                metrics.DUPLICATE_SENDS.labels(destination=self.name).inc()
            self._discard_output(item)
            metrics.FORWARDED_INSTANCES.labels(destination=self.name, syntax=item.syntax).inc()
            metrics.FORWARDED_BYTES.labels(destination=self.name, syntax=item.syntax).inc(size)
            metrics.FORWARDED_BYTES_AS_RECEIVED.labels(destination=self.name).inc(item.job.instance.size)
            metrics.END_TO_END_SECONDS.labels(destination=self.name).observe(max(0.0, now - item.job.instance.received_at))

    def record(self, destination: Destination, job: Job, outcome: Outcome, why: str) -> None:
        """Record a job's outcome other than delivered (see `_delivered`) in the queue, the
        metrics and the log. A retry past `max_attempts` is a dead letter."""
        uid = job.instance.sop_instance_uid
        if outcome is Outcome.SKIPPED:
            for path in self.queue.complete([Delivery(job.id, Outcome.SKIPPED, note=why)]):
                self.spool.remove(path)
            metrics.SKIPPED.labels(destination=self.name).inc()
            self.log.info("skipped", sop_instance_uid=uid, reason=why)
            return
        attempts = job.attempts + 1
        if outcome is Outcome.RETRY and attempts >= destination.retry.max_attempts:
            outcome = Outcome.DEAD
        if outcome is Outcome.DEAD:
            self.queue.dead(job.id, why)
            self.log.error("dead_letter", sop_instance_uid=uid, attempts=attempts, error=why)
        else:
            delay = backoff_delay(attempts, destination.retry.backoff_s, destination.retry.max_backoff_s)
            self.queue.retry(job.id, why, time.time() + delay)
            self.log.warning("retry_scheduled", sop_instance_uid=uid, attempts=attempts, retry_in_s=round(delay, 1),
                             error=why)
        metrics.FORWARD_FAILURES.labels(destination=self.name, outcome=outcome.value).inc()


def _delivery(item: _Outgoing, size: int) -> Delivery:
    """How a delivered item went out, for its history row."""
    received = item.job.instance
    sent_uid = item.transcoded.sop_instance_uid if item.transcoded is not None else ""
    if item.transcoded is not None and item.transcoded.ratio:
        ratio = item.transcoded.ratio
    else:
        ratio = received.size / size if size else None
    return Delivery(
        item.job.id, Outcome.DELIVERED, syntax=item.syntax, transfer_syntax_uid=item.transfer_syntax_uid,
        sent_size=size, ratio=round(ratio, 3) if ratio else None,
        sent_sop_instance_uid=sent_uid if sent_uid and sent_uid != received.sop_instance_uid else "",
    )


def _groups(items: list[_Outgoing], by_caller: bool = False) -> list[list[_Outgoing]]:
    """Split a batch so that no association needs more than 128 presentation contexts, and,
    `by_caller`, so that each association carries the instances of one calling AE title.
    Without `by_caller` the batch keeps the order it was claimed in (a stable study goes in
    series and instance number order, whatever its SOP classes)."""
    if not by_caller:
        in_order: list[list[_Outgoing]] = []
        wanted: Contexts = {}
        for item in items:
            with_item = merge(wanted, item.contexts)
            if not in_order or count(with_item) > MAX_CONTEXTS:
                in_order.append([])
                with_item = merge(item.contexts)
            in_order[-1].append(item)
            wanted = with_item
        return in_order
    by_key: dict[tuple[str, str], list[_Outgoing]] = {}
    for item in items:
        caller = item.job.instance.calling_ae if by_caller else ""
        by_key.setdefault((caller, item.job.instance.sop_class_uid), []).append(item)
    groups: list[list[_Outgoing]] = []
    group: list[_Outgoing] = []
    keys = sorted(by_key, key=lambda key: key[0]) if by_caller else list(by_key)
    for caller, sop_class in keys:
        class_items = by_key[(caller, sop_class)]
        if group and (count(merge(*(i.contexts for i in group + class_items))) > MAX_CONTEXTS
                      or (by_caller and group[0].job.instance.calling_ae != caller)):
            groups.append(group)
            group = []
        group.extend(class_items)
    if group:
        groups.append(group)
    return groups
