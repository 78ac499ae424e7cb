"""Rule matching: given an instance's header and where it came from, decide what to send.

Pure logic, no I/O. The first rule of a destination whose every match key matches decides.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from router.config import CONTEXT_KEYS, SKIP, Rule
from router.transcode import Request

_COMPARISON = re.compile(r"^\s*(>=|<=|!=|>|<|=)\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Decision:
    forward: bool
    rule_name: str
    rule_index: int | None  # 1-based; None when no rule matched
    request: Request | None
    reason: str

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

    dataset: Dataset
    context: Context = field(default_factory=Context)

    def values(self, key: str) -> list[Any] | None:
        """All values of `key`, or None when the attribute is absent or empty."""
        if key in CONTEXT_KEYS:
            value: Any = self.context.value(key)
        else:
            element = self.dataset.get(key)
            value = None if element is None else element
        if value is None or value == "" or (isinstance(value, (list, MultiValue)) and len(value) == 0):
            return None
        if isinstance(value, (list, MultiValue)):
            return list(value)
        return [value]


def _as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _item_matches(pattern: str | int | float, values: list[Any] | None) -> bool:
    if isinstance(pattern, str):
        comparison = _COMPARISON.match(pattern) if pattern.strip()[:1] in "<>!=" else None
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


def request_to_json(request: Request) -> str:
    return json.dumps(dataclasses.asdict(request), separators=(",", ":"))


def request_from_json(text: str) -> Request:
    return Request(**json.loads(text))


def decide(rules: list[Rule], attributes: Attributes, keep_sop_instance_uid: bool = False) -> Decision:
    """Return the decision of the first matching rule; no match means the instance is not forwarded."""
    for index, rule in enumerate(rules, start=1):
        matched, why = rule_matches(rule, attributes)
        if not matched:
            continue
        label = rule.name or f"rule {index}"
        if rule.syntax == SKIP:
            return Decision(False, label, index, None, f"rule {index} ({label!r}): {why}: skip")
        request = Request(
            syntax=rule.syntax,
            quality=rule.quality,
            near=rule.near,
            ratio=rule.ratio,
            fallback=rule.fallback,
            verify=rule.verify,
            max_error=rule.max_error,
            keep_sop_instance_uid=keep_sop_instance_uid,
        )
        return Decision(True, label, index, request, f"rule {index} ({label!r}): {why}: {rule.syntax}")
    return Decision(False, "", None, None, "no rule matched: not forwarded")
