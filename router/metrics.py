"""Prometheus metrics and the HTTP endpoint that serves them with /healthz and /readyz.

Labels are few and of low cardinality: destination, syntax, outcome, reason, caller (AE title).
Never UIDs or patient data. Every label value comes from the configuration or from a fixed list,
except `caller`, which the network chooses: it is bounded by `caller_label` (the configured
callers, at most `max_caller_labels` others, the rest as "other").
"""

from __future__ import annotations

import fcntl
import glob
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router import __version__, log
from router.request import FALLBACK_REASONS, HELD_REASONS, REJECTION_REASONS, Outcome

RECEIVED_INSTANCES = Counter(
    "dicom_router_received_instances", "Instances received and made durable (C-STORE success sent)", ["caller"]
)
RECEIVED_BYTES = Counter("dicom_router_received_bytes", "Bytes of instances received and made durable", ["caller"])
REJECTED = Counter(
    "dicom_router_rejected",
    "C-STORE requests or associations refused (reason: disk_full, not_allowed, malformed, too_large, busy, "
    "timeout, error)",
    ["reason"],
)
ASSOCIATIONS = Counter("dicom_router_associations", "Inbound associations accepted", ["caller"])
FORWARDED_INSTANCES = Counter(
    "dicom_router_forwarded_instances", "Instances stored at a destination", ["destination", "syntax"]
)
FORWARDED_BYTES = Counter(
    "dicom_router_forwarded_bytes", "Bytes of the files sent to a destination", ["destination", "syntax"]
)
FORWARDED_BYTES_AS_RECEIVED = Counter(
    "dicom_router_forwarded_bytes_as_received",
    "Bytes of the instances stored at a destination, as they were received (compare with "
    "dicom_router_forwarded_bytes, as sent: what compression saved on the link)", ["destination"]
)
FORWARD_FAILURES = Counter(
    "dicom_router_forward_failures", "Failed sends (outcome: retry, dead)", ["destination", "outcome"]
)
FALLBACKS = Counter(
    "dicom_router_fallbacks",
    "Instances not sent in the rule's syntax (reason: refused_by_destination, codec_cannot_carry, "
    "verify_mismatch, codec_error, codec_crash, codec_timeout)",
    ["destination", "reason"],
)
PURGED = Counter(
    "dicom_router_purged", "Dead letters dropped on purpose (dicom-router queue purge --dead --yes)", ["destination"]
)
SKIPPED = Counter("dicom_router_skipped", "Instances a destination's rules chose not to forward", ["destination"])
TRANSCODE_SECONDS = Histogram(
    "dicom_router_transcode_seconds",
    "Time to encode (and verify) one instance",
    ["syntax"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FORWARD_SECONDS = Histogram(
    "dicom_router_forward_seconds",
    "Time for one C-STORE to a destination, request to response (STOW-RS: a request's time shared by its "
    "instances)",
    ["destination"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
HEADER_CHANGES = Counter(
    "dicom_router_header_changes",
    "Attributes changed by a destination's header rules, by rule and action (set, template, map, remove, "
    "deidentify)",
    ["destination", "rule", "action"],
)
HEADER_REFUSAL_REASONS = ("unmapped", "header_rule", "burned_in_annotation")
HEADER_REFUSALS = Counter(
    "dicom_router_header_refusals",
    "Instances kept from a destination because its header rules could not be applied (reason: unmapped, "
    "header_rule, burned_in_annotation)",
    ["destination", "reason"],
)
AUDIT_RECORDS = Counter("dicom_router_audit_records", "Audit messages written to the audit spool")
AUDIT_DROPPED = Counter("dicom_router_audit_dropped",
                        "Audit messages lost: the audit spool was full ([audit] max_spool_mb), or the record "
                        "could not be written")
AUDIT_SENT = Counter("dicom_router_audit_sent", "Audit messages sent to the audit record repository (again after "
                                                "an outage: counted again)")
AUDIT_SEND_FAILURES = Counter("dicom_router_audit_send_failures",
                              "Times the audit record repository could not be reached or dropped the connection")
STOW_REQUESTS = Counter(
    "dicom_router_stow_requests",
    "STOW-RS requests to a DICOMweb destination, by HTTP status class (2xx..5xx; error: no answer)",
    ["destination", "status"],
)
STOW_REQUEST_SECONDS = Histogram(
    "dicom_router_stow_request_seconds",
    "Time for one STOW-RS request, body sent to response read, by HTTP status class",
    ["destination", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
STOW_REQUEST_INSTANCES = Histogram(
    "dicom_router_stow_request_instances",
    "Instances in one STOW-RS request",
    ["destination"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
STOW_REQUEST_BYTES = Counter(
    "dicom_router_stow_request_bytes", "Bytes of the STOW-RS request bodies sent to a destination", ["destination"]
)
CODEC_POOL_RESTARTS = Counter(
    "dicom_router_codec_pool_restarts",
    "Codec worker pools killed and replaced (reason: crash (a worker died), timeout (a transcode past its "
    "deadline), stall (no worker started a task within its deadline))",
    ["reason"],
)
CPU_STAGES = ("receive", "spool", "decode", "encode", "verify", "write", "send")
CPU_SECONDS = Counter(
    "dicom_router_cpu_seconds",
    "CPU time by stage: receive (inbound DICOM network), spool (header check, rules, fsync, queue "
    "commit), decode / encode / verify / write (codec workers), send (forwarding process)",
    ["stage"],
)
END_TO_END_SECONDS = Histogram(
    "dicom_router_end_to_end_seconds",
    "Time from receipt to the destination's success status",
    ["destination"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
)

COMMITMENT_REQUESTS = Counter(
    "dicom_router_commitment_requests",
    "Storage commitment requests (result: new, repeated (the same request again while pending), duplicate (a "
    "transaction UID in use for other instances), refused)",
    ["result"],
)
COMMITMENT_REPORTS = Counter(
    "dicom_router_commitment_reports",
    "Storage commitment reports delivered (outcome: committed, failures; association: same, new)",
    ["outcome", "association"],
)
COMMITMENT_INSTANCES = Counter(
    "dicom_router_commitment_instances", "Instances in the storage commitment reports delivered (result: committed, "
    "failed)", ["result"],
)
COMMITMENT_REPORT_FAILURES = Counter(
    "dicom_router_commitment_report_failures", "Storage commitment reports that could not be delivered (retried)",
)
COMMITMENT_RELAYED_INSTANCES = Counter(
    "dicom_router_commitment_relayed_instances",
    "Instances a destination's storage commitment SCP answered for ([commitment] mode = \"relay\"; result: "
    "committed, failed (in its report, or its N-ACTION refused for good))", ["destination", "result"],
)
RELAY_REPORT_REFUSED_REASONS = ("ae_title", "address", "unknown_destination", "malformed")
COMMITMENT_RELAY_REPORTS_REFUSED = Counter(
    "dicom_router_commitment_relay_reports_refused",
    "Storage commitment reports refused in [commitment] mode = \"relay\" (reason: ae_title or address (not "
    "from the storage commitment SCP of the destination asked), unknown_destination (that destination has no "
    "storage commitment SCP in the rule files in force), malformed)",
    ["reason"],
)
DUPLICATE_SENDS = Counter(
    "dicom_router_duplicate_sends",
    "Jobs sent again after this node took them over from a node whose lease had expired (that node may have sent "
    "them already: at most this many duplicates reached the destination)",
    ["destination"],
)


OTHER_CALLER = "other"  # the `caller` of every calling AE title past the bound


class CallerLabels:
    """The `caller` label value of a calling AE title: its own for a configured caller
    (`known`) and for the first `limit` other titles seen since the router started, "other"
    for the rest, so that no caller can add series at will.

    With several receiving processes (PROMETHEUS_MULTIPROC_DIR set) the other titles are
    admitted through one file there, so the bound holds for the router, not per process.
    """

    def __init__(self, known: frozenset[str] = frozenset(), limit: int = 20, directory: str | None = None) -> None:
        self.known = frozenset(title.strip() for title in known)
        self.limit = limit
        self._file = os.path.join(directory, "callers") if directory else None
        self._lock = threading.Lock()
        self._named: set[str] = set()
        self._full = False

    def __call__(self, ae_title: str) -> str:
        title = ae_title.strip()
        if title in self.known:
            return title
        with self._lock:
            if title in self._named:
                return title
            if self._full or not self._admit(title):
                self._full = True  # titles are never given back until the next start: "other" stays "other"
                return OTHER_CALLER
            self._named.add(title)
            return title

    def _admit(self, title: str) -> bool:
        if self._file is None:
            return len(self._named) < self.limit
        entry = title.encode().hex()  # one line per title, whatever bytes the title holds
        try:
            with open(self._file, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.seek(0)
                admitted = set(f.read().split())
                # every title the file holds keeps its name here too, now that it is full or later
                self._named.update(bytes.fromhex(e).decode(errors="replace") for e in admitted if e != entry)
                if entry in admitted:
                    return True
                if len(admitted) >= self.limit:
                    return False
                f.write(entry + "\n")
                return True
        except (OSError, ValueError):
            return False  # cannot agree with the other processes: count it, without a name


_caller_labels = CallerLabels(directory=os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def bound_callers(known: frozenset[str], limit: int) -> None:
    """Set the callers that keep their name in `caller` (allowed callers, commitment
    modalities) and how many others may; called once by each receiving process."""
    global _caller_labels
    _caller_labels = CallerLabels(known, limit, os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def caller_label(ae_title: str) -> str:
    """The value of the `caller` label for a calling AE title (see `CallerLabels`)."""
    return _caller_labels(ae_title)


class StateCollector(Collector):
    """Gauges read at scrape time from the queue and the spool, so they are never stale."""

    def __init__(
        self,
        queue_counts: Callable[[], dict[tuple[str, str], int]],
        oldest_pending: Callable[[], dict[str, float]],
        spool_free_bytes: Callable[[], int],
        destinations: Callable[[], list[str]],
        paused: Callable[[], dict[str, float]] = dict,
        held: Callable[[], dict[tuple[str, str], int]] = dict,
        nodes: Callable[[], list] = list,
        commitments: Callable[[], dict[str, int]] = dict,
        relays: Callable[[], dict[tuple[str, str], int]] = dict,
        node: str = "",
    ) -> None:
        self._nodes = nodes  # the cluster's nodes (router.queue.Node); none with the embedded queue
        self._node = node  # this node's name: the one node of an embedded queue
        self._queue_counts = queue_counts
        self._oldest_pending = oldest_pending
        self._spool_free_bytes = spool_free_bytes
        self._destinations = destinations
        self._paused = paused
        self._held = held
        self._commitments = commitments  # storage commitment requests not reported, by state
        self._relays = relays  # relay requests not answered, by (destination, state)

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        names = self._destinations()
        try:
            counts = self._queue_counts()
        except Exception:  # noqa: BLE001 - the queue database is unreachable: say so, and what else is known
            yield GaugeMetricFamily("dicom_router_queue_up", "1 when the queue database answers, else 0", value=0)
            yield GaugeMetricFamily(
                "dicom_router_spool_free_bytes", "Free bytes on the spool's filesystem", value=self._spool_free_bytes())
            return
        yield GaugeMetricFamily("dicom_router_queue_up", "1 when the queue database answers, else 0", value=1)
        nodes = self._nodes()  # none with the embedded queue: this node alone, answering now
        age = GaugeMetricFamily(
            "dicom_router_node_heartbeat_age_seconds",
            "Seconds since each node of the cluster last renewed its leases (by the database's clock); 0 for a "
            "router alone on its queue",
            labels=["node"])
        leases = GaugeMetricFamily(
            "dicom_router_leases_held", "Jobs each node of the cluster holds in flight under a live lease (a "
            "router alone on its queue: its jobs in flight)",
            labels=["node"])
        for node in nodes:
            age.add_metric([node.name], node.heartbeat_age_s)
            leases.add_metric([node.name], node.jobs_held)
        if not nodes:
            age.add_metric([self._node], 0.0)
            leases.add_metric([self._node], sum(n for (_, state), n in counts.items() if state == "in_flight"))
        yield age
        yield leases
        yield _by_destination("dicom_router_queue_jobs", "Jobs in the queue by destination and state",
                              "state", ("pending", "in_flight", "dead"), names, counts)
        oldest = GaugeMetricFamily(
            "dicom_router_oldest_pending_seconds",
            "Age of the oldest job not yet delivered, by destination (0 when none)",
            labels=["destination"],
        )
        ages = self._oldest_pending()
        for name in sorted(set(names) | set(ages)):
            oldest.add_metric([name], ages.get(name, 0.0))
        yield oldest
        held = self._paused()
        paused = GaugeMetricFamily(
            "dicom_router_destination_paused",
            "1 while a destination is on hold (dicom-router pause), else 0", labels=["destination"],
        )
        for name in sorted(set(names) | set(held)):
            paused.add_metric([name], 1 if name in held else 0)
        yield paused
        waiting = self._held()
        yield _by_destination(
            "dicom_router_held_jobs",
            "Pending jobs a destination holds back, by reason: window (outside every window of its schedule), "
            "delay, study_stable (a study still receiving), throttled (due, going out at max_mbps)",
            "reason", [reason.value for reason in HELD_REASONS], names, waiting)
        commitments = self._commitments()
        pending = GaugeMetricFamily(
            "dicom_router_commitment_pending_requests",
            "Storage commitment requests from modalities not reported yet, by state: waiting (undecided, or "
            "decided and about to be sent), retrying (a report could not be delivered)", labels=["state"],
        )
        for state in ("waiting", "retrying"):
            pending.add_metric([state], commitments.get(state, 0))
        yield pending
        relays = self._relays()
        yield _by_destination(  # 0 in every mode: relay or not
            "dicom_router_commitment_relay_requests",
            "Storage commitment requests to destinations not answered yet ([commitment] mode = \"relay\"), by "
            "state: sending (the destination has not taken the N-ACTION yet), awaiting_report",
            "state", ("sending", "awaiting_report"), names, relays)
        yield GaugeMetricFamily(
            "dicom_router_spool_free_bytes", "Free bytes on the spool's filesystem", value=self._spool_free_bytes()
        )
        build = GaugeMetricFamily("dicom_router_build_info", "Version of the running router", labels=["version"])
        build.add_metric([__version__], 1)
        yield build


def _by_destination(metric: str, documentation: str, label: str, values: Iterable[str], names: Iterable[str],
                    counts: dict[tuple[str, str], int]) -> GaugeMetricFamily:
    """A gauge by destination and `label`: every configured destination and every value, 0 where none."""
    family = GaugeMetricFamily(metric, documentation, labels=["destination", label])
    for name in sorted(set(names) | {d for d, _ in counts}):
        for value in values:
            family.add_metric([name, value], counts.get((name, value), 0))
    return family


_collector: StateCollector | None = None


def _registry() -> CollectorRegistry:
    """What /metrics shows: with several receiving processes, their counters summed from the
    files each process writes under PROMETHEUS_MULTIPROC_DIR, plus the state gauges."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    registry.register(_AllProcesses())
    if _collector is not None:
        registry.register(_collector)
    return registry


class _AllProcesses(Collector):
    """The counters and histograms of every process, and the ones no process has touched yet
    (with no samples), so that a fresh router already shows every metric it has."""

    _DECLARED = {
        m._name: m for m in (
            RECEIVED_INSTANCES, RECEIVED_BYTES, REJECTED, ASSOCIATIONS, FORWARDED_INSTANCES, FORWARDED_BYTES,
            FORWARDED_BYTES_AS_RECEIVED,
            FORWARD_FAILURES, FALLBACKS, SKIPPED, PURGED, TRANSCODE_SECONDS, FORWARD_SECONDS, END_TO_END_SECONDS,
            COMMITMENT_REQUESTS, COMMITMENT_REPORTS, COMMITMENT_INSTANCES, COMMITMENT_REPORT_FAILURES,
            COMMITMENT_RELAYED_INSTANCES, COMMITMENT_RELAY_REPORTS_REFUSED, DUPLICATE_SENDS, CODEC_POOL_RESTARTS,
            STOW_REQUESTS, STOW_REQUEST_SECONDS, STOW_REQUEST_INSTANCES, STOW_REQUEST_BYTES, HEADER_CHANGES,
            HEADER_REFUSALS, AUDIT_RECORDS, AUDIT_DROPPED, AUDIT_SENT, AUDIT_SEND_FAILURES,
        )
    }

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        seen = set()
        for family in _merged_process_files(os.environ["PROMETHEUS_MULTIPROC_DIR"]):
            seen.add(family.name)
            yield family
        for name, metric in self._DECLARED.items():
            if name not in seen:
                yield from metric.describe()


_unreadable: set[str] = set()  # metric files already logged as unreadable


def _merged_process_files(directory: str) -> list:
    """Every process's counters, summed. A process creates its file at its first sample of a
    kind, empty for an instant before it is sized (and for ever if it was killed in that
    instant), and files can go between listing and reading: such a file holds nothing yet, and
    is left out of this scrape rather than failing it (prometheus/client_python#1199). One that
    cannot be read for another reason is left out too, logged once."""
    files = glob.glob(os.path.join(directory, "*.db"))
    try:
        return MultiProcessCollector.merge(files, accumulate=True)
    except Exception:  # noqa: BLE001 - find the files that cannot be read, merge the rest
        pass
    readable = []
    for path in files:
        try:
            MultiProcessCollector.merge([path], accumulate=True)
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file must not hide every process's counters
            if os.path.exists(path) and os.path.getsize(path) > 0 and path not in _unreadable:
                _unreadable.add(path)
                log.get("metrics").warning("metrics_file_unreadable", file=path, error=str(exc))
            continue
        readable.append(path)
    return MultiProcessCollector.merge(readable, accumulate=True)


def install_state_collector(collector: StateCollector) -> None:
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    REGISTRY.register(collector)
    _collector = collector


# /metrics, /healthz and /readyz are answered at once; anything else is the status page's, in its own budget
PAGE_THREADS = 2  # status page answers (/, /trace) at once
PAGE_ANSWERS_PER_S = 10  # at most this many page answers start per second
PAGE_SHARE = 0.03  # after each page answer, a pause: the page takes about this share of one core at most
PAGE_REFUSED_AFTER_S = 1.0  # a page request past page_connections hears 503 this much later, not at once
PAGE_REFUSED_HELD = 256  # ... that many at most; more are closed at once


class _PageTurns:
    """When the status page may answer: at most `threads` answers at once, at most `per_s`
    starting each second, and after each a pause that keeps the page's CPU near `share` of a
    core, however many clients ask and however often. A request waits for its turn, costing
    nothing meanwhile, up to `wait_s`."""

    def __init__(self, threads: int, per_s: float, share: float, wait_s: float) -> None:
        self._threads = threading.BoundedSemaphore(threads)
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time before which no page answer starts
        self._gap = 1.0 / per_s
        self._rest = (1.0 - share) / share
        self.wait_s = wait_s

    def take(self) -> bool:
        """Wait for a turn; False when none came within `wait_s`. A True must be followed by `done`."""
        deadline = time.monotonic() + self.wait_s
        if not self._threads.acquire(timeout=self.wait_s):
            return False
        with self._lock:
            start = max(time.monotonic(), self._next)
            if start > deadline:
                self._threads.release()
                return False
            self._next = start + self._gap
        time.sleep(max(0.0, start - time.monotonic()))
        return True

    def done(self, cpu_s: float) -> None:
        with self._lock:
            self._next = max(self._next, time.monotonic() + cpu_s * self._rest)
        self._threads.release()


class _Handler(BaseHTTPRequestHandler):
    ready: Callable[[], tuple[bool, str]] = staticmethod(lambda: (True, "ok"))  # type: ignore[assignment]
    pages: Callable[[str, str], tuple[bytes, str, int] | None] = staticmethod(lambda path, query: None)  # type: ignore[assignment]

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        server: _BoundedHTTPServer = self.server  # type: ignore[assignment]
        server.request_arrived(self.request)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path == "/healthz":
            self._answer(b"ok\n", "text/plain; charset=utf-8", 200)
        elif path == "/readyz":
            ok, why = type(self).ready()
            self._answer((why + "\n").encode(), "text/plain; charset=utf-8", 200 if ok else 503)
        elif server.page_request(self.request):
            self._page(server, path)

    def _metrics(self) -> None:
        """The scrape; if it cannot be made, a 500 that says why (never a connection closed
        without an answer, which a scraper or a load balancer cannot tell from a dead node)."""
        try:
            body = generate_latest(_registry())
        except Exception as exc:  # noqa: BLE001 - answer, and say why
            log.get("metrics").error("metrics_scrape_failed", error=f"{type(exc).__name__}: {exc}")
            self._answer(f"metrics could not be collected: {type(exc).__name__}\n".encode(),
                         "text/plain; charset=utf-8", 500)
            return
        self._answer(body, CONTENT_TYPE_LATEST, 200)

    def _page(self, server: _BoundedHTTPServer, path: str) -> None:
        """The status page, or the 404, in the page's own budget and at its own pace."""
        if not server.page_turns.take():
            self._answer(b"busy: the status page answers a few requests per second; try again\n",
                         "text/plain; charset=utf-8", 503)
            return
        cpu = time.thread_time()
        try:
            page = type(self).pages(path, self.path.partition("?")[2])
            if page is None:
                page = b"not found: try /, /metrics, /healthz or /readyz\n", "text/plain", 404
            self._answer(*page)
        finally:
            server.page_turns.done(time.thread_time() - cpu)

    def _answer(self, body: bytes, ctype: str, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server API
        pass


_REFUSED_BODY = b"busy: too many status page requests at once; try again\n"
_REFUSED_PAGE = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(_REFUSED_BODY), _REFUSED_BODY))


class _BoundedHTTPServer(ThreadingHTTPServer):
    """At most `max_connections` connections at once (one more is closed as soon as it is
    accepted), and each must deliver its request within `idle_timeout` of connecting: idle or
    trickling clients cannot pile up threads and file descriptors in the router.

    A request for the status page (anything but /metrics, /healthz and /readyz) leaves that
    budget as soon as it has arrived, for the page's own: at most `page_connections` held at
    once, answered in `_PageTurns`; one more is answered 503 a second later (so that a client
    looping on the page costs next to nothing), so page clients never take the probes' slots.
    """

    daemon_threads = True
    # The kernel's queue of connections not yet accepted. socketserver's default of 5 overflows
    # when a few dozen clients loop on the page: the kernel then drops a probe's SYN and the
    # client only tries again a second or more later. Accepted at once, a connection past the
    # budget is closed (or answered 503) by the rules below instead.
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 - socketserver API
        """A client that hung up before its answer (a load balancer's health check, a scraper
        that timed out) is nothing to log; anything else keeps the usual report."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], handler: type[_Handler], max_connections: int,
                 idle_timeout: float, page_connections: int = 16) -> None:
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.page_connections = page_connections
        self.page_turns = _PageTurns(PAGE_THREADS, PAGE_ANSWERS_PER_S, PAGE_SHARE, wait_s=idle_timeout)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connection -> when its request must have arrived
        self._open = 0
        self._pages: set[socket.socket] = set()  # connections in the page's budget
        self._refused: dict[socket.socket, float] = {}  # page requests past its budget -> when to answer 503

    def process_request(self, request, client_address) -> None:  # noqa: ANN001 - socketserver API
        with self._lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
                self._waiting[request] = time.monotonic() + self.idle_timeout
        if full:
            super().shutdown_request(request)
            return
        super().process_request(request, client_address)

    def request_arrived(self, request: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(request, None)

    def page_request(self, request: socket.socket) -> bool:
        """Move a connection whose request is for the page into the page's budget; False when
        that is full (the connection is then answered 503 later, by the accept loop)."""
        with self._lock:
            if len(self._pages) < self.page_connections:
                self._open -= 1
                self._pages.add(request)
                return True
            if len(self._refused) < PAGE_REFUSED_HELD:
                self._open -= 1
                self._refused[request] = time.monotonic() + PAGE_REFUSED_AFTER_S
            return False  # else closed at once, in the endpoint's budget until then

    def shutdown_request(self, request) -> None:  # noqa: ANN001 - socketserver API
        with self._lock:
            self._waiting.pop(request, None)
            if request in self._refused:
                return  # answered and closed by service_actions
            if request in self._pages:
                self._pages.discard(request)
            else:
                self._open -= 1
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Between two turns of the accept loop: close the connections whose request is late
        (a socket timeout alone lets a client that sends a byte now and then stay forever), and
        answer the page requests refused a second ago."""
        now = time.monotonic()
        with self._lock:
            late = [request for request, deadline in self._waiting.items() if deadline < now]
            for request in late:
                del self._waiting[request]
            due = [request for request, when in self._refused.items() if when <= now]
            for request in due:
                del self._refused[request]
        for request in late:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for request in due:
            try:
                request.setblocking(False)
                request.send(_REFUSED_PAGE)
            except OSError:
                pass
            super().shutdown_request(request)

    def server_close(self) -> None:
        with self._lock:
            refused, self._refused = list(self._refused), {}
        for request in refused:
            super().shutdown_request(request)
        super().server_close()


def serve_http(host: str, port: int, ready: Callable[[], tuple[bool, str]], max_connections: int = 32,
               idle_timeout_s: float = 10.0,
               pages: Callable[[str, str], tuple[bytes, str, int] | None] | None = None,
               page_connections: int = 16) -> ThreadingHTTPServer:
    """Start /metrics, /healthz and /readyz, and the status page `pages` renders, on a daemon
    thread; returns the server (call shutdown()).

    At most `max_connections` are served at once; a connection beyond them is closed as soon as
    it is accepted. A connection whose request has not fully arrived `idle_timeout_s` after it
    opened is closed, and so is one idle that long while its answer is sent. Requests for the
    page count in `page_connections` instead once they have arrived, and are answered at the
    page's own pace (`_PageTurns`), so that /metrics, /healthz and /readyz answer at once
    whatever the page's clients do.
    """
    handler = type("MetricsHandler", (_Handler,), {"ready": staticmethod(ready), "timeout": idle_timeout_s,
                                                    "pages": staticmethod(pages or (lambda path, query: None))})
    server = _BoundedHTTPServer((host, port), handler, max_connections, idle_timeout_s, page_connections)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def forwarded_by_destination() -> dict[str, float]:
    """Instances stored at each destination since this process started (any syntax)."""
    totals: dict[str, float] = {}
    for family in FORWARDED_INSTANCES.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                name = sample.labels["destination"]
                totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def declare(destinations: list[str]) -> None:
    """Export every known label value at zero from the start, so that rate() and alerts see a
    series before its first event (and so that a fresh router shows every metric it has)."""
    for reason in REJECTION_REASONS:
        REJECTED.labels(reason=reason.value)
    for stage in CPU_STAGES:
        CPU_SECONDS.labels(stage=stage)
    for reason in ("crash", "timeout", "stall"):
        CODEC_POOL_RESTARTS.labels(reason=reason)
    for result in ("new", "repeated", "duplicate", "refused"):
        COMMITMENT_REQUESTS.labels(result=result)
    for outcome in ("committed", "failures"):
        for association in ("same", "new"):
            COMMITMENT_REPORTS.labels(outcome=outcome, association=association)
    for result in ("committed", "failed"):
        COMMITMENT_INSTANCES.labels(result=result)
    for reason in RELAY_REPORT_REFUSED_REASONS:
        COMMITMENT_RELAY_REPORTS_REFUSED.labels(reason=reason)
    for name in destinations:
        SKIPPED.labels(destination=name)
        for result in ("committed", "failed"):  # 0 but in relay mode
            COMMITMENT_RELAYED_INSTANCES.labels(destination=name, result=result)
        DUPLICATE_SENDS.labels(destination=name)
        for reason in HEADER_REFUSAL_REASONS:
            HEADER_REFUSALS.labels(destination=name, reason=reason)
        FORWARDED_BYTES_AS_RECEIVED.labels(destination=name)
        PURGED.labels(destination=name)
        for outcome in (Outcome.RETRY, Outcome.DEAD):
            FORWARD_FAILURES.labels(destination=name, outcome=outcome.value)
        for reason in FALLBACK_REASONS:
            FALLBACKS.labels(destination=name, reason=reason.value)


class ProcessCpu:
    """Adds this process's CPU time to one stage of `dicom_router_cpu_seconds`, less what the
    process already counted under other stages (`counted`: a running total in seconds).
    Call `tick()` now and then and once before exit."""

    def __init__(self, stage: str, counted: Callable[[], float] = lambda: 0.0) -> None:
        self.stage, self.counted = stage, counted
        self._lock = threading.Lock()
        self._cpu, self._counted = time.process_time(), counted()

    def tick(self) -> None:
        with self._lock:
            cpu, counted = time.process_time(), self.counted()
            spent = (cpu - self._cpu) - (counted - self._counted)
            self._cpu, self._counted = cpu, counted
        if spent > 0:
            CPU_SECONDS.labels(stage=self.stage).inc(spent)
