"""Shared fixtures of the collector tests: the simulated field with a collector config that fits
it, archives, and fake terminals (implementations we did not write) over real TCP on loopback.

A fake terminal is a small asyncio server (or, for a DTU, a client that dials the collector's
dial-in port and registers) answering DL/T 645 requests with the codec's own encoders, with
knobs for the ways real terminals and meters differ: preamble length, dead meters, silence,
slow or late replies, replies in 1-byte chunks, bad checksums, error bit0 for an unknown DI,
garbage floods. Waits only bound how long a failing test takes; nothing asserts a duration
except the silence rule, which is a protocol property.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import random
import socket
import tomllib
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, Self

import numpy as np

from meterfield.config import parse_config
from meterfield.field import Field
from meterstream.collectors.archive import P2007, Archive, TerminalPlan, load_archive
from meterstream.collectors.batch import CollectorEvent
from meterstream.collectors.config import CollectorConfig, parse_collector_config
from meterstream.collectors.dlt645 import (
    ENERGY_BLOCK_DI,
    WILDCARD,
    ControlRequest,
    Frame,
    FrameReader,
    ReadRequest,
    TimeSetRequest,
    decode_request,
    encode_abnormal_reply,
    encode_ack,
    encode_read_reply,
)
from meterstream.collectors.sink import MemorySink

ROOT = Path(__file__).resolve().parents[1]
FIELD_CONFIG = ROOT / "config" / "field-test.toml"
WAIT = 10.0  # seconds: only how long a failing wait takes to fail
HOST = "127.0.0.1"
STATUS_DI = 0x04000503
SINGLE_DIS = (0x00010000, 0x00010100, 0x00010200, 0x00010300, 0x00010400)


def run(coro: Coroutine[Any, Any, None], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(cond: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Poll `cond` every 5 ms; AssertionError (naming `what`) if it is not true in time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


class PortHold:
    """A free port for the collector's dial-in listener, held (bound, not listening) until
    `release`, so the field's ephemeral listeners cannot take it in the meantime."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = socket.socket()
        self.sock.bind((HOST, 0))
        self.port = int(self.sock.getsockname()[1])

    def release(self) -> int:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        return self.port


def collector_config(*, dialin_port: int = 0, **poll: Any) -> CollectorConfig:
    """Short timeouts for tests; `poll` overrides [collector] keys (cycle_s, timeout_s, ...)."""
    c: dict[str, Any] = {"cycle_s": 3600.0, "timeout_s": 0.3, "retries": 1, "clock_every": 0,
                         "backoff_s": [0.05, 0.2], "connect_timeout_s": 1.0}
    c.update(poll)
    cfg = parse_collector_config({"collector": c, "dialin": {"port": dialin_port},
                                  "control": {"confirm_poll_s": 0.05,
                                              "confirm_timeout_s": 10.0}})
    return dataclasses.replace(cfg, registration_timeout_s=2.0)


def make_field(mutate: Callable[[dict[str, Any]], None] | None = None, *,
               collector_port: int | None = None) -> Field:
    """The tests' small field (config/field-test.toml, paused); DTUs dial `collector_port`."""
    doc = copy.deepcopy(tomllib.loads(FIELD_CONFIG.read_text()))
    if collector_port is not None:
        doc["collector"]["port"] = collector_port
    if mutate:
        mutate(doc)
    return Field(parse_config(doc, str(FIELD_CONFIG), FIELD_CONFIG.parent))


def field_archive(field: Field, tmp: Path, *, modbus: bool = False) -> Archive:
    """The archive files of a started field, loaded; Modbus gateways left out by default."""
    field.write_archive(tmp / "archive.csv")
    arch = load_archive(tmp / "archive.csv")
    if not modbus:
        arch.terminals = {k: v for k, v in arch.terminals.items() if v.protocol != "modbus"}
    return arch


def plan(tid: str, port: int, addresses: Iterable[str], *, protocols: Iterable[int] = (),
         mode: str = "listen", heartbeat_s: float = 0.0, area: str = "A009") -> TerminalPlan:
    addrs = [int(a) for a in addresses]
    protos = list(protocols) or [P2007] * len(addrs)
    return TerminalPlan(tid, area, "concentrator" if mode == "listen" else "dtu", mode, HOST,
                        port, "dlt645", heartbeat_s=heartbeat_s,
                        address=np.asarray(addrs, np.int64),
                        meter_protocol=np.asarray(protos, np.int8),
                        unit=np.zeros(len(addrs), np.int16), map_name=[""] * len(addrs))


