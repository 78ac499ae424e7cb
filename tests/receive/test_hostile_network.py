"""Hostile input over the network: broken data sets sent to a running router.

Each malformed file of ``tests.support.malformed.CATALOGUE`` goes out on its own association, its
bytes streamed after a valid file meta without being decoded. The router must refuse what
it cannot parse (0xC000-range status, counted and logged), store and forward unchanged what
it only cannot transcode (counted as a codec_error fallback), and keep serving: after the
batch a good image is stored and forwarded, C-ECHO answers, memory stays bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from router.compat.pynetdicom import park_reactor

from tests.support import malformed
from tests.support.malformed import CATALOGUE, Case
from tests.support.peers import Destination, Pacs, RouterProcess, echo, metric_value, send, wait_until

RULES = """
[[rule]]
name = "decompress"
match = { CallingAE = "TO_EXPLICIT" }
syntax = "explicit-le"

[[rule]]
name = "large 16-bit images: JPEG-LS lossless"
match = { BitsStored = ">12" }
syntax = "jpeg-ls-lossless"

[[rule]]
name = "everything else"
syntax = "jpeg-ls-lossless"
"""
CALLING = {"explicit-le": "TO_EXPLICIT", "jpeg-ls-lossless": "TO_JLS"}
RSS_LIMIT_MB = 500

# what the router does today that a user would not accept, by case name
def _param(case: Case):  # noqa: ANN202
    marks = []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    pacs = Pacs(root / "pacs").start()
    router = RouterProcess(root / "router", [Destination("PACS", pacs.port, RULES)])
    try:
        router.start()
        yield router, pacs, root
    finally:
        router.kill()
        pacs.stop()


def send_raw(port: int, paths: list[Path], calling_ae: str) -> list[int]:
    """C-STORE each file's data set bytes as they are, all on one new association.

    One status per file; -1 when no response came.
    """
    metas = [read_file_meta_info(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for pair in dict.fromkeys((str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER")
    if not assoc.is_established:
        return [-1] * len(paths)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses = []
    try:
        for path in paths:
            if not assoc.is_established:
                statuses.append(-1)
                continue
            park_reactor(assoc)
            rsp = assoc.send_c_store(path)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    return statuses


def log_events(router: RouterProcess, uid: str) -> list[dict]:
    events = []
    for line in router.log().splitlines():
        if uid not in line:
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("case", [_param(c) for c in CATALOGUE])
def test_malformed_data_set(peers, case: Case):
    router, pacs, root = peers
    uid = case.unique_uid()
    path = case.write(root / "cases", uid)
    before = router.metrics()
    [status] = send_raw(router.port, [path], CALLING[case.target])
    assert status != -1, f"no C-STORE response\n{router.log()[-3000:]}"
    assert router.proc.poll() is None, "the router died"

    def counted(name: str, **labels: str) -> float:
        return metric_value(router.metrics(), name, **labels) - metric_value(before, name, **labels)

    rejected = 0xC000 <= status <= 0xCFFF
    if case.expect == "reject" or (case.expect == "either" and status != 0):
        assert rejected, f"{case.name}: answered 0x{status:04X}, expected 0xC000-0xCFFF"
        assert counted("dicom_router_rejected_total", reason="malformed") == 1
        refusals = [e for e in log_events(router, uid) if e.get("event") == "store_refused"]
        assert refusals and "0xC" in refusals[0].get("status", ""), refusals
        assert refusals[0].get("reason"), refusals
        assert uid not in pacs.by_uid()
        return
    assert status == 0x0000, f"{case.name}: answered 0x{status:04X}, expected success"
    wait_until(lambda: uid in pacs.by_uid(), 30, what=f"{case.name} at the PACS\n{router.log()[-3000:]}")
    arrived = pacs.by_uid()[uid]
    as_received = malformed.split(arrived.path.read_bytes())[1] == case.body_for(uid)
    if case.expect != "stored":
        assert as_received, f"{case.name}: not forwarded byte for byte as received"
        assert counted("dicom_router_fallbacks_total", destination="PACS", reason="codec_error") == 1
        failures = [e for e in log_events(router, uid) if e.get("event") == "transcode_failed"]
        assert failures and failures[0].get("error"), failures
    assert counted("dicom_router_rejected_total") == 0


def test_router_still_serves_after_the_hostile_batch(peers, tmp_path):
    router, pacs, root = peers
    # the whole catalogue again, one association per outbound syntax, many data sets on each
    for target, calling in CALLING.items():
        cases = [c for c in CATALOGUE if c.target == target]
        paths = [c.write(root / "batch" / target, c.unique_uid()) for c in cases]
        statuses = send_raw(router.port, paths, calling)
        assert -1 not in statuses, dict(zip([c.name for c in cases], statuses))
    assert router.proc.poll() is None, "the router died"
    ds = dcmread(malformed.seed("native").path)
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    good = tmp_path / "good.dcm"
    ds.save_as(good, enforce_file_format=True)
    assert send(router.port, [good], calling_ae="TO_JLS") == [0]
    wait_until(lambda: uid in pacs.by_uid(), 30, what=f"the good image at the PACS\n{router.log()[-3000:]}")
    arrived = pacs.by_uid()[uid]
    assert arrived.transfer_syntax_uid == "1.2.840.10008.1.2.4.80"
    assert (arrived.dataset().pixel_array == ds.pixel_array).all()
    assert echo(router.port)
    assert rss_mb(router.proc.pid) < RSS_LIMIT_MB
    assert router.proc.poll() is None, "the router died"
