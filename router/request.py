"""The router's shared vocabulary, at the bottom of every import chain (no pydicom, no numpy).

Glossary, one name per concept, used in code, logs, metrics and README:

- **instance**: one received SOP instance, durable in the spool (`queue.Instance`).
- **destination**: one rule file: where to send and how (`config.DestinationRules`).
- **job**: one instance for one destination, a row in the queue (`queue.Job`): pending,
  in flight or dead, with its attempts, next attempt time and last error.
- **request**: what the matching rule asks for, decided at receipt (`Request`): an outbound
  syntax, its parameters, a fallback syntax and verification.
- **transcoded**: what the transcoder made of one request (`transcode.Transcoded`).
- **outcome**: what happened to a job: delivered, retry, dead, skipped (`Outcome`).
- **reason**: why an instance was refused or did not go out in the rule's syntax (`Reason`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class _Word(str, Enum):
    """A value that is its own word in metrics labels and logs."""

    def __str__(self) -> str:
        return self.value


class Reason(_Word):
    """Every refusal, fallback and failure reason; the value is the metric label and log word."""

    # a C-STORE or an association refused by the router (dicom_router_rejected{reason})
    DISK_FULL = "disk_full"
    NOT_ALLOWED = "not_allowed"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    TIMEOUT = "timeout"  # a connection closed for taking too long (association request, PDU, TLS handshake)
    ERROR = "error"
    # an instance not sent in its rule's syntax (dicom_router_fallbacks{reason})
    REFUSED_BY_DESTINATION = "refused_by_destination"
    CODEC_CANNOT_CARRY = "codec_cannot_carry"
    VERIFY_MISMATCH = "verify_mismatch"
    CODEC_ERROR = "codec_error"
    CODEC_CRASH = "codec_crash"
    CODEC_TIMEOUT = "codec_timeout"
    # why a due-looking job is held back (router.forward.waiting)
    WINDOW = "window"
    DELAY = "delay"
    STUDY_STABLE = "study_stable"
    THROTTLED = "throttled"


REJECTION_REASONS: tuple[Reason, ...] = (
    Reason.DISK_FULL, Reason.NOT_ALLOWED, Reason.MALFORMED, Reason.TOO_LARGE, Reason.BUSY, Reason.TIMEOUT,
    Reason.ERROR,
)
FALLBACK_REASONS: tuple[Reason, ...] = (
    Reason.REFUSED_BY_DESTINATION, Reason.CODEC_CANNOT_CARRY, Reason.VERIFY_MISMATCH, Reason.CODEC_ERROR,
    Reason.CODEC_CRASH, Reason.CODEC_TIMEOUT,
)
HELD_REASONS: tuple[Reason, ...] = (Reason.WINDOW, Reason.DELAY, Reason.STUDY_STABLE, Reason.THROTTLED)


class Outcome(_Word):
    """What happened to a job (dicom_router_forward_failures{outcome} counts retry and dead)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    SKIPPED = "skipped"


ORIGINAL = "original"  # the syntax name meaning "as received"


@dataclass(frozen=True)
class Params:
    """Encoder parameters. Each syntax declares which it takes, with bounds and defaults
    (`codecs.registry.Param`); they are checked once, where a rule or a command line is read."""

    quality: int | None = None
    near: int | None = None
    ratio: float | None = None

    def given(self) -> dict[str, int | float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Params))


@dataclass(frozen=True)
class Request:
    """What a rule asks for one instance at one destination. Validated where it is made
    (`config.Rule`, the `transcode` command), never again."""

    syntax: str
    quality: int | None = None
    near: int | None = None
    ratio: float | None = None
    fallback: str | None = None
    verify: bool | None = None  # None: verify lossless output, not lossy
    max_error: int | None = None
    keep_sop_instance_uid: bool = False
    # header rules (codecs.header.actions), applied to what leaves; () none. `header_rule`: the
    # rule they come from, for the logs and metrics
    header: tuple[tuple[str, ...], ...] = ()
    header_rule: str = ""

    @property
    def params(self) -> Params:
        return Params(quality=self.quality, near=self.near, ratio=self.ratio)

    def to_json(self) -> str:
        """The form the queue keeps."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Request:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in json.loads(text).items() if k in known}
        if "header" in fields:
            fields["header"] = tuple(tuple(action) for action in fields["header"])
        return cls(**fields)

    def instead(self, syntax: str) -> Request:
        """The same request for another syntax, without its parameters (a fallback); its header
        rules still apply."""
        return Request(syntax=syntax, keep_sop_instance_uid=self.keep_sop_instance_uid, header=self.header,
                       header_rule=self.header_rule)


# what a destination that refused the rule's syntax is sent instead, first accepted first
UNCOMPRESSED: tuple[str, ...] = ("explicit-le", "implicit-le")


def fallback(request: Request, reason: Reason, accepted: Sequence[str] = ()) -> Request | None:
    """The request to try when ``request`` did not go out, for ``reason``; None: send the
    instance as received. The one place that decides fallbacks.

    A destination that refused the syntax (Reason.REFUSED_BY_DESTINATION) gets the first of
    `UNCOMPRESSED` among ``accepted`` (syntax names the destination accepted). For any other
    reason (the codec cannot carry the image, failed or crashed; verification failed) the
    rule's fallback syntax, when it names another syntax than the one that failed.
    """
    if reason is Reason.REFUSED_BY_DESTINATION:
        for name in UNCOMPRESSED:
            if name in accepted and name != request.syntax:
                return request.instead(name)
        return None
    if request.fallback is not None and request.fallback != request.syntax:
        return request.instead(request.fallback)
    return None
