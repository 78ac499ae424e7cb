"""Processes the benchmark starts (storescu, storescp, the router, Orthanc, the pynetdicom
baselines) and what it reads about them from /proc.

Every server binds 127.0.0.1 on a port chosen free at run time. Every process started
here is stopped by its PID (SIGTERM, a bounded wait, then SIGKILL), together with any
descendants it left behind. DCMTK and Orthanc get TCP_NODELAY=1 in their environment:
without it they stall ~40 ms per message on loopback (Nagle + delayed ACK).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1", PYTHONUNBUFFERED="1", **extra)


# -- /proc ------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def descendants(root: int) -> list[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes, including their reaped children."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def stage_cpu(url: str, timeout: float = 5.0) -> dict[str, float]:
    """The router's `dicom_router_cpu_seconds_total` by stage, from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "dicom_router_cpu_seconds":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["stage"]] = out.get(sample.labels["stage"], 0.0) + sample.value
    return out


def peak_rss_mb(pids: list[int]) -> float:
    """Sum of VmHWM (peak resident set) of these processes, MB."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Server:
    """A started process: its Popen, its log, and how to stop it."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int
    stop_signal: int = signal.SIGTERM
    _log: object = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[int]:
        return descendants(self.proc.pid) if self.alive() else []

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """Signal, wait at most `timeout`, then SIGKILL; leftovers of the tree are killed by PID."""
        tree = self.tree()
        if self.alive():
            os.kill(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in tree[1:]:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and _not_zombie(pid):
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists() and _not_zombie(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._log is not None:
            self._log.close()
        return self.proc.returncode


def _not_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def launch(name: str, argv: list[str], workdir: Path, port: int, **popen) -> Server:  # noqa: ANN003
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=workdir, **popen)
    return Server(name, proc, log_path, port, _log=log)


def wait_listening(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{server.name} did not listen on {server.port} within {timeout}s:\n{server.log_tail()}")


def start_storescp(workdir: Path, out: Path, ae_title: str = "STORESCP") -> Server:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # --fork: one process per association, as a PACS accepts several at once
    server = launch("storescp", ["storescp", "--fork", "+xa", "-aet", ae_title, "-od", str(out), str(port)],
                    workdir, port)
    wait_listening(server)
    return server


def start_bare(workdir: Path, max_pdu: int | None, out: Path | None = None, ae_title: str = "STORESCP") -> Server:
    port = free_port()
    argv = [PYTHON, str(BENCH / "bare_receiver.py"), "--port", str(port), "--aet", ae_title]
    if max_pdu is not None:
        argv += ["--max-pdu", str(max_pdu)]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        argv += ["--out", str(out)]
    server = launch("bare_receiver", argv, workdir, port)
    wait_listening(server)
    return server


def start_naive(workdir: Path, dest_port: int, compress: bool, dest_aet: str = "STORESCP") -> Server:
    port = free_port()
    argv = [PYTHON, str(BENCH / "naive_forwarder.py"), "--port", str(port), "--dest-port", str(dest_port),
            "--dest-aet", dest_aet]
    if compress:
        argv.append("--jpeg-ls")
    server = launch("naive_forwarder", argv, workdir, port)
    wait_listening(server)
    return server


@dataclass
class RouterRule:
    syntax: str
    extra: dict[str, object] = field(default_factory=dict)  # quality, fallback, verify, ...

    def toml(self) -> str:
        lines = ["[[rule]]", 'name = "bench"', f'syntax = "{self.syntax}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.extra.items()]
        return "\n".join(lines) + "\n"


def start_router(workdir: Path, dest_port: int, rule: RouterRule, dest_aet: str = "STORESCP",
                 workers: int = 0, metrics_port: int = 0, spool: Path | None = None, extra: str = "",
                 name: str = "router", destination: str = "") -> Server:
    """`dicom-router serve` with one destination and one rule; config written like tests/support/peers.py.
    `spool`: its spool directory (default: in `workdir`); `extra`: more router.toml tables;
    `destination`: where the destination is, TOML lines (default: DIMSE to dest_aet on dest_port)."""
    port = free_port()
    rules = workdir / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "DEST.toml").write_text(
        "[destination]\n"
        + (destination or f'ae_title = "{dest_aet}"\nhost = "127.0.0.1"\nport = {dest_port}\n'
           "max_associations = 2\n")
        + "retry = { max_attempts = 5, backoff_s = 0.2, max_backoff_s = 1 }\n\n"
        + rule.toml()
    )
    config = workdir / "router.toml"
    config.write_text(textwrap.dedent(f"""\
        [listen]
        ae_title = "ROUTER"
        host = "127.0.0.1"
        port = {port}
        [storage]
        spool_dir = "{spool or workdir / 'spool'}"
        min_free_mb = 0
        [metrics]
        host = "127.0.0.1"
        port = {metrics_port}
        [rules]
        dir = "rules"
        [transcode]
        workers = {workers}
        """) + extra)
    server = launch(name, [PYTHON, "-m", "router", "serve", "--config", str(config)], workdir, port)
    wait_listening(server, timeout=60)
    return server


ORTHANC_LUA = """\
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'dest')
end
"""


def start_orthanc(workdir: Path, dest_port: int, ingest_transcoding: str | None) -> Server:
    """Orthanc 1.10 as a compress-and-forward peer: store (optionally transcoding), Lua forwards."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    lua = workdir / "forward.lua"
    lua.write_text(ORTHANC_LUA)
    config = {
        "Name": "bench",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": False,
        "RemoteAccessAllowed": False,
        "Plugins": [],
        "DicomServerEnabled": True,
        "DicomAet": "ROUTER",
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "DicomModalities": {"dest": ["STORESCP", "127.0.0.1", dest_port]},
        "LuaScripts": [str(lua)],
        "SaveJobs": False,
    }
    if ingest_transcoding:
        config["IngestTranscoding"] = ingest_transcoding
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    server = launch("orthanc", ["Orthanc", str(path)], workdir, port)
    wait_listening(server, timeout=60)
    return server


DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb


@dataclass
class Archive:
    """Orthanc as the PACS at the end: DIMSE on `dicom_port`, STOW-RS under `dicomweb_url`."""

    server: Server
    dicom_port: int
    http_port: int

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def count(self) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/statistics")
        request.add_header("Authorization", "Basic " + base64.b64encode(b"router:bench").decode())
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return int(json.loads(rsp.read())["CountInstances"])


def start_archive(workdir: Path) -> Archive:
    """Orthanc 1.10 with its DICOMweb plugin and HTTP Basic authentication, storing what it gets."""
    dicom_port, http_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "archive", "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False, "HttpServerEnabled": True, "HttpPort": http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {"router": "bench"},
        "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomServerEnabled": True, "DicomAet": "ARCHIVE", "DicomPort": dicom_port, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True, "SaveJobs": False, "TcpNoDelay": True,
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    server = launch("archive", ["Orthanc", str(path)], workdir, dicom_port)
    wait_listening(server, timeout=60)
    return Archive(server, dicom_port, http_port)


def storescu(files: list[Path], port: int, workdir: Path, called_ae: str = "ROUTER", tag: str = "") -> subprocess.Popen:
    """DCMTK storescu as the modality: one association, the files in order."""
    argv = ["storescu", "-aet", "MODALITY", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)]
    log = open(workdir / f"storescu{tag}.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env())
    log.close()
    return proc


class _OneByOne:
    """storescu once per file, one after the other (an association per image), in a thread;
    `poll`, `wait`, `kill` and `returncode` as a Popen's."""

    def __init__(self, files: list[Path], port: int, workdir: Path, called_ae: str, tag: str) -> None:
        self.returncode: int | None = None
        self.current: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(files, port, workdir, called_ae, tag), daemon=True)
        self._thread.start()

    def kill(self) -> None:
        self._stop.set()
        current = self.current
        if current is not None and current.poll() is None:
            current.kill()

    def _run(self, files: list[Path], port: int, workdir: Path, called_ae: str, tag: str) -> None:
        code = 0
        for path in files:
            if self._stop.is_set():
                code = code or -9
                break
            self.current = storescu([path], port, workdir, called_ae, tag)
            code = code or self.current.wait()
        self.returncode = code

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            raise subprocess.TimeoutExpired("storescu (one per image)", timeout or 0)
        return int(self.returncode or 0)


def storescu_each(files: list[Path], port: int, workdir: Path, called_ae: str = "ROUTER", tag: str = "") -> _OneByOne:
    """DCMTK storescu as a modality that opens an association per image."""
    return _OneByOne(files, port, workdir, called_ae, tag)


def wait_procs(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            codes.append(-9)
    return codes


def count_files(directory: Path) -> int:
    with os.scandir(directory) as it:
        return sum(1 for e in it if e.is_file() and not e.name.startswith("."))
