"""A destination that serves one association at a time (DCMTK storescp without --fork, and
many PACS that limit associations per calling AE title) with the shipped max_associations = 2:
an image sent a few seconds after the previous one is not held behind the idle association."""

from __future__ import annotations

import time

import pytest

from tests.interop.conftest import storescu
from tests.support.peers import Destination, data, make_series, wait_until

pytestmark = pytest.mark.interop

DELIVERY_S = 0.2


def test_single_images_a_few_seconds_apart_each_arrive_at_once(storescp, router_factory, tmp_path):
    scp = storescp(ae_title="PACS")  # no --fork: one association at a time
    router = router_factory([
        Destination("PACS", scp.port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n', ae_title=scp.ae_title,
                    extra="max_associations = 2"),
    ])
    files = make_series(data("693_UNCR.dcm"), 2, tmp_path / "study")
    late = []
    for index, path in enumerate(files):
        if index:
            time.sleep(2.5)  # within the idle association's lifetime
        result = storescu(router.port, [path])
        acknowledged = time.monotonic()
        assert result.returncode == 0, result.stderr
        wait_until(lambda: scp.count() == index + 1, 30, interval=0.005, what=f"image {index + 1} at storescp")
        late.append(time.monotonic() - acknowledged)
    assert max(late) < DELIVERY_S, f"seconds from C-STORE response to arrival: {[round(s, 3) for s in late]}"
