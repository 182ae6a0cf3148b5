"""The meters behind a terminal answering DL/T 645 (sans-I/O): reads, refusals, 1997 meters,
wildcards, writes and time sets, checked with the shared codec's encoders and decoders."""

from __future__ import annotations

import copy
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from meterfield.config import parse_config
from meterfield.field import Field
from meterfield.fleet import P1997, P2007
from meterfield.serving import Dlt645Port, value_encoder
from meterstream.collectors.dlt645 import (
    BROADCAST,
    WILDCARD,
    AbnormalReply,
    AckReply,
    AddressReply,
    ControlAction,
    Credentials,
    FrameReader,
    ReadReply,
    decode_reply,
    encode_control,
    encode_read,
    encode_read_address,
    encode_time_set,
    encode_value,
    encode_write,
    items,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "field-test.toml"
FAR = datetime(2099, 12, 31, 23, 59, 59)


def make_field(**sections: dict[str, Any]) -> Field:
    doc = tomllib.loads(CONFIG.read_text())
    for name, keys in sections.items():
        doc.setdefault(name, {}).update(copy.deepcopy(keys))
    return Field(parse_config(doc, str(CONFIG), CONFIG.parent))


class Bus:
    """A terminal's port driven with wire bytes, as a collector would."""

    def __init__(self, f: Field, terminal: str) -> None:
        self.f = f
        spec = f.fleet.terminal_by_id(terminal)
        self.port: Dlt645Port = f.terminals[terminal].port  # type: ignore[union-attr]
        self.meters = [int(i) for i in spec.meters]
        self.reader = FrameReader()

    def raw(self, request: bytes) -> bytes | None:
        (frame,) = self.reader.feed(request)
        return self.port.handle(frame)

    def ask(self, request: bytes) -> Any:
        reply = self.raw(request)
        if reply is None:
            return None
        (frame,) = FrameReader().feed(reply)
        return decode_reply(frame)

    def of(self, protocol: int) -> list[int]:
        fl = self.f.fleet
        return [i for i in self.meters if fl.protocol[i] == protocol and fl.role[i] == 0]


def test_reads_answer_the_registers() -> None:
    f = make_field()
    bus = Bus(f, "A001-C001")
    i = bus.of(P2007)[0]
    a = f.address(i)
    r = bus.ask(encode_read(a, 0x0001FF00))
    assert isinstance(r, ReadReply) and r.address == a and r.values == f.bank.registers(i)
    assert bus.ask(encode_read(a, 0x00010000)).values == (f.bank.registers(i)[0],)
    assert bus.ask(encode_read(a, 0x00010300)).values == (f.bank.registers(i)[3],)
    assert bus.ask(encode_read(a, 0x00020000)).values == (0,)  # nothing exported
    f.advance(120)
    (v,) = bus.ask(encode_read(a, 0x02010100)).values
    assert 2000 <= v <= 2500  # 0.1 V
    (p,) = bus.ask(encode_read(a, 0x02030000)).values
    assert p == int(f.bank.power_w[i]) * 10  # 0.0001 kW
    (c,) = bus.ask(encode_read(a, 0x02020100)).values
    assert c == int(f.bank.power_w[i]) * 10_000 // v  # mA = W / V
    (hz,) = bus.ask(encode_read(a, 0x02800002)).values
    assert 4990 <= hz <= 5010
    t = f.bank.meter_time(i, f.now())
    assert bus.ask(encode_read(a, 0x04000101)).values == (t.year % 100, t.month, t.day,
                                                         (t.weekday() + 1) % 7)
    hh, mm, ss = bus.ask(encode_read(a, 0x04000102)).values
    assert abs((t.replace(hour=hh, minute=mm, second=ss) - t).total_seconds()) <= 1
    (sw,) = bus.ask(encode_read(a, 0x04000503)).values
    assert sw == f.bank.status_word3(i, f.now())


def test_every_2007_di_in_the_registry_is_answered() -> None:
    f = make_field()
    bus = Bus(f, "A001-C001")
    money = next(i for i in bus.of(P2007) if f.bank.prepaid[i] == 2)
    a = f.address(money)
    for item in items(2007):
        r = bus.ask(encode_read(a, item.di))
        assert isinstance(r, ReadReply), item.name
        assert r.values is not None and r.item == item


def test_money_registers_only_on_money_prepaid_meters() -> None:
    f = make_field()
    bus = Bus(f, "A001-C001")
    plain = [i for i in f.fleet.terminals[0].meters if f.bank.prepaid[i] == 0
             and f.fleet.protocol[i] == P2007]
    r = bus.ask(encode_read(f.address(int(plain[0])), 0x00900200))
    assert isinstance(r, AbnormalReply) and r.no_data


def test_unknown_di_is_an_abnormal_reply_bit1_or_bit0() -> None:
    f = make_field()
    bus = Bus(f, "A001-C001")
    a = f.address(bus.of(P2007)[0])
    r = bus.ask(encode_read(a, 0x0F0F0F0F))
    assert isinstance(r, AbnormalReply) and r.function == 0x11 and r.error == 0x02
    f2 = make_field(meters={"unknown_di_error": "other"})
    r = Bus(f2, "A001-C001").ask(encode_read(a, 0x0F0F0F0F))
    assert isinstance(r, AbnormalReply) and r.error == 0x01 and r.no_data


def test_a_1997_meter_answers_9010_and_ignores_2007() -> None:
    f = make_field()
    bus = Bus(f, "A001-C001")
    old = bus.of(P1997)
    assert old
    i = old[0]
    a = f.address(i)
    r = bus.ask(encode_read(a, 0x9010, protocol=1997))
    assert isinstance(r, ReadReply) and r.protocol == 1997 and r.values == (f.bank.registers(i)[0],)
    for di in (0xB611, 0xB621, 0xB630, 0xC010, 0xC011):
        r = bus.ask(encode_read(a, di, protocol=1997))
        assert isinstance(r, ReadReply) and r.values is not None, hex(di)
    (v,) = bus.ask(encode_read(a, 0xB611, protocol=1997)).values
    assert 200 <= v <= 250  # whole volts
    assert bus.ask(encode_read(a, 0x0001FF00)) is None  # a 2007 read: silence
    assert bus.ask(encode_control(a, ControlAction.TRIP, FAR, Credentials())) is None
    new = bus.of(P2007)[0]
    assert bus.ask(encode_read(f.address(new), 0x9010, protocol=1997)) is None


def test_remote_control_refusals() -> None:
    f = make_field()
    bus = Bus(f, "A001-C001")
    i = bus.of(P2007)[0]
    a = f.address(i)
    bad = Credentials(password_level=2, password="123456")
    r = bus.ask(encode_control(a, ControlAction.TRIP, FAR, bad))
    assert isinstance(r, AbnormalReply) and r.function == 0x1C and r.error == 0x0004
    r = bus.ask(encode_control(a, ControlAction.TRIP, FAR, Credentials(password_level=4)))
    assert isinstance(r, AbnormalReply) and r.error == 0x0004
    r = bus.ask(encode_control(a, ControlAction.TRIP, FAR, Credentials(password_level=0x98)))
    assert isinstance(r, AbnormalReply) and r.error == 0x0002  # no ESAM: MAC error
    past = f.bank.meter_time(i, f.now()) - timedelta(seconds=5)
    r = bus.ask(encode_control(a, ControlAction.TRIP, past, Credentials()))
    assert isinstance(r, AbnormalReply) and r.error == 0x0010
    assert isinstance(bus.ask(encode_control(a, ControlAction.KEEP_POWER, FAR, Credentials())), AckReply)
    r = bus.ask(encode_control(a, ControlAction.TRIP, FAR, Credentials()))
    assert isinstance(r, AbnormalReply) and r.error == 0x0020
    assert not f.bank.relay_command_open[i]
    assert isinstance(bus.ask(encode_control(a, ControlAction.KEEP_POWER_RELEASE, FAR, Credentials())), AckReply)
    r = bus.ask(encode_control(a, ControlAction.TRIP, FAR, Credentials()))
    assert isinstance(r, AckReply) and r.function == 0x1C
    assert f.bank.relay_command_open[i]


def test_alarm_sets_bit7() -> None:
    f = make_field()
    bus = Bus(f, "A001-C001")
    i = next(i for i in bus.of(P2007) if f.bank.prepaid[i] != 2)
    a = f.address(i)
    assert isinstance(bus.ask(encode_control(a, ControlAction.ALARM, FAR, Credentials())), AckReply)
    assert bus.ask(encode_read(a, 0x04000503)).values[0] & 0x80
    bus.ask(encode_control(a, ControlAction.ALARM_RELEASE, FAR, Credentials()))
    assert not bus.ask(encode_read(a, 0x04000503)).values[0] & 0x80


def test_wildcard_is_answered_only_on_a_single_meter_port() -> None:
    f = make_field()
    single = Bus(f, "A001-S002")
    (only,) = single.meters
    r = single.ask(encode_read_address())
    assert isinstance(r, AddressReply) and r.address == f.address(only)
    r = single.ask(encode_read(WILDCARD, 0x0001FF00))
    assert isinstance(r, ReadReply) and r.address == f.address(only)
    shared = Bus(f, "A001-C001")
    assert shared.ask(encode_read_address()) is None
    assert shared.ask(encode_read(WILDCARD, 0x0001FF00)) is None
    assert shared.ask(encode_read("999999999998", 0x0001FF00)) is None  # nobody with that address


def test_time_set_broadcast_and_addressed_and_write_time() -> None:
    f = make_field()
    bus = Bus(f, "A001-C001")
    when = datetime(2024, 6, 1, 8, 0, 0)
    assert bus.raw(encode_time_set(BROADCAST, when)) is None  # never answered
    for i in bus.meters:
        assert f.bank.meter_time(i, f.now()) == when  # 1997 meters too
    i = bus.of(P2007)[0]
    a = f.address(i)
    r = bus.ask(encode_time_set(a, datetime(2024, 6, 1, 9, 30, 0)))
    assert isinstance(r, AckReply) and r.function == 0x08
    assert f.bank.meter_time(i, f.now()) == datetime(2024, 6, 1, 9, 30, 0)
    time_item = next(it for it in items(2007) if it.di == 0x04000102)
    value = encode_value(time_item, (10, 11, 12))
    r = bus.ask(encode_write(a, 0x04000102, value, Credentials()))
    assert isinstance(r, AckReply) and r.function == 0x14
    assert f.bank.meter_time(i, f.now()) == datetime(2024, 6, 1, 10, 11, 12)
    r = bus.ask(encode_write(a, 0x04000102, value, Credentials(password="111111")))
    assert isinstance(r, AbnormalReply) and r.error == 0x04
    r = bus.ask(encode_write(a, 0x00010000, b"\x00\x00\x00\x00", Credentials()))
    assert isinstance(r, AbnormalReply) and r.error == 0x04  # registers are not writable


def test_replies_carry_the_configured_preamble() -> None:
    f = make_field(bus={"preamble": 4})
    bus = Bus(f, "A001-C001")
    reply = bus.raw(encode_read(f.address(bus.of(P2007)[0]), 0x0001FF00))
    assert reply is not None and reply.startswith(b"\xfe" * 4 + b"\x68")
    f0 = make_field(bus={"preamble": 0})
    reply = Bus(f0, "A001-C001").raw(encode_read(f.address(bus.of(P2007)[0]), 0x0001FF00))
    assert reply is not None and reply[0] == 0x68


BCD_ITEMS = [it for it in items() if it.bcd and not it.grouped]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(BCD_ITEMS), st.data())
def test_fast_value_encoder_equals_the_codec(item: Any, data: Any) -> None:
    top = item.max_value
    low = -top if item.signed else 0
    values = tuple(data.draw(st.integers(low, top)) for _ in range(item.fields))
    assert value_encoder(item)(values) == encode_value(item, values)


