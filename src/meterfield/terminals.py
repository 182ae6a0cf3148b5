"""Terminals on the wire: concentrators and serial servers that listen, DTUs that dial out.

Each terminal owns one bus (half duplex: one request at a time, in arrival order) and carries
raw DL/T 645 frames over TCP: asyncio Protocols (no Task per request), replies written at once
when the bus has no latency, else scheduled with `call_at` after byte pacing and turnaround.
Faults per request: no reply, a corrupted reply, a late reply (after the collector's timeout).
DTUs announce themselves with one ASCII line, then heartbeat, and reconnect with backoff:

    $REG,<terminal_id>,<firmware>\\r\\n      once, right after the connection is made
    $HB,<terminal_id>,<seq>\\r\\n            every heartbeat_s (real time), seq 1, 2, ... per connection

Both lines start with '$' (24H) and contain neither 68H nor FEH (ids and firmware are upper
case), so they can never be taken for a DL/T 645 frame; they are only written between replies,
never inside one. Link outages (simulated time, driven by the field) close the listener and
every connection, or keep a DTU away. This module never imports collector code.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import cast

from meterfield.config import BusConfig
from meterfield.fleet import TerminalSpec
from meterfield.serving import CachedRead, Dlt645Port
from meterstream.collectors.dlt645 import Frame, FrameReader


def registration_packet(terminal_id: str, firmware: str) -> bytes:
    """What a DTU sends first on every connection it makes."""
    return f"$REG,{terminal_id},{firmware}\r\n".encode("ascii")


def heartbeat_packet(terminal_id: str, seq: int) -> bytes:
    """What a DTU sends every heartbeat_s while connected (seq counts from 1 per connection)."""
    return f"$HB,{terminal_id},{seq}\r\n".encode("ascii")


@dataclass
class FieldStats:
    """Fault and link counters of the whole field (requests and replies are counted per
    terminal: Field.summary adds them up)."""

    dropped: int = 0  # a meter that should have answered stayed silent (fault)
    corrupted: int = 0
    late: int = 0
    modbus_requests: int = 0
    connections: int = 0  # accepted or dialled, since start
    registrations: int = 0
    heartbeats: int = 0
    dial_failures: int = 0


class Dlt645Connection(asyncio.Protocol):
    """One TCP connection to a terminal: frames in, replies (and DTU packets) out."""

    def __init__(self, terminal: Dlt645Terminal) -> None:
        self.terminal = terminal
        self.reader = FrameReader()
        self.cache = terminal.port.read_cache
        self.transport: asyncio.Transport | None = None
        self.pending = 0  # replies scheduled but not yet written
        self.heartbeat_due = False
        self.hb_seq = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hb_handle: asyncio.TimerHandle | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.terminal.connection_made(self)

    def data_received(self, data: bytes) -> None:
        # Hot path: a read request seen before on this port, alone in its chunk.
        if not self.reader.buffered:
            hit = self.cache.get(data)
            if hit is not None:
                self.terminal.on_cached_read(self, len(data), hit)
                return
        discarded = self.reader.discarded
        items = self.reader.feed(data)
        handle = self.terminal.on_frame
        for item in items:
            if type(item) is Frame:
                handle(self, item, len(data))
        if (len(items) == 1 and not self.reader.buffered and self.reader.discarded == discarded
                and type(items[0]) is Frame):
            self.terminal.port.remember(bytes(data), items[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._hb_handle is not None:
            self._hb_handle.cancel()
        self.terminal.connection_lost(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # writing
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def deliver(self, reply: bytes) -> None:
        """A scheduled reply falls due: write it, then a heartbeat that waited for it."""
        self.pending -= 1
        self.write(reply)
        if self.heartbeat_due and self.pending == 0:
            self._send_heartbeat()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # DTU packets
    def start_dtu(self, heartbeat_s: float) -> None:
        t = self.terminal
        self.write(registration_packet(t.spec.id, t.spec.firmware))
        t.stats.registrations += 1
        self._hb_every = heartbeat_s
        self._hb_handle = asyncio.get_running_loop().call_later(heartbeat_s, self._heartbeat)

    def _heartbeat(self) -> None:
        if self.transport is None:
            return
        if self.pending:
            self.heartbeat_due = True  # never between a request and its reply
        else:
            self._send_heartbeat()
        self._hb_handle = asyncio.get_running_loop().call_later(self._hb_every, self._heartbeat)

    def _send_heartbeat(self) -> None:
        self.heartbeat_due = False
        self.hb_seq += 1
        self.write(heartbeat_packet(self.terminal.spec.id, self.hb_seq))
        self.terminal.stats.heartbeats += 1


class Dlt645Terminal:
    """A concentrator / serial server (listen) or DTU (dial) with its bus and meters."""

    def __init__(self, spec: TerminalSpec, port: Dlt645Port, stats: FieldStats, *, host: str,
                 collector: tuple[str, int], backoff_s: tuple[float, float], seed: int) -> None:
        self.spec = spec
        self.port = port
        self.bus: BusConfig = spec.bus
        self.stats = stats
        self.host = host
        self.collector = collector
        self.backoff_s = backoff_s
        self.rng = random.Random(seed)
        self.conns: set[Dlt645Connection] = set()
        self.bound_port = spec.port
        self.link_enabled = True  # False during an outage
        self.running = False
        self.busy_until = 0.0  # loop time when the bus is free again
        self._server: asyncio.Server | None = None
        self._dialer: asyncio.Task[None] | None = None
        self._link_changed: asyncio.Event | None = None
        self._faulty = (self.bus.p_no_reply + self.bus.p_corrupt + self.bus.p_late) > 0
        self._immediate = self.bus.zero_latency
        self.requests = 0
        self.replies = 0

    # --- state --------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def up(self) -> bool:
        """Listening (listen mode) or connected to the collector (dial mode)."""
        if self.spec.mode == "listen":
            return self._server is not None
        return bool(self.conns)

    def endpoint(self) -> tuple[str, str, int]:
        if self.spec.mode == "listen":
            return ("listen", self.host, self.bound_port)
        return ("dial", self.collector[0], self.collector[1])

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.running = True
        self._link_changed = asyncio.Event()
        if self.spec.mode == "listen":
            if self.link_enabled:
                await self._listen()
        else:
            self._dialer = asyncio.get_running_loop().create_task(self._dial_loop())

    async def stop(self) -> None:
        self.running = False
        if self._dialer is not None:
            self._dialer.cancel()
            try:
                await self._dialer
            except asyncio.CancelledError:
                pass
            self._dialer = None
        await self._unlisten()
        for c in list(self.conns):
            c.close()

    async def set_link(self, enabled: bool) -> None:
        """Outage (False) or restoration (True) of this terminal's link."""
        if enabled == self.link_enabled:
            return
        self.link_enabled = enabled
        if self._link_changed is not None:
            self._link_changed.set()
        if not self.running:
            return
        if not enabled:
            await self._unlisten()
            for c in list(self.conns):
                c.close()
        elif self.spec.mode == "listen":
            await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Dlt645Connection(self), self.host, self.bound_port, reuse_address=True,
            backlog=64,
        )
        self.bound_port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _dial_loop(self) -> None:
        loop = asyncio.get_running_loop()
        lo, hi = self.backoff_s
        backoff = lo
        assert self._link_changed is not None
        while self.running:
            if not self.link_enabled:
                self._link_changed.clear()
                await self._link_changed.wait()
                continue
            conn: Dlt645Connection | None = None
            try:
                _t, conn = await loop.create_connection(
                    lambda: Dlt645Connection(self), self.collector[0], self.collector[1])
            except OSError:
                self.stats.dial_failures += 1
                await asyncio.sleep(backoff * (0.5 + self.rng.random()))
                backoff = min(hi, backoff * 2)
                continue
            backoff = lo
            conn.start_dtu(self.spec.heartbeat_s)
            await conn.closed
            await asyncio.sleep(lo * (0.5 + self.rng.random()))  # the collector hung up

    # --- connections and requests -------------------------------------------------------------

    def connection_made(self, conn: Dlt645Connection) -> None:
        if not self.link_enabled:
            conn.close()
            return
        self.conns.add(conn)
        self.stats.connections += 1

    def connection_lost(self, conn: Dlt645Connection) -> None:
        self.conns.discard(conn)

    def on_frame(self, conn: Dlt645Connection, frame: Frame, size: int) -> None:
        """One request on the bus: the meters answer now; the wire decides when it arrives."""
        self.requests += 1
        reply = self.port.handle(frame)
        if self._immediate and not self._faulty:
            if reply is not None:
                self.replies += 1
                conn.write(reply)
            return
        self._schedule(conn, 12 + len(frame.data), reply)

    def on_cached_read(self, conn: Dlt645Connection, size: int, read: CachedRead) -> None:
        """on_frame for a remembered read request (same outcome, less work)."""
        self.requests += 1
        reply = self.port.read_cached(read)
        if self._immediate and not self._faulty:
            self.replies += 1
            conn.transport.write(reply)  # type: ignore[union-attr]
            return
        self._schedule(conn, size, reply)

    def _schedule(self, conn: Dlt645Connection, size: int, reply: bytes | None) -> None:
        bus = self.bus
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self.busy_until)
        byte_s = bus.byte_s if bus.pacing else 0.0
        heard = start + size * byte_s  # the request on the bus
        if reply is None:
            self.busy_until = heard
            return
        fate = self.rng.random() if self._faulty else 1.0
        if fate < bus.p_no_reply:
            self.stats.dropped += 1
            self.busy_until = heard
            return
        fate -= bus.p_no_reply
        if fate < bus.p_corrupt:
            reply = self._corrupt(reply)
            self.stats.corrupted += 1
        elif fate - bus.p_corrupt < bus.p_late:
            self.stats.late += 1
            done = heard + bus.late_s
            self._reply_at(conn, reply, done)
            return
        lo, hi = bus.turnaround_ms
        turnaround = (lo + (hi - lo) * self.rng.random()) / 1000.0 if hi > 0 else 0.0
        done = heard + turnaround + len(reply) * byte_s
        self._reply_at(conn, reply, done)

    def _reply_at(self, conn: Dlt645Connection, reply: bytes, done: float) -> None:
        self.busy_until = done
        self.replies += 1
        loop = asyncio.get_running_loop()
        if done <= loop.time() and conn.pending == 0:
            conn.write(reply)
            return
        conn.pending += 1
        loop.call_at(done, conn.deliver, reply)

    def _corrupt(self, reply: bytes) -> bytes:
        """Flip bits of one byte after the preamble: the checksum or the framing catches it."""
        start = self.bus.preamble
        k = self.rng.randrange(start, len(reply))
        mask = self.rng.randrange(1, 256)
        b = bytearray(reply)
        b[k] ^= mask
        if b[k] == 0x68 and k == start:  # keep it detectable as a broken frame, not garbage
            b[k] ^= 0x01
        return bytes(b)
