"""A bare pynetdicom storage SCP: the library's receive ceiling.

    python bench/bare_receiver.py --port PORT [--max-pdu N] [--out DIR] [--aet STORESCP]

The C-STORE handler answers 0x0000 at once, after writing `event.encoded_dataset()` to
DIR when --out is given (the benchmark also uses it as an HTJ2K-capable destination,
which DCMTK 3.6.7's storescp is not). --max-pdu defaults to pynetdicom's own default
(16382); 0 is unlimited. Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from pathlib import Path

from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aet", default="STORESCP")
    parser.add_argument("--max-pdu", type=int, default=None, help="default: pynetdicom's (16382); 0: unlimited")
    parser.add_argument("--out", type=Path, default=None, help="write each received data set here")
    args = parser.parse_args()

    lock = threading.Lock()
    counter = [0]

    def on_open(event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_store(event: evt.Event) -> int:
        if args.out is not None:
            with lock:
                counter[0] += 1
                index = counter[0]
            # written under a temporary name and renamed, so a counted file is a complete file
            tmp = args.out / f".{index:06d}.part"
            tmp.write_bytes(event.encoded_dataset())
            tmp.rename(args.out / f"{index:06d}_{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE(ae_title=args.aet)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    if args.max_pdu is not None:
        ae.maximum_pdu_size = args.max_pdu
    ae.require_called_aet = False
    server = ae.start_server(("127.0.0.1", args.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
