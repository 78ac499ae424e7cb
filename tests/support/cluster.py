"""Real PostgreSQL and HAProxy for the tests of several router nodes: one shared queue, one DICOM
address in front.

Both run from their Debian packages on 127.0.0.1, on ports chosen free at run time, with their
files in a directory the test gives them, and are stopped by their PID.

PostgreSQL refuses to run as root, and the tests run as root: the server then runs as `nobody`
(setpriv, which execs, so the PID we hold is the postmaster's). pytest's temporary directories
are private to root (mode 0700), so that user also keeps CAP_DAC_READ_SEARCH: it may look up
paths through them, and writes only to its own data and socket directories.

The HAProxy configuration the tests run is the shipped `deploy/haproxy.cfg` itself, with its
`bind` lines and its example `server` lines replaced (see `haproxy_config`).
"""

from __future__ import annotations

import csv
import io
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.peers import REPO, alive, descendants, free_port

__all__ = ["HAPROXY", "HAPROXY_CFG", "POSTGRES_BIN", "Haproxy", "PostgresServer", "free_port",
           "haproxy_config", "require"]

HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


def _newest_postgres_bin() -> Path | None:
    """The bin directory of the newest PostgreSQL under /usr/lib/postgresql (Debian's layout)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    found.sort(key=lambda b: [int(x) for x in re.findall(r"\d+", b.parent.name)] or [0])
    return found[-1] if found else None


POSTGRES_BIN = _newest_postgres_bin()


def require(*programs: str) -> None:
    """Skip the test, naming the program, when `postgres` or `haproxy` is not installed; in CI
    (the CI variable set) fail instead, since there a missing program is a broken install."""
    for program in programs:
        missing = {"postgres": POSTGRES_BIN is None, "haproxy": HAPROXY is None}[program]
        if missing:
            package = {"postgres": "postgresql", "haproxy": "haproxy"}[program]
            why = f"{program} is not installed (Debian package {package}; scripts/install-peers.sh installs it)"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> bool:
    """Send `sig` to one process we started and wait for it; True if it ended in time."""
    if proc.poll() is not None:
        return True
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _wait_gone(pids: list[int], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: processes {[p for p in pids if alive(p)]} still alive after {timeout}s")
        time.sleep(0.02)


# -- PostgreSQL ---------------------------------------------------------------------------------------
class PostgresServer:
    """A private PostgreSQL cluster in `root`: data in root/data, the unix socket in root/socket,
    the server's log in root/postgres.log.

    `start()` creates the cluster the first time (superuser `router`, trust authentication,
    UTF8) and the database `router`; the port is chosen once and kept across stop/start, so
    `url` stays valid. The server runs with fsync on: what it acknowledged survives a crash.
    """

    USER = "nobody"  # the unprivileged user the server runs as when the tests run as root

    def __init__(self, root: Path) -> None:
        if POSTGRES_BIN is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self.root = Path(root)
        self.bin = POSTGRES_BIN
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_path = self.root / "postgres.log"
        self._port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://router@127.0.0.1:{self._port}/router"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs, else None."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _as_server_user(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        user = pwd.getpwnam(self.USER)
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(self.USER)
            os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(0o700)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8")
        return env

    def _initdb(self) -> None:
        self._own(self.data)
        self._own(self.socket_dir)
        cmd = [*self._as_server_user(), str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust",
               "-E", "UTF8", "--locale=C.UTF-8", "-U", "router"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.data, env=self._env())
        (self.root / "initdb.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise AssertionError(f"initdb exited {done.returncode}: {' '.join(cmd)}\n{done.stdout}{done.stderr}")

    def start(self, timeout: float = 30) -> PostgresServer:
        """Start the server (creating the cluster the first time) and return once a client can
        connect and the database `router` exists."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self._port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] ",
        }
        cmd = [*self._as_server_user(), str(self.bin / "postgres"), "-D", str(self.data)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.data,
                                         env=self._env())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self._create_database()
                return self
            except Exception as exc:  # noqa: BLE001 - not accepting connections yet
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"PostgreSQL did not accept connections within {timeout}s ({exc}):\n"
                                         f"{self.log_text()[-4000:]}") from exc
                time.sleep(0.05)

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self._port, user="router", dbname="postgres",
                             connect_timeout=2, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'router'").fetchone() is None:
                conn.execute("CREATE DATABASE router")

    def connect(self, **kwargs):  # noqa: ANN003, ANN201 - a psycopg.Connection
        """A new psycopg connection to the database `router` (the caller closes it)."""
        import psycopg

        return psycopg.connect(self.url, connect_timeout=5, **kwargs)

    def stop(self, fast: bool = True, timeout: float = 30) -> None:
        """Shut down cleanly: fast (SIGINT: disconnect clients, abort their transactions) or
        smart (SIGTERM: wait for clients to disconnect). SIGKILL and fail if it takes longer
        than `timeout`. Returns once the postmaster and its children are gone."""
        if self.proc is None:
            return
        children = descendants(self.proc.pid)
        if not _stop(self.proc, signal.SIGINT if fast else signal.SIGTERM, timeout):
            self.kill()
            raise AssertionError(f"PostgreSQL did not shut down within {timeout}s:\n{self.log_text()[-4000:]}")
        _wait_gone(children, 10, "PostgreSQL after shutdown")
        self.proc = None

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and every process it started, by PID, and
        return once they are gone. The next `start()` recovers from the write-ahead log."""
        if self.proc is None:
            return
        children = descendants(self.proc.pid)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        _wait_gone(children, 10, "PostgreSQL after SIGKILL")
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- HAProxy ------------------------------------------------------------------------------------------
def _sections(text: str) -> list[list[str]]:
    """The configuration as sections: each starts at a line in column 0 that is not a comment
    (global, defaults, frontend NAME, backend NAME, ...); the lines before the first are one
    section too."""
    sections: list[list[str]] = [[]]
    for line in text.splitlines():
        if line[:1] not in ("", " ", "\t", "#"):
            sections.append([])
        sections[-1].append(line)
    return sections


def _section(sections: list[list[str]], header: str) -> list[str]:
    for lines in sections:
        if lines and lines[0].split() == header.split():
            return lines
    raise ValueError(f"{HAPROXY_CFG} has no section `{header}`")


def _keyword(line: str) -> str:
    words = line.split()
    return words[0] if words and not words[0].startswith("#") else ""


def _replace_bind(lines: list[str], address: str, section: str) -> None:
    binds = [i for i, line in enumerate(lines) if _keyword(line) == "bind"]
    if len(binds) != 1:
        raise ValueError(f"{HAPROXY_CFG}: `{section}` must have exactly one bind line, has {len(binds)}")
    line = lines[binds[0]]
    indent = line[: len(line) - len(line.lstrip())]
    lines[binds[0]] = f"{indent}bind {address}"


def _option(words: list[str], name: str, value: str) -> None:
    if name not in words[:-1]:
        raise ValueError(f"{HAPROXY_CFG}: the example server lines must carry `{name} <value>`")
    words[words.index(name) + 1] = value


def haproxy_config(nodes: list[tuple[str, int, int]], dicom_port: int, stats_port: int | None = None,
                   check_interval_ms: int = 500) -> str:
    """The shipped `deploy/haproxy.cfg` for router nodes on this machine.

    `nodes` are (name, DICOM port, metrics port). Exactly these lines change: the `bind` of
    `frontend dicom` becomes 127.0.0.1:`dicom_port`; the example `server` lines of
    `backend routers` become one line per node at 127.0.0.1, each with the first example line's
    options except `port` (the node's metrics port) and `inter` (`check_interval_ms`); the `bind`
    of `frontend stats` becomes 127.0.0.1:`stats_port`, or the section is left out when
    `stats_port` is None. Raises ValueError when the shipped file no longer has that shape.
    """
    if not nodes:
        raise ValueError("at least one node")
    sections = _sections(HAPROXY_CFG.read_text())
    _replace_bind(_section(sections, "frontend dicom"), f"127.0.0.1:{dicom_port}", "frontend dicom")

    backend = _section(sections, "backend routers")
    examples = [i for i, line in enumerate(backend) if _keyword(line) == "server"]
    if not examples:
        raise ValueError(f"{HAPROXY_CFG}: `backend routers` has no example server line")
    template = backend[examples[0]]
    indent = template[: len(template) - len(template.lstrip())]
    servers = []
    for name, node_port, metrics_port in nodes:
        words = template.split()
        words[1], words[2] = name, f"127.0.0.1:{node_port}"
        _option(words, "port", str(metrics_port))
        _option(words, "inter", f"{check_interval_ms}ms")
        servers.append(indent + " ".join(words))
    backend[:] = [*backend[:examples[0]], *servers,
                  *(line for i, line in enumerate(backend) if i > examples[0] and i not in examples)]

    stats = _section(sections, "frontend stats")
    if stats_port is None:
        sections.remove(stats)
    else:
        _replace_bind(stats, f"127.0.0.1:{stats_port}", "frontend stats")
    return "\n".join(line for lines in sections for line in lines) + "\n"


def _listening(port: int) -> bool:
    """Whether a socket is listening on TCP `port` (any address), from /proc/net/tcp{,6}:
    no connection is made, so no node behind HAProxy sees one."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _bind_port(text: str, section: str) -> int | None:
    for lines in _sections(text):
        if lines and lines[0].split() == section.split():
            for line in lines:
                if _keyword(line) == "bind":
                    return int(line.split()[1].rsplit(":", 1)[1])
    return None


class Haproxy:
    """HAProxy in the foreground (`-db`, one process) on `config_text`, its configuration and
    log in `root`."""

    def __init__(self, config_text: str, root: Path) -> None:
        if HAPROXY is None:
            raise RuntimeError("HAProxy is not installed (Debian package haproxy)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "haproxy.cfg"
        self.config.write_text(config_text)
        self.log_path = self.root / "haproxy.log"
        port = _bind_port(config_text, "frontend dicom")
        if port is None:
            raise ValueError("the configuration has no `frontend dicom` with a bind line")
        self.port = port
        self.stats_port = _bind_port(config_text, "frontend stats")
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def check_config(self) -> tuple[int, str]:
        """`haproxy -c`: its exit code and output (0 when the configuration is valid)."""
        done = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30)
        return done.returncode, done.stdout + done.stderr

    def start(self, timeout: float = 10) -> Haproxy:
        """Start HAProxy; return once its DICOM frontend port is listening."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"haproxy did not listen on {self.port} within {timeout}s:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM by PID (HAProxy closes every connection at once); SIGKILL if it lingers."""
        if self.proc is None:
            return
        if not _stop(self.proc, signal.SIGTERM, timeout):
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def server_status(self, backend: str = "routers") -> dict[str, str]:
        """Server name -> HAProxy's status of it (UP, DOWN, "UP 1/2" going down, ...), from the
        stats page's CSV; needs the `frontend stats` section."""
        if self.stats_port is None:
            raise ValueError("the configuration has no `frontend stats`")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=5) as rsp:
            text = rsp.read().decode()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows
                if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Haproxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
