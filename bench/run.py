"""Throughput of the router against its ceilings and its alternatives, on real images.

    python bench/run.py [--quick] [--repeat N] [--images N] [--scenarios NAME[:CORPUS] ...]

DCMTK storescu is the modality, DCMTK storescp the destination, everything on 127.0.0.1.
Each scenario runs --repeat times, interleaved with the others (round-robin), each time with
fresh processes and directories. Prints a markdown table (median, min-max) and writes every
run as JSON to bench/results/<timestamp>.json. See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import corpus  # noqa: E402
import harness  # noqa: E402
from harness import RouterRule, Server  # noqa: E402

RESULTS = harness.BENCH / "results"
JPEG_LS = "1.2.840.10008.1.2.4.80"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


# -- scenarios ------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What a scenario started: where the modality sends, what is measured, where images land."""

    port: int
    called_ae: str
    middle: Server  # the process tree whose CPU and memory are reported
    dest: Path | None  # images counted here; None: done when every storescu has exited
    servers: list[Server] = field(default_factory=list)
    metrics_url: str | None = None  # the router's /metrics: CPU by stage
    counter: Callable[[], int] | None = None  # images at the destination, when not files in `dest`


# Where destinations write. The destination stands for a PACS on another machine: on a tmpfs its
# writes do not share a journal with the spool, whose fsyncs would otherwise also flush them.
DEST_ROOT: Path | None = None


def _dest_dir(work: Path) -> Path:
    return (DEST_ROOT / work.name if DEST_ROOT is not None else work) / "dest"


def _with_storescp(work: Path, make_middle: Callable[[int], Server]) -> Setup:
    dest = _dest_dir(work)
    scp = harness.start_storescp(work / "storescp", dest)
    try:
        middle = make_middle(scp.port)
    except BaseException:
        scp.stop()
        raise
    return Setup(middle.port, "ROUTER", middle, dest, [middle, scp])


def _direct(work: Path) -> Setup:
    dest = _dest_dir(work)
    scp = harness.start_storescp(work / "storescp", dest)
    return Setup(scp.port, "STORESCP", scp, dest, [scp])


def _router(rule: RouterRule, dest_kind: str = "storescp") -> Callable[[Path], Setup]:
    def setup(work: Path) -> Setup:
        metrics_port = harness.free_port()
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        if dest_kind == "storescp":
            setup = _with_storescp(
                work, lambda port: harness.start_router(work / "router", port, rule, metrics_port=metrics_port))
            setup.metrics_url = url
            return setup
        # DCMTK 3.6.7's storescp refuses HTJ2K: a pynetdicom receiver that writes files stands in
        dest = _dest_dir(work)
        receiver = harness.start_bare(work / "receiver", max_pdu=0, out=dest)
        try:
            router = harness.start_router(work / "router", receiver.port, rule, metrics_port=metrics_port)
        except BaseException:
            receiver.stop()
            raise
        return Setup(router.port, "ROUTER", router, dest, [router, receiver], url)
    return setup


def _to_archive(rule: RouterRule, stow: int | None) -> Callable[[Path], Setup]:
    """The router in front of Orthanc as the archive: STOW-RS with `stow` instances per request,
    or DIMSE C-STORE (None), the same Orthanc either way."""
    def setup(work: Path) -> Setup:
        metrics_port = harness.free_port()
        archive = harness.start_archive(work / "archive")
        if stow is None:
            where = f'ae_title = "ARCHIVE"\nhost = "127.0.0.1"\nport = {archive.dicom_port}\nmax_associations = 2\n'
        else:
            secret = work / "archive.password"
            secret.write_text("bench\n")
            where = (f'url = "{archive.dicomweb_url}"\nmax_requests = 2\ninstances_per_request = {stow}\n'
                     f'auth = {{ username = "router", password_file = "{secret}" }}\n')
        try:
            router = harness.start_router(work / "router", 0, rule, metrics_port=metrics_port, destination=where)
        except BaseException:
            archive.server.stop()
            raise
        return Setup(router.port, "ROUTER", router, None, [router, archive.server],
                     f"http://127.0.0.1:{metrics_port}/metrics", counter=archive.count)
    return setup


