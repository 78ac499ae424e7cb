"""Where the router's time goes per instance: py-spy on a running router, summarised.

    python bench/profile_router.py [--syntax original jpeg-ls-lossless] [--images 300] [--rate 100]

For each syntax: starts storescp and the router (as bench/run.py does), warms up, attaches
`py-spy record --idle --threads --subprocesses --format raw` to the router, sends the CT
study with storescu, waits until the destination has every image, and stops py-spy. py-spy
must be installed in the environment (`pip install py-spy`); the router is not modified.

Every sample is assigned to a thread role (the inbound association thread that runs the
C-STORE handler, the DUL threads that move PDUs, the forwarder, the codec workers) and to a
step by the functions on its stack. Samples whose innermost frame is a wait (sleep, select,
Condition.wait, a pool future) count as waiting, the rest as busy. Busy samples estimate CPU;
the script also reads the real CPU of each process from /proc to check the estimate.
Raw stacks (for speedscope or inferno) go to bench/results/profile-<stamp>-<syntax>.txt.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import corpus  # noqa: E402
import harness  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

# innermost frames that mean "not on the CPU" (pynetdicom's reactors sleep 1 ms between polls
# inside run_reactor/_run_reactor themselves)
WAIT_LEAVES = (
    "Condition.wait", "Event.wait", "select (", "_PollLikeSelector.select", "Queue.get",
    "DULServiceProvider.run_reactor (pynetdicom/dul.py", "Association._run_reactor (pynetdicom/association.py:714)",
    "Association.run_reactor", "Thread.join", "_wait_for_tstate_lock", "Connection._recv", "Connection.poll",
    "Future.result", "serve_forever", "sleep (", "_worker (concurrent/futures/thread.py", "wait (",
    "resource_tracker", "EpollSelector.select", "SemLock.__enter__",
    "Association.send_c_store (pynetdicom/association.py:1960)",  # sleep(0.0001) until the reactor pauses
    "SqliteQueue._Tx.__enter__",  # BEGIN IMMEDIATE: waiting for SQLite's write lock
    "_wait_dul (router/compat/pynetdicom.py",  # the quiet reactor's poll() on socket + wake fd
    "_poll_dul (router/compat/pynetdicom.py",
    "Router._listen_for_wakeups (router/operate/service.py",  # recv on the wake-up socket
)
# innermost frames that are the kernel making data durable (fsync, SQLite COMMIT's fsync, unlink)
IO_LEAVES = ("Spool.accept (", "_fsync_dir (", "SqliteQueue._Tx.__exit__ (", "Spool.remove (")
# (step, substrings any of which on the stack selects it), first match wins, per role
HANDLER_STEPS = [
    ("spool.accept: fsync file + rename + fsync dir", ("Spool.accept", "_fsync_dir")),
    ("queue.add: SQLite insert + COMMIT (synchronous=FULL)", ("SqliteQueue.add",)),
    ("header read: dcmread(stop_before_pixels)", ("dcmread", "filereader")),
    ("rules: decide", ("router/rules.py",)),
    ("logging (structlog)", ("structlog", "router/log.py")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("free-space check", ("has_room", "disk_usage")),
    ("notify: wake forwarder", ("_wake", "notify")),
]
INBOUND_STEPS = [
    ("C-STORE handler (intake)", ("Receiver._on_store", "Intake.accept")),
    ("pynetdicom: send C-STORE-RSP", ("send_c_store_rsp", "_c_store_scp", "send_msg", "encode_msg")),
    ("pynetdicom: message dispatch", ("_serve_request", "get_msg")),
]
FORWARDER_STEPS = [
    ("queue.claim", ("SqliteQueue.claim",)),
    ("waiting for codec workers", ("CodecPool.result", "Future.result")),
    ("prepare: request, transcode submitted", ("Forwarder._prepare",)),
    ("record delivered: queue.complete + spool.remove", ("Forwarder._delivered",)),
    ("record retry / dead", ("Forwarder.record",)),
    ("logging (structlog)", ("structlog", "router/log.py")),
    ("send_c_store: read file + DIMSE encode", ("send_c_store", "DimseSender._store")),
    ("associate / release", ("Association.open", "Association.release")),
    ("queue.next_due", ("SqliteQueue.next_due",)),
]
WORKER_STEPS = [
    ("verify: decode again + compare", ("encode.py\", line", "check")),
    ("encode (codec)", ("encode_frames", "_Transcoding.encode")),  # after check: encode's own frames minus verify
    ("decode input pixels", ("pixeldata.py", "_Transcoding.pixels")),
    ("write output: dcmwrite", ("write_file", "dcmwrite")),
    ("read input: dcmread", ("transcode_file",)),
    ("pool IPC / idle", ("multiprocessing", "concurrent/futures")),
]
DUL_STEPS = [
    ("socket recv + PDU decode", ("AssociationSocket.recv", "_read_pdu", "receive_pdu", "decode")),
    ("write received data to temp file", ("tempfile", "write")),
    ("socket send + PDU encode", ("AssociationSocket.send", "send_pdu", "encode")),
]


def _step(stack: str, steps: list[tuple[str, tuple[str, ...]]]) -> str:
    for name, needles in steps:
        if any(n in stack for n in needles):
            return name
    return "other"


def _state(leaf: str) -> str:
    if any(leaf.startswith(w) for w in IO_LEAVES):
        return "io"
    if any(leaf.startswith(w) or w in leaf for w in WAIT_LEAVES):
        return "wait"
    return "busy"


def parse(raw: Path, router_pid: int) -> dict:
    """samples[(role, step, state)]; state: busy, io (fsync/commit/unlink) or wait."""
    threads: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        # process P:"argv";[process C:"argv";]thread (0x..);frames...
        procs = [p for p in parts if p.startswith("process ")]
        proc = procs[-1].split(":")[0].split()[1] if procs else "?"
        thread = next((p for p in parts if p.startswith("thread (")), "thread (?)")
        frames = [p for p in parts if not p.startswith(("process ", "thread ("))]
        threads[(proc, thread)].append((";".join(frames), int(count)))
    samples: dict[tuple[str, str, str], int] = defaultdict(int)
    # which process a thread belongs to: the router itself (forwarders), a receiving process, or a
    # codec worker
    receivers = {proc for (proc, _), stacks in threads.items() if any("run_receiver_process" in s for s, _ in stacks)}
    for (proc, _thread), stacks in threads.items():
        joined = " ".join(s for s, _ in stacks)
        if proc in receivers:
            if "Receiver._on_store" in joined or "Intake.accept" in joined:
                role, steps = "receiver: inbound association thread (handler)", INBOUND_STEPS
            elif "DULServiceProvider" in joined:
                role, steps = "receiver: inbound DUL thread (PDU receive)", DUL_STEPS
            else:
                role, steps = "receiver: other threads (main, accept)", []
        elif proc not in ("?", str(router_pid)):
            role, steps = "codec worker processes", WORKER_STEPS
        elif "Forwarder._run" in joined:
            role, steps = "forwarder thread", FORWARDER_STEPS
        elif "DULServiceProvider" in joined:
            role, steps = "outbound DUL thread (PDU send)", DUL_STEPS
        elif "_run_reactor" in joined or "Association.run" in joined:
            role, steps = "outbound association reactor thread", []
        else:
            role, steps = "other threads (main, metrics, pool manager)", []
        for stack, count in stacks:
            leaf = stack.rsplit(";", 1)[-1]
            state = _state(leaf)
            step = _step(stack, steps)
            if "inbound association" in role and step == "C-STORE handler":
                step = "handler: " + _step(stack, HANDLER_STEPS)
            if role.startswith("codec worker") and step == "encode (codec)" and "encode.py\", line" in stack and "check" in stack:
                step = "verify: decode again + compare"
            if role.startswith("forwarder") and step == "waiting for codec workers (run_many)":
                state = "wait"
            samples[(role, step, state)] += count
    return samples


def report(samples: dict, rate: float, images: int, cpu: dict[str, float], wall: float) -> str:
    ms = lambda n: n / rate / images * 1000  # noqa: E731
    states = ("busy", "io", "wait")
    roles: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: dict.fromkeys(states, 0)))
    for (role, step, state), n in samples.items():
        roles[role][step][state] += n
    lines = [f"{images} images in {wall:.2f} s = {wall / images * 1000:.1f} ms per image (wall, under py-spy); "
             "measured CPU (/proc): " + ", ".join(f"{k} {v / images * 1000:.1f} ms/img" for k, v in cpu.items()),
             "", "| thread role / step | busy ms/img (≈CPU) | fsync/COMMIT/unlink ms/img | waiting ms/img | share of busy |",
             "|---|---|---|---|---|"]
    total_busy = sum(n for (_, _, st), n in samples.items() if st == "busy")
    for role in sorted(roles, key=lambda r: -sum(v["busy"] for v in roles[r].values())):
        steps = roles[role]
        tot = {st: sum(v[st] for v in steps.values()) for st in states}
        lines.append(f"| **{role}** | **{ms(tot['busy']):.2f}** | {ms(tot['io']):.2f} | {ms(tot['wait']):.2f} "
                     f"| {tot['busy'] / max(total_busy, 1):.0%} |")
        for step in sorted(steps, key=lambda s: -(steps[s]["busy"] + steps[s]["io"])):
            v = steps[step]
            if ms(v["busy"]) >= 0.05 or ms(v["io"]) >= 0.05:
                lines.append(f"| &nbsp;&nbsp;{step} | {ms(v['busy']):.2f} | {ms(v['io']):.2f} | {ms(v['wait']):.2f} "
                             f"| {v['busy'] / max(total_busy, 1):.0%} |")
    lines.append(f"| **total busy (py-spy estimate of CPU)** | **{ms(total_busy):.2f}** | | | |")
    return "\n".join(lines)


def worker_breakdown(src: Path, syntax: str, repeat: int = 30) -> str:
    """cProfile of transcode_file in this process: what one codec worker spends per image."""
    import cProfile
    import pstats

    from router.request import Request
    from router.codecs.transcode import transcode_file

    request = Request(syntax=syntax)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "out.dcm"
        transcode_file(src, dst, request)
        t0 = time.perf_counter()
        for _ in range(repeat):
            transcode_file(src, dst, request)
        plain = (time.perf_counter() - t0) / repeat
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(repeat):
            transcode_file(src, dst, request)
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    profiled_total = sum(v[2] for v in stats.values()) / repeat

    def cumulative(name: str, file_part: str = "") -> float:
        return sum(v[3] for (f, _, n), v in stats.items() if n == name and file_part in f) / repeat

    parts = [
        ("read input: pydicom.dcmread (whole file)", cumulative("dcmread", "pydicom")),
        ("decode input pixels (pixeldata.decode)", cumulative("decode", "router/codecs/pixeldata.py")),
        ("encode (encode_frames, less verify)", cumulative("encode_frames", "router/codecs/encode.py")
         - cumulative("check", "router/codecs/encode.py")),
        ("verify: decode + compare (encode.check)", cumulative("check", "router/codecs/encode.py")),
        ("label lossy output (label.lossy_bookkeeping)", cumulative("lossy_bookkeeping", "router/codecs/label.py")),
        ("encapsulate (write.set_encapsulated)", cumulative("set_encapsulated", "router/codecs/write.py")),
        ("write output (write.write_file)", cumulative("write_file", "router/codecs/write.py")),
    ]
    lines = [f"transcode_file({src.name}, {syntax}): {plain * 1000:.1f} ms per image unprofiled "
             f"({profiled_total * 1000:.1f} ms under cProfile; shares below are of the profiled time)", "",
             "| step | ms/img (cProfile) | share |", "|---|---|---|"]
    for name, seconds in parts:
        lines.append(f"| {name} | {seconds * 1000:.2f} | {seconds / profiled_total:.0%} |")
    return "\n".join(lines)


def profile(syntax: str, study: corpus.Study, rate: int, out_dir: Path, stamp: str, children: bool = False) -> str:
    work = Path(tempfile.mkdtemp(prefix="dicom-router-profile-"))
    servers = []
    spy = None
    try:
        scp = harness.start_storescp(work / "storescp", work / "dest")
        servers.append(scp)
        router = harness.start_router(work / "router", scp.port, harness.RouterRule(syntax))
        servers.append(router)
        harness.wait_procs([harness.storescu(study.warmup, router.port, work, tag="-warmup")], 120)
        while harness.count_files(work / "dest") < len(study.warmup):
            time.sleep(0.05)
        raw = out_dir / f"profile-{stamp}-{syntax}.txt"
        spy = subprocess.Popen(
            [PY_SPY, "record", "--pid", str(router.proc.pid), "--subprocesses",
             "--idle", "--threads", "--rate", str(rate), "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.5)  # py-spy attaches
        tree = router.tree()
        cpu0 = {pid: harness.cpu_seconds([pid]) for pid in tree}
        t0 = time.monotonic()
        harness.wait_procs([harness.storescu(study.files, router.port, work)], 600)
        target = len(study.warmup) + len(study.files)
        deadline = time.monotonic() + 600
        while harness.count_files(work / "dest") < target and time.monotonic() < deadline:
            time.sleep(0.02)
        wall = time.monotonic() - t0
        tree = router.tree()
        main_cpu = harness.cpu_seconds([router.proc.pid]) - cpu0.get(router.proc.pid, 0)
        other_cpu = sum(harness.cpu_seconds([p]) - cpu0.get(p, 0) for p in tree if p != router.proc.pid)
        os.kill(spy.pid, signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(spy.pid, signal.SIGKILL)
            spy.wait(10)
        if not raw.exists():
            return f"py-spy wrote nothing: {spy.stderr.read().decode(errors='replace')[-500:]}"
        samples = parse(raw, router.proc.pid)
        if not children:
            samples = {k: v for k, v in samples.items() if not k[0].startswith("codec worker")}
        cpu = {"router process": main_cpu, "children (receivers, codec workers)": other_cpu}
        return (f"### {syntax}: {len(study.files)} CT slices, py-spy {rate} Hz (raw stacks: {raw})\n\n"
                + report(samples, rate, len(study.files), cpu, wall))
    finally:
        if spy is not None and spy.poll() is None:
            os.kill(spy.pid, signal.SIGKILL)
            spy.wait(10)
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syntax", nargs="+", default=["original", "jpeg-ls-lossless"])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--children", action="store_true",
                        help="also report the codec workers' py-spy samples; by default the workers' share "
                             "comes from cProfile of transcode_file in-process")
    args = parser.parse_args()
    study = corpus.load("ct").head(args.images)
    out_dir = harness.BENCH / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for syntax in args.syntax:
        print(profile(syntax, study, args.rate, out_dir, stamp, args.children))
        print()
        if syntax != "original":
            print(worker_breakdown(study.files[0], syntax))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
