"""A DICOMweb destination for real: DCMTK storescu as the modality, the router, and Orthanc with
Debian's DICOMweb plugin as the archive behind HTTP Basic authentication.

Orthanc 1.10 with DICOMweb 1.7 stores nothing of a part whose Content-Type carries
`transfer-syntax=` and answers 200 all the same: the router sees it and sends without it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pydicom
import pytest

from tests.interop.conftest import DICOMWEB_PLUGIN, assert_pixels_equal, copy_as_series, storescu
from tests.support.peers import Destination, data, metric_value, wait_until

pytestmark = [pytest.mark.interop]

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
USERS = {"router": "archive-secret"}
RETRY = "{ max_attempts = 100, backoff_s = 0.5, max_backoff_s = 2 }"


@pytest.fixture
def archive(orthanc_factory):
    if not __import__("pathlib").Path(DICOMWEB_PLUGIN).exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (scripts/install-peers.sh installs orthanc-dicomweb)")
    return orthanc_factory(users=USERS)


def stow_destination(name: str, archive, tmp_path, rules: str, password: str = USERS["router"],  # noqa: ANN001
                     extra: str = "", retry: str = RETRY) -> Destination:
    secret = tmp_path / f"{name}.password"
    secret.write_text(password + "\n")
    return Destination(name, 0, rules, url=archive.dicomweb_url, retry=retry,
                       extra=f'auth = {{ username = "router", password_file = "{secret}" }}\n{extra}')


def test_a_ct_series_arrives_as_jpeg_ls_with_identical_pixels_and_lossy_input_as_received(archive, router_factory,
                                                                                          tmp_path):
    router = router_factory([stow_destination("ARCHIVE", archive, tmp_path, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n')])
    series = copy_as_series([data("693_UNCR.dcm")], tmp_path / "ct", copies=6)
    lossy = copy_as_series([data("color3d_jpeg_baseline.dcm")], tmp_path / "lossy", copies=1)
    storescu(router.port, series + lossy)
    wait_until(lambda: archive.count() == 7, 60, interval=0.2, what="every instance in Orthanc")
    stored = archive.by_uid()
    for path in series:
        original = pydicom.dcmread(path)
        ts, ds = stored[str(original.SOPInstanceUID)]
        assert ts == JPEG_LS_LOSSLESS
        assert_pixels_equal(original, ds, f"{path.name} through STOW-RS")
    [lossy_path] = lossy
    original = pydicom.dcmread(lossy_path)
    ts, ds = stored[str(original.SOPInstanceUID)]
    assert ts == str(original.file_meta.TransferSyntaxUID)  # never recompressed
    assert ds.PixelData == original.PixelData
    text = router.metrics()
    assert metric_value(text, "dicom_router_stow_requests_total", destination="ARCHIVE", status="2xx") >= 1
    assert "stow_part_transfer_syntax_ignored" in router.log()  # Orthanc 1.10 + DICOMweb 1.7, detected


def test_htj2k_arrives_as_htj2k_with_identical_pixels(archive, router_factory, tmp_path):
    router = router_factory([stow_destination("ARCHIVE", archive, tmp_path, '[[rule]]\nsyntax = "htj2k-lossless"\n')])
    series = copy_as_series([data("693_UNCR.dcm")], tmp_path / "ct", copies=2)
    storescu(router.port, series)
    wait_until(lambda: archive.count() == 2, 60, interval=0.2, what="both instances in Orthanc")
    # Orthanc 1.10 stores HTJ2K through STOW-RS (its metadata has no TransferSyntax for it): the file says
    stored = {str(ds.SOPInstanceUID): ds for ds in map(archive.dataset, archive.instances())}
    for path in series:
        original = pydicom.dcmread(path)
        ds = stored[str(original.SOPInstanceUID)]
        assert str(ds.file_meta.TransferSyntaxUID) == HTJ2K_LOSSLESS
        assert_pixels_equal(original, ds, "HTJ2K through STOW-RS")


@pytest.mark.slow
def test_orthanc_stopped_for_20_s_mid_burst_loses_nothing(archive, router_factory, tmp_path):
    router = router_factory([stow_destination("ARCHIVE", archive, tmp_path, '[[rule]]\nsyntax = "original"\n')])
    files = copy_as_series([data("OBXXXX1A_rle.dcm")], tmp_path / "burst", copies=300)
    first, second = files[:100], files[100:]
    storescu(router.port, first)
    wait_until(lambda: archive.count() >= 20, 60, interval=0.1, what="Orthanc to store some of the burst")
    archive.stop(signal.SIGTERM)
    stopped = time.monotonic()
    storescu(router.port, second)  # acknowledged while the archive is down
    time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
    assert metric_value(router.metrics(), "dicom_router_forward_failures_total", outcome="retry") > 0
    archive.start()
    wait_until(lambda: archive.count() == 300, 180, interval=0.5, what="every acknowledged instance after the restart")
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert set(archive.by_uid()) == expected
    wait_until(lambda: metric_value(router.metrics(), "dicom_router_queue_jobs", state="pending") == 0, 30,
               what="the queue drained")
    assert metric_value(router.metrics(), "dicom_router_forward_failures_total", outcome="dead") == 0


def test_a_wrong_password_delivers_nothing_says_why_and_retried_dead_letters_go_once_fixed(archive, router_factory,
                                                                                          tmp_path):
    destination = stow_destination("ARCHIVE", archive, tmp_path, '[[rule]]\nsyntax = "original"\n', password="Tr0ub4dor-not-it")
    router = router_factory([destination])
    files = copy_as_series([data("693_UNCR.dcm")], tmp_path / "ct", copies=3)
    storescu(router.port, files)

    def queue(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "router", "queue", *args, "--config", str(router.config)],
                              capture_output=True, text=True, timeout=60)

    wait_until(lambda: "HTTP 401" in queue("dead").stdout, 60, interval=0.3, what="the dead letters, with the reason")
    dead = queue("dead").stdout
    assert dead.count("HTTP 401") == 3, dead
    assert "Tr0ub4dor" not in dead and "Tr0ub4dor" not in router.log()
    assert router.log().count("destination_refused_credentials") == 1  # once while it lasts
    assert archive.count() == 0
    traced = subprocess.run([sys.executable, "-m", "router", "trace", "--config", str(router.config), "--sop",
                             str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)],
                            capture_output=True, text=True, timeout=60)
    assert "ARCHIVE" in traced.stdout and "dead" in traced.stdout and "HTTP 401" in traced.stdout, traced.stdout
    (tmp_path / "ARCHIVE.password").write_text(USERS["router"] + "\n")  # fixed on disk, no restart
    retried = queue("retry", "--destination", "ARCHIVE")
    assert retried.returncode == 0, retried.stderr
    wait_until(lambda: archive.count() == 3, 60, interval=0.2, what="the retried dead letters in Orthanc")
