"""A DICOMweb server the test controls, in the test process, on a real socket: it reads each
STOW-RS request as a server would (multipart/related, one Part 10 file per part) and answers
what the test's `answer` says (by default: everything stored, 200 with every instance in the
Referenced SOP Sequence). It also serves an OAuth2 token endpoint at /token.

For what Orthanc cannot be made to do: per-instance failures and warnings, 409, 415, 429 with
Retry-After, 503, no answer at all, an answer that is not JSON, refused credentials.
"""

from __future__ import annotations

import io
import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
from pydicom.dataset import Dataset


@dataclass
class Part:
    content_type: str
    data: bytes

    @property
    def dataset(self) -> Dataset:
        return pydicom.dcmread(io.BytesIO(self.data))

    @property
    def uid(self) -> str:
        return str(pydicom.dcmread(io.BytesIO(self.data), stop_before_pixels=True).SOPInstanceUID)

    @property
    def transfer_syntax(self) -> str:
        return str(pydicom.dcmread(io.BytesIO(self.data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    parts: list[Part]

    @property
    def uids(self) -> list[str]:
        return [part.uid for part in self.parts]


@dataclass
class Reply:
    status: int = 200
    body: bytes | None = None  # None: the DICOM JSON of `stored`, `failed`, `warnings`
    headers: dict[str, str] = field(default_factory=dict)
    stored: list[str] | None = None  # None: every instance of the request
    failed: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> Failure Reason
    warnings: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> Warning Reason
    hang: bool = False  # read the request, never answer


def dicom_json(referenced: list[str], failed: dict[str, int], warnings: dict[str, int]) -> bytes:
    def item(uid: str, code_tag: str | None = None, code: int | None = None) -> dict:
        entry = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                 "00081155": {"vr": "UI", "Value": [uid]}}
        if code_tag:
            entry[code_tag] = {"vr": "US", "Value": [code]}
        return entry

    document: dict = {"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ"}}
    if referenced:
        document["00081199"]["Value"] = [item(u, "00081196", warnings[u]) if u in warnings else item(u)
                                         for u in referenced]
    if failed:
        document["00081198"]["Value"] = [item(u, "00081197", code) for u, code in failed.items()]
    return json.dumps(document).encode()


class StowServer:
    def __init__(self, answer: Callable[[Request], Reply] | None = None, tls: ssl.SSLContext | None = None,
                 token_lifetime_s: int = 3600) -> None:
        self.answer = answer or (lambda request: Reply())
        self.requests: list[Request] = []
        self.stored: dict[str, Part] = {}
        self.tokens_granted = 0
        self.token_requests: list[dict[str, str]] = []
        self.token_lifetime_s = token_lifetime_s
        self.token_reply: tuple[int, dict] | None = None  # the token endpoint's answer, when set
        self._released = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0") or 0)
                body = self.rfile.read(length)
                if self.path == "/token":
                    server._token(self, body)
                    return
                parts = _parts(self.headers.get("Content-Type", ""), body)
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, parts)
                with server._lock:
                    server.requests.append(request)
                reply = server.answer(request)
                if reply.hang:
                    server._released.wait(120)
                    self.close_connection = True
                    return
                stored = request.uids if reply.stored is None else reply.stored
                if 200 <= reply.status < 300 or reply.status == 409:
                    with server._lock:
                        for part in parts:
                            if part.uid in stored and part.uid not in reply.failed:
                                server.stored[part.uid] = part
                payload = reply.body if reply.body is not None else (
                    dicom_json(stored, reply.failed, reply.warnings) if reply.status in (200, 202, 409) else b"")
                self.send_response(reply.status)
                headers = {"Content-Type": "application/dicom+json", **reply.headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/dicom-web"

    @property
    def token_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/token"

    def _token(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        from urllib.parse import parse_qsl

        with self._lock:
            self.token_requests.append({"authorization": handler.headers.get("Authorization", ""),
                                        **dict(parse_qsl(body.decode()))})
            if self.token_reply is not None:
                status, document = self.token_reply
            else:
                self.tokens_granted += 1
                status, document = 200, {"access_token": f"token-{self.tokens_granted}", "token_type": "Bearer",
                                         "expires_in": self.token_lifetime_s}
        payload = json.dumps(document).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def stop(self) -> None:
        self._released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)


def _parts(content_type: str, body: bytes) -> list[Part]:
    """The parts of a multipart/related body (RFC 2046 5.1), split on its boundary."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip('"')
    if not content_type.startswith("multipart/related") or not boundary:
        return []
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(b"\r\n" + delimiter)[0:]:
        chunk = chunk.removeprefix(delimiter)
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(":", 1) for line in head.decode().split("\r\n") if ":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        parts.append(Part(headers.get("content-type", ""), data))
    return parts
