"""Nested Pixel Data (icons, and any image in a sequence): made valid in the output's syntax,
written by the same syntax as the main image (native in a native syntax, encoded like the main
image otherwise), or the sequence that holds it dropped when the syntax cannot carry it (an
Icon Image Sequence is Type 3)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from router.codecs import pixeldata
from router.codecs.encode import CannotCarry, Lap, Mismatch, encode_frames, for_syntax, repack_frames
from router.codecs.registry import EXPLICIT_BE, EXPLICIT_LE, NATIVE_TRANSFER_SYNTAXES, Syntax, uid_name
from router.codecs.write import element_name, set_encapsulated, set_encoded, set_native
from router.request import Request


@dataclass(frozen=True)
class Nested:
    """What was done to the nested Pixel Data of one output: a phrase for the note, and whether
    anything changed (then the output cannot be spliced from the input's bytes)."""

    note: str
    changed: bool


class _Kept:
    """A nested Pixel Data already valid in the output: left as it was."""


class _Converted:
    """A nested Pixel Data re-written in the output's syntax."""


KEPT, CONVERTED = _Kept(), _Converted()


def nested_syntax(item: Dataset, ts: str) -> str:
    """The transfer syntax the Pixel Data of nested ``item`` is stored in, in a file of ``ts``:
    the file's when it is encapsulated, else native (little endian in every encapsulated file)."""
    if pixeldata.is_encapsulated(item) or ts in NATIVE_TRANSFER_SYNTAXES:
        return ts
    return EXPLICIT_LE


def make_valid(ds: Dataset, ts: str, syntax: Syntax, uid: str, request: Request, lap: Lap) -> Nested:
    """Make every nested Pixel Data of ``ds`` (read in ``ts``) valid in ``uid``, written by ``syntax``."""
    converted: dict[tuple[int, int], str] = {}
    drop: dict[tuple[int, int], tuple[Dataset, int, str]] = {}
    changed = False
    for owner, tag, item in list(pixeldata.nested(ds)):
        key = (id(owner), tag)
        if key in drop:
            continue
        outcome = _one(item, nested_syntax(item, ts), syntax, uid, request, lap)
        if outcome is KEPT:
            continue
        changed = True
        if outcome is CONVERTED:
            converted[key] = element_name(tag)
        else:
            drop[key] = (owner, tag, str(outcome))
    words = []
    for owner, tag, why in drop.values():
        del owner[tag]
        words.append(f"{element_name(tag)} dropped: {why}")
    names = sorted({name for key, name in converted.items() if key not in drop})
    if names:
        how = "written native" if not syntax.encapsulated else f"re-encoded in {syntax.name}"
        words.append(f"nested Pixel Data {how} ({', '.join(names)})")
    return Nested("".join(f"; {w}" for w in words), changed)


def _one(item: Dataset, source: str, syntax: Syntax, uid: str, request: Request,
         lap: Lap) -> _Kept | _Converted | CannotCarry | Mismatch:
    """KEPT, CONVERTED, or why the sequence holding ``item`` must be dropped."""
    encapsulated = pixeldata.is_encapsulated(item)
    if not syntax.encapsulated and not encapsulated and source != EXPLICIT_BE:
        return KEPT
    if syntax.repacks is not None:
        if not encapsulated or source != syntax.repacks:
            return CannotCarry(f"{syntax.name} only re-packs {uid_name(syntax.repacks)}, not {uid_name(source)}")
        done = repack_frames(item, syntax, request)
        if isinstance(done, (CannotCarry, Mismatch)):
            return done
        set_encapsulated(item, done[0])
        return CONVERTED
    pixels = pixeldata.decode(item, source)
    if pixels is None:
        return CannotCarry(f"{item.get('BitsAllocated')}-bit allocated pixels are not decoded")
    if not syntax.encapsulated:
        set_native(item, pixels)
        return CONVERTED
    pixels, image = for_syntax(syntax, pixels)
    reason = syntax.cannot_carry(image, request.params)
    if reason:
        return CannotCarry(reason)
    if not syntax.valid_in(image, uid):
        return CannotCarry(f"{syntax.name} codes it as {uid_name(syntax.uid_for(image))}, not {uid_name(uid)}")
    encoded = encode_frames(syntax, pixels, image, request, lap)
    if isinstance(encoded, Mismatch):
        return encoded
    set_encoded(item, syntax, image, encoded)
    return CONVERTED
