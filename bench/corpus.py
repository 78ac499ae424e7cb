"""The benchmark corpus: real pydicom-data images copied into studies with new UIDs.

Generated once into a cache directory (default bench/.corpus) and reused while the
manifest matches. Each study also has a two-image warm-up set (other UIDs), sent
before the timed part of every run so that codec workers, outbound associations and
imports are already up when the clock starts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import data_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.peers import make_series  # noqa: E402 - the tests copy studies the same way

DATA = Path(data_store.__file__).parent / "data"
DEFAULT_CACHE = Path(__file__).resolve().parent / ".corpus"
WARMUP_COUNT = 2
_VERSION = 1

# name -> (pydicom-data source, images in the full study, what it is)
STUDIES: dict[str, tuple[str, int, str]] = {
    "ct": ("693_UNCR.dcm", 500, "CT 512x512, 16-bit allocated, 14-bit signed"),
    "cr": ("RG1_UNCR.dcm", 20, "CR 1955x1841, 15-bit unsigned"),
    "mr": ("MR2_UNCR.dcm", 100, "MR 1024x1024, 12-bit unsigned"),
}


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    files: list[Path]
    warmup: list[Path]

    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.sizes:  # read once: the runs must not depend on the cache staying put
            object.__setattr__(self, "sizes", tuple(p.stat().st_size for p in self.files))

    @property
    def bytes(self) -> int:
        return sum(self.sizes)

    def head(self, count: int) -> Study:
        """The first `count` images (the same files, so the cache is shared)."""
        return Study(self.name, self.description, self.files[:count], self.warmup, self.sizes[:count])


def load(name: str, cache: Path = DEFAULT_CACHE) -> Study:
    """The study `name` from the cache, generating it first if missing or stale."""
    source, count, description = STUDIES[name]
    root = cache / name
    manifest = root / "manifest.json"
    wanted = {"version": _VERSION, "source": source, "count": count, "warmup": WARMUP_COUNT}
    if manifest.exists():
        try:
            got = json.loads(manifest.read_text())
        except ValueError:
            got = {}
        files = sorted((root / "study").glob("*.dcm"))
        warmup = sorted((root / "warmup").glob("*.dcm"))
        if {k: got.get(k) for k in wanted} == wanted and len(files) == count and len(warmup) == WARMUP_COUNT:
            return Study(name, description, files, warmup)
    for sub in ("study", "warmup"):
        for old in (root / sub).glob("*.dcm") if (root / sub).exists() else []:
            old.unlink()
    files = make_series(DATA / source, count, root / "study")
    warmup = make_series(DATA / source, WARMUP_COUNT, root / "warmup")
    manifest.write_text(json.dumps(wanted))
    return Study(name, description, files, warmup)
