"""DCMTK's echoscu and storescu as the modality, against the router, as a PACS administrator
would try it: C-ECHO, a whole series directory, and the called AE title check.
"""

from __future__ import annotations

import subprocess

import pydicom
import pytest

from tests.interop.conftest import PEER_ENV, assert_pixels_equal, copy_as_series, echoscu, require, storescu
from tests.support.peers import Destination, data, metric_value, wait_until

pytestmark = pytest.mark.interop


def test_echoscu_gets_an_answer_from_the_router(router_factory, pacs):
    require("echoscu")
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')])
    done = echoscu(router.port)
    assert done.returncode == 0, done.stdout + done.stderr


def test_router_refuses_an_association_addressed_to_another_ae_title(router_factory, pacs, tmp_path):
    require("echoscu", "storescu")
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')])
    assert echoscu(router.port, called_ae="NOT_ROUTER").returncode != 0
    with pytest.raises(AssertionError, match="storescu exited"):
        storescu(router.port, [data("MR2_UNCR.dcm")], called_ae="NOT_ROUTER")
    assert pacs.count() == 0


def test_storescu_sends_a_series_directory_and_the_pacs_gets_every_slice(router_factory, pacs, tmp_path):
    require("storescu")
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n')])
    files = copy_as_series([data("693_UNCR.dcm")], tmp_path / "series", copies=20)
    done = subprocess.run(
        ["storescu", "-aet", "CT_SCANNER", "-aec", "ROUTER", "+sd", "-R", "127.0.0.1", str(router.port),
         str(tmp_path / "series")],
        capture_output=True, text=True, timeout=120, env=PEER_ENV,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: pacs.count() >= len(files), 60, interval=0.2, what=f"{len(files)} slices at the PACS")
    received = pacs.by_uid()
    assert len(received) == len(files) == pacs.count()
    for path in files:
        original = pydicom.dcmread(path)
        got = received[str(original.SOPInstanceUID)]
        assert got.transfer_syntax_uid == "1.2.840.10008.1.2.4.80"
        assert_pixels_equal(original, got.dataset(), path.name)
    assert metric_value(router.metrics(), "dicom_router_received_instances_total", caller="CT_SCANNER") == len(files)
