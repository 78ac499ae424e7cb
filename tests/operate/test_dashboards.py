"""The Grafana dashboard and the Prometheus alerting rules against a real router and a real
Prometheus server (Debian's `prometheus` and `promtool`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support.peers import REPO, Destination, Pacs, RouterProcess, data, free_port, send, wait_until
from tests.support.stow_server import StowServer

DASHBOARD = REPO / "dashboards" / "dicom-router.json"
ALERTS = REPO / "dashboards" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus)"
)
JOB = "dicom-router"

# Grafana variables, replaced by what Grafana would send to Prometheus
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$destination": ".*"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan", "atan2",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard()) for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def as_promql(expr: str) -> str:
    """The query Prometheus receives once Grafana has put in its variables."""
    match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", expr.strip())
    if match:
        return match.group(1)
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (not functions, label names, keywords or numbers)."""
    expr = as_promql(expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def exported_names(exposition: str) -> set[str]:
    """Every sample name a scrape can hold: the samples present, plus the suffixes each family's
    type implies (a labelled histogram with no observation yet has no samples)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "untyped": ("",),
    }
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            base = family.removesuffix("_total") if kind == "counter" else family
            names.update(base + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def families(exposition: str, prefix: str = "dicom_router_") -> dict[str, str]:
    found = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE " + prefix):
            _, _, family, kind = line.split(" ", 3)
            found[family] = kind
    # prometheus_client also types each counter's and histogram's creation time as a gauge
    return {
        f: k for f, k in found.items()
        if not (f.endswith("_created") and {f[:-8], f[:-8] + "_total"} & set(found))
    }


# -- a router with traffic, scraped by a real Prometheus --------------------------------------------
class Prometheus:
    def __init__(self, workdir: Path, target_port: int, rule_files: list[Path]) -> None:
        self.workdir = workdir
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Prometheus:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )

        def ready() -> bool:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_path.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as rsp:
                    return rsp.status == 200
            except OSError:
                return False

        wait_until(ready, timeout, interval=0.1, what="prometheus /-/ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as rsp:
                body = json.loads(rsp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str, **labels: str) -> float | None:
        for sample in self.query(expr):
            if all(sample["metric"].get(k) == v for k, v in labels.items()):
                return float(sample["value"][1])
        return None


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A router compressing to a PACS with JPEG-LS, with traffic in two bursts, and (where the
    prometheus binary exists) a Prometheus scraping it every second with alerts.yml loaded."""
    tmp = tmp_path_factory.mktemp("scraped")
    pacs = Pacs(tmp / "pacs").start()
    archive = StowServer()  # a DICOMweb destination too, so that its metrics have values
    router = RouterProcess(
        tmp / "router", [Destination("PACS", pacs.port, '[[rule]]\nname = "all"\nsyntax = "jpeg-ls-lossless"\n'),
                         Destination("ARCHIVE", 0, '[[rule]]\nname = "all"\nsyntax = "original"\n'
                                                 'set = { InstitutionName = "Archive copy" }\n', url=archive.url)]
    )
    prometheus = None
    try:
        router.start()
        if PROMETHEUS is not None:
            prometheus = Prometheus(tmp, router.metrics_port, [ALERTS]).start()
            wait_until(lambda: prometheus.value(f'up{{job="{JOB}"}}') == 1, 20, 0.2, "the first scrape")
        assert send(router.port, [data("MR2_UNCR.dcm")]) == [0]
        wait_until(lambda: pacs.count() == 1, 20, what="the first image at the PACS")
        if prometheus is not None:
            # rates need a counter seen before and after an increase
            wait_until(lambda: prometheus.value("dicom_router_forwarded_instances_total", destination="PACS") == 1,
                       20, 0.2,
                       "prometheus to see the first forward")
        assert send(router.port, [data("693_UNCR.dcm"), data("US1_UNCR.dcm")]) == [0, 0]
        wait_until(lambda: pacs.count() == 3, 20, what="three images at the PACS")
        wait_until(lambda: len(archive.stored) == 3, 20, what="three images at the DICOMweb archive")
        if prometheus is not None:
            wait_until(lambda: prometheus.value('sum(dicom_router_forwarded_instances_total{destination="PACS"})') == 3,
                       20, 0.2,
                       "prometheus to see three forwards")
        yield router, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        router.kill()
        pacs.stop()
        archive.stop()


# -- the dashboard ----------------------------------------------------------------------------------
def test_dashboard_is_importable_with_a_datasource_and_a_destination_variable():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["destination"]["type"] == "query"
    assert variables["destination"]["includeAll"] and variables["destination"]["multi"]
    assert board["uid"] and board["title"] and board.get("id") is None
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " | ".join(p["title"].lower() for p in panels(board))
    for topic in ("instances per second", "bytes per second", "compression ratio", "queue depth", "oldest pending",
                  "failed sends", "fallbacks", "transcode", "spool free"):
        assert topic in titles, f"no panel about {topic}"


def test_panels_filtered_by_destination_use_the_variable():
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in metric_names(expr):
                if name.startswith(("dicom_router_forward", "dicom_router_queue_jobs", "dicom_router_oldest",
                                    "dicom_router_fallbacks", "dicom_router_skipped", "dicom_router_end_to_end")):
                    assert re.search(re.escape(name) + r'\{[^}]*destination=~"\$destination"', expr), (
                        f"panel {panel['title']!r}: {name} ignores the destination variable"
                    )


def test_metric_name_extraction_reads_promql():
    expr = ('sum(rate(a_total{x="rate(b)"}[$__rate_interval])) / ignoring(destination) group_right '
            'sum by (destination) (rate(c_total[5m])) * 1e6 + histogram_quantile(0.95, sum by (le) (d_bucket))')
    assert metric_names(expr) == {"a_total", "c_total", "d_bucket"}


def test_every_metric_the_dashboard_queries_is_exported(scraped):
    router, _ = scraped
    exported = exported_names(router.metrics())
    queried = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert queried, "the dashboard queries no metric"
    assert queried - exported == set(), f"dashboard queries metrics the router does not export: {queried - exported}"


def sampled_names(exposition: str) -> set[str]:
    """The names of the samples a scrape holds: what a panel shows a value of."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in exposition.splitlines() if line and line[0] != "#"}


def test_every_metric_the_dashboard_queries_has_a_value_on_a_single_node(scraped):
    """A router alone, in the default configuration (no cluster, no relay): every metric a
    panel queries has a sample, so no panel says "No data" for want of a series."""
    router, _ = scraped
    sampled = sampled_names(router.metrics())
    queried = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert queried - sampled == set(), f"the dashboard queries metrics with no value on one node: {queried - sampled}"


def test_a_single_node_reports_itself_and_no_relay_work(scraped):
    router, _ = scraped
    text = router.metrics()
    nodes = re.findall(r'^dicom_router_node_heartbeat_age_seconds\{node="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    assert len(nodes) == 1 and float(nodes[0][1]) == 0.0, nodes
    assert re.search(rf'^dicom_router_leases_held\{{node="{re.escape(nodes[0][0])}"\}} 0\.0$', text, re.MULTILINE)
    for state in ("sending", "awaiting_report"):
        assert re.search(rf'^dicom_router_commitment_relay_requests\{{destination="PACS",state="{state}"\}} 0\.0$',
                         text, re.MULTILINE), state
    for result in ("committed", "failed"):
        assert re.search(rf'^dicom_router_commitment_relayed_instances_total\{{destination="PACS",result="{result}"\}}'
                         r" 0\.0$", text, re.MULTILINE), result


def test_every_router_metric_is_on_the_dashboard(scraped):
    router, _ = scraped
    queried = set().union(*(metric_names(e) for e in dashboard_exprs()))
    missing = []
    for family, kind in families(router.metrics()).items():
        names = exported_names(f"# TYPE {family} {kind}\n")
        if not names & queried:
            missing.append(family)
    assert missing == [], f"exported but on no dashboard panel: {missing}"


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())
    ]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the alerting rules -----------------------------------------------------------------------------
@needs_promtool
def test_alert_rules_pass_promtool_check():
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def alert_rule_test(rules_file: Path, tmp_path: Path, tests: list[dict]) -> subprocess.CompletedProcess:
    spec = {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "alerts-test.yml"
    path.write_text(json.dumps(spec, indent=1))
    return subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)


def series(name: str, values: str, **labels: str) -> dict:
    labels = {"job": JOB, "instance": "r1:9110", **labels}
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def fires(name: str, at: str, *labels: dict) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": dict(lab)} for lab in labels]}


@needs_promtool
@needs_prometheus
def test_alerts_fire_when_they_should_and_only_then(scraped, tmp_path):
    """The rules as the real Prometheus loaded them, annotations aside, against synthetic series."""
    _, prometheus = scraped
    loaded = prometheus.api("rules")["groups"]
    stripped = {"groups": [{"name": g["name"], "rules": [
        {"alert": r["name"], "expr": r["query"], "for": f"{int(r.get('duration', 0))}s", "labels": r.get("labels", {})}
        for r in g["rules"] if r["type"] == "alerting"
    ]} for g in loaded]}
    rules_file = tmp_path / "alerts-stripped.yml"
    rules_file.write_text(json.dumps(stripped))
    names = {r["alert"] for g in stripped["groups"] for r in g["rules"]}
    assert {"DicomRouterDown", "DicomRouterDestinationStuck", "DicomRouterDeadLetters",
            "DicomRouterDeadLettersIncreasing", "DicomRouterSpoolNearlyFull"} <= names

    me = {"job": JOB, "instance": "r1:9110"}
    gib = 1024**3
    tests = [{
        "interval": "1m",
        "input_series": [
            series("up", "1 1 1 0 0 0 0 0"),
            # PACS: the oldest job ages a minute a minute with jobs pending; ARCHIVE: drains in time
            series("dicom_router_oldest_pending_seconds", "0+60x40", destination="PACS"),
            series("dicom_router_queue_jobs", "5x40", destination="PACS", state="pending"),
            series("dicom_router_oldest_pending_seconds", "0x40", destination="ARCHIVE"),
            series("dicom_router_queue_jobs", "0x40", destination="ARCHIVE", state="pending"),
            # OFFSITE: as old, but every job held on purpose (outside its window): no alert
            series("dicom_router_oldest_pending_seconds", "0+60x40", destination="OFFSITE"),
            series("dicom_router_queue_jobs", "5x40", destination="OFFSITE", state="pending"),
            series("dicom_router_held_jobs", "5x40", destination="OFFSITE", reason="window"),
            series("dicom_router_held_jobs", "0x40", destination="PACS", reason="window"),
            series("dicom_router_queue_jobs", "0 0 0 0 0 1x35", destination="PACS", state="dead"),
            series("dicom_router_forward_failures_total", "0 0 0 0 0 1x35", destination="PACS", outcome="dead"),
            series("dicom_router_spool_free_bytes", f"{50 * gib}x10 {2 * gib}x30"),
        ],
        "alert_rule_test": [
            fires("DicomRouterDown", "2m"),
            fires("DicomRouterDown", "6m", {**me, "severity": "critical"}),
            fires("DicomRouterDestinationStuck", "15m"),
            fires("DicomRouterDestinationStuck", "25m", {**me, "destination": "PACS", "severity": "warning"}),
            fires("DicomRouterDeadLetters", "4m"),
            fires("DicomRouterDeadLetters", "7m", {**me, "destination": "PACS", "severity": "warning"}),
            fires("DicomRouterDeadLettersIncreasing", "7m", {**me, "destination": "PACS", "severity": "critical"}),
            fires("DicomRouterDeadLettersIncreasing", "30m"),
            fires("DicomRouterSpoolNearlyFull", "10m"),
            fires("DicomRouterSpoolNearlyFull", "20m", {**me, "severity": "critical"}),
        ],
    }]
    result = alert_rule_test(rules_file, tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real Prometheus scraping the router ----------------------------------------------------------
@needs_prometheus
def test_prometheus_scrapes_the_router_and_answers_with_its_metrics(scraped):
    _, prometheus = scraped
    received = prometheus.query("dicom_router_received_instances_total")
    assert [(s["metric"]["caller"], s["metric"]["job"], float(s["value"][1])) for s in received] == [
        ("MODALITY", JOB, 3.0)
    ]
    assert prometheus.value("dicom_router_forwarded_instances_total", destination="PACS",
                            syntax="jpeg-ls-lossless") == 3.0
    assert prometheus.value('dicom_router_queue_jobs{state="pending"}', destination="PACS") == 0.0
    assert prometheus.value("dicom_router_spool_free_bytes") > 0
    build = prometheus.query("dicom_router_build_info")
    assert len(build) == 1 and build[0]["metric"]["version"]


@needs_prometheus
def test_every_dashboard_query_runs_on_prometheus_and_the_ratio_shows_compression(scraped):
    _, prometheus = scraped
    for expr in dashboard_exprs():
        prometheus.query(as_promql(expr))  # asserts status success
    [ratio_panel] = [p for p in panels(dashboard()) if p["title"].lower().startswith("compression ratio")]
    ratio = prometheus.value(as_promql(ratio_panel["targets"][0]["expr"]), destination="PACS")
    assert ratio is not None, "the compression ratio panel is empty for PACS"
    # MR, CT and US sent as JPEG-LS lossless compress between 2:1 and 6:1
    assert 1.5 < ratio < 8, ratio


@needs_prometheus
def test_alert_rules_load_and_stay_quiet_on_a_healthy_router(scraped):
    _, prometheus = scraped
    groups = prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 5
    deadline = time.monotonic() + 10
    while any(r.get("lastEvaluation", "").startswith("0001") for r in rules) and time.monotonic() < deadline:
        time.sleep(0.5)
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    assert prometheus.api("alerts")["alerts"] == []
