"""Rule matching: the first rule whose every key matches decides."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from router.config import Rule
from router.rules import Attributes, Context, decide
from tests.support.peers import data


def header(name: str = "693_UNCR.dcm"):
    return dcmread(data(name), stop_before_pixels=True)


def rules(*tables: dict) -> list[Rule]:
    return [Rule.model_validate(t) for t in tables]


def test_first_matching_rule_decides():
    ct = Attributes(header())  # CT, 14 bits stored, signed
    decision = decide(
        rules(
            {"name": "mammo", "match": {"Modality": "MG"}, "syntax": "jpeg-lossy"},
            {"name": "ct", "match": {"Modality": "CT"}, "syntax": "jpeg-ls-lossless"},
            {"name": "rest", "syntax": "original"},
        ),
        ct,
    )
    assert decision.forward and decision.rule_name == "ct" and decision.syntax == "jpeg-ls-lossless"
    assert "Modality" in decision.reason and "rule 2" in decision.reason


def test_wildcards_lists_and_numeric_comparisons():
    ct = Attributes(header())
    assert decide(rules({"match": {"Modality": "C?"}, "syntax": "original"}), ct).forward
    assert decide(rules({"match": {"Modality": ["MR", "CT"]}, "syntax": "original"}), ct).forward
    assert decide(rules({"match": {"BitsStored": ">12"}, "syntax": "original"}), ct).forward
    assert not decide(rules({"match": {"BitsStored": "<=12"}, "syntax": "original"}), ct).forward
    assert decide(rules({"match": {"BitsStored": 14}, "syntax": "original"}), ct).forward
    assert decide(rules({"match": {"Rows": [256, 512]}, "syntax": "original"}), ct).forward
    assert not decide(rules({"match": {"Modality": "ct"}, "syntax": "original"}), ct).forward


def test_multi_valued_attributes_match_any_value_or_the_whole():
    ct = Attributes(header())
    image_type = list(ct.dataset.ImageType)
    assert decide(rules({"match": {"ImageType": image_type[1]}, "syntax": "original"}), ct).forward
    assert decide(rules({"match": {"ImageType": "\\".join(image_type[:2]) + "*"}, "syntax": "original"}), ct).forward


def test_context_keys_match_the_association():
    attrs = Attributes(header(), Context(calling_ae="CT_SCANNER_2", called_ae="ROUTER", source_ip="10.1.2.3"))
    table = rules(
        {"name": "old", "match": {"CallingAE": "CT_SCANNER_1"}, "syntax": "skip"},
        {"name": "net", "match": {"SourceIP": "10.1.2.*", "CalledAE": "ROUTER"}, "syntax": "jpeg-lossy", "quality": 80},
    )
    decision = decide(table, attrs)
    assert decision.rule_name == "net" and decision.request.quality == 80


def test_skip_and_no_match_are_not_forwarded():
    ct = Attributes(header())
    skipped = decide(rules({"name": "no CT", "match": {"Modality": "CT"}, "syntax": "skip"}), ct)
    assert not skipped.forward and "skip" in skipped.reason
    unmatched = decide(rules({"match": {"Modality": "MR"}, "syntax": "original"}), ct)
    assert not unmatched.forward and unmatched.reason == "no rule matched: not forwarded"


def test_absent_attribute_matches_only_star_or_not_equal():
    ct = Attributes(header())
    assert "PerformedStationName" not in ct.dataset  # what the next three match on is absent
    assert decide(rules({"match": {"PerformedStationName": "*"}, "syntax": "original"}), ct).forward
    assert not decide(rules({"match": {"PerformedStationName": "X*"}, "syntax": "original"}), ct).forward
    assert decide(rules({"match": {"NumberOfFrames": "!=1"}, "syntax": "original"}), ct).forward


def test_keep_sop_instance_uid_is_passed_to_the_transcoder():
    decision = decide(rules({"syntax": "jpeg-lossy"}), Attributes(header()), keep_sop_instance_uid=True)
    assert decision.request.keep_sop_instance_uid is True
