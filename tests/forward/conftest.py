"""What the forwarding tests share: a codec pool per test module, as `serve` keeps one."""

from __future__ import annotations

import pytest

from router.codecs.workers import CodecPool


@pytest.fixture(scope="module")
def codec_pool():
    pool = CodecPool(workers=2)
    yield pool
    pool.shutdown()
