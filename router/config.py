"""The configuration contract: `router.toml` and one rule file per destination.

Pydantic models validate at the edge; the rest of the router works with the
validated objects. Every error names the file, the rule and the field.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.codecs import registry
from router.rules import COMPARISON, CONTEXT_KEYS, PRIORITIES, SKIP
from router.schedule import Schedule, parse_duration, parse_timezone, parse_window, schedule_for


class ConfigError(Exception):
    """A configuration or rule file is invalid; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def field_error(model: BaseModel, field: str, message: str, kind: str) -> ValidationError:
    """An error for a model validator to raise: pydantic files it under `field` of the model."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    error = PydanticCustomError(kind, "{message}", {"message": message})
    return ValidationError.from_exception_data(type(model).__name__, [InitErrorDetails(
        type=error, loc=(field,), input=getattr(model, field, None))])


def is_valid_ae_title(value: str) -> bool:
    """1 to 16 printable characters, no backslash (PS3.5 AE VR)."""
    return 0 < len(value) <= 16 and "\\" not in value and value.isprintable()


def _ae_title(value: str) -> str:
    if not is_valid_ae_title(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


AeTitle = Annotated[str, AfterValidator(_ae_title)]  # an AE title, checked where the configuration loads


def _parsed(parse: Callable[[str], object]) -> AfterValidator:
    """A check that `parse` takes the text, which is kept as written."""

    def check(value: str) -> str:
        parse(value)
        return value

    return AfterValidator(check)


Duration = Annotated[str, _parsed(parse_duration)]  # "30m", "14d" (router.schedule)
Timezone = Annotated[str, _parsed(parse_timezone)]  # an IANA time zone name


class AllowedCaller(_Strict):
    ae_title: str
    hosts: list[str] = Field(default_factory=list, description="source addresses or networks; empty: any")

    @field_validator("hosts")
    @classmethod
    def _networks(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            ipaddress.ip_network(host, strict=False)
        return hosts


class Tls(_Strict):
    """DICOM TLS (PS3.15 B.1): our certificate and key, the CA that signs the peer's, and whether
    the peer must present one. Paths are relative to router.toml."""

    # `cert_file`, `key_file`, `ca_file` are the same fields, as a DICOMweb destination writes them
    cert: Path | None = Field(None, validation_alias=AliasChoices("cert", "cert_file"))
    key: Path | None = Field(None, validation_alias=AliasChoices("key", "key_file"))
    ca: Path | None = Field(None, validation_alias=AliasChoices("ca", "ca_file"))
    require_peer_cert: bool = True
    verify_hostname: bool = False  # outbound: check the destination's certificate names its host

    def resolved(self, base: Path) -> Tls:
        return self.model_copy(update={
            k: (base / v).resolve() for k in ("cert", "key", "ca") if (v := getattr(self, k)) is not None
        })


class Listen(_Strict):
    ae_title: AeTitle = "ROUTER"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allowed_callers: list[str | AllowedCaller] = Field(default_factory=list)
    require_called_ae_title: bool = True
    max_associations: int = Field(32, ge=1)
    max_pdu: int = Field(1048576, ge=0, description="largest PDU accepted, bytes; 0: unlimited")
    acse_timeout_s: float = Field(30, gt=0)
    # a caller that has not completed its A-ASSOCIATE-RQ (or one PDU) within this is disconnected
    request_timeout_s: float = Field(10, gt=0)
    pdu_timeout_s: float = Field(30, gt=0)
    tls_handshake_timeout_s: float = Field(10, gt=0)
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    max_instance_mb: int = Field(0, ge=0, description="largest instance accepted; 0: no limit")
    processes: int = Field(0, ge=0, le=64, description="receiving processes sharing the port; 0: one per core")
    tls: Tls | None = None
    # private and unknown storage SOP classes are accepted and forwarded (as Orthanc's
    # UnknownSopClassAccepted); false: only the storage classes pynetdicom knows
    accept_unknown_sop_classes: bool = True
    # the metrics' `caller` label: allowed_callers and [commitment] modalities keep their AE title, and so do
    # the first this many other titles since the start; every other caller is counted as "other"
    max_caller_labels: int = Field(20, ge=0, description="calling AE titles named in the metrics besides the "
                                   "configured ones; the rest are counted as \"other\"")



class Storage(_Strict):
    spool_dir: Path = Path("/var/lib/dicom-router/spool")
    min_free_mb: int = Field(1024, ge=0)


class Metrics(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(9110, ge=0, le=65535, description="0: no metrics endpoint")
    max_connections: int = Field(32, ge=1, description="HTTP connections served at once; more wait or are closed")
    idle_timeout_s: float = Field(10, gt=0, description="an HTTP connection idle this long is closed")
    # the status page's requests (/ and /trace) once they arrived: their own budget, never max_connections'
    page_connections: int = Field(16, ge=1, description="status page requests held at once (waiting or "
                                  "answered); one more is answered 503 a second later")


class RulesDir(_Strict):
    dir: Path = Path("rules")


class Transcode(_Strict):
    workers: int = Field(0, ge=0, description="codec worker processes; 0: one per core")
    timeout_s: float = Field(60, gt=0, description="deadline of one transcode, plus timeout_s_per_mb")
    timeout_s_per_mb: float = Field(2, ge=0, description="more deadline per MB of the received instance")
    max_decoded_mb: int = Field(4096, ge=1, description="largest decoded pixel data a transcode may produce")
    plugins: list[str] = Field(
        default_factory=list, description="codec plugin modules or .py files that register extra syntaxes"
    )


class Queue(_Strict):
    """Where the queue lives: SQLite in the spool (one node), or PostgreSQL shared by several
    nodes that also share the spool directory."""

    history_days: float = Field(7, gt=0, description="how long each job's outcome is kept after it finished")
    url: str | None = Field(None, description="postgresql://user@host/db; absent: SQLite in the spool, one node")
    node: str = Field(default_factory=lambda: socket.gethostname(),
                      description="this node's name, unique in the cluster; default: the host name")
    lease_s: float = Field(30, ge=2, le=3600,
                           description="a claimed job whose lease was not renewed for this long is taken over")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (absent: SQLite in the spool)")
        return value

    @field_validator("node")
    @classmethod
    def _check_node(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
            raise ValueError(f"{value!r}: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value


class ReplyAddress(_Strict):
    """Where a modality listens for the storage commitment reports the router sends on a new
    association (the modality's own storage commitment SCU port)."""

    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: AeTitle | None = Field(None, description="the modality's AE title there; default: its calling AE title")
    tls: Tls | None = Field(None, description="DICOM TLS to the modality: ca verifies it, cert/key are the router's")



class Commitment(_Strict):
    """Storage commitment (Push Model) offered to modalities: what "committed" means."""

    # delivered: every destination the rules send it to stored it; relay: and each destination
    # with a storage commitment SCP ([destination] commitment) committed it; spooled: durable in
    # the router; off: the SOP class is not offered
    mode: Literal["delivered", "relay", "spooled", "off"] = "delivered"
    modalities: dict[AeTitle, ReplyAddress] = Field(
        default_factory=dict, description="reply addresses by the modality's calling AE title")
    timeout_s: float = Field(3600, gt=0, description="a request still undecided this long after it came is "
                                                     "reported, its undelivered instances as failed")
    report_retry_s: float = Field(5, gt=0, description="first wait before a report that could not be delivered is "
                                                       "sent again; doubles each time, up to 10 minutes")
    relay_retry_s: float = Field(5, gt=0, description="relay: first wait before an N-ACTION a destination did not "
                                                      "take is sent again; doubles each time, up to 10 minutes")
    relay_reask_s: float = Field(300, gt=0, description="relay: a destination that took the N-ACTION but sent no "
                                                        "report within this is asked again")

    def resolved(self, base: Path) -> Commitment:
        """The reply addresses' TLS files relative to `base` (router.toml's directory)."""
        return self.model_copy(update={"modalities": {
            title: address if address.tls is None else address.model_copy(update={"tls": address.tls.resolved(base)})
            for title, address in self.modalities.items()
        }})


_AUDIT_URL = re.compile(r"^(tls|tcp|udp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


class Audit(_Strict):
    """IHE ATNA audit messages (DICOM PS3.15 A.5) to the site's audit record repository over
    syslog (router.audit); no `url`: none are made."""

    url: str | None = None  # tls://host:6514 (RFC 5425), tcp://host:port, udp://host:514 (RFC 5426)
    tls: Tls | None = None  # for tls://: ca verifies the repository, cert/key are the router's (mutual TLS)
    source_id: str = ""  # the Audit Source ID; default: the node name (the host name)
    max_spool_mb: int = Field(64, ge=1, description="records waiting for the repository, at most; past it new "
                                                    "records are dropped and counted")
    retry_s: float = Field(2, gt=0, description="first wait before the repository is tried again; doubles up to "
                                                "a minute")
    confirm_s: float = Field(2, gt=0, description="a record sent over TCP or TLS is kept until the connection "
                                                  "has stayed up this long after it (sent again otherwise)")

    @field_validator("url")
    @classmethod
    def _syslog_url(cls, url: str | None) -> str | None:
        if url is not None and not _AUDIT_URL.match(url):
            raise ValueError(f"{url!r} is not tls://host:port, tcp://host:port or udp://host:port")
        return url

    @property
    def transport(self) -> str:
        return (self.url or "").split("://", 1)[0]

    @property
    def address(self) -> tuple[str, int]:
        found = _AUDIT_URL.match(self.url or "")
        if found is None:
            raise ValueError("no [audit] url")
        return found[2].strip("[]"), int(found[3])


class RouterConfig(_Strict):
    listen: Listen = Field(default_factory=Listen)
    storage: Storage = Field(default_factory=Storage)
    metrics: Metrics = Field(default_factory=Metrics)
    rules: RulesDir = Field(default_factory=RulesDir)
    transcode: Transcode = Field(default_factory=Transcode)
    queue: Queue = Field(default_factory=Queue)
    commitment: Commitment = Field(default_factory=Commitment)
    audit: Audit = Field(default_factory=Audit)


class Retry(_Strict):
    max_attempts: int = Field(20, ge=1)
    backoff_s: float = Field(5, ge=0)
    max_backoff_s: float = Field(600, ge=0)


class Timeouts(_Strict):
    connect_s: float = Field(10, gt=0)
    acse_s: float = Field(30, gt=0)
    dimse_s: float = Field(120, gt=0)
    network_s: float = Field(120, gt=0)


StatusOutcome = Literal["success", "retry", "permanent"]
StatusRange = Annotated[str, _parsed(lambda text: parse_status_range(text))]  # "0xA700", "A700-A7FF"


class CommitmentScp(_Strict):
    """Where a destination's own storage commitment SCP listens, for `[commitment] mode =
    "relay"`; each field left out is the destination's own (its tls included)."""

    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    ae_title: AeTitle | None = None
    tls: Tls | None = None
    keep_open_s: float = Field(5, ge=0, le=600, description="the N-ACTION's association stays open this long for "
                                                            "a report on it; 0: released at once")



def _web_root(value: str) -> str:
    """A DICOMweb root: http(s)://host[:port][/path], no credentials, query or fragment."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{value!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not go in the URL: use auth (their files are never printed)")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: the DICOMweb root takes no query or fragment")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return value.rstrip("/")


WebRoot = Annotated[str, AfterValidator(_web_root)]


class BasicAuth(_Strict):
    """HTTP Basic: the password is read from its file (re-read when the file changes)."""

    username: str = Field(min_length=1)
    password_file: Path

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value or not value.isprintable():
            raise ValueError("an HTTP Basic user name has no colon and no control character")
        return value

    def files(self) -> dict[str, Path]:
        return {"password_file": self.password_file}


class BearerAuth(_Strict):
    """A bearer token read from its file, re-read when the file changes."""

    token_file: Path

    def files(self) -> dict[str, Path]:
        return {"token_file": self.token_file}


class OAuth2Auth(_Strict):
    """OAuth2 client credentials (RFC 6749 4.4): a token from `token_url`, cached until it expires."""

    token_url: WebRoot
    client_id: str = Field(min_length=1)
    client_secret_file: Path
    scope: str = ""

    def files(self) -> dict[str, Path]:
        return {"client_secret_file": self.client_secret_file}


Auth = BasicAuth | BearerAuth | OAuth2Auth

# fields that belong to one protocol only: set for the other, the rule file is refused
DIMSE_ONLY = ("ae_title", "host", "port", "calling_ae_title", "forward_calling_ae_title", "max_associations",
              "max_pdu")
DICOMWEB_ONLY = ("auth", "max_requests", "instances_per_request", "max_request_mb", "part_transfer_syntax")


class Destination(_Strict):
    # DIMSE: the destination's AE title, host and port; DICOMweb: its root URL (STOW-RS)
    ae_title: AeTitle | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: WebRoot | None = None
    auth: Auth | None = None
    max_requests: int = Field(2, ge=1, le=16, description="DICOMweb: parallel STOW-RS requests at most")
    instances_per_request: int = Field(16, ge=1, le=1000, description="DICOMweb: instances in one request at most")
    max_request_mb: float = Field(256, gt=0, description="DICOMweb: a request closes before it grows past "
                                  "this (one instance larger than this goes alone)")
    # DICOMweb: the transfer-syntax parameter in each part's Content-Type; "auto": sent until the
    # server is seen to store nothing of a request that carries it (then left out: each part's
    # file meta says its transfer syntax anyway)
    part_transfer_syntax: bool | Literal["auto"] = "auto"
    calling_ae_title: AeTitle | None = None
    forward_calling_ae_title: bool = False  # associate with the calling AE title of the modality that sent it
    max_associations: int = Field(1, ge=1, le=16)
    batch_size: int = Field(32, ge=1, le=1000)
    keep_sop_instance_uid: bool = False
    max_pdu: int = Field(0, ge=0)
    retry: Retry = Field(default_factory=Retry)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    tls: Tls | None = None
    statuses: dict[StatusRange, StatusOutcome] = Field(
        default_factory=dict,
        description="C-STORE status (hex, e.g. '0xA700' or a range 'A700-A7FF') to outcome; overrides the defaults",
    )
    # when and how fast (router.schedule): windows in which sending may happen (none: always),
    # read in `timezone` (none: the machine's local time)
    schedule: list[str] = Field(default_factory=list)
    timezone: Timezone | None = None
    max_mbps: float = Field(0, ge=0, description="cap in megabits per second, all associations together; 0: none")
    delay: Duration = Field("0s", description="hold each instance this long after receipt")
    study_stable: Duration = Field("0s", description="send a study once none of its instances arrived for this long")
    # a study that keeps receiving goes all the same this long after its first instance still to go
    study_stable_max: Duration | None = Field(None, description="with study_stable: send a study this long after its "
                                         "first instance still to go, stable or not; default 4 x study_stable, "
                                         "at least 1h")
    # relay: the destination has a storage commitment SCP (true: at its own address), asked
    # after delivery; false: its C-STORE success is the commitment (as in delivered mode)
    commitment: bool | CommitmentScp = False


    @field_validator("schedule")
    @classmethod
    def _windows(cls, windows: list[str]) -> list[str]:
        for window in windows:
            parse_window(window)
        return windows

    @model_validator(mode="after")
    def _one_protocol(self) -> Destination:
        def refused(field: str, message: str) -> ValidationError:
            return field_error(self, field, message, "protocol")

        if self.url is not None:
            for field in DIMSE_ONLY:
                if field in self.model_fields_set:
                    raise refused(field, f"{field} is for a DIMSE destination; this one is DICOMweb (url)"
                                  + (": use max_requests" if field == "max_associations" else ""))
            if self.tls is not None and {"require_peer_cert", "verify_hostname"} & self.tls.model_fields_set:
                raise refused("tls", "a DICOMweb destination's certificate and host name are always verified: "
                              "give its CA with ca_file")
            if self.commitment is not False:
                raise refused("commitment", "a DICOMweb destination has no storage commitment SCP: "
                              "with [commitment] mode = \"relay\", a STOW-RS response that lists an "
                              "instance is its commitment")
            return self
        for field in DICOMWEB_ONLY:
            if field in self.model_fields_set:
                raise refused(field, f"{field} is for a DICOMweb destination (url); this one is DIMSE")
        for field in ("ae_title", "host", "port"):
            if getattr(self, field) is None:
                raise refused(field, f"{field} is required (or url, for a DICOMweb destination)")
        return self

    @property
    def protocol(self) -> str:
        """"dicomweb" (STOW-RS to `url`) or "dimse" (C-STORE to ae_title@host:port)."""
        return "dicomweb" if self.url is not None else "dimse"

    @property
    def address(self) -> str:
        """Where it is, as the logs and the status page show it (never a secret)."""
        return self.url if self.url is not None else f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def ceiling(self) -> int:
        """Sender threads at most: parallel associations (DIMSE) or requests (DICOMweb)."""
        return self.max_requests if self.url is not None else self.max_associations

    @property
    def claim_size(self) -> int:
        """Jobs claimed at a time: a batch, and for DICOMweb at least one full request."""
        return max(self.batch_size, self.instances_per_request) if self.url is not None else self.batch_size

    @model_validator(mode="after")
    def _stable_max_after_stable(self) -> Destination:
        if self.study_stable_max is not None and self.study_stable_s > 0 \
                and parse_duration(self.study_stable_max) < self.study_stable_s:
            raise field_error(self, "study_stable_max", f"study_stable_max ({self.study_stable_max}) must be at "
                              f"least study_stable ({self.study_stable})", "duration")
        return self

    @property
    def delay_s(self) -> float:
        return parse_duration(self.delay)

    @property
    def study_stable_s(self) -> float:
        return parse_duration(self.study_stable)

    @property
    def study_stable_max_s(self) -> float:
        """How long after its first instance still to go a study waits at most (0 without
        study_stable): `study_stable_max`, by default 4 x study_stable and at least an hour."""
        if self.study_stable_s <= 0:
            return 0.0
        if self.study_stable_max is not None:
            return parse_duration(self.study_stable_max)
        return max(4 * self.study_stable_s, 3600.0)  # generous: a safety net, not a pace

    @property
    def sending_schedule(self) -> Schedule:
        return schedule_for(tuple(self.schedule), self.timezone)

    @property
    def commitment_scp(self) -> CommitmentScp | None:
        """The destination's storage commitment SCP with every field filled in, or None."""
        if self.commitment is False:
            return None
        scp = self.commitment if isinstance(self.commitment, CommitmentScp) else CommitmentScp()
        return scp.model_copy(update={"host": scp.host or self.host, "port": scp.port or self.port,
                                      "ae_title": scp.ae_title or self.ae_title,
                                      "tls": scp.tls if scp.tls is not None else self.tls})

    @functools.cached_property
    def status_ranges(self) -> list[tuple[int, int, str]]:
        """`statuses` as (low, high, outcome), parsed once where the rule file loads."""
        return [(*parse_status_range(key), outcome) for key, outcome in self.statuses.items()]

    def model_post_init(self, context: Any) -> None:  # noqa: ANN401 - pydantic's signature
        self.status_ranges  # noqa: B018 - parsed now, not at the first response


def parse_status_range(text: str) -> tuple[int, int]:
    """'0xA700' -> (0xA700, 0xA700); 'A700-A7FF' -> (0xA700, 0xA7FF)."""
    parts = [p.strip() for p in text.split("-")]
    if len(parts) not in (1, 2):
        raise ValueError(f"status {text!r}: write one code like 0xA700 or a range like 0xA700-0xA7FF")
    try:
        low, high = (int(p, 16) for p in (parts * 2)[:2])
    except ValueError:
        raise ValueError(f"status {text!r} is not hexadecimal (write 0xA700 or A700-A7FF)") from None
    if not (0 <= low <= high <= 0xFFFF):
        raise ValueError(f"status range {text!r} is empty or outside 0x0000-0xFFFF")
    return low, high


MatchValue = str | int | float | list[str | int | float]


def _rule_syntax(value: str) -> str:
    if value != SKIP:
        _known_syntax(value)
    return value


def _fallback_syntax(value: str) -> str:
    if value == SKIP:
        raise ValueError("fallback cannot be 'skip': an image is never dropped because a codec cannot carry it")
    _known_syntax(value)
    return value


class Deidentify(_Strict):
    """A rule's `deidentify`: DICOM PS3.15 Annex E for what leaves (router.codecs.deidentify)."""

    profile: Literal["basic"] = "basic"
    options: list[str] = Field(default_factory=list)
    secret_file: Path
    burned_in: Literal["refuse", "allow"] = "refuse"
    # with retain-safe-private: { "PRIVATE CREATOR" = ["gggg,xxee", ...] }, the private attributes
    # known safe at this site (PS3.15 E.3.10)
    safe_private: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: list[str]) -> list[str]:
        from router.codecs.deidentify import check_options

        check_options(options)
        return options

    @model_validator(mode="after")
    def _safe_private_listed(self) -> Deidentify:
        from router.codecs.deidentify import parse_safe_private

        try:
            parse_safe_private(self.safe_private)
        except ValueError as exc:
            raise field_error(self, "safe_private", str(exc), "deidentify") from None
        if ("retain-safe-private" in self.options) != bool(self.safe_private):
            raise field_error(self, "safe_private", "retain-safe-private keeps the private attributes safe_private "
                              "lists, as { \"PRIVATE CREATOR\" = [\"gggg,xxee\", ...] }: give both or neither",
                              "deidentify")
        return self


class Rule(_Strict):
    name: str = ""
    match: dict[str, MatchValue] = Field(default_factory=dict)
    syntax: Annotated[str, AfterValidator(_rule_syntax)]
    # which syntax takes which, and their bounds: router.codecs.registry (checked below)
    quality: int | None = None
    near: int | None = None
    ratio: float | None = None
    fallback: Annotated[str, AfterValidator(_fallback_syntax)] | None = None
    verify: bool | None = None
    max_error: int | None = Field(None, ge=0)
    # high overtakes the destination's backlog (as does a C-STORE sent with Priority HIGH)
    priority: Literal[PRIORITIES] = "normal"
    # header rules (router.codecs.header): what leaves for this destination, the spool never changed
    set: dict[str, MatchValue] = Field(default_factory=dict)
    template: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)
    map: dict[str, Path] = Field(default_factory=dict)
    on_unmapped: Literal["keep", "dead"] = "keep"
    deidentify: Deidentify | None = None

    @model_validator(mode="after")
    def _header_rules(self) -> Rule:
        if not (self.set or self.template or self.remove or self.map):
            return self
        from router.codecs import header

        tables = {"set": self.set, "template": self.template, "map": self.map, "remove": self.remove}
        field = "set"
        try:
            for field, table in tables.items():  # each alone first: the error names its field
                header.check_rule(**{name: (table if name == field else type(other)())
                                     for name, other in tables.items()})
            field = next(name for name in reversed(tables) if tables[name])
            header.check_rule(**tables)  # one action per attribute
        except ValueError as exc:
            raise field_error(self, field, str(exc), "header") from None
        return self

    @functools.cached_property
    def header(self) -> tuple[tuple[str, ...], ...]:
        """The header actions, as a request carries them (made once per rule)."""
        if not (self.set or self.template or self.remove or self.map or self.deidentify):
            return ()
        from router.codecs import header

        return header.actions(self.set, self.template, self.map, self.remove, self.on_unmapped, self.deidentify)

    @field_validator("match")
    @classmethod
    def _keys_and_values(cls, match: dict[str, Any]) -> dict[str, Any]:
        from pydicom.datadict import (
            keyword_dict,  # pydicom loads numpy: only when a rule file is read
        )

        for key, value in match.items():
            if key not in CONTEXT_KEYS and key not in keyword_dict:
                hint = _close_keyword(key)
                raise ValueError(
                    f"match key {key!r} is neither a DICOM keyword nor one of {', '.join(CONTEXT_KEYS)}"
                    + (f"; did you mean {hint!r}?" if hint else "")
                )
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item.strip()[:1] in "<>!" and item.strip():
                    if not COMPARISON.match(item):
                        raise ValueError(
                            f"match {key} = {item!r}: a comparison is an operator and a number, e.g. '>12'"
                        )
        return match

    @model_validator(mode="after")
    def _parameters_fit_syntax(self) -> Rule:
        if self.syntax == SKIP:
            return self
        from router.request import Params

        def refuse(field: str, message: str) -> ValidationError:
            return field_error(self, field, message, "parameter")

        syntax = registry.get(self.syntax)
        try:
            registry.check_params(syntax, Params(quality=self.quality, near=self.near, ratio=self.ratio))
        except registry.ParameterError as exc:
            raise refuse(exc.field, str(exc)) from None
        if self.max_error is not None and not syntax.lossy:
            raise refuse("max_error", f"'max_error' applies to lossy syntaxes; {syntax.name!r} is lossless "
                                      "(verify compares exactly)")
        return self


