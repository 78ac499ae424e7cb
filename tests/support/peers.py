"""Real DICOM peers for tests: the router as a subprocess, a pynetdicom storage SCP as the
PACS, and a pynetdicom SCU as the modality. All on 127.0.0.1, on ports chosen free at run time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import data_store
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from router.compat.pynetdicom import keep_pause_flag_to_the_reactor, park_reactor

DATA = Path(data_store.__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]


def data(name: str) -> Path:
    return DATA / name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(root: int) -> list[int]:
    """Live processes below `root` (zombies excluded)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- the PACS -----------------------------------------------------------------------------------
@dataclass
class Received:
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    path: Path

    def dataset(self) -> Dataset:
        return dcmread(self.path)


@dataclass
class Pacs:
    """A pynetdicom storage SCP that keeps every instance it receives as a file."""

    directory: Path
    ae_title: str = "PACS"
    transfer_syntaxes: list[str] = field(default_factory=lambda: list(ALL_TRANSFER_SYNTAXES))
    status: int = 0x0000
    delay: float = 0.0  # seconds before answering each C-STORE: a slow destination
    ssl_context: object = None
    port: int = 0
    received: list[Received] = field(default_factory=list)
    associations: int = 0  # associations established so far
    most_at_once: int = 0  # the most associations open at the same time

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._open = 0
        self.server = None
        self.port = self.port or free_port()

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1
            self._open += 1
            self.most_at_once = max(self.most_at_once, self._open)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            self._open -= 1

    def _on_store(self, event: evt.Event) -> int:
        if self.delay:
            time.sleep(self.delay)
        if self.status not in (0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007):  # warnings: stored
            return self.status
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            path = self.directory / f"{len(self.received):05d}_{uid}.dcm"
            path.write_bytes(event.encoded_dataset())
            self.received.append(
                Received(uid, str(event.context.transfer_syntax), event.assoc.requestor.ae_title.strip(), path)
            )
        return self.status

    def start(self) -> Pacs:
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, self.transfer_syntaxes)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, self._on_established),
                          (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed)],
            ssl_context=self.ssl_context,
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def by_uid(self) -> dict[str, Received]:
        with self._lock:
            return {r.sop_instance_uid: r for r in self.received}

    def count(self) -> int:
        with self._lock:
            return len(self.received)


def make_series(source: Path, count: int, directory: Path) -> list[Path]:
    """Copies of a real image as one new study: new Study, Series and SOP Instance UIDs."""
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    ds = dcmread(source)
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        path = directory / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- the modality ---------------------------------------------------------------------------------
def send(port: int, files: list[Path], calling_ae: str = "MODALITY", called_ae: str = "ROUTER",
         tls_args: tuple | None = None) -> list[int]:
    """C-STORE each file over one association, proposing each file's own transfer syntax.

    Returns one status per file (-1 when no response came).
    """
    ae = AE(ae_title=calling_ae)
    contexts: dict[tuple[str, str], None] = {}
    metas = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        contexts[pair] = None
        metas.append(pair)
    for sop, ts in contexts:
        ae.add_requested_context(sop, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, max_pdu=0, tls_args=tls_args)
    if not assoc.is_established:
        return [-1] * len(files)
    statuses = []
    try:
        for path in files:
            if not assoc.is_established:
                statuses.append(-1)
                continue
            try:
                park_reactor(assoc)  # the client's own reactor must not take the response (pynetdicom #435)
                rsp = assoc.send_c_store(dcmread(path))
            except (RuntimeError, OSError):
                statuses.append(-1)
                continue
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def echo(port: int, called_ae: str = "ROUTER") -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return "Status" in rsp and rsp.Status == 0
    finally:
        assoc.release()


# -- storage commitment: the modality's side ------------------------------------------------------------
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


