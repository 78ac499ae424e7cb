"""Forwarding: one pipeline per destination, read top to bottom.

    claim      due jobs of the destination, a batch at a time (`queue.claim`)
    prepare    the request of each job (decided at receipt, or again if the rules changed) and
               its transcode, started on the codec pool
    send       by the destination's sender (`forward.sender.Sender`: DIMSE C-STORE over the
               association pool, ...), each instance as soon as its transcode is done; the
               forwarder never knows the protocol
    record     the outcome of each job: queue, metric and log together (`Forwarder.record`)

Sender threads, at most `max_associations` (DICOMweb: `max_requests`) of them, each run this pipeline; they share the
destination's sender. When a job cannot go out in its rule's syntax (the codec cannot carry it,
failed, or the destination refused the syntax), `Forwarder._fall_back` alone applies what
`request.fallback` says is tried next.
"""

from __future__ import annotations

import collections
import threading
import urllib.parse
import time
from collections.abc import Callable
from pathlib import Path

from router import codecs, log, metrics
from router.codecs.transcode import HeaderRefusal, TranscodeError, Transcoded
from router.codecs.workers import CodecCrash, CodecPool, CodecTimeout, PoolClosed
from router.config import Destination, DestinationRules
from router.forward.outbound import backoff_delay
from router.forward.sender import Outgoing, Ready, Sender, Sent
from router.forward.senders import sender_for
from router.forward.waiting import holding_of
from router import audit
from router.queue import HIGH, Delivery, Job, JobQueue
from router.queue.holds import Holds
from router.queue.spool import LateRemoval, Spool
from router.receive.intake import decide_for
from router.request import ORIGINAL, Outcome, Reason, Request, fallback
from router.rules import Context, Decision
from router.uids import EXPLICIT_BE, EXPLICIT_LE, UNCOMPRESSED

OVERTAKE_CHECK_S = 0.25


