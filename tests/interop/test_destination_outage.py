"""Scenario 4: destinations go away in the middle of a study and come back later.

The issue speaks of a minute; the outage here is OUTAGE_S seconds to keep CI short (the
router's retry backoff in the test is capped at 2 s, so a longer outage only adds attempts).
DCMTK storescp is killed (SIGKILL) while it holds an instance it has written but not yet
acknowledged, which is how duplicates arise in the field; Orthanc is shut down normally.
The modality sends the second half of the study while both are down.
"""

from __future__ import annotations

import signal
import time

import pydicom
import pytest

from tests.interop.conftest import assert_pixels_equal, copy_as_series, storescu
from tests.support.peers import Destination, data, metric_value, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.slow]

OUTAGE_S = 12
RETRY = "{ max_attempts = 100, backoff_s = 0.5, max_backoff_s = 2 }"


def test_destinations_stopped_mid_study_get_everything_after_restart(orthanc, storescp, router_factory, tmp_path):
    # each store waits 1 s before its response, so the kill lands mid-study and mid-store
    scp = storescp("+xa", "+B", first_start=["--sleep-after", "1"])
    router = router_factory([
        Destination("ORTHANC", orthanc.dicom_port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n',
                    ae_title=orthanc.ae_title, retry=RETRY),
        Destination("STORESCP", scp.port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n',
                    ae_title=scp.ae_title, retry=RETRY),
    ])
    files = copy_as_series([data("693_UNCR.dcm"), data("US1_UNCR.dcm"), data("emri_small.dcm")],
                           tmp_path / "study", copies=8)
    files.sort(key=lambda p: p.name[-7:])  # interleave the series, as a scanner finishing them would
    originals = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    first, second = files[: len(files) // 2], files[len(files) // 2:]

    storescu(router.port, first)
    wait_until(lambda: scp.count() >= 3, 30, interval=0.1, what="storescp to store a few instances")
    wait_until(lambda: orthanc.count() >= len(first), 60, interval=0.2, what="Orthanc to store the first half")
    scp.stop(signal.SIGKILL)
    orthanc.stop(signal.SIGTERM)
    at_kill = scp.count()
    assert at_kill < len(first), f"storescp had all {at_kill} of the first half before the kill: not mid-study"

    outage_started = time.monotonic()
    storescu(router.port, second)  # the modality is not affected by the outage
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
    failures = metric_value(router.metrics(), "dicom_router_forward_failures_total", outcome="retry")
    assert failures > 0, "no retries were counted while the destinations were down"
    assert metric_value(router.metrics(), "dicom_router_forward_failures_total", outcome="dead") == 0

    scp.start()
    orthanc.start()
    wait_until(lambda: len({p.name for p in scp.files()}) >= len(files) and orthanc.count() >= len(files), 120,
               interval=0.5, what="every instance at both destinations after the restart")
    wait_until(lambda: len(scp.by_uid()) >= len(files), 60, interval=0.5, what="every distinct instance at storescp")

    received_files = scp.files()
    received = scp.by_uid()
    duplicates = len(received_files) - len(received)
    print(f"\nstorescp: {len(received_files)} files for {len(received)} instances sent once by the modality: "
          f"{duplicates} duplicate(s); {at_kill} stored before the kill, outage {OUTAGE_S} s")
    assert set(received) == set(originals), "storescp is missing instances (or got foreign ones)"
    stored = orthanc.by_uid()
    assert set(stored) == set(originals), "Orthanc is missing instances (or got foreign ones)"
    for uid, got in received.items():
        assert_pixels_equal(originals[uid], got, f"storescp {uid}")
    for uid, (_, got) in stored.items():
        assert_pixels_equal(originals[uid], got, f"Orthanc {uid}")
    # one association per destination: at most the one instance in flight when it was cut
    assert duplicates <= 1, f"{duplicates} duplicates for one outage"
    assert metric_value(router.metrics(), "dicom_router_forward_failures_total", outcome="dead") == 0
