"""DL/T 645 messages: encoders for every request and reply, decoders to typed messages.

The collectors encode requests and decode replies; the simulated field does the opposite with
the same functions. Pure: no I/O, no logging, and credentials never appear in a repr. Decoders
never raise on a frame the reader produced: malformed data gives an Unknown* message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from meterstream.collectors.dlt645.control import (
    CommandEncoder,
    ControlAction,
    Credentials,
    PlaintextEncoder,
)
from meterstream.collectors.dlt645.frame import (
    ADD_33,
    BROADCAST,
    END,
    WILDCARD,
    CodecError,
    Frame,
    FrameError,
    address_to_wire,
    encode_frame,
)
from meterstream.collectors.dlt645.registry import (
    DataItem,
    datetime_from_bcd,
    datetime_to_bcd,
    decode_value,
    lookup,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "CONTROL_ERROR_BITS",
    "ENERGY_BLOCK_DI",
    "ERROR_BITS",
    "FUNCTION_NAMES",
    "AbnormalReply",
    "AckReply",
    "AddressReply",
    "ControlRequest",
    "FollowupRequest",
    "ReadAddressRequest",
    "ReadReply",
    "ReadRequest",
    "Reply",
    "Request",
    "TimeSetRequest",
    "UnknownReply",
    "UnknownRequest",
    "WriteRequest",
    "decode_energy_blocks",
    "decode_reply",
    "decode_request",
    "encode_abnormal_reply",
    "encode_ack",
    "encode_address_reply",
    "encode_control",
    "encode_read",
    "encode_read_address",
    "encode_read_followup",
    "encode_read_reply",
    "encode_reads",
    "encode_time_set",
    "encode_write",
]

# Function codes (D4..D0 of C).
TIME_SET = 0x08
READ = 0x11
READ_FOLLOWUP = 0x12
READ_ADDRESS = 0x13
WRITE = 0x14
CONTROL = 0x1C
READ_1997 = 0x01
READ_FOLLOWUP_1997 = 0x02

FUNCTION_NAMES: dict[int, str] = {
    0x01: "read data (1997)",
    0x02: "read follow-up (1997)",
    0x03: "identity authentication (2007) / re-read (1997)",
    0x04: "write data (1997)",
    0x08: "broadcast time set",
    0x0A: "write address (1997)",
    0x0C: "change baud rate (1997)",
    0x0F: "change password (1997)",
    0x10: "clear demand (1997)",
    0x11: "read data",
    0x12: "read follow-up",
    0x13: "read address",
    0x14: "write data",
    0x15: "write address",
    0x16: "freeze",
    0x17: "change baud rate",
    0x18: "change password",
    0x19: "clear demand",
    0x1A: "clear meter",
    0x1B: "clear events",
    0x1C: "remote control",
    0x1D: "multi-function output",
    0x1E: "vendor extension",
    0x1F: "vendor extension",
}

#: Error byte of an abnormal reply.
ERROR_BITS: dict[int, str] = {
    0x01: "other error",
    0x02: "no requested data",
    0x04: "password wrong or unauthorized",
    0x08: "baud rate cannot change",
    0x10: "year zones exceeded",
    0x20: "day slots exceeded",
    0x40: "tariffs exceeded",
}

#: 2-byte error word of an abnormal 1CH reply (firmware that has one).
CONTROL_ERROR_BITS: dict[int, str] = {
    0x0001: "suspended",
    0x0002: "MAC error",
    0x0004: "password error",
    0x0008: "authentication timeout",
    0x0010: "deadline invalid",
    0x0020: "keep-power in force",
}

MAX_READ_DATA = 200
MAX_WRITE_DATA = 50


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadRequest:
    address: str
    di: int
    protocol: int


@dataclass(frozen=True)
class FollowupRequest:
    address: str
    di: int
    seq: int


@dataclass(frozen=True)
class ReadAddressRequest:
    address: str


@dataclass(frozen=True)
class WriteRequest:
    address: str
    di: int
    credentials: Credentials
    value: bytes


@dataclass(frozen=True)
class TimeSetRequest:
    address: str
    when: datetime | None


@dataclass(frozen=True)
class ControlRequest:
    address: str
    credentials: Credentials
    action: int
    reserved: int
    deadline: datetime | None  # None when N3..N8 are not a valid date


@dataclass(frozen=True)
class UnknownRequest:
    address: str
    function: int
    data: bytes


Request = (
    ReadRequest
    | FollowupRequest
    | ReadAddressRequest
    | WriteRequest
    | TimeSetRequest
    | ControlRequest
    | UnknownRequest
)


# --- replies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadReply:
    """A normal reply to a read. Unknown DI: item and values are None and raw holds the value;
    a known DI whose value is malformed: item set, values None."""

    address: str
    di: int
    protocol: int
    item: DataItem | None
    values: tuple[int, ...] | None
    raw: bytes
    more: bool
    seq: int | None = None  # SEQ of a follow-up (92H/B2H) reply


@dataclass(frozen=True)
class AbnormalReply:
    address: str
    function: int
    error: int
    errors: tuple[str, ...]

    @property
    def no_data(self) -> bool:
        """The meter does not have the requested item: bit1, or bit0 as some simulators say it."""
        return self.function in (READ, READ_FOLLOWUP, READ_1997) and bool(self.error & 0x03)


@dataclass(frozen=True)
class AckReply:
    address: str
    function: int


@dataclass(frozen=True)
class AddressReply:
    address: str


@dataclass(frozen=True)
class UnknownReply:
    address: str
    function: int
    data: bytes


Reply = ReadReply | AbnormalReply | AckReply | AddressReply | UnknownReply


# --- encoders ---------------------------------------------------------------------------------

_PREAMBLES = tuple(b"\xfe" * n for n in range(9))
_TAILS = tuple(bytes((cs, 0x16)) for cs in range(256))
# Header "68 A0..A5 68" and its byte sum, per address; C L DI(+33H) and its sum, per request.
_HEADS: dict[str, tuple[bytes, int]] = {}
_READ_BODIES: dict[tuple[int, int], tuple[bytes, int]] = {}
_CACHE_LIMIT = 1 << 20


def _head(address: str) -> tuple[bytes, int]:
    head = b"\x68" + address_to_wire(address) + b"\x68"
    if len(_HEADS) >= _CACHE_LIMIT:
        _HEADS.clear()
    entry = _HEADS[address] = (head, sum(head))
    return entry


def _read_body(di: int, protocol: int) -> tuple[bytes, int]:
    di_wire = _di_wire(di, protocol)  # validates both
    function = READ if protocol == 2007 else READ_1997
    body = bytes((function, len(di_wire))) + di_wire.translate(ADD_33)
    if len(_READ_BODIES) >= _CACHE_LIMIT:
        _READ_BODIES.clear()
    entry = _READ_BODIES[(di, protocol)] = (body, sum(body))
    return entry


def _di_wire(di: int, protocol: int = 2007) -> bytes:
    """The DI as sent, DI0 first (before +33H): 4 bytes (2007) or 2 (1997)."""
    if protocol == 2007:
        if not 0 <= di <= 0xFFFFFFFF:
            raise CodecError(f"a 2007 DI is 4 bytes (0..FFFFFFFF), got {di!r}")
        return di.to_bytes(4, "little")
    if protocol == 1997:
        if not 0 <= di <= 0xFFFF:
            raise CodecError(f"a 1997 DI is 2 bytes (0..FFFF), got {di!r}")
        return di.to_bytes(2, "little")
    raise CodecError(f"protocol must be 2007 or 1997, got {protocol!r}")


def _check_target(address: str, function: int) -> None:
    """Broadcast only for time set; all-AA only for read and read-address (PROTOCOL.md)."""
    if address == BROADCAST and function != TIME_SET:
        raise CodecError(
            f"meters never answer the broadcast address; not allowed for {function:02X}H"
        )
    if address.upper() == WILDCARD and function not in (READ, READ_1997, READ_ADDRESS):
        raise CodecError(
            f"the all-AA wildcard is only for read and read-address, not {function:02X}H"
        )


def encode_read(address: str, di: int, *, protocol: int = 2007, preamble: int = 4) -> bytes:
    """Read one item: 11H with the 4-byte DI (2007), or 01H with the 2-byte DI (1997)."""
    head = _HEADS.get(address)
    if head is None:
        _check_target(address, READ)
        head = _head(address)
    body = _READ_BODIES.get((di, protocol))
    if body is None:
        body = _read_body(di, protocol)
    return (
        (_PREAMBLES[preamble] if 0 <= preamble <= 8 else _preamble(preamble))
        + head[0]
        + body[0]
        + _TAILS[(head[1] + body[1]) & 0xFF]
    )


def encode_reads(
    addresses: npt.NDArray[np.int64], di: int, *, protocol: int = 2007, preamble: int = 4
) -> bytes:
    """`encode_read` for many meters at once: the frames concatenated, all the same length.

    `addresses` are 12-digit addresses as numbers (no wildcards). Frame k is
    `blob[k * size:(k + 1) * size]` with size = preamble + 12 + len(DI). Vectorised, so a
    collector can hold the poll requests of a million meters as a few flat byte strings.
    """
    import numpy as np

    if preamble < 0 or preamble > 8:
        raise CodecError(f"preamble must be 0..8 FE bytes, got {preamble}")
    body, body_sum = _READ_BODIES.get((di, protocol)) or _read_body(di, protocol)
    a = np.asarray(addresses, dtype=np.int64)
    if a.size and (a.min() < 0 or a.max() >= 999_999_999_999):
        raise CodecError("meter addresses must be 0..999999999998 (999999999999 is the "
                         "broadcast address, which meters never answer)")
    n = a.shape[0]
    size = preamble + 8 + len(body) + 2
    out = np.empty((n, size), np.uint8)
    out[:, :preamble] = 0xFE
    out[:, preamble] = 0x68
    rest = a.copy()
    for k in range(6):  # lowest two digits first
        two = rest % 100
        rest //= 100
        out[:, preamble + 1 + k] = (two // 10) * 16 + two % 10
    out[:, preamble + 7] = 0x68
    out[:, preamble + 8:size - 2] = np.frombuffer(body, np.uint8)
    head_sum = out[:, preamble:preamble + 8].sum(axis=1, dtype=np.int64)
    out[:, size - 2] = (head_sum + body_sum) & 0xFF
    out[:, size - 1] = 0x16
    return out.tobytes()


def _preamble(n: int) -> bytes:
    if n < 0:
        raise CodecError(f"preamble must be >= 0 FE bytes, got {n}")
    return b"\xfe" * n


def encode_read_followup(address: str, di: int, seq: int, *, preamble: int = 4) -> bytes:
    """Read the next frame of a multi-frame reply: 12H, DI then SEQ."""
    _check_target(address, READ_FOLLOWUP)
    if not 0 <= seq <= 0xFF:
        raise CodecError(f"SEQ is one byte, got {seq!r}")
    return encode_frame(address, READ_FOLLOWUP, _di_wire(di) + bytes((seq,)), preamble=preamble)


def encode_read_address(*, preamble: int = 4) -> bytes:
    """Ask the only meter on the bus for its address: 13H to the all-AA wildcard, L = 0."""
    return encode_frame(WILDCARD, READ_ADDRESS, b"", preamble=preamble)


def encode_write(
    address: str, di: int, value: bytes, credentials: Credentials, *, preamble: int = 4
) -> bytes:
    """Write one item: 14H, DI, PA P0..P2, C0..C3, value (value already encoded, plain)."""
    _check_target(address, WRITE)
    data = _di_wire(di) + credentials.to_wire() + bytes(value)
    if len(data) > MAX_WRITE_DATA:
        raise CodecError(f"write data is {len(data)} bytes; L is at most {MAX_WRITE_DATA}")
    return encode_frame(address, WRITE, data, preamble=preamble)


def encode_time_set(address: str, when: datetime, *, preamble: int = 4) -> bytes:
    """Broadcast time set: 08H, ss mm hh DD MM YY (meter wall-clock time); usually to BROADCAST."""
    return encode_frame(address, TIME_SET, datetime_to_bcd(when), preamble=preamble)


def encode_control(
    address: str,
    action: ControlAction,
    deadline: datetime,
    credentials: Credentials,
    *,
    encoder: CommandEncoder | None = None,
    preamble: int = 4,
) -> bytes:
    """Remote control: 1CH with the payload from `encoder` (plaintext by default)."""
    _check_target(address, CONTROL)
    payload = (encoder or PlaintextEncoder()).encode(action, deadline, credentials)
    return encode_frame(address, CONTROL, payload, preamble=preamble)


class ReadReplyEncoder:
    """One meter's normal replies to one DI, built fast: all but the value is precomputed.

    A meter answers the same DI with the same header every poll cycle; only the value moves.
    The header, its +33H form and its share of the checksum are computed once here, so a reply
    costs one translate, one sum and one concatenation. `encode_read_reply` is this, used once.
    """

    __slots__ = ("_prefix", "_sum", "value_length")

    def __init__(
        self,
        address: str,
        di: int,
        value_length: int,
        *,
        protocol: int = 2007,
        more: bool = False,
        preamble: int = 4,
    ) -> None:
        di_wire = _di_wire(di, protocol)
        length = len(di_wire) + value_length
        if value_length < 0 or length > MAX_READ_DATA:
            raise CodecError(f"read reply data is {length} bytes; L is at most {MAX_READ_DATA}")
        control = (0x91 if protocol == 2007 else 0x81) | (0x20 if more else 0)
        head = b"\x68" + address_to_wire(address) + bytes((0x68, control, length))
        head += di_wire.translate(ADD_33)
        self._prefix = _preamble(preamble) + head
        self._sum = sum(head)
        self.value_length = value_length

    def __call__(self, value: bytes) -> bytes:
        if len(value) != self.value_length:
            raise CodecError(f"value is {len(value)} bytes; this reply carries {self.value_length}")
        wire = bytes(value).translate(ADD_33)
        return self._prefix + wire + bytes(((self._sum + sum(wire)) & 0xFF, END))


def encode_read_reply(
    address: str,
    di: int,
    value: bytes,
    *,
    protocol: int = 2007,
    more: bool = False,
    preamble: int = 4,
) -> bytes:
    """A meter's normal read reply: 91H/B1H (2007) or 81H/A1H (1997), DATA = DI + value."""
    return ReadReplyEncoder(
        address, di, len(value), protocol=protocol, more=more, preamble=preamble
    )(value)


