"""Nothing is lost: a success status means the instance reaches the destination, whatever happens."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
from pydicom import dcmread

from tests.support.peers import Destination, alive, data, descendants, make_series, metric_value, send, wait_until

RULE = '[[rule]]\nname = "all"\nsyntax = "jpeg-ls-lossless"\n'
RETRY = "{ max_attempts = 100, backoff_s = 0.1, max_backoff_s = 0.5 }"


def test_kill_during_forward_loses_nothing(router_factory, pacs_factory, tmp_path):
    pacs = pacs_factory(delay=0.05)
    router = router_factory([Destination("PACS", pacs.port, RULE, retry=RETRY)])
    series = make_series(data("693_UNCR.dcm"), 40, tmp_path / "series")
    assert send(router.port, series) == [0] * len(series)
    wait_until(lambda: pacs.count() >= 5, 30, what="forwarding under way")
    children = descendants(router.proc.pid)  # receivers and codec workers
    assert len(children) >= 3
    router.kill()
    wait_until(lambda: not any(alive(pid) for pid in children), 10,
               what="no process of the killed router left behind")
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


def test_repeated_sigkill_during_a_burst_loses_nothing(router_factory, pacs, tmp_path):
    import json
    import random

    rng = random.Random(20261122)
    router = router_factory([Destination("PACS", pacs.port, RULE, retry=RETRY)])
    series = make_series(data("693_UNCR.dcm"), 300, tmp_path / "series")
    uid_of = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series}
    acknowledged: set[str] = set()
    done = threading.Event()

    def modality() -> None:
        # like a scanner: sends in associations of 20, and sends again whatever did not get a success
        todo = list(series)
        deadline = time.monotonic() + 240
        while todo and time.monotonic() < deadline:
            chunk, todo = todo[:20], todo[20:]
            statuses = send(router.port, chunk)
            for path, status in zip(chunk, statuses):
                if status == 0:
                    acknowledged.add(uid_of[path])
                else:
                    todo.append(path)
            if -1 in statuses:
                time.sleep(0.2)
        done.set()

    sender = threading.Thread(target=modality)
    sender.start()
    kills = 0
    while kills < 12 or not done.is_set():
        time.sleep(rng.uniform(0.2, 1.5))
        if kills >= 12:
            continue
        router.kill()
        kills += 1
        router.start()
    sender.join(10)
    assert acknowledged == set(uid_of.values()), "the modality could not deliver everything in time"
    wait_until(lambda: acknowledged <= set(pacs.by_uid()), 120, what="every acknowledged instance")
    counts = collections.Counter(r.sop_instance_uid for r in pacs.received)
    duplicates = sum(n - 1 for n in counts.values())
    original = dcmread(series[0]).pixel_array
    for received in list(pacs.by_uid().values())[::29]:
        assert np.array_equal(received.dataset().pixel_array, original)
    wait_until(lambda: not list((router.spool / "instances").iterdir()), 20, what="spool emptied")
    recoveries = [json.loads(line) for line in router.log().splitlines() if '"event": "recovered"' in line]
    assert len(recoveries) == kills + 1
    assert sum(r["missing_files"] for r in recoveries) == 0  # no job ever lost its file
    print(f"{len(series)} instances, {kills} SIGKILLs, {len(acknowledged)} acknowledged, all delivered; "
          f"{duplicates} duplicate deliveries; {sum(r['orphan_files_removed'] for r in recoveries)} unacknowledged "
          f"partial files cleaned up; {sum(r['resumed_in_flight'] for r in recoveries)} in-flight jobs resumed")