def _orthanc(ingest: str | None) -> Callable[[Path], Setup]:
    return lambda work: _with_storescp(work, lambda port: harness.start_orthanc(work / "orthanc", port, ingest))


def _naive(compress: bool) -> Callable[[Path], Setup]:
    return lambda work: _with_storescp(work, lambda port: harness.start_naive(work / "naive", port, compress))


def _bare(max_pdu: int | None) -> Callable[[Path], Setup]:
    def setup(work: Path) -> Setup:
        server = harness.start_bare(work / "bare", max_pdu=max_pdu)
        return Setup(server.port, "STORESCP", server, None, [server])
    return setup


@dataclass(frozen=True)
class Kind:
    setup: Callable[[Path], Setup]
    corpus: str
    what: str


KINDS: dict[str, Kind] = {
    "direct": Kind(_direct, "ct", "storescu -> storescp (the ceiling)"),
    "router-original": Kind(_router(RouterRule("original")), "ct", "router pass-through"),
    "router-jls": Kind(_router(RouterRule("jpeg-ls-lossless")), "ct", "router JPEG-LS lossless (verify on, the default)"),
    "router-jls-noverify": Kind(_router(RouterRule("jpeg-ls-lossless", {"verify": False})), "ct",
                                "router JPEG-LS lossless, verify = false"),
    "router-jpeg-lossy": Kind(_router(RouterRule("jpeg-lossy", {"quality": 90, "fallback": "jpeg-ls-lossless"})), "mr",
                              "router JPEG lossy q90 (12-bit extended), fallback JPEG-LS"),
    "router-htj2k": Kind(_router(RouterRule("htj2k-lossless"), dest_kind="pynetdicom"), "ct",
                         "router HTJ2K lossless; destination: pynetdicom receiver (storescp 3.6.7 has no HTJ2K)"),
    "orthanc-original": Kind(_orthanc(None), "ct", "Orthanc 1.10 store + Lua SendToModality, no transcoding"),
    "orthanc-jls": Kind(_orthanc(JPEG_LS), "ct", "Orthanc 1.10 IngestTranscoding JPEG-LS lossless + Lua forward"),
    "orthanc-jpeg70": Kind(_orthanc(JPEG_LOSSLESS_SV1), "ct", "Orthanc 1.10 IngestTranscoding JPEG lossless SV1 + Lua forward"),
    "naive-original": Kind(_naive(False), "ct", "naive pynetdicom forwarder, pass-through"),
    "naive-jls": Kind(_naive(True), "ct", "naive pynetdicom forwarder, ds.compress(JPEG-LS)"),
    "stow-original": Kind(_to_archive(RouterRule("original"), 16), "ct",
                          "router -> Orthanc STOW-RS, as received, 16 instances per request"),
    "stow-original-1": Kind(_to_archive(RouterRule("original"), 1), "ct",
                            "router -> Orthanc STOW-RS, as received, 1 instance per request"),
    "stow-original-64": Kind(_to_archive(RouterRule("original"), 64), "ct",
                             "router -> Orthanc STOW-RS, as received, 64 instances per request"),
    "stow-jls": Kind(_to_archive(RouterRule("jpeg-ls-lossless"), 16), "ct",
                     "router -> Orthanc STOW-RS, JPEG-LS lossless, 16 instances per request"),
    "cstore-original": Kind(_to_archive(RouterRule("original"), None), "ct",
                            "router -> the same Orthanc by DIMSE C-STORE, as received"),
    "cstore-jls": Kind(_to_archive(RouterRule("jpeg-ls-lossless"), None), "ct",
                       "router -> the same Orthanc by DIMSE C-STORE, JPEG-LS lossless"),
    "bare-default": Kind(_bare(None), "ct", "bare pynetdicom receiver, default max PDU (16382)"),
    "bare-unlimited": Kind(_bare(0), "ct", "bare pynetdicom receiver, unlimited max PDU"),
}

