"""DL/T 645 messages: every encoder against its decoder, PROTOCOL.md's examples, and 1CH."""

from __future__ import annotations

import random
from datetime import datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.collectors.dlt645 import (
    BROADCAST,
    CONTROL_ERROR_BITS,
    ERROR_BITS,
    WILDCARD,
    AbnormalReply,
    AckReply,
    AddressReply,
    CodecError,
    CommandEncoder,
    ControlAction,
    ControlRequest,
    Credentials,
    DataItem,
    FollowupRequest,
    Frame,
    FrameError,
    FrameReader,
    PlaintextEncoder,
    ReadAddressRequest,
    ReadReply,
    ReadReplyEncoder,
    ReadRequest,
    TimeSetRequest,
    UnknownReply,
    UnknownRequest,
    WriteRequest,
    address_to_wire,
    decode_energy_blocks,
    decode_reply,
    decode_request,
    decode_value,
    encode_abnormal_reply,
    encode_ack,
    encode_address_reply,
    encode_control,
    encode_frame,
    encode_read,
    encode_read_address,
    encode_read_followup,
    encode_read_reply,
    encode_time_set,
    encode_value,
    encode_write,
    items,
    lookup,
)

meters = st.text("0123456789", min_size=12, max_size=12).filter(lambda a: a != BROADCAST)
dis = st.integers(0, 0xFFFFFFFF)
dis_1997 = st.integers(0, 0xFFFF)
times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31, 23, 59, 59)
).map(lambda t: t.replace(microsecond=0))
credentials = st.builds(
    Credentials,
    st.integers(0, 255),
    st.text("0123456789ABCDEF", min_size=6, max_size=6),
    st.text("0123456789ABCDEF", min_size=8, max_size=8),
)


def one_frame(raw: bytes) -> Frame:
    reader = FrameReader()
    (frame,) = reader.feed(raw)
    assert isinstance(frame, Frame) and reader.eof() == []
    return frame


def wire(plain: bytes) -> bytes:
    return bytes((b + 0x33) % 256 for b in plain)


# --- the layouts PROTOCOL.md gives --------------------------------------------------------------


def test_read_request_layout_2007_and_1997() -> None:
    raw = encode_read("123456789012", 0x0001FF00)
    header = bytes.fromhex("FEFEFEFE 68 129078563412 68 11 04".replace(" ", ""))
    assert raw.startswith(header)
    assert raw[14:18] == wire(bytes([0x00, 0xFF, 0x01, 0x00]))  # DI0 first
    assert raw[18] == sum(raw[4:18]) % 256 and raw[19] == 0x16
    old = encode_read("123456789012", 0x9010, protocol=1997, preamble=0)
    assert old[8:10] == bytes([0x01, 0x02]) and old[10:12] == wire(bytes([0x10, 0x90]))


def test_1ch_worked_example_built_from_the_definition() -> None:
    # Meter 123456789012, plaintext trip, PA=02, password 000000, operator 00000000,
    # deadline 2099-12-31 23:59:59.
    plain = bytes(
        [0x02, 0x00, 0x00, 0x00]  # PA P0 P1 P2
        + [0x00, 0x00, 0x00, 0x00]  # C0..C3
        + [0x1A, 0x00]  # N1 trip, N2 reserved
        + [0x59, 0x59, 0x23, 0x31, 0x12, 0x99]  # ss mm hh DD MM YY
    )
    body = bytes([0x68, 0x12, 0x90, 0x78, 0x56, 0x34, 0x12, 0x68, 0x1C, 0x10]) + wire(plain)
    cs = 0
    for b in body:  # from the first 68 through the last DATA byte, mod 256
        cs = (cs + b) % 256
    expected = b"\xfe" * 4 + body + bytes([cs, 0x16])
    built = encode_control(
        "123456789012",
        ControlAction.TRIP,
        datetime(2099, 12, 31, 23, 59, 59),
        Credentials(password_level=2, password="000000", operator="00000000"),
    )
    assert built == expected
    assert len(plain) == 16


