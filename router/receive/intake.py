"""Intake: what the router does with one received data set, and the status the modality hears.

A plain function of a file and where it came from, no pynetdicom: size and free-space checks,
the strict header check (`dicomfile`), the rules of every destination (`rules`), then the spool
and the queue. Success (0x0000) only once the file is fsynced in the spool and its jobs are
committed in the queue; 0xA700 when it cannot be stored now (the modality retries later);
0xC000 for a data set that cannot be understood, and for an instance whose UIDs (the request's
Affected SOP Class and Instance UIDs; the data set's SOP Class, SOP Instance, Study and Series
Instance UIDs) are not valid UI values (`dicomfile.uid_problem`): they are what the router
stores, searches and shows, and what the destination files the instance under.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router import log, metrics
from router.config import DestinationRules
from router.receive.dicomfile import check_uids, read_header, uid_problem
from router.queue import HIGH, Instance, NewJob, Queue
from router.request import Reason
from router.rules import CONTEXT_KEYS, PRIORITIES, Attributes, Context, Decision, decide
from router.queue.spool import Spool

SUCCESS = 0x0000
PRIORITY_HIGH = 0x0001  # the C-STORE request's Priority (PS3.7 9.1.1.1): 0 medium, 1 high, 2 low
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

_log = log.get("intake")


@dataclass(frozen=True)
class Received:
    """A data set as the network layer handed it over: its file and the C-STORE request's UIDs."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    context: Context
    priority: int = 0  # the C-STORE request's Priority; high makes the instance high priority everywhere
    association: int = 0  # which association it came on (for the audit trail: one message per study)


def job_priority(decision: Decision, store_priority: int = 0) -> int:
    """The queue priority of a job: high when its rule or the modality's C-STORE says so."""
    if store_priority == PRIORITY_HIGH:
        return HIGH
    return PRIORITIES.index(decision.priority)


def _number(header: Any, keyword: str) -> int | None:
    """An IS attribute as an int, None when absent or unreadable (it only orders a study)."""
    try:
        value = header.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:  # noqa: BLE001 - a malformed value orders like a missing one
        return None


def decide_for(
    path: Path, context: Context, destinations: list[DestinationRules], expected_sop_instance_uid: str | None = None,
) -> tuple[Any, list[tuple[DestinationRules, Decision]]]:
    """Read a file's header strictly (`dicomfile.read_header`) and apply each destination's rules.

    Returns the header (a pydicom Dataset without pixel data) and one decision per destination;
    raises `dicomfile.MalformedDataset` (or an OSError) for a file the router would refuse, its
    UIDs included (`dicomfile.check_uids`).
    Every element a rule looks at is decoded here, so a value that does not fit its VR is
    reported as malformed rather than surfacing later.
    """
    keys = {k for d in destinations for r in d.rules for k in r.match if k not in CONTEXT_KEYS}
    header = read_header(path, expected_sop_instance_uid,
                         decode=("StudyInstanceUID", "SeriesInstanceUID", *sorted(keys)))
    check_uids(header)
    attributes = Attributes(header, context)
    return header, [(d, decide(d.rules, attributes, d.destination.keep_sop_instance_uid)) for d in destinations]


