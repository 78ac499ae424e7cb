"""The package's shape: imports follow the flow of an instance (receive -> queue -> forward),
no module of `router/` imports itself back through others, and the receiving processes load
neither the forwarding side nor numpy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.peers import REPO, RouterProcess, wait_until

PACKAGE = REPO / "router"
FORWARDING = ("router.forward.forwarder", "router.forward.association", "router.forward.dimse",
              "router.codecs.transcode", "router.codecs.workers", "router.operate.service")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_at_load(path: Path, known: set[str]) -> set[str]:
    """The router modules `path` imports at module level (those for type checking too; not the
    ones a function imports when it runs)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        for child in [node] if not isinstance(node, ast.If) else node.body:
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names if alias.name.startswith("router"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("router"):
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names
                             if f"{child.module}.{alias.name}" in known)
    return found & known


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports_at_load(path, set(files)) - {name} for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_of_the_package_imports_itself_back():
    graph = _graph()
    assert "router.receive.scp" in graph and "router.forward.forwarder" in graph["router.operate.service"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_receiving_side_imports_nothing_of_the_forwarding_side_and_runs_without_numpy():
    # the router's own receiving modules import no numpy (pydicom 3.0 would, if it is installed: the
    # receiving process hides it), and none of the forwarding side
    code = ("import sys; sys.modules['numpy'] = None; "
            "import router.receive.scp, router.receive.intake, router.operate.receiving; "
            f"loaded = [m for m in {FORWARDING!r} if m in sys.modules]; "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_receiving_process_has_neither_numpy_nor_the_codecs_loaded(tmp_path):
    router = RouterProcess(tmp_path, destinations=[], listen_extra="processes = 1")
    router.start()
    receivers: list[int] = []

    def receiving() -> bool:
        receivers[:] = [p for p in _children(router.proc.pid)
                        if "router.operate.receiving" in Path(f"/proc/{p}/cmdline").read_text()]
        return bool(receivers)

    try:
        wait_until(receiving, 20, what="the receiving process")
        maps = _mapped(receivers[0])
        assert "python" in maps  # a process whose maps say what it loaded
        assert "numpy" not in maps and "charls" not in maps.lower() and "imagecodecs" not in maps
        # the supervisor, which forwards, has them
        assert "numpy" in _mapped(router.proc.pid)
    finally:
        router.terminate()
    wait_until(lambda: all(_gone(p) for p in receivers), 10, what="the receiving process stopped with the router")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

