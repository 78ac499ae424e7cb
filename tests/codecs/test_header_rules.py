"""Header rules (set, template, map, remove) on real files, through the transcoder: what the output
says, read back by pydicom and by DCMTK, and what the rule file refuses where it loads."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from router.codecs.transcode import HeaderRefusal, transcode_file
from router.config import ConfigError, Rule, load_rule_file
from router.request import Request
from tests.support.peers import data

CT = data("693_UNCR.dcm")
LOSSY = data("color3d_jpeg_baseline.dcm")


def request(syntax: str = "original", **actions) -> Request:  # noqa: ANN003
    rule = Rule(syntax=syntax, **actions)
    return Request(syntax=syntax, header=rule.header, header_rule="test rule")


def rich(tmp_path: Path) -> Path:
    """The CT with a private group at the top and in a sequence item, and a request sequence."""
    ds = pydicom.dcmread(CT)
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", "secret private value")
    requested = []
    for number in ("RP1", "RP2"):
        item = Dataset()
        item.RequestedProcedureID = number
        item.add_new(0x00090010, "LO", "ACME 1.0")
        item.add_new(0x00091002, "LO", "nested private")
        requested.append(item)
    ds.RequestAttributesSequence = Sequence(requested)
    ds.AccessionNumber = "ACC123"
    ds.OtherPatientIDs = "OLD-ID"
    path = tmp_path / "rich.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_action_in_one_write_with_jpeg_ls_and_the_input_left_alone(tmp_path):
    source = rich(tmp_path)
    before = digest(source)
    original = pydicom.dcmread(source)
    out = transcode_file(source, tmp_path / "out.dcm", request(
        "jpeg-ls-lossless",
        set={"InstitutionName": "North Clinic", "0010,0021": "NORTH", "RequestAttributesSequence[*].RequestedProcedureID": "X"},
        template={"PatientID": "N-{PatientID}", "StudyID": "{AccessionNumber}"},
        remove=["OtherPatientIDs", "0009,xxxx"],
    ))
    assert digest(source) == before  # the spooled instance is never changed
    assert out.transfer_syntax_uid == "1.2.840.10008.1.2.4.80"
    ds = pydicom.dcmread(out.path)
    assert ds.InstitutionName == "North Clinic" and ds["InstitutionName"].VR == "LO"
    assert ds[0x00100021].value == "NORTH" and ds[0x00100021].VR == "LO"
    assert ds.PatientID == f"N-{original.PatientID}"
    assert ds.StudyID == "ACC123" and ds["StudyID"].VR == "SH"
    assert "OtherPatientIDs" not in ds
    assert not [e for e in ds if e.tag.group == 0x0009]
    for item in ds.RequestAttributesSequence:
        assert item.RequestedProcedureID == "X"
        assert not [e for e in item if e.tag.group == 0x0009]  # the private group, nested items too
    assert b"secret private value" not in out.path.read_bytes()
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert {action for action, _ in out.header} == {"set", "template", "remove"}
    if shutil.which("dcmdump"):
        dumped = subprocess.run(["dcmdump", str(out.path)], capture_output=True, text=True, timeout=60)
        assert dumped.returncode == 0, dumped.stderr
        assert "(0008,0080) LO [North Clinic]" in dumped.stdout


def test_original_with_header_rules_rewrites_the_header_and_keeps_the_lossy_pixels_as_received(tmp_path):
    original = pydicom.dcmread(LOSSY)
    out = transcode_file(LOSSY, tmp_path / "out.dcm", request(set={"InstitutionName": "Shared Archive"}))
    assert out.changed and out.path != LOSSY
    ds = pydicom.dcmread(out.path)
    assert ds.InstitutionName == "Shared Archive"
    assert str(ds.file_meta.TransferSyntaxUID) == str(original.file_meta.TransferSyntaxUID)
    assert ds.PixelData == original.PixelData  # not decoded, not recompressed
    assert ds.SOPInstanceUID == original.SOPInstanceUID


def test_a_codec_that_cannot_carry_the_image_still_applies_the_header_rules(tmp_path):
    # lossy JPEG cannot carry a 14-bit CT: forwarded as received, with its header rules
    out = transcode_file(CT, tmp_path / "out.dcm", Request(
        syntax="jpeg-lossy", header=Rule(syntax="original", set={"InstitutionName": "N"}).header))
    assert out.fallback_reason is not None and out.changed
    assert pydicom.dcmread(out.path).InstitutionName == "N"


def test_numbers_for_integer_and_decimal_strings_and_several_values(tmp_path):
    out = transcode_file(CT, tmp_path / "out.dcm", request(
        set={"SeriesNumber": 501, "SliceThickness": 1.25, "ImageType": ["DERIVED", "SECONDARY"]}))
    ds = pydicom.dcmread(out.path)
    assert ds.SeriesNumber == 501 and ds["SeriesNumber"].VR == "IS"
    assert float(ds.SliceThickness) == 1.25 and ds["SliceThickness"].VR == "DS"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]


def test_lossy_output_with_header_rules_gets_one_new_uid_and_its_bookkeeping(tmp_path):
    mr = data("MR2_UNCR.dcm")
    original = pydicom.dcmread(mr)
    out = transcode_file(mr, tmp_path / "out.dcm", request("jpeg-lossy", set={"InstitutionName": "N"}, quality=90))
    ds = pydicom.dcmread(out.path)
    assert ds.InstitutionName == "N" and ds.LossyImageCompression == "01"
    assert ds.SOPInstanceUID != original.SOPInstanceUID and out.sop_instance_uid == ds.SOPInstanceUID


def test_map_replaces_the_value_and_unmapped_keeps_it_or_refuses_without_saying_it(tmp_path):
    patient = str(pydicom.dcmread(CT).PatientID)
    table = tmp_path / "ids.csv"
    table.write_text(f"from,to\n{patient},ENT-000123\n")
    out = transcode_file(CT, tmp_path / "a.dcm", request(map={"PatientID": table}))
    assert pydicom.dcmread(out.path).PatientID == "ENT-000123"
    table.write_text("someone-else,ENT-9\n")  # the file changed: read again
    out = transcode_file(CT, tmp_path / "b.dcm", request(map={"PatientID": table}))
    assert pydicom.dcmread(out.path).PatientID == patient  # on_unmapped = "keep"
    with pytest.raises(HeaderRefusal) as refused:
        transcode_file(CT, tmp_path / "c.dcm", request(map={"PatientID": table}, on_unmapped="dead"))
    assert refused.value.reason == "unmapped"
    assert "PatientID" in str(refused.value) and patient not in str(refused.value)


def test_a_template_whose_result_does_not_fit_its_vr_is_refused(tmp_path):
    with pytest.raises(HeaderRefusal) as refused:
        transcode_file(CT, tmp_path / "out.dcm", request(template={"StationName": "{PatientID}-{PatientID}"}))
    assert "maximum length of 16 allowed for VR SH" in str(refused.value)


@pytest.mark.parametrize(("rule", "message"), [
    ('set = { StudyDate = "2024-13-01" }', "field set: set StudyDate: Invalid value for VR DA"),
    ('set = { InstitutionNam = "x" }', "field set: 'InstitutionNam': 'InstitutionNam' is not a DICOM keyword"),
    ('set = { StationName = "a-name-longer-than-16" }', "maximum length of 16 allowed for VR SH"),
    ('template = { PatientID = "{PatientId}" }', "field template: template PatientID: {PatientId} is not a DICOM keyword"),
    ('remove = ["SOPInstanceUID"]', "do not change the instance's identity"),
    ('set = { "0009,1001" = "x" }', "only remove takes it"),
    ('set = { "RequestAttributesSequence.RequestedProcedureID" = "x" }', "say which items of RequestAttributesSequence"),
    ('set = { PatientID = "a" }\ntemplate = { PatientID = "b{PatientID}" }', "one action per attribute"),
    ('map = { PatientID = "missing.csv" }', "field map.PatientID: file not found"),
])
def test_a_header_rule_that_cannot_apply_is_refused_where_the_rule_file_loads(tmp_path, rule, message):
    path = tmp_path / "SHARED.toml"
    path.write_text(f'[destination]\nae_title = "S"\nhost = "h"\nport = 104\n[[rule]]\nname = "north"\n'
                    f'syntax = "original"\n{rule}\n')
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    assert message in str(caught.value)
    assert "rule 1 ('north')" in str(caught.value)


def test_a_map_file_that_is_not_two_columns_is_refused(tmp_path):
    (tmp_path / "ids.csv").write_text("a,b,c\n")
    path = tmp_path / "SHARED.toml"
    path.write_text('[destination]\nae_title = "S"\nhost = "h"\nport = 104\n[[rule]]\nsyntax = "original"\n'
                    'map = { PatientID = "ids.csv" }\n')
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    assert "line 1 has 3 columns, not 2" in str(caught.value)


def test_explain_shows_the_changes_and_hides_patient_values_unless_asked(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "SHARED.toml").write_text(
        '[destination]\nae_title = "S"\nhost = "127.0.0.1"\nport = 104\n[[rule]]\nname = "north"\n'
        'syntax = "jpeg-ls-lossless"\nset = { InstitutionName = "North Clinic", Manufacturer = "ACME" }\n'
        'template = { PatientID = "N-{PatientID}" }\nremove = ["0009,xxxx"]\n')
    cfg = tmp_path / "router.toml"
    cfg.write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n')
    patient = str(pydicom.dcmread(CT).PatientID)

    def explain(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "router", "explain", "--config", str(cfg), *extra, str(CT)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    hidden = explain()
    assert "template PatientID: (value hidden: --show-values) -> (value hidden: --show-values)" in hidden
    assert f"set Manufacturer: {str(pydicom.dcmread(CT).Manufacturer)!r} -> 'ACME'" in hidden
    assert "remove 0009,xxxx" in hidden
    assert patient not in hidden
    assert f"template PatientID: {patient!r} -> 'N-{patient}'" in explain("--show-values")


def test_transcode_writes_what_a_destination_s_rules_make_of_a_file(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "SHARED.toml").write_text(
        '[destination]\nae_title = "S"\nhost = "127.0.0.1"\nport = 104\n[[rule]]\nname = "north"\n'
        'syntax = "jpeg-ls-lossless"\ntemplate = { PatientID = "N-{PatientID}" }\n')
    cfg = tmp_path / "router.toml"
    cfg.write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n')
    out = tmp_path / "out.dcm"
    done = subprocess.run([sys.executable, "-m", "router", "transcode", "--config", str(cfg), "--destination",
                           "SHARED", str(CT), str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ds = pydicom.dcmread(out)
    assert ds.PatientID == f"N-{pydicom.dcmread(CT).PatientID}"
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.80"
