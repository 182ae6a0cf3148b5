"""DL/T 645 framing: addresses, checksum, encoding one frame, and a sans-I/O frame reader.

Pure bytes in, frames out: no sockets, no asyncio, no time.sleep, no logging. `FrameReader`
costs O(bytes fed) with a constant bounded by the longest frame (a byte is rescanned only by
the bad candidates that cover it, at most 267 of them), keeps at most one unfinished frame
(< 12 + max_data_len bytes) between calls, and never raises on any input.

    [FE x n]  68  A0..A5  68  C  L  DATA[L]  CS  16      DATA sent +33H, CS = sum(68..DATA) mod 256
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple
from zlib import adler32

__all__ = [
    "BROADCAST",
    "WILDCARD",
    "CodecError",
    "Frame",
    "FrameError",
    "FrameReader",
    "address_from_wire",
    "address_to_wire",
    "checksum",
    "encode_frame",
]

BROADCAST = "999999999999"
WILDCARD = "AAAAAAAAAAAA"

START = 0x68
END = 0x16
WAKE = 0xFE
#: Bytes outside DATA: 68, six address bytes, 68, C, L, CS, 16.
OVERHEAD = 12

FE4 = b"\xfe" * 4
#: zlib's Adler-32 low half is 1 + the byte sum mod 65521: the exact byte sum while
#: (10 + L) * 255 + 1 < 65521, i.e. L <= 246. The reader uses it as a fast `checksum`.
ADLER_MAX_DATA = 246

#: DATA is sent +33H and received -33H, byte by byte, mod 256.
ADD_33 = bytes((b + 0x33) & 0xFF for b in range(256))
SUB_33 = bytes((b - 0x33) & 0xFF for b in range(256))


class CodecError(ValueError):
    """An argument an encoder cannot put on the wire, or a value field that is not valid BCD."""


@lru_cache(maxsize=65536)
def address_to_wire(addr: str) -> bytes:
    """Meter address as 12 characters, highest digits first -> the 6 wire bytes, lowest first.

    Each byte is two decimal digits or "AA" (wildcard); wildcards are only allowed in the
    high-order bytes. "123456789012" -> b"\\x12\\x90\\x78\\x56\\x34\\x12".
    """
    if not isinstance(addr, str) or len(addr) != 12:
        raise CodecError(f"meter address must be 12 characters, got {addr!r}")
    pairs = [addr[k : k + 2].upper() for k in range(0, 12, 2)]
    wildcards = 0
    for k, pair in enumerate(pairs):
        if pair == "AA":
            if wildcards != k:
                raise CodecError(
                    f"meter address {addr!r}: wildcard AA is only allowed in the high-order bytes"
                )
            wildcards += 1
        elif not (pair.isascii() and pair.isdigit()):
            raise CodecError(f"meter address {addr!r}: {pair!r} is neither two digits nor AA")
    return bytes.fromhex("".join(pairs))[::-1]


def address_from_wire(b: bytes) -> str:
    """The 6 wire bytes (lowest first) -> the 12-character address; AA bytes come back as "AA"."""
    if len(b) != 6:
        raise CodecError(f"a wire address is 6 bytes, got {len(b)}")
    for x in b:
        if x != 0xAA and (x >> 4 > 9 or x & 0x0F > 9):
            raise CodecError(f"wire address {b.hex(' ')} is not BCD (byte {x:02X})")
    return b[::-1].hex().upper()


def checksum(b: bytes) -> int:
    """DL/T 645 checksum: the sum of the bytes mod 256 (caller passes first 68 .. last DATA)."""
    return sum(b) & 0xFF


def encode_frame(address: str, control: int, data: bytes, *, preamble: int = 4) -> bytes:
    """One frame: `preamble` FE bytes, header, `data` (PLAIN: +33H is applied here), CS, 16."""
    if not 0 <= control <= 0xFF:
        raise CodecError(f"control code must be one byte, got {control!r}")
    if len(data) > 0xFF:
        raise CodecError(f"data is {len(data)} bytes; a frame carries at most 255")
    if preamble < 0:
        raise CodecError(f"preamble must be >= 0 FE bytes, got {preamble}")
    body = b"\x68" + address_to_wire(address) + bytes((0x68, control, len(data)))
    body += data.translate(ADD_33)
    return b"\xfe" * preamble + body + bytes((sum(body) & 0xFF, END))


class Frame(NamedTuple):
    """One received frame; `data` has had 33H removed. Immutable, and cheap to build: the
    reader makes it with one C-level tuple construction."""

    address_wire: bytes
    control: int
    data: bytes
    checksum_ok: bool

    @property
    def address(self) -> str:
        """As `address_from_wire`, but never raises: a non-BCD byte shows as its two hex digits."""
        return self.address_wire[::-1].hex().upper()

    @property
    def function(self) -> int:
        """D4..D0 of the control code: 11H read, 1CH remote control, ..."""
        return self.control & 0x1F

    @property
    def is_reply(self) -> bool:
        """D7: sent by the meter."""
        return bool(self.control & 0x80)

    @property
    def is_abnormal(self) -> bool:
        """D6: an abnormal (error) reply."""
        return bool(self.control & 0x40)

    @property
    def has_more(self) -> bool:
        """D5: more frames follow (read them with 12H)."""
        return bool(self.control & 0x20)

    def to_wire(self, *, preamble: int = 0) -> bytes:
        """The frame as bytes again (with a recomputed, correct checksum)."""
        return encode_frame(self.address, self.control, self.data, preamble=preamble)

    # A Frame equals only a Frame, never a plain tuple with the same fields.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return tuple.__hash__(self)

    def __repr__(self) -> str:
        return (
            f"Frame(address={self.address!r}, control=0x{self.control:02X}, "
            f"data={self.data.hex(' ')!r}, checksum_ok={self.checksum_ok})"
        )


class FrameError:
    """A candidate frame that was rejected; the reader resumed after its first 68.

    kind: "bad_checksum", "bad_end", "bad_length" (L above max_data_len) or "truncated" (the
    stream ended inside it); offset: stream offset of the candidate's first 68.
    """

    __slots__ = ("detail", "kind", "offset")

    KINDS = ("bad_checksum", "bad_end", "bad_length", "truncated")

    def __init__(self, kind: str, offset: int, detail: str) -> None:
        self.kind = kind
        self.offset = offset
        self.detail = detail

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrameError):
            return NotImplemented
        return (self.kind, self.offset, self.detail) == (other.kind, other.offset, other.detail)

    def __hash__(self) -> int:
        return hash((self.kind, self.offset, self.detail))

    def __repr__(self) -> str:
        return f"FrameError({self.kind!r}, offset={self.offset}, detail={self.detail!r})"

    def __str__(self) -> str:
        return f"{self.kind} at stream offset {self.offset}: {self.detail}"


class FrameReader:
    """Feed bytes in any chunking; get frames and typed errors back. Sans-I/O, never raises.

    Skips FE bytes and garbage, checks the second 68, L, the end byte and the checksum, and
    after a bad candidate rescans from the byte after its first 68, so a valid frame hidden
    inside garbage is still found. A 68 not followed by a second 68 seven bytes on is garbage,
    not an error. `discarded` counts bytes skipped as garbage or bad candidates (FE bytes are
    preamble, not counted); `buffered` is what waits for the next `feed` (< 12 + max_data_len).
    With strict_checksum=False a frame with a wrong checksum comes out as a Frame with
    checksum_ok=False instead of a FrameError (an interop option some terminals need).
    """

    __slots__ = (
        "_base",
        "_plain",
        "_wire",
        "discarded",
        "max_data_len",
        "strict_checksum",
    )

    def __init__(self, *, strict_checksum: bool = True, max_data_len: int = 255) -> None:
        if not 0 <= max_data_len <= 255:
            raise CodecError(f"max_data_len must be 0..255, got {max_data_len}")
        self.strict_checksum = strict_checksum
        self.max_data_len = max_data_len
        self.discarded = 0
        self._wire = b""  # unfinished candidate, as received
        self._plain = b""  # the same bytes with 33H removed
        self._base = 0  # stream offset of _wire[0]

    @property
    def buffered(self) -> int:
        """Bytes held for the next `feed`: at most one unfinished frame."""
        return len(self._wire)

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        """Every frame (and rejected candidate) completed by `data`, in stream order."""
        data = bytes(data)
        if self._wire:
            wire = self._wire + data
            plain = self._plain + data.translate(SUB_33)
        else:
            wire = data
            plain = data.translate(SUB_33)
        out: list[Frame | FrameError] = []
        append = out.append
        new = tuple.__new__  # Frame(...) without the Python-level __new__
        find = wire.find
        n = len(wire)
        strict = self.strict_checksum
        max_len = self.max_data_len
        base = self._base
        discarded = 0
        pos = 0
        while True:
            i = find(0x68, pos)
            if i < 0:
                discarded += n - pos - wire.count(0xFE, pos, n)
                pos = n
                break
            if i != pos:
                gap = wire[pos:i]
                if gap != FE4:  # the usual preamble costs one compare
                    discarded += len(gap) - gap.count(0xFE)
            if n - i < 10:  # header not complete yet: keep it unless it is already wrong
                if n - i > 7 and wire[i + 7] != 0x68:
                    discarded += 1
                    pos = i + 1
                    continue
                pos = i
                break
            if wire[i + 7] != 0x68:
                discarded += 1
                pos = i + 1
                continue
            length = wire[i + 9]
            if length > max_len:
                append(FrameError("bad_length", base + i, f"L={length} exceeds {max_len}"))
                discarded += 1
                pos = i + 1
                continue
            end = i + 12 + length
            if end > n:
                pos = i
                break
            if wire[end - 1] != 0x16:
                append(
                    FrameError("bad_end", base + i, f"end byte {wire[end - 1]:02X}, expected 16")
                )
                discarded += 1
                pos = i + 1
                continue
            if length <= ADLER_MAX_DATA:  # A = 1 + byte sum, exactly, below 65521
                cs = ((adler32(wire[i : end - 2]) & 0xFFFF) - 1) & 0xFF
            else:
                cs = sum(wire[i : end - 2]) & 0xFF
            ok = cs == wire[end - 2]
            if not ok and strict:
                append(
                    FrameError(
                        "bad_checksum",
                        base + i,
                        f"checksum {wire[end - 2]:02X}, computed {cs:02X}",
                    )
                )
                discarded += 1
                pos = i + 1
                continue
            append(new(Frame, (wire[i + 1 : i + 7], wire[i + 8], plain[i + 10 : end - 2], ok)))
            pos = end
        self._wire = wire[pos:]
        self._plain = plain[pos:]
        self._base = base + pos
        self.discarded += discarded
        return out

    def eof(self) -> list[FrameError]:
        """End of stream: an unfinished frame still buffered becomes one "truncated" error."""
        if not self._wire:
            return []
        held = len(self._wire)
        err = FrameError("truncated", self._base, f"stream ended {held} bytes into a frame")
        self.discarded += held
        self._base += held
        self._wire = b""
        self._plain = b""
        return [err]