FULL = [
    "direct", "direct-4x", "router-original", "router-original-4x", "router-jls", "router-jls-noverify",
    "router-htj2k", "orthanc-original", "orthanc-jls", "orthanc-jpeg70", "naive-original", "naive-jls",
    "bare-default", "bare-unlimited", "direct:mr", "router-jpeg-lossy:mr", "direct:cr", "router-original:cr",
    "router-jls:cr", "orthanc-jls:cr", "stow-original", "stow-original-1", "stow-original-64", "stow-jls",
    "cstore-original", "cstore-jls", "router-original-each", "orthanc-original-each", "bare-unlimited-each",
]
QUICK = ["direct", "router-original", "router-jls", "naive-jls", "bare-default", "bare-unlimited", "stow-original",
         "router-original-each"]


@dataclass(frozen=True)
class Scenario:
    kind: str
    corpus: str
    senders: int
    each: bool = False  # one association per image (a storescu per file), as many modalities send

    @property
    def key(self) -> str:
        return f"{self.kind}{'-4x' if self.senders == 4 else ''}{'-each' if self.each else ''}:{self.corpus}"


def parse_scenario(text: str) -> Scenario:
    name, _, corpus_name = text.partition(":")
    senders, each = 1, False
    if name.endswith("-each"):
        name, each = name[:-5], True
    if name.endswith("-4x"):
        name, senders = name[:-3], 4
    if name not in KINDS:
        raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(KINDS)} (add -4x for 4 senders, -each for "
                         "an association per image, :ct/:cr/:mr)")
    corpus_name = corpus_name or KINDS[name].corpus
    if corpus_name not in corpus.STUDIES:
        raise SystemExit(f"unknown corpus {corpus_name!r}; known: {', '.join(corpus.STUDIES)}")
    return Scenario(name, corpus_name, senders, each)


# -- one run -------------------------------------------------------------------------------------
def _split(files: list[Path], parts: int) -> list[list[Path]]:
    size = -(-len(files) // parts)
    return [files[i:i + size] for i in range(0, len(files), size)]


def _wait_count(directory: Path, count: int, timeout: float, servers: list[Server]) -> None:
    deadline = time.monotonic() + timeout
    while harness.count_files(directory) < count:
        for s in servers:
            if not s.alive():
                raise RuntimeError(f"{_exit_text(s)}\n{s.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {harness.count_files(directory)}/{count} images at the destination after {timeout}s")
        time.sleep(0.02)


def _syntax_tally(paths: list[Path]) -> dict[str, int]:
    from pydicom import dcmread
    from pydicom.uid import UID

    tally: Counter[str] = Counter()
    for path in paths:
        try:
            ts = UID(str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))
            tally[ts.name] += 1
        except Exception:  # noqa: BLE001 - a partial or odd file is counted, not fatal
            tally["unreadable"] += 1
    return dict(tally)


