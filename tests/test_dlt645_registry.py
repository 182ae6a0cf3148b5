"""DL/T 645 data identifiers: every row of PROTOCOL.md's tables, and the BCD value codec."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.collectors.dlt645 import (
    CodecError,
    DataItem,
    StatusWord3,
    datetime_from_bcd,
    datetime_to_bcd,
    decode_value,
    encode_value,
    format_value,
    items,
    lookup,
)

# (DI, protocol, bytes, format, unit, signed, fields), straight from PROTOCOL.md.
ROWS = [
    (0x00000000, 2007, 4, "XXXXXX.XX", "kWh", False, 1),
    (0x00010000, 2007, 4, "XXXXXX.XX", "kWh", False, 1),
    (0x00010100, 2007, 4, "XXXXXX.XX", "kWh", False, 1),
    (0x00010200, 2007, 4, "XXXXXX.XX", "kWh", False, 1),
    (0x00010300, 2007, 4, "XXXXXX.XX", "kWh", False, 1),
    (0x00010400, 2007, 4, "XXXXXX.XX", "kWh", False, 1),
    (0x0001FF00, 2007, 20, "XXXXXX.XX", "kWh", False, 5),
    (0x00020000, 2007, 4, "XXXXXX.XX", "kWh", False, 1),
    (0x02010100, 2007, 2, "XXX.X", "V", False, 1),
    (0x02010200, 2007, 2, "XXX.X", "V", False, 1),
    (0x02010300, 2007, 2, "XXX.X", "V", False, 1),
    (0x02020100, 2007, 3, "XXX.XXX", "A", True, 1),
    (0x02020200, 2007, 3, "XXX.XXX", "A", True, 1),
    (0x02020300, 2007, 3, "XXX.XXX", "A", True, 1),
    (0x02030000, 2007, 3, "XX.XXXX", "kW", True, 1),
    (0x02030100, 2007, 3, "XX.XXXX", "kW", True, 1),
    (0x02030200, 2007, 3, "XX.XXXX", "kW", True, 1),
    (0x02030300, 2007, 3, "XX.XXXX", "kW", True, 1),
    (0x02800002, 2007, 2, "XX.XX", "Hz", False, 1),
    (0x04000101, 2007, 4, "YYMMDDWW", "", False, 4),
    (0x04000102, 2007, 3, "hhmmss", "", False, 3),
    (0x04000503, 2007, 2, "XXXX", "", False, 1),
    (0x00900200, 2007, 4, "XXXXXX.XX", "yuan", False, 1),
    (0x00900201, 2007, 4, "XXXXXX.XX", "yuan", False, 1),
    (0x9010, 1997, 4, "XXXXXX.XX", "kWh", False, 1),
    (0xB611, 1997, 2, "XXX", "V", False, 1),
    (0xB621, 1997, 2, "XX.XX", "A", False, 1),
    (0xB630, 1997, 3, "XX.XXXX", "kW", False, 1),
    (0xC010, 1997, 4, "YYMMDDWW", "", False, 4),
    (0xC011, 1997, 3, "hhmmss", "", False, 3),
]


@pytest.mark.parametrize(("di", "protocol", "length", "fmt", "unit", "signed", "fields"), ROWS)
def test_every_protocol_table_row(
    di: int, protocol: int, length: int, fmt: str, unit: str, signed: bool, fields: int
) -> None:
    item = lookup(di, protocol)
    assert item is not None, f"{di:X}"
    assert (item.length, item.fmt, item.unit, item.signed, item.fields) == (
        length,
        fmt,
        unit,
        signed,
        fields,
    )
    assert item.decimals == (len(fmt.split(".")[1]) if "." in fmt else 0)
    assert len(item.labels) == fields


def test_units_are_the_smallest_register_units() -> None:
    energy = lookup(0x00010000)
    assert energy is not None and energy.decimals == 2  # 0.01 kWh
    assert lookup(0x02010100).decimals == 1  # type: ignore[union-attr]  # 0.1 V
    assert lookup(0x02020100).decimals == 3  # type: ignore[union-attr]  # 0.001 A
    assert lookup(0x02030000).decimals == 4  # type: ignore[union-attr]  # 0.0001 kW
    assert lookup(0x00900200).decimals == 2  # type: ignore[union-attr]  # 0.01 yuan


def test_unknown_and_cross_protocol_lookups() -> None:
    assert lookup(0x12345678) is None
    assert lookup(0x9010) is None  # a 1997 DI is not a 2007 one
    assert lookup(0x00010000, 1997) is None


def test_past_settlement_periods_follow_the_di_structure() -> None:
    item = lookup(0x0001010C)
    assert item is not None and item.length == 4 and "T1" in item.name
    assert lookup(0x0001010D) is None


def test_status_word_3_is_binary_low_byte_first() -> None:
    item = lookup(0x04000503)
    assert item is not None and not item.bcd
    assert decode_value(item, bytes([0x10, 0x00])) == (0x0010,)
    assert decode_value(item, bytes([0xFA, 0x1F])) == (0x1FFA,)  # not BCD, no error
    assert encode_value(item, [0x1234]) == bytes([0x34, 0x12])
    assert format_value(item, 0x1010) == "0x1010"


@pytest.mark.parametrize(
    ("word", "field", "expected"),
    [
        (1 << 4, "relay_open", True),
        (1 << 6, "relay_command_open", True),
        (1 << 7, "pretrip_alarm", True),
        (0b01 << 8, "meter_type", 1),
        (0b10 << 8, "meter_type", 2),
        (1 << 12, "keep_power", True),
        (0, "relay_open", False),
        (0xFFFF & ~(1 << 4), "relay_open", False),
    ],
)
def test_status_word_3_bits(word: int, field: str, expected: object) -> None:
    assert getattr(StatusWord3.from_word(word), field) == expected


def test_status_word_3_meter_types_and_round_trip() -> None:
    assert StatusWord3.from_word(0).meter_type_name == "not prepaid"
    assert StatusWord3.from_word(1 << 8).meter_type_name == "energy prepaid"
    assert StatusWord3.from_word(2 << 8).meter_type_name == "money prepaid"
    word = (1 << 4) | (1 << 6) | (1 << 7) | (2 << 8) | (1 << 12)
    assert StatusWord3.from_word(word).word == word


def test_decode_examples() -> None:
    energy = lookup(0x00010000)
    assert energy is not None
    assert decode_value(energy, bytes([0x78, 0x56, 0x34, 0x12])) == (12345678,)
    assert format_value(energy, 12345678) == "123456.78"
    block = lookup(0x0001FF00)
    assert block is not None
    raw = bytes.fromhex("0001000045230100000000009999999901000000")
    assert decode_value(block, raw) == (100, 12345, 0, 99999999, 1)
    volts = lookup(0x02010100)
    assert volts is not None
    assert decode_value(volts, bytes([0x00, 0x22])) == (2200,)
    assert format_value(volts, 2200) == "220.0"
    amps = lookup(0x02020100)
    assert amps is not None
    assert decode_value(amps, bytes([0x56, 0x34, 0x92])) == (-123456,)  # top bit = sign
    assert format_value(amps, -123456) == "-123.456"
    assert format_value(amps, -5) == "-0.005"
    kw = lookup(0x02030000)
    assert kw is not None
    assert decode_value(kw, bytes([0x00, 0x50, 0x81])) == (-15000,)
    date = lookup(0x04000101)
    assert date is not None
    assert decode_value(date, bytes([0x05, 0x17, 0x05, 0x24])) == (24, 5, 17, 5)
    assert format_value(date, 5) == "05"
    time = lookup(0x04000102)
    assert time is not None
    assert decode_value(time, bytes([0x59, 0x30, 0x23])) == (23, 30, 59)
    old_volts = lookup(0xB611, 1997)
    assert old_volts is not None
    assert decode_value(old_volts, bytes([0x20, 0x02])) == (220,)
    assert format_value(old_volts, 220) == "220"


@pytest.mark.parametrize("di", [0x00010000, 0x0001FF00, 0x02020100, 0x04000101, 0x04000102])
def test_non_bcd_nibble_is_a_codec_error(di: int) -> None:
    item = lookup(di)
    assert item is not None
    raw = bytearray(encode_value(item, [1] * item.fields))
    raw[0] = 0x0A
    with pytest.raises(CodecError):
        decode_value(item, bytes(raw))


def test_wrong_length_is_a_codec_error() -> None:
    item = lookup(0x00010000)
    assert item is not None
    with pytest.raises(CodecError):
        decode_value(item, b"\x00\x00\x00")


@pytest.mark.parametrize(
    ("di", "values"),
    [
        (0x00010000, [100_000_000]),
        (0x00010000, [-1]),
        (0x02020100, [800_000]),
        (0x02010100, [10_000]),
        (0x0001FF00, [1, 2, 3, 4]),
        (0x04000101, [100, 1, 1, 1]),
        (0x04000503, [0x10000]),
    ],
)
def test_encode_out_of_range_is_a_codec_error(di: int, values: list[int]) -> None:
    item = lookup(di)
    assert item is not None
    with pytest.raises(CodecError):
        encode_value(item, values)


def values_for(item: DataItem) -> st.SearchStrategy[list[int]]:
    if item.grouped:
        one = st.integers(0, 99)
    elif item.signed:
        one = st.integers(-item.max_value, item.max_value)
    else:
        one = st.integers(0, item.max_value)
    return st.lists(one, min_size=item.fields, max_size=item.fields)


@settings(derandomize=True)
@given(st.sampled_from(items()), st.data())
def test_every_item_round_trips(item: DataItem, data: st.DataObject) -> None:
    values = data.draw(values_for(item))
    raw = encode_value(item, values)
    assert len(raw) == item.length
    assert decode_value(item, raw) == tuple(values)


@settings(derandomize=True)
@given(st.sampled_from(items()), st.binary(min_size=1, max_size=20))
def test_decode_never_raises_anything_but_codec_error(item: DataItem, raw: bytes) -> None:
    try:
        values = decode_value(item, raw)
    except CodecError:
        return
    assert len(values) == item.fields


@settings(derandomize=True)
@given(st.integers(-(10**12), 10**12), st.sampled_from([0, 1, 2, 3, 4]))
def test_format_value_is_exact(value: int, decimals: int) -> None:
    item = DataItem(0, 2007, "x", 4, "X", decimals, True, "u")
    text = format_value(item, value)
    whole, _, frac = text.partition(".")
    assert len(frac) == decimals
    assert int(whole.replace("-", "") + frac) == abs(value)
    assert text.startswith("-") == (value < 0)


@settings(derandomize=True)
@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31, 23, 59, 59)))
def test_bcd_datetime_round_trip(when: datetime) -> None:
    when = when.replace(microsecond=0)
    assert datetime_from_bcd(datetime_to_bcd(when)) == when


def test_bcd_datetime_layout_and_invalid_dates() -> None:
    # ss mm hh DD MM YY, lowest first.
    assert datetime_to_bcd(datetime(2099, 12, 31, 23, 59, 58)) == bytes.fromhex("585923311299")
    assert datetime_from_bcd(bytes.fromhex("000000321299")) is None  # 32 December
    assert datetime_from_bcd(bytes.fromhex("0000003A1299")) is None  # not BCD
    assert datetime_from_bcd(b"\x00") is None
    with pytest.raises(CodecError):
        datetime_to_bcd(datetime(2100, 1, 1))


@settings(derandomize=True)
@given(st.lists(st.integers(-799_999, 799_999), min_size=3, max_size=3))
def test_signed_block_signs_each_field(values: list[int]) -> None:
    item = DataItem(0x7FFFFF00, 2007, "test block", 9, "XXX.XXX", 3, True, "A", fields=3)
    assert decode_value(item, encode_value(item, values)) == tuple(values)
