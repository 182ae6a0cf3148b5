"""The frame reader under a coverage-guided fuzzer (fuzz/fuzz_frame_reader.py, atheris) and
hypothesis: no exception escapes, the buffer stays under its bound, valid frames embedded in
garbage all come out, in order, whatever the chunking. The long fuzz run is by hand
(docs/reliability.md); tests/test_dlt645_frame.py holds the reader's other properties."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.collectors.dlt645 import (
    Frame,
    FrameReader,
    address_to_wire,
    decode_reply,
    decode_request,
    encode_frame,
)

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "fuzz" / "fuzz_frame_reader.py"
RUNS = 20_000

try:
    import atheris  # noqa: F401

    HAVE_ATHERIS = True
except ImportError:  # no wheel for this Python / platform
    HAVE_ATHERIS = False
needs_atheris = pytest.mark.skipif(
    not HAVE_ATHERIS, reason="atheris is not installed (pip install atheris: wheels for "
    "CPython 3.8-3.11 on x86-64 Linux); the hypothesis properties below still run")


def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_frame_reader", HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_atheris
@pytest.mark.slow
def test_a_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(HARNESS), "--seed-corpus", str(corpus)], check=True,
                   timeout=60)
    assert len(list(corpus.iterdir())) >= 5
    r = subprocess.run(
        [sys.executable, str(HARNESS), str(corpus), f"-atheris_runs={RUNS}", "-max_len=2048",
         # the process, not the reader (whose bound the harness checks at every feed): a clean
         # checkout compiles the numba kernels in it first, ~530 MB at its peak
         "-len_control=0", "-rss_limit_mb=2048", "-seed=645"],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"^Done {RUNS} in \d+ second", r.stderr, re.MULTILINE), r.stderr[-2000:]
    cov = re.findall(r" cov: (\d+) ", r.stderr)
    assert cov and int(cov[-1]) > 50  # the reader and the decoders were really reached
    assert not list(tmp_path.glob("crash-*"))


@needs_atheris
def test_the_harness_catches_a_reader_that_breaks_its_promises(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is not vacuous: a reader that lets a frame over max_data_len through, or
    that raises, fails it."""
    h = harness()
    frame = encode_frame("330010010001", 0x91, bytes(40), preamble=0)
    good = b"\x01\xff" + frame  # strict, max_data_len 255, one chunk
    h.check(good)
    tight = b"\x01\x10" + frame  # max_data_len 16: the reader must refuse the 40-byte frame
    h.check(tight)
    real_feed = FrameReader.feed

    def leaky(self: FrameReader, data: bytes) -> list[object]:
        out = real_feed(self, data)
        return [*out, Frame(b"\x01" * 6, 0x91, bytes(self.max_data_len + 1), True)]

    monkeypatch.setattr(h.FrameReader, "feed", leaky)
    with pytest.raises(AssertionError, match="should have refused"):
        h.check(good)

    def raising(self: FrameReader, data: bytes) -> list[object]:
        raise IndexError("boom")

    monkeypatch.setattr(h.FrameReader, "feed", raising)
    with pytest.raises(IndexError):
        h.check(good)


# --- hypothesis: frames in garbage, any chunking ----------------------------------------------

NO_START = bytes(b for b in range(256) if b != 0x68)
frame_specs = st.tuples(st.integers(0, 999_999_999_998), st.sampled_from([0x91, 0x81, 0xD1, 0x94]),
                        st.binary(max_size=60), st.integers(0, 4))


def _stream(garbage: list[bytes], specs: list[tuple[int, int, bytes, int]]) -> tuple[bytes,
                                                                                     list[Frame]]:
    stream = b""
    expected = []
    for junk, (addr, control, plain, pre) in zip(garbage, specs, strict=False):
        address = f"{addr:012d}"
        stream += junk + encode_frame(address, control, plain, preamble=pre)
        expected.append(Frame(address_to_wire(address), control, plain, True))
    return stream + garbage[-1], expected


def _feed(stream: bytes, cuts: list[int]) -> tuple[list[Frame], FrameReader]:
    reader = FrameReader()
    found: list[Frame] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        for item in reader.feed(stream[pos:pos + size]):
            assert reader.buffered < 12 + reader.max_data_len
            if isinstance(item, Frame):
                decode_reply(item)  # never raises on what the reader produced
                decode_request(item)
                found.append(item)
        pos += size
    reader.eof()
    return found, reader


@given(st.lists(frame_specs, min_size=1, max_size=8), st.data(),
       st.lists(st.integers(0, 400), max_size=30))
@settings(max_examples=200, derandomize=True, deadline=None)
def test_frames_in_garbage_without_a_start_byte_come_out_exactly(
        specs: list[tuple[int, int, bytes, int]], data: st.DataObject, cuts: list[int]) -> None:
    junk = st.binary(max_size=500).map(lambda b: b.translate(None, b"\x68"))
    garbage = [data.draw(junk) for _ in range(len(specs) + 1)]
    stream, expected = _stream(garbage, specs)
    found, reader = _feed(stream, cuts)
    assert found == expected
    assert reader.buffered == 0


@given(st.lists(frame_specs, min_size=1, max_size=8),
       st.lists(st.binary(max_size=500), min_size=9, max_size=9),
       st.lists(st.integers(0, 400), max_size=30))
@settings(max_examples=200, derandomize=True, deadline=None)
def test_frames_in_any_garbage_all_come_out_in_order(
        specs: list[tuple[int, int, bytes, int]], garbage: list[bytes], cuts: list[int]) -> None:
    """Garbage with 68H, 16H and FE in it: every real frame is found, in order (garbage may
    make the odd frame of its own, which the sessions discard as stale)."""
    stream, expected = _stream(garbage[:len(specs) + 1], specs)
    found, _ = _feed(stream, cuts)
    it = iter(found)
    assert all(any(f == e for f in it) for e in expected), (found, expected)