class Intake:
    """Accepts received files for the destinations `destinations()` returns at that moment."""

    def __init__(
        self,
        spool: Spool,
        queue: Queue,
        destinations: Callable[[], list[DestinationRules]],
        max_instance_mb: int = 0,
        on_enqueued: Callable[[list[str]], None] = lambda names: None,
        on_stored: Callable[[Received, Instance, str, str], None] | None = None,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self.destinations = destinations
        self.max_instance_bytes = max_instance_mb * 1024 * 1024
        self.on_enqueued = on_enqueued
        # each instance made durable, with its Patient ID and Name (the audit trail's `received`)
        self.on_stored = on_stored
        self.cpu_seconds = 0.0  # CPU spent in accept() so far: the "spool" stage

    def accept(self, received: Received) -> int:
        """Make `received` durable and queue its jobs; returns the C-STORE status to answer.

        An accepted file is moved into the spool (or removed when no destination wants it); a
        refused one is left where it is, for the caller to remove.
        """
        cpu = time.thread_time()
        try:
            return self._accept(received)
        finally:
            spent = time.thread_time() - cpu
            self.cpu_seconds += spent
            metrics.CPU_SECONDS.labels(stage="spool").inc(spent)

    def check_receiving(self, received_bytes: int, calling_ae: str, sop_instance_uid: str) -> int | None:
        """While a data set is still arriving: the status to refuse it at once (already larger
        than max_instance_mb, or the spool below min_free_mb), or None to go on receiving.

        The network layer asks at the start of each data set and as its bytes land, so bytes
        being received count against the free-space floor before the transfer ends.
        """
        bound = _log.bind(calling_ae=calling_ae, sop_instance_uid=sop_instance_uid, received_bytes=received_bytes)
        if (problem := uid_problem(sop_instance_uid)) is not None:  # refused at once: no need to spool it
            return self._refuse(bound, Reason.MALFORMED, CANNOT_UNDERSTAND,
                                f"Affected SOP Instance UID {problem}")
        return self._no_room_for(received_bytes, bound)

    def _no_room_for(self, size: int, bound) -> int | None:  # noqa: ANN001
        """The status refusing `size` bytes (too large, or the spool below its floor), or None."""
        if self.max_instance_bytes and size > self.max_instance_bytes:
            return self._refuse(bound, Reason.TOO_LARGE, OUT_OF_RESOURCES,
                                f"instance of {size} bytes exceeds max_instance_mb "
                                f"({self.max_instance_bytes // (1024 * 1024)})")
        if not self.spool.has_room():
            return self._refuse(bound, Reason.DISK_FULL, OUT_OF_RESOURCES, "spool below min_free_mb",
                                free_bytes=self.spool.free_bytes())
        return None

    def _unusable_uid(self, received: Received, bound) -> int | None:  # noqa: ANN001
        """The status refusing a C-STORE request whose UIDs are not valid UI values, or None."""
        for name, value in (("Affected SOP Class UID", received.sop_class_uid),
                            ("Affected SOP Instance UID", received.sop_instance_uid)):
            if (problem := uid_problem(value)) is not None:
                return self._refuse(bound, Reason.MALFORMED, CANNOT_UNDERSTAND, f"{name} {problem}")
        return None

    def _refuse(self, bound, reason: Reason, status: int, why: str, **fields) -> int:  # noqa: ANN001, ANN003
        metrics.REJECTED.labels(reason=reason.value).inc()
        bound.error("store_refused", reason=why, status=f"0x{status:04X}", **fields)
        return status

    def _accept(self, received: Received) -> int:
        started = time.monotonic()
        context = received.context
        bound = _log.bind(calling_ae=context.calling_ae, sop_instance_uid=received.sop_instance_uid)
        path = received.path
        try:
            size = path.stat().st_size
            refused = self._unusable_uid(received, bound) or self._no_room_for(size, bound)
            if refused is not None:
                return refused
            synced = self.spool.sync_soon(path)  # the fsync runs while the header is read
            try:
                header, decisions = decide_for(path, context, self.destinations(), received.sop_instance_uid)
                transfer_syntax = str(header.file_meta.TransferSyntaxUID)
                study = str(header.get("StudyInstanceUID", ""))
                series = str(header.get("SeriesInstanceUID", ""))
            except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on broken input
                return self._refuse(bound, Reason.MALFORMED, CANNOT_UNDERSTAND,
                                    f"data set cannot be understood: {exc}")
            jobs = []
            for rule_file, decision in decisions:
                if decision.request is not None:
                    jobs.append(NewJob(rule_file.name, decision.request, rule_file.tag,
                                       job_priority(decision, received.priority)))
                else:
                    metrics.SKIPPED.labels(destination=rule_file.name).inc()
            final = self.spool.accept(path, synced)
            instance = Instance(
                path=str(final),
                sop_class_uid=received.sop_class_uid,
                sop_instance_uid=received.sop_instance_uid,
                study_instance_uid=study,
                transfer_syntax_uid=transfer_syntax,
                calling_ae=context.calling_ae,
                called_ae=context.called_ae,
                source_ip=context.source_ip,
                size=size,
                received_at=time.time(),
                series_instance_uid=series,
                series_number=_number(header, "SeriesNumber"),
                instance_number=_number(header, "InstanceNumber"),
            )
            try:
                self.queue.add(instance, jobs)  # no job: a history row ("not forwarded") only
            except Exception:
                self.spool.remove(final)
                raise
            if not jobs:
                # no destination wants it: nothing to keep but its history once it has been accepted
                self.spool.remove(final)
        except OSError as exc:
            reason = Reason.DISK_FULL if exc.errno in _DISK_FULL_ERRNOS else Reason.ERROR
            return self._refuse(bound, reason, OUT_OF_RESOURCES, f"cannot spool: {exc}")
        except Exception as exc:  # noqa: BLE001 - the queue is unavailable: the modality must retry
            metrics.REJECTED.labels(reason=Reason.ERROR.value).inc()
            bound.exception("store_refused", reason=f"cannot record in queue: {exc}", status="0xA700")
            return OUT_OF_RESOURCES
        caller = metrics.caller_label(context.calling_ae)  # bounded: the network chooses the AE title
        metrics.RECEIVED_INSTANCES.labels(caller=caller).inc()
        metrics.RECEIVED_BYTES.labels(caller=caller).inc(size)
        names = [job.destination for job in jobs]
        bound.info("stored", study_instance_uid=study, transfer_syntax=transfer_syntax, size=size,
                   destinations=names, duration=round(time.monotonic() - started, 4))
        if names:
            self.on_enqueued(names)
        if self.on_stored is not None:
            self.on_stored(received, instance, str(header.get("PatientID", "") or ""),
                           str(header.get("PatientName", "") or ""))
        return SUCCESS
