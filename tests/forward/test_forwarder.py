"""The forwarding pipeline in-process (claim, prepare, send, record) against a real pynetdicom
destination: what arrives, what the queue and the metrics say, how associations are used."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from prometheus_client import REGISTRY

from router import metrics
from router.config import load_rule_file
from router.forward.forwarder import Forwarder
from router.receive.intake import SUCCESS, Intake, Received
from router.queue.sqlite import SqliteQueue
from router.rules import Context
from router.queue.spool import Spool
from router.codecs.workers import CodecPool
from tests.support.peers import data, make_series, wait_until

CT = data("693_UNCR.dcm")


class Site:
    """A spool, a queue, intake and one destination's forwarder, as `serve` wires them."""

    def __init__(self, workdir: Path, pool: CodecPool, port: int, rules: str, extra: str = "") -> None:
        (workdir / "rules").mkdir(parents=True)
        path = workdir / "rules" / "PACS.toml"
        path.write_text(f'[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\n'
                        f'retry = {{ max_attempts = 3, backoff_s = 0.2, max_backoff_s = 1 }}\n{extra}\n{rules}')
        self.rules = load_rule_file(path)
        self.spool = Spool(workdir / "spool")
        self.queue = SqliteQueue(workdir / "spool" / "queue.sqlite")
        self.forwarder = Forwarder("PACS", lambda name: self.rules, self.queue, self.spool, pool, "ROUTER")
        self.intake = Intake(self.spool, self.queue, lambda: [self.rules],
                             on_enqueued=lambda names: self.forwarder.wake())

    def receive(self, files: list[Path], calling_ae: str = "CT1") -> None:
        for index, source in enumerate(files):
            path = self.spool.incoming / f"rx{time.monotonic_ns()}-{index}.dcm"
            shutil.copyfile(source, path)
            ds = dcmread(source, stop_before_pixels=True)
            received = Received(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                Context(calling_ae, "ROUTER", "::1"))
            assert self.intake.accept(received) == SUCCESS

    def stop(self) -> None:
        self.forwarder.stop(timeout=10)
        self.queue.close()


@pytest.fixture
def site(tmp_path, codec_pool):
    made: list[Site] = []

    def make(port: int, rules: str, extra: str = "") -> Site:
        s = Site(tmp_path / f"site{len(made)}", codec_pool, port, rules, extra)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


LOSSLESS = '[[rule]]\nsyntax = "jpeg-ls-lossless"\n'


def counter(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()  # noqa: SLF001


def test_a_delivered_instance_leaves_nothing_in_the_queue_or_the_spool(site, pacs):
    s = site(pacs.port, LOSSLESS)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: pacs.count() == 1, 30, what="delivery")
    [received] = pacs.received
    assert received.transfer_syntax_uid == JPEGLSLossless
    original, sent = dcmread(CT), received.dataset()
    assert np.array_equal(original.pixel_array, sent.pixel_array)
    wait_until(lambda: s.queue.counts() == {}, 10, what="the job recorded as delivered")
    # its file goes once the delivery is durable (a group sync, within a fraction of a second)
    wait_until(lambda: list(s.spool.instances.iterdir()) == [], 10, what="the spool file removed")
    assert list(s.spool.out.iterdir()) == []


def test_a_destination_refusing_the_syntax_gets_the_image_decompressed(site, pacs_factory):
    pacs = pacs_factory(transfer_syntaxes=[ImplicitVRLittleEndian])
    before = counter(metrics.FALLBACKS, destination="PACS", reason="refused_by_destination")
    s = site(pacs.port, LOSSLESS)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: pacs.count() == 1, 30, what="delivery")
    assert pacs.received[0].transfer_syntax_uid == ImplicitVRLittleEndian
    assert np.array_equal(dcmread(CT).pixel_array, pacs.received[0].dataset().pixel_array)
    assert counter(metrics.FALLBACKS, destination="PACS", reason="refused_by_destination") == before + 1


def encodes(syntax: str) -> float:
    return REGISTRY.get_sample_value("dicom_router_transcode_seconds_count", {"syntax": syntax}) or 0.0


def test_once_the_destination_refused_the_syntax_the_next_images_are_not_encoded_for_it(site, pacs_factory, tmp_path):
    pacs = pacs_factory(transfer_syntaxes=[ExplicitVRLittleEndian])
    fallbacks = counter(metrics.FALLBACKS, destination="PACS", reason="refused_by_destination")
    encoded = encodes("jpeg-ls-lossless")
    s = site(pacs.port, LOSSLESS)
    first, *later = make_series(CT, 4, tmp_path / "series")
    s.receive([first])
    s.forwarder.start()
    wait_until(lambda: pacs.count() == 1, 30, what="the first delivery")
    assert encodes("jpeg-ls-lossless") == encoded + 1  # encoded, refused, sent decompressed
    s.receive(later)
    wait_until(lambda: pacs.count() == 4, 30, what="the later deliveries")
    assert encodes("jpeg-ls-lossless") == encoded + 1, "encoded again for a destination that refuses it"
    assert counter(metrics.FALLBACKS, destination="PACS", reason="refused_by_destination") == fallbacks + 4
    for got in pacs.received:
        assert got.transfer_syntax_uid == ExplicitVRLittleEndian
        assert np.array_equal(dcmread(CT).pixel_array, got.dataset().pixel_array)


