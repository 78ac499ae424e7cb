"""Nothing is lost: a success status means the instance reaches the destination, whatever happens."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
from pydicom import dcmread

from tests.peers import Destination, data, make_series, metric_value, send, wait_until

RULE = '[[rule]]\nname = "all"\nsyntax = "jpeg-ls-lossless"\n'
RETRY = "{ max_attempts = 100, backoff_s = 0.1, max_backoff_s = 0.5 }"


def test_kill_during_forward_loses_nothing(router_factory, pacs_factory, tmp_path):
    pacs = pacs_factory(delay=0.05)
    router = router_factory([Destination("PACS", pacs.port, RULE, retry=RETRY)])
    series = make_series(data("693_UNCR.dcm"), 40, tmp_path / "series")
    assert send(router.port, series) == [0] * len(series)
    wait_until(lambda: pacs.count() >= 5, 30, what="forwarding under way")
    router.kill()
    delivered_before_restart = pacs.count()
    assert delivered_before_restart < len(series), "the kill came too late to test anything"
    router.start()
    wait_until(lambda: len(pacs.by_uid()) == len(series), 60, what=f"every instance\n{router.log()}")
    counts = collections.Counter(r.sop_instance_uid for r in pacs.received)
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= 2 * 32  # at most the batches in flight when the process died
    original = dcmread(series[0]).pixel_array
    for received in list(pacs.by_uid().values())[::7]:
        assert np.array_equal(received.dataset().pixel_array, original)
    wait_until(lambda: not list((router.spool / "instances").iterdir()), 10, what="spool emptied")
    assert metric_value(router.metrics(), "dicom_router_queue_jobs", destination="PACS") == 0
    print(f"delivered {len(series)} after SIGKILL with {duplicates} duplicate(s)")


def test_kill_while_receiving_keeps_every_acknowledged_instance(router_factory, pacs, tmp_path):
    router = router_factory([Destination("PACS", pacs.port, RULE, retry=RETRY)])
    series = make_series(data("MR2_UNCR.dcm"), 30, tmp_path / "series")
    statuses: list[int] = []
    sender = threading.Thread(target=lambda: statuses.extend(send(router.port, series)))
    sender.start()
    wait_until(lambda: pacs.count() >= 3 or len(list((router.spool / "instances").iterdir())) >= 3, 30,
               what="reception under way")
    router.kill()
    sender.join(60)
    acknowledged = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p, s in zip(series, statuses) if s == 0}
    assert 0 < len(acknowledged) < len(series), statuses
    router.start()
    wait_until(lambda: acknowledged <= set(pacs.by_uid()), 60, what=f"acknowledged instances\n{router.log()}")


def test_sigterm_drains_and_restart_resumes(router_factory, pacs_factory, tmp_path):
    pacs = pacs_factory(delay=0.1)
    router = router_factory([Destination("PACS", pacs.port, RULE, retry=RETRY)])
    series = make_series(data("693_UNCR.dcm"), 30, tmp_path / "series")
    assert send(router.port, series) == [0] * len(series)
    wait_until(lambda: pacs.count() >= 2, 30, what="forwarding under way")
    started = time.monotonic()
    assert router.terminate(timeout=30) == 0
    assert time.monotonic() - started < 25
    assert '"event": "stopped"' in router.log()
    assert pacs.count() < len(series)
    router.start()
    wait_until(lambda: len(pacs.by_uid()) == len(series), 60, what="resumed delivery")
