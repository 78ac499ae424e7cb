"""The codec pool, tested directly: transcodes run in worker processes, and a codec that kills
its worker costs that one image a retry alone, then a CodecCrash, never the pool."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

from prometheus_client import REGISTRY

from router import codecs
from router.request import Request
from router.codecs.transcode import Transcoded
from router.compat.futures import worker_processes
from router.codecs.workers import CodecCrash, CodecPool, CodecTimeout
from tests.support.peers import REPO, data

PLUGIN = str(REPO / "tests" / "support" / "plugins" / "aborting_codec.py")
HANGING = str(REPO / "tests" / "support" / "plugins" / "hanging_codec.py")
SLOW = str(REPO / "tests" / "support" / "plugins" / "slow_codec.py")
MR = data("MR2_UNCR.dcm")


@pytest.fixture(scope="module")
def pool():
    codecs.load_plugins([PLUGIN])  # the registry of this process knows the syntax too
    pool = CodecPool(workers=2, plugins=[PLUGIN])
    yield pool
    pool.shutdown()


def marked_copy(tmp_path, marker: int = 3333) -> object:
    """MR with its first pixel set to `marker`: the plugins' codecs abort or hang on it."""
    ds = dcmread(MR)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] = marker
    ds.PixelData = pixels.tobytes()
    path = tmp_path / f"marked{marker}.dcm"
    ds.save_as(path)
    return path


def test_transcodes_run_in_the_workers_and_give_the_file(pool, tmp_path):
    result = pool.run(MR, tmp_path / "out.dcm", Request(syntax="jpeg-ls-lossless"))
    assert isinstance(result, Transcoded) and result.changed
    out = dcmread(result.path)
    assert out.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(out.pixel_array, dcmread(MR).pixel_array)
    assert set(result.cpu) >= {"decode", "encode", "verify", "write"}


def test_several_transcodes_in_flight_at_once(pool, tmp_path):
    submitted = [pool.submit(MR, tmp_path / f"{n}.dcm", Request(syntax="rle")) for n in range(6)]
    results = [pool.result(s) for s in submitted]
    assert all(isinstance(r, Transcoded) and r.changed for r in results)


def test_a_worker_killed_twice_by_one_image_gives_codec_crash_and_the_pool_goes_on(pool, tmp_path):
    crashed = pool.run(marked_copy(tmp_path), tmp_path / "crash.dcm", Request(syntax="jpeg-ls-aborts-on-marker"))
    assert isinstance(crashed, CodecCrash), crashed
    assert "died twice" in str(crashed)
    after = pool.run(MR, tmp_path / "after.dcm", Request(syntax="jpeg-ls-aborts-on-marker"))
    assert isinstance(after, Transcoded) and after.changed


def test_a_transcode_error_comes_back_as_the_exception(pool, tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00")
    result = pool.run(broken, tmp_path / "x.dcm", Request(syntax="rle"))
    assert isinstance(result, Exception) and not isinstance(result, CodecCrash)


@pytest.fixture
def hanging_pool():
    codecs.load_plugins([HANGING])
    pool = CodecPool(workers=2, plugins=[HANGING], timeout_s=1.5, timeout_s_per_mb=0)
    yield pool
    pool.shutdown(timeout=1)


def test_a_transcode_past_its_deadline_stops_its_worker_and_the_pool_goes_on(hanging_pool, tmp_path):
    started = time.monotonic()
    result = hanging_pool.run(marked_copy(tmp_path, 4444), tmp_path / "hang.dcm",
                              Request(syntax="jpeg-ls-hangs-on-marker"))
    assert isinstance(result, CodecTimeout), result
    assert time.monotonic() - started < 15
    after = hanging_pool.run(MR, tmp_path / "after.dcm", Request(syntax="jpeg-ls-hangs-on-marker"))
    assert isinstance(after, Transcoded) and after.changed


def test_the_deadline_grows_with_the_size_of_the_instance(tmp_path):
    pool = CodecPool(workers=1, timeout_s=10, timeout_s_per_mb=2)
    try:
        big = tmp_path / "big.dcm"
        big.write_bytes(b"\0" * (5 * 1024 * 1024))
        assert pool.deadline_s(big) == pytest.approx(20)
    finally:
        pool.shutdown()


def test_shutdown_is_bounded_whatever_the_workers_do(tmp_path):
    codecs.load_plugins([HANGING])
    pool = CodecPool(workers=1, plugins=[HANGING], timeout_s=3600)
    pool.submit(marked_copy(tmp_path, 4444), tmp_path / "hang.dcm", Request(syntax="jpeg-ls-hangs-on-marker"))
    time.sleep(1.0)  # the worker is inside the codec
    workers = worker_processes(pool._generation.executor)  # noqa: SLF001
    started = time.monotonic()
    pool.shutdown(timeout=1)
    assert time.monotonic() - started < 10
    assert workers and not any(p.is_alive() for p in workers)


def restarts(reason: str) -> float:
    return REGISTRY.get_sample_value("dicom_router_codec_pool_restarts_total", {"reason": reason}) or 0.0


def test_a_worker_frozen_while_idle_costs_the_pool_a_restart_not_its_work(tmp_path):
    pool = CodecPool(workers=1, timeout_s=2, timeout_s_per_mb=0)
    stopped = []
    try:
        assert isinstance(pool.run(MR, tmp_path / "warm.dcm", Request(syntax="rle")), Transcoded)
        stalls = restarts("stall")
        stopped = pool.worker_pids()
        for pid in stopped:  # idle: waiting for its next task, holding the queue all workers read
            os.kill(pid, signal.SIGSTOP)
        waiting = ThreadPoolExecutor(1)  # a frozen pool would block the test: it waits at most 90 s
        try:
            results = waiting.submit(lambda: [pool.run(MR, tmp_path / f"{n}.dcm", Request(syntax="rle"))
                                              for n in range(3)]).result(timeout=90)
        finally:
            waiting.shutdown(wait=False)
        assert all(isinstance(r, Transcoded) and r.changed for r in results), results
        assert restarts("stall") == stalls + 1
        assert not set(stopped) & set(pool.worker_pids())
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pool.shutdown(timeout=1)


def test_a_pool_busy_within_its_deadlines_is_not_taken_for_stalled(tmp_path):
    codecs.load_plugins([SLOW])
    # each image takes a second of its 3 s deadline; the last waits 3 s for the only worker
    pool = CodecPool(workers=1, plugins=[SLOW], timeout_s=3, timeout_s_per_mb=0)
    try:
        assert isinstance(pool.run(MR, tmp_path / "warm.dcm", Request(syntax="rle")), Transcoded)
        stalls = restarts("stall")
        submitted = [pool.submit(MR, tmp_path / f"{n}.dcm", Request(syntax="jpeg-ls-slow")) for n in range(4)]
        results = [pool.result(s) for s in submitted]
        assert all(isinstance(r, Transcoded) and r.changed for r in results), results
        assert restarts("stall") == stalls
    finally:
        pool.shutdown(timeout=1)
