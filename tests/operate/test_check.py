"""`dicom-router check`: exit 0 on the shipped examples, exit 2 naming file, rule and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router import config
from tests.support.peers import REPO


def run_check(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router", "check", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60)


def test_shipped_example_configuration_is_valid():
    result = run_check(REPO / "router.toml")
    assert result.returncode == 0, result.stderr
    loaded = config.load(REPO / "router.toml")
    assert {d.name for d in loaded.destinations} == {"PACS", "ARCHIVE"}
    assert loaded.destination("PACS").rules[1].fallback == "jpeg-ls-lossless"


def write(tmp_path: Path, rule_file: str, router_extra: str = "") -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "PACS.toml").write_text(rule_file)
    cfg = tmp_path / "router.toml"
    cfg.write_text(f'[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n{router_extra}')
    return cfg


DEST = '[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'


@pytest.mark.parametrize(
    "rules, expected",
    [
        ('[[rule]]\nname = "ct"\nsyntax = "jpeg-ls"\n',
         ["PACS.toml", "rule 1 ('ct')", "field syntax", "jpeg-ls-lossless"]),
        ('[[rule]]\nsyntax = "original"\n[[rule]]\nname = "lossy"\nsyntax = "jpeg-lossy"\nquality = 101\n',
         ["PACS.toml", "rule 2 ('lossy')", "field quality", "less than or equal to 100"]),
        ('[[rule]]\nname = "m"\nmatch = { Modalty = "CT" }\nsyntax = "original"\n',
         ["rule 1 ('m')", "field match", "Modalty", "did you mean 'Modality'"]),
        ('[[rule]]\nname = "cmp"\nmatch = { BitsStored = ">twelve" }\nsyntax = "original"\n',
         ["rule 1 ('cmp')", "field match", "comparison"]),
        ('[[rule]]\nname = "n"\nsyntax = "jpeg-ls-lossless"\nnear = 2\n',
         ["rule 1 ('n')", "near", "jpeg-ls-near-lossless"]),
        ('[[rule]]\nname = "f"\nsyntax = "jpeg-lossy"\nfallback = "skip"\n',
         ["rule 1 ('f')", "field fallback", "never dropped"]),
        ('[[rule]]\nname = "t"\nsyntax = "original"\ncolour = 1\n',
         ["rule 1 ('t')", "field colour", "unknown field"]),
    ],
)
def test_check_names_file_rule_and_field(tmp_path, rules, expected):
    result = run_check(write(tmp_path, DEST + rules))
    assert result.returncode == 2
    for fragment in expected:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_check_reports_destination_and_toml_errors(tmp_path):
    result = run_check(write(tmp_path, '[destination]\nae_title = "THIS_AE_TITLE_IS_TOO_LONG"\nhost = "h"\nport = 0\n'
                                       '[[rule]]\nsyntax = "original"\n'))
    assert result.returncode == 2
    assert "field destination.ae_title" in result.stderr and "field destination.port" in result.stderr
    result = run_check(write(tmp_path, "[destination\n"))
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_check_rejects_unknown_router_option(tmp_path):
    result = run_check(write(tmp_path, DEST + '[[rule]]\nsyntax = "original"\n', "[listen]\nprot = 104\n"))
    assert result.returncode == 2
    assert "router.toml: field listen.prot: unknown field" in result.stderr


def test_syntax_accepted_as_transfer_syntax_uid(tmp_path):
    result = run_check(write(tmp_path, DEST + '[[rule]]\nsyntax = "1.2.840.10008.1.2.4.80"\n'))
    assert result.returncode == 0, result.stderr


def test_check_says_which_destinations_relay_storage_commitment(tmp_path):
    asked = write(tmp_path, DEST + "commitment = { port = 4242 }\n" + '[[rule]]\nsyntax = "original"\n',
                  '[commitment]\nmode = "relay"\n')
    result = run_check(asked)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "commitment: relay: PACS's storage commitment SCP PACS@127.0.0.1:4242 is asked after delivery" \
        in result.stdout
    none = write(tmp_path, DEST + '[[rule]]\nsyntax = "original"\n', '[commitment]\nmode = "relay"\n')
    assert 'no destination has `commitment` set' in run_check(none).stdout


def test_the_shipped_dicomweb_example_checks_and_says_its_protocol_never_its_secret(tmp_path):
    (tmp_path / "rules").mkdir()
    example = (REPO / "rules" / "examples" / "CLOUD.toml").read_text()
    (tmp_path / "rules" / "CLOUD.toml").write_text(example)
    (tmp_path / "rules" / "CLOUD.password").write_text("Hunter2-archive-secret\n")
    cfg = tmp_path / "router.toml"
    cfg.write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n')
    result = run_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("destination CLOUD -> https://archive.example.org/dicom-web (DICOMweb STOW-RS, Basic authentication)"
            in result.stdout)
    assert "Hunter2" not in result.stdout + result.stderr
    destination = config.load(cfg).destination("CLOUD").destination
    assert destination.protocol == "dicomweb" and destination.instances_per_request == 16


def test_a_dicomweb_destination_whose_secret_file_is_missing_is_refused_naming_the_field(tmp_path):
    cfg = write(tmp_path, '[destination]\nurl = "http://10.0.0.9/dicom-web"\n'
                          'auth = { token_file = "gone.token" }\n[[rule]]\nsyntax = "original"\n')
    result = run_check(cfg)
    assert result.returncode == 2
    assert "PACS.toml: field destination.auth.token_file: file not found" in result.stdout + result.stderr


def test_credentials_over_plain_http_are_warned_of(tmp_path):
    cfg = write(tmp_path, '[destination]\nurl = "http://10.0.0.9/dicom-web"\n'
                          'auth = { username = "u", password_file = "pw" }\n[[rule]]\nsyntax = "original"\n')
    (tmp_path / "rules" / "pw").write_text("x")
    result = run_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PACS's credentials go in clear over http://" in result.stdout


def test_the_shipped_research_example_checks_and_says_what_it_de_identifies(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "RESEARCH.toml").write_text((REPO / "rules" / "examples" / "RESEARCH.toml").read_text())
    key = tmp_path / "rules" / "RESEARCH.key"
    key.write_text("a key of more than sixteen bytes, never printed\n")
    key.chmod(0o644)
    cfg = tmp_path / "router.toml"
    cfg.write_text('[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n')
    result = run_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("rule 1 ('research copy'): de-identifies: PS3.15 E.1-1 (2026c) basic profile; options: "
            "retain-longitudinal-modified-dates, clean-descriptors; images that may carry burned-in identity: "
            "refused (dead letters)") in result.stdout
    assert "can be read by other users; chmod 600 it" in result.stdout
    assert "never printed" not in result.stdout + result.stderr
    key.chmod(0o600)
    (tmp_path / "rules" / "RESEARCH.toml").write_text(
        (REPO / "rules" / "examples" / "RESEARCH.toml").read_text() + 'template = { StudyID = "{PatientID}" }\n')
    result = run_check(cfg)
    assert "warning: template StudyID reads the received header: it puts identity back" in result.stdout
    assert "chmod 600" not in result.stdout


def test_check_says_where_audit_messages_go_and_refuses_a_url_it_cannot_use(tmp_path):
    cfg = write(tmp_path, DEST + '[[rule]]\nsyntax = "original"\n',
                '[audit]\nurl = "tls://audit.example.org:6514"\nsource_id = "ROUTER-A"\n')
    result = run_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit: IHE ATNA messages to tls://audit.example.org:6514, Audit Source ID ROUTER-A" in result.stdout
    none = write(tmp_path, DEST + '[[rule]]\nsyntax = "original"\n', "")
    assert "no [audit] url: no audit messages are made" in run_check(none).stdout
    bad = write(tmp_path, DEST + '[[rule]]\nsyntax = "original"\n', '[audit]\nurl = "https://audit.example.org"\n')
    refused = run_check(bad)
    assert refused.returncode == 2
    assert "field audit.url: 'https://audit.example.org' is not tls://host:port" in refused.stderr
