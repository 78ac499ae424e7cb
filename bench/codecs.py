"""Ratio and encode/decode speed of every outbound syntax on the pydicom-data images.

    python bench/codecs.py [--seconds 0.5] [--syntax NAME ...]

Prints a markdown table: ratio · encode MB/s / decode MB/s, on one core, in MB of
raw pixel bytes (Bits Allocated) per second. The encoders and decoders are the
ones the router uses (router.codecs), fed the frames the transcoder feeds them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router import codecs  # noqa: E402
from router.codecs.frames import to_pattern  # noqa: E402
from router.request import Params  # noqa: E402
from router.codecs import pixeldata  # noqa: E402
from router.codecs.write import guess_ts  # noqa: E402

IMAGES = {
    "CR 15-bit": "RG1_UNCR.dcm",
    "MR 12-bit": "MR2_UNCR.dcm",
    "CT signed 14-bit": "693_UNCR.dcm",
    "US RGB 8-bit": "US1_UNCR.dcm",
}


def _timed(fn, seconds: float) -> tuple[float, object]:
    """Seconds per call (best of repeated runs within the time budget) and the result."""
    result = fn()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best, result


def decoded_frames(ds: pydicom.Dataset) -> tuple[list[np.ndarray], codecs.ImageInfo] | None:
    """The frames of ``ds`` as the transcoder hands them to an encoder, and what a codec needs to
    know of them; None for pixels no codec takes (1-bit)."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or guess_ts(ds))
    pixeldata.check(ds, ts not in codecs.NATIVE_TRANSFER_SYNTAXES)
    pixels = pixeldata.decode(ds, ts)
    return None if pixels is None else (pixels.frames, pixels.image)


def measure(syntax: codecs.Syntax, path: Path, seconds: float) -> str:
    decoded = decoded_frames(pydicom.dcmread(path))
    if decoded is None:
        return "—"
    frames, image = decoded
    image = syntax.coded(image)
    if syntax.cannot_carry(image, Params()):
        return "—"
    values = frames[0]
    frame = np.ascontiguousarray(to_pattern(values, image.bits) if image.signed else values)
    raw = image.rows * image.columns * image.samples_per_pixel * image.bits_allocated // 8
    enc_s, data = _timed(lambda: syntax.encode(frame, image, Params()), seconds)
    dec_s, _ = _timed(lambda: syntax.decode(data, image), seconds)
    mb = raw / 1e6
    return f"{raw / len(data):.2f} · {mb / enc_s:.0f}/{mb / dec_s:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time budget per measurement (default 0.5)")
    parser.add_argument("--syntax", action="append", help="only these registry names (repeatable)")
    args = parser.parse_args(argv)
    import data_store

    data = Path(data_store.__file__).parent / "data"
    chosen = [
        s for s in codecs.all_syntaxes()
        if s.encapsulated and s.encoder is not None and (not args.syntax or s.name in args.syntax)
    ]
    print("ratio · encode/decode MB/s per core (raw pixel bytes); — = cannot carry\n")
    print("| syntax | " + " | ".join(IMAGES) + " |")
    print("|---|" + "---|" * len(IMAGES))
    for syntax in chosen:
        cells = [measure(syntax, data / name, args.seconds) for name in IMAGES.values()]
        label = f"{syntax.name} ({syntax.uid.rsplit('.', 2)[-2] + '.' + syntax.uid.rsplit('.', 1)[-1]})"
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    defaults = [f"{s.name} {s.describe(Params())}" for s in chosen if s.describe(Params())]
    print(f"\nDefaults: {', '.join(defaults)}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