def _known_syntax(value: str) -> None:
    try:
        registry.get(value)
    except KeyError as exc:
        raise ValueError(exc.args[0] if exc.args else f"unknown syntax {value!r}") from None


def _close_keyword(key: str) -> str | None:
    import difflib

    from pydicom.datadict import keyword_dict

    found = difflib.get_close_matches(key, list(keyword_dict) + list(CONTEXT_KEYS), n=1)
    return found[0] if found else None


class RuleFile(_Strict):
    destination: Destination
    rule: list[Rule] = Field(min_length=1)


class DestinationRules(BaseModel):
    """A validated rule file: the destination and its ordered rules."""

    model_config = ConfigDict(frozen=True)
    name: str
    path: Path
    destination: Destination
    rules: list[Rule]
    tag: str = ""  # digest of the rule file: a decision taken under the same tag is still valid


class Loaded(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: Path
    router: RouterConfig
    destinations: list[DestinationRules]

    @property
    def spool_dir(self) -> Path:
        return self.router.storage.spool_dir

    def destination(self, name: str) -> DestinationRules:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _describe(path: Path, exc: ValidationError, data: dict[str, Any] | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if p != "[key]"]  # a table's key names itself: statuses.0xZZ
        where = ".".join(str(p) for p in loc) or "(file)"
        if data is not None and len(loc) >= 2 and loc[0] == "rule" and isinstance(loc[1], int):
            index = loc[1]
            rules = data.get("rule") or []
            name = rules[index].get("name", "") if index < len(rules) and isinstance(rules[index], dict) else ""
            field = ".".join(str(p) for p in loc[2:]) or "(rule)"
            where = f"rule {index + 1}" + (f" ({name!r})" if name else "") + f", field {field}"
        else:
            where = f"field {where}"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field (not part of the configuration contract)"
        lines.append(f"{path}: {where}: {message}")
    return "\n".join(lines)


def _tls_files(tls: Tls | None) -> list[tuple[str, Path]]:
    if tls is None:
        return []
    return [(k, v) for k in ("cert", "key", "ca") if (v := getattr(tls, k)) is not None and not v.is_file()]


def _unreadable(path: Path) -> str:
    """Why the secret file at `path` cannot be read ("" when it can); never its content."""
    try:
        with path.open("rb"):
            return ""
    except FileNotFoundError:
        return f"file not found: {path}"
    except IsADirectoryError:
        return f"a directory, not a file: {path}"
    except OSError as exc:
        return f"cannot be read: {path} ({exc.strerror})"


def load_rule_file(path: Path) -> DestinationRules:
    data = _read_toml(path)
    tag = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    try:
        parsed = RuleFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc, data)) from None
    destination = parsed.destination
    if destination.tls is not None:
        destination = destination.model_copy(update={"tls": destination.tls.resolved(path.parent)})
        missing = [f"{path}: field destination.tls.{k}: file not found: {v}" for k, v in _tls_files(destination.tls)]
        if missing:
            raise ConfigError("\n".join(missing))
    if destination.auth is not None:
        auth = destination.auth.model_copy(update={k: (path.parent / v).resolve()
                                                   for k, v in destination.auth.files().items()})
        destination = destination.model_copy(update={"auth": auth})
        unreadable = [f"{path}: field destination.auth.{k}: {why}" for k, v in auth.files().items()
                      if (why := _unreadable(v))]
        if unreadable:
            raise ConfigError("\n".join(unreadable))
    if isinstance(destination.commitment, CommitmentScp) and destination.commitment.tls is not None:
        scp = destination.commitment.model_copy(update={"tls": destination.commitment.tls.resolved(path.parent)})
        destination = destination.model_copy(update={"commitment": scp})
        missing = [f"{path}: field destination.commitment.tls.{k}: file not found: {v}" for k, v in _tls_files(scp.tls)]
        if missing:
            raise ConfigError("\n".join(missing))
    rules = [_with_maps(path, index, rule) for index, rule in enumerate(parsed.rule)]
    return DestinationRules(name=path.stem, path=path, destination=destination, rules=rules, tag=tag)


