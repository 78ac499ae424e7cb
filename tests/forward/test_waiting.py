"""What holds a destination and when it next sends, as `dicom-router queue`, `dicom-router
explain` and the held-jobs gauge say it; the bytes of each link as received and as sent."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from router import metrics
from router.operate import cli
from router.config import Destination
from router.queue import Instance, NewJob
from router.queue.sqlite import SqliteQueue
from router.request import Request
from router.forward.waiting import waiting, when
from tests.support.peers import data, wait_until
from tests.forward.test_forwarder import Site
from tests.forward.test_scheduling import brussels

CT = data("693_UNCR.dcm")


def destination(**options) -> Destination:  # noqa: ANN003
    return Destination(ae_title="PACS", host="127.0.0.1", port=104, **options)


def add(queue: SqliteQueue, uid: str, received_at: float, study: str = "2.25.9") -> None:
    queue.add(Instance(path=f"/spool/{uid}.dcm", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=uid,
                       study_instance_uid=study, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="CT1",
                       called_ae="ROUTER", source_ip="::1", size=1000, received_at=received_at),
              [NewJob("PACS", Request(syntax="original"), "t")])


@pytest.fixture
def queue(tmp_path):
    q = SqliteQueue(tmp_path / "spool" / "queue.sqlite")
    yield q
    q.close()


def test_outside_a_window_every_pending_job_waits_for_it_and_the_next_send_is_its_opening(queue):
    add(queue, "2.25.1", time.time())
    closed = brussels("2027-06-08 12:00")
    nights = destination(schedule=["Mon-Fri 19:00-07:00"], timezone="Europe/Brussels")
    found = waiting("PACS", nights, queue, closed)
    assert found.held == {"window": 1} and found.next_send == brussels("2027-06-08 19:00")
    assert "1 waiting for a window" in found.describe(closed)


def test_delay_study_stable_and_the_cap_are_told_apart(queue):
    t0 = time.time()
    add(queue, "2.25.1", t0)
    add(queue, "2.25.2", t0 - 7200, study="2.25.8")
    add(queue, "2.25.3", t0 - 7200, study="2.25.7")
    add(queue, "2.25.4", t0 - 300, study="2.25.7")
    t0 = time.time() + 1  # after the jobs were queued
    found = waiting("PACS", destination(delay="1h", study_stable="10m", study_stable_max="3h", max_mbps=5), queue, t0)
    assert found.held == {"delay": 2, "study_stable": 1, "throttled": 1}
    assert found.capped and found.next_send == t0
    quiet = waiting("PACS", destination(delay="3h"), queue, t0)
    assert quiet.held == {"delay": 4} and quiet.next_send == pytest.approx(t0 - 7200 + 3 * 3600, abs=1.5)
    assert "held by delay" in quiet.describe(t0) and "next sends" in quiet.describe(t0)
    assert waiting("PACS", destination(), queue, t0).held == {}


def test_when_an_instance_would_be_sent_and_why():
    received = brussels("2027-06-08 12:00")
    archive = destination(schedule=["Mon-Fri 20:00-06:00"], timezone="Europe/Brussels", study_stable="30m",
                          max_mbps=20)
    at, why = when(archive, received)
    assert at == brussels("2027-06-08 20:00")
    assert "study_stable 30m" in why and "next window of Mon-Fri 20:00-06:00 (Europe/Brussels)" in why
    assert "20 Mbps" in why
    assert when(destination(delay="30m"), received) == (received + 1800, "delay 30m")
    assert when(destination(), received) == (received, "at once")


def test_a_study_waits_at_most_study_stable_max_after_its_first_instance():
    received = brussels("2027-06-08 12:00")
    bounded = destination(study_stable="10m", study_stable_max="30m")
    at, why = when(bounded, received, study_last_received=received, study_first_received=received - 1500)
    assert at == received - 1500 + 1800  # still receiving, but the study's first came 25 minutes ago
    assert why == "study_stable 10m after the study's last instance, at most study_stable_max 30m after its first"
    assert when(bounded, received) == (received + 600, why)
    default = destination(study_stable="30m")
    assert default.study_stable_max_s == 4 * 1800
    assert destination(study_stable="2m").study_stable_max_s == 3600  # at least an hour
    assert when(default, received, study_first_received=received - 7200)[0] == received


def write_config(tmp_path, destination_extra: str):  # noqa: ANN001, ANN201
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "PACS.toml").write_text(
        f'[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n{destination_extra}'
        '[[rule]]\nname = "all"\nsyntax = "original"\npriority = "high"\n')
    cfg = tmp_path / "router.toml"
    cfg.write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n[metrics]\nport = 0\n')
    return cfg


def closed_window_now() -> str:
    hour = datetime.now(timezone.utc).hour
    return f'schedule = ["{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"]\ntimezone = "UTC"\n'


def test_queue_shows_what_holds_each_destination_and_when_it_next_sends(tmp_path, queue, capsys):
    cfg = write_config(tmp_path, closed_window_now())
    add(queue, "2.25.1", time.time())
    assert cli.main(["queue", "--config", str(cfg)]) == 0
    line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("PACS")][0]
    assert "1 waiting for a window" in line and "next sends" in line
    cfg = write_config(tmp_path, 'delay = "2h"\n')
    assert cli.main(["queue", "--config", str(cfg)]) == 0
    assert "1 held by delay" in capsys.readouterr().out


def test_queue_and_explain_say_how_long_a_study_waits_at_most(tmp_path, queue, capsys):
    add(queue, "2.25.1", time.time())
    cfg = write_config(tmp_path, 'study_stable = "10m"\n')
    assert cli.main(["queue", "--config", str(cfg)]) == 0
    line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("PACS")][0]
    assert "1 waiting for a stable study (at most 1h after its first instance)" in line and "next sends" in line
    cfg = write_config(tmp_path, 'study_stable = "10m"\nstudy_stable_max = "45m"\n')
    assert cli.main(["queue", "--config", str(cfg)]) == 0
    assert "1 waiting for a stable study (at most 45m after its first instance)" in capsys.readouterr().out
    assert cli.main(["explain", "--config", str(cfg), str(CT)]) == 0
    assert ("if received now (study_stable 10m after the study's last instance, at most study_stable_max 45m "
            "after its first)") in capsys.readouterr().out
    assert cli.main(["check", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("study_stable 10m, study_stable_max 45m")


def test_check_refuses_a_study_stable_max_below_study_stable(tmp_path, capsys):
    cfg = write_config(tmp_path, 'study_stable = "10m"\nstudy_stable_max = "5m"\n')
    assert cli.main(["check", "--config", str(cfg)]) == 2
    assert ("PACS.toml: field destination.study_stable_max: study_stable_max (5m) must be at least study_stable "
            "(10m)") in capsys.readouterr().err


def test_explain_says_when_a_file_would_be_sent_and_why(tmp_path, capsys):
    cfg = write_config(tmp_path, closed_window_now() + 'delay = "30m"\n')
    assert cli.main(["explain", "--config", str(cfg), str(CT)]) == 0
    out = capsys.readouterr().out
    assert "PACS: original" in out and "if received now (delay 30m, next window of" in out
    assert "priority high" in out
    cfg = write_config(tmp_path, "")
    assert cli.main(["explain", "--config", str(cfg), str(CT)]) == 0
    assert "sent now if received now (at once)" in capsys.readouterr().out


def test_the_held_jobs_gauge_is_read_at_scrape_time():
    registry = CollectorRegistry()
    held = {("PACS", "window"): 3}
    registry.register(metrics.StateCollector(dict, dict, lambda: 0, lambda: ["PACS", "ARCHIVE"],
                                             held=lambda: dict(held)))
    text = generate_latest(registry).decode()
    assert 'dicom_router_held_jobs{destination="PACS",reason="window"} 3.0' in text
    assert 'dicom_router_held_jobs{destination="ARCHIVE",reason="throttled"} 0.0' in text
    held[("PACS", "window")] = 0
    assert 'dicom_router_held_jobs{destination="PACS",reason="window"} 0.0' in generate_latest(registry).decode()


def test_each_link_counts_its_bytes_as_received_and_as_sent(tmp_path, codec_pool, pacs):  # noqa: F811
    def value(metric, **labels) -> float:  # noqa: ANN001, ANN003
        return sum(s.value for f in metric.collect() for s in f.samples
                   if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()))

    before_received = value(metrics.FORWARDED_BYTES_AS_RECEIVED, destination="PACS")
    before_sent = value(metrics.FORWARDED_BYTES, destination="PACS")
    s = Site(tmp_path / "site", codec_pool, pacs.port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n')
    s.receive([CT])
    s.forwarder.start()
    try:
        wait_until(lambda: s.queue.counts() == {} and pacs.count() == 1, 30, what="delivery")
    finally:
        s.stop()
    as_received = value(metrics.FORWARDED_BYTES_AS_RECEIVED, destination="PACS") - before_received
    as_sent = value(metrics.FORWARDED_BYTES, destination="PACS") - before_sent
    assert as_received == CT.stat().st_size
    assert 0 < as_sent < as_received / 1.5


def test_check_says_when_and_how_fast_each_destination_sends():
    import subprocess
    import sys

    from tests.support.peers import REPO

    result = subprocess.run([sys.executable, "-m", "router", "check", "--config", str(REPO / "router.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    archive = [line for line in result.stdout.splitlines() if "destination ARCHIVE" in line][0]
    assert archive.endswith("; sends in Mon-Fri 20:00-06:00, Sat-Sun (Europe/Brussels), at most 20 Mbps, "
                            "study_stable 30m, study_stable_max 2h")
    pacs = [line for line in result.stdout.splitlines() if "destination PACS" in line][0]
    assert pacs.endswith("3 rule(s)")
