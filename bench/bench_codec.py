"""DL/T 645 codec speed: the frame reader on a contiguous reply stream, and the read encoder.

Targets, one core: >= 400,000 energy-block (0001FF00) replies/s read AND decoded (pure-Python
FrameReader + the numpy batch decode_energy_blocks), >= 1,000,000 read requests/s built. Each
figure has a baseline measured in the same rounds (a bare loop over the same data) and the
ratio to it. Figures, not asserts.

Run: .venv/bin/python bench/bench_codec.py
"""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median_rate, report
from meterstream.collectors.dlt645 import (
    ENERGY_BLOCK_DI,
    FrameReader,
    decode_energy_blocks,
    decode_reply,
    encode_read,
    encode_read_reply,
    encode_value,
    lookup,
    messages,
)

FRAMES = 200_000
METERS = 1_000
CHUNK = 64 * 1024
REQUESTS = 500_000
ROUNDS = 7


def reply_stream(
    rng: random.Random, frames: int = FRAMES, n_meters: int = METERS
) -> tuple[bytes, list[tuple[int, int]], list[str]]:
    """`frames` energy-block replies (FE x 4 preamble each) from `n_meters` meters, one stream."""
    block = lookup(ENERGY_BLOCK_DI)
    assert block is not None
    meters = [f"{rng.randrange(10**12):012d}" for _ in range(n_meters)]
    parts = []
    spans = []
    pos = 0
    for k in range(frames):
        values = [rng.randrange(10**8) for _ in range(5)]
        raw = encode_read_reply(meters[k % n_meters], ENERGY_BLOCK_DI, encode_value(block, values))
        parts.append(raw)
        spans.append((pos + 4, pos + len(raw)))  # the frame without its preamble
        pos += len(raw)
    return b"".join(parts), spans, meters


def measure(
    frames: int = FRAMES, requests: int = REQUESTS, rounds: int = ROUNDS
) -> tuple[dict[str, float], str]:
    """The codec's figures (and the notes of the report): `rounds` interleaved rounds of each
    subject and its baseline on a stream of `frames` replies and `requests` read requests."""
    FRAMES, REQUESTS, ROUNDS = frames, requests, rounds  # the module's sizes, for this call
    rng = random.Random(645)
    stream, spans, meters = reply_stream(rng, FRAMES)
    chunks = [stream[k : k + CHUNK] for k in range(0, len(stream), CHUNK)]

    def baseline_slices() -> None:
        for start, end in spans:
            stream[start:end]

    def reader_only() -> None:
        reader = FrameReader()
        n = 0
        for chunk in chunks:
            n += len(reader.feed(chunk))
        assert n == FRAMES

    def reader_batch_decode() -> None:
        reader = FrameReader()
        n = 0
        for chunk in chunks:
            _, ok = decode_energy_blocks(reader.feed(chunk))
            n += int(ok.sum())
        assert n == FRAMES

    def reader_decode_reply() -> None:
        reader = FrameReader()
        n = 0
        for chunk in chunks:
            for frame in reader.feed(chunk):
                n += decode_reply(frame).values is not None  # type: ignore[union-attr]
        assert n == FRAMES

    pairs = [(meters[k % METERS], ENERGY_BLOCK_DI) for k in range(REQUESTS)]
    constant = encode_read(meters[0], ENERGY_BLOCK_DI)

    def baseline_calls() -> None:
        def same(address: str, di: int) -> bytes:
            return constant

        for address, di in pairs:
            same(address, di)

    def encode_warm() -> None:
        for address, di in pairs:
            encode_read(address, di)

    cold_pairs = [(f"{k:012d}", ENERGY_BLOCK_DI) for k in range(100_000)]

    def encode_cold() -> None:
        messages._HEADS.clear()  # every address new: header built and checked once each
        for address, di in cold_pairs:
            encode_read(address, di)

    # Interleaved rounds: each subject and its baseline run back to back, so that the load
    # other processes put on the machine hits both; ratios are per round, then the median.
    subjects = {
        "slice": (baseline_slices, FRAMES),
        "fast": (reader_batch_decode, FRAMES),
        "bare": (reader_only, FRAMES),
        "call": (baseline_calls, REQUESTS),
        "encode": (encode_warm, REQUESTS),
    }
    rates: dict[str, list[float]] = {name: [] for name in subjects}
    for fn, items in subjects.values():
        fn()  # warm up
    for _ in range(ROUNDS):
        for name, (fn, items) in subjects.items():
            rates[name].append(median_rate(fn, items, repeats=1, warmup=0))
    general = median_rate(reader_decode_reply, FRAMES, repeats=3)
    enc_cold = median_rate(encode_cold, len(cold_pairs), repeats=3)

    def med(name: str) -> float:
        return statistics.median(rates[name])

    def ratio(base: str, subject: str) -> float:
        per_round = [b / s for b, s in zip(rates[base], rates[subject], strict=True)]
        return round(statistics.median(per_round), 1)

    figures = {
        "stream MB": round(len(stream) / 1e6, 1),
        "baseline: slice each frame, frames/s": med("slice"),
        "reader + decode_energy_blocks: median, frames/s": med("fast"),
        "reader + decode_energy_blocks: slice baseline / this": ratio("slice", "fast"),
        "reader + decode_energy_blocks: best round, frames/s": max(rates["fast"]),
        "reader + decode_energy_blocks: MB/s": round(med("fast") * len(stream) / FRAMES / 1e6, 1),
        "reader only (Frame objects), frames/s": med("bare"),
        "reader + decode_reply per frame, frames/s": general,
        "baseline: call returning a constant, calls/s": med("call"),
        "encode_read, cached header: median, requests/s": med("encode"),
        "encode_read: call baseline / this": ratio("call", "encode"),
        "encode_read: best round, requests/s": max(rates["encode"]),
        "encode_read, new address each, requests/s": enc_cold,
    }
    notes = (
        f"{FRAMES} energy-block replies (40 bytes each with FE x4) from {METERS} meters, one "
        f"contiguous stream fed in {CHUNK}-byte chunks. The 400k/s target is measured on "
        "FrameReader.feed + decode_energy_blocks (numpy batch BCD); decode_reply per frame is "
        "the general path. encode_read: 1000 meters, DI 0001FF00, headers cached per address."
    )
    return figures, notes


def main() -> None:
    figures, notes = measure()
    report("codec", figures, notes=notes)


if __name__ == "__main__":
    main()