def _check_function(function: int) -> None:
    if not 0 <= function <= 0x1F:
        raise CodecError(f"function code is 00..1F, got {function!r}")


def encode_abnormal_reply(
    address: str, function: int, error: int, *, word: bool = False, preamble: int = 4
) -> bytes:
    """An abnormal reply: C = function | C0H, one error byte (or a 2-byte word, low first)."""
    _check_function(function)
    size = 2 if word else 1
    if not 0 <= error < 1 << (8 * size):
        raise CodecError(f"error {'word' if word else 'byte'} out of range: {error!r}")
    return encode_frame(address, function | 0xC0, error.to_bytes(size, "little"), preamble=preamble)


def encode_ack(address: str, function: int, *, preamble: int = 4) -> bytes:
    """A normal reply with no data: C = function | 80H, L = 0 (9CH for 1CH, 94H for 14H)."""
    _check_function(function)
    return encode_frame(address, function | 0x80, b"", preamble=preamble)


def encode_address_reply(address: str, *, preamble: int = 4) -> bytes:
    """A meter's answer to 13H: 93H, DATA = its 6 address bytes."""
    wire = address_to_wire(address)
    if 0xAA in wire:
        raise CodecError(f"a meter answers with its own address, not a wildcard: {address!r}")
    return encode_frame(address, 0x80 | READ_ADDRESS, wire, preamble=preamble)


