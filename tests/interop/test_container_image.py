"""The container image, really built and run: a Debian bookworm root file system made with
mmdebstrap (python3, python3-venv, ca-certificates) as the base, the project's Dockerfile built
on it with podman, then the router in it answers C-ECHO, forwards a C-STORE to a storescp on the
host, serves /healthz, runs as uid 10001 and drains on SIGTERM."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
import uuid

import pytest

from tests.interop.conftest import require
from tests.support.peers import REPO, data, echo, free_port, send, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.slow]

CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\n"


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """Run podman with a configuration of this test's own (runc, no default ulimits)."""
    require("podman", "runc", "mmdebstrap")
    if os.geteuid() != 0:
        pytest.skip("building the base root file system needs root")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = dict(os.environ, CONTAINERS_CONF=str(conf))

    def run(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="module")
def image(podman, tmp_path_factory):
    tag = uuid.uuid4().hex[:10]
    base, built = f"localhost/dicom-router-base:{tag}", f"localhost/dicom-router:{tag}"
    rootfs = tmp_path_factory.mktemp("rootfs") / "bookworm.tar"
    subprocess.run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                    "bookworm", str(rootfs)], check=True, capture_output=True, timeout=600)
    podman("import", str(rootfs), base)
    try:
        podman("build", "--network", "host", "-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "--build-arg",
               f"BASE={base}", "-t", built, str(REPO), timeout=900)
        yield built
    finally:
        podman("rmi", "-f", built, base, check=False)


def test_the_image_builds_runs_as_uid_10001_forwards_and_drains(podman, image, storescp, tmp_path):
    scp = storescp(ae_title="PACS")
    dicom_port, metrics_port = free_port(), free_port()
    etc = tmp_path / "etc"
    (etc / "rules").mkdir(parents=True)
    (etc / "router.toml").write_text(
        f'[listen]\nae_title = "ROUTER"\nhost = "127.0.0.1"\nport = {dicom_port}\nprocesses = 1\n'
        '[storage]\nspool_dir = "/var/lib/dicom-router/spool"\nmin_free_mb = 0\n'
        f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n[rules]\ndir = "rules"\n[transcode]\nworkers = 1\n')
    (etc / "rules" / "PACS.toml").write_text(
        f'[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {scp.port}\n'
        '[[rule]]\nsyntax = "jpeg-ls-lossless"\n')
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.chown(spool, 10001, 10001)
    name = f"dicom-router-test-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "--network", "host", "-v", f"{etc}:/etc/dicom-router:ro",
           "-v", f"{spool}:/var/lib/dicom-router", image)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=2) as rsp:
                    return rsp.status == 200
            except OSError:
                return False

        try:
            wait_until(healthy, 120, interval=0.5, what="/healthz of the router in the container")
        except AssertionError as exc:
            logs = podman("logs", name, check=False)
            raise AssertionError(f"{exc}\n{logs.stdout[-2000:]}\n{logs.stderr[-3000:]}") from None
        wait_until(lambda: echo(dicom_port), 30, interval=0.5, what="C-ECHO")
        assert send(dicom_port, [data("693_UNCR.dcm")]) == [0]
        wait_until(lambda: scp.count() == 1, 60, interval=0.2, what="the image at storescp on the host")
        users = podman("top", name, "user", "huser").stdout.split()
        assert "10001" in users and "root" not in users, users
        podman("stop", "-t", "30", name, timeout=60)
        state = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert state == "0", podman("logs", name, check=False).stderr[-3000:]
        assert '"event": "stopped"' in podman("logs", name).stderr
    finally:
        podman("rm", "-f", name, check=False)
