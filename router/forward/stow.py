"""The DICOMweb sender: STOW-RS (PS3.18 10.5) to a destination's `url`.

A batch goes out in requests of at most `instances_per_request` instances and `max_request_mb`
each: `POST {url}/studies`, `multipart/related; type="application/dicom"`, one part per instance
(its Part 10 file, streamed from the spool or the codec's output, never held in memory), the
transfer syntax in each part's Content-Type unless the server is seen to (or declared to) store
nothing of parts that carry it. `max_mbps` paces the bodies, shared with the other requests.

The response decides each instance, never the HTTP status alone:

    listed in the Referenced SOP Sequence       delivered (a Warning Reason is logged)
    in the Failed SOP Sequence                  its Failure Reason: 0xA7xx and unknown codes
                                                retry; 0xA9xx, 0xCxxx, 0x0122, 0x0124 dead (the
                                                destination's `statuses` overrides first);
                                                0xC122 (transfer syntax not supported) and HTTP
                                                415: sent again decompressed, as a refused
                                                presentation context is
    listed nowhere                              not delivered: retry
    401, 403                                    dead (the credentials; logged once while it lasts)
    408, 429, 5xx, no answer                    retry with backoff, at least `Retry-After`
    400, 413 for several instances              each sent again on its own

Nothing is acknowledged to a modality on the strength of a request: the job stays in the queue
until the response lists its instance.
"""

from __future__ import annotations

import email.utils
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from router import codecs, log, metrics
from router.config import Destination
from router.forward.credentials import AuthError, Credentials, credentials_for
from router.forward.dimse import classify_status
from router.forward.sender import Outgoing, Ready, ReadyCheck, Sender, Sent
from router.forward.throttle import TokenBucket, bytes_per_second
from router.request import Outcome
from router.uids import UNCOMPRESSED

READ_CHUNK = 64 * 1024  # bytes read from a file and handed to the socket at a time
MAX_RESPONSE = 16 * 1024 * 1024  # a response body larger than this is not read (not a STOW-RS answer)
REFUSAL_MEMORY_S = 600.0  # a syntax the server refused is not encoded for it for this long
MAX_RETRY_AFTER_S = 3600.0
TS_NOT_SUPPORTED = 0xC122  # PS3.18 STOW-RS Failure Reason: Referenced Transfer Syntax not supported
SPLIT_ON = (400, 413)  # a whole request refused: one instance may be the cause

# DICOM JSON (PS3.18 F.2) tags of the STOW-RS response
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

_log = log.get("stow")


def status_class(status: int | None) -> str:
    """A bounded metric label: 2xx .. 5xx, or "error" when no HTTP answer came."""
    return f"{status // 100}xx" if status and 100 <= status <= 599 else "error"


@dataclass
class Answer:
    """What a STOW-RS response says, instance by instance (SOP Instance UID -> code)."""

    referenced: dict[str, int | None] = field(default_factory=dict)  # stored, with its Warning Reason
    failed: dict[str, int | None] = field(default_factory=dict)  # not stored, with its Failure Reason


def parse_answer(body: bytes) -> Answer | None:
    """The DICOM JSON of a STOW-RS response, or None when it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(document, list) and len(document) == 1:  # some servers answer a JSON array of one
        document = document[0]
    if not isinstance(document, dict):
        return None
    answer = Answer()
    for tag, into, code_tag in ((REFERENCED_SOP_SEQUENCE, answer.referenced, WARNING_REASON),
                                (FAILED_SOP_SEQUENCE, answer.failed, FAILURE_REASON)):
        for entry in _values(document.get(tag)):
            if not isinstance(entry, dict):
                continue
            uid = _first(entry.get(REFERENCED_SOP_INSTANCE_UID))
            if isinstance(uid, str) and uid:
                code = _first(entry.get(code_tag))
                into[uid.strip()] = code if isinstance(code, int) and not isinstance(code, bool) else None
    return answer


def _values(element: object) -> list:
    if isinstance(element, dict) and isinstance(element.get("Value"), list):
        return element["Value"]
    return []


def _first(element: object) -> object:
    values = _values(element)
    return values[0] if values else None


def retry_after_s(value: str | None, now: Callable[[], float] = time.time) -> float:
    """`Retry-After` (RFC 9110 10.2.3: seconds or an HTTP date) in seconds from now; 0 if none."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    return min(max(0.0, when.timestamp() - now()), MAX_RETRY_AFTER_S)