def test_control_actions() -> None:
    assert {a.name: a.value for a in ControlAction} == {
        "TRIP": 0x1A,
        "CLOSE_ALLOWED": 0x1B,
        "CLOSE_DIRECT": 0x1C,
        "ALARM": 0x2A,
        "ALARM_RELEASE": 0x2B,
        "KEEP_POWER": 0x3A,
        "KEEP_POWER_RELEASE": 0x3B,
    }


def test_password_and_operator_go_low_byte_first() -> None:
    payload = PlaintextEncoder().encode(
        ControlAction.CLOSE_DIRECT,
        datetime(2030, 1, 2, 3, 4, 5),
        Credentials(4, "123456", "89ABCDEF"),
    )
    assert payload == bytes.fromhex("04 563412 EFCDAB89 1C00 050403020130".replace(" ", ""))


def test_reply_control_codes() -> None:
    assert one_frame(encode_read_reply("123456789012", 0x00010000, bytes(4))).control == 0x91
    assert (
        one_frame(encode_read_reply("123456789012", 0x00010000, bytes(4), more=True)).control
        == 0xB1
    )
    assert (
        one_frame(encode_read_reply("123456789012", 0x9010, bytes(4), protocol=1997)).control
        == 0x81
    )
    assert (
        one_frame(
            encode_read_reply("123456789012", 0x9010, bytes(4), protocol=1997, more=True)
        ).control
        == 0xA1
    )
    assert one_frame(encode_abnormal_reply("123456789012", 0x11, 0x02)).control == 0xD1
    assert one_frame(encode_abnormal_reply("123456789012", 0x1C, 0x20, word=True)).control == 0xDC
    ack = one_frame(encode_ack("123456789012", 0x1C))
    assert ack.control == 0x9C and ack.data == b""
    assert one_frame(encode_ack("123456789012", 0x14)).control == 0x94
    addr = one_frame(encode_address_reply("123456789012"))
    assert addr.control == 0x93 and addr.data == address_to_wire("123456789012")
    ra = one_frame(encode_read_address())
    assert ra.control == 0x13 and ra.address == WILDCARD and ra.data == b""


def test_time_set_is_plus_33_too() -> None:
    raw = encode_time_set(BROADCAST, datetime(2024, 5, 17, 8, 30, 0), preamble=0)
    assert raw[8:10] == bytes([0x08, 0x06])
    assert raw[10:16] == wire(bytes([0x00, 0x30, 0x08, 0x17, 0x05, 0x24]))


# --- targets the standard forbids ---------------------------------------------------------------


def test_broadcast_and_wildcard_only_where_allowed() -> None:
    deadline = datetime(2030, 1, 1)
    with pytest.raises(CodecError):
        encode_read(BROADCAST, 0x00010000)
    with pytest.raises(CodecError):
        encode_control(BROADCAST, ControlAction.TRIP, deadline, Credentials())
    with pytest.raises(CodecError):
        encode_control(WILDCARD, ControlAction.TRIP, deadline, Credentials())
    with pytest.raises(CodecError):
        encode_write(WILDCARD, 0x04000101, b"\x00", Credentials())
    encode_read(WILDCARD, 0x00010000)  # allowed
    encode_time_set(BROADCAST, deadline)  # allowed


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_read("123456789012", 0x1_0000_0000),
        lambda: encode_read("123456789012", 0x10000, protocol=1997),
        lambda: encode_read("123456789012", 1, protocol=2020),
        lambda: encode_read("12345678901X", 1),
        lambda: encode_read_followup("123456789012", 1, 256),
        lambda: encode_write("123456789012", 1, bytes(39), Credentials()),
        lambda: encode_read_reply("123456789012", 1, bytes(197)),
        lambda: encode_abnormal_reply("123456789012", 0x11, 0x100),
        lambda: encode_abnormal_reply("123456789012", 0x20, 0x01),
        lambda: encode_address_reply(WILDCARD),
        lambda: encode_time_set(BROADCAST, datetime(1999, 12, 31)),
        lambda: encode_control(
            "123456789012", ControlAction.TRIP, datetime(2100, 1, 1), Credentials()
        ),
    ],
)
def test_encoders_reject_what_cannot_go_on_the_wire(call: object) -> None:
    with pytest.raises(CodecError):
        call()  # type: ignore[operator]