def _read_through(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as fp:
            while fp.read(1 << 20):
                pass


def run_once(scenario: Scenario, study: corpus.Study, root: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=scenario.kind + "-", dir=root))
    n, input_bytes = len(study.files), study.bytes
    result: dict = {"scenario": scenario.key, "images": n, "input_bytes": input_bytes}
    setup: Setup | None = None
    senders: list[subprocess.Popen] = []
    try:
        setup = KINDS[scenario.kind].setup(work)
        timeout = 60 + 0.4 * n * max(1, input_bytes / n / 1e6)
        # warm-up: imports, codec workers, the outbound association
        codes = harness.wait_procs([harness.storescu(study.warmup, setup.port, work, setup.called_ae, "-warmup")], 120)
        if any(codes):
            raise RuntimeError(f"warm-up storescu exited {codes}; {_server_states(setup.servers)}\n"
                               f"{_tail(work / 'storescu-warmup.log')}")
        if setup.dest is not None:
            _wait_count(setup.dest, len(study.warmup), 120, setup.servers)
        if setup.counter is not None:
            deadline = time.monotonic() + 120
            while setup.counter() < len(study.warmup) and time.monotonic() < deadline:
                time.sleep(0.05)
        before = set(os.listdir(setup.dest)) if setup.dest is not None else set()
        counted = setup.counter() if setup.counter is not None else 0
        _read_through(study.files)  # the modality's files in the page cache, whatever was evicted since
        stages0 = harness.stage_cpu(setup.metrics_url) if setup.metrics_url else None
        cpu0 = harness.cpu_seconds(setup.middle.tree())
        t0 = time.monotonic()
        send = harness.storescu_each if scenario.each else harness.storescu
        senders = [send(chunk, setup.port, work, setup.called_ae, f"-{i}")
                   for i, chunk in enumerate(_split(study.files, scenario.senders))]
        t_send = t_done = None
        deadline = t0 + timeout
        while t_done is None:
            now = time.monotonic()
            if t_send is None and all(p.poll() is not None for p in senders):
                t_send = now - t0
                codes = [p.returncode for p in senders]
                if any(codes):
                    logs = "\n".join(_tail(work / f"storescu-{i}.log") for i in range(len(senders)))
                    raise RuntimeError(f"storescu exited {codes}; {_server_states(setup.servers)}\n{logs}")
                if setup.dest is None and setup.counter is None:
                    t_done = t_send
            if setup.dest is not None and harness.count_files(setup.dest) >= len(before) + n:
                t_done = now - t0
            if setup.counter is not None and setup.counter() >= counted + n:
                t_done = time.monotonic() - t0
            for s in setup.servers:
                if not s.alive():
                    raise RuntimeError(f"{_exit_text(s)}\n{s.log_tail()}")
            if now > deadline:
                got = harness.count_files(setup.dest) - len(before) if setup.dest else "?"
                raise RuntimeError(f"timed out after {timeout:.0f}s with {got}/{n} images at the destination")
            time.sleep(0.02)
        tree = setup.middle.tree()
        cpu = harness.cpu_seconds(tree) - cpu0
        result.update(
            ok=True,
            seconds=t_done,
            sender_seconds=t_send if t_send is not None else t_done,
            instances_per_s=n / t_done,
            mb_per_s=input_bytes / t_done / 1e6,
            cpu_s=cpu,
            cpu_ms_per_instance=cpu / n * 1000,
            peak_rss_mb=harness.peak_rss_mb(tree),
            processes=len(tree),
        )
        if stages0 is not None:
            # the router counts its CPU by stage; its receive and send totals are updated twice a
            # second, so the shares are read a moment later and applied to the CPU measured above
            time.sleep(1.1)
            spent = {k: v - stages0.get(k, 0.0) for k, v in harness.stage_cpu(setup.metrics_url).items()}
            total = sum(max(v, 0.0) for v in spent.values())
            if total > 0:
                result["stage_cpu_ms_per_instance"] = {
                    k: cpu * max(v, 0.0) / total / n * 1000 for k, v in spent.items()}
        if setup.dest is not None:
            time.sleep(0.1)  # storescp writes in place: let the last file be complete
            new = [setup.dest / f for f in os.listdir(setup.dest) if f not in before and not f.startswith(".")]
            dest_bytes = sum(p.stat().st_size for p in new)
            result.update(dest_bytes=dest_bytes, ratio=input_bytes / dest_bytes if dest_bytes else None,
                          dest_syntaxes=_syntax_tally(new))
    except Exception as exc:  # noqa: BLE001 - a failed scenario is a result, not the end of the run
        result.update(ok=False, error=str(exc))
    finally:
        harness.wait_procs([p for p in senders if p.poll() is None], 0.1) if senders else None
        if setup is not None:
            for server in setup.servers:
                code = server.stop()
                if server is setup.middle and code not in (0, None, -15):
                    result.setdefault("notes", []).append(f"{server.name} exit code {code} at stop")
        shutil.rmtree(work, ignore_errors=True)
        if DEST_ROOT is not None:
            shutil.rmtree(DEST_ROOT / work.name, ignore_errors=True)
    return result


def _server_states(servers: list[Server]) -> str:
    time.sleep(0.3)  # a crashing server may take a moment to be reaped
    dead = [s for s in servers if not s.alive()]
    if not dead:
        return "servers alive"
    return "; ".join(_exit_text(s) for s in dead)


