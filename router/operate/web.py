"""The status page, served with the metrics on `[metrics] host:port` at `/`.

Read-only, server-rendered HTML that needs no JavaScript: each destination's state (sending,
paused, failing, waiting, idle), pending, oldest pending, dead letters, the rate over the last
minutes and a small chart of throughput, the recent failures with their reasons, and a search
box that shows `dicom-router trace` for a Study, Series or SOP Instance UID (`/trace?uid=...`).
Only UIDs, AE titles, addresses and errors are shown: never a patient's name, ID or birth date.
Changes (pause, resume, retry, purge) stay in the command line, so the page needs no login.

Its cost is bounded whatever its clients do: the overview is built at most every `CACHE_S`
seconds (from counts, and a few jobs per destination: never the whole queue), a trace is kept
that long too, and `metrics.serve_http` answers the page at its own pace, apart from the
probes.
"""

from __future__ import annotations

import html
import threading
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import parse_qs, urlencode

from router import __version__
from router.config import DestinationRules
from router.queue.holds import Holds
from router.queue import Queue
from router.operate.trace import summary, trace

SAMPLE_EVERY_S = 10.0
CHART_MINUTES = 30
RATE_MINUTES = 5
RECENT_FAILURES = 20
CACHE_S = 5.0  # the overview, and each trace, is built at most this often; asked again sooner, the same page
CACHED_TRACES = 32  # traces kept for CACHE_S, the most recent first
RETRY_SCAN = 50  # per destination: its oldest pending jobs, read to tell whether it is failing
TRACE_ROWS = 1000  # instances listed by a trace on the page (the command line lists them all)

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.state{font-weight:600;padding:.1em .5em;border-radius:.3em}
.sending{background:#d7f5dd}.idle{background:#eee}.paused{background:#fde9b8}
.failing{background:#f8cfcf}.waiting{background:#dde8fb}
.muted{color:#777}form{margin:.6em 0}input[type=text]{width:36em;padding:.3em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}
"""


class StatusPage:
    """Renders `/` and `/trace` from the queue, the rule files in force and the holds."""

    def __init__(self, queue: Queue, destinations: Callable[[], list[DestinationRules]], holds: Holds,
                 delivered_totals: Callable[[], dict[str, float]], clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.destinations = destinations
        self.holds = holds
        self.delivered_totals = delivered_totals
        self.clock = clock
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=int(CHART_MINUTES * 60 / SAMPLE_EVERY_S) + 1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pages: dict[tuple[str, str], tuple[float, bytes]] = {}  # (path, uid) -> (built at, page)
        self._pages_lock = threading.Lock()
        self._building = threading.Lock()  # one page built at a time: the others wait and take it

    # -- throughput, sampled in the background ---------------------------------------------
    def sample(self) -> None:
        totals = dict(self.delivered_totals())
        with self._lock:
            self._samples.append((self.clock(), totals))

    def start_sampling(self) -> None:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.sample()
                except Exception:  # noqa: BLE001 - a page is never worth a dead thread
                    pass
                self._stop.wait(SAMPLE_EVERY_S)

        threading.Thread(target=run, name="status-page-sampler", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _rates(self, name: str) -> list[float]:
        """Instances per minute between consecutive samples, oldest first."""
        with self._lock:
            samples = list(self._samples)
        rates = []
        for (t0, a), (t1, b) in zip(samples, samples[1:]):
            if t1 > t0:
                rates.append(max(0.0, b.get(name, 0.0) - a.get(name, 0.0)) * 60 / (t1 - t0))
        return rates

    def _recent_rate(self, name: str) -> float | None:
        with self._lock:
            samples = list(self._samples)
        if len(samples) < 2:
            return None
        now_t, now_totals = samples[-1]
        then = next(((t, v) for t, v in samples if now_t - t <= RATE_MINUTES * 60), samples[0])
        if now_t <= then[0]:
            return None
        return max(0.0, now_totals.get(name, 0.0) - then[1].get(name, 0.0)) * 60 / (now_t - then[0])

    # -- HTTP --------------------------------------------------------------------------------
    def handle(self, path: str, query: str) -> tuple[bytes, str, int] | None:
        """(body, content type, status) for `path`, or None when it is not the page's."""
        if path == "/":
            page = self._cached(("/", ""), lambda: self._html("dicom-router status", self.overview()))
            return page, "text/html; charset=utf-8", 200
        if path == "/trace":
            uid = (parse_qs(query).get("uid") or [""])[0].strip()
            page = self._cached(("/trace", uid), lambda: self._html(f"trace {uid}", self.trace_view(uid)))
            return page, "text/html; charset=utf-8", 200
        return None

    def _cached(self, key: tuple[str, str], build: Callable[[], bytes]) -> bytes:
        """The page for `key` as built less than CACHE_S ago, else built now (once, however
        many ask at the same time)."""
        page = self._fresh(key)
        if page is not None:
            return page
        with self._building:
            page = self._fresh(key)
            if page is not None:
                return page
            page = build()
            with self._pages_lock:
                self._pages.pop(key, None)
                self._pages[key] = (time.monotonic(), page)
                while len(self._pages) > CACHED_TRACES + 1:
                    del self._pages[next(iter(self._pages))]
            return page

    def _fresh(self, key: tuple[str, str]) -> bytes | None:
        with self._pages_lock:
            built = self._pages.get(key)
        if built is not None and time.monotonic() - built[0] < CACHE_S:
            return built[1]
        return None

    @staticmethod
    def _html(title: str, body: str) -> bytes:
        refresh = '<meta http-equiv="refresh" content="10">' if title == "dicom-router status" else ""
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{refresh}'
                f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
                ).encode()

    @staticmethod
    def _search(value: str = "") -> str:
        return ('<form action="/trace" method="get"><label>Where is it? '
                f'<input type="text" name="uid" id="uid" value="{html.escape(value)}" '
                'placeholder="Study, Series or SOP Instance UID"></label> <button type="submit">Trace</button></form>')

    def _state(self, name: str, counts: dict[tuple[str, str], int], retrying: set[str], paused: dict[str, float]
               ) -> str:
        if name in paused:
            return "paused"
        if name in retrying:
            return "failing"
        if counts.get((name, "in_flight"), 0):
            return "sending"
        if counts.get((name, "pending"), 0):
            return "waiting"
        return "idle"

    def overview(self) -> str:
        now = self.clock()
        counts = self.queue.counts()
        oldest = self.queue.oldest_pending(now)
        paused = self.holds.paused()
        rules = {d.name: d for d in self.destinations()}
        names = sorted(set(rules) | {d for d, _ in counts})
        # a few jobs per destination, never the whole queue: its oldest pending ones (a failing
        # destination's retries are among them) and its first dead letters
        retrying_jobs, dead_jobs = [], []
        for name in names:
            if counts.get((name, "pending"), 0):
                retrying_jobs += [j for j in self.queue.jobs(destination=name, state="pending", limit=RETRY_SCAN)
                                  if j.attempts]
            if counts.get((name, "dead"), 0):
                dead_jobs += self.queue.jobs(destination=name, state="dead", limit=RECENT_FAILURES)
        retrying = {j.destination for j in retrying_jobs}
        rows = []
        for name in names:
            state = self._state(name, counts, retrying, paused)
            target = rules.get(name)
            where = target.destination.address if target else "no rule file"
            age = oldest.get(name)
            rate = self._recent_rate(name)
            rows.append(
                f'<tr id="dest-{html.escape(name)}"><td>{html.escape(name)}</td>'
                f'<td class="muted">{html.escape(where)}</td>'
                f'<td><span class="state {state}">{state}</span></td>'
                f'<td class="n">{counts.get((name, "pending"), 0)}</td><td class="n">{counts.get((name, "in_flight"), 0)}</td>'
                f'<td class="n">{_age(age)}</td><td class="n">{counts.get((name, "dead"), 0)}</td>'
                f'<td class="n">{"-" if rate is None else f"{rate:.1f}"}</td><td>{self._chart(name)}</td></tr>')
        failures = sorted(
            [(j.instance.received_at, j.destination, j.instance.sop_instance_uid, "dead", j.last_error)
             for j in dead_jobs]
            + [(j.next_attempt_at, j.destination, j.instance.sop_instance_uid, f"retry {j.attempts + 1}", j.last_error)
               for j in retrying_jobs],
            reverse=True)[:RECENT_FAILURES]
        failure_rows = "".join(
            f"<tr><td>{_when(t)}</td><td>{html.escape(d)}</td><td>{html.escape(kind)}</td>"
            f'<td><a href="/trace?{urlencode({"uid": uid})}">{html.escape(uid)}</a></td>'
            f"<td>{html.escape(error)}</td></tr>" for t, d, uid, kind, error in failures)
        return (
            f"<h1>dicom-router</h1><div class=muted>version {html.escape(__version__)} · {_when(now)} · "
            f"refreshes every 10 s; built at most every {CACHE_S:.0f} s</div>"
            + self._search()
            + "<h2>Destinations</h2><table id=destinations><tr><th>destination</th><th>address</th><th>state</th>"
              "<th>pending</th><th>in flight</th><th>oldest pending</th><th>dead</th>"
              f"<th>per minute ({RATE_MINUTES} min)</th><th>last {CHART_MINUTES} min</th></tr>"
            + "".join(rows) + "</table>"
            + self._nodes()
            + "<h2>Recent failures</h2>"
            + (f"<p class=muted>retries among each destination's oldest {RETRY_SCAN} pending jobs, and its first "
               f"{RECENT_FAILURES} dead letters; all of them: <code>dicom-router queue dead</code></p>"
               if failure_rows else "")
            + (f"<table id=failures><tr><th>when</th><th>destination</th><th>what</th><th>SOP Instance UID</th>"
               f"<th>reason</th></tr>{failure_rows}</table>" if failure_rows else "<p class=muted>none</p>")
        )

    def _nodes(self) -> str:
        """With several nodes on one queue: each, its last heartbeat and the jobs it holds (the
        destinations' rates and charts above are this node's own sends)."""
        nodes = self.queue.nodes()
        if not nodes:
            return ""
        me = getattr(self.queue, "node", "")
        rows = "".join(
            f'<tr id="node-{html.escape(n.name)}"><td>{html.escape(n.name)}{" (this node)" if n.name == me else ""}</td>'
            f'<td class="muted">{html.escape(n.host)}</td>'
            f'<td><span class="state {"sending" if n.alive else "failing"}">{"alive" if n.alive else "gone"}</span></td>'
            f'<td class="n">{_age(n.heartbeat_age_s)}</td><td class="n">{n.jobs_held}</td></tr>' for n in nodes)
        return ("<h2>Nodes</h2><table id=nodes><tr><th>node</th><th>host</th><th>state</th><th>last heartbeat</th>"
                f"<th>jobs in flight</th></tr>{rows}</table>"
                "<p class=muted>rates and charts above: this node's sends; queue counts: the whole cluster's</p>")

    def _chart(self, name: str) -> str:
        rates = self._rates(name)
        if len(rates) < 2:
            return '<span class="muted">-</span>'
        width, height, top = 180, 28, max(max(rates), 1e-9)
        step = width / (len(rates) - 1)
        points = " ".join(f"{i * step:.1f},{height - (r / top) * (height - 2) - 1:.1f}" for i, r in enumerate(rates))
        return (f'<svg width="{width}" height="{height}" role="img" aria-label="instances per minute">'
                f'<polyline fill="none" stroke="#2a7" stroke-width="1.5" points="{points}"/></svg>')

    def trace_view(self, uid: str) -> str:
        back = '<p><a href="/">back to the status</a></p>'
        if not uid:
            return back + self._search()
        found = []
        for key in ("study", "series", "sop"):
            found = trace(self.queue, **{key: uid})
            if found:
                break
        rows = "".join(
            f"<tr><td>{html.escape(w.sop_instance_uid)}</td><td>{html.escape(w.destination or '-')}</td>"
            f"<td>{html.escape(w.state)}</td><td>{_when(w.at)}</td><td>{html.escape(w.detail)}"
            + (f" · sent as {html.escape(w.sent_sop_instance_uid)}" if w.sent_sop_instance_uid else "")
            + "</td></tr>" for w in found[:TRACE_ROWS])
        if len(found) > TRACE_ROWS:
            rows += (f'<tr><td colspan=5 class=muted>{len(found) - TRACE_ROWS} more: '
                     f"<code>dicom-router trace</code> lists them all</td></tr>")
        table = (f"<table id=trace><tr><th>SOP Instance UID</th><th>destination</th><th>where</th><th>when</th>"
                 f"<th>detail</th></tr>{rows}</table>" if rows else "")
        return (back + self._search(uid) + f'<h2>{html.escape(uid)}</h2><p id="summary">{html.escape(summary(found))}</p>'
                + table)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