# --- credentials never leak ---------------------------------------------------------------------


def test_credentials_repr_hides_secrets() -> None:
    c = Credentials(2, "987654", "13572468")
    for text in (repr(c), str(c), f"{c}", repr(ControlRequest("123456789012", c, 0x1A, 0, None))):
        assert "987654" not in text and "13572468" not in text
    assert "password_level=2" in repr(c)


@pytest.mark.parametrize(
    ("password", "operator"),
    [("98765", "00000000"), ("98765Z", "00000000"), ("000000", "1357246"), ("000000", "135724GG")],
)
def test_bad_credentials_do_not_echo_the_value(password: str, operator: str) -> None:
    with pytest.raises(CodecError) as exc:
        Credentials(2, password, operator)
    assert password not in str(exc.value) and operator not in str(exc.value)


# --- round trips --------------------------------------------------------------------------------


@settings(derandomize=True)
@given(meters, dis, st.integers(0, 8))
def test_read_round_trip_2007(address: str, di: int, preamble: int) -> None:
    raw = encode_read(address, di, preamble=preamble)
    # The cached fast path builds the same bytes as the general encoder.
    assert raw == encode_frame(address, 0x11, di.to_bytes(4, "little"), preamble=preamble)
    assert decode_request(one_frame(raw)) == ReadRequest(address, di, 2007)


@settings(derandomize=True)
@given(meters, dis_1997)
def test_read_round_trip_1997(address: str, di: int) -> None:
    raw = encode_read(address, di, protocol=1997)
    assert raw == encode_frame(address, 0x01, di.to_bytes(2, "little"))
    assert decode_request(one_frame(raw)) == ReadRequest(address, di, 1997)


@settings(derandomize=True)
@given(meters, dis, st.integers(0, 255))
def test_followup_round_trip(address: str, di: int, seq: int) -> None:
    frame = one_frame(encode_read_followup(address, di, seq))
    assert frame.control == 0x12
    assert decode_request(frame) == FollowupRequest(address, di, seq)


def test_read_address_round_trip() -> None:
    assert decode_request(one_frame(encode_read_address())) == ReadAddressRequest(WILDCARD)


@settings(derandomize=True)
@given(meters, dis, st.binary(max_size=38), credentials)
def test_write_round_trip(address: str, di: int, value: bytes, creds: Credentials) -> None:
    frame = one_frame(encode_write(address, di, value, creds))
    assert frame.control == 0x14
    assert decode_request(frame) == WriteRequest(address, di, creds, value)


@settings(derandomize=True)
@given(st.one_of(meters, st.just(BROADCAST)), times)
def test_time_set_round_trip(address: str, when: datetime) -> None:
    assert decode_request(one_frame(encode_time_set(address, when))) == TimeSetRequest(
        address, when
    )


@settings(derandomize=True)
@given(meters, st.sampled_from(list(ControlAction)), times, credentials)
def test_control_round_trip(
    address: str, action: ControlAction, deadline: datetime, creds: Credentials
) -> None:
    frame = one_frame(encode_control(address, action, deadline, creds))
    assert frame.control == 0x1C and len(frame.data) == 16
    assert decode_request(frame) == ControlRequest(address, creds, int(action), 0, deadline)


def test_control_with_an_invalid_deadline_decodes_to_none() -> None:
    plain = Credentials().to_wire() + bytes([0x1A, 0x00]) + bytes.fromhex("000000321299")
    request = decode_request(one_frame(encode_frame("123456789012", 0x1C, plain)))
    assert isinstance(request, ControlRequest) and request.deadline is None


