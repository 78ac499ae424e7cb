"""Intake, tested directly: the status a modality hears for a received file, and what is kept."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from router import metrics
from router.config import load_rule_file
from router.receive.intake import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Intake, Received
from router.queue.sqlite import SqliteQueue
from router.request import Request
from router.rules import Context
from router.queue.spool import Spool
from tests.support.peers import data

CT = data("693_UNCR.dcm")
MR = data("MR2_UNCR.dcm")
CONTEXT = Context(calling_ae="CT1", called_ae="ROUTER", source_ip="10.0.0.5")

PACS = """
[destination]
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[rule]]
name = "CT lossless"
match = { Modality = "CT", CallingAE = "CT*" }
syntax = "jpeg-ls-lossless"

[[rule]]
name = "the rest as received"
syntax = "original"
"""

ARCHIVE = """
[destination]
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 105

[[rule]]
name = "no MR"
match = { Modality = "MR" }
syntax = "skip"

[[rule]]
syntax = "rle"
"""


@pytest.fixture
def parts(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "PACS.toml").write_text(PACS)
    (rules / "ARCHIVE.toml").write_text(ARCHIVE)
    destinations = [load_rule_file(rules / "PACS.toml"), load_rule_file(rules / "ARCHIVE.toml")]
    spool = Spool(tmp_path / "spool")
    queue = SqliteQueue(tmp_path / "spool" / "queue.sqlite")
    woken: list[list[str]] = []
    intake = Intake(spool, queue, lambda: destinations, on_enqueued=woken.append)
    yield intake, spool, queue, woken
    queue.close()


def arrive(spool: Spool, source: Path, name: str = "rx.dcm") -> Received:
    """A file as pynetdicom leaves it in incoming/, with the UIDs of its C-STORE request."""
    path = spool.incoming / name
    shutil.copyfile(source, path)
    ds = dcmread(source, stop_before_pixels=True)
    return Received(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), CONTEXT)


def rejected(reason: str) -> float:
    return metrics.REJECTED.labels(reason=reason)._value.get()  # noqa: SLF001


def test_success_only_once_the_file_is_in_the_spool_and_its_jobs_are_queued(parts):
    intake, spool, queue, woken = parts
    received = arrive(spool, CT)
    assert intake.accept(received) == SUCCESS
    assert not received.path.exists()
    [path] = queue.paths()
    assert Path(path).parent == spool.instances and Path(path).read_bytes() == CT.read_bytes()
    requests = {job.destination: job.request for job in queue.jobs()}
    assert requests == {"PACS": Request(syntax="jpeg-ls-lossless"), "ARCHIVE": Request(syntax="rle")}
    assert woken == [["PACS", "ARCHIVE"]]


def test_the_rules_decide_per_destination_at_receipt(parts):
    intake, spool, queue, _ = parts
    assert intake.accept(arrive(spool, MR)) == SUCCESS
    assert {job.destination: job.request.syntax for job in queue.jobs()} == {"PACS": "original"}


def test_an_instance_no_destination_wants_is_acknowledged_and_not_kept(parts, tmp_path):
    _, spool, queue, _ = parts
    nobody = Intake(spool, queue, lambda: [])
    assert nobody.accept(arrive(spool, CT)) == SUCCESS
    assert queue.paths() == [] and list(spool.instances.iterdir()) == []


def test_a_full_spool_answers_out_of_resources(parts, tmp_path):
    _, _, queue, _ = parts
    full = Spool(tmp_path / "spool", min_free_mb=1 << 40)
    intake = Intake(full, queue, lambda: [])
    before = rejected("disk_full")
    received = arrive(full, CT)
    assert intake.accept(received) == OUT_OF_RESOURCES
    assert rejected("disk_full") == before + 1
    assert received.path.exists() and list(full.instances.iterdir()) == []  # left for the network layer


def test_an_instance_above_max_instance_mb_answers_out_of_resources(parts):
    intake, spool, queue, _ = parts
    small = Intake(spool, queue, intake.destinations, max_instance_mb=1)
    big = spool.incoming / "big.dcm"
    ds = dcmread(CT)
    ds.PixelData = ds.PixelData * 120  # > 1 MB; the header check is not reached
    ds.save_as(big)
    before = rejected("too_large")
    assert small.accept(Received(big, str(ds.SOPClassUID), str(ds.SOPInstanceUID), CONTEXT)) == OUT_OF_RESOURCES
    assert rejected("too_large") == before + 1 and queue.paths() == []


def test_a_data_set_that_cannot_be_understood_answers_c000(parts):
    intake, spool, queue, _ = parts
    received = arrive(spool, CT)
    whole = received.path.read_bytes()
    received.path.write_bytes(whole[:len(whole) // 2])  # cut inside the Pixel Data
    before = rejected("malformed")
    assert intake.accept(received) == CANNOT_UNDERSTAND
    assert rejected("malformed") == before + 1 and queue.paths() == []


def test_a_request_whose_uid_differs_from_the_data_set_is_refused(parts):
    intake, spool, queue, _ = parts
    received = arrive(spool, CT)
    lying = Received(received.path, received.sop_class_uid, "2.25.1234", CONTEXT)
    assert intake.accept(lying) == CANNOT_UNDERSTAND
    assert queue.paths() == []


def test_an_unavailable_queue_answers_out_of_resources_and_keeps_nothing(parts):
    intake, spool, queue, _ = parts
    queue._db().execute("DROP TABLE jobs")  # noqa: SLF001 - the database can no longer take the jobs
    before = rejected("error")
    assert intake.accept(arrive(spool, CT)) == OUT_OF_RESOURCES
    assert rejected("error") == before + 1
    assert list(spool.instances.iterdir()) == []


def test_the_receiving_side_loads_neither_numpy_nor_the_service_wiring():
    code = ("import sys, router.rules, router.config, router.request; "
            "assert 'numpy' not in sys.modules, 'numpy'; "
            "import router.receive.intake, router.receive.scp; "
            "assert 'router.operate.service' not in sys.modules and 'router.forward.forwarder' not in sys.modules, 'wiring'; "
            "assert 'router.codecs.transcode' not in sys.modules, 'transcoder'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
