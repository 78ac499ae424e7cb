"""Sending windows, durations and the time zone they are read in (`router.schedule`)."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from router.operate.cli import parse_duration as cli_duration
from router.schedule import Schedule, parse_days, parse_duration, parse_window
from tests.operate.test_check import DEST, write

BRUSSELS = ZoneInfo("Europe/Brussels")


def at(text: str, zone=BRUSSELS) -> float:  # noqa: ANN001
    """'2026-03-27 18:59' on the wall clock of `zone` -> epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=zone).timestamp()


def wall(t: float, zone=BRUSSELS) -> str:  # noqa: ANN001
    return datetime.fromtimestamp(t, zone).strftime("%a %Y-%m-%d %H:%M %Z")


NIGHTS_AND_WEEKEND = Schedule.parse(["Mon-Fri 19:00-07:00", "Sat-Sun"], "Europe/Brussels")


def test_durations_as_written_in_rule_files_and_on_the_command_line():
    assert parse_duration("0s") == 0 and parse_duration("30m") == 1800 and parse_duration("14d") == 14 * 86400
    assert parse_duration("90") == 90 and parse_duration(" 1.5h ") == 5400
    for bad in ("soon", "-5m", "5w", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert cli_duration("12h") == 43200  # the same rules for `queue purge --older-than`


def test_days_ranges_lists_and_a_range_over_the_weekend():
    assert parse_days("Mon-Fri") == {0, 1, 2, 3, 4}
    assert parse_days("Sat-Sun") == {5, 6}
    assert parse_days("Mon,Wed") == {0, 2}
    assert parse_days("Fri-Mon") == {4, 5, 6, 0}
    assert parse_days("mon, Thu-Fri") == {0, 3, 4}


@pytest.mark.parametrize("text, words", [
    ("Mon-Fry 19:00-07:00", "days are Mon"),
    ("19:00-07", "not a window"),
    ("25:00-07:00", "not a time of day"),
    ("19:60-20:00", "not a time of day"),
    ("08:00-08:00", "the days alone"),
])
def test_a_window_that_cannot_be_read_says_why(text, words):
    with pytest.raises(ValueError, match=words):
        parse_window(text)


def test_a_window_without_days_holds_every_day():
    lunch = Schedule.parse(["12:00-13:00"], "UTC")
    for day in range(1, 8):  # 2026-06-01 is a Monday
        assert lunch.is_open(at(f"2026-06-0{day} 12:30", ZoneInfo("UTC")))
        assert not lunch.is_open(at(f"2026-06-0{day} 13:00", ZoneInfo("UTC")))


def test_a_night_window_belongs_to_the_day_it_starts_on():
    s = NIGHTS_AND_WEEKEND
    assert not s.is_open(at("2026-06-01 18:59"))  # Monday evening
    assert s.is_open(at("2026-06-01 19:00"))
    assert s.is_open(at("2026-06-02 06:59"))  # Tuesday morning: Monday night's window
    assert not s.is_open(at("2026-06-02 07:00"))
    assert s.is_open(at("2026-06-06 06:30"))  # Saturday morning: Friday night's, then Saturday's
    assert s.is_open(at("2026-06-07 23:59"))  # Sunday, all day
    assert s.is_open(at("2026-06-08 03:00")) is False  # Monday 03:00: Sunday has no night window
    friday_only = Schedule.parse(["Fri 22:00-06:00"], "Europe/Brussels")
    assert friday_only.is_open(at("2026-06-06 05:59")) and not friday_only.is_open(at("2026-06-05 05:59"))


def test_next_open_is_when_the_next_window_starts():
    s = NIGHTS_AND_WEEKEND
    assert s.next_open(at("2026-06-01 12:00")) == at("2026-06-01 19:00")
    assert s.next_open(at("2026-06-02 07:00")) == at("2026-06-02 19:00")
    assert s.next_open(at("2026-06-01 20:00")) == at("2026-06-01 20:00")  # open now
    weekend = Schedule.parse(["Sat-Sun"], "Europe/Brussels")
    assert wall(weekend.next_open(at("2026-06-01 09:00"))) == "Sat 2026-06-06 00:00 CEST"
    assert Schedule.parse([], None).next_open(12345.0) == 12345.0


def test_windows_keep_to_the_wall_clock_across_dst_changes():
    night = Schedule.parse(["01:00-05:00"], "Europe/Brussels")
    # 2026-03-29: the clocks go from 02:00 to 03:00; the window opens at 01:00 CET, closes 05:00 CEST
    spring_open, spring_close = at("2026-03-29 01:00"), at("2026-03-29 05:00")
    assert spring_close - spring_open == 3 * 3600
    assert night.is_open(spring_close - 60) and not night.is_open(spring_close)
    assert night.next_open(at("2026-03-28 12:00")) == spring_open
    # 2026-10-25: the clocks go from 03:00 back to 02:00; the window lasts five hours
    autumn_open = at("2026-10-25 01:00")
    autumn_close = datetime(2026, 10, 25, 5, 0, tzinfo=BRUSSELS).timestamp()
    assert autumn_close - autumn_open == 5 * 3600
    assert all(night.is_open(autumn_open + m * 60) for m in range(0, 5 * 60, 7))
    assert not night.is_open(autumn_close)


def test_a_start_time_the_clocks_skip_opens_when_they_jump_past_it():
    skipped = Schedule.parse(["02:30-04:00"], "Europe/Brussels")
    opens = skipped.next_open(at("2026-03-29 00:00"))
    assert wall(opens) == "Sun 2026-03-29 03:00 CEST"
    assert skipped.is_open(opens) and not skipped.is_open(opens - 1)


def test_without_a_timezone_windows_are_in_the_machines_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        evening = Schedule.parse(["Mon-Fri 19:00-07:00"])
        new_york = ZoneInfo("America/New_York")
        assert evening.is_open(at("2026-06-01 19:30", new_york))
        assert not evening.is_open(at("2026-06-01 18:30", new_york))
        assert evening.next_open(at("2026-06-01 12:00", new_york)) == at("2026-06-01 19:00", new_york)
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("extra, expected", [
    ('schedule = ["Mon-Fri 19:00-7"]\n', ["PACS.toml", "field destination.schedule", "not a window"]),
    ('schedule = ["Mon-Fry"]\n', ["field destination.schedule", "days are Mon"]),
    ('timezone = "Europe/Brusels"\n', ["field destination.timezone", "not a known time zone"]),
    ('delay = "half an hour"\n', ["field destination.delay", "not a duration"]),
    ('study_stable = "-5m"\n', ["field destination.study_stable", "negative"]),
    ("max_mbps = -1\n", ["field destination.max_mbps", "greater than or equal to 0"]),
])
def test_check_names_the_scheduling_field_that_is_wrong(tmp_path, extra, expected):
    cfg = write(tmp_path, DEST + extra + '[[rule]]\nsyntax = "original"\n')
    result = subprocess.run([sys.executable, "-m", "router", "check", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    for fragment in expected:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_check_names_a_rule_priority_that_is_not_one_of_the_three(tmp_path):
    cfg = write(tmp_path, DEST + '[[rule]]\nname = "er"\nsyntax = "original"\npriority = "urgent"\n')
    result = subprocess.run([sys.executable, "-m", "router", "check", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "rule 1 ('er'), field priority" in result.stderr and "'high'" in result.stderr
