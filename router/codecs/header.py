"""Header rules: the coercion a rule asks for one destination (`set`, `template`, `map`, `remove`),
applied to the data set that leaves for it, in the same write as its transfer syntax.

A rule's actions reach the codec workers as plain tuples (`Request.header`, see `actions`):

    ("set", path, json value)         the attribute gets the value (its VR from the dictionary)
    ("template", path, text)          "{Keyword}" replaced by the received header's values
    ("map", path, csv file, keep|dead) the received value looked up in a two-column CSV (from,to)
    ("remove", path)                  the attribute, or a whole group ("0009,xxxx", nested items too)
    ("deidentify", settings json)     PS3.15 Annex E (codecs.deidentify), first: the others follow it

A path is a keyword or "gggg,eeee", or a path into sequences ("RequestAttributesSequence[*].
RequestedProcedureID": every item; "[0]": the first). `plan` reads what to change from the data
set as received, before anything else touches it; `apply` makes the changes just before the file
is written. Values are checked against their VR where the rule file loads (`check_rule`), and a
template's or a map's result again when it is applied (`HeaderRefused`: the job is a dead letter,
never sent without the change). Log lines and errors name attributes, never their values.
"""

from __future__ import annotations

import csv
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from router.codecs import deidentify as deid
from router.watched import Watched

ACTIONS = ("set", "template", "map", "remove")
# what a header rule never touches: the identity of the instance and the file, and the pixels'
# description (the transcoder owns them)
PROTECTED_GROUPS = (0x0002, 0x0028, 0x7FE0)
PROTECTED = {0x00080016, 0x00080018, 0x0020000D, 0x0020000E}  # SOP Class/Instance, Study, Series UIDs
_SEGMENT = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9]*|[0-9A-Fa-f]{4},[0-9A-Fa-fXx]{4})(?:\[(?P<index>\*|\d+)\])?$")


class HeaderRefused(ValueError):
    """A header rule cannot be applied to this instance (a value not in the map with
    on_unmapped = "dead", a template's result not valid for its VR)."""

    def __init__(self, message: str, reason: str = "header_rule") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Segment:
    tag: int | None  # None: a whole group (`group`)
    group: int | None = None
    index: str | None = None  # "*", "0", "1", ...: into a sequence's items


@dataclass(frozen=True)
class Change:
    """One attribute changed: where, how, before and after (None: absent / removed)."""

    action: str
    attribute: str
    before: str | None
    after: str | None


def parse_path(text: str, action: str) -> list[Segment]:
    """The segments of a path; ValueError naming what is wrong."""
    segments: list[Segment] = []
    parts = text.split(".")
    for position, part in enumerate(parts):
        found = _SEGMENT.match(part.strip())
        if not found:
            raise ValueError(f"{text!r}: {part!r} is neither a keyword nor gggg,eeee")
        name, index = found["name"], found["index"]
        last = position == len(parts) - 1
        if "," in name:
            group_text, element_text = name.split(",")
            group = int(group_text, 16)
            if element_text.lower() == "xxxx":
                if action != "remove" or not last or index is not None:
                    raise ValueError(f"{text!r}: a whole group (gggg,xxxx) can only be removed")
                segments.append(Segment(None, group=group))
                continue
            tag = (group << 16) | int(element_text, 16)
        else:
            tag = tag_for_keyword(name)
            if tag is None:
                raise ValueError(f"{text!r}: {name!r} is not a DICOM keyword")
        if not last and index is None:
            raise ValueError(f"{text!r}: say which items of {name} ([*] every item, [0] the first)")
        if last and index is not None:
            raise ValueError(f"{text!r}: the last part names an attribute, not items")
        if not last and _vr(tag) != "SQ":
            raise ValueError(f"{text!r}: {name} is not a sequence")
        segments.append(Segment(tag, index=index))
    last = segments[-1]
    group = last.group if last.tag is None else last.tag >> 16
    if group in PROTECTED_GROUPS or last.tag in PROTECTED:
        raise ValueError(f"{text!r}: header rules do not change the instance's identity, its file meta or its "
                         "pixels' description")
    if action != "remove" and (last.tag is None or last.tag >> 16 & 1):
        raise ValueError(f"{text!r}: a private attribute has no VR in the dictionary; only remove takes it")
    if action != "remove" and _vr(last.tag) == "SQ":
        raise ValueError(f"{text!r}: a sequence is removed, or its items' attributes changed by a path")
    return segments


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _normal(vr: str, value: Any) -> Any:  # noqa: ANN401 - a TOML value
    """A TOML number written for a decimal or integer string (DS, IS) as its text."""
    if vr in ("DS", "IS"):
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    return value