class TimedSink(MemorySink):
    """A MemorySink that also notes the loop time of every event (`at`, aligned with events)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def event(self, event: CollectorEvent) -> None:
        super().event(event)
        self.at.append(asyncio.get_event_loop().time())

    def kinds(self, kind: str) -> list[CollectorEvent]:
        return [e for e in self.events if e.kind == kind]


# --- fake terminals -------------------------------------------------------------------------


@dataclasses.dataclass
class FakeMeter:
    address: str
    registers: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # total, T1..T4, 0.01 kWh
    status: int = 0
    protocol: int = 2007
    block_error: int | None = None  # answer 0001FF00 with this error byte (None: the block)

    @classmethod
    def make(cls, address: str, seed: int, **kw: Any) -> FakeMeter:
        r = random.Random(seed)
        t = [r.randrange(0, 2_000_000) for _ in range(4)]
        return cls(address, (sum(t), *t), **kw)  # type: ignore[arg-type]


def _bcd4(v: int) -> bytes:
    return bytes.fromhex(f"{v:08d}")[::-1]


class FakeTerminal:
    """A transparent DL/T 645 channel to `meters`, with faults switched on by attribute."""

    def __init__(self, meters: Iterable[FakeMeter], *, preamble: int = 2) -> None:
        self.meters = {m.address: m for m in meters}
        self.preamble = preamble
        self.silent: set[str] = set()  # meters that never answer
        self.mute = False  # nothing answers (the TCP connection stays open)
        self.delay_s = 0.0  # every reply this long after its request
        self.delay_for: dict[int, float] = {}  # per DI: reply delay (a late reply)
        self.delay_once: dict[tuple[str, int], float] = {}  # (meter, DI): the next reply only
        self.heartbeat = b""  # a "$HB,..." line written before every reply (between frames)
        self.heartbeat_split = False  # ... in two writes, the line cut in the middle
        self.chunk = 0  # write replies in chunks of this many bytes (0: whole)
        self.chunk_gap_s = 0.002
        self.bad_checksum = False  # every reply's checksum off by one
        self.unknown_di_error = 0x02  # error byte for a DI a meter lacks (bit1, or bit0)
        self.flood = False  # write garbage without end instead of answering
        self.flood_fe = False  # ... a flood of FE bytes only
        self.mute_after: int | None = None  # go mute once this many requests were answered
        self.muted_at: float | None = None  # loop time the first unanswered request came
        self.requests: list[Any] = []
        self.conns: list[FakeConn] = []
        self.server: asyncio.Server | None = None
        self._free_at = 0.0  # half-duplex bus: replies go out in request order

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: FakeConn(self), HOST, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for c in list(self.conns):
            c.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def open_conns(self) -> list[FakeConn]:
        return [c for c in self.conns if not c.closed]

    # what a meter answers
    def reply_to(self, frame: Frame) -> bytes | None:
        req = decode_request(frame)
        self.requests.append(req)
        if self.mute_after is not None and len(self.requests) > self.mute_after:
            self.mute, self.mute_after = True, None
        if self.mute and self.muted_at is None:
            self.muted_at = asyncio.get_event_loop().time()
        if self.mute:
            return None
        p = self.preamble
        if isinstance(req, ReadRequest):
            if req.address == WILDCARD:
                if len(self.meters) != 1:
                    return None
                meter = next(iter(self.meters.values()))
            else:
                meter = self.meters.get(req.address)
            if meter is None or meter.address in self.silent or meter.protocol != req.protocol:
                return None
            a = meter.address
            if req.protocol == 1997:
                if req.di == 0x9010:
                    return encode_read_reply(a, req.di, _bcd4(meter.registers[0]), protocol=1997,
                                             preamble=p)
                return encode_abnormal_reply(a, 0x01, self.unknown_di_error, preamble=p)
            if req.di == ENERGY_BLOCK_DI and meter.block_error is None:
                return encode_read_reply(a, req.di, b"".join(_bcd4(v) for v in meter.registers),
                                         preamble=p)
            if req.di in SINGLE_DIS:
                return encode_read_reply(a, req.di, _bcd4(meter.registers[SINGLE_DIS.index(
                    req.di)]), preamble=p)
            if req.di == STATUS_DI:
                return encode_read_reply(a, req.di, meter.status.to_bytes(2, "little"),
                                         preamble=p)
            err = self.unknown_di_error
            if req.di == ENERGY_BLOCK_DI and meter.block_error is not None:
                err = meter.block_error
            return encode_abnormal_reply(a, 0x11, err, preamble=p)
        if isinstance(req, ControlRequest):
            meter = self.meters.get(req.address)
            if meter is None or meter.address in self.silent:
                return None
            return encode_ack(req.address, 0x1C, preamble=p)
        if isinstance(req, TimeSetRequest):
            meter = self.meters.get(req.address)
            if meter is None or meter.address in self.silent or meter.protocol == 1997:
                return None
            return encode_ack(req.address, 0x08, preamble=p)
        return None


class FakeConn(asyncio.Protocol):
    """One connection of a fake terminal (accepted, or dialled out by a fake DTU)."""

    def __init__(self, term: FakeTerminal, registration: bytes = b"") -> None:
        self.term = term
        self.registration = registration
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost = asyncio.get_event_loop().create_future()
        self._flooder: asyncio.TimerHandle | None = None
        self._rng = random.Random(7)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.term.conns.append(self)
        if self.registration:
            self.write(self.registration)
        if self.term.flood or self.term.flood_fe:
            self._flood()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._flooder is not None:
            self._flooder.cancel()
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _flood(self) -> None:
        if self.closed:
            return
        if self.term.flood_fe:
            self.write(b"\xfe" * 8192)
        else:
            # random bytes ending in the start of a long candidate frame (L = 255), so the
            # reader has to hold as much as it ever may
            head = b"\x68" + self._rng.randbytes(6) + b"\x68\x91\xff"
            self.write(self._rng.randbytes(8000) + head + self._rng.randbytes(240))
        self._flooder = asyncio.get_event_loop().call_later(0.002, self._flood)

    def data_received(self, data: bytes) -> None:
        term = self.term
        for item in self.reader.feed(data):
            if not isinstance(item, Frame) or item.control & 0x80:
                continue
            reply = term.reply_to(item)
            if reply is None or term.flood or term.flood_fe:
                continue
            if term.bad_checksum:
                reply = reply[:-2] + bytes(((reply[-2] + 1) & 0xFF,)) + reply[-1:]
            req = term.requests[-1]
            key = (getattr(req, "address", ""), getattr(req, "di", -1))
            delay = term.delay_once.pop(key, None)
            if delay is None:
                delay = term.delay_for.get(key[1], term.delay_s)
            if term.heartbeat:
                hb = term.heartbeat
                if term.heartbeat_split:
                    cut = len(hb) // 2
                    self.write(hb[:cut])
                    reply = hb[cut:] + reply
                else:
                    reply = hb + reply
            self._schedule(reply, delay)

    def _schedule(self, reply: bytes, delay: float) -> None:
        loop = asyncio.get_event_loop()
        term = self.term
        at = max(loop.time() + delay, term._free_at)
        if term.chunk:
            pieces = [reply[i:i + term.chunk] for i in range(0, len(reply), term.chunk)]
        else:
            pieces = [reply]
        for k, piece in enumerate(pieces):
            loop.call_at(at + k * term.chunk_gap_s, self.write, piece)
        term._free_at = at + len(pieces) * term.chunk_gap_s if term.chunk else at


async def dial(term: FakeTerminal, port: int, terminal_id: str,
               firmware: str = "FAKE-1.0") -> FakeConn:
    """A fake DTU: dial the collector's dial-in port and register as `terminal_id`."""
    loop = asyncio.get_running_loop()
    reg = f"$REG,{terminal_id},{firmware}\r\n".encode()
    _t, conn = await loop.create_connection(lambda: FakeConn(term, reg), HOST, port)
    return conn


class Background:
    """Run a callback every `every_s` seconds until closed (e.g. advance the paused field)."""

    def __init__(self, fn: Callable[[], object], every_s: float = 0.05) -> None:
        self.fn = fn
        self.every_s = every_s
        self.task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            r = self.fn()
            if isinstance(r, Awaitable):
                await r

    async def __aenter__(self) -> Self:
        self.task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass

