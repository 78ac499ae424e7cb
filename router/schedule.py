"""When a destination may send: windows, durations and the per-destination schedule.

A window is `[DAYS ]HH:MM-HH:MM` or `DAYS` alone. Days are `Mon`..`Sun`, ranges (`Mon-Fri`,
`Fri-Mon` wraps) and lists (`Mon,Wed,Sat-Sun`); a window without days holds every day; an end
before the start crosses midnight and belongs to the day it starts on (`Fri 22:00-06:00` is
Friday night into Saturday morning). Windows are read on the wall clock of the destination's
`timezone` (the machine's local time without one), so across a DST change a window opens and
closes at the wall-clock times written: `01:00-05:00` lasts three hours on the night the clocks
go forward and five on the night they go back.

Every function takes the time as an argument: nothing here reads the clock.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TIME = r"(\d{1,2}):(\d{2})"
_WINDOW = re.compile(rf"^\s*(?:(?P<days>[A-Za-z][A-Za-z,\- ]*?)\s+)?(?P<start>{_TIME})\s*-\s*(?P<end>{_TIME})\s*$")
_DAY_LOOKAHEAD = 9  # a week, plus a window crossing midnight, plus a day of DST slack


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '14d' (or plain seconds) -> seconds. Raises ValueError otherwise."""
    cleaned = str(text).strip().lower()
    try:
        if cleaned and cleaned[-1] in _UNITS:
            value = float(cleaned[:-1]) * _UNITS[cleaned[-1]]
        else:
            value = float(cleaned)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 12h or 7d") from None
    if value < 0 or value != value:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return value


def parse_days(text: str) -> frozenset[int]:
    """'Mon-Fri' / 'Sat-Sun' / 'Mon,Wed' -> weekday numbers (Monday 0). Raises ValueError."""
    days: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        ends = [e.strip().lower()[:3] for e in part.split("-")]
        if not part or len(ends) > 2 or any(e not in DAY_NAMES for e in ends):
            raise ValueError(f"{text!r}: days are Mon, Tue, Wed, Thu, Fri, Sat, Sun, ranges like Mon-Fri "
                             "and lists like Mon,Wed")
        first, last = DAY_NAMES.index(ends[0]), DAY_NAMES.index(ends[-1])
        day = first
        while True:  # Fri-Mon wraps over the weekend
            days.add(day)
            if day == last:
                break
            day = (day + 1) % 7
    return frozenset(days)


def _minutes(hours: str, minutes: str, text: str, end: bool) -> int:
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > (24 * 60 if end else 24 * 60 - 1):
        raise ValueError(f"{text!r}: {hours}:{minutes} is not a time of day (00:00-23:59, 24:00 as an end)")
    return value


@dataclass(frozen=True)
class Window:
    """One window: on `days` (None: every day), from `start` to `end` minutes after midnight;
    `end` <= `start` crosses midnight into the next day."""

    days: frozenset[int] | None
    start: int = 0
    end: int = 24 * 60
    text: str = ""

    def holds(self, weekday: int, minute: int) -> bool:
        """Whether the window holds at `minute` past midnight of a day that is `weekday`."""
        def on(day: int) -> bool:
            return self.days is None or day in self.days
        if self.start < self.end:
            return on(weekday) and self.start <= minute < self.end
        return (on(weekday) and minute >= self.start) or (on((weekday - 1) % 7) and minute < self.end)


def parse_window(text: str) -> Window:
    """`[DAYS ]HH:MM-HH:MM` or `DAYS` alone -> Window. Raises ValueError saying what is wrong."""
    found = _WINDOW.match(text)
    if found is None:
        if re.search(r"\d", text):
            raise ValueError(f"{text!r} is not a window: write 'HH:MM-HH:MM', 'Mon-Fri HH:MM-HH:MM' or days "
                             "alone ('Sat-Sun')")
        return Window(parse_days(text), text=text)
    days = parse_days(found["days"]) if found["days"] else None
    start = _minutes(found.group(3), found.group(4), text, end=False)
    end = _minutes(found.group(6), found.group(7), text, end=True)
    if start == end:
        raise ValueError(f"{text!r}: start and end are the same time; for whole days write the days alone "
                         "('Mon-Fri')")
    return Window(days, start, end, text)


def parse_timezone(name: str) -> tzinfo:
    """An IANA time zone name ('Europe/Brussels') -> tzinfo. Raises ValueError."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a known time zone (an IANA name like 'Europe/Brussels' or 'UTC')") from None


@dataclass(frozen=True)
class Schedule:
    """The windows of one destination; no windows: always open. `zone` None: local time."""

    windows: tuple[Window, ...] = ()
    zone: tzinfo | None = None

    @classmethod
    def parse(cls, windows: list[str] | None, timezone: str | None = None) -> Schedule:
        zone = parse_timezone(timezone) if timezone else None
        return cls(tuple(parse_window(w) for w in windows or ()), zone)

    @property
    def always(self) -> bool:
        return not self.windows

    def is_open(self, t: float) -> bool:
        """Whether sending may happen at epoch time `t`."""
        if self.always:
            return True
        local = datetime.fromtimestamp(t, self.zone)
        minute = local.hour * 60 + local.minute
        return any(w.holds(local.weekday(), minute) for w in self.windows)

    def next_open(self, t: float) -> float | None:
        """The earliest epoch time >= `t` at which the schedule is open (`t` itself when open);
        None when no window ever holds."""
        if self.is_open(t):
            return t
        day = datetime.fromtimestamp(t, self.zone).date()
        candidates = []
        for offset in range(-1, _DAY_LOOKAHEAD):
            date = day + timedelta(days=offset)
            for window in self.windows:
                hour, minute = divmod(window.start, 60)
                at = datetime(date.year, date.month, date.day, hour, minute, tzinfo=self.zone).timestamp()
                if at > t and self.is_open(at):
                    candidates.append(at)
        if not candidates:
            return None
        # a start time the clocks skipped (DST): the window opened when they jumped past it
        opens = min(candidates)
        while opens - 60 > t and self.is_open(opens - 60):
            opens -= 60
        return opens

    def describe(self) -> str:
        if self.always:
            return "always"
        zone = getattr(self.zone, "key", None) or "local time"
        return ", ".join(w.text for w in self.windows) + f" ({zone})"


@functools.lru_cache(maxsize=256)
def schedule_for(windows: tuple[str, ...], timezone: str | None = None) -> Schedule:
    """`Schedule.parse`, parsed once per distinct rule file content."""
    return Schedule.parse(list(windows), timezone)
