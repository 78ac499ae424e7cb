"""The codec pool, tested directly: transcodes run in worker processes, and a codec that kills
its worker costs that one image a retry alone, then a CodecCrash, never the pool."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

from router import codecs
from router.request import Request
from router.transcode import Transcoded
from router.workers import CodecCrash, CodecPool
from tests.peers import REPO, data

PLUGIN = str(REPO / "tests" / "plugins" / "aborting_codec.py")
MR = data("MR2_UNCR.dcm")


@pytest.fixture(scope="module")
def pool():
    codecs.load_plugins([PLUGIN])  # the registry of this process knows the syntax too
    pool = CodecPool(workers=2, plugins=[PLUGIN])
    yield pool
    pool.shutdown()


def marked_copy(tmp_path) -> object:
    ds = dcmread(MR)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] = 3333  # the plugin's codec aborts its process on this value
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "marked.dcm"
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
