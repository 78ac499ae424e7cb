"""Memory under a long stream, and added latency at a steady rate.

    python bench/sustained.py memory  [--syntax original] [--rounds 8]
    python bench/sustained.py latency [--syntax original] [--rate 48] [--seconds 20]

memory:  storescu sends the 500-slice CT study `rounds` times (8 rounds: 2.1 GB) through the
         router to storescp; prints the peak resident memory summed over the router's processes
         (receivers, forwarders, codec workers): each process's own peak (VmHWM), added up.
latency: a pynetdicom sender paces the CT slices at `rate` per second (use half the maximum
         throughput that bench/run.py measured); prints the median and 95th percentile of
         dicom_router_end_to_end_seconds (from the C-STORE being made durable to the
         destination's success), interpolated from the router's own histogram.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import harness  # noqa: E402


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        return rsp.read().decode()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, labels = head.partition("{")
        if metric != name:
            continue
        pairs = dict(p.split("=", 1) for p in labels.rstrip("}").split(",") if "=" in p)
        found.append(({k: v.strip('"') for k, v in pairs.items()}, float(value)))
    return found


def quantile(text: str, q: float) -> float:
    """histogram_quantile() over dicom_router_end_to_end_seconds, all destinations."""
    buckets: dict[float, float] = {}
    for labels, value in samples(text, "dicom_router_end_to_end_seconds_bucket"):
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        buckets[le] = buckets.get(le, 0.0) + value
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-9)
        lower, below = bound, buckets[bound]
    return lower


def forwarded(text: str) -> float:
    return sum(v for _, v in samples(text, "dicom_router_forwarded_instances_total"))


def run(mode: str, syntax: str, rounds: int, rate: float, seconds: float) -> None:
    study = corpus.load("ct")
    work = Path(tempfile.mkdtemp(prefix="dicom-router-sustained-"))
    dest = harness.start_storescp(work / "storescp", work / "out")
    metrics_port = harness.free_port()
    router = harness.start_router(work / "router", dest.port, harness.RouterRule(syntax), dest_aet="STORESCP",
                                  metrics_port=metrics_port)
    try:
        if mode == "memory":
            started = time.monotonic()
            size = sum(p.stat().st_size for p in study.files) * rounds
            for index in range(rounds):
                sender = harness.storescu(study.files, router.port, work, tag=str(index))
                harness.wait_procs([sender], 600)
            want = len(study.files) * rounds
            while forwarded(scrape(metrics_port)) < want and time.monotonic() - started < 1200:
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            print(f"{syntax}: {size / 1e9:.2f} GB ({want} instances) in {elapsed:.0f} s; "
                  f"peak RSS of the router's processes {harness.peak_rss_mb(router.tree()):.0f} MB")
        else:
            from pynetdicom import AE, _config
            from pydicom import dcmread

            _config.STORE_SEND_CHUNKED_DATASET = True
            ae = AE(ae_title="PACED")
            ds = dcmread(study.files[0], stop_before_pixels=True)
            ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
            assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER", max_pdu=0)
            count = int(rate * seconds)
            started = time.monotonic()
            for index in range(count):
                wait = started + index / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                assoc.send_c_store(study.files[index % len(study.files)])
            sent_in = time.monotonic() - started
            assoc.release()
            while forwarded(scrape(metrics_port)) < count and time.monotonic() - started < seconds + 120:
                time.sleep(0.2)
            text = scrape(metrics_port)
            print(f"{syntax}: {count} slices paced at {rate:g}/s (achieved {count / sent_in:.1f}/s); "
                  f"receipt to destination: median {1000 * quantile(text, 0.5):.0f} ms, "
                  f"p95 {1000 * quantile(text, 0.95):.0f} ms")
    finally:
        router.stop()
        dest.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["memory", "latency"])
    parser.add_argument("--syntax", default="original")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--rate", type=float, default=48.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    run(args.mode, args.syntax, args.rounds, args.rate, args.seconds)


if __name__ == "__main__":
    main()
