"""DL/T 645 data identifiers (DI): what each register is, and its value codec (BCD <-> integers).

Values are integers in the item's own smallest unit (0.01 kWh, 0.1 V, 0.001 A, 0.0001 kW,
0.01 yuan, ...), never floats. Pure: no I/O, no logging. The table is PROTOCOL.md's, 2007 and
1997; energy DIs are generated from their structure (kind, tariff, settlement period).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from meterstream.collectors.dlt645.frame import CodecError

__all__ = [
    "DataItem",
    "StatusWord3",
    "datetime_from_bcd",
    "datetime_to_bcd",
    "decode_value",
    "encode_value",
    "format_value",
    "items",
    "lookup",
]

#: Formats that are one BCD number split into two-digit groups, reported high group first.
GROUPED_FORMATS = frozenset({"YYMMDDWW", "hhmmss", "YYMMDDhhmmss"})


@dataclass(frozen=True)
class DataItem:
    """One register. `length` is in bytes (for a block: all fields); `fmt` is one field's format.

    signed: the top bit of a field's highest byte is its sign. bcd=False: a binary word, low
    byte first (status words). labels: one name per value `decode_value` returns.
    """

    di: int
    protocol: int
    name: str
    length: int
    fmt: str
    decimals: int
    signed: bool
    unit: str
    fields: int = 1
    bcd: bool = True
    labels: tuple[str, ...] = ()

    @property
    def di_hex(self) -> str:
        """The DI as it is written in the standard: 8 hex digits (2007) or 4 (1997)."""
        return f"{self.di:08X}" if self.protocol == 2007 else f"{self.di:04X}"

    @property
    def field_length(self) -> int:
        return self.length // self.fields if not self.grouped else self.length

    @property
    def grouped(self) -> bool:
        """A date or time: one BCD number reported as its two-digit groups (YY, MM, DD, WW)."""
        return self.fmt in GROUPED_FORMATS

    @property
    def max_value(self) -> int:
        """Largest magnitude one field holds (the sign bit takes the top of a signed field)."""
        if not self.bcd:
            return (1 << (8 * self.length)) - 1
        if self.grouped:
            return 99
        width = 2 * self.field_length
        digits = min(width, self.fmt.count("X"))
        if self.signed and digits == width:
            return int(8 * 10 ** (width - 1) - 1)
        return int(10**digits - 1)


_TABLE: dict[tuple[int, int], DataItem] = {}
_DATE_LABELS = ("year", "month", "day", "weekday")
_TIME_LABELS = ("hour", "minute", "second")


def _add(
    di: int,
    protocol: int,
    name: str,
    length: int,
    fmt: str,
    unit: str = "",
    *,
    signed: bool = False,
    labels: tuple[str, ...] = (),
    bcd: bool = True,
) -> None:
    """One table row; decimals follow from the format, fields from the labels."""
    decimals = len(fmt.partition(".")[2])
    labels = labels or (name,)
    item = DataItem(
        di, protocol, name, length, fmt, decimals, signed, unit, len(labels), bcd, labels
    )
    _TABLE[(di, protocol)] = item


def _build_table() -> None:
    # Energy: DI3 = 00, DI2 = kind, DI1 = tariff (FF: the block), DI0 = settlement period.
    kinds = {0: "combined active energy", 1: "forward active energy", 2: "reverse active energy"}
    # T1..T4 = sharp, peak, flat, valley (尖, 峰, 平, 谷).
    tariffs = {0: "total", 1: "T1", 2: "T2", 3: "T3", 4: "T4"}
    for kind, what in kinds.items():
        for period in range(0x0D):  # 00 current, 01..0C past settlement periods
            when = f", settlement period -{period}" if period else ""
            for tariff, t in tariffs.items():
                di = kind << 16 | tariff << 8 | period
                _add(di, 2007, f"{what} {t}{when}", 4, "XXXXXX.XX", "kWh")
            block = tuple(f"{what} {t}{when}" for t in tariffs.values())
            _add(kind << 16 | 0xFF00 | period, 2007, f"{what} block{when}", 20, "XXXXXX.XX",
                 "kWh", labels=block)  # fmt: skip
    for code, phase in ((1, "A"), (2, "B"), (3, "C")):
        _add(0x02010000 | code << 8, 2007, f"voltage {phase}", 2, "XXX.X", "V")
        _add(0x02020000 | code << 8, 2007, f"current {phase}", 3, "XXX.XXX", "A", signed=True)
        _add(0x02030000 | code << 8, 2007, f"active power {phase}", 3, "XX.XXXX", "kW", signed=True)
    _add(0x02030000, 2007, "active power total", 3, "XX.XXXX", "kW", signed=True)
    _add(0x02800002, 2007, "grid frequency", 2, "XX.XX", "Hz")
    _add(0x04000101, 2007, "date and weekday", 4, "YYMMDDWW", labels=_DATE_LABELS)
    _add(0x04000102, 2007, "time", 3, "hhmmss", labels=_TIME_LABELS)
    _add(0x04000503, 2007, "meter running status word 3", 2, "XXXX", bcd=False)
    _add(0x00900200, 2007, "remaining money", 4, "XXXXXX.XX", "yuan")
    _add(0x00900201, 2007, "overdraft money", 4, "XXXXXX.XX", "yuan")
    # DL/T 645-1997: 2-byte DIs.
    _add(0x9010, 1997, "forward active energy total", 4, "XXXXXX.XX", "kWh")
    _add(0xB611, 1997, "voltage A", 2, "XXX", "V")
    _add(0xB621, 1997, "current A", 2, "XX.XX", "A")
    _add(0xB630, 1997, "active power total", 3, "XX.XXXX", "kW")
    _add(0xC010, 1997, "date and weekday", 4, "YYMMDDWW", labels=_DATE_LABELS)
    _add(0xC011, 1997, "time", 3, "hhmmss", labels=_TIME_LABELS)


_build_table()


def lookup(di: int, protocol: int = 2007) -> DataItem | None:
    """The register a DI names, or None when this codec does not know it."""
    return _TABLE.get((di, protocol))


def items(protocol: int | None = None) -> list[DataItem]:
    """Every known register (of one protocol, if given), in DI order."""
    return sorted(
        (it for it in _TABLE.values() if protocol is None or it.protocol == protocol),
        key=lambda it: (it.protocol, it.di),
    )


def decode_value(item: DataItem, data: bytes) -> tuple[int, ...]:
    """The value bytes of `item` (33H already removed) -> integers in its smallest unit.

    A block gives one integer per field in wire order (total, T1..T4); a date or time gives its
    digit groups high first, e.g. (YY, MM, DD, WW); a status word gives (word,).
    Raises CodecError on a wrong length or a nibble that is not BCD.
    """
    if len(data) != item.length:
        raise CodecError(f"{item.name} ({item.di_hex}) is {item.length} bytes, got {len(data)}")
    if not item.bcd:
        return (int.from_bytes(data, "little"),)
    if item.signed and item.fields != 1:  # each field carries its own sign
        return tuple(_signed_fields(item, data))
    digits = data[::-1].hex()  # highest digit first
    negative = False
    if item.signed and digits[0] in "89abcdef":  # top bit of the highest byte
        negative = True
        digits = str(int(digits[0], 16) & 7) + digits[1:]
    if not digits.isdigit():
        raise CodecError(f"{item.name} ({item.di_hex}): not BCD: {data.hex(' ')}")
    if item.fields == 1:
        return (-int(digits),) if negative else (int(digits),)
    if item.grouped:  # (YY, MM, DD, WW): high group first
        return tuple(int(digits[k : k + 2]) for k in range(0, len(digits), 2))
    width = len(digits) // item.fields  # a block: fields in wire order, lowest first
    return tuple(int(digits[k - width : k]) for k in range(len(digits), 0, -width))


def _signed_fields(item: DataItem, data: bytes) -> list[int]:
    width = item.length // item.fields
    single = replace(item, length=width, fields=1)
    return [decode_value(single, data[k : k + width])[0] for k in range(0, item.length, width)]


def encode_value(item: DataItem, values: Sequence[int]) -> bytes:
    """Inverse of `decode_value`. CodecError if a value is out of range or the count is wrong."""
    expected = item.fields
    if len(values) != expected:
        raise CodecError(f"{item.name} ({item.di_hex}) takes {expected} values, got {len(values)}")
    if not item.bcd:
        (word,) = values
        if not 0 <= word <= item.max_value:
            raise CodecError(f"{item.name} ({item.di_hex}): {word} out of range")
        return int(word).to_bytes(item.length, "little")
    if item.grouped:
        for v in values:
            if not 0 <= v <= 99:
                raise CodecError(f"{item.name} ({item.di_hex}): group {v} out of 0..99")
        return bytes.fromhex("".join(f"{v:02d}" for v in values))[::-1]
    width = item.field_length
    out = bytearray()
    for v in values:
        magnitude = abs(v)
        if magnitude > item.max_value or (v < 0 and not item.signed):
            low = -item.max_value if item.signed else 0
            raise CodecError(
                f"{item.name} ({item.di_hex}): {v} out of range {low}..{item.max_value} "
                f"(units of 10^-{item.decimals} {item.unit})"
            )
        field = bytes.fromhex(f"{magnitude:0{2 * width}d}")[::-1]
        if v < 0:
            field = field[:-1] + bytes((field[-1] | 0x80,))
        out += field
    return bytes(out)


def format_value(item: DataItem, value: int) -> str:
    """One integer from `decode_value` as a person reads it: "1234.56", "-0.005", "0x0010"."""
    if not item.bcd:
        return f"0x{value:0{2 * item.length}X}"
    if item.grouped:
        return f"{value:02d}"
    if item.decimals == 0:
        return str(value)
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), 10**item.decimals)
    return f"{sign}{whole}.{frac:0{item.decimals}d}"


def datetime_to_bcd(when: datetime) -> bytes:
    """A wall-clock time -> ss mm hh DD MM YY in BCD (lowest first), as 08H and 1CH carry it."""
    if not 2000 <= when.year <= 2099:
        raise CodecError(f"year {when.year} does not fit a DL/T 645 date (2000..2099)")
    digits = (
        f"{when.year - 2000:02d}{when.month:02d}{when.day:02d}"
        f"{when.hour:02d}{when.minute:02d}{when.second:02d}"
    )
    return bytes.fromhex(digits)[::-1]


def datetime_from_bcd(data: bytes) -> datetime | None:
    """ss mm hh DD MM YY in BCD -> a naive datetime, or None if it is not a valid time."""
    if len(data) != 6:
        return None
    digits = data[::-1].hex()
    if not digits.isdigit():
        return None
    yy, mo, dd, hh, mi, ss = (int(digits[k : k + 2]) for k in range(0, 12, 2))
    try:
        return datetime(2000 + yy, mo, dd, hh, mi, ss)
    except ValueError:
        return None


#: Status word 3, bits 8..9.
METER_TYPES = ("not prepaid", "energy prepaid", "money prepaid", "reserved")


@dataclass(frozen=True)
class StatusWord3:
    """Meter running status word 3 (04000503): the bits cost control acts on.

    A trip is confirmed by reading `relay_open` back, never by the 1CH acknowledgement alone.
    """

    relay_open: bool  # bit4: relay actual state, 1 open (tripped)
    relay_command_open: bool  # bit6: relay command state
    pretrip_alarm: bool  # bit7
    meter_type: int  # bits 8..9: 0 not prepaid, 1 energy prepaid, 2 money prepaid
    keep_power: bool  # bit12: keep-power (保电) in force

    RELAY_OPEN = 1 << 4
    RELAY_COMMAND_OPEN = 1 << 6
    PRETRIP_ALARM = 1 << 7
    METER_TYPE_SHIFT = 8
    KEEP_POWER = 1 << 12

    @classmethod
    def from_word(cls, word: int) -> StatusWord3:
        return cls(
            relay_open=bool(word & cls.RELAY_OPEN),
            relay_command_open=bool(word & cls.RELAY_COMMAND_OPEN),
            pretrip_alarm=bool(word & cls.PRETRIP_ALARM),
            meter_type=(word >> cls.METER_TYPE_SHIFT) & 3,
            keep_power=bool(word & cls.KEEP_POWER),
        )

    @property
    def word(self) -> int:
        """These bits as a word (other bits zero), e.g. for a simulated meter's reply."""
        return (
            self.RELAY_OPEN * self.relay_open
            | self.RELAY_COMMAND_OPEN * self.relay_command_open
            | self.PRETRIP_ALARM * self.pretrip_alarm
            | (self.meter_type & 3) << self.METER_TYPE_SHIFT
            | self.KEEP_POWER * self.keep_power
        )

    @property
    def meter_type_name(self) -> str:
        return METER_TYPES[self.meter_type & 3]
