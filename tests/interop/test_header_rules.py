"""Header rules for real: storescu -> router -> Orthanc, the shared archive groups what arrives
under the coerced patient, and DCMTK reads every file."""

from __future__ import annotations

import shutil
import subprocess

import pydicom
import pytest

from tests.interop.conftest import assert_pixels_equal, copy_as_series, storescu
from tests.support.peers import Destination, data, metric_value, wait_until

pytestmark = [pytest.mark.interop]


def test_a_site_prefix_and_a_removed_private_group_reach_orthanc(orthanc, router_factory, tmp_path):
    rules = ('[[rule]]\nname = "north"\nsyntax = "jpeg-ls-lossless"\n'
             'set = { InstitutionName = "North Clinic", "0010,0021" = "NORTH" }\n'
             'template = { PatientID = "N-{PatientID}" }\nremove = ["0009,xxxx"]\n')
    router = router_factory([Destination("ORTHANC", orthanc.dicom_port, rules, ae_title=orthanc.ae_title)])
    series = copy_as_series([data("693_UNCR.dcm")], tmp_path / "ct", copies=3)
    for path in series:  # a private group a PACS chokes on
        ds = pydicom.dcmread(path)
        ds.add_new(0x00090010, "LO", "ACME")
        ds.add_new(0x00091001, "LO", "private detail")
        ds.save_as(path)
    original = pydicom.dcmread(series[0])
    storescu(router.port, series)
    wait_until(lambda: orthanc.count() == 3, 60, interval=0.2, what="the series in Orthanc")
    [patient] = orthanc.get_json("/patients")
    assert orthanc.get_json(f"/patients/{patient}")["MainDicomTags"]["PatientID"] == f"N-{original.PatientID}"
    for ts, ds in orthanc.by_uid().values():
        assert ts == "1.2.840.10008.1.2.4.80"
        assert ds.InstitutionName == "North Clinic" and ds.IssuerOfPatientID == "NORTH"
        assert not [e for e in ds if e.tag.group == 0x0009]
        assert_pixels_equal(original, ds, "coerced JPEG-LS")
    if shutil.which("dcmdump"):
        instance = orthanc.instances()[0]
        path = tmp_path / "stored.dcm"
        path.write_bytes(orthanc.file(instance))
        dumped = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60)
        assert dumped.returncode == 0 and "(0010,0020) LO [N-" in dumped.stdout, dumped.stderr
    text = router.metrics()
    assert metric_value(text, "dicom_router_header_changes_total", destination="ORTHANC", rule="north",
                        action="template") == 3


def test_two_nodes_with_one_key_give_orthanc_one_pseudonymous_patient_study_and_series(orthanc, router_factory,
                                                                                      tmp_path):
    from pathlib import Path

    from pydicom.data import get_testdata_file

    series = sorted(Path(get_testdata_file("dicomdirtests/98892003/MR700/4467")).parent.iterdir())
    secret = tmp_path / "deid.key"
    secret.write_text("the research key shared by both nodes\n")
    rules = (f'[[rule]]\nname = "research copy"\nsyntax = "jpeg-ls-lossless"\n'
             f'deidentify = {{ secret_file = "{secret}", options = ["retain-longitudinal-modified-dates"] }}\n')
    nodes = [router_factory([Destination("ORTHANC", orthanc.dicom_port, rules, ae_title=orthanc.ae_title)])
             for _ in range(2)]
    storescu(nodes[0].port, series[:4])
    storescu(nodes[1].port, series[4:])
    wait_until(lambda: orthanc.count() == len(series), 60, interval=0.2, what="the series in Orthanc")
    original = pydicom.dcmread(series[0])
    [patient] = orthanc.get_json("/patients")
    tags = orthanc.get_json(f"/patients/{patient}")["MainDicomTags"]
    assert tags["PatientID"] != original.PatientID and len(tags["PatientID"]) == 12
    assert len(orthanc.get_json("/studies")) == 1 and len(orthanc.get_json("/series")) == 1
    secrets = [str(original.PatientName).encode(), str(original.PatientID).encode(),
               str(original.StudyInstanceUID).encode()]
    for instance in orthanc.instances():
        stored = orthanc.file(instance)
        assert [s for s in secrets if s in stored] == []
    for ts, ds in orthanc.by_uid().values():
        assert ts == "1.2.840.10008.1.2.4.80" and ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert metric_value(nodes[0].metrics(), "dicom_router_header_changes_total", destination="ORTHANC",
                        rule="research copy", action="deidentify") > 0
