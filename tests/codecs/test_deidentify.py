"""De-identification (PS3.15 Annex E, Basic Profile and its options) on real files with rich
headers, through the transcoder: what the output holds, byte for byte, read back by pydicom and
DCMTK, and what the rule file refuses where it loads."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from router.codecs.transcode import HeaderRefusal, transcode_file
from router.config import ConfigError, Rule, load_rule_file
from router.request import Request
from tests.support.peers import data

SIEMENS = data("MR-SIEMENS-DICOM-WithOverlays.dcm")  # institution, station, physicians, private groups, overlays, icon
SERIES = sorted(Path(get_testdata_file("dicomdirtests/98892003/MR700/4467")).parent.iterdir())  # 7 MR images, one series
SR = Path(get_testdata_file("test-SR.dcm"))
US = data("US1_UNCR.dcm")
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StationName",
               "InstitutionAddress", "RequestingPhysician", "DeviceSerialNumber")


def key(tmp_path: Path, name: str = "deid.key") -> Path:
    path = tmp_path / name
    if not path.exists():
        path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    return path


def request(tmp_path: Path, syntax: str = "original", options: list[str] | None = None, secret: Path | None = None,
            burned_in: str = "refuse", safe_private: dict | None = None, **coercion) -> Request:  # noqa: ANN003
    rule = Rule(syntax=syntax, deidentify={"options": options or [], "secret_file": secret or key(tmp_path),
                                           "burned_in": burned_in, "safe_private": safe_private or {}}, **coercion)
    return Request(syntax=syntax, header=rule.header, header_rule="research copy")


def identifying_values(ds: Dataset) -> list[bytes]:
    found = []
    for keyword in IDENTIFYING:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        for item in value if isinstance(value, pydicom.multival.MultiValue) else [value]:
            text = str(item).strip()
            if len(text) >= 4:
                found.append(text.encode())
    return found


def test_the_output_holds_none_of_the_identifying_values_and_says_how_it_was_made(tmp_path):
    original = pydicom.dcmread(SIEMENS)
    values = identifying_values(original)
    assert len(values) >= 6  # name, ID, birth date, accession, institution, station at least
    out = transcode_file(SIEMENS, tmp_path / "out.dcm", request(tmp_path, "jpeg-ls-lossless"))
    written = out.path.read_bytes()
    assert [v for v in values if v in written] == []
    ds = pydicom.dcmread(out.path)
    assert ds.PatientIdentityRemoved == "YES"
    assert "Basic Application Confidentiality Profile" in list(ds.DeidentificationMethod)
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert not [e for e in ds.iterall() if e.tag.is_private]
    assert not [e for e in ds if e.tag.group & 0xFF00 == 0x6000 and e.tag.element == 0x3000]  # overlay data
    assert "StudyDate" not in ds or ds.StudyDate == ""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert ds[keyword].value.startswith("2.25.") and ds[keyword].value != original[keyword].value
        assert len(ds[keyword].value) <= 64
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.PatientID == ds.PatientName and len(ds.PatientID) == 12  # the pseudonym
    assert np.array_equal(ds.pixel_array, original.pixel_array)  # lossless: the pixels bit for bit
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.80"
    if shutil.which("dcmdump"):
        dumped = subprocess.run(["dcmdump", "+U8", str(out.path)], capture_output=True, text=True, timeout=60)
        assert dumped.returncode == 0, dumped.stderr
        assert "(0012,0062) CS [YES]" in dumped.stdout


def test_as_received_with_de_identification_rewrites_the_header_and_keeps_the_pixels(tmp_path):
    original = pydicom.dcmread(SIEMENS)
    out = transcode_file(SIEMENS, tmp_path / "out.dcm", request(tmp_path))
    assert out.changed
    ds = pydicom.dcmread(out.path)
    assert ds.PixelData == original.PixelData
    assert ds.PatientIdentityRemoved == "YES" and str(original.PatientName).encode() not in out.path.read_bytes()
    assert out.sop_instance_uid == ds.SOPInstanceUID != original.SOPInstanceUID  # what the trace maps


def test_a_series_keeps_one_study_series_frame_of_reference_and_patient_across_two_nodes(tmp_path):
    secret = key(tmp_path)
    outputs = [pydicom.dcmread(transcode_file(path, tmp_path / f"a{n}.dcm", request(tmp_path, secret=secret)).path)
               for n, path in enumerate(SERIES)]
    originals = [pydicom.dcmread(path) for path in SERIES]
    assert len({o.SeriesInstanceUID for o in originals}) == 1 and len(SERIES) >= 3
    assert len({ds.StudyInstanceUID for ds in outputs}) == 1
    assert len({ds.SeriesInstanceUID for ds in outputs}) == 1
    assert len({ds.FrameOfReferenceUID for ds in outputs}) == 1
    assert len({ds.PatientID for ds in outputs}) == 1
    assert len({ds.SOPInstanceUID for ds in outputs}) == len(SERIES)
    # another node: another process, the same key file (copied), the same new identities
    (tmp_path / "node-b").mkdir()
    copied = tmp_path / "node-b" / "deid.key"
    copied.write_bytes(secret.read_bytes())
    other = tmp_path / "b.dcm"
    script = ("import sys; from router.codecs.transcode import transcode_file; from router.config import Rule; "
              "from router.request import Request; "
              "rule = Rule(syntax='original', deidentify={'secret_file': sys.argv[3]}); "
              "transcode_file(sys.argv[1], sys.argv[2], Request(syntax='original', header=rule.header))")
    done = subprocess.run([sys.executable, "-c", script, str(SERIES[1]), str(other), str(copied)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    b = pydicom.dcmread(other)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert b[keyword].value == outputs[1][keyword].value, keyword
    # a node with another key: nothing in common
    c = pydicom.dcmread(transcode_file(SERIES[1], tmp_path / "c.dcm",
                                       request(tmp_path, secret=key(tmp_path, "other.key"))).path)
    assert c.StudyInstanceUID != b.StudyInstanceUID and c.PatientID != b.PatientID


def test_references_between_instances_point_to_the_new_uids(tmp_path):
    secret = key(tmp_path)
    referring = pydicom.dcmread(SIEMENS)
    referenced_uid = referring.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    target = pydicom.dcmread(SIEMENS)  # the instance it refers to, as another file of the study
    target.SOPInstanceUID = referenced_uid
    target_path = tmp_path / "target.dcm"
    target.save_as(target_path, enforce_file_format=True)
    a = pydicom.dcmread(transcode_file(SIEMENS, tmp_path / "a.dcm", request(tmp_path, secret=secret)).path)
    b = pydicom.dcmread(transcode_file(target_path, tmp_path / "b.dcm", request(tmp_path, secret=secret)).path)
    assert a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
    assert a.ReferencedImageSequence[0].ReferencedSOPClassUID == referring.ReferencedImageSequence[0].ReferencedSOPClassUID
    # a structured report: its content's references and observer names, nested items too
    original = pydicom.dcmread(SR)
    sr = transcode_file(SR, tmp_path / "sr.dcm", request(tmp_path, secret=secret))
    written = sr.path.read_bytes()
    assert [v for v in identifying_values(original) if v in written] == []
    assert str(original.StudyInstanceUID).encode() not in written
    for element in pydicom.dcmread(sr.path).iterall():
        if element.VR == "UI" and not any(k in element.keyword for k in ("Class", "TransferSyntax", "CodingScheme")):
            assert str(element.value).startswith("2.25."), element.keyword


def test_lossy_and_de_identified_gets_one_new_uid_the_same_on_every_run(tmp_path):
    secret = key(tmp_path)
    mr = data("MR2_UNCR.dcm")
    lossless = pydicom.dcmread(transcode_file(mr, tmp_path / "l.dcm", request(tmp_path, secret=secret)).path)
    runs = [pydicom.dcmread(transcode_file(mr, tmp_path / f"q{n}.dcm",
                                           request(tmp_path, "jpeg-lossy", secret=secret)).path) for n in range(2)]
    assert runs[0].SOPInstanceUID == runs[1].SOPInstanceUID != lossless.SOPInstanceUID
    assert runs[0].SOPInstanceUID.startswith("2.25.")
    assert runs[0].LossyImageCompression == "01" and "Lossy compression" in runs[0].DerivationDescription
    assert runs[0].SourceImageSequence[-1].ReferencedSOPInstanceUID == lossless.SOPInstanceUID
    assert runs[0].StudyInstanceUID == lossless.StudyInstanceUID


def _with_description(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(SIEMENS)
    family = str(ds.PatientName).split("^")[0]
    ds.SeriesDescription = f"t1 follow-up {family}"
    path = tmp_path / "described.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(("option", "keyword"), [
    ("retain-uids", "StudyInstanceUID"),
    ("retain-device-identity", "StationName"),
    ("retain-institution-identity", "InstitutionName"),
    ("retain-patient-characteristics", "PatientSex"),
    ("retain-longitudinal-full-dates", "StudyDate"),
])
def test_each_retain_option_keeps_what_the_profile_would_change(tmp_path, option, keyword):
    original = pydicom.dcmread(SIEMENS)
    assert original.get(keyword) not in (None, "")
    without = pydicom.dcmread(transcode_file(SIEMENS, tmp_path / "a.dcm", request(tmp_path)).path)
    kept = pydicom.dcmread(transcode_file(SIEMENS, tmp_path / "b.dcm", request(tmp_path, options=[option])).path)
    assert without.get(keyword) != original[keyword].value
    assert kept[keyword].value == original[keyword].value
    code = {"retain-uids": "113110", "retain-device-identity": "113109", "retain-institution-identity": "113112",
            "retain-patient-characteristics": "113108", "retain-longitudinal-full-dates": "113106"}[option]
    assert code in [c.CodeValue for c in kept.DeidentificationMethodCodeSequence]


def test_modified_dates_move_every_date_of_a_patient_by_the_same_days(tmp_path):
    import datetime

    secret = key(tmp_path)
    originals = [pydicom.dcmread(path) for path in SERIES[:2]]
    outputs = [pydicom.dcmread(transcode_file(path, tmp_path / f"{n}.dcm", request(
        tmp_path, options=["retain-longitudinal-modified-dates"], secret=secret)).path)
        for n, path in enumerate(SERIES[:2])]

    def day(text: str) -> datetime.date:
        return datetime.datetime.strptime(str(text)[:8], "%Y%m%d").date()

    shifts = {(day(o.StudyDate) - day(d.StudyDate)).days for o, d in zip(originals, outputs, strict=True)}
    shifts |= {(day(o.ContentDate) - day(d.ContentDate)).days for o, d in zip(originals, outputs, strict=True)
               if o.get("ContentDate")}
    assert len(shifts) == 1 and 1 <= shifts.pop() <= 3650
    assert outputs[0].StudyDate != originals[0].StudyDate
    assert outputs[0].LongitudinalTemporalInformationModified == "MODIFIED"


def test_clean_descriptors_keeps_a_description_without_the_patient_s_name(tmp_path):
    path = _with_description(tmp_path)
    family = str(pydicom.dcmread(path).PatientName).split("^")[0]
    without = pydicom.dcmread(transcode_file(path, tmp_path / "a.dcm", request(tmp_path)).path)
    cleaned = pydicom.dcmread(transcode_file(path, tmp_path / "b.dcm",
                                             request(tmp_path, options=["clean-descriptors"])).path)
    assert "SeriesDescription" not in without
    assert cleaned.SeriesDescription == "t1 follow-up"
    assert family.encode() not in (tmp_path / "b.dcm").read_bytes()


def test_coercion_follows_the_de_identification(tmp_path):
    out = transcode_file(SIEMENS, tmp_path / "out.dcm", request(
        tmp_path, set={"PatientName": "RESEARCH^001", "ClinicalTrialSponsorName": "Study 7"}))
    ds = pydicom.dcmread(out.path)
    assert ds.PatientName == "RESEARCH^001" and ds.ClinicalTrialSponsorName == "Study 7"
    assert ds.PatientIdentityRemoved == "YES"
    assert {action for action, _ in out.header} == {"deidentify", "set"}


def test_pixels_that_may_carry_a_name_are_refused_unless_allowed(tmp_path):
    assert "BurnedInAnnotation" not in pydicom.dcmread(US) and pydicom.dcmread(US).Modality == "US"
    with pytest.raises(HeaderRefusal) as refused:
        transcode_file(US, tmp_path / "a.dcm", request(tmp_path))
    assert refused.value.reason == "burned_in_annotation" and "modality is US" in str(refused.value)
    allowed = transcode_file(US, tmp_path / "b.dcm", request(tmp_path, burned_in="allow"))
    assert pydicom.dcmread(allowed.path).PatientIdentityRemoved == "YES"
    said_no = pydicom.dcmread(US)
    said_no.BurnedInAnnotation = "NO"
    said_no.save_as(tmp_path / "no.dcm", enforce_file_format=True)
    assert transcode_file(tmp_path / "no.dcm", tmp_path / "c.dcm", request(tmp_path)).changed
    said_yes = pydicom.dcmread(SIEMENS)
    said_yes.BurnedInAnnotation = "YES"
    said_yes.save_as(tmp_path / "yes.dcm", enforce_file_format=True)
    with pytest.raises(HeaderRefusal, match="Burned In Annotation is YES"):
        transcode_file(tmp_path / "yes.dcm", tmp_path / "d.dcm", request(tmp_path))


def test_a_key_file_changed_to_something_too_short_refuses_instead_of_sending(tmp_path):
    secret = key(tmp_path)
    req = request(tmp_path, secret=secret)
    secret.write_text("short\n")
    with pytest.raises(HeaderRefusal, match="fewer than 16"):
        transcode_file(SIEMENS, tmp_path / "out.dcm", req)


def test_retain_safe_private_keeps_the_listed_private_attributes_and_their_creator_only(tmp_path):
    safe = {"SIEMENS MEDCOM HEADER": ["0029,xx31", "0029,xx32"]}  # software version, a size
    out = pydicom.dcmread(transcode_file(SIEMENS, tmp_path / "out.dcm", request(
        tmp_path, options=["retain-safe-private"], safe_private=safe)).path)
    private = {int(e.tag): e.value for e in out if e.tag.is_private}
    assert private[0x00290010] == "SIEMENS MEDCOM HEADER"
    assert private[0x00291031] == "4.0.12412818" and private[0x00291032] == 468512
    assert set(private) == {0x00290010, 0x00291031, 0x00291032}  # the other creator's block is gone
    assert "113111" in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    without = pydicom.dcmread(transcode_file(SIEMENS, tmp_path / "b.dcm", request(tmp_path)).path)
    assert not [e for e in without if e.tag.is_private]
    # the same element offset under another creator is not safe
    moved = pydicom.dcmread(transcode_file(SIEMENS, tmp_path / "c.dcm", request(
        tmp_path, options=["retain-safe-private"], safe_private={"ACME": ["0029,xx31"]})).path)
    assert not [e for e in moved if e.tag.is_private]


@pytest.mark.parametrize(("fields", "message"), [
    ('options = ["retain-everything"]', "unknown de-identification option 'retain-everything'"),
    ('options = ["retain-safe-private"]', "give both or neither"),
    ('options = ["retain-safe-private"], safe_private = { ACME = ["0028,xx10"] }', "an odd group"),
    ('options = ["retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"]', "exclude each other"),
    ('profile = "extended"', "deidentify.profile"),
])
def test_a_de_identification_that_cannot_apply_is_refused_where_the_rule_file_loads(tmp_path, fields, message):
    key(tmp_path)
    path = tmp_path / "RESEARCH.toml"
    path.write_text('[destination]\nae_title = "S"\nhost = "h"\nport = 104\n[[rule]]\nname = "research"\n'
                    f'syntax = "original"\ndeidentify = {{ secret_file = "deid.key", {fields} }}\n')
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    assert message in str(caught.value)


@pytest.mark.parametrize(("content", "message"), [
    (None, "field deidentify.secret_file: file not found"),
    (b"tiny", "fewer than 16"),
])
def test_a_missing_or_short_key_is_refused_and_never_printed(tmp_path, content, message):
    if content is not None:
        (tmp_path / "deid.key").write_bytes(content)
    path = tmp_path / "RESEARCH.toml"
    path.write_text('[destination]\nae_title = "S"\nhost = "h"\nport = 104\n[[rule]]\nname = "research"\n'
                    'syntax = "original"\ndeidentify = { secret_file = "deid.key" }\n')
    with pytest.raises(ConfigError) as caught:
        load_rule_file(path)
    assert message in str(caught.value) and "rule 1 ('research')" in str(caught.value)
    assert "tiny" not in str(caught.value)


def test_explain_lists_what_the_de_identification_changes_values_hidden_unless_asked(tmp_path):
    (tmp_path / "rules").mkdir()
    key(tmp_path / "rules")
    (tmp_path / "rules" / "RESEARCH.toml").write_text(
        '[destination]\nae_title = "S"\nhost = "127.0.0.1"\nport = 104\n[[rule]]\nname = "research copy"\n'
        'syntax = "original"\ndeidentify = { secret_file = "deid.key", options = ["retain-institution-identity"] }\n')
    cfg = tmp_path / "router.toml"
    cfg.write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n')
    original = pydicom.dcmread(SIEMENS)

    def explain(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "router", "explain", "--config", str(cfg), *extra, str(SIEMENS)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    hidden = explain()
    assert "deidentify PatientName (Z): (value hidden: --show-values) -> '" in hidden  # to the pseudonym
    assert "deidentify StationName (X/Z/D): (value hidden: --show-values) -> 'ANONYMIZED'" in hidden
    assert "deidentify (0029,1108) (X): (value hidden: --show-values) -> (removed)" in hidden  # private
    assert "InstitutionName" not in hidden  # retained
    assert str(original.PatientID) not in hidden and str(original.PatientName) not in hidden
    assert repr(str(original.PatientName)) in explain("--show-values")


def test_transcode_writes_the_de_identified_copy_for_inspection(tmp_path):
    (tmp_path / "rules").mkdir()
    key(tmp_path / "rules")
    (tmp_path / "rules" / "RESEARCH.toml").write_text(
        '[destination]\nae_title = "S"\nhost = "127.0.0.1"\nport = 104\n[[rule]]\nname = "research copy"\n'
        'syntax = "jpeg-ls-lossless"\ndeidentify = { secret_file = "deid.key" }\n')
    cfg = tmp_path / "router.toml"
    cfg.write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n')
    out = tmp_path / "out.dcm"
    done = subprocess.run([sys.executable, "-m", "router", "transcode", "--config", str(cfg), "--destination",
                           "RESEARCH", str(SIEMENS), str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert pydicom.dcmread(out).PatientIdentityRemoved == "YES"
    assert str(pydicom.dcmread(SIEMENS).PatientName).encode() not in out.read_bytes()


def test_nested_items_are_de_identified_too(tmp_path):
    ds = pydicom.dcmread(SIEMENS)
    item = Dataset()
    item.PatientName = ds.PatientName
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.ReferencedSOPClassUID = ds.SOPClassUID
    ds.ReferencedPatientSequence = Sequence([item])
    path = tmp_path / "nested.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = pydicom.dcmread(transcode_file(path, tmp_path / "out.dcm", request(tmp_path)).path)
    assert str(ds.PatientName).encode() not in (tmp_path / "out.dcm").read_bytes()
    assert "ReferencedPatientSequence" not in out  # X in Table E.1-1
    referenced = out.ReferencedImageSequence[0]  # X/Z/U*: kept, its UIDs replaced
    assert referenced.ReferencedSOPInstanceUID.startswith("2.25.")
    assert referenced.ReferencedSOPClassUID == ds.ReferencedImageSequence[0].ReferencedSOPClassUID


def _dciodvfy_errors(path: Path) -> set[str]:
    import re

    done = subprocess.run([shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy"), str(path)],
                          capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return {re.sub(r"[0-9][0-9.]*[0-9]", "#", line) for line in lines if line.startswith("Error")}


@pytest.mark.parametrize("name", ["MR-SIEMENS-DICOM-WithOverlays.dcm", "test-SR.dcm", "rtplan.dcm", "MR_small.dcm"])
def test_dciodvfy_finds_no_error_in_the_output_the_input_did_not_have(tmp_path, name):
    source = data(name) if data(name).exists() else Path(get_testdata_file(name))
    out = transcode_file(source, tmp_path / "out.dcm", request(tmp_path))
    new = _dciodvfy_errors(out.path) - _dciodvfy_errors(source)
    assert new == set()


def test_an_attribute_the_table_does_not_list_keeps_no_identifying_value(tmp_path):
    ds = pydicom.dcmread(SIEMENS)
    family = str(ds.PatientName).split("^")[0]
    ds.ImageLaterality = "R"
    ds.add_new(0x00180015, "CS", "HEAD")  # Body Part Examined: not in the table, kept
    ds.add_new(0x00400254, "LO", f"scan of {family} for {ds.InstitutionName}")  # X in the table
    ds.add_new(0x0018A001, "SQ", Sequence())  # Contributing Equipment: empty, left alone
    ds.add_new(0x00700080, "CS", "LABEL")
    ds.add_new(0x00700081, "LO", f"ROI of {ds.PatientID}")  # Content Description: not in the table
    path = tmp_path / "extra.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = pydicom.dcmread(transcode_file(path, tmp_path / "out.dcm", request(tmp_path)).path)
    written = (tmp_path / "out.dcm").read_bytes()
    assert family.encode() not in written and str(ds.PatientID).encode() not in written
    assert out.BodyPartExamined == "HEAD"
    assert out.ContentDescription == "ROI of"


def test_patients_without_id_or_name_in_two_studies_get_two_pseudonyms(tmp_path):
    paths = []
    for n, source in enumerate((SIEMENS, SERIES[0])):
        ds = pydicom.dcmread(source)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = "", "", ""
        paths.append(tmp_path / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    a, b = (pydicom.dcmread(transcode_file(p, tmp_path / f"out-{p.name}", request(tmp_path)).path) for p in paths)
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert a.PatientID != b.PatientID and len(a.PatientID) == 12
