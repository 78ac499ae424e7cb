"""The DICOM Conformance Statement: the shipped document is the command's output, a site's own
says its AE title and destinations, and a running router accepts exactly what it lists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pynetdicom import AE, build_context

from tests.support.peers import Destination

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "docs" / "conformance-statement.md"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def conformance(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "router", "conformance", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start:end if end > 0 else None]


def uids_of(table: str) -> list[str]:
    return re.findall(r"\| ([0-9]+(?:\.[0-9]+)+) \|", table)


def test_the_shipped_statement_is_what_the_command_writes_for_the_default_configuration():
    written = conformance()
    assert SHIPPED.read_text() == written, (
        "docs/conformance-statement.md differs from `dicom-router conformance`: write it again with "
        "`.venv/bin/dicom-router conformance > docs/conformance-statement.md`")
    for heading in ("## 1 Overview", "### 2.1 Implementation model", "#### 2.2.2 Association acceptance policy",
                    "#### 2.2.3 Association initiation policy", "#### 2.2.4 Transfer syntaxes accepted",
                    "## 4 Support of character sets", "## 5 Security", "## 6 Configuration items"):
        assert heading in written


def test_a_site_s_statement_names_its_ae_title_destinations_and_what_it_turned_off(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "PACS.toml").write_text(
        '[destination]\nae_title = "PACS"\nhost = "10.1.2.3"\nport = 104\n'
        '[[rule]]\nsyntax = "jpeg-ls-lossless"\nfallback = "explicit-le"\n')
    (tmp_path / "rules" / "CLOUD.toml").write_text('[destination]\nurl = "https://archive.example.org/dicom-web"\n'
                                                   '[[rule]]\nsyntax = "htj2k-lossless"\n')
    cfg = tmp_path / "router.toml"
    cfg.write_text('[listen]\nae_title = "NORTH_RTR"\nport = 4104\naccept_unknown_sop_classes = false\n'
                   '[storage]\nspool_dir = "spool"\n[rules]\ndir = "rules"\n[commitment]\nmode = "off"\n')
    text = conformance("--config", str(cfg))
    assert "# DICOM Conformance Statement: dicom-router" in text and "for NORTH_RTR" in text
    assert "| Port | 4104 (`[listen] port`) |" in text
    assert "| PACS | C-STORE | PACS@10.1.2.3:104 | explicit-le, jpeg-ls-lossless | no |" in text
    assert "| CLOUD | STOW-RS | https://archive.example.org/dicom-web | htj2k-lossless | no |" in text
    assert "Storage Commitment is not offered" in text and "| Storage Commitment Push Model |" not in text
    assert "No other SOP class is accepted" in text


def _accepted(port: int, contexts: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """What the router accepts of `contexts` (SOP class, transfer syntax), proposed 100 at a time."""
    accepted: set[tuple[str, str]] = set()
    for start in range(0, len(contexts), 100):
        ae = AE(ae_title="CONFORMANCE")
        ae.requested_contexts = [build_context(sop, ts) for sop, ts in contexts[start:start + 100]]
        assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER")
        if not assoc.is_established:
            # accepted with no presentation context: pynetdicom then aborts it itself
            assert not assoc.is_rejected, "the router rejected the association"
            continue
        accepted |= {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assoc.release()
    return accepted


@pytest.mark.parametrize("unknown", [True, False])
def test_a_running_router_accepts_what_its_statement_lists_and_nothing_it_omits(router_factory, tmp_path, unknown):
    router = router_factory([Destination("PACS", 1, '[[rule]]\nsyntax = "original"\n')],
                            listen_extra=f"accept_unknown_sop_classes = {str(unknown).lower()}\n")
    text = conformance("--config", str(router.config))
    classes = uids_of(section(text, "The storage SOP classes accepted"))
    syntaxes = uids_of(section(text, "#### 2.2.4 Transfer syntaxes accepted"))
    assert len(classes) > 100 and len(syntaxes) > 30
    listed = [(sop, EXPLICIT_LE) for sop in classes] + [(CT, ts) for ts in syntaxes]
    listed += [("1.2.840.10008.1.1", ts) for ts in syntaxes[:3]]  # Verification
    assert _accepted(router.port, listed) == set(listed)
    omitted = [("1.2.840.10008.5.1.4.31", EXPLICIT_LE),  # Modality Worklist FIND: not a service here
               ("1.2.840.10008.5.1.4.1.2.1.1", EXPLICIT_LE),  # Patient Root Query/Retrieve FIND
               (CT, "1.2.840.10008.1.2.4.99")]  # not a transfer syntax the statement lists
    assert _accepted(router.port, omitted) == set()
    private = ("1.2.826.0.1.3680043.9.7.1.1", EXPLICIT_LE)  # a vendor's own storage class
    said = "Any other SOP class proposed is accepted as a storage SOP class" in text
    assert said is unknown
    assert _accepted(router.port, [private]) == ({private} if unknown else set())