def _check_value(vr: str, value: Any, where: str) -> None:  # noqa: ANN401 - a TOML value
    value = _normal(vr, value)
    for item in value if isinstance(value, list) else [value]:
        if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD") and not isinstance(item, (int, float)):
            raise ValueError(f"{where}: {item!r} is not a number (VR {vr})")
        try:
            validate_value(vr, item, pydicom_config.RAISE)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def check_rule(set: dict[str, Any], template: dict[str, str], map: dict[str, Path],  # noqa: A002 - the rule's names
               remove: list[str]) -> None:
    """Every action of a rule, checked where the rule file loads (ValueError naming the field)."""
    seen: dict[str, str] = {}
    set_ = set
    for action, paths in (("set", set_), ("template", template), ("map", map), ("remove", remove)):
        for path in paths:
            segments = parse_path(path, action)
            if path in seen:
                raise ValueError(f"{action}: {path} is also in {seen[path]}: one action per attribute")
            seen[path] = action
            if action == "set":
                _check_value(_vr(segments[-1].tag), set_[path], f"set {path}")
            elif action == "template":
                for _, field_name, _, _ in string.Formatter().parse(template[path]):
                    if field_name is not None and field_name not in keyword_dict:
                        raise ValueError(f"template {path}: {{{field_name}}} is not a DICOM keyword")


def read_map(path: Path) -> dict[str, str]:
    """A two-column CSV (from,to); a header row "from,to" is skipped. ValueError for any other shape."""
    table: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise ValueError(f"{path}: line {number} has {len(row)} columns, not 2 (from,to)")
            source, target = row[0].strip(), row[1].strip()
            if number == 1 and (source.lower(), target.lower()) == ("from", "to"):
                continue
            table[source] = target
    return table


_mapping = Watched(read_map).read  # the map file's table, read again when it changes


def actions(set_: dict[str, Any], template: dict[str, str], mapped: dict[str, Path], remove: list[str],
            on_unmapped: str, deidentify: Any = None) -> tuple[tuple[str, ...], ...]:  # noqa: ANN401 - config.Deidentify
    """A rule's header actions as `Request.header` carries them (plain, picklable, JSON): the
    de-identification first, the coercion after it."""
    out: list[tuple[str, ...]] = []
    if deidentify is not None:
        settings = deid.Settings(tuple(deidentify.options), Path(deidentify.secret_file), deidentify.burned_in,
                                 deid.parse_safe_private(deidentify.safe_private))
        out.append(("deidentify", settings.to_json()))
    out += [("set", path, json.dumps(value)) for path, value in set_.items()]
    out += [("template", path, text) for path, text in template.items()]
    out += [("map", path, str(file), on_unmapped) for path, file in mapped.items()]
    out += [("remove", path) for path in remove]
    return tuple(out)


class _Received(dict):
    """The received header's values for templates: "" for an absent attribute."""

    def __init__(self, ds: Dataset) -> None:
        super().__init__()
        self.ds = ds

    def __missing__(self, keyword: str) -> str:
        value = self.ds.get(keyword)
        return "" if value is None else _text(value)


def _text(value: object) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _targets(ds: Dataset, segments: list[Segment]) -> list[Dataset]:
    """The data sets holding the path's last segment."""
    holders = [ds]
    for segment in segments[:-1]:
        items: list[Dataset] = []
        for holder in holders:
            element = holder.get(segment.tag)
            value = element.value if element is not None else None
            if not value:
                continue
            if segment.index == "*":
                items.extend(value)
            elif int(segment.index) < len(value):
                items.append(value[int(segment.index)])
        holders = items
    return holders


@dataclass(frozen=True)
class _Planned:
    holder: Dataset
    tag: int | None
    group: int | None
    value: object  # None: remove
    change: Change