def _exit_text(server: Server) -> str:
    code = server.proc.returncode
    name = f" ({signal.Signals(-code).name})" if code is not None and code < 0 else ""
    return f"{server.name} exited with {code}{name}: {server.log_tail(1)[:300]}"


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the codec-bound limit ------------------------------------------------------------------------
def codec_limits(studies: dict[str, corpus.Study], scenarios: list[Scenario], seconds: float) -> list[dict]:
    """Single-core transcode_file speed (read, decode, encode, verify, write) of each codec used, x cores."""
    from router.request import Request
    from router.codecs.transcode import transcode_file

    wanted: dict[tuple[str, str], dict] = {}
    for s in scenarios:
        if s.kind == "router-jls":
            wanted[("jpeg-ls-lossless", s.corpus)] = {}
        elif s.kind == "router-jls-noverify":
            wanted[("jpeg-ls-lossless", s.corpus)] = {}
            wanted[("jpeg-ls-lossless no verify", s.corpus)] = {"verify": False}
        elif s.kind == "router-htj2k":
            wanted[("htj2k-lossless", s.corpus)] = {}
        elif s.kind == "router-jpeg-lossy":
            wanted[("jpeg-lossy", s.corpus)] = {"quality": 90, "fallback": "jpeg-ls-lossless"}
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for (label, corpus_name), extra in wanted.items():
            src = studies[corpus_name].files[0]
            syntax = label.split()[0]
            request = Request(syntax=syntax, **extra)
            dst = Path(tmp) / "out.dcm"
            transcoded = transcode_file(src, dst, request)
            times: list[float] = []
            spent = 0.0
            while spent < seconds or len(times) < 3:
                t = time.perf_counter()
                transcode_file(src, dst, request)
                times.append(time.perf_counter() - t)
                spent += times[-1]
            per = statistics.median(times)
            size = src.stat().st_size
            rows.append({
                "syntax": label, "corpus": corpus_name, "ms_per_instance": per * 1000,
                "mb_per_s_core": size / per / 1e6, "instances_per_s_core": 1 / per,
                "cores": cores, "instances_per_s_limit": cores / per, "mb_per_s_limit": cores * size / per / 1e6,
                "result_syntax": transcoded.syntax, "ratio": transcoded.ratio,
            })
        if "ct" in studies:
            # the CT is 14-bit signed: 12-bit lossy JPEG cannot carry it; say what the router does
            transcoded = transcode_file(studies["ct"].files[0], Path(tmp) / "ct.dcm",
                                        Request(syntax="jpeg-lossy", quality=90, fallback="jpeg-ls-lossless"))
            rows.append({"syntax": "jpeg-lossy (fallback jpeg-ls-lossless)", "corpus": "ct", "check_only": True,
                         "result_syntax": transcoded.syntax, "note": transcoded.note})
    return rows


