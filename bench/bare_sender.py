"""The sending side's floor: pynetdicom alone sending the CT study to DCMTK's storescp.

    python bench/bare_sender.py [--images 300] [--max-pdu 16384 65536] [--repeat 3]

For each maximum PDU storescp is told to accept: starts `storescp --fork +xa --max-pdu N`,
opens one association, sends the study from its files as the router does (pynetdicom's
`STORE_SEND_CHUNKED_DATASET`, TCP_NODELAY), and prints instances/s and the sender's CPU per
instance (best of --repeat runs). No queue, no spool, no transcoding: what any pynetdicom
forwarder pays per instance before doing anything of its own.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import harness  # noqa: E402


def measure(files: list[Path], max_pdu: int, repeat: int) -> tuple[float, float, int]:
    from pydicom import dcmread
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    work = Path(tempfile.mkdtemp(prefix="dicom-router-bare-sender-"))
    out = work / "dest"
    out.mkdir()
    port = harness.free_port()
    scp = harness.launch("storescp", ["storescp", "--fork", "+xa", "--max-pdu", str(max_pdu), "-aet", "STORESCP",
                                      "-od", str(out), str(port)], work, port)
    try:
        harness.wait_listening(scp)
        first = dcmread(files[0], stop_before_pixels=True)
        ae = AE(ae_title="ROUTER")
        ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
        if not assoc.is_established:
            raise RuntimeError(f"storescp --max-pdu {max_pdu} refused the association:\n{scp.log_tail()}")
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = assoc.acceptor.maximum_length
        assoc.send_c_store(files[0])  # warm-up
        best_rate, best_cpu = 0.0, float("inf")
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            for path in files:
                status = assoc.send_c_store(path)
                if status.get("Status", 0xFFFF) != 0:
                    raise RuntimeError(f"storescp answered {status}")
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best_rate, best_cpu = max(best_rate, len(files) / wall), min(best_cpu, cpu / len(files))
        assoc.release()
        return best_rate, best_cpu * 1000, peer
    finally:
        scp.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--max-pdu", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    study = corpus.load("ct").head(args.images)
    print(f"| storescp --max-pdu | inst/s (best of {args.repeat}) | sender CPU ms/inst |")
    print("|---|---|---|")
    for max_pdu in args.max_pdu:
        rate, cpu, peer = measure(study.files, max_pdu, args.repeat)
        print(f"| {max_pdu} (negotiated {peer}) | {rate:.0f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
