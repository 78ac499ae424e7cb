"""Where is this study? Each instance of a study, series or SOP instance, at each destination:
pending, in flight, retrying (and when next), dead (and why), delivered (when, and as what), from
the queue and the history. `dicom-router trace` and the status page's search print this.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass

from router.queue import Queue


@dataclass(frozen=True)
class Whereabout:
    """One instance at one destination."""

    sop_instance_uid: str  # as received
    destination: str  # "" for an instance no destination wants
    state: str  # pending, in flight, retrying, dead, delivered, skipped, not forwarded
    detail: str  # the next attempt, the error, or what went out
    at: float  # received (not yet finished), or when it finished
    sent_sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at))
        sent = f" sent as {self.sent_sop_instance_uid}" if self.sent_sop_instance_uid else ""
        return f"{self.sop_instance_uid}  {self.destination or '-':12} {self.state:13} {when}  {self.detail}{sent}"

    def as_dict(self) -> dict:
        return asdict(self)


def trace(queue: Queue, study: str | None = None, series: str | None = None, sop: str | None = None,
          now: float | None = None) -> list[Whereabout]:
    """Every instance matching the UIDs given (a sent SOP Instance UID finds its original), at
    every destination; jobs still in the queue first, then the history, each in time order."""
    now = time.time() if now is None else now
    found: list[Whereabout] = []
    history = queue.history(study=study, series=series, sop=sop)
    if sop and not study and not series:
        # a sent UID maps back to the received one, whose queued jobs are wanted too
        originals = {entry.sop_instance_uid for entry in history} | {sop}
    else:
        originals = {None}
    seen_jobs: set[int] = set()
    for original in originals:
        for job in queue.jobs(limit=100_000, study=study, series=series, sop=original or sop):
            if job.id in seen_jobs:
                continue
            seen_jobs.add(job.id)
            if job.state == "dead":
                state, detail = "dead", job.last_error
            elif job.state == "in_flight":
                state, detail = "in flight", f"attempt {job.attempts + 1}"
            elif job.attempts and job.next_attempt_at > now:
                wait = job.next_attempt_at - now
                state = "retrying"
                detail = (f"attempt {job.attempts + 1} in {wait:.0f} s "
                          f"(at {time.strftime('%H:%M:%S', time.localtime(job.next_attempt_at))}): {job.last_error}")
            else:
                state, detail = "pending", (f"after {job.attempts} failed attempt(s): {job.last_error}"
                                            if job.attempts else "waiting for its turn")
            inst = job.instance
            found.append(Whereabout(inst.sop_instance_uid, job.destination, state, detail, inst.received_at,
                                    study_instance_uid=inst.study_instance_uid,
                                    series_instance_uid=inst.series_instance_uid))
    for entry in history:
        if entry.outcome == "delivered":
            ratio = f", {entry.ratio:.2f}:1" if entry.ratio else ""
            detail = f"as {entry.syntax} ({entry.transfer_syntax_uid}{ratio}) after {entry.attempts + 1} attempt(s)" \
                if entry.attempts else f"as {entry.syntax} ({entry.transfer_syntax_uid}{ratio})"
        elif entry.outcome == "dead":
            detail = entry.last_error
        else:
            detail = entry.last_error or ""
        found.append(Whereabout(entry.sop_instance_uid, entry.destination, entry.outcome, detail, entry.finished_at,
                                entry.sent_sop_instance_uid, entry.study_instance_uid, entry.series_instance_uid))
    return found


def summary(found: list[Whereabout]) -> str:
    """'3/3 delivered to PACS, 2/3 to ARCHIVE, 1 retrying: ...' (the latest state per instance
    and destination)."""
    if not found:
        return "nothing known of it: not received here, or its history is older than history_days"
    latest: dict[tuple[str, str], Whereabout] = {}
    for where in found:
        key = (where.sop_instance_uid, where.destination)
        if key not in latest or where.state in ("pending", "in flight", "retrying", "dead") \
                and latest[key].state in ("delivered", "skipped"):
            latest[key] = where
    instances = {uid for uid, _ in latest}
    parts = []
    for destination in sorted({d for _, d in latest if d}):
        states = Counter(w.state for (_, d), w in latest.items() if d == destination)
        total = sum(states.values())
        text = f"{states.get('delivered', 0)}/{total} delivered to {destination}"
        others = [f"{n} {state}" for state, n in sorted(states.items()) if state != "delivered"]
        parts.append(text + (f" ({', '.join(others)})" if others else ""))
    nowhere = sum(1 for (_, d) in latest if not d)
    if nowhere:
        parts.append(f"{nowhere} not forwarded (no rule sends them anywhere)")
    return f"{len(instances)} instance(s): " + "; ".join(parts)
