"""What the command line and the console log show of text that came from the network: every
control character escaped (`\\x1b`, `\\n`), so that no value forges a line or drives the terminal.

The queue here is one an earlier router left (it accepted UIDs with control characters, spaces
and quotes), written through the queue's own interface; each command runs as a process and its
output bytes are read as a terminal would get them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from router.queue import Instance, NewJob
from router.queue.sqlite import SqliteQueue
from router.request import Request
from tests.support.peers import data

ESC = b"\x1b"
SOP = "1.2.3.4\x1b[31m\njob 99 PACS dead attempts=1 error=forged"
STUDY = "1.2.3\x1b]0;pwned\x07"
ERROR = "destination answered 0xC000\r\n\x1b[2Jdone \u202eevil"


@pytest.fixture
def site(tmp_path) -> Path:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "PACS.toml").write_text(
        '[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n[[rule]]\nsyntax = "original"\n')
    config = tmp_path / "router.toml"
    config.write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n[metrics]\nport = 0\n')
    queue = SqliteQueue(tmp_path / "spool" / "queue.sqlite")
    (tmp_path / "spool" / "metrics").mkdir()  # as `serve` leaves it, for purge's counter
    for uid, study in ((SOP, STUDY), ("1.2.3.5 error=forged", STUDY)):
        queue.add(Instance(path=str(tmp_path / "spool" / "x.dcm"), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                           sop_instance_uid=uid, study_instance_uid=study, transfer_syntax_uid="1.2.840.10008.1.2.1",
                           calling_ae="CT\x1b[1m1", called_ae="ROUTER", source_ip="::1", size=10,
                           received_at=time.time()), [NewJob("PACS", Request(syntax="original"), "t")])
    first = queue.jobs("PACS")[0]
    queue.dead(first.id, ERROR)
    queue.close()
    return config


def run(*args: str, exit_code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "router", *args], capture_output=True, timeout=120)
    assert result.returncode == exit_code, result.stderr.decode(errors="replace")
    return result


def assert_safe(output: bytes) -> str:
    """No byte a terminal would act on: no escape, bell, carriage return, no format character."""
    assert ESC not in output and b"\x07" not in output and b"\r" not in output, output
    text = output.decode()
    assert "\u202e" not in text
    return text


def test_queue_verbose_and_dead_print_uids_and_errors_escaped_one_line_per_job(site):
    listed = assert_safe(run("queue", "-v", "--config", str(site)).stdout)
    jobs = [line for line in listed.splitlines() if line.startswith("job ")]
    assert len(jobs) == 2, listed  # no forged line
    assert r"sop_instance_uid='1.2.3.4\x1b[31m\njob 99 PACS dead attempts=1 error=forged'" in jobs[0]
    assert r"error=destination answered 0xC000\r\n\x1b[2Jdone \u202eevil" in jobs[0]
    assert "sop_instance_uid='1.2.3.5 error=forged' error=-" in jobs[1]  # one value, not two fields
    dead = assert_safe(run("queue", "dead", "--config", str(site)).stdout)
    assert [line for line in dead.splitlines() if line.startswith("job ")] == jobs[:1]


def test_trace_prints_each_instance_on_one_line_escaped(site):
    traced = assert_safe(run("trace", "--study", STUDY, "--config", str(site)).stdout)
    lines = traced.splitlines()
    assert len(lines) == 4, traced  # the two jobs, the dead letter's history row and the summary: no forged line
    assert all(line.startswith((r"1.2.3.4\x1b[31m\njob 99", "1.2.3.5 error=forged")) for line in lines[:3])
    assert lines[0].startswith(r"1.2.3.4\x1b[31m\njob 99 PACS dead") and r"\x1b[2Jdone" in lines[0]


def test_explain_prints_attribute_values_escaped(tmp_path, site):
    ds = dcmread(data("693_UNCR.dcm"))
    ds.Modality = "CT\x1b[2J"
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    explained = assert_safe(run("explain", "--config", str(site), str(path)).stdout)
    assert explained.splitlines()[0].startswith(rf"{path}: CT\x1b[2J 1.2.840.10008.5.1.4.1.1.2")
    ds.Modality, ds.SOPInstanceUID = "CT", "1.2.3\x1b[2J"
    ds.save_as(path)
    refused = assert_safe(run("explain", "--config", str(site), str(path), exit_code=1).stdout)
    assert r"cannot read: SOPInstanceUID '1.2.3\x1b[2J' is not digits separated by dots" in refused


def test_the_log_lines_of_a_command_are_escaped(site):
    queue = SqliteQueue(site.parent / "spool" / "queue.sqlite")
    queue.add(Instance(path=str(site.parent / "spool" / "y.dcm"), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                       sop_instance_uid="1.2.3.6\x1b[8m", study_instance_uid=STUDY,
                       transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="CT1", called_ae="ROUTER",
                       source_ip="::1", size=10, received_at=time.time()),
              [NewJob("PACS", Request(syntax="original"), "t")])
    queue.dead(queue.jobs("PACS", "pending")[-1].id, "refused\x1b[8m")
    queue.close()
    purged = run("queue", "purge", "--dead", "--yes", "--config", str(site))
    shown = assert_safe(purged.stdout + purged.stderr)
    assert "2 dead letter(s) dropped" in shown and shown.count("dead_letter_purged") == 2
    assert r"1.2.3.4\x1b[31m\njob 99" in shown and r"sop_instance_uid=1.2.3.6\x1b[8m" in shown
    assert r"error=refused\x1b[8m" in shown


SCRIPT = """
import logging, sys, warnings
from router import log
log.configure(sys.argv[1])
log.get("intake").error("store_refused", sop_instance_uid="1.2\\x1b[31m\\nforged=1", calling_ae="CT\\x07")
logging.getLogger("pynetdicom").warning("peer said %s", "hi\\x1b[2J\\nthere")
warnings.warn("Invalid value for VR UI: \\x1b[31m\\nforged")
try:
    raise ValueError("bad\\x1b[2J value")
except ValueError:
    log.get("intake").exception("store_failed")
"""


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_log_lines_and_warnings_reach_stderr_escaped_in_either_format(fmt):
    import json

    result = subprocess.run([sys.executable, "-c", SCRIPT, fmt], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = assert_safe(result.stderr)
    assert "\nforged" not in text and "\nthere" not in text
    if fmt == "json":
        events = [json.loads(line) for line in text.splitlines()]
        assert [e["event"] for e in events] == ["store_refused", "peer said hi\x1b[2J\nthere", "python_warning",
                                                 "store_failed"]
        assert events[2]["category"] == "UserWarning" and events[2]["message"].endswith("\x1b[31m\nforged")
    else:
        assert r"1.2\x1b[31m\nforged=1" in text and r"CT\x07" in text and r"hi\x1b[2J\nthere" in text
        assert "python_warning" in text and r"Invalid value for VR UI: \x1b[31m\nforged" in text
        assert r"ValueError: bad\x1b[2J value" in text
