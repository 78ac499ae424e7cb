"""The bandwidth cap (`max_mbps`): the token bucket, its hold on pynetdicom's sends, and a
destination whose associations share it."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom import dcmread
from pynetdicom import AE

from router.compat.pynetdicom import throttle_sends
from router.forward.throttle import CHUNK, TokenBucket, bytes_per_second
from tests.support.peers import data, make_series, wait_until
from tests.forward.test_forwarder import Site

CT = data("693_UNCR.dcm")


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_megabits_are_as_links_are_sold():
    assert bytes_per_second(8) == 1_000_000 and bytes_per_second(5) == 625_000


def test_the_bucket_never_lets_more_than_a_burst_above_the_rate():
    fake = FakeTime()
    bucket = TokenBucket(100_000, burst=CHUNK, clock=fake.clock, sleep=fake.sleep)
    sent: list[tuple[float, int]] = []
    start = fake.now
    for size in [CHUNK] * 40 + [1000] * 50 + [CHUNK] * 10:
        bucket.take(size)
        sent.append((fake.now, size))
    total = sum(size for _, size in sent)
    assert fake.now - start == pytest.approx((total - CHUNK) / 100_000)
    for i, (t_i, _) in enumerate(sent):  # in every interval, at most burst + rate x its length
        for t_j, _ in sent[i:]:
            in_window = sum(size for t, size in sent if t_i <= t <= t_j)
            assert in_window <= CHUNK + 100_000 * (t_j - t_i) + 1000 + 1e-6


def test_an_idle_bucket_saves_no_more_than_one_burst():
    fake = FakeTime()
    bucket = TokenBucket(10_000, burst=CHUNK, clock=fake.clock, sleep=fake.sleep)
    fake.now += 3600
    assert bucket.take(CHUNK) == 0
    assert bucket.take(10_000) == pytest.approx(1.0)


def test_no_cap_never_waits():
    bucket = TokenBucket(0)
    assert all(bucket.take(10**9) == 0 for _ in range(3))


def test_threads_share_the_rate():
    bucket = TokenBucket(400_000)
    started = time.monotonic()

    def send() -> None:
        for _ in range(25):
            bucket.take(CHUNK)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started >= (50 * CHUNK - CHUNK) / 400_000 * 0.95


def test_every_byte_pynetdicom_sends_passes_the_cap(pacs):
    """pynetdicom's DUL writes its PDUs with AssociationSocket.send: if it stopped, the cap would
    not hold and this fails."""
    ds = dcmread(CT)
    taken: list[int] = []
    bucket = TokenBucket(1_000_000)
    ae = AE(ae_title="ROUTER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", pacs.port, ae_title="PACS", max_pdu=0)
    assert assoc.is_established
    throttle_sends(assoc, lambda n: taken.append(n) or bucket.take(n), CHUNK)
    started = time.monotonic()
    status = assoc.send_c_store(ds)
    elapsed = time.monotonic() - started
    assoc.release()
    assert status.Status == 0x0000
    size = CT.stat().st_size
    assert sum(taken) >= size * 0.99 and max(taken) <= CHUNK
    assert elapsed >= (size - CHUNK) / 1_000_000 * 0.95
    assert pacs.count() == 1


def test_a_destination_s_associations_together_stay_under_max_mbps(tmp_path, codec_pool, pacs):  # noqa: F811
    s = Site(tmp_path / "site", codec_pool, pacs.port, '[[rule]]\nsyntax = "original"\n',
             "max_mbps = 8\nmax_associations = 2\nbatch_size = 1\n")
    files = make_series(CT, 4, tmp_path / "series")
    s.receive(files)
    started = time.monotonic()
    s.forwarder.start()
    try:
        wait_until(lambda: pacs.count() == 4, 30, what="delivery")
        elapsed = time.monotonic() - started
    finally:
        s.stop()
    total = sum(f.stat().st_size for f in files)
    assert pacs.most_at_once == 2  # both associations sent
    assert elapsed >= (total - CHUNK) / 1_000_000 * 0.95  # 8 Mbps = 1 MB/s for both together
