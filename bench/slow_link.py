"""The slow link: a 4-image 12-bit mammography-like study to a PACS behind a slow line.

    python bench/slow_link.py [--mbps 5] [--rows 4090] [--columns 3300] [--skip-as-received]

The study (tests/support/mammography.py: four views cut from a mirror-tiled real CR of pydicom-data,
requantised to 12 bits, about 104 MB at 3300 x 4090) goes from a pynetdicom modality through
`dicom-router serve` to a pynetdicom PACS, three ways:

    as received        the router sends it as received over a line of --mbps
    jpeg-ls-lossless   the router sends JPEG-LS lossless over the same line
    jpeg-ls, capped    the router's own max_mbps = --mbps, the line unlimited: the cap alone

The line is tests/support/slow_link.py's proxy (its own pacing). Printed per way: the bytes on the
line, the link time (first byte in to last byte out), the time from the modality's first
C-STORE to the PACS having all four, the peak megabits in any second from the router, and
whether every image arrived bit-exact in pixels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from pydicom import dcmread  # noqa: E402

from tests.support.mammography import mammography_study  # noqa: E402
from tests.support.peers import Destination, Pacs, RouterProcess, send, wait_until  # noqa: E402
from tests.support.slow_link import SlowLink  # noqa: E402


def one_way(name: str, study: list[Path], work: Path, syntax: str, line_mbps: float, router_mbps: float) -> dict:
    pacs = Pacs(work / f"{name}-pacs").start()
    link = SlowLink(pacs.port, line_mbps)
    extra = f"max_mbps = {router_mbps}\nmax_associations = 1\n" if router_mbps else "max_associations = 1\n"
    rules = f'[[rule]]\nsyntax = "{syntax}"\n'
    router = RouterProcess(work / f"{name}-router", [Destination("PACS", link.port, rules, extra=extra,
                                                                 timeouts="{ connect_s = 10, acse_s = 30, "
                                                                          "dimse_s = 600, network_s = 600 }")])
    router.start()
    try:
        started = time.monotonic()
        statuses = send(router.port, study)
        assert statuses == [0] * len(study), statuses
        wait_until(lambda: pacs.count() == len(study), 3600, interval=0.2, what=f"{name}: the whole study")
        done = time.monotonic() - started
        by_uid = pacs.by_uid()
        exact = all(
            np.array_equal(dcmread(p).pixel_array,
                           dcmread(by_uid[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)].path).pixel_array)
            for p in study)
        return {"way": name, "bytes": link.bytes_carried(), "link_s": link.busy_seconds(), "done_s": done,
                "peak_mbps": link.peak_mbps(1.0), "exact": exact,
                "syntax": pacs.received[0].transfer_syntax_uid}
    finally:
        router.kill()
        link.close()
        pacs.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbps", type=float, default=5.0, help="the line, megabits per second (default 5)")
    parser.add_argument("--rows", type=int, default=4090)
    parser.add_argument("--columns", type=int, default=3300)
    parser.add_argument("--skip-as-received", action="store_true", help="only the compressed ways (faster)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slow-link-") as tmp:
        work = Path(tmp)
        study = mammography_study(work / "study", args.rows, args.columns)
        total = sum(p.stat().st_size for p in study)
        print(f"study: 4 views {args.columns} x {args.rows}, 12 bits stored, {total / 1e6:.1f} MB as received; "
              f"line {args.mbps:g} Mbps", file=sys.stderr)
        ways = [] if args.skip_as_received else [("as received", "original", "original", args.mbps, 0.0)]
        ways += [("jpeg-ls-lossless", "jls", "jpeg-ls-lossless", args.mbps, 0.0),
                 ("jpeg-ls-lossless, line unlimited, router max_mbps", "jls-capped", "jpeg-ls-lossless", 0.0,
                  args.mbps)]
        results = []
        for label, slug, syntax, line, cap in ways:
            print(f"{label}...", file=sys.stderr)
            results.append(one_way(slug, study, work, syntax, line, cap))
            results[-1]["way"] = label
    print(f"| way | MB on the line | ratio | link time, s | modality to PACS has all 4, s | peak Mbps (1 s) "
          f"| bit-exact |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['way']} | {r['bytes'] / 1e6:.1f} | {total / r['bytes']:.2f} | {r['link_s']:.1f} | "
              f"{r['done_s']:.1f} | {r['peak_mbps']:.2f} | {'yes' if r['exact'] else 'NO'} |")
    return 0 if all(r["exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
