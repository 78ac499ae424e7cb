"""No caller chooses how many series the metrics have: the `caller` label keeps the AE title of
the configured callers and of the first `[listen] max_caller_labels` others, and counts every
other caller as "other", over all receiving processes together."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.peers import (
    Destination,
    data,
    make_series,
    metric_value,
    send,
    wait_until,
)

CALLER_METRICS = ("dicom_router_associations_total", "dicom_router_received_instances_total",
                  "dicom_router_received_bytes_total")


def callers(exposition: str, metric: str) -> set[str]:
    return set(re.findall(rf'^{metric}\{{[^}}]*caller="([^"]*)"', exposition, re.MULTILINE))


def label_values(exposition: str) -> dict[str, set[str]]:
    """Every label of every sample of the router's metrics, with the values it takes."""
    found: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        match = re.match(r"(dicom_router_\w+)\{(.*)\} ", line)
        if match:
            for name, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2)):
                found.setdefault(name, set()).add(value)
    return found


def store_from_each(port: int, titles: list[str], files: list[Path]) -> None:
    for title, path in zip(titles, files, strict=True):
        assert send(port, [path], calling_ae=title) == [0], title


def test_callers_past_the_bound_are_counted_as_other(pacs, router_factory, tmp_path):
    router = router_factory(
        [Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')],
        listen_extra="processes = 2\nmax_caller_labels = 3\n",
        extra='[commitment]\nmodalities = { CT_KNOWN = { host = "127.0.0.1", port = 1 } }\n',
    )
    strangers = [f"STRANGER{i:02d}" for i in range(12)]
    titles = ["CT_KNOWN", *strangers, "CT_KNOWN"]
    files = make_series(data("SC_rgb.dcm"), len(titles), tmp_path / "series")
    store_from_each(router.port, titles, files)
    wait_until(lambda: pacs.count() == len(titles), 60, what="every instance at the PACS")

    text = router.metrics()
    for metric in CALLER_METRICS:
        values = callers(text, metric)
        assert "CT_KNOWN" in values and "other" in values, (metric, values)
        named = values - {"CT_KNOWN", "other"}
        assert len(named) <= 3 and named <= set(strangers), (metric, values)
    assert metric_value(text, "dicom_router_received_instances_total", caller="CT_KNOWN") == 2
    assert metric_value(text, "dicom_router_received_instances_total") == len(titles)  # none lost from the count
    assert metric_value(text, "dicom_router_associations_total") == len(titles)
    assert metric_value(text, "dicom_router_received_instances_total", caller="other") >= len(strangers) - 3


def test_by_default_thirty_strangers_make_at_most_twenty_one_caller_series(pacs, router_factory, tmp_path):
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')],
                            listen_extra="processes = 2\n")
    titles = [f"CALLER{i:02d}" for i in range(30)]
    files = make_series(data("SC_rgb.dcm"), len(titles), tmp_path / "series")
    store_from_each(router.port, titles, files)
    wait_until(lambda: pacs.count() == len(titles), 60, what="every instance at the PACS")

    text = router.metrics()
    for metric in CALLER_METRICS:
        values = callers(text, metric)
        assert len(values) <= 21 and "other" in values, (metric, len(values))
    assert metric_value(text, "dicom_router_received_instances_total") == len(titles)
    # no other label takes a value from the network: the ones the configuration and the code know
    others = {name: v for name, v in label_values(text).items() if name != "caller"}
    assert others["destination"] == {"PACS"}
    assert not any(title in v for v in others.values() for title in titles), others


def test_allowed_callers_keep_their_name_whatever_the_bound(pacs, router_factory, tmp_path):
    router = router_factory([Destination("PACS", pacs.port, '[[rule]]\nsyntax = "original"\n')],
                            listen_extra='allowed_callers = ["CT1", { ae_title = "MR1" }]\nmax_caller_labels = 0\n')
    files = make_series(data("SC_rgb.dcm"), 2, tmp_path / "series")
    store_from_each(router.port, ["CT1", "MR1"], files)
    assert send(router.port, files[:1], calling_ae="INTRUDER") == [-1]  # refused: not counted anywhere
    wait_until(lambda: pacs.count() == 2, 60, what="both instances at the PACS")
    text = router.metrics()
    for metric in CALLER_METRICS:
        assert callers(text, metric) == {"CT1", "MR1"}, metric