def _with_maps(path: Path, index: int, rule: Rule) -> Rule:
    """The rule with its map files and de-identification key resolved next to the rule file, each
    read once to check it (the key's content is never printed)."""
    where = f"{path}: rule {index + 1}" + (f" ({rule.name!r})" if rule.name else "")
    if rule.deidentify is not None:
        from router.codecs.deidentify import read_secret

        secret = (path.parent / rule.deidentify.secret_file).resolve()
        if why := _unreadable(secret):
            raise ConfigError(f"{where}, field deidentify.secret_file: {why}")
        try:
            read_secret(secret)
        except ValueError as exc:
            raise ConfigError(f"{where}, field deidentify.secret_file: {exc}") from None
        rule = rule.model_copy(update={"deidentify": rule.deidentify.model_copy(update={"secret_file": secret})})
    if not rule.map:
        return rule
    from router.codecs.header import read_map

    resolved = {attribute: (path.parent / file).resolve() for attribute, file in rule.map.items()}
    for attribute, file in resolved.items():
        if why := _unreadable(file):
            raise ConfigError(f"{where}, field map.{attribute}: {why}")
        try:
            read_map(file)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}, field map.{attribute}: {exc}") from None
    return rule.model_copy(update={"map": resolved})


def load(path: Path | str) -> Loaded:
    """Load `router.toml` and every rule file; relative paths are relative to the config file.

    Raises ConfigError listing every problem found, each naming its file.
    """
    path = Path(path).resolve()
    data = _read_toml(path)
    try:
        router = RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc)) from None
    base = path.parent
    storage = router.storage.model_copy(update={"spool_dir": (base / router.storage.spool_dir).resolve()})
    rules_dir = (base / router.rules.dir).resolve()
    plugins = [str((base / p).resolve()) if p.endswith(".py") else p for p in router.transcode.plugins]
    transcode = router.transcode.model_copy(update={"plugins": plugins})
    listen = router.listen
    if listen.tls is not None:
        listen = listen.model_copy(update={"tls": listen.tls.resolved(base)})
    commitment = router.commitment.resolved(base)
    audit = router.audit
    if audit.tls is not None:
        audit = audit.model_copy(update={"tls": audit.tls.resolved(base)})
    router = router.model_copy(update={"storage": storage, "rules": RulesDir(dir=rules_dir), "transcode": transcode,
                                       "listen": listen, "commitment": commitment, "audit": audit})
    missing = [f"{path}: field listen.tls.{k}: file not found: {v}" for k, v in _tls_files(listen.tls)]
    missing += [f"{path}: field audit.tls.{k}: file not found: {v}" for k, v in _tls_files(audit.tls)]
    missing += [f"{path}: field commitment.modalities.{title}.tls.{k}: file not found: {v}"
                for title, address in commitment.modalities.items() for k, v in _tls_files(address.tls)]
    if missing:
        raise ConfigError("\n".join(missing))
    try:
        registry.load_plugins(plugins)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error
        raise ConfigError(f"{path}: field transcode.plugins: cannot load: {exc}") from None
    return Loaded(path=path, router=router, destinations=load_rules_dir(rules_dir))


def load_rules_dir(rules_dir: Path) -> list[DestinationRules]:
    if not rules_dir.is_dir():
        raise ConfigError(f"{rules_dir}: rules directory not found")
    errors: list[str] = []
    destinations: list[DestinationRules] = []
    for file in sorted(rules_dir.glob("*.toml")):
        try:
            destinations.append(load_rule_file(file))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))
    return destinations
