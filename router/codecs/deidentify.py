"""De-identification for one destination: the Basic Application Level Confidentiality Profile of
DICOM PS3.15 Annex E (Table E.1-1) and its options, applied to the data set that leaves.

The profile's actions come from the table as `dicom-anonymizer` publishes it for the 2026c edition
(`dicomfields_2026c`); the option columns, which it does not carry, from `deid_options`. Each
attribute, at every level of nesting, gets the action of its row, the option a rule names
overriding the profile:

    X  removed                 Z  emptied (a patient's name and ID: the pseudonym)
    D  a dummy value of its VR U  a new UID, derived from the old one and the secret
    K  kept                    C  cleaned: a date shifted (modified dates), a text kept without
                                  the identifying values of this instance
    X/Z, X/D, Z/D, X/Z/D: the value that keeps the attribute present (Z or D), since whether the
    IOD needs it is not known here; X/Z/U*: the sequence kept, the UIDs in it replaced.

Every private attribute is removed; with retain-safe-private, those the rule names as known safe
at this site (by private creator and element) are kept with their creators. Curves and overlays
are removed (the whole repeating group, so that no overlay is described without its data). An
attribute the table does not list is kept, a text without the identifying values of the instance
(its patient's names and IDs, birth date, accession number, institution, physicians, station). A
UID that is not in the table and not a well-known one (a SOP class, a transfer syntax, a coding
scheme) is replaced as well, so that nothing refers back to the original. New UIDs ("2.25." and a keyed hash shaped as a
UUID) and the patient pseudonym are derived from the original values and the secret alone: every
node of a cluster that has the same secret file gives the same study, series, instance and
patient the same new identity, today and next month, and references between instances stay
consistent. Patient Identity Removed (0012,0062) is set to YES and De-identification Method
(0012,0063) and its Code Sequence (0012,0064) say which profile and options were applied.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID_dictionary

from router.watched import Watched

EDITION = "2026c"
# the option names of a rule file -> the column of Table E.1-1 and the code of CID 7050
OPTIONS: dict[str, tuple[str, str, str]] = {
    "retain-uids": ("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain-device-identity": ("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain-institution-identity": ("rtnInstIdOpt", "113112", "Retain Institution Identity Option"),
    "retain-patient-characteristics": ("rtnPatCharsOpt", "113108", "Retain Patient Characteristics Option"),
    "retain-longitudinal-full-dates": ("rtnLongFullDatesOpt", "113106",
                                       "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain-longitudinal-modified-dates": ("rtnLongModifDatesOpt", "113107",
                                           "Retain Longitudinal Temporal Information Modified Dates Option"),
    "clean-descriptors": ("cleanDescOpt", "113105", "Clean Descriptors Option"),
    "retain-safe-private": ("rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
}
BASIC = ("113100", "Basic Application Confidentiality Profile")
# where Burned In Annotation is absent, the pixels of these may well carry a name
BURNED_IN_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "DOC"})
BURNED_IN_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.7",  # the secondary capture family (.7, .7.1 - .7.4)
                         "1.2.840.10008.5.1.4.1.1.77.1.1.1", "1.2.840.10008.5.1.4.1.1.77.1.2.1",
                         "1.2.840.10008.5.1.4.1.1.77.1.4.1")  # video endoscopic, microscopic, photographic
MIN_SECRET_BYTES = 16
_CODED = re.compile(r"Code|CodingScheme|Context|MappingResource", re.ASCII)
_KEEP_UID = re.compile(r"Class|TransferSyntax|CodingScheme|Creator", re.ASCII)
_FILE_META_DROPPED = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)  # AE titles, private info
_PSEUDONYMOUS = (0x00100010, 0x00100020)  # Patient's Name and ID: the patient's pseudonym, at every level
_TEXT = ("LO", "LT", "SH", "ST", "UT", "UC", "PN")
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000D", "DS": "0", "IS": "0",
          "CS": _DUMMY_TEXT, "AE": _DUMMY_TEXT, "UR": ""}


class BurnedIn(ValueError):
    """The pixels may carry identity and the destination does not allow it."""


@dataclass(frozen=True)
class Settings:
    """A rule's `deidentify`, as a request carries it (plain JSON)."""

    options: tuple[str, ...]
    secret_file: Path
    burned_in: str = "refuse"
    # with retain-safe-private: the private attributes known safe, as (creator, group, element
    # within the creator's block)
    safe_private: tuple[tuple[str, int, int], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"options": list(self.options), "secret_file": str(self.secret_file),
                           "burned_in": self.burned_in, "safe_private": [list(s) for s in self.safe_private]},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data = json.loads(text)
        return cls(tuple(data["options"]), Path(data["secret_file"]), data.get("burned_in", "refuse"),
                   tuple((c, g, e) for c, g, e in data.get("safe_private", ())))