@dataclass
class _Deidentified:
    """The de-identification of a data set: made by `deidentify_now` (before the pixels are
    encoded, so that lossy bookkeeping follows it) or else by `apply`, first."""

    ds: Dataset
    settings: deid.Settings
    changes: list[Change] | None = None

    def run(self) -> list[Change]:
        if self.changes is None:
            try:
                outcome = deid.deidentify(self.ds, self.settings)
            except deid.BurnedIn as exc:
                raise HeaderRefused(f"de-identification: the pixels may carry identity ({exc})",
                                    "burned_in_annotation") from None
            except ValueError as exc:  # the key file, changed since the rules loaded
                raise HeaderRefused(f"de-identification: {exc}") from None
            self.changes = [Change("deidentify", f"{path} ({action})", before, after)
                            for action, path, before, after in outcome.changes]
        return self.changes


def plan(ds: Dataset, header: tuple[tuple[str, ...], ...]) -> list[_Planned | _Deidentified]:
    """What the actions change in `ds`, read from it as received; HeaderRefused when one cannot be
    applied to this instance. The coercion reads the values as received, and is made after the
    de-identification (so that it may set what the profile removed)."""
    received = _Received(ds)
    planned: list[_Planned | _Deidentified] = []
    for action, path, *args in header:
        if action == "deidentify":
            settings = deid.Settings.from_json(path)
            if settings.burned_in != "allow" and (why := deid.burned_in(ds)):
                raise HeaderRefused(f"de-identification: the pixels may carry identity ({why}; "
                                    "burned_in = \"allow\" sends it all the same)", "burned_in_annotation")
            planned.append(_Deidentified(ds, settings))
            continue
        segments = parse_path(path, action)
        last = segments[-1]
        for holder in _targets(ds, segments):
            if action == "remove":
                if last.tag is None:
                    planned.append(_Planned(holder, None, last.group, None, Change("remove", path, None, None)))
                elif last.tag in holder:
                    planned.append(_Planned(holder, last.tag, None, None,
                                            Change("remove", path, _text(holder[last.tag].value), None)))
                continue
            vr = _vr(last.tag)
            before = _text(holder[last.tag].value) if last.tag in holder else None
            if action == "set":
                value = _normal(vr, json.loads(args[0]))
            elif action == "template":
                value = args[0].format_map(received)
            else:  # map
                file, on_unmapped = Path(args[0]), args[1]
                if before is None:
                    continue
                table = _mapping(file)
                if before not in table:
                    if on_unmapped == "dead":
                        raise HeaderRefused(f"{path} is not in {file.name} (on_unmapped = \"dead\")", "unmapped")
                    continue
                value = table[before]
            try:
                _check_value(vr, value, f"{action} {path}")
            except ValueError as exc:
                raise HeaderRefused(f"{exc} (after {action})") from None
            planned.append(_Planned(holder, last.tag, None, value, Change(action, path, before, _text(value))))
    return planned


def deidentify_now(planned: list[_Planned | _Deidentified]) -> deid.Settings | None:
    """Make the planned de-identification now (`apply` then reports it); its settings, or None."""
    for item in planned:
        if isinstance(item, _Deidentified):
            item.run()
            return item.settings
    return None


def apply(planned: list[_Planned | _Deidentified]) -> list[Change]:
    """Make the planned changes; what was changed."""
    changes: list[Change] = []
    for item in planned:
        if isinstance(item, _Deidentified):
            changes += item.run()
            continue
        changes.append(item.change)
        if item.value is None and item.tag is None:
            _remove_group(item.holder, item.group)
        elif item.value is None:
            if item.tag in item.holder:  # the de-identification may have removed it already
                del item.holder[item.tag]
        else:
            item.holder[item.tag] = DataElement(item.tag, _vr(item.tag), item.value)
    return changes


def _remove_group(ds: Dataset, group: int) -> None:
    for tag in [t for t in ds.keys() if t.group == group]:
        del ds[tag]
    for element in ds:
        if element.VR == "SQ" and element.value:
            for item in element.value:
                _remove_group(item, group)


def is_identity(path: str, action: str = "") -> bool:
    """Whether a change of `path` shows patient identity (its values hidden by `explain`); every
    value the de-identification changes does."""
    if action == "deidentify":
        return True
    try:
        segments = parse_path(path, "remove")
    except ValueError:
        return True
    tag = segments[-1].tag
    if tag is None:
        return True
    return tag >> 16 == 0x0010 or _vr(tag) == "PN" or tag in (0x00080050, 0x00200010, 0x00080080, 0x00081010)
