"""The slow link: a 12-bit mammography-like study (tests/mammography.py) from a modality to a
PACS behind a rate-limited line (tests/slow_link.py), through the real router."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless
from pynetdicom import AE

from tests.support.mammography import mammography_study
from tests.support.peers import Destination, data, send, wait_until
from tests.support.slow_link import SlowLink

ROWS, COLUMNS = 1024, 832  # small images, so that the test stays short; the benchmark uses 4090 x 3300
LOSSLESS = '[[rule]]\nsyntax = "jpeg-ls-lossless"\n'


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return mammography_study(tmp_path_factory.mktemp("mg"), ROWS, COLUMNS)


@pytest.fixture
def links():
    made: list[SlowLink] = []

    def make(port: int, mbps: float = 0.0) -> SlowLink:
        link = SlowLink(port, mbps)
        made.append(link)
        return link

    yield make
    for link in made:
        link.close()


def send_urgent(port: int, path) -> int:  # noqa: ANN001
    """C-STORE one file with Priority HIGH, as an emergency modality does."""
    ds = dcmread(path)
    ae = AE(ae_title="ER_CT")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds, priority=1).Status)
    finally:
        assoc.release()


def pixels_equal(a, b) -> bool:  # noqa: ANN001
    return np.array_equal(dcmread(a).pixel_array, dcmread(b).pixel_array)


def test_a_study_crosses_a_capped_link_whole_bit_exact_never_above_the_cap_and_an_urgent_image_overtakes_it(
        router_factory, pacs, links, study):
    link = links(pacs.port)  # the line itself is fast: what is measured is the router's pace
    router = router_factory([Destination("PACS", link.port, LOSSLESS, extra="max_mbps = 8\nmax_associations = 1\n")])
    started = time.monotonic()
    assert send(router.port, study) == [0] * 4
    wait_until(lambda: pacs.count() >= 1, 30, what="the study under way")
    urgent = data("693_UNCR.dcm")
    assert send_urgent(router.port, urgent) == 0
    wait_until(lambda: pacs.count() == 5, 60, what="the study and the urgent image")
    elapsed = time.monotonic() - started

    order = [r.sop_instance_uid for r in pacs.received]
    urgent_uid = str(dcmread(urgent, stop_before_pixels=True).SOPInstanceUID)
    assert order.index(urgent_uid) < 4, "the urgent image arrived after the study finished"
    received = pacs.by_uid()
    for path in study:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert received[uid].transfer_syntax_uid == JPEGLSLossless
        assert pixels_equal(path, received[uid].path)
    assert link.peak_mbps(1.0) <= 8 * 1.07, link.peak_mbps(1.0)  # a 16 KiB burst above 1 MB/s at most
    assert elapsed >= link.bytes_carried() / 1_000_000 * 0.9


@pytest.fixture
def two_destinations(router_factory, pacs_factory, links):
    as_received_pacs, compressed_pacs = pacs_factory(name="asis"), pacs_factory(name="jls")
    as_received, compressed = links(as_received_pacs.port, mbps=16), links(compressed_pacs.port, mbps=16)
    router = router_factory([Destination("ASIS", as_received.port, '[[rule]]\nsyntax = "original"\n'),
                             Destination("JLS", compressed.port, LOSSLESS)])
    return router, (as_received_pacs, as_received), (compressed_pacs, compressed)


def test_over_the_same_line_compression_divides_the_link_time(two_destinations, study):
    router, (as_received_pacs, as_received), (compressed_pacs, compressed) = two_destinations
    assert send(router.port, study) == [0] * 4
    wait_until(lambda: as_received_pacs.count() == 4 and compressed_pacs.count() == 4, 60, what="both copies")
    ratio = as_received.bytes_carried() / compressed.bytes_carried()
    assert ratio > 2
    assert compressed.busy_seconds() < as_received.busy_seconds() / ratio * 1.5
    for path in study:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert pixels_equal(path, compressed_pacs.by_uid()[uid].path)


def test_with_study_stable_nothing_leaves_before_the_study_is_complete_then_it_leaves_in_order(
        router_factory, pacs, links, study):
    link = links(pacs.port, mbps=50)
    router = router_factory([Destination("PACS", link.port, LOSSLESS,
                                         extra='study_stable = "2s"\nmax_associations = 1\n')])
    shuffled = [study[3], study[0], study[2], study[1]]  # as a modality may send them
    for path in shuffled:
        assert send(router.port, [path]) == [0]
        last_received = time.monotonic()
        time.sleep(0.6)
        assert pacs.count() == 0 and link.bytes_carried() == 0
    wait_until(lambda: pacs.count() >= 1, 30, what="the stable study")
    assert time.monotonic() - last_received >= 2.0 - 0.1  # study_stable after its last instance
    wait_until(lambda: pacs.count() == 4, 30, what="the whole study")
    sent_order = [r.sop_instance_uid for r in pacs.received]
    assert sent_order == [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study]