class FakeEsamEncoder:
    """Stands in for an ESAM encoder: a different payload, nothing else touched."""

    def encode(self, action: ControlAction, deadline: datetime, credentials: Credentials) -> bytes:
        return bytes([0x98]) + bytes(7) + bytes([int(action)]) + bytes(23)


def test_a_command_encoder_plugs_in() -> None:
    encoder = FakeEsamEncoder()
    assert isinstance(encoder, CommandEncoder)
    assert isinstance(PlaintextEncoder(), CommandEncoder)
    frame = one_frame(
        encode_control(
            "123456789012", ControlAction.TRIP, datetime(2030, 1, 1), Credentials(), encoder=encoder
        )
    )
    assert frame.data[0] == 0x98 and len(frame.data) == 32
    assert isinstance(decode_request(frame), UnknownRequest)  # ciphertext: not plaintext 1CH


@settings(derandomize=True)
@given(st.sampled_from(items()), meters, st.data(), st.booleans())
def test_read_reply_round_trip_every_item(
    item: DataItem, address: str, data: st.DataObject, more: bool
) -> None:
    if item.grouped:
        one = st.integers(0, 99)
    elif item.signed:
        one = st.integers(-item.max_value, item.max_value)
    else:
        one = st.integers(0, item.max_value)
    values = tuple(data.draw(st.lists(one, min_size=item.fields, max_size=item.fields)))
    raw = encode_value(item, values)
    reply = decode_reply(
        one_frame(encode_read_reply(address, item.di, raw, protocol=item.protocol, more=more))
    )
    assert reply == ReadReply(address, item.di, item.protocol, item, values, raw, more)


@settings(derandomize=True)
@given(meters, dis, st.binary(max_size=100))
def test_unknown_di_is_not_an_error(address: str, di: int, value: bytes) -> None:
    reply = decode_reply(one_frame(encode_read_reply(address, di, value)))
    assert isinstance(reply, ReadReply)
    assert reply.raw == value and reply.di == di
    if lookup(di) is None:
        assert reply.item is None and reply.values is None


def test_known_di_with_a_bad_value_keeps_the_item() -> None:
    reply = decode_reply(
        one_frame(encode_read_reply("123456789012", 0x00010000, b"\x0a\x00\x00\x00"))
    )
    assert isinstance(reply, ReadReply) and reply.item is not None and reply.values is None


def test_followup_reply_carries_seq() -> None:
    item = lookup(0x00010000)
    assert item is not None
    plain = (0x00010000).to_bytes(4, "little") + encode_value(item, [42]) + bytes([3])
    reply = decode_reply(one_frame(encode_frame("123456789012", 0x92, plain)))
    assert isinstance(reply, ReadReply) and reply.values == (42,) and reply.seq == 3


@settings(derandomize=True)
@given(meters, st.integers(0, 255))
def test_abnormal_reply_error_byte(address: str, error: int) -> None:
    reply = decode_reply(one_frame(encode_abnormal_reply(address, 0x11, error)))
    assert isinstance(reply, AbnormalReply) and reply.error == error and reply.function == 0x11
    expected = [ERROR_BITS[1 << k] for k in range(7) if error & (1 << k)]
    assert [e for e in reply.errors if not e.startswith("unknown")] == expected


@settings(derandomize=True)
@given(meters, st.integers(0, 0xFFFF))
def test_abnormal_control_reply_error_word(address: str, word: int) -> None:
    reply = decode_reply(one_frame(encode_abnormal_reply(address, 0x1C, word, word=True)))
    assert isinstance(reply, AbnormalReply) and reply.error == word and reply.function == 0x1C
    expected = [CONTROL_ERROR_BITS[1 << k] for k in range(6) if word & (1 << k)]
    assert [e for e in reply.errors if not e.startswith("unknown")] == expected


