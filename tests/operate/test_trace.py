"""`dicom-router trace`: where each instance of a study is, at each destination, from the
queue and the history, by the received or the sent UID."""

from __future__ import annotations

import json

import pydicom

from tests.support.peers import Destination, data, free_port, make_series, metric_value, send, wait_until


def test_trace_answers_where_is_the_study(router_factory, pacs, tmp_path):
    router = router_factory([
        Destination("PACS", pacs.port, '[[rule]]\nsyntax = "jpeg-lossy"\nquality = 80\n'),
        Destination("ARCHIVE", free_port(), '[[rule]]\nsyntax = "original"\n', ae_title="ARCHIVE",
                    retry="{ max_attempts = 50, backoff_s = 30, max_backoff_s = 60 }"),
    ])
    files = make_series(data("MR2_UNCR.dcm"), 3, tmp_path / "study")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, received_uid = str(first.StudyInstanceUID), str(first.SOPInstanceUID)
    assert send(router.port, files) == [0, 0, 0]
    wait_until(lambda: pacs.count() == 3, 30, what="the study at the PACS")
    wait_until(lambda: metric_value(router.metrics(), "dicom_router_forward_failures_total", destination="ARCHIVE",
                                    outcome="retry") >= 3, 30, what="the archive's first attempts")

    result = router.cli("trace", "--study", study)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "3 instance(s): 0/3 delivered to ARCHIVE (3 retrying); 3/3 delivered to PACS"
    assert sum("delivered" in line and "PACS" in line and "jpeg-lossy" in line for line in lines) == 3
    assert sum("retrying" in line and "cannot connect" in line for line in lines) == 3

    # the PACS got lossy copies under new SOP Instance UIDs: each maps back to its original
    sent_uid = next(r.sop_instance_uid for r in pacs.received
                    if str(pydicom.dcmread(r.path, stop_before_pixels=True).SourceImageSequence[0]
                           .ReferencedSOPInstanceUID) == received_uid)
    assert sent_uid != received_uid
    by_sent = json.loads(router.cli("trace", "--sop", sent_uid, "--json").stdout)
    states = {(w["destination"], w["state"]) for w in by_sent["instances"]}
    assert states == {("PACS", "delivered"), ("ARCHIVE", "retrying")}
    assert {w["sop_instance_uid"] for w in by_sent["instances"]} == {received_uid}
    assert [w["sent_sop_instance_uid"] for w in by_sent["instances"] if w["destination"] == "PACS"] == [sent_uid]


def test_trace_says_when_it_knows_nothing(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')])
    result = router.cli("trace", "--series", "2.25.999")
    assert result.returncode == 0 and "nothing known of it" in result.stdout