def test_a_permanent_failure_status_makes_a_dead_letter_with_the_status(site, pacs_factory):
    pacs = pacs_factory(status=0xC123)
    s = site(pacs.port, LOSSLESS)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: s.queue.counts().get(("PACS", "dead")) == 1, 30, what="a dead letter")
    [dead] = s.queue.jobs(state="dead")
    assert dead.last_error == "destination answered 0xC123 (permanent failure)"
    assert s.queue.paths() == [dead.instance.path] and Path(dead.instance.path).exists()


def test_a_temporary_failure_is_retried_then_kept_as_a_dead_letter(site, pacs_factory):
    pacs = pacs_factory(status=0xA700)
    before = counter(metrics.FORWARD_FAILURES, destination="PACS", outcome="retry")
    s = site(pacs.port, LOSSLESS)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: s.queue.counts().get(("PACS", "dead")) == 1, 30, what="a dead letter after 3 attempts")
    [dead] = s.queue.jobs(state="dead")
    assert dead.attempts == 3 and dead.last_error == "destination answered 0xA700"
    assert counter(metrics.FORWARD_FAILURES, destination="PACS", outcome="retry") == before + 2


def test_an_unreachable_destination_keeps_the_job_pending(site, tmp_path):
    from tests.support.peers import free_port

    s = site(free_port(), LOSSLESS)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: any(j.attempts >= 1 for j in s.queue.jobs()), 30, what="a failed attempt")
    [job] = s.queue.jobs()
    assert job.last_error.startswith("cannot connect to 127.0.0.1:")


def test_single_images_a_moment_apart_reuse_the_open_association(site, pacs):
    """max_associations is a ceiling: with no backlog, one association carries everything."""
    s = site(pacs.port, LOSSLESS, extra="max_associations = 2")
    s.forwarder.start()
    series = make_series(CT, 4, pacs.directory.parent / "series")
    for index, path in enumerate(series):
        s.receive([path])
        wait_until(lambda: pacs.count() == index + 1, 30, what=f"image {index + 1}")
        time.sleep(0.3)
    assert pacs.associations == 1 and pacs.most_at_once == 1


def test_a_backlog_uses_every_association_the_destination_allows(site, pacs_factory):
    pacs = pacs_factory(delay=0.05)  # a destination slower than the router
    s = site(pacs.port, '[[rule]]\nsyntax = "original"\n', extra="max_associations = 2\nbatch_size = 8")
    s.receive(make_series(CT, 60, pacs.directory.parent / "backlog"))
    s.forwarder.start()
    wait_until(lambda: pacs.count() == 60, 60, what="the backlog delivered")
    assert pacs.most_at_once == 2


@pytest.mark.parametrize("status", [0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007])
def test_every_warning_status_means_stored_once(site, pacs_factory, status):
    pacs = pacs_factory(status=status)
    s = site(pacs.port, LOSSLESS)
    s.receive([CT])
    s.forwarder.start()
    wait_until(lambda: s.queue.counts() == {}, 30, what="the job recorded as delivered")
    time.sleep(0.5)  # a retry would have come by now (backoff 0.2 s)
    assert pacs.count() == 1


@pytest.mark.parametrize("forward", [True, False])
def test_the_destination_sees_the_modality_s_ae_title_when_asked(site, pacs, forward, tmp_path):
    s = site(pacs.port, LOSSLESS, extra=f"forward_calling_ae_title = {str(forward).lower()}\nmax_associations = 1")
    ct, mr = make_series(CT, 3, tmp_path / "ct"), make_series(data("MR2_UNCR.dcm"), 2, tmp_path / "mr")
    s.receive(ct[:2], calling_ae="CT1")
    s.receive(mr, calling_ae="MR_3T")
    s.receive(ct[2:], calling_ae="CT1")
    s.forwarder.start()
    wait_until(lambda: pacs.count() == 5, 30, what="delivery")
    callers = {r.sop_instance_uid: r.calling_ae for r in pacs.received}
    sent_by = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): ae
               for ae, paths in (("CT1", ct), ("MR_3T", mr)) for p in paths}
    assert callers == ({uid: ae for uid, ae in sent_by.items()} if forward else dict.fromkeys(sent_by, "ROUTER"))