def test_error_bit_tables_match_protocol() -> None:
    assert ERROR_BITS == {
        0x01: "other error",
        0x02: "no requested data",
        0x04: "password wrong or unauthorized",
        0x08: "baud rate cannot change",
        0x10: "year zones exceeded",
        0x20: "day slots exceeded",
        0x40: "tariffs exceeded",
    }
    assert CONTROL_ERROR_BITS == {
        0x0001: "suspended",
        0x0002: "MAC error",
        0x0004: "password error",
        0x0008: "authentication timeout",
        0x0010: "deadline invalid",
        0x0020: "keep-power in force",
    }


@pytest.mark.parametrize("error", [0x01, 0x02])
def test_unknown_di_reported_as_bit0_or_bit1(error: int) -> None:
    reply = decode_reply(one_frame(encode_abnormal_reply("123456789012", 0x11, error)))
    assert isinstance(reply, AbnormalReply) and reply.no_data
    refused = decode_reply(one_frame(encode_abnormal_reply("123456789012", 0x11, 0x04)))
    assert isinstance(refused, AbnormalReply) and not refused.no_data


def test_keep_power_refusal() -> None:
    reply = decode_reply(one_frame(encode_abnormal_reply("123456789012", 0x1C, 0x0020, word=True)))
    assert isinstance(reply, AbnormalReply) and reply.errors == ("keep-power in force",)
    short = decode_reply(one_frame(encode_abnormal_reply("123456789012", 0x1C, 0x04)))
    assert isinstance(short, AbnormalReply) and short.errors == ("password wrong or unauthorized",)


@settings(derandomize=True)
@given(meters, st.sampled_from([0x1C, 0x14, 0x08, 0x16]))
def test_ack_round_trip(address: str, function: int) -> None:
    assert decode_reply(one_frame(encode_ack(address, function))) == AckReply(address, function)


@settings(derandomize=True)
@given(meters)
def test_address_reply_round_trip(address: str) -> None:
    assert decode_reply(one_frame(encode_address_reply(address))) == AddressReply(address)


# --- decoders never raise -----------------------------------------------------------------------


@given(
    st.binary(min_size=6, max_size=6), st.integers(0, 255), st.binary(max_size=255), st.booleans()
)
@settings(max_examples=500, derandomize=True)
def test_decoders_never_raise(address_wire: bytes, control: int, data: bytes, ok: bool) -> None:
    frame = Frame(address_wire, control, data, ok)
    reply = decode_reply(frame)
    request = decode_request(frame)
    if not control & 0x80:
        assert isinstance(reply, UnknownReply)
    else:
        assert isinstance(request, UnknownRequest)


@pytest.mark.parametrize(
    ("control", "data"),
    [
        (0x11, b"\x00\x01"),
        (0x12, bytes(4)),
        (0x13, b"\x00"),
        (0x14, bytes(11)),
        (0x08, bytes(5)),
        (0x1C, bytes(15)),
        (0x02, bytes(2)),
        (0x01, b""),
    ],
)
def test_malformed_requests_are_unknown(control: int, data: bytes) -> None:
    request = decode_request(Frame(address_to_wire("123456789012"), control, data, True))
    assert request == UnknownRequest("123456789012", control & 0x1F, data)


@pytest.mark.parametrize(
    ("control", "data"),
    [
        (0x91, b"\x00\x01"),
        (0x93, bytes(5)),
        (0xD1, b""),
        (0xD1, bytes(2)),
        (0x81, b"\x00"),
        (0x91, b""),
        (0x9C, b"\x01"),
    ],
)
def test_malformed_replies_are_unknown(control: int, data: bytes) -> None:
    reply = decode_reply(Frame(address_to_wire("123456789012"), control, data, True))
    assert reply == UnknownReply("123456789012", control & 0x1F, data)


# --- the batch fast path agrees with the general decoder ----------------------------------------


