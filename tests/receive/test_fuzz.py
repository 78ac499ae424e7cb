"""Fuzzing the parsing and transcoding paths in-process with malformed files.

``transcode_file`` on a broken file returns a Transcoded result or raises TranscodeError, within a
deadline and without unbounded memory. Intake, which the SCP's C-STORE handler hands every
received file to, answers 0x0000 or a 0xC000-range status and never raises. Seeds and operations come from
``tests.support.malformed``; the examples are derandomized so that every run tries the same files.
"""

from __future__ import annotations

import logging
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from router import metrics
from router.config import load_rule_file
from router.receive.intake import Intake, Received
from router.queue.sqlite import SqliteQueue
from router.request import Request
from router.rules import Context
from router.queue.spool import Spool
from router.codecs.transcode import Transcoded, TranscodeError, transcode_file
from tests.support import malformed
from tests.support.malformed import CATALOGUE, ENCAPSULATED_SEEDS, HUGE, PIXEL_DATA, SEEDS, UNDEFINED, seed

DEADLINE_S = 10.0
RSS_GROWTH_MB = 300
ALLOCATION_LIMIT_MB = 256
TARGETS = ["explicit-le", "implicit-le", "jpeg-ls-lossless", "j2k-lossless", "rle", "jpeg-lossless", "jpeg-lossy"]
VRS = [b"AE", b"CS", b"DA", b"DS", b"FD", b"FL", b"IS", b"LO", b"OB", b"OW", b"SQ", b"SS", b"UI", b"UL",
       b"UN", b"US", b"UT", b"zz", b"\x00\x00", b"\xff\xff"]
LENGTHS = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 0xFFFF, 0x10000, HUGE, UNDEFINED]), st.integers(0, 0x4000))

FUZZ = dict(database=None, derandomize=True, deadline=None, print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                   HealthCheck.data_too_large])
# a failing property is reported as found, without shrinking, to keep the run short
NO_SHRINK = [Phase.explicit, Phase.generate]

RULES = """
[destination]
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[rule]]
name = "large 16-bit images: JPEG-LS lossless"
match = { BitsStored = ">12" }
syntax = "jpeg-ls-lossless"

[[rule]]
name = "by modality"
match = { Modality = ["CT", "MR"], Rows = ">0" }
syntax = "j2k-lossless"

[[rule]]
name = "everything else"
syntax = "explicit-le"
"""


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


# ---------------------------------------------------------------- the mutated files