# --- decoders ---------------------------------------------------------------------------------


def _address(wire: bytes) -> str:
    return wire[::-1].hex().upper()


def decode_request(frame: Frame) -> Request:
    """A master's request, typed. Malformed data for a known function -> UnknownRequest."""
    address = _address(frame.address_wire)
    function = frame.control & 0x1F
    data = frame.data
    n = len(data)
    if not frame.control & 0x80:
        if function == READ and n == 4:
            return ReadRequest(address, int.from_bytes(data, "little"), 2007)
        if function == READ_1997 and n == 2:
            return ReadRequest(address, int.from_bytes(data, "little"), 1997)
        if function == READ_FOLLOWUP and n == 5:
            return FollowupRequest(address, int.from_bytes(data[:4], "little"), data[4])
        if function == READ_ADDRESS and n == 0:
            return ReadAddressRequest(address)
        if function == WRITE and n >= 12:
            return WriteRequest(
                address,
                int.from_bytes(data[:4], "little"),
                Credentials.from_wire(data[4:12]),
                data[12:],
            )
        if function == TIME_SET and n == 6:
            return TimeSetRequest(address, datetime_from_bcd(data))
        if function == CONTROL and n == 16:
            return ControlRequest(
                address,
                Credentials.from_wire(data[:8]),
                data[8],
                data[9],
                datetime_from_bcd(data[10:16]),
            )
    return UnknownRequest(address, function, data)