_SAFE_PRIVATE = re.compile(r"^([0-9A-Fa-f]{4}),[Xx]{2}([0-9A-Fa-f]{2})$")


def parse_safe_private(table: dict[str, list[str]]) -> tuple[tuple[str, int, int], ...]:
    """`{"CREATOR" = ["gggg,xxee", ...]}` as (creator, group, element) triples; ValueError naming
    what is wrong."""
    out: list[tuple[str, int, int]] = []
    for creator, tags in table.items():
        if not creator.strip() or len(creator) > 64 or "\\" in creator:
            raise ValueError(f"safe_private: {creator!r} is not a private creator (1 to 64 characters, LO)")
        for text in tags:
            found = _SAFE_PRIVATE.match(text.strip())
            if not found or not int(found[1], 16) & 1 or int(found[1], 16) < 9:
                raise ValueError(f"safe_private: {creator}: {text!r} is not \"gggg,xxee\" with gggg an odd group "
                                 "above 0008 (xx: the block the creator reserved)")
            out.append((creator.strip(), int(found[1], 16), int(found[2], 16)))
    return tuple(out)


def check_options(options: list[str]) -> None:
    """ValueError naming an unknown or contradictory option."""
    for option in options:
        if option not in OPTIONS:
            raise ValueError(f"unknown de-identification option {option!r}; known: {', '.join(OPTIONS)}")
    if {"retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"} <= set(options):
        raise ValueError("retain-longitudinal-full-dates and retain-longitudinal-modified-dates exclude each other")


def read_secret(path: Path) -> bytes:
    """The key in `path` (surrounding whitespace left out); ValueError when it is too short to be one."""
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path}: holds {len(secret)} bytes, fewer than {MIN_SECRET_BYTES}: write a random key, "
                         "for example: head -c 32 /dev/urandom | base64 > deid.key")
    return secret


_secret = Watched(read_secret).read


# -- the table ---------------------------------------------------------------------------------------

_CATEGORIES = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
               "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}