class _Parts:
    """The multipart/related body of one request, streamed: its length known before it is sent."""

    def __init__(self, items: list[Outgoing], with_syntax: bool, bucket: TokenBucket) -> None:
        self.boundary = uuid.uuid4().hex
        self.bucket = bucket
        self.parts: list[tuple[bytes, Path, int]] = []
        for item in items:
            content_type = "application/dicom" + (f"; transfer-syntax={item.transfer_syntax_uid}"
                                                  if with_syntax else "")
            head = f"--{self.boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")
            self.parts.append((head, item.path, item.path.stat().st_size))
        self.tail = f"--{self.boundary}--\r\n".encode("ascii")
        self.length = sum(len(head) + size + 2 for head, _, size in self.parts) + len(self.tail)

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __iter__(self) -> Iterator[bytes]:
        for head, path, size in self.parts:
            yield head
            with path.open("rb") as fh:
                left = size
                while left > 0:
                    chunk = fh.read(min(READ_CHUNK, left))
                    if not chunk:
                        raise OSError(f"{path} shrank while it was sent")
                    left -= len(chunk)
                    self.bucket.take(len(chunk))
                    yield chunk
            yield b"\r\n"
        yield self.tail


@dataclass
class _Response:
    status: int | None = None  # None: no HTTP answer (`error` says why)
    error: str = ""
    reason: str = ""
    body: bytes = b""
    content_type: str = ""
    retry_after: str | None = None
    seconds: float = 0.0


