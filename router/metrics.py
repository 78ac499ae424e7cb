"""Prometheus metrics and the HTTP endpoint that serves them with /healthz and /readyz.

Labels are few and of low cardinality: destination, syntax, outcome, reason, caller (AE title).
Never UIDs or patient data.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router import __version__
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
    "Time for one C-STORE to a destination, request to response",
    ["destination"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
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
    ) -> None:
        self._nodes = nodes  # the cluster's nodes (router.queue.Node); none with the embedded queue
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
        nodes = self._nodes()  # none with the embedded queue: the families are declared, empty
        age = GaugeMetricFamily(
            "dicom_router_node_heartbeat_age_seconds",
            "Seconds since each node of the cluster last renewed its leases (by the database's clock)",
            labels=["node"])
        leases = GaugeMetricFamily(
            "dicom_router_leases_held", "Jobs each node of the cluster holds in flight under a live lease",
            labels=["node"])
        for node in nodes:
            age.add_metric([node.name], node.heartbeat_age_s)
            leases.add_metric([node.name], node.jobs_held)
        yield age
        yield leases
        jobs = GaugeMetricFamily(
            "dicom_router_queue_jobs", "Jobs in the queue by destination and state", labels=["destination", "state"]
        )
        for name in sorted(set(names) | {d for d, _ in counts}):
            for state in ("pending", "in_flight", "dead"):
                jobs.add_metric([name, state], counts.get((name, state), 0))
        yield jobs
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
        held_jobs = GaugeMetricFamily(
            "dicom_router_held_jobs",
            "Pending jobs a destination holds back, by reason: window (outside every window of its schedule), "
            "delay, study_stable (a study still receiving), throttled (due, going out at max_mbps)",
            labels=["destination", "reason"],
        )
        for name in sorted(set(names) | {d for d, _ in waiting}):
            for reason in HELD_REASONS:
                held_jobs.add_metric([name, reason.value], waiting.get((name, reason.value), 0))
        yield held_jobs
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
        relay_requests = GaugeMetricFamily(
            "dicom_router_commitment_relay_requests",
            "Storage commitment requests to destinations not answered yet ([commitment] mode = \"relay\"), by "
            "state: sending (the destination has not taken the N-ACTION yet), awaiting_report",
            labels=["destination", "state"],
        )
        for name in sorted({d for d, _ in relays}):
            for state in ("sending", "awaiting_report"):
                relay_requests.add_metric([name, state], relays.get((name, state), 0))
        yield relay_requests
        yield GaugeMetricFamily(
            "dicom_router_spool_free_bytes", "Free bytes on the spool's filesystem", value=self._spool_free_bytes()
        )
        build = GaugeMetricFamily("dicom_router_build_info", "Version of the running router", labels=["version"])
        build.add_metric([__version__], 1)
        yield build


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
        )
    }

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        seen = set()
        for family in MultiProcessCollector(None).collect():
            seen.add(family.name)
            yield family
        for name, metric in self._DECLARED.items():
            if name not in seen:
                yield from metric.describe()


def install_state_collector(collector: StateCollector) -> None:
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    REGISTRY.register(collector)
    _collector = collector


class _Handler(BaseHTTPRequestHandler):
    ready: Callable[[], tuple[bool, str]] = staticmethod(lambda: (True, "ok"))  # type: ignore[assignment]
    pages: Callable[[str, str], tuple[bytes, str, int] | None] = staticmethod(lambda path, query: None)  # type: ignore[assignment]

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.server.request_arrived(self.request)  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype, code = generate_latest(_registry()), CONTENT_TYPE_LATEST, 200
        elif path == "/healthz":
            body, ctype, code = b"ok\n", "text/plain; charset=utf-8", 200
        elif path == "/readyz":
            ok, why = type(self).ready()
            body, ctype, code = (why + "\n").encode(), "text/plain; charset=utf-8", 200 if ok else 503
        else:
            page = type(self).pages(path, self.path.partition("?")[2])
            if page is not None:
                body, ctype, code = page
            else:
                body, ctype, code = b"not found: try /, /metrics, /healthz or /readyz\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server API
        pass


class _BoundedHTTPServer(ThreadingHTTPServer):
    """At most `max_connections` connections at once (one more is closed as soon as it is
    accepted), and each must deliver its request within `idle_timeout` of connecting: idle or
    trickling clients cannot pile up threads and file descriptors in the router."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 - socketserver API
        """A client that hung up before its answer (a load balancer's health check, a scraper
        that timed out) is nothing to log; anything else keeps the usual report."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], handler: type[_Handler], max_connections: int,
                 idle_timeout: float) -> None:
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connection -> when its request must have arrived
        self._open = 0

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

    def shutdown_request(self, request) -> None:  # noqa: ANN001 - socketserver API
        with self._lock:
            self._open -= 1
            self._waiting.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Between two turns of the accept loop: close the connections whose request is late
        (a socket timeout alone lets a client that sends a byte now and then stay forever)."""
        now = time.monotonic()
        with self._lock:
            late = [request for request, deadline in self._waiting.items() if deadline < now]
            for request in late:
                del self._waiting[request]
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def serve_http(host: str, port: int, ready: Callable[[], tuple[bool, str]], max_connections: int = 32,
               idle_timeout_s: float = 10.0,
               pages: Callable[[str, str], tuple[bytes, str, int] | None] | None = None) -> ThreadingHTTPServer:
    """Start /metrics, /healthz and /readyz on a daemon thread; returns the server (call shutdown()).

    At most `max_connections` are served at once; a connection beyond them is closed as soon as
    it is accepted. A connection whose request has not fully arrived `idle_timeout_s` after it
    opened is closed, and so is one idle that long while its answer is sent.
    """
    handler = type("MetricsHandler", (_Handler,), {"ready": staticmethod(ready), "timeout": idle_timeout_s,
                                                    "pages": staticmethod(pages or (lambda path, query: None))})
    server = _BoundedHTTPServer((host, port), handler, max_connections, idle_timeout_s)
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
        DUPLICATE_SENDS.labels(destination=name)
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
