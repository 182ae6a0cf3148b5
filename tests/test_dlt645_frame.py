"""DL/T 645 framing: addresses, checksum, frame encoding, and the frame reader's guarantees."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.collectors.dlt645 import (
    BROADCAST,
    WILDCARD,
    CodecError,
    Frame,
    FrameError,
    FrameReader,
    address_from_wire,
    address_to_wire,
    checksum,
    encode_frame,
)

MAX_FRAME = 12 + 255

addresses = st.builds(
    lambda wild, digits: "AA" * wild + digits[2 * wild :],
    st.integers(0, 6),
    st.text("0123456789", min_size=12, max_size=12),
)
concrete_addresses = st.text("0123456789", min_size=12, max_size=12)
payloads = st.binary(max_size=255)
controls = st.integers(0, 255)


def by_definition(address: str, control: int, plain: bytes, preamble: int) -> bytes:
    """A frame written straight from PROTOCOL.md, independent of the encoder."""
    wire_address = bytes(int(address[k : k + 2], 16) for k in range(10, -1, -2))
    body = bytes([0x68, *wire_address, 0x68, control, len(plain)])
    body += bytes((b + 0x33) % 256 for b in plain)
    return bytes([0xFE] * preamble) + body + bytes([sum(body) % 256, 0x16])


def frames_of(items: list[Frame | FrameError]) -> list[Frame]:
    return [x for x in items if isinstance(x, Frame)]


def feed_all(
    stream: bytes, chunks: list[int] | None = None, **kw: object
) -> tuple[list[Frame | FrameError], FrameReader]:
    reader = FrameReader(**kw)  # type: ignore[arg-type]
    out: list[Frame | FrameError] = []
    if chunks is None:
        out += reader.feed(stream)
    else:
        pos = 0
        for size in chunks:
            out += reader.feed(stream[pos : pos + size])
            pos += size
        out += reader.feed(stream[pos:])
    out += reader.eof()
    return out, reader


# --- addresses ----------------------------------------------------------------------------------


def test_address_example_from_protocol() -> None:
    assert address_to_wire("123456789012") == bytes([0x12, 0x90, 0x78, 0x56, 0x34, 0x12])
    assert address_from_wire(bytes([0x12, 0x90, 0x78, 0x56, 0x34, 0x12])) == "123456789012"


def test_broadcast_and_wildcard() -> None:
    assert address_to_wire(BROADCAST) == b"\x99" * 6
    assert address_to_wire(WILDCARD) == b"\xaa" * 6
    assert address_to_wire("AAAA56789012") == bytes([0x12, 0x90, 0x78, 0x56, 0xAA, 0xAA])
    assert address_to_wire("aaaa56789012") == address_to_wire("AAAA56789012")
    assert address_from_wire(bytes([0x12, 0x90, 0x78, 0x56, 0xAA, 0xAA])) == "AAAA56789012"


@pytest.mark.parametrize(
    "bad",
    [
        "12345678901",
        "1234567890123",
        "12345678901A",
        "12AA56789012",
        "1234567890AA",
        "",
        "12345678901 ",
    ],
)
def test_bad_addresses_are_codec_errors(bad: str) -> None:
    with pytest.raises(CodecError):
        address_to_wire(bad)


def test_non_bcd_wire_address_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        address_from_wire(bytes([0x1F, 0, 0, 0, 0, 0]))
    with pytest.raises(CodecError):
        address_from_wire(b"\x12\x34")


@settings(derandomize=True)
@given(addresses)
def test_address_round_trip(address: str) -> None:
    assert address_from_wire(address_to_wire(address)) == address


# --- checksum and encoding ----------------------------------------------------------------------


@settings(derandomize=True)
@given(st.binary(max_size=400))
def test_checksum_is_the_byte_sum_mod_256(b: bytes) -> None:
    total = 0
    for x in b:
        total = (total + x) % 256
    assert checksum(b) == total


@settings(derandomize=True)
@given(addresses, controls, payloads, st.integers(0, 8))
def test_encode_frame_matches_the_definition(
    address: str, control: int, plain: bytes, preamble: int
) -> None:
    assert encode_frame(address, control, plain, preamble=preamble) == by_definition(
        address, control, plain, preamble
    )


def test_encode_frame_rejects_what_does_not_fit() -> None:
    with pytest.raises(CodecError):
        encode_frame("123456789012", 0x11, bytes(256))
    with pytest.raises(CodecError):
        encode_frame("123456789012", 0x100, b"")
    with pytest.raises(CodecError):
        encode_frame("123456789012", 0x11, b"", preamble=-1)


def test_frame_flags() -> None:
    (f,) = FrameReader().feed(encode_frame("123456789012", 0xF1, b"\x01"))
    assert isinstance(f, Frame)
    assert (f.function, f.is_reply, f.is_abnormal, f.has_more) == (0x11, True, True, True)
    (g,) = FrameReader().feed(encode_frame("123456789012", 0x11, b""))
    assert isinstance(g, Frame)
    assert (g.function, g.is_reply, g.is_abnormal, g.has_more) == (0x11, False, False, False)
    assert g.address == "123456789012" and g.address_wire == address_to_wire("123456789012")


# --- the reader: single frames and chunking -----------------------------------------------------


@settings(derandomize=True)
@given(addresses, controls, payloads, st.integers(0, 40))
def test_reader_round_trip(address: str, control: int, plain: bytes, preamble: int) -> None:
    out, reader = feed_all(encode_frame(address, control, plain, preamble=preamble))
    assert out == [Frame(address_to_wire(address), control, plain, True)]
    assert reader.discarded == 0 and reader.buffered == 0
    assert out[0].to_wire() == encode_frame(address, control, plain, preamble=0)


def sample_stream(seed: int, count: int = 12) -> tuple[bytes, list[Frame]]:
    rng = random.Random(seed)
    parts: list[bytes] = []
    expected: list[Frame] = []
    for _ in range(count):
        address = f"{rng.randrange(10**12):012d}"
        control = rng.choice([0x11, 0x91, 0xB1, 0xD1, 0x1C, 0x9C, 0x08])
        plain = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 4, 24, 200, 255])))
        parts.append(encode_frame(address, control, plain, preamble=rng.randrange(6)))
        expected.append(Frame(address_to_wire(address), control, plain, True))
    return b"".join(parts), expected


def test_stream_split_at_every_offset_gives_the_same_frames() -> None:
    stream, expected = sample_stream(7, count=6)
    whole, _ = feed_all(stream)
    assert whole == expected
    for cut in range(len(stream) + 1):
        out, reader = feed_all(stream, [cut])
        assert out == expected, cut
        assert reader.buffered == 0


def test_stream_fed_byte_by_byte() -> None:
    stream, expected = sample_stream(8)
    out, reader = feed_all(stream, [1] * len(stream))
    assert out == expected
    assert reader.discarded == 0


@given(st.integers(0, 2**32), st.lists(st.integers(0, 600), max_size=20))
@settings(max_examples=60, derandomize=True)
def test_any_chunking_gives_the_same_frames(seed: int, chunks: list[int]) -> None:
    stream, expected = sample_stream(seed, count=5)
    out, _ = feed_all(stream, chunks)
    assert out == expected


@settings(derandomize=True)
@given(st.integers(0, 5000))
def test_fe_runs_of_any_length(run: int) -> None:
    frame = encode_frame("000000000001", 0x91, b"\x00\x01\x02", preamble=0)
    out, reader = feed_all(b"\xfe" * run + frame + b"\xfe" * run + frame)
    assert len(frames_of(out)) == 2 and len(out) == 2
    assert reader.discarded == 0


# --- the reader: hostile and broken input -------------------------------------------------------


def bound(reader: FrameReader) -> bool:
    return reader.buffered < 12 + reader.max_data_len


@given(st.lists(st.binary(max_size=300), max_size=12))
@settings(max_examples=300, derandomize=True)
def test_random_bytes_never_raise_and_account_for_every_byte(chunks: list[bytes]) -> None:
    reader = FrameReader()
    out: list[Frame | FrameError] = []
    for chunk in chunks:
        out += reader.feed(chunk)
        assert bound(reader)
    out += reader.eof()
    assert reader.buffered == 0
    stream = b"".join(chunks)
    framed = sum(12 + len(f.data) for f in frames_of(out))
    # Every byte is in a frame, discarded, or an FE of a preamble.
    unaccounted = len(stream) - framed - reader.discarded
    assert 0 <= unaccounted <= stream.count(0xFE)
    for item in out:
        if isinstance(item, FrameError):
            assert item.kind in FrameError.KINDS
            assert stream[item.offset] == 0x68


@given(st.integers(0, 2**32), st.data())
@settings(max_examples=200, derandomize=True)
def test_mutated_frame_does_not_hide_its_neighbours(seed: int, data: st.DataObject) -> None:
    rng = random.Random(seed)
    good_a = encode_frame("111111111111", 0x91, bytes(rng.randrange(256) for _ in range(8)))
    good_c = encode_frame("333333333333", 0x91, bytes(rng.randrange(256) for _ in range(8)))
    middle = bytearray(
        encode_frame("222222222222", 0x91, bytes(rng.randrange(256) for _ in range(30)))
    )
    for _ in range(data.draw(st.integers(1, 4))):
        k = data.draw(st.integers(0, len(middle) - 1))
        middle[k] = data.draw(st.integers(0, 255))
    # The stream goes on after good_c, so whatever candidate the mutation made gets decided.
    out, _ = feed_all(good_a + bytes(middle) + good_c + bytes(MAX_FRAME))
    found = frames_of(out)
    assert found[0].address == "111111111111"
    assert found[-1].address == "333333333333"


def test_megabytes_of_garbage_with_frames_interleaved() -> None:
    rng = random.Random(645)
    stream = bytearray()
    expected: list[Frame] = []
    for k in range(400):
        stream += rng.randbytes(rng.randrange(10_000))  # any byte, 68 and FE included
        plain = rng.randbytes(rng.choice([4, 24, 100]))
        address = f"{k:012d}"
        stream += encode_frame(address, 0x91, plain, preamble=rng.randrange(5))
        expected.append(Frame(address_to_wire(address), 0x91, plain, True))
    assert len(stream) > 1_900_000
    reader = FrameReader()
    found: list[Frame] = []
    pos = 0
    while pos < len(stream):
        size = rng.randrange(1, 70_000)
        found += frames_of(reader.feed(bytes(stream[pos : pos + size])))
        assert bound(reader)
        pos += size
    reader.eof()
    # Every real frame comes out, in order (garbage may add the odd frame of its own).
    it = iter(found)
    assert all(any(f == e for f in it) for e in expected)


def test_clean_garbage_is_counted_exactly() -> None:
    rng = random.Random(1)
    junk_bytes = bytes(b for b in range(256) if b not in (0x68, 0xFE))
    stream = b""
    junk_total = 0
    for k in range(50):
        junk = bytes(rng.choice(junk_bytes) for _ in range(rng.randrange(3000)))
        junk_total += len(junk)
        stream += junk + encode_frame(f"{k:012d}", 0x11, b"\x00\xff\x01\x00")
    out, reader = feed_all(stream, [4096] * (len(stream) // 4096))
    assert len(out) == 50 and all(isinstance(f, Frame) for f in out)
    assert reader.discarded == junk_total


def test_memory_stays_bounded_on_a_long_stream() -> None:
    rng = random.Random(2)
    block = rng.randbytes(1 << 16) + encode_frame("000000000001", 0x91, bytes(24))
    reader = FrameReader()
    reader.feed(block)  # warm up
    tracemalloc.start()
    try:
        for _ in range(64):  # 4 MiB
            for k in range(0, len(block), 4096):
                reader.feed(block[k : k + 4096])
                assert bound(reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_hostile_run_of_68_bytes_is_survived() -> None:
    out, reader = feed_all(b"\x68" * 20_000)
    assert all(isinstance(x, FrameError) for x in out)
    assert reader.buffered == 0


def test_frame_hidden_inside_a_bad_candidate_is_found() -> None:
    hidden = encode_frame("123456789012", 0x91, b"\x01\x02\x03", preamble=0)
    # A candidate whose header claims 200 bytes of data, wrapped around the real frame.
    fake = b"\x68" + b"\x00" * 6 + b"\x68\x91\xc8" + b"\x00" * 5
    stream = fake + hidden + b"\x00" * 300
    out, _ = feed_all(stream)
    assert frames_of(out) == [Frame(address_to_wire("123456789012"), 0x91, b"\x01\x02\x03", True)]
    assert [e.kind for e in out if isinstance(e, FrameError)] == ["bad_end"]


def corrupt(kind: str) -> bytes:
    frame = bytearray(encode_frame("123456789012", 0x91, b"\x10\x20\x30\x40", preamble=0))
    if kind == "bad_checksum":
        frame[-2] ^= 0x01
    elif kind == "bad_end":
        frame[-1] = 0x17
    elif kind == "bad_length":
        frame[9] = 60  # L above max_data_len=50 below
    return bytes(frame)


@pytest.mark.parametrize("kind", ["bad_checksum", "bad_end", "bad_length"])
@pytest.mark.parametrize("lead", [0, 3, 17])
def test_each_bad_candidate_kind_and_the_next_frame(kind: str, lead: int) -> None:
    good = encode_frame("000000000007", 0x91, b"\x01", preamble=2)
    stream = b"\x00" * lead + corrupt(kind) + good
    for chunks in (None, [1] * len(stream), [lead + 5]):
        out, _ = feed_all(stream, chunks, max_data_len=50)
        errors = [e for e in out if isinstance(e, FrameError)]
        assert [e.kind for e in errors] == [kind]
        assert errors[0].offset == lead
        assert frames_of(out) == [Frame(address_to_wire("000000000007"), 0x91, b"\x01", True)]


def test_lenient_checksum_yields_the_frame() -> None:
    out, _ = feed_all(corrupt("bad_checksum"), strict_checksum=False)
    assert out == [Frame(address_to_wire("123456789012"), 0x91, b"\x10\x20\x30\x40", False)]


def test_truncated_at_end_of_stream() -> None:
    good = encode_frame("000000000007", 0x91, b"\x01")
    partial = encode_frame("000000000008", 0x91, b"\x01\x02\x03")[:-3]
    reader = FrameReader()
    out = reader.feed(good + partial)
    assert frames_of(out) == out and len(out) == 1
    assert reader.buffered == len(partial) - 4  # the FE preamble is not held
    (err,) = reader.eof()
    assert err.kind == "truncated" and err.offset == len(good) + 4
    assert reader.buffered == 0 and reader.eof() == []


def test_eof_does_not_rescan_an_unfinished_candidate() -> None:
    """Known limit: eof() returns errors only, so a frame inside an undecided candidate is lost."""
    hidden = encode_frame("123456789012", 0x91, b"\x01", preamble=0)
    fake = b"\x68" + b"\x00" * 6 + b"\x68\x91\xc8"
    reader = FrameReader()
    assert reader.feed(fake + hidden) == []
    assert [e.kind for e in reader.eof()] == ["truncated"]


def test_offsets_are_stream_offsets_across_feeds() -> None:
    bad = corrupt("bad_checksum")
    reader = FrameReader()
    assert reader.feed(b"\x00" * 1000) == []
    out = reader.feed(b"\x00" * 5 + bad)
    assert [(e.kind, e.offset) for e in out if isinstance(e, FrameError)] == [
        ("bad_checksum", 1005)
    ]
    assert reader.discarded == 1005 + len(bad)  # rescanned, every byte of it was garbage


def test_max_data_len_is_checked() -> None:
    with pytest.raises(CodecError):
        FrameReader(max_data_len=256)


@pytest.mark.parametrize("length", [0, 1, 200, 245, 246, 247, 254, 255])
@pytest.mark.parametrize("fill", [0x00, 0xCC, 0xCB])  # 0xCC goes on the wire as FF, 0xCB as FE
def test_checksum_at_every_length_boundary(length: int, fill: int) -> None:
    """The reader's fast checksum agrees with `checksum` on the largest byte sums."""
    good = encode_frame("999999999999", 0xFF, bytes([fill]) * length, preamble=0)
    assert good[-2] == checksum(good[:-2])
    out, _ = feed_all(good)
    assert out == [Frame(b"\x99" * 6, 0xFF, bytes([fill]) * length, True)]
    for delta in (1, 255):
        bad = good[:-2] + bytes([(good[-2] + delta) % 256, 0x16])
        out, _ = feed_all(bad)
        assert isinstance(out[0], FrameError) and out[0].kind == "bad_checksum"
        assert frames_of(out) == []  # (the rescan may also find the second 68 unfinished)
