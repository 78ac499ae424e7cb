"""The send seam: how a destination is reached, behind one interface.

The forwarder prepares each job (the file to send, in which transfer syntax) and hands a batch
to its destination's `Sender`; the sender says, per item, what became of it (`Sent`). The
forwarder never knows which protocol it drives: DIMSE C-STORE over the association pool
(`forward.dimse`) is one sender, DICOMweb STOW-RS (`forward.stow`) another.

    accepted   which transfer syntaxes the destination takes for a SOP class, once known (a
               sender learns it from the destination, or its configuration says so)
    send       a batch, in order; before each item the sender asks the forwarder whether and
               what to send (`Ready`): the item's transcode is finished there, and a job of
               higher priority or a closing window stops the batch. When the destination does
               not take the item's syntax, the sender asks again, saying which uncompressed
               syntaxes it takes: the forwarder falls back, and the sender sends what it made
    Sent       one per item sent: delivered (with its size), retry or dead (with why)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from router.queue import Job
from router.request import ORIGINAL, Outcome, Request


class Ready(Enum):
    """What the forwarder says of the next item of a batch."""

    SEND = "send"  # prepared: send it
    SKIP = "skip"  # already recorded (it could not be prepared): go on with the next
    STOP = "stop"  # the rest of the batch goes back to the queue


@dataclass
class Outgoing:
    """One claimed job on its way: what it is, and the file to send."""

    job: Job
    log: object
    request: Request
    path: Path
    transfer_syntax_uid: str
    syntax: str = ORIGINAL  # the syntax name it goes out in, for metrics and logs
    possible: set[str] = field(default_factory=set)  # the transfer syntaxes it may go out in
    transcoded: object | None = None  # codecs.transcode.Transcoded, when it was transcoded
    submitted: object | None = None  # its transcode on the codec pool, until finished
    refused: bool = False  # not encoded: the destination refused its syntax on the connection in force

    @property
    def source(self) -> Path:
        return Path(self.job.instance.path)


@dataclass(frozen=True)
class Sent:
    """What became of one item the sender was given."""

    item: Outgoing
    outcome: Outcome  # DELIVERED, RETRY or DEAD
    why: str = ""  # for a retry or a dead letter: the error
    size: int = 0  # bytes sent, when delivered
    seconds: float = 0.0  # how long the destination took
    status: str = ""  # the destination's answer, for the log ("0x0000", "HTTP 200")
    retry_after_s: float = 0.0  # a retry: the destination asked not to be tried again before this


# the forwarder's answer before an item goes out; `refused`: the destination does not take the
# item's syntax, and these are the uncompressed syntax names it takes
ReadyCheck = Callable[..., Ready]  # (item: Outgoing, refused: tuple[str, ...] | None = None) -> Ready


class Sender(ABC):
    """How one destination is reached."""

    @abstractmethod
    def accepted(self, sop_class_uid: str) -> frozenset[str] | None:
        """The transfer syntax UIDs the destination is known to take for `sop_class_uid`; None
        while unknown (the sender learns it when it sends)."""

    def refused(self, sop_class_uid: str) -> frozenset[str]:
        """The transfer syntax UIDs the destination was offered for `sop_class_uid` on the
        connection in force and did not take (none while unknown). The forwarder does not encode
        for what is refused there: a new connection offers them again."""
        return frozenset()

    @abstractmethod
    def send(self, batch: list[Outgoing], ready: ReadyCheck) -> Iterator[Sent]:
        """Send `batch` in order, asking `ready` before each item; yield what became of each item
        sent. Items not reached (a STOP, a lost connection) yield nothing and go back to the queue."""

    def idle(self) -> None:
        """Nothing to send for now: let go of what is held open only for the next batch."""

    def close(self) -> None:
        """The destination is gone or the router stops."""