@functools.cache
def _profile() -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """The Basic Profile's action per tag, and per masked tag; loaded at the first use (not by
    a router whose rules de-identify nothing)."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []  # (value, mask, action) for rows like (50xx,xxxx)
    for category, action in _CATEGORIES.items():
        for entry in getattr(table, category):
            if len(entry) == 2:
                exact[entry[0] << 16 | entry[1]] = action
            else:
                group, element, group_mask, element_mask = entry
                mask = group_mask << 16 | element_mask
                masked.append(((group << 16 | element) & mask, mask, action))
    return exact, masked


@functools.cache
def _option_columns() -> dict[str, dict[int, str]]:
    from router.codecs import deid_options

    columns: dict[str, dict[int, str]] = {column: {} for column, _, _ in OPTIONS.values()}
    for tag, _name, _basic, options in deid_options.ROWS:
        if not re.fullmatch(r"[0-9A-F]{8}", tag.upper()):
            continue  # a row for a whole group (curves, overlays, private attributes): handled in _Run.walk
        for column, action in options.items():
            if column in columns:
                columns[column][int(tag, 16)] = action
    return columns


def action_for(tag: int, options: tuple[str, ...]) -> str | None:
    """The action for `tag` with these options; None for an attribute not in the table."""
    columns = _option_columns()
    for option in options:
        chosen = columns[OPTIONS[option][0]].get(tag)
        if chosen is not None:
            return chosen
    exact, masked = _profile()
    action = exact.get(tag)
    if action is None:
        for value, mask, masked_action in masked:
            if tag & mask == value:
                return masked_action
    return action


# -- keyed identities --------------------------------------------------------------------------------

def keyed_uid(secret: bytes, uid: str, purpose: str = "uid") -> str:
    """A new UID for `uid`: "2.25." and 128 bits of a keyed hash, shaped as an RFC 9562 version 8
    UUID (PS3.5 B.2)."""
    digest = hmac.new(secret, f"{purpose}\0{uid}".encode(), hashlib.sha256).digest()[:16]
    value = int.from_bytes(digest, "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return f"2.25.{value}"


def pseudonym(secret: bytes, ds: Dataset) -> str:
    """The patient's pseudonym: from the Issuer of Patient ID and Patient ID (or, without an ID,
    the name and birth date), 12 letters and digits."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    name = str(ds.get("PatientName", "") or "").strip()
    if patient_id:
        key = f"id\0{str(ds.get('IssuerOfPatientID', '') or '').strip()}\0{patient_id}"
    elif name:
        key = f"name\0{name}\0{ds.get('PatientBirthDate', '') or ''!s}"
    else:  # nobody named: one pseudonym per study, so that unknown patients are not merged into one
        key = f"study\0{ds.get('StudyInstanceUID', '') or ''!s}"
    digest = hmac.new(secret, b"patient\0" + key.encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode()[:12]


def _shift_days(secret: bytes, patient: str) -> int:
    """How many days this patient's dates move back with modified dates: 1 to 3650, the same for every
    instance of the patient."""
    digest = hmac.new(secret, b"dates\0" + patient.encode(), hashlib.sha256).digest()
    return 1 + int.from_bytes(digest[:4], "big") % 3650


# -- applying it ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What was done to one data set: (action, attribute path, before, after) per change."""

    changes: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)


