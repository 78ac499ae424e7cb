"""The command line: explain, transcode, and the service signals an operator uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

from tests.support.peers import REPO, Destination, data, send, wait_until


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True, text=True, timeout=120)


def test_explain_prints_rule_syntax_and_reason_per_destination():
    result = run("explain", "--config", str(REPO / "router.toml"), "--calling-ae", "WS3D_1",
                 str(data("693_UNCR.dcm")), str(data("SC_rgb.dcm")))
    assert result.returncode == 0, result.stderr
    ct, sc = result.stdout.split(str(data("SC_rgb.dcm")))
    assert "PACS: jpeg-ls-lossless  (rule 3 ('everything else')" in ct
    assert "ARCHIVE: jpeg-ls-lossless  (rule 2 ('large 16-bit images: JPEG-LS lossless'): BitsStored matches '>12'" in ct
    assert "ARCHIVE: not forwarded  (rule 1 ('no 3D workstation captures')" in sc


def test_transcode_writes_the_syntax_and_says_what_it_did(tmp_path):
    out = tmp_path / "out.dcm"
    result = run("transcode", "--syntax", "jpeg-ls-lossless", str(data("693_UNCR.dcm")), str(out))
    assert result.returncode == 0, result.stderr
    assert "jpeg-ls-lossless (1.2.840.10008.1.2.4.80), ratio" in result.stdout
    written = dcmread(out)
    assert written.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert (written.pixel_array == dcmread(data("693_UNCR.dcm")).pixel_array).all()


def test_transcode_of_lossy_input_copies_it_unchanged(tmp_path):
    out = tmp_path / "out.dcm"
    result = run("transcode", "--syntax", "jpeg-lossy", str(data("MR2_J2KI.dcm")), str(out))
    assert result.returncode == 0 and "already lossy" in result.stdout
    assert out.read_bytes() == data("MR2_J2KI.dcm").read_bytes()


def test_transcode_reports_unknown_syntax_and_bad_input(tmp_path):
    result = run("transcode", "--syntax", "jpeg-ls", str(data("693_UNCR.dcm")), str(tmp_path / "x.dcm"))
    assert result.returncode == 1 and "did you mean" in result.stderr
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 100)
    result = run("transcode", "--syntax", "explicit-le", str(junk), str(tmp_path / "y.dcm"))
    assert result.returncode == 1 and str(junk) in result.stderr


def test_transcode_says_one_line_and_exits_1_for_any_input_it_cannot_take(tmp_path):
    from tests.support import transcode_images as img
    from tests.support.malformed import CATALOGUE

    broken = ["random-333-bytes", "native-truncated-in-pixel-data", "implicit-pixels-short", "native-endless-item",
              "native-huge-pixel-data-length", "jpeg-codestream-header", "rle-codestream-header",
              "j2k-codestream-header"]
    runs = [(c.write(tmp_path / "in"), c.target, tmp_path / "out.dcm", ()) for c in CATALOGUE if c.name in broken]
    assert len(runs) == len(broken)
    tiles = img.tiled_jpeg(tmp_path, [(64, 96), (64, 104)])  # a frame larger than the header
    bomb = img.jpeg_ls_frames(tmp_path, 40, (1024, 1024))  # 40 MiB declared in a few KB
    (tmp_path / "taken").mkdir()
    runs += [
        (tiles, "explicit-le", tmp_path / "out.dcm", ()),
        (bomb, "explicit-le", tmp_path / "out.dcm", ("--max-decoded-mb", "1")),
        (tmp_path / "missing.dcm", "rle", tmp_path / "out.dcm", ()),
        (data("MR_small.dcm"), "rle", tmp_path / "taken", ()),  # the output cannot be written
    ]
    for path, syntax, out, options in runs:
        result = run("transcode", "--syntax", syntax, *options, str(path), str(out))
        lines = result.stderr.splitlines()
        assert result.returncode == 1 and len(lines) == 1, f"{path.name}: {result.returncode}\n{result.stderr}"
        assert lines[0].startswith(f"{path}: ") and lines[0].count(str(path)) == 1, lines[0]
        assert "Traceback" not in result.stderr


def test_sighup_reloads_rules_and_keeps_them_when_broken(router_factory, pacs):
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nname = "all"\nsyntax = "original"\n')])
    rule_file = router.rules_dir / "PACS.toml"
    rule_file.write_text(rule_file.read_text().replace('syntax = "original"', 'syntax = "jpeg-ls-lossless"'))
    os.kill(router.proc.pid, signal.SIGHUP)
    wait_until(lambda: '"event": "rules_reloaded"' in router.log(), 10, what="reload")
    assert send(router.port, [data("MR2_UNCR.dcm")]) == [0]
    wait_until(lambda: pacs.count() == 1, 30, what="first instance")
    assert pacs.received[0].transfer_syntax_uid == JPEGLSLossless

    rule_file.write_text(rule_file.read_text().replace('syntax = "jpeg-ls-lossless"', 'syntax = "no-such-codec"'))
    os.kill(router.proc.pid, signal.SIGHUP)
    wait_until(lambda: '"event": "reload_rejected"' in router.log(), 10, what="rejected reload")
    assert "no-such-codec" in router.log()
    assert send(router.port, [data("693_UNCR.dcm")]) == [0]
    wait_until(lambda: pacs.count() == 2, 30, what="second instance")
    assert pacs.received[1].transfer_syntax_uid == JPEGLSLossless


def test_serve_refuses_an_invalid_configuration(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "X.toml").write_text('[destination]\nae_title = "X"\nhost = "h"\nport = 1\n'
                                                 '[[rule]]\nsyntax = "jpeg-lossy"\nquality = 0\n')
    (tmp_path / "router.toml").write_text('[storage]\nspool_dir = "spool"\n')
    result = run("serve", "--config", str(tmp_path / "router.toml"))
    assert result.returncode == 2
    assert "X.toml: rule 1, field quality" in result.stderr


def test_transcode_file_whose_declared_vr_encoding_is_wrong(tmp_path):
    from pydicom.data import get_testdata_file

    mislabelled = get_testdata_file("SC_rgb_jpeg.dcm")  # declares explicit VR, is encoded implicit
    for syntax in ("explicit-le", "jpegxl-jpeg"):
        out = tmp_path / f"{syntax}.dcm"
        result = run("transcode", "--syntax", syntax, mislabelled, str(out))
        assert result.returncode == 0, result.stderr
        assert dcmread(out).file_meta.TransferSyntaxUID != ""


def test_help_lists_the_user_commands_and_nothing_internal():
    result = subprocess.run([sys.executable, "-m", "router", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "{serve,check,conformance,explain,transcode,queue,trace,pause,resume}" in result.stdout
    assert "SUPPRESS" not in result.stdout and "receive" not in result.stdout.split("positional arguments")[0]