class Forwarder:
    """Sends one destination's jobs."""

    def __init__(
        self,
        name: str,
        rule_file: Callable[[str], DestinationRules | None],
        queue: JobQueue,
        spool: Spool,
        pool: CodecPool,
        calling_ae_title: str,
        clock: Callable[[], float] = time.time,
        sender: Sender | None = None,
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
        # deliveries are committed without an fsync; their files go once a sync made them durable
        self._removal = LateRemoval(spool, queue.sync)
        # how the destination is reached (DIMSE C-STORE, DICOMweb STOW-RS): the forwarder does not know
        self._calling_ae_title = calling_ae_title
        self._own_sender = sender is None
        self._sender_lock = threading.Lock()
        in_force = rule_file(name)
        self._protocol = in_force.destination.protocol if in_force is not None else ""
        self.sender = sender or sender_for(name, self._destination, queue, calling_ae_title)

    def _destination(self) -> Destination:
        rule_file = self.rule_file(self.name)
        if rule_file is None:
            raise LookupError(f"destination {self.name} has no rule file any more")
        return rule_file.destination

    @property
    def ceiling(self) -> int:
        in_force = self.rule_file(self.name)
        return in_force.destination.ceiling if in_force else 1

    def start(self) -> None:
        for index in range(self.ceiling):
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
        self.sender.close()
        try:
            self._removal.close()
        except Exception as exc:  # noqa: BLE001 - the files stay: the start-up sweep removes them
            self.log.warning("spool_removal_deferred", error=str(exc), action="removed at the next start")

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
        if self._own_sender and rule_file.destination.protocol != self._protocol:
            self._replace_sender(rule_file.destination.protocol)
        if self.holds.is_paused(self.name):
            self.sender.idle()
            self._wake.wait(1.0)
            self._wake.clear()
            return True
        destination, now = rule_file.destination, self.clock()
        opens = destination.sending_schedule.next_open(now)
        if opens != now:  # outside every window: nothing is claimed until the next one opens
            self.sender.idle()
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
        jobs = [] if short else self.queue.claim(self.name, destination.claim_size, now=now, holding=holding)
        for job in jobs:
            if job.taken_over_from:
                self.log.warning("job_taken_over", from_node=job.taken_over_from,
                                 sop_instance_uid=job.instance.sop_instance_uid,
                                 action="sent again: the node whose lease expired may have sent it already")
        if not jobs:
            self.sender.idle()
            due = self.queue.next_due(self.name, holding)
            self._wake.wait(1.0 if due is None else min(1.0, max(0.02, due - now)))
            self._wake.clear()
            return True
        self._batch(rule_file, jobs)
        self._checked.short = len(jobs) < destination.claim_size
        return True

    def _replace_sender(self, protocol: str) -> None:
        """The rule file now reaches the destination by another protocol (a reload changed
        `url` for `host`, or back): a sender of that protocol from the next batch on."""
        with self._sender_lock:
            if protocol == self._protocol:
                return
            old, self._protocol = self.sender, protocol
            self.sender = sender_for(self.name, self._destination, self.queue, self._calling_ae_title)
        self.log.info("destination_protocol_changed", protocol=protocol)
        old.close()

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
        outgoing: list[Outgoing] = []
        try:
            for job in jobs:
                item = self._prepare(rule_file, job, unresolved)
                if item is not None:
                    outgoing.append(item)
            if outgoing and not self._stop.is_set():
                self._send(rule_file.destination, outgoing, unresolved)
        except PoolClosed:
            self.log.info("batch_interrupted", reason="stopping", action="jobs back to pending")
        except Exception as exc:  # noqa: BLE001 - one batch never kills the sender
            self.log.exception("batch_failed", error=str(exc), action="jobs back to pending")
        finally:
            for item in outgoing:
                _cancel(item)
                if item.job.id in unresolved:
                    self._discard_output(item)
            if unresolved:
                try:
                    self.queue.release(list(unresolved))
                except Exception:
                    with self._held_back_lock:
                        self._held_back.extend(unresolved)
                    raise

    # -- prepare ----------------------------------------------------------------------------------
    def _prepare(self, rule_file: DestinationRules, job: Job, unresolved: dict[int, Job]) -> Outgoing | None:
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
        item = Outgoing(job, item_log, decision.request, source, inst.transfer_syntax_uid)
        syntax = codecs.get(item.request.syntax)
        item.possible = {inst.transfer_syntax_uid}
        if syntax.name != ORIGINAL and inst.transfer_syntax_uid not in syntax.uids:
            item.possible.update(syntax.uids)
            if item.request.fallback:
                item.possible.update(codecs.get(item.request.fallback).uids)
            if self.sender.refused(inst.sop_class_uid).issuperset(syntax.uids):
                item.refused = True  # refused on the connection in force: what it takes is made instead
            else:
                item.submitted = self.codecs.submit(source, self.spool.out_path(job.id), item.request)
        elif item.request.header:  # the pixels as they are, the header as its rules say: one write
            if inst.transfer_syntax_uid == EXPLICIT_BE:
                item.possible.add(EXPLICIT_LE)
            item.submitted = self.codecs.submit(source, self.spool.out_path(job.id), item.request)
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

    # -- send -------------------------------------------------------------------------------------
    def _send(self, destination: Destination, items: list[Outgoing], unresolved: dict[int, Job]) -> None:
        """Hand the batch to the sender and record what became of each item; what it delivered
        is recorded together, whatever happens to the rest."""
        delivered: list[Sent] = []

        def ready(item: Outgoing, refused: tuple[str, ...] | None = None) -> Ready:
            if refused is None:
                if self._stop.is_set() or self._sends_later(destination, item):
                    return Ready.STOP
                if item.refused:  # not encoded: the destination refused the syntax on the last connection
                    item.refused = False
                    sop = item.job.instance.sop_class_uid
                    if self.sender.refused(sop).issuperset(codecs.get(item.request.syntax).uids):
                        accepted = self.sender.accepted(sop) or frozenset()
                        refused = tuple(codecs.get(ts).name for ts in UNCOMPRESSED if ts in accepted)
                    else:  # the connection in force takes it again: encoded now
                        item.submitted = self.codecs.submit(item.source, self.spool.out_path(item.job.id),
                                                            item.request)
            if refused is not None:
                go = self._fall_back(destination, item, Reason.REFUSED_BY_DESTINATION, accepted=refused)
            else:
                go = self._finish_transcode(destination, item)
            if go is Ready.SKIP:
                unresolved.pop(item.job.id)  # recorded as a retry or a dead letter
            return go

        try:
            for sent in self.sender.send(items, ready):
                if sent.seconds:
                    metrics.FORWARD_SECONDS.labels(destination=self.name).observe(sent.seconds)
                if sent.outcome is Outcome.DELIVERED:
                    delivered.append(sent)
                    continue
                _cancel(sent.item)
                self._discard_output(sent.item)
                self.record(destination, sent.item.job, sent.outcome, sent.why, not_before_s=sent.retry_after_s)
                unresolved.pop(sent.item.job.id)
        finally:
            self._delivered(delivered)
            for sent in delivered:  # recorded: no longer the batch's to give back
                unresolved.pop(sent.item.job.id)

    def _sends_later(self, destination: Destination, item: Outgoing) -> bool:
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

    # -- transcode and fall back --------------------------------------------------------------------
    def _finish_transcode(self, destination: Destination, item: Outgoing) -> Ready:
        """Wait for the item's transcode, and use what it made."""
        if item.submitted is None:
            return Ready.SEND
        result = self.codecs.result(item.submitted)
        item.submitted = None
        return self._transcoded(destination, item, result)

    def _transcoded(self, destination: Destination, item: Outgoing, result: Transcoded | BaseException) -> Ready:
        """A failure of the machine (no disk space, no memory) is a retry later; a codec failure
        (the data, a crash, a hang) falls back; else the output is what goes out."""
        if isinstance(result, (OSError, MemoryError)):
            self._discard_output(item)
            self.record(destination, item.job, Outcome.RETRY, f"cannot transcode now: {result}")
            return Ready.SKIP
        if isinstance(result, HeaderRefusal) or (isinstance(result, TranscodeError) and item.request.header
                                                  and item.request.syntax == ORIGINAL):
            # never sent without its header rules (a site prefix, a de-identification)
            self._discard_output(item)
            metrics.HEADER_REFUSALS.labels(destination=self.name,
                                           reason=getattr(result, "reason", "header_rule")).inc()
            self.record(destination, item.job, Outcome.DEAD, f"header rules ({item.request.header_rule}): {result}")
            return Ready.SKIP
        if isinstance(result, BaseException):
            reason = (Reason.CODEC_TIMEOUT if isinstance(result, CodecTimeout)
                      else Reason.CODEC_CRASH if isinstance(result, CodecCrash) else Reason.CODEC_ERROR)
            return self._fall_back(destination, item, reason, error=str(result) or type(result).__name__)
        self._use(item, result)
        return Ready.SEND

    def _fall_back(self, destination: Destination, item: Outgoing, reason: Reason, error: str = "",
                   accepted: tuple[str, ...] = ()) -> Ready:
        """The one place a fallback is applied, whatever its reason: the codec failed, crashed
        or hung (`error`), or the destination refused the syntax (`accepted`: the uncompressed
        syntaxes it takes). `request.fallback` decides what is tried instead; a codec that
        cannot carry the image or whose output does not verify is fallen back from in the
        worker (`_use` counts it). SEND, or SKIP once the job is recorded."""
        failed = item.request
        refused = reason is Reason.REFUSED_BY_DESTINATION
        if not refused and failed.syntax == ORIGINAL and failed.header:  # the header rewrite itself failed
            self.record(destination, item.job, Outcome.RETRY,
                        f"header rules ({failed.header_rule}) not applied: {error or reason}")
            return Ready.SKIP
        instead = fallback(failed, reason, accepted)
        if refused and instead is None:
            self.record(destination, item.job, Outcome.DEAD,
                        f"destination accepts no presentation context for SOP class {item.job.instance.sop_class_uid}")
            return Ready.SKIP
        if not refused:
            _counted(self.name, reason)
            item.log.error("transcode_failed", syntax=failed.syntax, error=error,
                           action="forwarded as received" if instead is None else f"fallback {instead.syntax}")
            if instead is None:
                item.request = failed.instead(ORIGINAL)
                if not item.request.header:
                    return Ready.SEND
                instead = item.request  # as received, with its header rules: written all the same
        result = self.codecs.run(item.source, self.spool.out_path(item.job.id, "-" + instead.syntax), instead)
        if not refused:
            item.request = instead
            return self._transcoded(destination, item, result)
        # what the destination refused: the output made for it, or (not encoded, the syntax known
        # refused) the syntax asked for
        sent_as = item.transfer_syntax_uid if item.transcoded is not None else codecs.get(failed.syntax).uid
        if isinstance(result, BaseException):
            # a transcode error is in the data: it will not change, so no retries
            outcome = Outcome.DEAD if isinstance(result, TranscodeError) else Outcome.RETRY
            self.record(destination, item.job, outcome,
                        f"cannot decompress for a destination that refused {sent_as}: {result}")
            return Ready.SKIP
        self._discard_output(item)
        item.request = instead
        self._use(item, result)
        item.syntax = instead.syntax
        _counted(self.name, reason)
        item.log.warning("syntax_refused", refused=sent_as, sent_as=result.transfer_syntax_uid,
                         action="decompressed and sent")
        return Ready.SEND

    def _use(self, item: Outgoing, result: Transcoded) -> None:
        item.transcoded = result
        item.path, item.transfer_syntax_uid, item.syntax = result.path, result.transfer_syntax_uid, result.syntax
        for stage, seconds in result.cpu.items():  # spent in a codec worker
            metrics.CPU_SECONDS.labels(stage=stage).inc(seconds)
        if result.changed:
            metrics.TRANSCODE_SECONDS.labels(syntax=result.syntax).observe(result.seconds)
        if result.header:
            counts = collections.Counter(action for action, _ in result.header)
            for action, count in counts.items():
                metrics.HEADER_CHANGES.labels(destination=self.name, rule=item.request.header_rule,
                                              action=action).inc(count)
            # the coercion attribute by attribute; the de-identification, by the number it changed
            item.log.info("header_changed", rule=item.request.header_rule,
                          changes=[f"{action} {attribute}" for action, attribute in result.header
                                   if action != "deidentify"],
                          **({"deidentified": counts["deidentify"]} if "deidentify" in counts else {}))
        if result.fallback_reason:  # fallen back in the worker: the codec cannot carry it, or it did not verify
            _counted(self.name, result.fallback_reason)
            item.log.warning("fallback", reason=str(result.fallback_reason), note=result.note, syntax=result.syntax)

    def _discard_output(self, item: Outgoing) -> None:
        if item.path != item.source:
            self.spool.remove(item.path)

    # -- record: the one place an outcome reaches the queue, the metrics and the log ---------
    def _delivered(self, delivered: list[Sent]) -> None:
        """Record what the destination stored, in one transaction for the whole group.

        A crash before this point sends those instances again: at least once, never lost.
        """
        if not delivered:
            return
        if audit.current() is not None:
            self._audit(delivered)
        deliveries = [_delivery(sent.item, sent.size) for sent in delivered]
        try:
            self._removal.remove(self.queue.complete(deliveries, durable=False))
        except Exception as exc:  # noqa: BLE001 - the queue is unreachable: record it when it is back
            self.log.warning("delivery_not_recorded", error=str(exc), jobs=len(deliveries),
                             action="recorded when the queue answers again")
            with self._held_back_lock:
                self._unrecorded.extend(deliveries)
        now = time.time()
        for sent in delivered:
            item, size = sent.item, sent.size
            ratio = item.transcoded.ratio if item.transcoded else None
            item.log.info("forwarded", syntax=item.syntax, transfer_syntax=item.transfer_syntax_uid,
                          status=sent.status, size=size, ratio=round(ratio, 2) if ratio else None,
                          duration=round(sent.seconds, 4))
            if item.job.taken_over_from:
                metrics.DUPLICATE_SENDS.labels(destination=self.name).inc()
            self._discard_output(item)
            metrics.FORWARDED_INSTANCES.labels(destination=self.name, syntax=item.syntax).inc()
            metrics.FORWARDED_BYTES.labels(destination=self.name, syntax=item.syntax).inc(size)
            metrics.FORWARDED_BYTES_AS_RECEIVED.labels(destination=self.name).inc(item.job.instance.size)
            metrics.END_TO_END_SECONDS.labels(destination=self.name).observe(max(0.0, now - item.job.instance.received_at))

    def _audit(self, delivered: list[Sent]) -> None:
        """The audit trail of what the destination stored: per study, DICOM Instances Transferred
        with the UIDs as sent, or Export for a de-identified copy."""
        try:
            items = [(sent.item.job.instance.study_instance_uid, str(sent.item.source), str(sent.item.path),
                      sent.item.job.instance.sop_class_uid,
                      any(action[0] == "deidentify" for action in sent.item.request.header)) for sent in delivered]
            as_received, as_sent, deidentified = audit.sent_studies(items)
            d = self._destination()
        except Exception as exc:  # noqa: BLE001 - the audit trail never holds a delivery back
            self.log.error("audit_record_failed", error=f"{type(exc).__name__}: {exc}")
            return
        peer = audit.peer_ae(d.ae_title or "", d.host or "") if d.protocol == "dimse" else \
            audit.Participant(user_id=d.url or "", requestor=False, address=urllib.parse.urlsplit(d.url or "").hostname
                              or "")
        if deidentified:
            audit.export(peer, as_received, as_sent)
        else:
            audit.instances_transferred(False, peer, as_sent)

    def record(self, destination: Destination, job: Job, outcome: Outcome, why: str,
               not_before_s: float = 0.0) -> None:
        """Record a job's outcome other than delivered (see `_delivered`) in the queue, the
        metrics and the log. A retry past `max_attempts` is a dead letter; a retry waits its
        backoff, and at least `not_before_s` (the destination's Retry-After)."""
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
            delay = max(not_before_s, backoff_delay(attempts, destination.retry.backoff_s,
                                                    destination.retry.max_backoff_s))
            self.queue.retry(job.id, why, time.time() + delay)
            self.log.warning("retry_scheduled", sop_instance_uid=uid, attempts=attempts, retry_in_s=round(delay, 1),
                             error=why)
        metrics.FORWARD_FAILURES.labels(destination=self.name, outcome=outcome.value).inc()


def _counted(destination: str, reason: Reason) -> None:
    """An instance not sent in its rule's syntax, counted once, whatever the reason."""
    metrics.FALLBACKS.labels(destination=destination, reason=str(reason)).inc()


def _cancel(item: Outgoing) -> None:
    if item.submitted is not None:
        item.submitted.cancel()
        item.submitted = None


def _delivery(item: Outgoing, size: int) -> Delivery:
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
