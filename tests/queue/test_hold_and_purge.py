"""An operator holds a destination for its maintenance window and drops dead letters on
purpose: `dicom-router pause/resume DEST` and `dicom-router queue purge --dead --yes`."""

from __future__ import annotations

import time

from tests.support.peers import Destination, data, make_series, metric_value, send, wait_until

ORIGINAL = '[[rule]]\nsyntax = "original"\n'


def test_a_paused_destination_keeps_receiving_sends_nothing_and_stays_paused_across_a_restart(
        router_factory, pacs, tmp_path):
    router = router_factory([Destination("PACS", pacs.port, ORIGINAL)])
    result = router.cli("pause", "PACS")
    assert result.returncode == 0 and "PACS: paused" in result.stdout
    series = make_series(data("MR2_UNCR.dcm"), 3, tmp_path / "series")
    assert send(router.port, series) == [0, 0, 0]
    wait_until(lambda: metric_value(router.metrics(), "dicom_router_queue_jobs", destination="PACS",
                                    state="pending") == 3, 10, what="three jobs queued")
    time.sleep(2)  # a forwarder that ignored the hold would have sent them by now
    assert pacs.count() == 0
    assert metric_value(router.metrics(), "dicom_router_destination_paused", destination="PACS") == 1
    assert "paused since" in router.cli("queue").stdout

    router.terminate()
    router.start()
    time.sleep(2)
    assert pacs.count() == 0, "the hold did not survive the restart"

    result = router.cli("resume", "PACS")
    assert result.returncode == 0 and "PACS: resumed" in result.stdout
    wait_until(lambda: pacs.count() == 3, 30, what="the held instances after resume")
    assert metric_value(router.metrics(), "dicom_router_destination_paused", destination="PACS") == 0


def test_pause_names_an_unknown_destination(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, ORIGINAL)])
    result = router.cli("pause", "PAC")
    assert result.returncode == 2 and "no destination 'PAC' (known: PACS)" in result.stderr


def test_dead_letters_are_dropped_only_when_asked_with_yes(router_factory, pacs_factory):
    refusing = pacs_factory(status=0xC000)
    router = router_factory([Destination("PACS", refusing.port, ORIGINAL)])
    assert send(router.port, [data("693_UNCR.dcm")]) == [0]

    def dead() -> float:
        return metric_value(router.metrics(), "dicom_router_queue_jobs", destination="PACS", state="dead")

    wait_until(lambda: dead() == 1, 20, what="a dead letter")
    kept = router.cli("queue", "purge", "--dead")
    assert kept.returncode == 1 and "--yes" in kept.stderr and dead() == 1
    young = router.cli("queue", "purge", "--dead", "--older-than", "1h", "--yes")
    assert young.returncode == 0 and "0 dead letter(s) dropped" in young.stdout and dead() == 1
    dropped = router.cli("queue", "purge", "--dead", "--destination", "PACS", "--yes")
    assert dropped.returncode == 0 and "1 dead letter(s) dropped" in dropped.stdout
    assert dead() == 0
    assert list((router.spool / "instances").iterdir()) == []
    assert metric_value(router.metrics(), "dicom_router_purged_total", destination="PACS") == 1