class StowSender(Sender):
    """STOW-RS to one DICOMweb destination."""

    def __init__(self, name: str, destination: Callable[[], Destination],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._destination = destination
        self._clock = clock
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._client_for: tuple | None = None
        self._credentials: Credentials = Credentials()
        self._credentials_for: object = None
        self._refused: dict[tuple[str, str], float] = {}  # (SOP class, transfer syntax) -> refused at
        self._leave_out_syntax = False  # seen: the server stores nothing of parts that carry it
        self._auth_refused = ""  # the error while the destination refuses the credentials
        self.bucket = TokenBucket(0)
        self.log = log.get("stow").bind(destination=name)

    # -- what the destination takes --------------------------------------------------------------
    def _refused_now(self, sop_class_uid: str) -> frozenset[str]:
        now = self._clock()
        with self._lock:
            for key in [k for k, at in self._refused.items() if now - at > REFUSAL_MEMORY_S]:
                del self._refused[key]
            return frozenset(ts for sop, ts in self._refused if sop == sop_class_uid)

    def accepted(self, sop_class_uid: str) -> frozenset[str] | None:
        # a DICOMweb server says nothing of what it takes until it refuses: it is known to take
        # the uncompressed syntaxes once it refused another
        return frozenset(UNCOMPRESSED) if self._refused_now(sop_class_uid) else None

    def refused(self, sop_class_uid: str) -> frozenset[str]:
        return self._refused_now(sop_class_uid)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- the client ---------------------------------------------------------------------------------
    def _session(self, destination: Destination) -> tuple[httpx.Client, Credentials]:
        """The HTTP client and credentials for the rule file in force (made again when it changes)."""
        key = (destination.tls, destination.timeouts, destination.max_requests, destination.url)
        with self._lock:
            if self._client is None or self._client_for != key:
                old, self._client = self._client, _client(destination)
                self._client_for = key
                if old is not None:
                    old.close()
            if self._credentials_for != destination.auth:
                self._credentials = credentials_for(destination.auth)
                self._credentials_for = destination.auth
            self.bucket.set_rate(bytes_per_second(destination.max_mbps))
            return self._client, self._credentials

    # -- send ---------------------------------------------------------------------------------------
    def send(self, batch: list[Outgoing], ready: ReadyCheck) -> Iterator[Sent]:
        destination = self._destination()
        limit = destination.max_request_mb * 1024 * 1024
        request: list[Outgoing] = []
        size = 0
        for item in batch:
            if len(request) >= destination.instances_per_request:
                sent, go_on = self._post(destination, request, ready)
                yield from sent
                request, size = [], 0
                if not go_on:
                    return  # the rest of the batch goes back to the queue
            go = ready(item)
            if go is Ready.SKIP:
                continue
            if go is Ready.STOP:
                break
            try:
                item_size = item.path.stat().st_size
            except OSError as exc:
                yield Sent(item, Outcome.RETRY, f"cannot read the file to send: {exc.strerror}")
                continue
            if request and size + item_size > limit:
                sent, go_on = self._post(destination, request, ready)
                yield from sent
                request, size = [], 0
                if not go_on:
                    return
            request.append(item)
            size += item_size
        if request:
            sent, _ = self._post(destination, request, ready)
            yield from sent

    def _post(self, destination: Destination, items: list[Outgoing], ready: ReadyCheck,
              decompressed: bool = False) -> tuple[list[Sent], bool]:
        """One request, and what it says of each item; False: send nothing more of this batch."""
        client, credentials = self._session(destination)
        with_syntax = destination.part_transfer_syntax is True or (
            destination.part_transfer_syntax == "auto" and not self._leave_out_syntax)
        try:
            response = self._request(destination, client, credentials, items, with_syntax)
        except AuthError as exc:
            outcome = Outcome.DEAD if exc.permanent else Outcome.RETRY
            if exc.permanent:
                self._auth_failed(str(exc))
            return [Sent(item, outcome, str(exc)) for item in items], False
        if response.status in (401, 403):
            why = (f"HTTP {response.status} {response.reason} from {destination.url}: the destination "
                   "refused the credentials (auth)")
            self._auth_failed(why)
            return [Sent(item, Outcome.DEAD, why, status=str(response.status)) for item in items], False
        self._auth_accepted()
        if response.status is None:
            return [Sent(item, Outcome.RETRY, f"STOW-RS request failed: {response.error}",
                         seconds=response.seconds) for item in items], False
        status = response.status
        share = response.seconds / len(items)
        if status == 415:
            return self._refused_syntax(destination, items, ready, decompressed,
                                        f"HTTP 415 {response.reason}"), True
        if status in (408, 429) or status >= 500:
            wait = retry_after_s(response.retry_after)
            why = f"HTTP {status} {response.reason} from {destination.url}" + (
                f" (Retry-After {wait:.0f} s)" if wait else "")
            return [Sent(item, Outcome.RETRY, why, seconds=share, retry_after_s=wait) for item in items], False
        answer = parse_answer(response.body) if response.body else None
        if answer is None or (not answer.referenced and not answer.failed and status not in (200, 202, 409)):
            if status in SPLIT_ON and len(items) > 1:
                self.log.warning("stow_request_refused", status=status, instances=len(items),
                                 action="each instance sent again on its own")
                sent: list[Sent] = []
                for item in items:
                    sent.extend(self._post(destination, [item], ready, decompressed)[0])
                return sent, True
            what = "no DICOM JSON" if answer is None else "no instance"
            why = f"HTTP {status} {response.reason} from {destination.url} with {what} in its answer" + (
                f" ({response.content_type})" if answer is None and response.content_type else "")
            return [Sent(item, Outcome.RETRY, why, seconds=share) for item in items], status < 300
        if (status == 200 and with_syntax and not answer.referenced and not answer.failed
                and destination.part_transfer_syntax == "auto" and not self._leave_out_syntax):
            # a server that stores nothing of parts carrying transfer-syntax= (and says it did)
            self._leave_out_syntax = True
            self.log.warning("stow_part_transfer_syntax_ignored", url=destination.url,
                             action="parts sent without the transfer-syntax parameter from now on")
            return self._post(destination, items, ready, decompressed)
        return self._decide(destination, items, ready, status, response, answer, decompressed), True

    def _decide(self, destination: Destination, items: list[Outgoing], ready: ReadyCheck, status: int,
                response: _Response, answer: Answer, decompressed: bool) -> list[Sent]:
        share = response.seconds / len(items)
        sent: list[Sent] = []
        refused: list[Outgoing] = []
        for item in items:
            uid = _sent_uid(item)
            if uid in answer.referenced:
                warning = answer.referenced[uid]
                if warning is not None:
                    item.log.warning("stored_with_warning", status=f"HTTP {status}", reason=f"0x{warning:04X}")
                size = item.path.stat().st_size if item.path.exists() else 0
                sent.append(Sent(item, Outcome.DELIVERED, size=size, seconds=share,
                                 status=f"HTTP {status}" + (f" warning 0x{warning:04X}" if warning is not None else "")))
                continue
            if uid not in answer.failed:
                hint = ("; a server that ignores parts with transfer-syntax= needs part_transfer_syntax = false"
                        if not answer.referenced and not answer.failed and destination.part_transfer_syntax is True
                        else "")
                sent.append(Sent(item, Outcome.RETRY, f"not listed in the STOW-RS response (HTTP {status}){hint}",
                                 seconds=share))
                continue
            code = answer.failed[uid]
            if code is None:
                sent.append(Sent(item, Outcome.RETRY, f"failed with no Failure Reason (HTTP {status})", seconds=share))
                continue
            verdict = classify_status(code, destination.status_ranges)
            if code == TS_NOT_SUPPORTED and not any(low <= code <= high for low, high, _ in destination.status_ranges):
                refused.append(item)
                continue
            why = f"Failure Reason 0x{code:04X} (HTTP {status})"
            if verdict == "success":
                sent.append(Sent(item, Outcome.DELIVERED, size=item.path.stat().st_size, seconds=share,
                                 status=f"HTTP {status} 0x{code:04X}"))
            elif verdict == "retry":
                sent.append(Sent(item, Outcome.RETRY, why, seconds=share))
            else:
                sent.append(Sent(item, Outcome.DEAD, f"{why}, a permanent failure", seconds=share))
        if refused:
            sent.extend(self._refused_syntax(destination, refused, ready, decompressed,
                                             f"Failure Reason 0x{TS_NOT_SUPPORTED:04X}"))
        return sent

    def _refused_syntax(self, destination: Destination, items: list[Outgoing], ready: ReadyCheck,
                        decompressed: bool, why: str) -> list[Sent]:
        """The server does not take these items' syntax: each goes again decompressed (the
        forwarder falls back), once; an item already uncompressed is a dead letter."""
        sent: list[Sent] = []
        again: list[Outgoing] = []
        names = tuple(codecs.get(ts).name for ts in UNCOMPRESSED)
        now = self._clock()
        for item in items:
            if item.transfer_syntax_uid in UNCOMPRESSED or decompressed:
                sent.append(Sent(item, Outcome.DEAD, f"destination does not take transfer syntax "
                                 f"{item.transfer_syntax_uid} ({why})"))
                continue
            with self._lock:
                self._refused[(item.job.instance.sop_class_uid, item.transfer_syntax_uid)] = now
            if ready(item, refused=names) is Ready.SEND:
                again.append(item)
        if again:
            sent.extend(self._post(destination, again, ready, decompressed=True)[0])
        return sent

    def _request(self, destination: Destination, client: httpx.Client, credentials: Credentials,
                 items: list[Outgoing], with_syntax: bool) -> _Response:
        """POST the items; a 401 with a token that can be renewed is tried once more."""
        for attempt in (1, 2):
            headers = {"Accept": "application/dicom+json"}
            authorization = credentials.header(client)
            if authorization:
                headers["Authorization"] = authorization
            response = self._post_once(destination, client, items, with_syntax, headers)
            if response.status == 401 and attempt == 1 and credentials.refused():
                continue
            return response
        raise AssertionError("unreachable")

    def _post_once(self, destination: Destination, client: httpx.Client, items: list[Outgoing],
                   with_syntax: bool, headers: dict[str, str]) -> _Response:
        started = time.monotonic()
        try:
            body = _Parts(items, with_syntax, self.bucket)
        except OSError as exc:
            return _Response(error=f"cannot read a file to send: {exc.strerror or exc}")
        headers.update({"Content-Type": body.content_type, "Content-Length": str(body.length)})
        metrics.STOW_REQUEST_INSTANCES.labels(destination=self.name).observe(len(items))
        answer = _Response()
        try:
            with client.stream("POST", destination.url + "/studies", content=iter(body), headers=headers) as rsp:
                answer.status, answer.reason = rsp.status_code, _printable(rsp.reason_phrase)
                answer.content_type = _printable(rsp.headers.get("content-type", ""))[:80]
                answer.retry_after = rsp.headers.get("retry-after")
                chunks, size = [], 0
                for chunk in rsp.iter_bytes():
                    size += len(chunk)
                    if size > MAX_RESPONSE:
                        chunks = []
                        break
                    chunks.append(chunk)
                answer.body = b"".join(chunks)
        except httpx.TimeoutException as exc:
            answer = _Response(error=f"no answer within the timeout ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            answer = _Response(error=f"{type(exc).__name__}: {_printable(str(exc))[:200]}")
        except OSError as exc:  # a file that could not be read while streaming
            answer = _Response(error=f"cannot read a file to send: {exc.strerror or exc}")
        answer.seconds = time.monotonic() - started
        label = status_class(answer.status)
        metrics.STOW_REQUESTS.labels(destination=self.name, status=label).inc()
        metrics.STOW_REQUEST_SECONDS.labels(destination=self.name, status=label).observe(answer.seconds)
        metrics.STOW_REQUEST_BYTES.labels(destination=self.name).inc(body.length)
        return answer

    # -- credentials refused: logged once while it lasts ----------------------------------------
    def _auth_failed(self, why: str) -> None:
        with self._lock:
            first, self._auth_refused = not self._auth_refused, why
        if first:
            self.log.error("destination_refused_credentials", error=why,
                           action="jobs are dead letters until the credentials work; "
                                  "fix them, then `dicom-router queue retry`")

    def _auth_accepted(self) -> None:
        with self._lock:
            was, self._auth_refused = self._auth_refused, ""
        if was:
            self.log.info("destination_accepted_credentials")


def _sent_uid(item: Outgoing) -> str:
    """The SOP Instance UID the file that went out carries."""
    if item.transcoded is not None and getattr(item.transcoded, "sop_instance_uid", ""):
        return item.transcoded.sop_instance_uid
    return item.job.instance.sop_instance_uid


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _client(destination: Destination) -> httpx.Client:
    timeouts = destination.timeouts
    verify: ssl.SSLContext | bool = True
    if destination.url.startswith("https://"):
        tls = destination.tls
        verify = ssl.create_default_context(cafile=str(tls.ca) if tls is not None and tls.ca else None)
        verify.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls is not None and tls.cert is not None:
            verify.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    return httpx.Client(
        verify=verify,
        timeout=httpx.Timeout(connect=timeouts.connect_s, read=timeouts.dimse_s, write=timeouts.network_s,
                              pool=timeouts.network_s),
        limits=httpx.Limits(max_connections=destination.max_requests,
                            max_keepalive_connections=destination.max_requests),
        follow_redirects=False,
        trust_env=False,  # no proxy, netrc or certificate from the environment: the rule file says all
    )
