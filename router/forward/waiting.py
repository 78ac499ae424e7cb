"""Why a destination is not sending now, and when it next sends: what `dicom-router queue`,
`dicom-router explain` and the held-jobs gauge say.

Reasons, one name each everywhere (CLI, metrics, README):
    window        outside every window of `schedule`
    delay         instances younger than `delay`
    study_stable  studies that received an instance less than `study_stable` ago (for at most
                  `study_stable_max` after their first instance still to go)
    throttled     due jobs going out at `max_mbps`
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from router.config import Destination
from router.queue import Holding, Queue
from router.request import Reason

WINDOW, DELAY, STUDY_STABLE, THROTTLED = (r.value for r in (Reason.WINDOW, Reason.DELAY, Reason.STUDY_STABLE,
                                                          Reason.THROTTLED))


def holding_of(destination: Destination) -> Holding:
    """What holds the destination's jobs, from its rule file."""
    return Holding(destination.delay_s, destination.study_stable_s, destination.study_stable_max_s)


def _duration(seconds: float) -> str:
    """3600 -> '1h', 5400 -> '90m', 45 -> '45s': the largest unit that says it exactly."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _stable_max(destination: Destination) -> str:
    """study_stable_max as the rule file says it, or its default as a duration ('2h')."""
    return destination.study_stable_max or _duration(destination.study_stable_max_s)


@dataclass(frozen=True)
class Waiting:
    """A destination's pending jobs held back, by reason, and when the next one is due to go
    (epoch seconds; None when nothing is pending or no window ever opens)."""

    held: dict[str, int] = field(default_factory=dict)
    next_send: float | None = None
    capped: bool = False  # due jobs going out at max_mbps
    study_stable_max: str = ""  # how long a study waits at most, said with the jobs held for it

    def describe(self, now: float) -> str:
        parts = [f"{n} {_SAID[reason]}" + (f" (at most {self.study_stable_max} after its first instance)"
                                          if reason == STUDY_STABLE and self.study_stable_max else "")
                 for reason, n in self.held.items() if n]
        if self.next_send is not None and self.next_send > now:
            parts.append("next sends " + time.strftime("%Y-%m-%d %H:%M", time.localtime(self.next_send)))
        return "; ".join(parts) or "-"


_SAID = {WINDOW: "waiting for a window", DELAY: "held by delay", STUDY_STABLE: "waiting for a stable study",
         THROTTLED: "throttled (going out at max_mbps)"}


def waiting(name: str, destination: Destination, queue: Queue, now: float | None = None) -> Waiting:
    """What holds destination `name`'s pending jobs at `now`."""
    now = time.time() if now is None else now
    holding = holding_of(destination)
    due = queue.next_due(name, holding)
    if due is None:
        return Waiting()
    schedule = destination.sending_schedule
    next_send = schedule.next_open(max(now, due))
    if not schedule.is_open(now):
        pending = queue.counts().get((name, "pending"), 0)
        return Waiting({WINDOW: pending} if pending else {}, next_send)
    held = queue.held(name, now, holding)
    capped = destination.max_mbps > 0 and due <= now
    if capped:
        held[THROTTLED] = queue.due_count(name, now, holding)
    return Waiting(held, next_send, capped,
                   _stable_max(destination) if destination.study_stable_s > 0 else "")


def pacing(destination: Destination) -> str:
    """When and how fast the destination sends, in one line ("" when at once, at full speed)."""
    parts = []
    if not destination.sending_schedule.always:
        parts.append(f"sends in {destination.sending_schedule.describe()}")
    if destination.max_mbps > 0:
        parts.append(f"at most {destination.max_mbps:g} Mbps")
    if destination.delay_s > 0:
        parts.append(f"delay {destination.delay}")
    if destination.study_stable_s > 0:
        default = "" if destination.study_stable_max is not None else " (default)"
        parts.append(f"study_stable {destination.study_stable}, study_stable_max {_stable_max(destination)}{default}")
    return ", ".join(parts)


def when(destination: Destination, received_at: float, study_last_received: float | None = None,
         study_first_received: float | None = None) -> tuple[float, str]:
    """When an instance received at `received_at` would be sent, and why then (a new instance:
    no retries), given the last and first receipt of its study still to go (study_stable,
    study_stable_max)."""
    due, why = received_at, []
    if destination.delay_s > 0:
        due = received_at + destination.delay_s
        why.append(f"delay {destination.delay}")
    if destination.study_stable_s > 0:
        last = max(received_at, study_last_received or received_at)
        first = min(received_at, study_first_received or received_at)
        due = max(due, min(last + destination.study_stable_s, first + destination.study_stable_max_s))
        why.append(f"study_stable {destination.study_stable} after the study's last instance, at most "
                   f"study_stable_max {_stable_max(destination)} after its first")
    schedule = destination.sending_schedule
    opens = schedule.next_open(due)
    if opens is None:
        return float("inf"), "no window of the schedule ever opens"
    if opens > due:
        why.append(f"next window of {schedule.describe()}")
    if destination.max_mbps > 0:
        why.append(f"at most {destination.max_mbps:g} Mbps")
    return opens, ", ".join(why) or "at once"