@st.composite
def mutated(draw) -> tuple[str, bytes]:  # noqa: ANN001
    """(seed name, broken data set): element edits, one structural change, flipped bytes, a cut."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    s = seed(name)
    body = s.body
    elements = s.elements()
    for _ in range(draw(st.integers(0, 2))):
        element = draw(st.sampled_from(elements))
        if element.vr is not None and draw(st.booleans()):
            body = malformed.set_vr(body, element, draw(st.sampled_from(VRS)))
        else:
            body = malformed.set_length(s, body, element, draw(LENGTHS))
    change = draw(st.sampled_from(["none", "codestream", "sequence", "item", "huge-element", "short-pixels", "random"]))
    if change == "codestream" and name in ENCAPSULATED_SEEDS:
        how = draw(st.sampled_from(["noise", "zeros", "header", "short"]))
        noise = draw(st.binary(min_size=1, max_size=8))
        body = malformed.corrupt_fragment(s, how, draw(st.floats(0, 1)), noise)
    elif change in ("sequence", "item"):
        body = malformed.endless_sequence(s, change == "item", draw(st.integers(1, 3)))
    elif change == "huge-element":
        tag = draw(st.sampled_from([0x00091010, 0x00081030, 0x00101010, 0x00290010, 0x7FE00008]))
        vr = draw(st.sampled_from([b"OB", b"UN", b"LO", b"UT", b"SQ"]))
        length = draw(st.sampled_from([HUGE, UNDEFINED, 0x7FFFFFFF]))
        body = malformed.insert_before(s, body, tag, malformed.encode_element(s, tag, vr, b"\x00" * 8, length))
    elif change == "short-pixels" and s.element(PIXEL_DATA).length != UNDEFINED:
        body = malformed.short_pixels(s, draw(st.integers(0, s.element(PIXEL_DATA).length)))
    elif change == "random":
        body = draw(st.binary(min_size=0, max_size=2048))
    for _ in range(draw(st.integers(0, 3))):
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    if draw(st.booleans()):
        body = malformed.truncate(body, draw(st.integers(0, len(body))))
    return name, body


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _transcode(directory: Path, name: str, body: bytes, target: str) -> Transcoded | BaseException:
    src = directory / "in.dcm"
    src.write_bytes(seed(name).file(body))
    try:
        return transcode_file(src, directory / "out.dcm", Request(syntax=target))
    except BaseException as exc:  # noqa: BLE001 - the test judges it
        return exc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- transcode_file


@pytest.mark.timeout(120)
@settings(max_examples=350, **FUZZ)
@given(case=mutated(), target=st.sampled_from(TARGETS))
def test_transcode_never_hangs_nor_grows_nor_dies(workdir, case, target):
    name, body = case
    before = _rss_mb()
    started = time.monotonic()
    result = _transcode(workdir, name, body, target)
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S, f"{elapsed:.1f}s on {name} -> {target}"
    assert _rss_mb() - before < RSS_GROWTH_MB
    # whatever it does, it stays an ordinary exception the caller can handle
    assert isinstance(result, (Transcoded, Exception)), repr(result)
    if isinstance(result, Transcoded) and result.changed:
        assert result.path.exists()


@pytest.mark.timeout(120)
@settings(max_examples=350, phases=NO_SHRINK, **FUZZ)
@given(case=mutated(), target=st.sampled_from(TARGETS))
def test_transcode_returns_an_outcome_or_raises_transcode_error(workdir, case, target):
    name, body = case
    result = _transcode(workdir, name, body, target)
    assert isinstance(result, (Transcoded, TranscodeError)), f"{type(result).__name__}: {result}"




@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[]
                 if c.name in ("native-bits-stored-3-bytes", "native-rows-as-FD") else [])
    for c in CATALOGUE
])
def test_catalogue_transcodes_to_an_outcome_or_transcode_error(workdir, case):
    result = _transcode(workdir, case.seed, case.body, case.target)
    assert isinstance(result, (Transcoded, TranscodeError)), f"{type(result).__name__}: {result}"
    if case.expect == "fallback":
        assert isinstance(result, TranscodeError), result


def _peak_allocation_mb(call) -> float:  # noqa: ANN001
    tracemalloc.start()
    try:
        try:
            call()
        except Exception:  # noqa: BLE001 - only the memory is judged here
            pass
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()




@pytest.mark.parametrize("name", ["native-huge-length-in-header", "native-huge-pixel-data-length"])
def test_huge_declared_length_is_not_allocated_by_transcode(workdir, name):
    case = next(c for c in CATALOGUE if c.name == name)
    peak = _peak_allocation_mb(lambda: _transcode(workdir, case.seed, case.body, "jpeg-ls-lossless"))
    assert peak < ALLOCATION_LIMIT_MB, f"{peak:.0f} MB allocated"


# ---------------------------------------------------------------- intake of a received file


@pytest.fixture(scope="module")
def receiver(workdir) -> Intake:
    rules = workdir / "rules" / "PACS.toml"
    rules.parent.mkdir()
    rules.write_text(RULES)
    destination = load_rule_file(rules)
    spool = Spool(workdir / "spool")
    queue = SqliteQueue(workdir / "queue.sqlite")
    return Intake(spool, queue, lambda: [destination])


def _store(receiver: Intake, name: str, body: bytes, uid: str) -> int:
    s = seed(name)
    path = receiver.spool.incoming / f"{uid}.dcm"
    path.write_bytes(s.file(body, uid))
    return receiver.accept(Received(path, s.sop_class_uid, uid, Context("FUZZ", "ROUTER", "127.0.0.1")))


def _malformed_count() -> float:
    return metrics.REJECTED.labels(reason="malformed")._value.get()  # noqa: SLF001


def _uid(counter=[0]) -> str:  # noqa: B006
    counter[0] += 1
    return f"2.25.{counter[0]}"


@pytest.mark.timeout(120)
@settings(max_examples=300, **FUZZ)
@given(case=mutated())
def test_intake_never_raises_nor_hangs(receiver, case):
    name, body = case
    started = time.monotonic()
    before = _rss_mb()
    status = _store(receiver, name, body, _uid())
    assert isinstance(status, int)
    assert time.monotonic() - started < DEADLINE_S
    assert _rss_mb() - before < RSS_GROWTH_MB


@pytest.mark.timeout(120)
@settings(max_examples=300, phases=NO_SHRINK, **FUZZ)
@given(case=mutated())
def test_intake_answers_success_or_cannot_understand(receiver, case):
    name, body = case
    status = _store(receiver, name, body, _uid())
    assert status == 0 or 0xC000 <= status <= 0xCFFF, f"0x{status:04X}"


@pytest.mark.parametrize("case", [c for c in CATALOGUE if c.expect == "reject" and c.name.startswith(("native-endless", "implicit-endless"))], ids=lambda c: c.name)
def test_intake_refuses_endless_sequences(receiver, case):
    before = _malformed_count()
    assert 0xC000 <= _store(receiver, case.seed, case.body, _uid()) <= 0xCFFF
    assert _malformed_count() == before + 1


@settings(max_examples=50, phases=NO_SHRINK, **FUZZ)
@given(body=st.binary(min_size=8, max_size=512))
def test_intake_refuses_random_bytes(receiver, body):
    status = _store(receiver, "native", body, _uid())
    assert 0xC000 <= status <= 0xCFFF, f"0x{status:04X}"


def test_huge_declared_length_is_not_allocated_by_intake(receiver):
    case = next(c for c in CATALOGUE if c.name == "native-huge-length-in-header")
    peak = _peak_allocation_mb(lambda: _store(receiver, case.seed, case.body, _uid()))
    assert peak < ALLOCATION_LIMIT_MB, f"{peak:.0f} MB allocated"