@dataclass
class Report:
    """An N-EVENT-REPORT the modality received."""

    transaction_uid: str
    event_type: int
    committed: list[str]  # SOP Instance UIDs
    failed: dict[str, int]  # SOP Instance UID -> Failure Reason
    same_association: bool
    sender: str  # the calling AE title of the association it came on ("" on the modality's own)


def references(files: list[Path]) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of each file."""
    out = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


class CommittingModality:
    """A pynetdicom modality that asks for storage commitment (N-ACTION) and collects the
    reports: on the association it asked on, and, once `listen()`ed, on new associations the
    router opens to it with the SCP role (SCP/SCU Role Selection)."""

    def __init__(self, ae_title: str = "MODALITY") -> None:
        # pynetdicom serves an N-EVENT-REPORT on the requestor's association in a thread that
        # lowers the reactor's pause flag (#820): a release() after a report could then wait for
        # ever. The router installs the same fix in each of its processes; this modality, being a
        # pynetdicom requestor too, needs it as well (process-wide, and idempotent)
        keep_pause_flag_to_the_reactor()
        self.ae_title = ae_title
        self.port = free_port()
        self.reports: list[Report] = []
        self.role_selections: list[tuple[bool | None, bool | None]] = []  # (SCU, SCP) proposed by the router
        self._lock = threading.Lock()
        self.server = None

    def _on_report(self, event: evt.Event, same: bool) -> tuple[int, None]:
        info = event.event_information
        committed = [str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])]
        failed = {str(item.ReferencedSOPInstanceUID): int(item.FailureReason)
                  for item in info.get("FailedSOPSequence", [])}
        sender = "" if same else event.assoc.requestor.ae_title.strip()
        with self._lock:
            self.reports.append(Report(str(info.TransactionUID), int(event.event_type), committed, failed, same, sender))
        return 0x0000, None

    def _on_requested(self, event: evt.Event) -> None:
        for item in event.assoc.requestor.primitive.user_information:
            if type(item).__name__ == "SCP_SCU_RoleSelectionNegotiation":
                self.role_selections.append((item.scu_role, item.scp_role))

    def listen(self) -> CommittingModality:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                 scu_role=False, scp_role=True)
        ae.require_called_aet = True
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, lambda event: self._on_report(event, False)),
            (evt.EVT_REQUESTED, self._on_requested),
        ])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def request(self, port: int, refs: list[tuple[str, str]], transaction_uid: str | None = None,
                keep_open_s: float = 0.0, called_ae: str = "ROUTER", action_type: int = 1,
                information: Dataset | None = None) -> tuple[int, str]:
        """Send one storage commitment request; returns the N-ACTION status (-1: no answer) and the
        Transaction UID. With `keep_open_s`, the association stays open until a report for it
        arrives on it or that many seconds pass."""
        from pydicom.uid import generate_uid

        transaction_uid = transaction_uid or generate_uid()
        if information is None:
            information = Dataset()
            information.TransactionUID = transaction_uid
            items = []
            for sop_class, uid in refs:
                item = Dataset()
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, uid
                items.append(item)
            information.ReferencedSOPSequence = items
        # the report is recorded by the handler, before pynetdicom sends its N-EVENT-REPORT-RSP:
        # released at that moment, the response would never go out (and the router would rightly
        # keep the report to send again). The modality releases once a P-DATA-TF went out after
        # the report, i.e. its answer
        answered = threading.Event()

        def on_pdu_sent(event: evt.Event) -> None:
            if type(event.pdu).__name__ == "P_DATA_TF" and self.report(transaction_uid):
                answered.set()

        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda event: self._on_report(event, True)),
                                           (evt.EVT_PDU_SENT, on_pdu_sent)])
        if not assoc.is_established:
            return -1, transaction_uid
        try:
            status, _ = assoc.send_n_action(information, action_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
            code = int(status.Status) if "Status" in status else -1
            deadline = time.monotonic() + keep_open_s
            while time.monotonic() < deadline and assoc.is_established and not answered.is_set():
                time.sleep(0.05)
        finally:
            if assoc.is_established:
                assoc.release()
        return code, transaction_uid

    def report(self, transaction_uid: str) -> Report | None:
        with self._lock:
            found = [r for r in self.reports if r.transaction_uid == transaction_uid]
        return found[-1] if found else None

    def count(self, transaction_uid: str) -> int:
        with self._lock:
            return sum(1 for r in self.reports if r.transaction_uid == transaction_uid)


# -- the router ---------------------------------------------------------------------------------------
@dataclass
class Destination:
    name: str
    port: int
    rules: str  # the [[rule]] tables, TOML
    ae_title: str = "PACS"
    extra: str = ""  # more [destination] keys, TOML lines
    retry: str = "{ max_attempts = 5, backoff_s = 0.2, max_backoff_s = 1 }"
    timeouts: str = "{ connect_s = 2, acse_s = 5, dimse_s = 20, network_s = 20 }"
    url: str = ""  # a DICOMweb destination (STOW-RS) instead of ae_title, host and port

    def toml(self) -> str:
        where = f'url = "{self.url}"\n' if self.url else \
            f'ae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
        return (
            "[destination]\n"
            f"{where}"
            f"retry = {self.retry}\n"
            f"timeouts = {self.timeouts}\n"
            f"{textwrap.dedent(self.extra)}\n"
            f"{textwrap.dedent(self.rules)}\n"
        )


class RouterProcess:
    """`dicom-router serve` as a subprocess, stopped by its PID."""

    def __init__(self, workdir: Path, destinations: list[Destination], listen_extra: str = "",
                 min_free_mb: int = 0, metrics: bool = True, spool_dir: Path | None = None,
                 extra: str = "") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port() if metrics else 0
        self.spool = spool_dir or workdir / "spool"
        self.rules_dir = workdir / "rules"
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        for dest in destinations:
            (self.rules_dir / f"{dest.name}.toml").write_text(dest.toml())
        self.config = workdir / "router.toml"
        self.config.write_text(
            "[listen]\n"
            f'ae_title = "ROUTER"\nhost = "127.0.0.1"\nport = {self.port}\n{textwrap.dedent(listen_extra)}\n'
            f'[storage]\nspool_dir = "{self.spool}"\nmin_free_mb = {min_free_mb}\n'
            f'[metrics]\nhost = "127.0.0.1"\nport = {self.metrics_port}\n'
            '[rules]\ndir = "rules"\n'
            f"{textwrap.dedent(extra)}\n"
        )
        self.log_path = workdir / "router.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> RouterProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"router exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.ready():
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"router did not answer C-ECHO within {timeout}s:\n{self.log()}")

    def ready(self) -> bool:
        """/readyz when metrics are served (works whoever may call), else a C-ECHO."""
        if not self.metrics_port:
            return echo(self.port)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as rsp:
                return rsp.status == 200
        except urllib.error.HTTPError as exc:  # 503: up, but saying why it is not ready (a full spool)
            return "not listening" not in exc.read().decode(errors="replace")
        except (OSError, ValueError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"router did not stop within {timeout}s of SIGTERM")
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as rsp:
            return rsp.read().decode()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "router", *args, "--config", str(self.config)],
            capture_output=True, text=True, timeout=60, cwd=self.workdir,
        )


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        got = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        got = {k: v.strip('"') for k, v in got.items()}
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
__all__ = ["build_context"]


# -- DICOM TLS: certificates made by the tests ---------------------------------------------------------
def make_pki(directory: Path, certificates: dict[str, str]) -> Path:
    """A CA (`ca.pem`, `ca.key`) and, for each name, `NAME.pem` and `NAME.key` signed by it with
    the subjectAltName given (e.g. "IP:127.0.0.1,DNS:localhost"), made with openssl in `directory`."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=Test DICOM CA")
    for name, alt in certificates.items():
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (directory / f"{name}.ext").write_text(f"subjectAltName={alt}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return directory