class _Run:
    def __init__(self, ds: Dataset, settings: Settings, secret: bytes) -> None:
        self.options = tuple(o for o in settings.options if o in OPTIONS)
        self.safe_private = set(settings.safe_private) if "retain-safe-private" in self.options else set()
        self.secret = secret
        self.pseudonym = pseudonym(secret, ds)
        self.shift = _shift_days(secret, self.pseudonym)
        self.identifying = _identifying_values(ds)
        self.outcome = Outcome()

    def note(self, action: str, path: str, before: object, after: object) -> None:
        self.outcome.changes.append((action, path, None if before is None else _text(before),
                                     None if after is None else _text(after)))

    def walk(self, ds: Dataset, prefix: str = "") -> None:
        safe = self._safe_private(ds)
        for element in list(ds):
            tag = int(element.tag)
            path = prefix + (keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if BaseTag(tag).is_private:
                if tag in safe:
                    if element.VR == "SQ":
                        self._items(element, path)
                    continue
                del ds[tag]
                self.note("X", path, "(private)", None)
                continue
            if 0x6000 <= tag >> 16 <= 0x601E and not tag >> 16 & 1:
                # an overlay: its data is removed (X), so is the rest of its group, which would
                # describe an overlay that is not there
                del ds[tag]
                self.note("X", path, "(overlay)", None)
                continue
            action = action_for(tag, self.options)
            vr = element.VR
            if action is None:  # not in the table
                if vr == "UI" and not self._retained_uid(tag):
                    self._new_uids(ds, element, path)
                elif vr == "SQ":
                    self._items(element, path)
                elif vr in _TEXT and not element.is_empty and not _CODED.search(element.keyword):
                    # kept, but never with a name, an ID or an institution of this instance in it
                    # (a code's value and scheme are left as they are: they are not free text)
                    cleaned = _cleaned(element.value, self.identifying)
                    if cleaned != element.value:
                        self._set(ds, element, cleaned, path, "C")
                continue
            self.apply(ds, element, action, path)

    def _safe_private(self, ds: Dataset) -> set[int]:
        """The private tags of `ds` kept by retain-safe-private, their creators' included."""
        if not self.safe_private:
            return set()
        creators = {}
        for tag in ds.keys():
            if tag.group & 1 and 0x10 <= tag.element <= 0xFF:
                creators[(tag.group, tag.element)] = str(ds[tag].value).strip()
        kept: set[int] = set()
        for tag in ds.keys():
            if tag.group & 1 and tag.element > 0xFF:
                block = tag.element >> 8
                creator = creators.get((tag.group, block))
                if creator is not None and (creator, tag.group, tag.element & 0xFF) in self.safe_private:
                    kept.update((int(tag), tag.group << 16 | block))
        return kept

    def _items(self, element: DataElement, path: str) -> None:
        for index, item in enumerate(element.value or []):
            self.walk(item, f"{path}[{index}].")

    def _retained_uid(self, tag: int) -> bool:
        return "retain-uids" in self.options or bool(_KEEP_UID.search(keyword_for_tag(tag) or ""))

    def apply(self, ds: Dataset, element: DataElement, action: str, path: str) -> None:
        tag, vr = int(element.tag), element.VR
        if tag in _PSEUDONYMOUS and action not in ("K", "X"):  # Patient's Name and ID: the pseudonym
            if element.value != self.pseudonym:
                self._set(ds, element, self.pseudonym, path, action)
        elif action == "X":
            del ds[tag]
            self.note("X", path, element.value if vr != "SQ" else "(sequence)", None)
        elif action in ("Z", "X/Z"):
            if vr == "SQ":
                if element.value:
                    element.value = Sequence([])
                    self.note(action, path, "(sequence)", "(no items)")
            elif not element.is_empty:
                self._set(ds, element, None, path, action)
        elif action in ("D", "Z/D", "X/D", "X/Z/D"):
            if vr == "SQ":
                self._items(element, path)
            elif vr == "UI":
                self._new_uids(ds, element, path, action)
            else:
                self._set(ds, element, _dummy(vr, self.pseudonym if vr == "PN" else None), path, action)
        elif action in ("U", "X/Z/U*"):
            if vr == "SQ":
                self._items(element, path)
            elif vr == "UI":
                self._new_uids(ds, element, path, action)
        elif action == "C":
            self._clean(ds, element, path)
        elif action == "K" and vr == "SQ":
            self._items(element, path)

    def _set(self, ds: Dataset, element: DataElement, value: object, path: str, action: str) -> None:
        before = element.value
        ds[element.tag] = DataElement(element.tag, element.VR, value)
        self.note(action, path, before, "" if value is None else value)

    def _new_uids(self, ds: Dataset, element: DataElement, path: str, action: str = "U") -> None:
        if element.is_empty:
            return
        values = list(element.value) if element.VM > 1 else [element.value]
        new = [v if str(v) in UID_dictionary else keyed_uid(self.secret, str(v)) for v in values]
        if new != values:
            self._set(ds, element, new if len(new) > 1 else new[0], path, action)

    def _clean(self, ds: Dataset, element: DataElement, path: str) -> None:
        vr = element.VR
        if vr == "SQ":
            self._items(element, path)
        elif vr in ("DA", "DT") and "retain-longitudinal-modified-dates" in self.options:
            shifted = _shifted(element.value, vr, self.shift)
            if shifted != element.value:
                self._set(ds, element, shifted, path, "C")
        elif vr in _TEXT and not element.is_empty:
            cleaned = _cleaned(element.value, self.identifying)
            if cleaned != element.value:
                self._set(ds, element, cleaned, path, "C")

    def finish(self, ds: Dataset) -> None:
        meta = getattr(ds, "file_meta", None)
        for tag in _FILE_META_DROPPED:
            if meta is not None and tag in meta:
                del meta[tag]
        ds.PatientIdentityRemoved = "YES"
        titles = [BASIC[1]] + [OPTIONS[o][2] for o in self.options]
        ds.DeidentificationMethod = [f"DICOM PS3.15 E.1-1 {EDITION}"] + [t[:64] for t in titles]
        codes = []
        for value, meaning in [BASIC] + [OPTIONS[o][1:] for o in self.options]:
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
            codes.append(code)
        ds.DeidentificationMethodCodeSequence = Sequence(codes)
        if "retain-longitudinal-full-dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif "retain-longitudinal-modified-dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"


def deidentify(ds: Dataset, settings: Settings) -> Outcome:
    """De-identify `ds` in place; BurnedIn when its pixels may carry identity and that is refused."""
    if settings.burned_in != "allow":
        why = burned_in(ds)
        if why:
            raise BurnedIn(why)
    run = _Run(ds, settings, _secret(settings.secret_file))
    run.walk(ds)
    run.finish(ds)
    return run.outcome


def burned_in(ds: Dataset) -> str:
    """Why the pixels of `ds` may carry identity ("" when they are not thought to)."""
    if not any(t in ds for t in (0x00280010, 0x7FE00010, 0x7FE00008, 0x7FE00009)):
        return ""  # no image: a report, a presentation state
    said = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if said == "YES":
        return "Burned In Annotation is YES"
    if said:
        return ""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES:
        return f"Burned In Annotation is absent and the modality is {modality}"
    sop_class = str(ds.get("SOPClassUID", ""))
    if any(sop_class == c or sop_class.startswith(c + ".") for c in BURNED_IN_SOP_CLASSES):
        return "Burned In Annotation is absent and the SOP class is a secondary capture or a video"
    return ""


def lossy_uid(secret_file: Path, uid: str) -> str:
    """The one new SOP Instance UID of a de-identified instance that is also compressed lossily."""
    return keyed_uid(_secret(secret_file), uid, "lossy")


# -- values ------------------------------------------------------------------------------------------

def _text(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"({len(value)} bytes)"
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[union-attr]
    return str(value)


def _dummy(vr: str, pn: str | None) -> object:
    if vr == "PN":
        return pn or _DUMMY_TEXT
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr in ("LO", "LT", "SH", "ST", "UT", "UC"):
        return _DUMMY_TEXT
    if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"):
        return 0
    return {"OB": b"\x00\x00", "OW": b"\x00\x00", "UN": b"\x00\x00", "OF": b"\x00" * 4, "OL": b"\x00" * 4,
            "OD": b"\x00" * 8, "OV": b"\x00" * 8}.get(vr)


def _identifying_values(ds: Dataset) -> list[str]:
    """The values of this instance a cleaned text must not keep, longest first."""
    found: set[str] = set()
    for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
                    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
                    "OperatorsName", "StationName", "PatientAddress", "PatientTelephoneNumbers",
                    "PatientMotherBirthName", "OtherPatientNames", "PatientBirthName", "RequestingPhysician",
                    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "DeviceSerialNumber"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        for item in value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]:
            text = str(item).strip()
            found.add(text)
            found.update(part.strip() for part in re.split(r"[\^=\s,]+", text))
    return sorted((v for v in found if len(v) >= 3), key=len, reverse=True)


def _cleaned(value: object, identifying: list[str]) -> object:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_cleaned(v, identifying) for v in value]  # type: ignore[union-attr]
    text = str(value)
    for found in identifying:
        text = re.sub(rf"(?<!\w){re.escape(found)}(?!\w)", "", text, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip()


def _shifted(value: object, vr: str, days: int) -> object:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_shifted(v, vr, days) for v in value]  # type: ignore[union-attr]
    text = str(value)
    if len(text) < 8 or not text[:8].isdigit():
        return value
    try:
        day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return value
    return (day - datetime.timedelta(days=days)).strftime("%Y%m%d") + text[8:]


def vr_of(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"