def _bit_names(value: int, names: dict[int, str], bits: int) -> tuple[str, ...]:
    return tuple(names.get(1 << k, f"unknown bit {k}") for k in range(bits) if value & (1 << k))


def decode_reply(frame: Frame) -> Reply:
    """A meter's reply, typed. Never raises; anything it cannot place is an UnknownReply."""
    address = _address(frame.address_wire)
    control = frame.control
    function = control & 0x1F
    data = frame.data
    n = len(data)
    if control & 0x80:
        if control & 0x40:
            if function == CONTROL and n == 2:
                word = data[0] | data[1] << 8
                return AbnormalReply(
                    address, function, word, _bit_names(word, CONTROL_ERROR_BITS, 16)
                )
            if n == 1:
                return AbnormalReply(address, function, data[0], _bit_names(data[0], ERROR_BITS, 8))
        elif function == READ and n >= 4:
            return _read_reply(address, data[:4], data[4:], 2007, bool(control & 0x20), None)
        elif function == READ_FOLLOWUP and n >= 5:
            return _read_reply(address, data[:4], data[4:-1], 2007, bool(control & 0x20), data[-1])
        elif function == READ_1997 and n >= 2:
            return _read_reply(address, data[:2], data[2:], 1997, bool(control & 0x20), None)
        elif function == READ_ADDRESS and n == 6:
            return AddressReply(_address(data))
        elif n == 0 and function not in (READ, READ_FOLLOWUP, READ_1997, READ_ADDRESS):
            return AckReply(address, function)
    return UnknownReply(address, function, data)


