"""What an operator sees of a real run: /metrics values, /healthz and /readyz, and the log."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pydicom import dcmread

from router import __version__
from tests.support.peers import Destination, RouterProcess, data, metric_value, send, wait_until

IMAGES = ("693_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm")
ORIGINAL = '[[rule]]\nname = "as received"\nsyntax = "original"\n'
FAST_RETRY = "{ max_attempts = 2, backoff_s = 0.1, max_backoff_s = 0.2 }"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def settled(router, predicate, what: str, timeout: float = 20) -> str:
    """The scrape once `predicate(scrape)` holds."""
    scrape = {}

    def check() -> bool:
        scrape["text"] = router.metrics()
        return predicate(scrape["text"])

    wait_until(check, timeout, 0.1, what)
    return scrape["text"]


def test_metrics_count_a_real_run(pacs, router_factory):
    router = router_factory([Destination("PACS", pacs.port, ORIGINAL)])
    files = [data(n) for n in IMAGES]
    assert send(router.port, files) == [0, 0, 0]
    wait_until(lambda: pacs.count() == 3, 20, what="three images at the PACS")
    m = settled(router, lambda t: metric_value(t, "dicom_router_end_to_end_seconds_count", destination="PACS") == 3,
                "three end-to-end observations")

    assert metric_value(m, "dicom_router_received_instances_total", caller="MODALITY") == 3
    assert metric_value(m, "dicom_router_associations_total", caller="MODALITY") == 1
    assert metric_value(m, "dicom_router_forwarded_instances_total", destination="PACS", syntax="original") == 3
    assert metric_value(m, "dicom_router_forward_seconds_count", destination="PACS") == 3
    assert metric_value(m, "dicom_router_forward_seconds_sum", destination="PACS") > 0
    for state in ("pending", "in_flight", "dead"):
        assert metric_value(m, "dicom_router_queue_jobs", destination="PACS", state=state) == 0, state
    assert metric_value(m, "dicom_router_oldest_pending_seconds", destination="PACS") == 0
    for quiet in ("dicom_router_rejected_total", "dicom_router_forward_failures_total", "dicom_router_fallbacks_total",
                  "dicom_router_skipped_total"):
        assert metric_value(m, quiet) == 0, quiet

    # bytes: what was made durable, and what went out unchanged, are the same files
    received = metric_value(m, "dicom_router_received_bytes_total", caller="MODALITY")
    forwarded = metric_value(m, "dicom_router_forwarded_bytes_total", destination="PACS", syntax="original")
    assert received == forwarded
    assert received == sum(r.path.stat().st_size for r in pacs.received)
    sent = sum(f.stat().st_size for f in files)
    assert abs(received - sent) < 1024 * len(files), (received, sent)  # only file meta headers may differ

    free = shutil.disk_usage(router.spool).free
    assert abs(metric_value(m, "dicom_router_spool_free_bytes") - free) < 0.05 * free + 64 * 1024**2


def test_cpu_is_counted_by_stage(pacs_factory, router_factory):
    """dicom_router_cpu_seconds_total says where the CPU went: receiving and spooling for every
    image, the codec stages only for a destination that transcodes, sending for both."""
    plain = pacs_factory(name="plain")
    small = pacs_factory(name="small", ae_title="SMALL")
    router = router_factory([Destination("PLAIN", plain.port, ORIGINAL)])
    files = [data("693_UNCR.dcm")] * 3
    assert send(router.port, files) == [0, 0, 0]
    wait_until(lambda: plain.count() == 3, 20, what="three images at the PACS")
    stages = ("receive", "spool", "decode", "encode", "verify", "write", "send")
    m = settled(router, lambda t: metric_value(t, "dicom_router_cpu_seconds_total", stage="send") > 0,
                "the forwarding process's CPU counted")
    cpu = {s: metric_value(m, "dicom_router_cpu_seconds_total", stage=s) for s in stages}
    assert cpu["receive"] > 0 and cpu["spool"] > 0, cpu
    assert cpu["decode"] == cpu["encode"] == cpu["verify"] == cpu["write"] == 0, cpu  # nothing was transcoded

    squeezed = router_factory([Destination("SMALL", small.port, '[[rule]]\nname = "jls"\nsyntax = "jpeg-ls-lossless"\n',
                                           ae_title="SMALL")])
    assert send(squeezed.port, files) == [0, 0, 0]
    wait_until(lambda: small.count() == 3, 30, what="three JPEG-LS images at the PACS")
    m = settled(squeezed, lambda t: metric_value(t, "dicom_router_cpu_seconds_total", stage="send") > 0,
                "the forwarding process's CPU counted")
    cpu = {s: metric_value(m, "dicom_router_cpu_seconds_total", stage=s) for s in stages}
    assert all(cpu[s] > 0 for s in stages), cpu
    # a 512x512 CT slice takes milliseconds, not seconds, in each codec stage
    assert all(cpu[s] < 3 for s in ("decode", "encode", "verify", "write")), cpu


def test_build_info_reports_the_running_version(pacs, router_factory):
    running = router_factory([Destination("PACS", pacs.port, ORIGINAL)])
    assert metric_value(running.metrics(), "dicom_router_build_info", version=__version__) == 1


def test_failures_fallbacks_and_skips_are_counted_per_destination(pacs_factory, router_factory):
    good = pacs_factory(name="good")
    busy = pacs_factory(name="busy", ae_title="BUSY", status=0xA700)
    broken = pacs_factory(name="broken", ae_title="BROKEN", status=0xC000)
    router = router_factory([
        Destination("GOOD", good.port, '[[rule]]\nname = "lossy"\nsyntax = "jpeg-lossy"\nquality = 90\n'
                                       'fallback = "jpeg-ls-lossless"\n'),
        Destination("BUSY", busy.port, ORIGINAL, ae_title="BUSY",
                    retry="{ max_attempts = 1000, backoff_s = 0.1, max_backoff_s = 0.2 }"),
        Destination("BROKEN", broken.port, ORIGINAL, ae_title="BROKEN", retry=FAST_RETRY),
        Destination("NOTHING", good.port, '[[rule]]\nname = "none"\nsyntax = "skip"\n'),
    ])
    # 693 is signed 16-bit CT: JPEG lossy cannot carry it, so it goes out in the fallback
    assert send(router.port, [data("693_UNCR.dcm"), data("US1_UNCR.dcm")]) == [0, 0]
    def done(t: str) -> bool:
        return (metric_value(t, "dicom_router_queue_jobs", destination="BROKEN", state="dead") == 2
                and metric_value(t, "dicom_router_forwarded_instances_total", destination="GOOD") == 2
                and metric_value(t, "dicom_router_forward_failures_total", destination="BUSY", outcome="retry") >= 2)

    m = settled(router, done, "dead letters at BROKEN, both images at GOOD, retries at BUSY")

    assert metric_value(m, "dicom_router_fallbacks_total", destination="GOOD", reason="codec_cannot_carry") == 1
    assert metric_value(m, "dicom_router_forwarded_instances_total", destination="GOOD", syntax="jpeg-ls-lossless") == 1
    assert metric_value(m, "dicom_router_forwarded_instances_total", destination="GOOD", syntax="jpeg-lossy") == 1
    assert metric_value(m, "dicom_router_transcode_seconds_count") >= 2
    assert metric_value(m, "dicom_router_forwarded_bytes_total", destination="GOOD") < metric_value(
        m, "dicom_router_received_bytes_total"), "compressed output should be smaller than what came in"

    assert metric_value(m, "dicom_router_forward_failures_total", destination="BROKEN", outcome="dead") == 2
    assert metric_value(m, "dicom_router_forwarded_instances_total", destination="BROKEN") == 0

    assert metric_value(m, "dicom_router_queue_jobs", destination="BUSY", state="dead") == 0
    assert metric_value(m, "dicom_router_queue_jobs", destination="BUSY", state="pending") + metric_value(
        m, "dicom_router_queue_jobs", destination="BUSY", state="in_flight") == 2
    assert metric_value(m, "dicom_router_forward_failures_total", destination="BUSY", outcome="dead") == 0
    time.sleep(1.1)
    assert metric_value(router.metrics(), "dicom_router_oldest_pending_seconds", destination="BUSY") >= 1

    assert metric_value(m, "dicom_router_skipped_total", destination="NOTHING") == 2
    assert metric_value(m, "dicom_router_queue_jobs", destination="NOTHING") == 0


def test_health_endpoints(pacs, router_factory):
    router = router_factory([Destination("PACS", pacs.port, ORIGINAL)])
    assert get(router.metrics_port, "/healthz") == (200, "ok\n")
    assert get(router.metrics_port, "/readyz") == (200, "ready\n")
    status, body = get(router.metrics_port, "/nothing-here")
    assert status == 404 and "/metrics" in body
    status, body = get(router.metrics_port, "/metrics")
    assert status == 200 and "# TYPE dicom_router_received_instances_total counter" in body


def test_a_metrics_file_being_created_or_broken_never_fails_the_scrape(pacs, router_factory):
    """A process's metrics file is empty for an instant when it is created (and for ever if the
    process was killed then); one may also be damaged. The scrape still answers, with every other
    process's counters, and a damaged file is logged."""
    router = router_factory([Destination("PACS", pacs.port, ORIGINAL)])
    assert send(router.port, [data(IMAGES[0])]) == [0]
    settled(router, lambda text: metric_value(text, "dicom_router_forwarded_instances_total") == 1, "forwarded")
    directory = router.spool / "metrics"
    (directory / "counter_999991.db").write_bytes(b"")
    (directory / "histogram_999992.db").write_bytes((4096).to_bytes(4, "little") + bytes(4) + b"\x7f" * 64)
    status, body = get(router.metrics_port, "/metrics")
    assert status == 200, body
    assert metric_value(body, "dicom_router_received_instances_total") == 1
    assert metric_value(body, "dicom_router_forwarded_instances_total", destination="PACS") == 1
    wait_until(lambda: "metrics_file_unreadable" in router.log(), 10, what="the damaged file logged")
    assert "counter_999991" not in router.log()  # an empty file is one being created: nothing to say


