"""Rule matching: given an instance's header and where it came from, decide what to send.

Pure logic, no I/O, no pydicom and no numpy: the receiving side imports this for every
C-STORE. The first rule of a destination whose every match key matches decides.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.request import Request

CONTEXT_KEYS = ("CallingAE", "CalledAE", "SourceIP")
SKIP = "skip"
# a job's priority within its destination, first to last (the queue stores the index)
PRIORITIES = ("high", "normal", "low")
# a match value such as ">12" or "!=0"
COMPARISON = re.compile(r"^\s*(>=|<=|!=|>|<|=)\s*(-?\d+(?:\.\d+)?)\s*$")


class Rule(Protocol):
    """What matching reads of a rule (`config.Rule`, validated where the rule file loads)."""

    name: str
    match: Mapping[str, Any]
    syntax: str
    quality: int | None
    near: int | None
    ratio: float | None
    fallback: str | None
    verify: bool | None
    max_error: int | None
    priority: str


@dataclass(frozen=True)
class Decision:
    """What a destination's rules make of one instance: a request, or None (not forwarded)."""

    rule_name: str
    request: Request | None
    reason: str
    priority: str = "normal"  # one of PRIORITIES: the rule's

    @property
    def forward(self) -> bool:
        return self.request is not None

    @property
    def syntax(self) -> str:
        return self.request.syntax if self.request else SKIP


@dataclass(frozen=True)
class Context:
    """Where an instance came from: the association's calling/called AE titles and peer address."""

    calling_ae: str = ""
    called_ae: str = ""
    source_ip: str = ""

    def value(self, key: str) -> str:
        return {"CallingAE": self.calling_ae, "CalledAE": self.called_ae, "SourceIP": self.source_ip}[key]


@dataclass(frozen=True)
class Attributes:
    """The header values rules look at, taken once from the dataset."""

    dataset: Mapping[str, Any] | Any  # a pydicom Dataset, or any object with get(keyword)
    context: Context = field(default_factory=Context)

    def values(self, key: str) -> list[Any] | None:
        """All values of `key`, or None when the attribute is absent or empty."""
        if key in CONTEXT_KEYS:
            value: Any = self.context.value(key)
        else:
            element = self.dataset.get(key)
            value = None if element is None else element
        multiple = isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))
        if value is None or value == "" or (multiple and len(value) == 0):
            return None
        if multiple:
            return list(value)
        return [value]


def _as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _item_matches(pattern: str | int | float, values: list[Any] | None) -> bool:
    if isinstance(pattern, str):
        comparison = COMPARISON.match(pattern) if pattern.strip()[:1] in "<>!=" else None
        if comparison:
            if values is None:
                return comparison.group(1) == "!="
            op, target = comparison.group(1), float(comparison.group(2))
            numbers = [n for n in (_as_number(v) for v in values) if n is not None]
            checks = {
                ">": lambda n: n > target,
                "<": lambda n: n < target,
                ">=": lambda n: n >= target,
                "<=": lambda n: n <= target,
                "=": lambda n: n == target,
                "!=": lambda n: n != target,
            }
            return any(checks[op](n) for n in numbers)
        if pattern == "*":
            return True
        if values is None:
            return pattern == ""
        texts = [str(v) for v in values]
        candidates = texts + (["\\".join(texts)] if len(texts) > 1 else [])
        return any(fnmatch.fnmatchcase(text.strip(), pattern) for text in candidates)
    # a bare number compares numerically
    if values is None:
        return False
    return any(_as_number(v) == float(pattern) for v in values)


def rule_matches(rule: Rule, attributes: Attributes) -> tuple[bool, str]:
    """Whether every key of the rule's match table matches, and a short why."""
    for key, wanted in rule.match.items():
        values = attributes.values(key)
        patterns = wanted if isinstance(wanted, list) else [wanted]
        if not any(_item_matches(p, values) for p in patterns):
            shown = "absent" if values is None else "\\".join(str(v) for v in values)
            return False, f"{key} is {shown!s}, rule wants {wanted!r}"
    return True, ", ".join(f"{k} matches {v!r}" for k, v in rule.match.items()) or "matches everything"


def decide(rules: list[Rule], attributes: Attributes, keep_sop_instance_uid: bool = False) -> Decision:
    """Return the decision of the first matching rule; no match means the instance is not forwarded."""
    for index, rule in enumerate(rules, start=1):
        matched, why = rule_matches(rule, attributes)
        if not matched:
            continue
        label = rule.name or f"rule {index}"
        if rule.syntax == SKIP:
            return Decision(label, None, f"rule {index} ({label!r}): {why}: skip")
        request = Request(
            syntax=rule.syntax,
            quality=rule.quality,
            near=rule.near,
            ratio=rule.ratio,
            fallback=rule.fallback,
            verify=rule.verify,
            max_error=rule.max_error,
            keep_sop_instance_uid=keep_sop_instance_uid,
            header=rule.header,
            header_rule=label if rule.header else "",
        )
        return Decision(label, request, f"rule {index} ({label!r}): {why}: {rule.syntax}", rule.priority)
    return Decision("", None, "no rule matched: not forwarded")