def test_fast_value_encoder_clamps_out_of_range_values() -> None:
    item = next(it for it in items(2007) if it.di == 0x02030000)  # XX.XXXX kW, signed
    assert value_encoder(item)((10**9,)) == encode_value(item, (item.max_value,))
    reg = next(it for it in items(2007) if it.di == 0x00010000)
    assert value_encoder(reg)((-5,)) == encode_value(reg, (0,))
    assert np.iinfo(np.int64).max > item.max_value


def test_dead_meters_never_answer_and_change_nothing_else() -> None:
    """share_dead takes meters off the bus; the rest of the fleet is as without it."""
    doc = tomllib.loads(CONFIG.read_text())
    alive = Field(parse_config(doc, str(CONFIG), CONFIG.parent))
    for group in doc["terminals"]:
        if group["kind"] == "concentrator":
            group["share_dead"] = 0.5
    dead = Field(parse_config(doc, str(CONFIG), CONFIG.parent))
    a, b = alive.fleet, dead.fleet
    assert not a.dead.any() and b.dead.any()
    assert (a.address == b.address).all() and (a.balance_cents == b.balance_cents).all()
    assert (a.protocol == b.protocol).all() and (a.prepaid == b.prepaid).all()
    spec = next(t for t in b.terminals if t.kind == "concentrator")
    port: Dlt645Port = dead.terminals[spec.id].port  # type: ignore[union-attr]
    for i in spec.meters.tolist():
        proto = 1997 if b.protocol[i] == P1997 else 2007
        di = 0x9010 if proto == 1997 else 0x0001FF00
        (frame,) = FrameReader().feed(encode_read(b.address_of(i), di, protocol=proto))
        assert (port.handle(frame) is None) == bool(b.dead[i])