def log_events(text: str) -> list[dict]:
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
        assert isinstance(event, dict), line
        for key in ("event", "level", "timestamp"):
            assert key in event, f"log line {number} has no {key!r}: {line!r}"
        events.append(event)
    return events


def test_log_is_one_json_event_per_line(pacs, router_factory):
    router = router_factory([Destination("PACS", pacs.port, ORIGINAL)])
    assert send(router.port, [data(n) for n in IMAGES]) == [0, 0, 0]
    wait_until(lambda: pacs.count() == 3, 20, what="three images at the PACS")
    assert router.terminate() == 0
    events = log_events(router.log())
    names = [e["event"] for e in events]
    for expected in ("listening", "stored", "forwarded", "stopped"):
        assert expected in names, f"no {expected!r} event in {names}"
    assert {e["level"] for e in events} <= {"debug", "info", "warning", "error", "critical"}
    forwarded = [e for e in events if e["event"] == "forwarded"]
    assert len(forwarded) == 3
    uids = {str(dcmread(data(n), stop_before_pixels=True).SOPInstanceUID) for n in IMAGES}
    assert {e.get("sop_instance_uid") for e in forwarded} == uids
    assert {e.get("destination") for e in forwarded} == {"PACS"}


def test_console_log_format_is_for_humans(pacs, tmp_path):
    (tmp_path / "router").mkdir()
    router = RouterProcess(tmp_path / "router", [Destination("PACS", pacs.port, ORIGINAL)])
    log_path = tmp_path / "console.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--config", str(router.config), "--log-format", "console"],
            stdout=out, stderr=subprocess.STDOUT, cwd=router.workdir, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            wait_until(lambda: "listening" in log_path.read_text(errors="replace") or proc.poll() is not None, 30,
                       what="the listening line")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
    text = log_path.read_text(errors="replace")
    [line] = [ln for ln in text.splitlines() if "listening" in ln]
    assert not line.lstrip().startswith("{"), line
    assert "info" in line and f"port={router.port}" in line, line