# -- report --------------------------------------------------------------------------------------
def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def summarise(runs: list[dict], order: list[str]) -> list[dict]:
    rows = []
    for key in order:
        mine = [r for r in runs if r["scenario"] == key]
        ok = [r for r in mine if r.get("ok")]
        row = {"scenario": key, "runs": len(mine), "ok": len(ok),
               "errors": sorted({r["error"].splitlines()[0] for r in mine if not r.get("ok")})}
        if ok:
            row["images"] = ok[0]["images"]
            for metric in ("instances_per_s", "mb_per_s", "seconds", "sender_seconds", "cpu_s",
                           "cpu_ms_per_instance", "peak_rss_mb", "ratio"):
                values = [r[metric] for r in ok if r.get(metric) is not None]
                if values:
                    row[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            tally: Counter[str] = Counter()
            for r in ok:
                tally.update(r.get("dest_syntaxes", {}))
            row["dest_syntaxes"] = dict(tally)
        rows.append(row)
    return rows


def markdown(runs: list[dict], order: list[str]) -> str:
    head = ("| scenario | N | inst/s | MB/s | last image at dest, s | modality done, s | CPU s (ms/inst) "
            "| peak RSS MB | ratio | at destination |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for key in order:
        mine = [r for r in runs if r["scenario"] == key]
        ok = [r for r in mine if r.get("ok")]
        if not ok:
            error = mine[0]["error"].splitlines()[0] if mine else "not run"
            lines.append(f"| {key} | — | FAILED: {error[:250]} | | | | | | | |")
            continue
        get = lambda m: [r[m] for r in ok if r.get(m) is not None]  # noqa: E731
        tally: Counter[str] = Counter()
        for r in ok:
            tally.update(r.get("dest_syntaxes", {}))
        dest = ", ".join(f"{name}" + (f" ×{c // len(ok)}" if len(tally) > 1 else "") for name, c in tally.most_common())
        failed = len(mine) - len(ok)
        cpu = get("cpu_s")
        lines.append(
            f"| {key}{f' ({failed} failed)' if failed else ''} | {ok[0]['images']} "
            f"| {_spread(get('instances_per_s'), '.1f')} | {_spread(get('mb_per_s'), '.1f')} "
            f"| {_spread(get('seconds'), '.2f')} | {_spread(get('sender_seconds'), '.2f')} "
            f"| {statistics.median(cpu):.1f} ({statistics.median(get('cpu_ms_per_instance')):.1f}) "
            f"| {statistics.median(get('peak_rss_mb')):.0f} "
            f"| {_spread(get('ratio'), '.2f') if get('ratio') else '—'} | {dest or '—'} |"
        )
    return "\n".join(lines)


from router.metrics import CPU_STAGES as STAGES  # noqa: E402 - the router's own list


def stage_markdown(runs: list[dict], order: list[str]) -> str:
    """Router CPU per instance by stage (medians over runs) and the throughput that CPU allows."""
    cores = os.cpu_count() or 1
    head = ("| scenario | " + " | ".join(STAGES) + " | total ms/inst | CPU-bound limit inst/s (× cores) "
            "| achieved inst/s | achieved / limit |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for key in order:
        ok = [r for r in runs if r["scenario"] == key and r.get("ok") and r.get("stage_cpu_ms_per_instance")]
        if not ok:
            continue
        stage = {k: statistics.median(r["stage_cpu_ms_per_instance"].get(k, 0.0) for r in ok) for k in STAGES}
        total = sum(stage.values())
        limit = cores * 1000 / total if total else float("nan")
        achieved = statistics.median(r["instances_per_s"] for r in ok)
        lines.append(f"| {key} | " + " | ".join(f"{stage[k]:.1f}" for k in STAGES)
                     + f" | {total:.1f} | {limit:.0f} (×{cores}) | {achieved:.1f} | {achieved / limit:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def codec_markdown(rows: list[dict]) -> str:
    lines = ["| codec (router.codecs.transcode.transcode_file) | corpus | ms/inst, 1 core | MB/s, 1 core "
             "| limit inst/s (× cores) | limit MB/s | output |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("check_only"):
            lines.append(f"| {r['syntax']} | {r['corpus']} | | | | | {r['result_syntax']}: {r['note']} |")
            continue
        lines.append(f"| {r['syntax']} | {r['corpus']} | {r['ms_per_instance']:.1f} | {r['mb_per_s_core']:.0f} "
                     f"| {r['instances_per_s_limit']:.0f} (×{r['cores']}) | {r['mb_per_s_limit']:.0f} "
                     f"| {r['result_syntax']}, ratio {r['ratio']:.2f} |")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "cpus": str(os.cpu_count()), "kernel": platform.release()}
    for dist in ("pydicom", "pynetdicom", "imagecodecs", "pyjpegls", "dicom-router"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    for tool, argv in (("dcmtk", ["storescu", "--version"]), ("orthanc", ["Orthanc", "--version"])):
        try:
            text = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
            out[tool] = text.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            out[tool] = "not found"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100 CT slices, 1 repetition, scenarios " + " ".join(QUICK))
    parser.add_argument("--repeat", type=int, default=None, help="runs per scenario (default 3; --quick: 1)")
    parser.add_argument("--images", type=int, default=None, help="at most this many images per study (--quick: 100)")
    parser.add_argument("--scenarios", nargs="+", default=None,
                        help="NAME[-4x][-each][:CORPUS] ... ; names: " + ", ".join(KINDS))
    parser.add_argument("--corpus-dir", type=Path, default=corpus.DEFAULT_CACHE)
    parser.add_argument("--codec-seconds", type=float, default=1.0, help="time per codec-limit measurement")
    parser.add_argument("--dest-dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where the destination writes the images it receives (default: /dev/shm, a "
                             "tmpfs, standing for the PACS's own disk on another machine); 'none': beside "
                             "the spool on the same disk")
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/<timestamp>.json")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    images = args.images or (100 if args.quick else None)
    scenarios = [parse_scenario(s) for s in (args.scenarios or (QUICK if args.quick else FULL))]
    order = list(dict.fromkeys(s.key for s in scenarios))

    started = time.monotonic()
    studies = {}
    for name in sorted({s.corpus for s in scenarios}):
        study = corpus.load(name, args.corpus_dir)
        studies[name] = study.head(images) if images else study
    for name, study in studies.items():
        print(f"corpus {name}: {len(study.files)} images, {study.bytes / 1e6:.0f} MB ({study.description})",
              file=sys.stderr)
    global DEST_ROOT
    if args.dest_dir is not None and str(args.dest_dir) != "none":
        need = 2 * max(study.bytes for study in studies.values())  # one run's images, and room to spare
        if shutil.disk_usage(args.dest_dir).free > need:
            DEST_ROOT = Path(tempfile.mkdtemp(prefix="dicom-router-bench-dest-", dir=args.dest_dir))
        else:
            print(f"{args.dest_dir} has less than {need / 1e6:.0f} MB free: the destination writes beside the "
                  "spool instead", file=sys.stderr)

    runs: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="dicom-router-bench-"))
    try:
        for rep in range(repeat):
            for scenario in scenarios:
                try:
                    result = run_once(scenario, studies[scenario.corpus], root)
                except Exception as exc:  # noqa: BLE001 - keep the other scenarios' results
                    result = {"scenario": scenario.key, "ok": False, "error": f"harness: {exc}"}
                result["repetition"] = rep
                runs.append(result)
                status = (f"{result['instances_per_s']:.1f} inst/s, {result['seconds']:.2f} s, "
                          f"CPU {result['cpu_s']:.1f} s" if result.get("ok") else "FAILED: " + result["error"][:300])
                print(f"[{rep + 1}/{repeat}] {scenario.key}: {status}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if DEST_ROOT is not None:
            shutil.rmtree(DEST_ROOT, ignore_errors=True)
    limits = codec_limits(studies, scenarios, args.codec_seconds)

    print(f"\n## Results ({repeat} run(s) each, interleaved; median (min–max))\n")
    print(markdown(runs, order))
    stages = stage_markdown(runs, order)
    if stages:
        print("\n## Router CPU by stage, ms per instance (from dicom_router_cpu_seconds_total, scaled to the "
              "measured CPU), and the limit it implies on this machine (the modality and destination "
              "share these cores)\n")
        print(stages)
    print("\n## Codec-bound limit (single-core encode via transcode_file × cores)\n")
    print(codec_markdown(limits) if limits else "(no transcoding scenario selected)")
    print("\nScenarios:")
    for key in order:
        print(f"- {key}: {KINDS[parse_scenario(key).kind].what}")
    elapsed = time.monotonic() - started
    print(f"\n{len(runs)} runs in {elapsed:.0f} s")
    if not args.no_json:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS / f"{stamp}.json"
        path.write_text(json.dumps({
            "command": sys.argv, "versions": _versions(), "repeat": repeat,
            "corpus": {n: {"images": len(s.files), "bytes": s.bytes, "description": s.description}
                       for n, s in studies.items()},
            "summary": summarise(runs, order), "codec_limits": limits, "runs": runs, "seconds": elapsed,
        }, indent=2))
        print(f"JSON: {path}")
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