def _read_reply(
    address: str, di_bytes: bytes, raw: bytes, protocol: int, more: bool, seq: int | None
) -> ReadReply:
    di = int.from_bytes(di_bytes, "little")
    item = lookup(di, protocol)
    values: tuple[int, ...] | None = None
    if item is not None:
        try:
            values = decode_value(item, raw)
        except CodecError:
            values = None
    return ReadReply(address, di, protocol, item, values, raw, more, seq)


ENERGY_BLOCK_DI = 0x0001FF00
_ENERGY_BLOCK_HEAD = ENERGY_BLOCK_DI.to_bytes(4, "little")
_NOT_A_BLOCK = b"\xff" * 24  # fails the DI check below


def decode_energy_blocks(
    frames: Sequence[Frame | FrameError],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Batch fast path for the poll cycle's hot reply, a 91H reply to 0001FF00 (energy block).

    Returns `values`, int64 (n, 5): total, T1..T4 in 0.01 kWh, and `ok`, bool (n,), both
    aligned with `frames`. ok is False (and the values 0) for anything else: another reply, an
    error, a bad checksum, a value that is not BCD; `decode_reply` tells what those are. Same
    rule as `decode_reply` + `decode_value`: the tests hold the two equal.
    """
    import numpy as np

    blob = b"".join(
        [
            f.data
            if f.__class__ is Frame and f.control == 0x91 and f.checksum_ok and len(f.data) == 24
            else _NOT_A_BLOCK
            for f in frames
        ]
    )
    # Per frame: the DI, then five BCD fields, each a little-endian 32-bit word of 8 digits.
    words = np.frombuffer(blob, dtype="<u4").reshape(len(frames), 6)
    ok = words[:, 0] == ENERGY_BLOCK_DI
    bcd = words[:, 1:]
    high = (bcd >> 4) & 0x0F0F0F0F  # one digit per byte lane
    low = bcd & 0x0F0F0F0F
    ok &= (((high + 0x76767676) | (low + 0x76767676)) & 0x80808080 == 0).all(axis=1)  # <= 9
    pairs = high * 10 + low  # each byte lane 0..99, no carries
    quads = (pairs & 0x00FF00FF) + ((pairs >> 8) & 0x00FF00FF) * 100  # 16-bit lanes 0..9999
    values = ((quads & 0xFFFF) + (quads >> 16) * 10_000).astype(np.int64)
    values[~ok] = 0
    return values, ok