def reference_energy_blocks(
    items_: list[Frame | FrameError],
) -> tuple[list[tuple[int, ...]], list[bool]]:
    block = lookup(0x0001FF00)
    assert block is not None
    values: list[tuple[int, ...]] = []
    ok: list[bool] = []
    for f in items_:
        reply = decode_reply(f) if isinstance(f, Frame) else None
        good = (
            isinstance(f, Frame)
            and f.checksum_ok
            and isinstance(reply, ReadReply)
            and reply.item == block
            and reply.values is not None
            and not reply.more
        )
        ok.append(good)
        values.append(
            reply.values if good and isinstance(reply, ReadReply) and reply.values else (0,) * 5
        )
    return values, ok


@given(st.integers(0, 2**32))
@settings(max_examples=100, derandomize=True)
def test_energy_block_batch_matches_decode_reply(seed: int) -> None:
    rng = random.Random(seed)
    block = lookup(0x0001FF00)
    assert block is not None
    stream = b""
    for _ in range(rng.randrange(0, 30)):
        kind = rng.randrange(6)
        address = f"{rng.randrange(10**12):012d}"
        if kind == 0:
            value = encode_value(block, [rng.randrange(10**8) for _ in range(5)])
            stream += encode_read_reply(address, 0x0001FF00, value)
        elif kind == 1:  # not BCD somewhere
            value = bytearray(encode_value(block, [rng.randrange(10**8) for _ in range(5)]))
            value[rng.randrange(20)] |= rng.choice([0x0A, 0xB0])
            stream += encode_read_reply(address, 0x0001FF00, bytes(value))
        elif kind == 2:
            stream += encode_read_reply(address, 0x00010000, bytes(4))
        elif kind == 3:
            stream += encode_abnormal_reply(address, 0x11, 0x02)
        elif kind == 4:
            stream += encode_read_reply(address, 0x0001FF00, bytes(20), more=True)
        else:
            stream += encode_read_reply(address, 0x0001FF01, bytes(20))  # settlement period -1
    frames = FrameReader(strict_checksum=False).feed(stream)
    values, ok = decode_energy_blocks(frames)
    expected_values, expected_ok = reference_energy_blocks(frames)
    assert values.dtype == np.int64 and values.shape == (len(frames), 5)
    assert ok.tolist() == expected_ok
    assert [tuple(v) for v in values.tolist()] == expected_values


def test_energy_block_batch_skips_errors_and_bad_checksums() -> None:
    block = lookup(0x0001FF00)
    assert block is not None
    good = encode_read_reply("000000000001", 0x0001FF00, encode_value(block, [5, 1, 1, 1, 2]))
    bad = bytearray(good)
    bad[-2] ^= 0xFF
    frames = FrameReader(strict_checksum=False).feed(good + bytes(bad))
    frames.append(FrameError("truncated", 0, "x"))
    values, ok = decode_energy_blocks(frames)
    assert ok.tolist() == [True, False, False]
    assert values[0].tolist() == [5, 1, 1, 1, 2] and values[1:].sum() == 0
    empty_values, empty_ok = decode_energy_blocks([])
    assert empty_values.shape == (0, 5) and empty_ok.shape == (0,)
    assert decode_value(block, encode_value(block, [5, 1, 1, 1, 2])) == (5, 1, 1, 1, 2)


@given(
    meters,
    st.booleans(),
    st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=4),
    st.integers(0, 4),
    st.booleans(),
)
def test_read_reply_encoder_builds_the_frame_the_definition_gives(
    address: str, old: bool, values: list[bytes], preamble: int, more: bool
) -> None:
    """The precomputed encoder equals a frame built from scratch, for every value it is given."""
    protocol, di = (1997, 0x9010) if old else (2007, 0x0001FF00)
    encoder = ReadReplyEncoder(address, di, 20, protocol=protocol, more=more, preamble=preamble)
    control = (0x81 if old else 0x91) | (0x20 if more else 0)
    di_wire = di.to_bytes(2 if old else 4, "little")
    for value in values:
        expected = encode_frame(address, control, di_wire + value, preamble=preamble)
        assert encoder(value) == expected
    with pytest.raises(CodecError):
        encoder(b"\x00" * 19)
