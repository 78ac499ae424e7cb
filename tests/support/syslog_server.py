"""An audit record repository for tests: Debian's rsyslogd, started by the test with its own
configuration, pid file and work directory, in the foreground, listening on 127.0.0.1 on a port
chosen free at run time, over TLS (RFC 5425), plain TCP (octet counting or LF framing) or UDP
(RFC 5426). It writes every message it receives as one line of `messages.log` in its directory:
the whole syslog message as it came (`%rawmsg%`), without the TCP frame's length prefix.

rsyslog escapes control characters it receives (a LF inside a message arrives as "#012", a tab
as "#011") and drops one trailing LF; UTF-8 (and a BOM) passes unchanged. A message longer than
`max_message_size` is cut: its first `max_message_size` bytes arrive as one message and, over
TCP, the rest of its frame as another. Its own messages (a refused TLS client, an oversize
message, ...) go to `rsyslogd.log`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.peers import free_port, make_pki, wait_until

TRANSPORTS = ("tls", "tcp", "udp")
AUTH_MODES = ("x509/certvalid", "anon")


def _free_port(transport: str) -> int:
    """A port free on 127.0.0.1 for TCP and, for UDP, for UDP too."""
    for _ in range(50):
        port = free_port()
        if transport != "udp":
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free UDP port found")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _bound(pid: int, port: int, udp: bool) -> bool:
    """Whether process `pid` has a socket listening (TCP) or bound (UDP) on 127.0.0.1:`port`."""
    local = f"0100007F:{port:04X}"
    state = "07" if udp else "0A"  # UDP unconnected / TCP LISTEN
    try:
        table = Path(f"/proc/{pid}/net/{'udp' if udp else 'tcp'}").read_text().splitlines()[1:]
    except OSError:
        return False
    inodes = {fields[9] for fields in (line.split() for line in table)
              if fields[1] == local and fields[3] == state}
    return bool(inodes & _socket_inodes(pid))


@dataclass
class SyslogServer:
    """rsyslogd receiving syslog messages on 127.0.0.1:`port` over `transport`.

    For "tls", `pki` is a `make_pki` directory holding `ca.pem` and `CERT.pem`/`CERT.key` for
    `cert`; when it is None, one is made in `directory / "pki"` with a server certificate
    "syslog" and a client certificate "client" (both for IP:127.0.0.1 and DNS:localhost).
    `auth_mode` "x509/certvalid" asks every client for a certificate signed by the CA and drops
    the connection of a client without one (or with one from another CA): the TLS handshake
    itself succeeds on the client's side, in TLS 1.2 as in 1.3, and the client then sees the
    connection closed, with nothing written; "anon" asks for none (a client that presents one is
    served as well).
    """

    directory: Path
    transport: str = "tls"
    auth_mode: str = "x509/certvalid"
    pki: Path | None = None
    cert: str = "syslog"
    port: int = 0
    max_message_size: str = "64k"
    tls_priority: str = ""  # a GnuTLS priority string, e.g. "NORMAL:-VERS-ALL:+VERS-TLS1.2"; "": GnuTLS's default
    extra_config: str = ""  # more RainerScript, appended to the configuration
    rsyslogd: str = field(default_factory=lambda: shutil.which("rsyslogd") or "/usr/sbin/rsyslogd")
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {self.transport!r}")
        if self.auth_mode not in AUTH_MODES:
            raise ValueError(f"auth_mode must be one of {AUTH_MODES}, not {self.auth_mode!r}")
        self.directory = Path(self.directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.workdir = self.directory / "work"
        self.workdir.mkdir(exist_ok=True)
        self.config = self.directory / "rsyslog.conf"
        self.pid_file = self.directory / "rsyslogd.pid"
        self.messages_path = self.directory / "messages.log"
        self.log_path = self.directory / "rsyslogd.log"  # rsyslogd's own messages
        self.output_path = self.directory / "rsyslogd.out"  # its stdout and stderr (errors before its config is read)
        if self.transport == "tls" and self.pki is None:
            self.pki = self.directory / "pki"
            self.pki.mkdir(exist_ok=True)
            make_pki(self.pki, {"syslog": "IP:127.0.0.1,DNS:localhost", "client": "IP:127.0.0.1,DNS:localhost"})
        self.port = self.port or _free_port(self.transport)
        self._output = None

    # -- the certificates (transport "tls") --
    @property
    def ca_file(self) -> Path:
        assert self.pki is not None
        return Path(self.pki) / "ca.pem"

    @property
    def cert_file(self) -> Path:
        assert self.pki is not None
        return Path(self.pki) / f"{self.cert}.pem"

    @property
    def key_file(self) -> Path:
        assert self.pki is not None
        return Path(self.pki) / f"{self.cert}.key"

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def config_text(self) -> str:
        tls = self.transport == "tls"
        lines = [
            "global(",
            f'  workDirectory="{self.workdir}"',
            f'  maxMessageSize="{self.max_message_size}"',
            '  net.enableDNS="off"',  # no reverse lookups of the sender
            '  processInternalMessages="on"',  # its own messages to rsyslogd.log, not to the system's log
        ]
        if tls:
            lines += [
                '  defaultNetstreamDriver="gtls"',
                f'  defaultNetstreamDriverCAFile="{self.ca_file}"',
                f'  defaultNetstreamDriverCertFile="{self.cert_file}"',
                f'  defaultNetstreamDriverKeyFile="{self.key_file}"',
            ]
        lines.append(")")
        if self.transport == "udp":
            lines.append('module(load="imudp")')
            listener = f'input(type="imudp" address="127.0.0.1" port="{self.port}" ruleset="received")'
        else:
            if tls:
                lines.append(f'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
                             f'StreamDriver.AuthMode="{self.auth_mode}")')
            else:
                lines.append('module(load="imtcp")')
            priority = f' gnutlsPriorityString="{self.tls_priority}"' if tls and self.tls_priority else ""
            listener = f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="received"{priority})'
        lines += [
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            'ruleset(name="received") {',
            f'  action(type="omfile" file="{self.messages_path}" template="raw")',
            "}",
            listener,
            # rsyslogd's own messages: the default ruleset, where no input is bound
            f'action(type="omfile" file="{self.log_path}" template="RSYSLOG_FileFormat")',
            self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15) -> SyslogServer:
        """Start rsyslogd and wait until it listens on the port (TCP) or has bound it (UDP)."""
        if self.pid is not None:
            raise AssertionError("rsyslogd is already running")
        self.config.write_text(self.config_text())
        # rsyslogd starts even when its configuration has errors (it leaves out what it could not read)
        check = subprocess.run([self.rsyslogd, "-N1", "-f", str(self.config)], check=False,
                               capture_output=True, text=True, timeout=30, cwd=self.directory)
        if check.returncode != 0:
            raise AssertionError(f"rsyslogd refused {self.config}:\n{check.stdout}{check.stderr}")
        self.pid_file.unlink(missing_ok=True)  # a stale one, left by a SIGKILL
        self._output = open(self.output_path, "ab")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            [self.rsyslogd, "-n", "-f", str(self.config), "-i", str(self.pid_file)],
            stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT, cwd=self.directory,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_output()
                raise AssertionError(f"rsyslogd exited with {self.proc.returncode}:\n{self.output()}{self.log()}")
            if _bound(self.proc.pid, self.port, self.transport == "udp"):
                return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"rsyslogd did not listen on port {self.port} within {timeout}s:\n"
                             f"{self.output()}{self.log()}")

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM by PID, wait, SIGKILL when it has not ended within `timeout`. Its return code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._close_output()
        return self.proc.returncode

    def restart(self, timeout: float = 15) -> SyslogServer:
        """Stop and start again, on the same port; the messages received so far stay."""
        self.stop()
        return self.start(timeout)

    def _close_output(self) -> None:
        if self._output is not None and not self._output.closed:
            self._output.close()

    def messages(self) -> list[str]:
        """The messages received so far, one per line as written (whole lines only)."""
        try:
            data = self.messages_path.read_bytes()
        except FileNotFoundError:
            return []
        return data.decode("utf-8", errors="replace").split("\n")[:-1]

    def wait_for(self, count: int, timeout: float = 10) -> list[str]:
        """Wait until at least `count` messages have been received; all the messages so far."""
        found: list[str] = []

        def enough() -> bool:
            found[:] = self.messages()
            return len(found) >= count

        try:
            wait_until(enough, timeout, what=f"{count} syslog messages on port {self.port}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got {len(found)}: {found[-3:]!r}\nrsyslogd:\n{self.log()}") from None
        return found

    def log(self) -> str:
        """rsyslogd's own messages (its errors are on its stderr, `output()`, as well)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output(self) -> str:
        """rsyslogd's stdout and stderr: what it says before it has read its configuration."""
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""
