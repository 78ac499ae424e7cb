"""The status page is served in the process that forwards, next to /healthz, /readyz and
/metrics: however many clients loop on `/` and `/trace`, the probes answer at once and
forwarding keeps its pace (`metrics.serve_http`, `web.StatusPage`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pydicom

from router import metrics
from tests.support.peers import (
    Destination,
    data,
    free_port,
    make_series,
    metric_value,
    send,
    wait_until,
)

PROBE_LIMIT_S = 2.0  # a load balancer's health check waits about this long


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Probes:
    """/readyz and /metrics asked in turn every 0.2 s, as HAProxy and Prometheus would; each
    answer's status (or the error) and how long it took."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.answers: list[tuple[str, object, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        paths = ("/readyz", "/metrics")
        turn = 0
        while not self._stop.wait(0.2):
            path = paths[turn % 2]
            turn += 1
            started = time.monotonic()
            try:
                status: object = get(self.base + path, timeout=PROBE_LIMIT_S * 5)[0]
            except OSError as exc:
                status = repr(exc)
            self.answers.append((path, status, time.monotonic() - started))

    def __enter__(self) -> Probes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def failed(self) -> list[tuple[str, object, float]]:
        return [a for a in self.answers if a[1] != 200 or a[2] > PROBE_LIMIT_S]


HAMMER = textwrap.dedent("""
    import sys, threading, urllib.request, urllib.error
    base, uid, clients = sys.argv[1], sys.argv[2], int(sys.argv[3])
    answered = [0]
    def loop(index):
        url = base + ("/" if index % 2 else "/trace?uid=" + uid)
        while True:
            try:
                with urllib.request.urlopen(url, timeout=30) as rsp:
                    rsp.read()
                    if rsp.status == 200:
                        answered[0] += 1
            except (OSError, urllib.error.HTTPError):
                pass
    for index in range(clients):
        threading.Thread(target=loop, args=(index,), daemon=True).start()
    sys.stdin.read()  # until the test closes our stdin
    print(answered[0], flush=True)
""")


class Hammer:
    """`clients` clients in `processes` processes of their own, each looping on `/` or
    `/trace?uid=...` as fast as the answers come."""

    def __init__(self, port: int, uid: str, clients: int = 32, processes: int = 4) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", HAMMER, f"http://127.0.0.1:{port}", uid,
                                        str(clients // processes)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for _ in range(processes)]
        self.page_answers = 0

    def __enter__(self) -> Hammer:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            out, _ = proc.communicate("", timeout=60)
            self.page_answers += int(out.strip() or 0)


def forward(router, pacs, files, already: int) -> float:
    started = time.monotonic()
    assert send(router.port, files) == [0] * len(files)
    wait_until(lambda: pacs.count() >= already + len(files), 300, interval=0.1,
               what=f"{len(files)} instances at the PACS")
    return time.monotonic() - started


HELD = [f"HELD{i:02d}" for i in range(10)]  # destinations holding a backlog: 10 pending jobs per instance
BACKLOG = 500


def test_probes_answer_and_forwarding_keeps_its_pace_while_32_clients_loop_on_the_status_page(
        pacs, router_factory, tmp_path):
    """A queue with a backlog (5,000 jobs held for two weeks), one destination forwarding, and
    32 clients looping on `/` and `/trace`."""
    router = router_factory(
        [Destination("PACS", pacs.port, '[[rule]]\nmatch = { CallingAE = "BACKLOG" }\nsyntax = "skip"\n'
                                        '[[rule]]\nsyntax = "original"\n')]
        + [Destination(name, free_port(), '[[rule]]\nmatch = { CallingAE = "BACKLOG" }\nsyntax = "original"\n',
                       ae_title=name, extra='delay = "14d"\n') for name in HELD])
    backlog = make_series(data("SC_rgb.dcm"), BACKLOG, tmp_path / "backlog")
    senders = [threading.Thread(target=send, args=(router.port, backlog[i::2], "BACKLOG")) for i in range(2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(300)
    wait_until(lambda: metric_value(router.metrics(), "dicom_router_queue_jobs", state="pending") == BACKLOG * 10, 60,
               what="the backlog queued")
    quiet = make_series(data("SC_rgb.dcm"), 300, tmp_path / "quiet")
    busy = make_series(data("SC_rgb.dcm"), 300, tmp_path / "busy")
    study = str(pydicom.dcmread(quiet[0], stop_before_pixels=True).StudyInstanceUID)

    alone = forward(router, pacs, quiet, 0)
    with Probes(router.metrics_port) as probes, Hammer(router.metrics_port, study) as hammer:
        time.sleep(2)  # every client looping before the images come
        hammered = forward(router, pacs, busy, len(quiet))
        time.sleep(1)
    print(f"forwarding: {alone:.1f}s alone, {hammered:.1f}s hammered; {hammer.page_answers} page answers; "
          f"slowest probe {max(a[2] for a in probes.answers):.2f}s")
    assert len(probes.answers) >= 10
    assert probes.failed() == [], f"{len(probes.failed())} of {len(probes.answers)} probes late or refused"
    assert hammer.page_answers > 0, "the status page still answers"
    # generous: the same work once more, with room for a shared machine; without a bound it was 20 times slower
    assert hammered < 2 * alone + 10, f"{hammered:.1f}s with the page hammered, {alone:.1f}s without"
    assert metric_value(router.metrics(), "dicom_router_forwarded_instances_total", destination="PACS") == 600
    # once the clients have gone (their requests still waiting for a turn are let go), the page answers
    wait_until(lambda: get(f"http://127.0.0.1:{router.metrics_port}/")[0] == 200, 30, interval=0.5,
               what="the status page once the clients stopped")
    status, page = get(f"http://127.0.0.1:{router.metrics_port}/")
    assert status == 200 and b'id="dest-PACS"' in page


# -- the endpoint alone, in this process ----------------------------------------------------------------
def test_a_slow_page_takes_neither_the_probes_slots_nor_more_than_its_threads(tmp_path):
    """A page that takes half a second to build, 30 clients looping on it, 8 connection slots:
    every probe is answered at once, and the page is never built by more than its own threads."""
    lock = threading.Lock()
    building = [0, 0]  # now, at most

    def slow_page(path: str, query: str) -> tuple[bytes, str, int]:
        with lock:
            building[0] += 1
            building[1] = max(building[1], building[0])
        time.sleep(0.5)
        with lock:
            building[0] -= 1
        return b"page", "text/plain", 200

    port = free_port()
    server = metrics.serve_http("127.0.0.1", port, lambda: (True, "ready"), max_connections=8, idle_timeout_s=5,
                                pages=slow_page, page_connections=4)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                get(f"http://127.0.0.1:{port}/", timeout=10)
            except OSError:
                pass

    clients = [threading.Thread(target=client, daemon=True) for _ in range(30)]
    try:
        for thread in clients:
            thread.start()
        time.sleep(1)
        answers = []
        for path in ("/healthz", "/readyz", "/metrics") * 7:
            started = time.monotonic()
            try:
                status: object = get(f"http://127.0.0.1:{port}{path}", timeout=10)[0]
            except OSError as exc:
                status = repr(exc)
            answers.append((path, status, round(time.monotonic() - started, 2)))
        late = [a for a in answers if a[1] != 200 or a[2] > PROBE_LIMIT_S]
        assert late == [], late
        assert building[1] <= metrics.PAGE_THREADS, f"{building[1]} pages built at once"
    finally:
        stop.set()
        for thread in clients:
            thread.join(15)
        server.shutdown()
        server.server_close()
