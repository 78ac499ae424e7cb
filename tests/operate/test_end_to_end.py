"""A modality sends real images through a running router to a PACS, over real sockets."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
)

from tests.support.peers import Destination, data, echo, metric_value, send, wait_until

CT, MR, CR, US = "693_UNCR.dcm", "MR2_UNCR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm"


def pixels(path) -> np.ndarray:
    return dcmread(path).pixel_array


def rule(syntax: str, extra: str = "") -> str:
    return f'[[rule]]\nname = "all"\nsyntax = "{syntax}"\n{extra}\n'


def test_echo_answers(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, rule("original"))])
    assert echo(router.port)


@pytest.mark.parametrize("syntax, expected_ts", [
    ("original", None),
    ("explicit-le", ExplicitVRLittleEndian),
    ("implicit-le", ImplicitVRLittleEndian),
    ("jpeg-ls-lossless", JPEGLSLossless),
])
def test_lossless_syntaxes_arrive_with_identical_pixels(router_factory, pacs, syntax, expected_ts):
    router = router_factory([Destination("PACS", pacs.port, rule(syntax))])
    files = [data(n) for n in (CT, MR, CR, US)]
    assert send(router.port, files) == [0, 0, 0, 0]
    wait_until(lambda: pacs.count() == 4, 60, what=f"4 instances at the PACS\n{router.log()}")
    received = pacs.by_uid()
    for path in files:
        original = dcmread(path)
        got = received[str(original.SOPInstanceUID)]
        assert got.transfer_syntax_uid == (expected_ts or str(original.file_meta.TransferSyntaxUID))
        assert np.array_equal(got.dataset().pixel_array, original.pixel_array), path.name


def test_lossy_jpeg_carries_the_bookkeeping(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, rule("jpeg-lossy", "quality = 90"))])
    files = [data(MR), data(US)]
    assert send(router.port, files) == [0, 0]
    wait_until(lambda: pacs.count() == 2, 60, what="2 instances")
    by_ts = {r.transfer_syntax_uid: r.dataset() for r in pacs.received}
    assert set(by_ts) == {JPEGExtended12Bit, JPEGBaseline8Bit}
    for ds, source in ((by_ts[JPEGExtended12Bit], MR), (by_ts[JPEGBaseline8Bit], US)):
        original = dcmread(data(source))
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod in ("ISO_10918_1", ["ISO_10918_1"])
        assert float(ds.LossyImageCompressionRatio if not isinstance(ds.LossyImageCompressionRatio, list)
                     else ds.LossyImageCompressionRatio[-1]) > 1
        assert ds.ImageType[0] == "DERIVED"
        assert ds.SOPInstanceUID != original.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        difference = np.abs(ds.pixel_array.astype(np.int32) - original.pixel_array.astype(np.int32))
        assert difference.mean() < 4, source


def test_lossy_input_is_never_recompressed(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, rule("jpeg-lossy", "quality = 50"))])
    lossy = [data("MR2_J2KI.dcm"), data("SC_rgb_dcmtk_ebcr_dcmd.dcm")]
    assert send(router.port, lossy) == [0, 0]
    wait_until(lambda: pacs.count() == 2, 60, what="2 instances")
    received = pacs.by_uid()
    for path in lossy:
        original = dcmread(path)
        got = received[str(original.SOPInstanceUID)].dataset()
        assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert got.PixelData == original.PixelData


def test_jpeg_baseline_input_arrives_byte_identical(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, rule("jpeg-ls-lossless"))])
    path = data("color3d_jpeg_baseline.dcm")
    assert send(router.port, [path]) == [0]
    wait_until(lambda: pacs.count() == 1, 60, what="1 instance")
    got = pacs.received[0].dataset()
    original = dcmread(path)
    assert got.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert got.PixelData == original.PixelData


def test_destination_accepting_only_implicit_le_still_receives_everything(router_factory, pacs_factory):
    legacy = pacs_factory(transfer_syntaxes=[ImplicitVRLittleEndian])
    router = router_factory([Destination("LEGACY", legacy.port, rule("jpeg-ls-lossless"))])
    files = [data(n) for n in (CT, US, "MR2_J2KR.dcm", "emri_small_RLE.dcm")]
    assert send(router.port, files) == [0] * len(files)
    wait_until(lambda: legacy.count() == len(files), 60, what=f"all at the legacy workstation\n{router.log()}")
    received = legacy.by_uid()
    for path in files:
        original = dcmread(path)
        got = received[str(original.SOPInstanceUID)]
        assert got.transfer_syntax_uid == ImplicitVRLittleEndian
        assert np.array_equal(got.dataset().pixel_array, original.pixel_array), path.name
    text = router.metrics()
    assert metric_value(text, "dicom_router_fallbacks_total", destination="LEGACY",
                        reason="refused_by_destination") == len(files)
    assert "syntax_refused" in router.log()


def test_rules_route_per_destination_and_skip(router_factory, pacs_factory):
    pacs, archive = pacs_factory(name="pacs"), pacs_factory(name="archive", ae_title="ARCHIVE")
    router = router_factory([
        Destination("PACS", pacs.port, rule("jpeg-ls-lossless")),
        Destination("ARCHIVE", archive.port,
                    '[[rule]]\nname = "no CT"\nmatch = { Modality = "CT" }\nsyntax = "skip"\n'
                    '[[rule]]\nname = "rest"\nsyntax = "explicit-le"\n',
                    ae_title="ARCHIVE"),
    ])
    assert send(router.port, [data(CT), data(MR)]) == [0, 0]
    wait_until(lambda: pacs.count() == 2 and archive.count() == 1, 60, what="routing")
    assert {r.transfer_syntax_uid for r in pacs.received} == {JPEGLSLossless}
    assert archive.received[0].sop_instance_uid == str(dcmread(data(MR), stop_before_pixels=True).SOPInstanceUID)
    assert archive.received[0].calling_ae == "ROUTER"


def test_destination_down_then_up_receives_everything(router_factory, pacs_factory, tmp_path):
    from tests.support.peers import Pacs, free_port

    port = free_port()
    router = router_factory([Destination("PACS", port, rule("original"),
                                         retry="{ max_attempts = 100, backoff_s = 0.2, max_backoff_s = 1 }")])
    files = [data(n) for n in (CT, MR, US)]
    assert send(router.port, files) == [0, 0, 0]
    wait_until(lambda: metric_value(router.metrics(), "dicom_router_forward_failures_total",
                                    destination="PACS", outcome="retry") >= 3, 20, what="retries")
    late = Pacs(tmp_path / "late", port=port).start()
    try:
        wait_until(lambda: late.count() == 3, 30, what="delivery after the destination came up")
        assert metric_value(router.metrics(), "dicom_router_queue_jobs", destination="PACS", state="pending") == 0
    finally:
        late.stop()


def test_permanent_failure_becomes_dead_letter_and_queue_retry_resends(router_factory, pacs_factory):
    pacs = pacs_factory(status=0xA900)
    router = router_factory([Destination("PACS", pacs.port, rule("original"))])
    assert send(router.port, [data(CT)]) == [0]
    wait_until(lambda: "0xA900" in router.cli("queue", "dead").stdout, 20, what="a dead letter")
    listing = router.cli("queue").stdout
    assert "PACS" in listing and listing.split("PACS")[1].split()[:3] == ["0", "0", "1"]
    pacs.status = 0x0000
    result = router.cli("queue", "retry")
    assert result.returncode == 0 and "1 dead letter(s) put back" in result.stdout
    wait_until(lambda: pacs.count() == 1, 20, what="delivery after queue retry")


def test_rejects_with_out_of_resources_when_spool_is_below_floor(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, rule("original"))], min_free_mb=10**9)
    assert send(router.port, [data(CT)]) == [0xA700]
    assert list((router.spool / "instances").iterdir()) == []
    assert metric_value(router.metrics(), "dicom_router_rejected_total", reason="disk_full") == 1
    readiness = urllib.request.Request(f"http://127.0.0.1:{router.metrics_port}/readyz")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(readiness, timeout=5)
    assert refused.value.code == 503 and "spool below min_free_mb" in refused.value.read().decode()
