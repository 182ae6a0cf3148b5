"""The meters behind one terminal answering DL/T 645: a request frame in, a reply frame out.

Sans-I/O: `Dlt645Port.handle(frame)` decodes the request with the shared codec, applies it to
the meter bank (reads, 08H time set, 14H write, 1CH remote control) and returns the encoded
reply, or None when no meter would answer (broadcast, unknown address, a 2007 request to a
1997 meter and the other way round). Timing and faults are the bus's business (terminals.py).
It imports only the codec from meterstream, and never a collector module.

Choices where the standard leaves room (docs/field.md):
- 13H read-address and reads to the all-AA wildcard are answered only on a port with a single
  meter (on a shared bus every meter would answer at once); otherwise silence.
- 08H time set: broadcast sets every meter of the port and is never answered; addressed to
  one meter it is acknowledged with 88H.
- 14H write: 04000101 (date) and 04000102 (time) with the right password; anything else is
  refused with error bit2 (password wrong / unauthorized).
- 1CH with PA = 98H (ESAM ciphertext) is refused with error word 0x0002 (MAC): the field has no
  ESAM; plaintext (PA = the configured level) is checked against the configured password.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np

from meterfield.fleet import P1997, P2007
from meterfield.meters import ERR_DEADLINE, ERR_MAC, ERR_PASSWORD, MeterBank
from meterstream.collectors.dlt645 import (
    BROADCAST,
    WILDCARD,
    ControlRequest,
    DataItem,
    FollowupRequest,
    Frame,
    ReadAddressRequest,
    ReadReplyEncoder,
    ReadRequest,
    TimeSetRequest,
    UnknownRequest,
    WriteRequest,
    decode_request,
    decode_value,
    encode_abnormal_reply,
    encode_ack,
    encode_address_reply,
    encode_read_reply,
    encode_value,
    lookup,
)

TIME_SET, READ_1997, READ, READ_FOLLOWUP, WRITE, CONTROL = 0x08, 0x01, 0x11, 0x12, 0x14, 0x1C
ERR_BYTE_OTHER, ERR_BYTE_NO_DATA, ERR_BYTE_UNAUTHORIZED = 0x01, 0x02, 0x04
PA_CIPHERTEXT = 0x98
DI_DATE, DI_TIME = 0x04000101, 0x04000102
# 2007 functions a 2007 meter knows but the field does not carry out: refused with "other".
_REFUSED_2007 = frozenset({0x03, 0x15, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1D, 0x1E, 0x1F})

Values = tuple[int, ...]


READ_CACHE_LIMIT = 1 << 16


class CachedRead:
    """A read request seen before on this port, resolved once."""

    __slots__ = (
        "encoder",
        "gen",
        "last_reply",
        "last_value",
        "meter",
        "protocol",
        "reader",
        "reply",
    )

    def __init__(self, meter: int, protocol: int,
                 reader: Callable[[MeterBank, int, int], Values | None],
                 encoder: Callable[[Values], bytes], reply: ReadReplyEncoder) -> None:
        self.meter = meter
        self.protocol = protocol
        self.reader = reader
        self.encoder = encoder
        self.reply = reply  # the meter's reply to this DI with everything but the value built
        self.last_value = b""
        self.last_reply = b""
        self.gen = -1  # the bank generation last_reply is valid for (registers, money only)


class Dlt645Port:
    """The DL/T 645 meters of one terminal (one bus), answering requests."""

    def __init__(self, bank: MeterBank, meters: np.ndarray, now_ns: Callable[[], int], *,
                 preamble: int = 2) -> None:
        fleet = bank.fleet
        self.bank = bank
        self.now_ns = now_ns
        self.preamble = preamble
        mc = fleet.config.meters
        self.password_level = mc.password_level
        self.password = mc.password
        self.unknown_di_error = mc.unknown_di_error
        # a dead meter (share_dead) is not on the bus: nothing ever answers its address
        rows = [int(i) for i in meters if fleet.protocol[i] in (P2007, P1997) and not fleet.dead[i]]
        self.rows = np.asarray(rows, np.int64)
        self.by_address: dict[str, int] = {fleet.address_of(i): i for i in rows}
        self.address = {i: a for a, i in self.by_address.items()}
        self.is_1997 = {i: bool(fleet.protocol[i] == P1997) for i in rows}
        self.single = rows[0] if len(rows) == 1 else None
        self.abnormal = 0  # abnormal replies sent
        self.read_cache: dict[bytes, CachedRead] = {}

    # --- dispatch -----------------------------------------------------------------------------

    def _meter(self, address: str) -> int | None:
        i = self.by_address.get(address)
        if i is None and address == WILDCARD:
            return self.single
        return i

    def handle(self, frame: Frame) -> bytes | None:
        """The reply to one request frame (with the port's FE preamble), or None."""
        if frame.control & 0x80:
            return None  # a reply seen on the bus: not for the meters
        req = decode_request(frame)
        if type(req) is ReadRequest:
            i = self._meter(req.address)
            if i is None:
                return None
            if self.is_1997[i]:
                return self._read(i, req.di, 1997) if req.protocol == 1997 else None
            return self._read(i, req.di, 2007) if req.protocol == 2007 else None
        if isinstance(req, TimeSetRequest):
            return self._time_set(req)
        i = self._meter(req.address)
        if i is None or self.is_1997[i]:
            return None  # 1997 meters answer 01H reads and the broadcast time only
        if isinstance(req, ControlRequest):
            return self._control(i, req)
        if isinstance(req, ReadAddressRequest):
            return encode_address_reply(self.address[i], preamble=self.preamble)
        if isinstance(req, WriteRequest):
            return self._write(i, req)
        if isinstance(req, FollowupRequest):
            return self._abnormal(i, READ_FOLLOWUP, ERR_BYTE_NO_DATA)
        assert isinstance(req, UnknownRequest)
        if req.function in (READ, WRITE, CONTROL, READ_FOLLOWUP) or req.function in _REFUSED_2007:
            return self._abnormal(i, req.function, ERR_BYTE_OTHER)
        return None  # not a 2007 function (e.g. a 1997 write): silence

    def _abnormal(self, i: int, function: int, error: int, *, word: bool = False) -> bytes:
        self.abnormal += 1
        return encode_abnormal_reply(self.address[i], function, error, word=word,
                                     preamble=self.preamble)

    # --- reads --------------------------------------------------------------------------------

    def _read(self, i: int, di: int, protocol: int) -> bytes:
        item = lookup(di, protocol)
        values = None if item is None else read_values(self.bank, item, i, self.now_ns())
        if item is None or values is None:
            return self._abnormal(i, READ if protocol == 2007 else READ_1997, self.unknown_di_error)
        value = value_encoder(item)(values)
        return encode_read_reply(self.address[i], di, value, protocol=protocol,
                                 preamble=self.preamble)

    # --- the hot path: repeated reads -----------------------------------------------------------

    def remember(self, wire: bytes, frame: Frame) -> None:
        """`wire` was exactly this one read request: keep what it asks, so the next identical
        bytes skip the frame reader and the decoder (a poller sends the same bytes each cycle).
        Only reads a meter of this port answers normally are kept; the cache is bounded."""
        req = decode_request(frame)
        if type(req) is not ReadRequest:
            return
        i = self._meter(req.address)
        if i is None or (req.protocol == 1997) != self.is_1997[i]:
            return
        item = lookup(req.di, req.protocol)
        if item is None:
            return
        if len(self.read_cache) >= READ_CACHE_LIMIT:
            self.read_cache.clear()
        reply = ReadReplyEncoder(self.address[i], req.di, item.length, protocol=req.protocol,
                                 preamble=self.preamble)
        self.read_cache[wire] = CachedRead(i, req.protocol, reader_for(item), value_encoder(item),
                                           reply)

    def read_cached(self, r: CachedRead) -> bytes:
        """The reply to a remembered read: the reply bytes are reused while the value is (for
        registers and money: until the bank's next advance or change of them)."""
        bank = self.bank
        if r.gen == bank.generation:
            return r.last_reply
        values = r.reader(bank, r.meter, self.now_ns())
        if values is None:
            return self._abnormal(r.meter, READ if r.protocol == 2007 else READ_1997,
                                  self.unknown_di_error)
        value = r.encoder(values)
        if value != r.last_value:
            r.last_reply = r.reply(value)
            r.last_value = value
        if r.reader in _STABLE:
            r.gen = bank.generation
        return r.last_reply

    # --- time set and writes ------------------------------------------------------------------

    def _time_set(self, req: TimeSetRequest) -> bytes | None:
        now = self.now_ns()
        if req.address == BROADCAST:
            if req.when is not None and self.rows.size:
                self.bank.set_meter_time(self.rows, req.when, now)
            return None
        i = self._meter(req.address)
        if i is None:
            return None
        if req.when is None:
            return self._abnormal(i, TIME_SET, ERR_BYTE_OTHER)
        self.bank.set_meter_time([i], req.when, now)
        return None if self.is_1997[i] else encode_ack(self.address[i], TIME_SET,
                                                       preamble=self.preamble)

    def _authorized(self, level: int, password: str) -> bool:
        return level == self.password_level and password == self.password

    def _write(self, i: int, req: WriteRequest) -> bytes:
        c = req.credentials
        if not self._authorized(c.password_level, c.password) or req.di not in (DI_DATE, DI_TIME):
            return self._abnormal(i, WRITE, ERR_BYTE_UNAUTHORIZED)
        item = lookup(req.di, 2007)
        assert item is not None
        try:
            v = decode_value(item, req.value)
            now = self.now_ns()
            cur = self.bank.meter_time(i, now)
            if req.di == DI_DATE:
                when = cur.replace(year=2000 + v[0], month=v[1], day=v[2])
            else:
                when = cur.replace(hour=v[0], minute=v[1], second=v[2], microsecond=0)
        except (ValueError, TypeError):  # CodecError is a ValueError
            return self._abnormal(i, WRITE, ERR_BYTE_OTHER)
        self.bank.set_meter_time([i], when, now)
        return encode_ack(self.address[i], WRITE, preamble=self.preamble)

    # --- remote control (1CH) ---------------------------------------------------------------------

    def _control(self, i: int, req: ControlRequest) -> bytes:
        c = req.credentials
        if c.password_level == PA_CIPHERTEXT:
            return self._abnormal(i, CONTROL, ERR_MAC, word=True)
        if not self._authorized(c.password_level, c.password):
            return self._abnormal(i, CONTROL, ERR_PASSWORD, word=True)
        now = self.now_ns()
        if req.deadline is None or req.deadline < self.bank.meter_time(i, now):
            return self._abnormal(i, CONTROL, ERR_DEADLINE, word=True)
        err = self.bank.control(i, req.action, now)
        if err:
            return self._abnormal(i, CONTROL, err, word=True)
        return encode_ack(self.address[i], CONTROL, preamble=self.preamble)


_ENCODERS: dict[DataItem, Callable[[Values], bytes]] = {}


def value_encoder(item: DataItem) -> Callable[[Values], bytes]:
    """A fast encoder for `item`'s value that clamps to its range (a meter shows its maximum,
    never garbage); bytes identical to the codec's `encode_value` (held equal by a property
    test). The codec recomputes the item's layout for every value; the hot read path of the
    field cannot afford that, so the layout is computed once per item here."""
    enc = _ENCODERS.get(item)
    if enc is None:
        enc = _ENCODERS[item] = _build_encoder(item)
    return enc


def _build_encoder(item: DataItem) -> Callable[[Values], bytes]:
    if not item.bcd or item.grouped:
        return lambda values: encode_value(item, values)
    top = item.max_value
    width = item.field_length
    digits = 2 * width
    if not item.signed:
        fmt = ("%0" + str(digits) + "d") * item.fields

        def unsigned(values: Values) -> bytes:
            vals = tuple(v if 0 <= v <= top else (0 if v < 0 else top) for v in reversed(values))
            return bytes.fromhex(fmt % vals)[::-1]
        return unsigned
    one = "%0" + str(digits) + "d"

    def signed(values: Values) -> bytes:
        out = b""
        for v in values:
            m = min(abs(v), top)
            f = bytes.fromhex(one % m)[::-1]
            if v < 0 and m:
                f = f[:-1] + bytes((f[-1] | 0x80,))
            out += f
        return out
    return signed


def _date(t: datetime) -> Values:
    return (t.year % 100, t.month, t.day, (t.weekday() + 1) % 7)  # WW: 0 = Sunday


Reader = Callable[[MeterBank, int, int], "Values | None"]


def _no_data(bank: MeterBank, i: int, now: int) -> None:
    return None


def _stable(fn: Reader) -> Reader:
    """Mark a reader whose value changes only when the bank's generation does."""
    _STABLE.add(fn)
    return fn


def _energy(kind: int, tariff: int, period: int) -> Reader:
    if kind == 2:  # reverse active energy: these customers never export
        zeros = (0, 0, 0, 0, 0)
        return _stable(lambda b, i, now: zeros if tariff == 0xFF else (0,))
    if period == 0:
        if tariff == 0xFF:
            return _stable(lambda b, i, now: b.registers(i))
        return _stable(lambda b, i, now: (b.registers(i)[tariff],))
    if tariff == 0xFF:
        return _stable(lambda b, i, now: b.settlement(i, period))
    return _stable(lambda b, i, now: (b.settlement(i, period)[tariff],))


def _instrument(group: int, sub: int) -> Reader:
    if group == 0x0201:
        return _no_data if sub == 0 else (lambda b, i, now: (b.voltage_dv(i, sub - 1, now),))
    if group == 0x0202:
        return _no_data if sub == 0 else (lambda b, i, now: (b.current_ma(i, sub - 1, now),))
    phase = None if sub == 0 else sub - 1
    return lambda b, i, now: (b.power_w_phase(i, phase) * 10,)  # 0.0001 kW


_READERS: dict[DataItem, Reader] = {}
_STABLE: set[Reader] = set()


def reader_for(item: DataItem) -> Reader:
    """How a meter finds the integers of a register: fn(bank, meter, now) -> values | None."""
    fn = _READERS.get(item)
    if fn is None:
        fn = _READERS[item] = _resolve(item)
    return fn


def _resolve(item: DataItem) -> Reader:
    di = item.di
    if item.protocol == 1997:
        return _READ_1997.get(di, _no_data)
    fn = _READ_2007.get(di)
    if fn is not None:
        return fn
    if di >> 24 == 0:
        kind, tariff, period = (di >> 16) & 0xFF, (di >> 8) & 0xFF, di & 0xFF
        if kind in (0, 1, 2) and (tariff <= 4 or tariff == 0xFF) and period <= 12:
            return _energy(kind, tariff, period)
        return _no_data
    group, sub = di >> 16, (di >> 8) & 0xFF
    if group in (0x0201, 0x0202, 0x0203) and di & 0xFF == 0 and sub <= 3:
        return _instrument(group, sub)
    return _no_data


def read_values(bank: MeterBank, item: DataItem, i: int, now: int) -> Values | None:
    """The integers a meter reports for a register (item's smallest unit), or None = no data."""
    return reader_for(item)(bank, i, now)


def _money(remaining: bool) -> Callable[[MeterBank, int, int], Values | None]:
    def read(bank: MeterBank, i: int, now: int) -> Values | None:
        if bank.prepaid[i] != 2:
            return None  # only money-prepaid (local cost control) meters keep money
        return (bank.remaining_cents(i) if remaining else bank.overdraft_cents(i),)
    return read


def _time_hms(bank: MeterBank, i: int, now: int) -> Values:
    t = bank.meter_time(i, now)
    return (t.hour, t.minute, t.second)


_READ_2007: dict[int, Callable[[MeterBank, int, int], Any]] = {
    0x0001FF00: _stable(lambda b, i, now: b.registers(i)),
    0x00010000: _stable(lambda b, i, now: (b.total_register(i),)),
    0x00000000: _stable(lambda b, i, now: (b.total_register(i),)),
    0x02800002: lambda b, i, now: (b.frequency_chz(i, now),),
    0x04000101: lambda b, i, now: _date(b.meter_time(i, now)),
    0x04000102: _time_hms,
    0x04000503: lambda b, i, now: (b.status_word3(i, now),),
    0x00900200: _stable(_money(True)),
    0x00900201: _stable(_money(False)),
}

_READ_1997: dict[int, Callable[[MeterBank, int, int], Any]] = {
    0x9010: _stable(lambda b, i, now: (b.total_register(i),)),
    0xB611: lambda b, i, now: (b.voltage_dv(i, 0, now) // 10,),  # XXX V
    0xB621: lambda b, i, now: (b.current_ma(i, 0, now) // 10,),  # XX.XX A
    0xB630: lambda b, i, now: (b.power_w_phase(i, None) * 10,),  # XX.XXXX kW
    0xC010: lambda b, i, now: _date(b.meter_time(i, now)),
    0xC011: _time_hms,
}
