"""The naive forwarder: the floor a store-and-forward router has to beat.

    python bench/naive_forwarder.py --port PORT --dest-port PORT [--dest-aet STORESCP] [--jpeg-ls]

A pynetdicom SCP whose C-STORE handler decodes the data set with pydicom, compresses it to
JPEG-LS lossless with `Dataset.compress` when --jpeg-ls is given, and sends it synchronously
to the destination over one association kept open between instances, answering the modality
with the destination's status. No spool, no queue, no durability: what most in-house
"DICOM forwarders" are. Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def _nodelay(assoc) -> None:  # noqa: ANN001
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aet", default="ROUTER")
    parser.add_argument("--dest-port", type=int, required=True)
    parser.add_argument("--dest-aet", default="STORESCP")
    parser.add_argument("--jpeg-ls", action="store_true", help="compress to JPEG-LS lossless before sending")
    args = parser.parse_args()

    outbound_syntaxes = [JPEGLSLossless] if args.jpeg_ls else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    lock = threading.Lock()
    state: dict[str, object] = {"assoc": None}

    def outbound():  # noqa: ANN202
        assoc = state["assoc"]
        if assoc is None or not assoc.is_established:
            scu = AE(ae_title=args.aet)
            for cx in AllStoragePresentationContexts[:120]:
                scu.add_requested_context(cx.abstract_syntax, outbound_syntaxes)
            assoc = scu.associate("127.0.0.1", args.dest_port, ae_title=args.dest_aet, max_pdu=0)
            if not assoc.is_established:
                raise RuntimeError("destination refused the association")
            _nodelay(assoc)
            state["assoc"] = assoc
        return assoc

    def on_open(event: evt.Event) -> None:
        _nodelay(event.assoc)

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if args.jpeg_ls:
            ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
        with lock:
            try:
                status = outbound().send_c_store(ds)
            except Exception:  # noqa: BLE001 - answer the modality, drop the association
                state["assoc"] = None
                return 0xA700
        return int(status.Status) if "Status" in status else 0xA700

    ae = AE(ae_title=args.aet)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0
    ae.require_called_aet = False
    server = ae.start_server(("127.0.0.1", args.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    with lock:
        assoc = state["assoc"]
        if assoc is not None and assoc.is_established:
            assoc.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
