"""Faults on purpose: crashing codecs, full disks, dead, failing and hanging destinations."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from tests.support import transcode_images as img
from tests.support.peers import REPO, Destination, Pacs, data, echo, free_port, make_series, metric_value, send, wait_until
from tests.support.processes import codec_workers, is_stopped, peak_rss_bytes, resume_and_kill

PLUGIN = REPO / "tests" / "support" / "plugins" / "aborting_codec.py"


def events(router, name: str) -> list[dict]:
    found = []
    for line in router.log().splitlines():
        if line.startswith("{") and f'"event": "{name}"' in line:
            found.append(json.loads(line))
    return found


HANGING = REPO / "tests" / "support" / "plugins" / "hanging_codec.py"


def _marked_series(tmp_path: Path, marker: int, count: int = 3) -> tuple[list[Path], object]:
    """A series of MR images whose second has `marker` as its first pixel (the test codecs abort
    or hang on it)."""
    series = make_series(data("MR2_UNCR.dcm"), count, tmp_path / "series")
    marked = dcmread(series[1])
    pixels = marked.pixel_array.copy()
    pixels[0, 0] = marker
    marked.PixelData = pixels.tobytes()
    marked.save_as(series[1])
    return series, marked


def test_codec_crash_kills_a_worker_never_the_router(router_factory, pacs, tmp_path):
    router = router_factory(
        [Destination("PACS", pacs.port, '[[rule]]\nname = "crashy"\nsyntax = "jpeg-ls-aborts-on-marker"\n'
                                        'fallback = "explicit-le"\n')],
        extra=f'[transcode]\nplugins = ["{PLUGIN}"]\n',
    )
    series, marked = _marked_series(tmp_path, 3333, count=4)
    pixels = marked.pixel_array
    assert send(router.port, series) == [0, 0, 0, 0]
    wait_until(lambda: pacs.count() == 4, 60, what=f"all four\n{router.log()}")
    received = pacs.by_uid()
    crashed = received[str(marked.SOPInstanceUID)]
    assert crashed.transfer_syntax_uid == ExplicitVRLittleEndian  # the rule's fallback
    assert np.array_equal(crashed.dataset().pixel_array, pixels)
    others = [received[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] for p in (series[0], series[2], series[3])]
    assert {r.transfer_syntax_uid for r in others} == {JPEGLSLossless}
    text = router.metrics()
    assert metric_value(text, "dicom_router_fallbacks_total", destination="PACS", reason="codec_crash") == 1
    assert router.proc.poll() is None and echo(router.port)


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
                            capture_output=True, text=True)
    return result.returncode == 0


@contextlib.contextmanager
def _small_filesystem(path: Path, size_mb: int):  # noqa: ANN202
    """A tmpfs of `size_mb` mounted at `path` for the block (skips the test without root)."""
    if not _mount_tmpfs(path, size_mb):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_answers_out_of_resources_and_recovers_by_itself(router_factory, tmp_path):
    with _small_filesystem(tmp_path / "small-fs", 24) as spool:
        port = free_port()
        router = router_factory([Destination("PACS", port, '[[rule]]\nsyntax = "original"\n',
                                             retry="{ max_attempts = 1000, backoff_s = 0.2, max_backoff_s = 0.5 }")],
                                min_free_mb=8, spool_dir=spool / "spool")
        series = make_series(data("MR2_UNCR.dcm"), 12, tmp_path / "series")  # 2 MB each, 24 MB in all
        statuses = send(router.port, series)
        assert 0xA700 in statuses, statuses
        accepted = [p for p, s in zip(series, statuses) if s == 0]
        assert 3 <= len(accepted) < len(series)
        assert set(statuses) <= {0, 0xA700}
        assert metric_value(router.metrics(), "dicom_router_rejected_total", reason="disk_full") >= 1
        assert list((spool / "spool" / "incoming").iterdir()) == []  # nothing half-written left behind
        pacs = Pacs(tmp_path / "pacs", port=port).start()
        try:
            accepted_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in accepted}
            wait_until(lambda: accepted_uids <= set(pacs.by_uid()), 60, what="accepted instances delivered")
            wait_until(lambda: not list((spool / "spool" / "instances").iterdir()), 20, what="spool drained")
            refused = [p for p, s in zip(series, statuses) if s != 0]
            assert send(router.port, refused) == [0] * len(refused)  # the modality's retry now succeeds
            wait_until(lambda: len(pacs.by_uid()) == len(series), 60, what="every instance")
        finally:
            pacs.stop()
        router.kill()


def test_dead_destination_backs_off_dead_letters_and_does_not_slow_others(router_factory, pacs_factory, tmp_path):
    live = pacs_factory(name="live")
    dead_port = free_port()
    router = router_factory([
        Destination("DOWN", dead_port, '[[rule]]\nsyntax = "original"\n',
                    retry="{ max_attempts = 5, backoff_s = 0.2, max_backoff_s = 0.8 }"),
        Destination("LIVE", live.port, '[[rule]]\nsyntax = "original"\n'),
    ])
    series = make_series(data("693_UNCR.dcm"), 10, tmp_path / "series")
    started = time.monotonic()
    assert send(router.port, series) == [0] * 10
    wait_until(lambda: live.count() == 10, 20, what="the live destination")
    assert time.monotonic() - started < 15
    wait_until(lambda: "10 dead letter" in router.cli("queue", "retry", "--destination", "NONE").stdout
               or metric_value(router.metrics(), "dicom_router_queue_jobs", destination="DOWN", state="dead") == 10,
               40, what="dead letters")
    delays = [e["retry_in_s"] for e in events(router, "retry_scheduled") if e.get("destination") == "DOWN"]
    assert delays and max(delays) <= 0.8 + 1e-9
    assert max(delays) > min(delays)  # it grew
    dead = [e for e in events(router, "dead_letter") if e.get("destination") == "DOWN"]
    assert len(dead) == 10 and all(e["attempts"] == 5 for e in dead)
    assert "cannot connect" in dead[0]["error"]
    late = Pacs(tmp_path / "late", port=dead_port).start()
    try:
        assert "10 dead letter(s) put back" in router.cli("queue", "retry", "--destination", "DOWN").stdout
        wait_until(lambda: late.count() == 10, 30, what="dead letters delivered after queue retry")
    finally:
        late.stop()


@pytest.mark.parametrize("status, statuses, expect", [
    (0xA700, "", "retry"),
    (0xC000, "", "dead"),
    (0xA900, "", "dead"),
    (0x0122, "", "dead"),
    (0xB000, "", "delivered"),
    (0xA700, 'statuses = { "0xA700-0xA7FF" = "permanent" }', "dead"),
    (0xC001, 'statuses = { "0xC001" = "success" }', "delivered"),
])
def test_destination_status_decides_the_outcome(router_factory, pacs_factory, status, statuses, expect):
    pacs = pacs_factory(status=status)
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n', extra=statuses,
                                         retry="{ max_attempts = 50, backoff_s = 0.1, max_backoff_s = 0.2 }")])
    assert send(router.port, [data("693_UNCR.dcm")]) == [0]

    def state(name: str) -> float:
        return metric_value(router.metrics(), "dicom_router_queue_jobs", destination="PACS", state=name)

    if expect == "delivered":
        wait_until(lambda: metric_value(router.metrics(), "dicom_router_forwarded_instances_total",
                                        destination="PACS") == 1, 20, what="delivered")
        assert state("pending") + state("dead") == 0
    elif expect == "dead":
        wait_until(lambda: state("dead") == 1, 20, what="dead letter")
        assert f"0x{status:04X}" in router.cli("queue", "dead").stdout
        assert metric_value(router.metrics(), "dicom_router_forward_failures_total", outcome="retry") == 0
    else:
        wait_until(lambda: metric_value(router.metrics(), "dicom_router_forward_failures_total",
                                        outcome="retry") >= 3, 20, what="retries")
        assert state("dead") == 0


def test_hanging_destination_is_aborted_and_retried(router_factory, pacs_factory):
    pacs = pacs_factory(delay=4.0)
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n',
                                         timeouts="{ connect_s = 2, acse_s = 2, dimse_s = 1, network_s = 5 }",
                                         retry="{ max_attempts = 50, backoff_s = 0.2, max_backoff_s = 0.5 }")])
    assert send(router.port, [data("693_UNCR.dcm")]) == [0]
    wait_until(lambda: any("no C-STORE response" in e.get("error", "") for e in events(router, "retry_scheduled")),
               20, what="a DIMSE timeout")
    pacs.delay = 0.0
    wait_until(lambda: metric_value(router.metrics(), "dicom_router_forwarded_instances_total",
                                    destination="PACS") == 1, 30, what="delivery once the destination answers")
    assert echo(router.port)


def _fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as out:
        for size in (len(chunk), 4096, 512):
            try:
                while True:
                    out.write(chunk[:size])
            except OSError:
                pass
    return filler


def _readyz(router) -> tuple[int, str]:  # noqa: ANN001
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}/readyz", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_spool_that_fills_while_forwarding_stops_nothing_for_good(router_factory, tmp_path):
    with _small_filesystem(tmp_path / "small-fs", 40) as mount:
        port = free_port()
        router = router_factory([Destination("PACS", port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n',
                                             retry="{ max_attempts = 1000, backoff_s = 0.2, max_backoff_s = 0.5 }")],
                                min_free_mb=1, spool_dir=mount / "spool")
        series = make_series(data("MR2_UNCR.dcm"), 6, tmp_path / "series")
        assert send(router.port, series) == [0] * 6
        filler = _fill(mount)
        pacs = Pacs(tmp_path / "pacs", port=port).start()  # the destination comes back while the disk is full
        try:
            wait_until(lambda: "spool below min_free_mb" in _readyz(router)[1], 20, what="/readyz saying the spool is full")
            time.sleep(3)  # transcoded outputs and queue writes fail meanwhile
            status, why = _readyz(router)
            assert status == 503 and "forwarder not running" not in why, why
            filler.unlink()
            wait_until(lambda: pacs.count() >= 6, 60, what="every instance once space is back")
            wait_until(lambda: _readyz(router)[0] == 200, 20, what="/readyz ready again")
            wait_until(lambda: not list((mount / "spool" / "out").iterdir()), 20, what="no transcoded output left")
            wait_until(lambda: not list((mount / "spool" / "instances").iterdir()), 20, what="the spool emptied")
        finally:
            pacs.stop()
        router.kill()


def test_a_hung_codec_costs_its_image_the_fallback_not_the_destination(router_factory, pacs, tmp_path):
    router = router_factory(
        [Destination("PACS", pacs.port, '[[rule]]\nsyntax = "jpeg-ls-hangs-on-marker"\nfallback = "explicit-le"\n')],
        extra=f'[transcode]\nplugins = ["{HANGING}"]\ntimeout_s = 2\ntimeout_s_per_mb = 0\n',
    )
    series, marked = _marked_series(tmp_path, 4444)
    assert send(router.port, series) == [0, 0, 0]
    wait_until(lambda: pacs.count() == 3, 60, what=f"all three\n{router.log()[-3000:]}")
    assert pacs.by_uid()[str(marked.SOPInstanceUID)].transfer_syntax_uid == ExplicitVRLittleEndian
    assert metric_value(router.metrics(), "dicom_router_fallbacks_total", destination="PACS", reason="codec_timeout") == 1
    assert any(e.get("action") == "worker stopped and replaced" for e in events(router, "codec_timeout"))


def test_sigterm_stops_the_router_even_while_a_codec_hangs(router_factory, pacs, tmp_path):
    router = router_factory(
        [Destination("PACS", pacs.port, '[[rule]]\nsyntax = "jpeg-ls-hangs-on-marker"\n')],
        extra=f'[transcode]\nplugins = ["{HANGING}"]\nworkers = 1\ntimeout_s = 3600\n',
    )
    series, _ = _marked_series(tmp_path, 4444)
    assert send(router.port, series[1:2]) == [0]
    time.sleep(2)  # the only worker is now stuck in the codec
    started = time.monotonic()
    assert router.terminate(timeout=40) == 0
    assert time.monotonic() - started < 40


def test_an_image_that_cannot_be_decompressed_for_a_destination_is_a_dead_letter_at_once(
        router_factory, pacs_factory, tmp_path):
    """A deterministic transcoding failure is not retried: the reason is in the dead letter."""
    legacy = pacs_factory(transfer_syntaxes=["1.2.840.10008.1.2"])  # Implicit VR Little Endian only
    router = router_factory([Destination("LEGACY", legacy.port, '[[rule]]\nsyntax = "original"\n',
                                         retry="{ max_attempts = 5, backoff_s = 0.2, max_backoff_s = 0.5 }")])
    compressed = tmp_path / "short.dcm"  # Explicit VR Little Endian, for a destination that takes only Implicit
    ds = dcmread(data("MR2_UNCR.dcm"))
    ds.PixelData = ds.PixelData[:-512]  # shorter than Rows x Columns x Bits Allocated says
    ds.save_as(compressed)
    assert send(router.port, [compressed]) == [0]

    def dead() -> float:
        return metric_value(router.metrics(), "dicom_router_queue_jobs", destination="LEGACY", state="dead")

    wait_until(lambda: dead() == 1, 30, what="a dead letter")
    listing = router.cli("queue", "dead").stdout
    assert "attempts=1" in listing and "cannot decompress for a destination that refused" in listing
    assert metric_value(router.metrics(), "dicom_router_forward_failures_total", destination="LEGACY",
                        outcome="retry") == 0


# -- a stalled codec pool, and images that would cost more memory than the machine has to spare ----
def test_a_codec_pool_frozen_while_idle_is_replaced_and_every_instance_arrives(router_factory, pacs, tmp_path):
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n')],
                            extra="[transcode]\nworkers = 2\ntimeout_s = 3\ntimeout_s_per_mb = 0\n")
    series = make_series(data("MR2_UNCR.dcm"), 11, tmp_path / "series")
    assert send(router.port, series[:1]) == [0]
    wait_until(lambda: pacs.count() == 1, 60, what=f"the first instance\n{router.log()}")
    wait_until(lambda: len(codec_workers(router.proc.pid)) == 2, 30, what="both codec workers")
    frozen = codec_workers(router.proc.pid)
    try:
        for pid in frozen:  # idle, between two transcodes
            os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: all(is_stopped(pid) for pid in frozen), 10, what="the workers stopped")
        assert send(router.port, series[1:]) == [0] * 10
        wait_until(lambda: pacs.count() == 11, 90, what=f"all ten after the freeze\n{router.log()}")
        assert {r.transfer_syntax_uid for r in pacs.by_uid().values()} == {JPEGLSLossless}
        stalled = events(router, "codec_pool_stalled")
        assert stalled and all(e["deadline_s"] == 3 for e in stalled)
        assert metric_value(router.metrics(), "dicom_router_codec_pool_restarts_total", reason="stall") >= 1
        assert not set(frozen) & set(codec_workers(router.proc.pid))  # replaced, none left stopped
    finally:
        resume_and_kill(frozen)


def test_an_image_declaring_more_than_a_worker_can_afford_goes_as_received_and_costs_no_memory(
        router_factory, pacs_factory, tmp_path):
    """A few kilobytes of JPEG-LS really decoding to more than the machine's share for one codec
    worker, though below max_decoded_mb: refused before it is decoded, sent as received where the
    destination takes JPEG-LS, a dead letter saying why where it takes only uncompressed."""
    pacs = pacs_factory(name="pacs")
    legacy = pacs_factory(name="legacy", transfer_syntaxes=[ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    # each of two workers may decode 1/32 of the machine's memory (a quarter, shared, at four
    # bytes a decoded byte): this declares 1/24, 128 MiB a frame
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    frames = -(-memory // 24 // (8192 * 8192 * 2))
    bomb = img.jpeg_ls_frames(tmp_path, frames, (8192, 8192), bits=16)
    declared = frames * 8192 * 8192 * 2
    assert bomb.stat().st_size < 200_000 and declared < 1_000_000 * 2**20
    router = router_factory(
        [Destination("PACS", pacs.port, '[[rule]]\nsyntax = "explicit-le"\n'),
         Destination("LEGACY", legacy.port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n')],
        extra="[transcode]\nworkers = 2\nmax_decoded_mb = 1000000\n",
    )
    assert send(router.port, [bomb]) == [0]
    wait_until(lambda: pacs.count() == 1, 120, what=f"the image as received\n{router.log()}")
    assert next(iter(pacs.by_uid().values())).transfer_syntax_uid == JPEGLSLossless

    def dead() -> float:
        return metric_value(router.metrics(), "dicom_router_queue_jobs", destination="LEGACY", state="dead")

    wait_until(lambda: dead() == 1, 120, what=f"a dead letter for the uncompressed-only destination\n{router.log()}")
    why = "more than one image may decode here"
    assert any(why in e["error"] for e in events(router, "transcode_failed"))
    assert why in router.cli("queue", "dead").stdout
    assert metric_value(router.metrics(), "dicom_router_fallbacks_total", destination="PACS", reason="codec_error") == 1
    workers = codec_workers(router.proc.pid)
    assert workers
    peaks = {pid: peak_rss_bytes(pid) for pid in [router.proc.pid, *workers]}
    assert all(peak < min(declared // 2, 1 << 30) for peak in peaks.values()), (
        f"declared {declared >> 20} MiB; peak MiB by process: { {p: v >> 20 for p, v in peaks.items()} }")