def test_no_patient_data_in_logs_or_metrics(pacs_factory, router_factory, tmp_path):
    name, patient_id, birth_date = "ZZSECRETNAME^ZZGIVEN", "ZZPID-83519", "19020304"
    marked = []
    for source in IMAGES:
        ds = dcmread(data(source))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, patient_id, birth_date
        ds.OtherPatientIDs = patient_id
        path = tmp_path / source
        ds.save_as(path)
        marked.append(path)
    good = pacs_factory(name="good")
    broken = pacs_factory(name="broken", ae_title="BROKEN", status=0xC000)
    router = router_factory([
        Destination("GOOD", good.port, '[[rule]]\nname = "compress"\nsyntax = "jpeg-ls-lossless"\n'),
        Destination("BROKEN", broken.port, ORIGINAL, ae_title="BROKEN", retry=FAST_RETRY),
        Destination("BY_NAME", good.port, '[[rule]]\nname = "skip that patient"\n'
                                          f'match = {{ PatientID = "{patient_id}" }}\nsyntax = "skip"\n'),
    ])
    assert send(router.port, marked) == [0, 0, 0]
    wait_until(lambda: good.count() == 3, 20, what="three images at GOOD")
    m = settled(router, lambda t: metric_value(t, "dicom_router_queue_jobs", destination="BROKEN", state="dead") == 3,
                "three dead letters at BROKEN")
    assert metric_value(m, "dicom_router_skipped_total", destination="BY_NAME") == 3
    queue = router.cli("queue", "-v")
    assert router.terminate() == 0
    log = router.log()
    log_events(log)
    assert "forwarded" in log and "BROKEN" in log
    # the marker also in DICOM's caret-free and partial forms
    for secret in (name, "ZZSECRETNAME", "ZZGIVEN", patient_id, birth_date, "1902-03-04"):
        assert secret not in log, f"patient data {secret!r} in the log"
        assert secret not in m, f"patient data {secret!r} in /metrics"
        assert secret not in queue.stdout, f"patient data {secret!r} in `dicom-router queue -v`"
