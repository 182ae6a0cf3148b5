"""One DL/T 645 terminal session: the link, the half-duplex request queue, poll cycles, jobs.

A concentrator, serial server or DTU carries raw DL/T 645 frames over one TCP connection to a
half-duplex bus: exactly one request is outstanding at a time. Polling and jobs (commands, one-off
reads) share that queue and jobs go first. Everything is driven by asyncio Protocol callbacks
and one re-armed timer per session: no Task or Future per request. The codec does the bytes;
this module decides what to send next, matches replies to the request (a late reply to an
earlier request is dropped as stale), and turns a cycle into one `ReadingBatch`.

Rules (docs/collectors.md): a failed read is retried at the end of the cycle, so the next
request goes to another meter and one dead meter costs only its timeouts; `silent_after`
timeouts in a row on different meters with no byte in between mean the link is down; a meter
that fails `demote_after` cycles in a row is read only every `demoted_every` cycles until it
answers again; a meter that refuses the energy block is read with the five single DIs. Never
money, tariffs or Kafka; never logs credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

import numpy as np

from meterstream.collectors.archive import P1997, P2007, TerminalPlan
from meterstream.collectors.batch import (
    NO_DRIFT,
    NO_VALUE,
    OUTCOME_BAD_FRAME,
    OUTCOME_ERROR,
    OUTCOME_OK,
    OUTCOME_TIMEOUT,
    CollectorEvent,
    ReadingBatch,
    SessionStats,
)
from meterstream.collectors.commands import (
    ACTIONS,
    CONFIRMED,
    REFUSED,
    UNCONFIRMED,
    Command,
    CommandResult,
    confirms,
)
from meterstream.collectors.config import CollectorConfig
from meterstream.collectors.dlt645 import (
    BROADCAST,
    CONTROL_ERROR_BITS,
    ENERGY_BLOCK_DI,
    Frame,
    FrameReader,
    ReadReply,
    address_to_wire,
    decode_energy_blocks,
    decode_reply,
    encode_control,
    encode_read,
    encode_reads,
    encode_time_set,
)
from meterstream.collectors.sink import Sink

__all__ = ["ControlJob", "Dlt645Session", "Link", "ReadJob"]

STATUS_DI = 0x04000503
#: read-backs of a command's relay state sent back to back before they leave room for polling
FAST_READBACKS = 10
DATE_DI, TIME_DI = 0x04000101, 0x04000102
DATE_97, TIME_97 = 0xC010, 0xC011
TOTAL_97 = 0x9010
SINGLE_DIS = (0x00010000, 0x00010100, 0x00010200, 0x00010300, 0x00010400)

# Poll operations (what one request of a cycle reads).
OP_BLOCK = 0
OP_SINGLE = 1  # .. 5: total, T1..T4 one by one (meters that refuse the block)
OP_STATUS = 6
OP_TOTAL97 = 7
OP_DATE = 8
OP_TIME = 9
OP_DATE97 = 10
OP_TIME97 = 11
OP_SETTIME = 12
OP_EXTRA = 16  # + index into extra_dis

PRIMARY = frozenset({OP_BLOCK, OP_SINGLE, OP_TOTAL97})  # a meter that fails these is skipped

# Reply control codes (normal) per request function.
READ, READ97, TIME_SET, CONTROL = 0x11, 0x01, 0x08, 0x1C

_IDLE, _POLL, _JOB = 0, 1, 2


def _op_di(op: int, extra: tuple[int, ...]) -> tuple[int, int]:
    """(DI, protocol) of a read operation."""
    if op == OP_BLOCK:
        return ENERGY_BLOCK_DI, 2007
    if OP_SINGLE <= op < OP_SINGLE + 5:
        return SINGLE_DIS[op - OP_SINGLE], 2007
    if op == OP_STATUS:
        return STATUS_DI, 2007
    if op == OP_TOTAL97:
        return TOTAL_97, 1997
    if op == OP_DATE:
        return DATE_DI, 2007
    if op == OP_TIME:
        return TIME_DI, 2007
    if op == OP_DATE97:
        return DATE_97, 1997
    if op == OP_TIME97:
        return TIME_97, 1997
    return extra[op - OP_EXTRA], 2007


class Link(asyncio.Protocol):
    """One TCP connection to a terminal; hands everything to its session (set on attach)."""

    __slots__ = ("on_data", "on_lost", "on_made", "peer", "session", "transport")

    def __init__(self, session: Dlt645Session | None = None) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.on_data: Callable[[Link, bytes], None] | None = None
        self.on_lost: Callable[[Link, Exception | None], None] | None = None
        self.on_made: Callable[[Link], None] | None = None  # dial-in: the listener's
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        if self.session is not None:
            self.session.attach(self)
        elif self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        cb = self.on_data
        if cb is not None:
            cb(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        cb = self.on_lost
        self.transport = None
        if cb is not None:
            cb(self, exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Job:
    """A one-off exchange queued before polling: a read, or a command with its read-back."""

    future: asyncio.Future[Any]
    wire: bytes | None  # expected reply address (None: any, for a wildcard request)
    func: int  # expected reply function
    di_wire: bytes  # expected DI at the start of a read reply ("" for other functions)

    def next_request(self, s: Dlt645Session, now: float) -> bytes | float | None:
        """Bytes to send now, a loop time to wait for, or None when finished."""
        raise NotImplementedError

    def on_reply(self, s: Dlt645Session, frame: Frame) -> None:
        raise NotImplementedError

    def on_fail(self, s: Dlt645Session, why: int) -> None:
        raise NotImplementedError

    def on_link_down(self, s: Dlt645Session) -> None:
        raise NotImplementedError


class ReadJob(_Job):
    """Read one DI of one meter (meterstream poll): the reply frame, or why there was none."""

    def __init__(self, address: str, di: int, protocol: int, preamble: int, retries: int,
                 future: asyncio.Future[Any]) -> None:
        self.frame = encode_read(address, di, protocol=protocol, preamble=preamble)
        self.wire = None if address.upper().startswith("AA") else address_to_wire(address)
        self.func = READ if protocol == 2007 else READ97
        self.di_wire = di.to_bytes(4 if protocol == 2007 else 2, "little")
        self.tries_left = retries + 1
        self.future = future
        self.failure = ""

    def next_request(self, s: Dlt645Session, now: float) -> bytes | float | None:
        if self.future.done():
            return None
        if self.tries_left <= 0:
            self.future.set_result((None, self.failure or "timeout"))
            return None
        self.tries_left -= 1
        return self.frame

    def on_reply(self, s: Dlt645Session, frame: Frame) -> None:
        if not self.future.done():
            self.future.set_result((frame, "ok"))

    def on_fail(self, s: Dlt645Session, why: int) -> None:
        self.failure = "bad frame" if why == OUTCOME_BAD_FRAME else "timeout"

    def on_link_down(self, s: Dlt645Session) -> None:
        if not self.future.done():
            self.future.set_result((None, "link down"))


class ControlJob(_Job):
    """1CH, retried on timeout; then status word 3 read back until it proves the action."""

    def __init__(self, s: Dlt645Session, command: Command, k: int,
                 future: asyncio.Future[Any]) -> None:
        self.command = command
        self.address = command.meter
        self.wire = address_to_wire(command.meter)
        self.k = k
        self.future = future
        self.result = CommandResult(command, s.plan.id)
        self.state = "send"
        self.func = CONTROL
        self.di_wire = b""
        self.next_at = 0.0
        self.readback_at = 0.0
        self.confirm_by = 0.0
        self.sends_left = s.poll.retries + 1
        self.status_frame = encode_read(self.address, STATUS_DI, preamble=s.poll.preamble)

    def _finish(self, s: Dlt645Session, outcome: str, detail: str) -> None:
        r = self.result
        r.outcome, r.detail, r.done_ns = outcome, detail, time.time_ns()
        self.state = "done"
        s.sink.command(r)
        if not self.future.done():
            self.future.set_result(r)

    def next_request(self, s: Dlt645Session, now: float) -> bytes | float | None:
        if self.state == "done":
            return None
        cfg = s.cfg
        if self.state == "send":
            if self.sends_left <= 0:
                # no acknowledgement: the 9CH may be what was lost, so look at the relay anyway
                self.state, self.next_at = "readback", now
                self.confirm_by = now + min(cfg.confirm_timeout_s, 3 * s.poll.timeout_s + 1.0)
                self.unacked = True
            else:
                self.sends_left -= 1
                self.result.attempts += 1
                if self.result.sent_ns is None:
                    self.result.sent_ns = time.time_ns()
                self.func, self.di_wire = CONTROL, b""
                local = datetime.now(cfg.zone).replace(tzinfo=None, microsecond=0)
                return encode_control(self.address, ACTIONS[self.command.action],
                                      local + timedelta(minutes=cfg.deadline_min),
                                      cfg.credentials, preamble=s.poll.preamble)
        if now >= self.confirm_by:
            if getattr(self, "unacked", False):
                self._finish(s, UNCONFIRMED, "no acknowledgement from the meter, and status "
                             "word 3 does not show the action")
            else:
                self._finish(s, UNCONFIRMED, f"acknowledged, but status word 3 did not show "
                             f"it within {cfg.confirm_timeout_s:g} s")
            return None
        if now < self.next_at:
            return self.next_at
        self.func, self.di_wire = READ, STATUS_DI.to_bytes(4, "little")
        self.result.readbacks += 1
        self.readback_at = now
        return self.status_frame

    def _read_back_later(self, s: Dlt645Session, now: float) -> None:
        # The first FAST_READBACKS go every confirm_poll_s counted from one request to the next
        # (on a slow bus that is back to back: a reconnection goes before polling); a relay that
        # has still not moved leaves room for the poll: every 4 x confirm_poll_s after a reply.
        poll_s = s.cfg.confirm_poll_s
        if self.result.readbacks < FAST_READBACKS:
            self.next_at = self.readback_at + poll_s
        else:
            self.next_at = now + 4 * poll_s

    def on_reply(self, s: Dlt645Session, frame: Frame) -> None:
        now = s.loop.time()
        if self.state == "send":
            if frame.control & 0x40:
                err = frame.data[0] | (frame.data[1] << 8) if len(frame.data) >= 2 else (
                    frame.data[0] if frame.data else 0)
                self.result.error_word = err
                names = [n for b, n in CONTROL_ERROR_BITS.items() if err & b] or [
                    f"error {err:04X}"]
                self._finish(s, REFUSED, "refused by the meter: " + ", ".join(names))
                return
            self.result.acked_ns = time.time_ns()
            self.state = "readback"
            self.next_at = now + min(s.cfg.confirm_poll_s, s.cfg.confirm_timeout_s)
            self.confirm_by = now + s.cfg.confirm_timeout_s
            return
        if frame.control & 0x40 or len(frame.data) < 6:
            self._read_back_later(s, now)
            return
        word = frame.data[4] | (frame.data[5] << 8)
        self.result.status = word
        if confirms(self.command.action, word):
            detail = ("status word 3 confirms it" if self.result.acked_ns is not None else
                      "acknowledgement lost; status word 3 confirms it")
            self._finish(s, CONFIRMED, detail)
        else:
            self._read_back_later(s, now)

    def on_fail(self, s: Dlt645Session, why: int) -> None:
        if self.state == "readback":
            self.next_at = s.loop.time()

    def on_link_down(self, s: Dlt645Session) -> None:
        if self.state == "send" and self.result.sent_ns is None:
            self._finish(s, UNCONFIRMED, "terminal offline: not sent")
        # once sent, the read-back goes on when the link returns, until confirm_by


class Dlt645Session:
    """A DL/T 645 terminal: connects out (mode listen) or is attached by the dial-in listener."""

    def __init__(self, plan: TerminalPlan, cfg: CollectorConfig, sink: Sink, *,
                 phase_s: float = 0.0,
                 connect_limit: asyncio.Semaphore | None = None) -> None:
        self.plan = plan
        self.cfg = cfg
        self.poll = poll = cfg.poll_for(plan.id)
        self.sink = sink
        self.phase_s = phase_s
        self.connect_limit = connect_limit
        self.stats = SessionStats()
        self.exchange_s = 0.0  # smoothed request -> reply time on this link
        self.loop = asyncio.get_event_loop()
        self.rng = random.Random(plan.id)
        n = plan.n
        self.n = n
        p = poll.preamble
        self.block_blob = encode_reads(plan.address, ENERGY_BLOCK_DI, preamble=p)
        self.status_blob = encode_reads(plan.address, STATUS_DI, preamble=p)
        self.req_len = p + 16
        self.has_1997 = bool((plan.meter_protocol == P1997).any())
        self.total97_blob = (encode_reads(plan.address, TOTAL_97, protocol=1997, preamble=p)
                             if self.has_1997 else b"")
        self.req97_len = p + 14
        self.wire_blob = encode_reads(plan.address, 0, preamble=0)  # address at [1:7]
        self.wire_len = 16
        self.protocol = plan.meter_protocol
        # per meter, across cycles
        self.fail_cycles = np.zeros(n, np.int32)
        self.demoted = np.zeros(n, bool)
        self.no_block = np.zeros(n, bool)
        self._ops_cache: dict[tuple[int, bool, bool], tuple[int, ...]] = {}
        # link
        self.link: Link | None = None
        self.reader = FrameReader(strict_checksum=poll.strict_checksum)
        self.running = False
        self.online = False
        self.down_reported = False
        self.backoff = cfg.backoff_s[0]
        self.proven = False  # the current connection delivered a valid frame
        self._connector: asyncio.Task[None] | None = None
        self.last_rx = 0.0
        self.hb_missed = 0
        self._hb_timer: asyncio.TimerHandle | None = None
        # the one outstanding request
        self.cur = _IDLE
        self.cur_m = -1
        self.cur_op = -1
        self.cur_wire = b""
        self.cur_func = 0
        self.cur_di = b""
        self.cur_job: _Job | None = None
        self.deadline = 0.0
        self.rx_since_send = False
        self._timer: asyncio.TimerHandle | None = None
        self._wake: asyncio.TimerHandle | None = None
        self.silent = 0
        self.silent_meter = -1
        self.silent_meters = 0
        self.unframed = 0  # bytes received since the last chunk that held a valid frame
        self.packet_tail = b""  # the start of a DTU packet cut by the chunking
        # jobs first, then the cycle
        self.jobs: deque[_Job] = deque()
        self.queue: deque[int] = deque()
        self.silent_ks: list[int] = []
        self.cycle_no = 0
        self.in_cycle = False
        self.cycle_pending = False
        self.missed_cycle = False
        self._cycle_timer: asyncio.TimerHandle | None = None
        self._next_cycle_at = 0.0
        self._cycle_waiters: list[asyncio.Future[ReadingBatch]] = []

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.running = True
        self._next_cycle_at = self.loop.time() + self.phase_s
        self._cycle_timer = self.loop.call_at(self._next_cycle_at, self._cycle_due)
        if self.plan.mode == "listen":
            self._connector = self.loop.create_task(self._connect_loop())
        elif self.plan.heartbeat_s > 0:
            self._hb_timer = self.loop.call_later(self.plan.heartbeat_s, self._heartbeat_check)

    async def stop(self) -> None:
        self.running = False
        for h in (self._cycle_timer, self._timer, self._wake, self._hb_timer):
            if h is not None:
                h.cancel()
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self.link is not None:
            link, self.link = self.link, None
            link.on_lost = None
            link.close()
        for job in self.jobs:
            job.on_link_down(self)
            if not job.future.done():
                job.future.cancel()
        for w in self._cycle_waiters:
            if not w.done():
                w.cancel()

    def _event(self, kind: str, detail: str = "", meter: str | None = None) -> None:
        self.sink.event(CollectorEvent(kind, self.plan.id, time.time_ns(), detail, meter))

    # --- the link -----------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        """Mode listen: keep one connection to the terminal, reconnecting with backoff."""
        lo, hi = self.cfg.backoff_s
        while self.running:
            if self.link is None:
                try:
                    if self.connect_limit is not None:
                        async with self.connect_limit:
                            await self._connect_once()
                    else:
                        await self._connect_once()
                except (OSError, TimeoutError) as exc:
                    self._link_failed(f"cannot connect to {self.plan.host}:{self.plan.port}: "
                                      f"{getattr(exc, 'strerror', None) or exc or 'timeout'}")
                    await asyncio.sleep(self.backoff * (0.5 + self.rng.random()))
                    self.backoff = min(hi, self.backoff * 2)
                    continue
            self._link_closed = self.loop.create_future()
            await self._link_closed
            if self.running:
                await asyncio.sleep(self.backoff * (0.5 + self.rng.random()))
                if not self.proven:
                    self.backoff = min(hi, self.backoff * 2)
                else:
                    self.backoff = lo

    async def _connect_once(self) -> None:
        await asyncio.wait_for(
            self.loop.create_connection(lambda: Link(self), self.plan.host, self.plan.port),
            self.cfg.connect_timeout_s)

    def attach(self, link: Link, detail: str = "") -> None:
        """A new connection to this terminal (connected out, or registered by dial-in)."""
        if self.link is not None and self.link is not link:
            old, self.link = self.link, None
            old.on_lost = None
            old.close()
            self._event("replaced", f"a new connection from {link.peer} replaces the stale one")
            self._drop_outstanding()
        link.session = self
        link.on_data = self.on_data
        link.on_lost = self._on_lost
        self.link = link
        self.reader = FrameReader(strict_checksum=self.poll.strict_checksum)
        self.unframed = 0
        self.packet_tail = b""
        self.silent = 0
        self.silent_meters = 0
        self.proven = False
        self.last_rx = self.loop.time()
        self.hb_missed = 0
        self.stats.connects += 1
        was_down = not self.online
        self.online = True
        self.down_reported = False
        if was_down:
            self._event("up", detail or f"connected {link.peer}")
        if self.missed_cycle and not self.in_cycle and self.running:
            # a cycle fell due while the link was down (or not yet up): catch up now rather
            # than leave the terminal unread until its next slot
            self.missed_cycle = False
            self._begin_cycle()
        elif self.cur == _IDLE:
            self._next()

    def _on_lost(self, link: Link, exc: Exception | None) -> None:
        if link is not self.link:
            return
        self._link_down(f"connection closed by the terminal{': ' + str(exc) if exc else ''}")

    def _link_failed(self, detail: str) -> None:
        """A connection attempt failed: the link is down (reported once per outage)."""
        self.online = False
        if not self.down_reported:
            self.down_reported = True
            self.stats.downs += 1
            self._event("down", detail)

    def _link_down(self, detail: str) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.on_lost = None
            link.on_data = None
            link.close()
        self._drop_outstanding()
        for job in list(self.jobs):
            job.on_link_down(self)
        self.online = False
        if not self.down_reported:
            self.down_reported = True
            self.stats.downs += 1
            self._event("down", detail)
        if self.in_cycle:
            self._end_cycle()
        fut = getattr(self, "_link_closed", None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def disconnect(self, detail: str) -> None:
        """Drop the connection on purpose (silence, flood): down, then reconnect / wait."""
        if self.link is not None:
            self._link_down(detail)

    def _drop_outstanding(self) -> None:
        self.cur = _IDLE
        self.cur_job = None

    def _heartbeat_check(self) -> None:
        """Dial-in terminals: silence longer than grace x heartbeat_s is a missed heartbeat."""
        hb = self.plan.heartbeat_s
        self._hb_timer = self.loop.call_later(hb, self._heartbeat_check)
        if self.link is None:
            return
        if self.loop.time() - self.last_rx > self.cfg.heartbeat_grace * hb * (self.hb_missed + 1):
            self.hb_missed += 1
            self._event("heartbeat_missed", f"nothing heard for {self.loop.time() - self.last_rx:.1f} s "
                        f"(heartbeat every {hb:g} s)")
            if self.hb_missed >= self.cfg.heartbeat_down_after:
                self.disconnect(f"{self.hb_missed} heartbeats missed")

    # --- bytes in -----------------------------------------------------------------------------

    def on_data(self, link: Link, data: bytes) -> None:
        self.rx_since_send = True
        self.silent = 0
        self.silent_meters = 0
        self.silent_ks.clear()
        self.last_rx = self.loop.time()
        self.hb_missed = 0
        if self.plan.mode == "dial" and (self.packet_tail or b"$" in data):
            data = self._strip_packets(self.packet_tail + data)
        reader = self.reader
        discarded = reader.discarded
        items = reader.feed(data)
        self.stats.discarded += reader.discarded - discarded
        # Flood rule: bytes received since the last reply to a request (FE runs, garbage and
        # frames nobody asked for alike: a terminal that never stops sending is a flood too).
        self.unframed += len(data)
        for item in items:
            if item.__class__ is Frame:
                if self._on_frame(cast(Frame, item)):
                    self.unframed = 0
            else:
                self.stats.bad_frames += 1
                if self.cur != _IDLE:
                    self._fail_current(OUTCOME_BAD_FRAME)
        if self.unframed > self.poll.flood_bytes:
            self.disconnect(f"flooded: {self.unframed:,} bytes without a reply to a request")
        elif self.cur == _IDLE and self.link is not None:
            self._next()

    def _strip_packets(self, data: bytes) -> bytes:
        """Take DTU packets ($REG / $HB lines) out of the stream between frames.

        A packet cut by the chunking is held and prepended to the next chunk, in order, so a
        24H that was a frame's byte after all loses nothing.
        """
        out = []
        pos = 0
        self.packet_tail = b""
        while True:
            i = data.find(b"$", pos)
            if i < 0:
                break
            j = data.find(b"\n", i)
            is_packet = data.startswith(b"$HB,", i) or data.startswith(b"$REG,", i)
            if j < 0 and len(data) - i <= 80 and (
                    is_packet or b"$HB,".startswith(data[i:i + 4])
                    or b"$REG,".startswith(data[i:i + 5])):
                self.packet_tail = data[i:]
                data = data[:i]
                break
            if j < 0 or j - i > 80 or not is_packet:
                out.append(data[pos:i + 1])
                pos = i + 1
                continue
            out.append(data[pos:i])
            pos = j + 1
        out.append(data[pos:])
        return b"".join(out)

    def _on_frame(self, frame: Frame) -> bool:
        """Take a frame; True when it answered the request outstanding."""
        c = frame.control
        if self.cur == _IDLE or not c & 0x80 or (c & 0x1F) != self.cur_func:
            if c & 0x80:
                self.stats.stale += 1
            return False
        if self.cur_wire and frame.address_wire != self.cur_wire:
            self.stats.stale += 1
            return False
        if not c & 0x40 and self.cur_di and not frame.data.startswith(self.cur_di):
            self.stats.stale += 1
            return False
        self.proven = True
        # how long an exchange takes on this link (request written -> reply), smoothed
        self.exchange_s += (self.loop.time() - self.deadline + self.poll.timeout_s
                            - self.exchange_s) * 0.125
        if self.cur == _POLL:
            self._poll_reply(frame)
        else:
            job = self.cur_job
            self.cur = _IDLE
            self.cur_job = None
            self.stats.reads_ok += 1
            if job is not None:
                job.on_reply(self, frame)
        return True

    # --- sending ------------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        link = self.link
        assert link is not None and link.transport is not None
        now = self.loop.time()
        self.deadline = now + self.poll.timeout_s
        self.rx_since_send = False
        if self._timer is None:
            self._timer = self.loop.call_at(self.deadline, self._on_timer)
        link.transport.write(frame)

    def _on_timer(self) -> None:
        self._timer = None
        if self.cur == _IDLE:
            return
        if self.loop.time() < self.deadline:
            self._timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        if self.cur == _JOB and self.cur_job is None:  # a broadcast's settling time is over
            self.cur = _IDLE
            if self.link is not None:
                self._next()
            return
        self.stats.timeouts += 1
        if not self.rx_since_send:
            # Silence evidence: a first attempt at a meter that answered its last cycle (a
            # known-dead meter, or a retry, proves nothing about the terminal).
            m = self.cur_m if self.cur == _POLL else -2
            if m == -2 or (self.c_tries[m] == 0 and self.fail_cycles[m] == 0):
                if m != self.silent_meter:
                    self.silent_meters += 1
                self.silent += 1
                self.silent_meter = m
                if m >= 0:
                    self.silent_ks.append(m)
        self._fail_current(OUTCOME_TIMEOUT)
        if (self.n > 1 and self.silent >= self.poll.silent_after
                and self.silent_meters >= min(2, self.poll.silent_after)):
            # the meters that timed out count a failed cycle, so that if they were dead
            # after all they do not take the terminal down again next cycle
            self.fail_cycles[self.silent_ks] += 1
            self.silent_ks.clear()
            self.disconnect(f"silent: {self.silent} requests in a row timed out "
                            f"({self.poll.timeout_s:g} s each) with no byte from the terminal")
            return
        if self.cur == _IDLE and self.link is not None:
            self._next()

    def _fail_current(self, why: int) -> None:
        if self.cur == _POLL:
            self._poll_failed(why)
        elif self.cur == _JOB:
            job = self.cur_job
            self.cur = _IDLE
            self.cur_job = None
            if job is not None:
                job.on_fail(self, why)

    def _wake_at(self, t: float) -> None:
        if self._wake is not None:
            if self._wake.when() <= t:
                return
            self._wake.cancel()
        self._wake = self.loop.call_at(t, self._on_wake)

    def _on_wake(self) -> None:
        self._wake = None
        if self.cur == _IDLE and self.link is not None:
            self._next()

    def _next(self) -> None:
        """Send the next request: a job's if one is ready, else the cycle's next read."""
        link = self.link
        # a transport being closed takes no more writes (uvloop raises on one; asyncio drops it)
        if link is None or link.transport is None or link.transport.is_closing():
            return
        if self.jobs:
            # the first job with a request ready goes; one waiting for its next read-back
            # neither blocks the jobs behind it nor polling (commands of one terminal overlap)
            now = self.loop.time()
            wake: float | None = None
            for job in list(self.jobs):
                req = job.next_request(self, now)
                if req is None:
                    self.jobs.remove(job)
                    continue
                if isinstance(req, float):
                    wake = req if wake is None else min(wake, req)
                    continue
                self.cur = _JOB
                self.cur_job = job
                self.cur_wire = job.wire or b""
                self.cur_func = job.func
                self.cur_di = job.di_wire
                self._send(req)
                return
            if wake is not None:
                self._wake_at(wake)
                if wake - now < self.exchange_s:
                    return  # a job's request is due before a poll read would be over: wait
        if self.in_cycle:
            self._poll_next()

    # --- jobs ---------------------------------------------------------------------------------

    def _meter_index(self, address: str) -> int:
        if not address.isdigit():
            return -1
        hits = np.flatnonzero(self.plan.address == int(address))
        return int(hits[0]) if hits.size else -1

    def read(self, address: str, di: int, protocol: int = 2007) -> asyncio.Future[Any]:
        """Queue one read; the future gives (Frame | None, "ok" | "timeout" | ...)."""
        fut: asyncio.Future[Any] = self.loop.create_future()
        if self.link is None:  # offline: say so now, as a command does (the link may not return)
            fut.set_result((None, "link down"))
            return fut
        self.jobs.append(ReadJob(address, di, protocol, self.poll.preamble, self.poll.retries,
                                 fut))
        if self.cur == _IDLE:
            self._next()
        return fut

    async def execute(self, command: Command) -> CommandResult:
        """Run one command with read-back; the result also goes to the sink."""
        k = self._meter_index(command.meter)
        if k < 0 or self.protocol[k] != P2007:
            why = ("not behind this terminal" if k < 0 else
                   "DL/T 645-1997 meters have no remote control (1CH)"
                   if self.protocol[k] == P1997 else "not a DL/T 645-2007 meter")
            r = CommandResult(command, self.plan.id, REFUSED, f"meter {command.meter}: {why}",
                              done_ns=time.time_ns())
            self.sink.command(r)
            return r
        fut: asyncio.Future[CommandResult] = self.loop.create_future()
        job = ControlJob(self, command, k, fut)
        if self.link is None:
            job.on_link_down(self)
            return await fut
        self.jobs.append(job)
        if self.cur == _IDLE:
            self._next()
        # the confirmation deadline must pass even if the link never comes back
        guard = self.loop.call_later(
            self.cfg.confirm_timeout_s + (self.poll.retries + 2) * self.poll.timeout_s + 1.0,
            self._expire_job, job)
        try:
            return await fut
        finally:
            guard.cancel()

    def _expire_job(self, job: ControlJob) -> None:
        if job.state != "done":
            job._finish(self, UNCONFIRMED, "no confirmation before the deadline (link down?)")
        if job in self.jobs and self.cur_job is not job:
            self.jobs.remove(job)

    # --- poll cycles --------------------------------------------------------------------------

    def _cycle_due(self) -> None:
        if not self.running:
            return
        cycle_s = self.poll.cycle_s
        now = self.loop.time()
        self._next_cycle_at += cycle_s
        if self._next_cycle_at <= now:  # fell behind: keep the phase, skip the missed slots
            self._next_cycle_at += cycle_s * (int((now - self._next_cycle_at) / cycle_s) + 1)
        self._cycle_timer = self.loop.call_at(self._next_cycle_at, self._cycle_due)
        if self.in_cycle:
            self.stats.overruns += 1
            self.cycle_pending = True
            return
        self._begin_cycle()

    def run_cycle(self) -> asyncio.Future[ReadingBatch]:
        """Start a cycle now (or after the running one); the future gives its batch."""
        fut: asyncio.Future[ReadingBatch] = self.loop.create_future()
        self._cycle_waiters.append(fut)
        if self.in_cycle:
            self.cycle_pending = True
        else:
            self._begin_cycle()
        return fut

    def _ops_for(self, k: int, clock: bool) -> tuple[int, ...]:
        proto = int(self.protocol[k])
        key = (proto, bool(self.no_block[k]), clock)
        ops = self._ops_cache.get(key)
        if ops is None:
            if proto == P1997:
                ops = (OP_TOTAL97,) + ((OP_DATE97, OP_TIME97) if clock else ())
            else:
                first = tuple(range(OP_SINGLE, OP_SINGLE + 5)) if key[1] else (OP_BLOCK,)
                ops = (first + (OP_STATUS,)
                       + tuple(OP_EXTRA + i for i in range(len(self.poll.extra_dis)))
                       + ((OP_DATE, OP_TIME) if clock else ()))
            self._ops_cache[key] = ops
        return ops

    def _begin_cycle(self) -> None:
        self.cycle_no += 1
        self.stats.cycles += 1
        if self.link is None or not self.n:
            # offline: nothing read (the link events say why); no meters: an empty batch
            batch = ReadingBatch.empty(self.plan.id, self.cycle_no, time.time_ns(),
                                       time.time_ns())
            if self.link is not None:
                self.sink.batch(batch)
            else:
                self.missed_cycle = True  # read as soon as the link is back
            self._resolve_waiters(batch)
            return
        self.in_cycle = True
        self.cycle_started = time.time_ns()
        every = self.poll.demoted_every
        due = np.flatnonzero(~self.demoted | (self.cycle_no % every == 0)) if every > 1 else \
            np.arange(self.n)
        clock = self.poll.clock_every > 0 and (self.cycle_no - 1) % self.poll.clock_every == 0
        self.due = due
        self.queue = deque(due.tolist())
        n = self.n
        self.c_pos = [0] * n
        self.c_tries = [0] * n
        self.c_ops: list[tuple[int, ...]] = [()] * n
        for k in self.queue:
            self.c_ops[k] = self._ops_for(k, clock)
        self.c_block: list[Frame | None] = [None] * n
        self.c_single: dict[int, list[int]] = {}
        self.c_total97: dict[int, int] = {}
        self.c_status = [NO_VALUE] * n
        self.c_outcome = [OUTCOME_OK] * n
        self.c_error = [0] * n
        self.c_ts = [0] * n
        self.c_done = [False] * n
        self.c_drift: dict[int, int] = {}
        self.c_date: dict[int, tuple[int, ...]] = {}
        self.c_extra: dict[int, dict[str, Any]] = {}
        self.c_broadcast = False
        self.c_reads_ok = 0
        if self.cur == _IDLE:
            self._next()

    def _poll_next(self) -> None:
        q = self.queue
        while q:
            m = q[0]
            ops = self.c_ops[m]
            pos = self.c_pos[m]
            if pos >= len(ops):
                q.popleft()
                self.c_done[m] = True
                continue
            op = ops[pos]
            self.cur = _POLL
            self.cur_m = m
            self.cur_op = op
            w = self.wire_blob
            self.cur_wire = w[m * 16 + 1:m * 16 + 7]
            if op == OP_BLOCK:
                frame = self.block_blob[m * self.req_len:(m + 1) * self.req_len]
                self.cur_func, self.cur_di = READ, b"\x00\xff\x01\x00"
            elif op == OP_STATUS:
                frame = self.status_blob[m * self.req_len:(m + 1) * self.req_len]
                self.cur_func, self.cur_di = READ, b"\x03\x05\x00\x04"
            elif op == OP_TOTAL97:
                frame = self.total97_blob[m * self.req97_len:(m + 1) * self.req97_len]
                self.cur_func, self.cur_di = READ97, b"\x10\x90"
            elif op == OP_SETTIME:
                local = datetime.now(self.cfg.zone).replace(tzinfo=None, microsecond=0)
                frame = encode_time_set(self.plan.address_text(m), local,
                                        preamble=self.poll.preamble)
                self.cur_func, self.cur_di = TIME_SET, b""
            else:
                di, proto = _op_di(op, self.poll.extra_dis)
                frame = encode_read(self.plan.address_text(m), di, protocol=proto,
                                    preamble=self.poll.preamble)
                self.cur_func = READ if proto == 2007 else READ97
                self.cur_di = di.to_bytes(4 if proto == 2007 else 2, "little")
            self._send(frame)
            return
        if self.c_broadcast:
            self.c_broadcast = False
            self._broadcast_time()
            return
        self._end_cycle()

    def _broadcast_time(self) -> None:
        """08H to every meter of the bus (never answered); the bus gets one timeout to settle."""
        link = self.link
        assert link is not None and link.transport is not None
        local = datetime.now(self.cfg.zone).replace(tzinfo=None, microsecond=0)
        link.transport.write(encode_time_set(BROADCAST, local, preamble=self.poll.preamble))
        self._event("time_set", f"broadcast 08H {local.isoformat()}")
        self.cur = _JOB  # hold the bus until the session's one timer says it has settled
        self.cur_job = None
        self.cur_func = -1
        self.deadline = self.loop.time() + min(0.5, self.poll.timeout_s)
        if self._timer is None:
            self._timer = self.loop.call_at(self.deadline, self._on_timer)

    def _poll_reply(self, frame: Frame) -> None:
        m = self.cur_m
        op = self.cur_op
        self.cur = _IDLE
        self.c_tries[m] = 0
        self.stats.reads_ok += 1
        self.c_reads_ok += 1
        c = frame.control
        if c & 0x40:  # abnormal reply
            err = frame.data[0] if frame.data else 0
            if op == OP_BLOCK and err & 0x03:
                # no such item: this meter wants the five single DIs
                self.no_block[m] = True
                self._event("block_refused", "0001FF00 refused (error "
                            f"{err:02X}); reading 00010000..00010400 one by one",
                            self.plan.address_text(m))
                self.c_ops[m] = self._ops_for(m, OP_DATE in self.c_ops[m]
                                              or OP_DATE97 in self.c_ops[m])
                self.c_pos[m] = 0
                return
            if op in PRIMARY:
                self.c_outcome[m] = OUTCOME_ERROR
                self.c_error[m] = err
                self.c_ts[m] = time.time_ns()
                self.c_pos[m] = len(self.c_ops[m])
                return
            if op >= OP_EXTRA:
                di = self.poll.extra_dis[op - OP_EXTRA]
                self.c_extra.setdefault(m, {})[f"{di:08X}"] = {"error": err}
            self.c_pos[m] += 1
            return
        data = frame.data
        if op == OP_BLOCK:
            # a wrong checksum only reaches here when this terminal is configured lenient
            # (strict_checksum = false); the batch decoder ignores such frames, so vouch for it
            self.c_block[m] = frame if frame.checksum_ok else frame._replace(checksum_ok=True)
            self.c_ts[m] = time.time_ns()
        elif op == OP_STATUS:
            if len(data) == 6:
                self.c_status[m] = data[4] | (data[5] << 8)
        elif op == OP_TOTAL97 or OP_SINGLE <= op < OP_SINGLE + 5:
            value = _bcd(data, 2 if op == OP_TOTAL97 else 4)
            if op in PRIMARY:
                self.c_ts[m] = time.time_ns()
                if value is None:
                    self.c_outcome[m] = OUTCOME_BAD_FRAME
                    self.c_pos[m] = len(self.c_ops[m])
                    return
            if op == OP_TOTAL97:
                self.c_total97[m] = cast(int, value)
            else:
                self.c_single.setdefault(m, [NO_VALUE] * 5)[op - OP_SINGLE] = (
                    NO_VALUE if value is None else value)
        elif op in (OP_DATE, OP_DATE97, OP_TIME, OP_TIME97):
            self._clock_reply(m, op, frame)
        elif op >= OP_EXTRA:
            reply = decode_reply(frame)
            di = self.poll.extra_dis[op - OP_EXTRA]
            if isinstance(reply, ReadReply) and reply.item is not None and reply.values:
                from meterstream.collectors.dlt645 import format_value

                self.c_extra.setdefault(m, {})[f"{di:08X}"] = [
                    format_value(reply.item, v) for v in reply.values]
        # OP_SETTIME: the 88H acknowledgement, nothing to keep
        self.c_pos[m] += 1

    def _clock_reply(self, m: int, op: int, frame: Frame) -> None:
        reply = decode_reply(frame)
        if not isinstance(reply, ReadReply) or not reply.values:
            return
        if op in (OP_DATE, OP_DATE97):
            self.c_date[m] = reply.values
            return
        date = self.c_date.get(m)
        if date is None:
            return
        now = datetime.now(self.cfg.zone).replace(tzinfo=None)
        hh, mi, ss = reply.values[:3]
        yy, mo, dd = date[:3]
        try:
            meter_time = datetime(2000 + yy, mo, dd, hh, mi, ss)
        except ValueError:
            return
        drift = round((meter_time - now).total_seconds())
        if abs(abs(drift) - 86400) < 600:  # the date was read on one side of midnight
            drift -= 86400 if drift > 0 else -86400
        self.c_drift[m] = drift
        if abs(drift) > self.poll.max_drift_s:
            address = self.plan.address_text(m)
            self._event("clock_drift", f"meter clock {drift:+d} s off (limit "
                        f"{self.poll.max_drift_s:g} s)", address)
            sync = self.poll.time_sync
            if sync == "broadcast" or (sync == "addressed" and self.protocol[m] == P1997):
                self.c_broadcast = True
            elif sync == "addressed":
                ops = self.c_ops[m]
                pos = self.c_pos[m]
                self.c_ops[m] = ops[:pos + 1] + (OP_SETTIME,) + ops[pos + 1:]
                self._event("time_set", f"addressed 08H to correct {drift:+d} s", address)

    def _poll_failed(self, why: int) -> None:
        m = self.cur_m
        op = self.cur_op
        self.cur = _IDLE
        self.c_tries[m] += 1
        q = self.queue
        if self.c_tries[m] <= self.poll.retries:
            # retry at the end of the cycle, so the next request goes to another meter
            if q and q[0] == m:
                q.rotate(-1)
            return
        self.c_tries[m] = 0
        self.stats.reads_failed += 1
        if op in PRIMARY or op == OP_BLOCK:
            self.c_outcome[m] = why
            self.c_ts[m] = time.time_ns()
            self.c_pos[m] = len(self.c_ops[m])
        else:
            self.c_pos[m] += 1

    def _end_cycle(self) -> None:
        self.in_cycle = False
        due = self.due
        # a row for every meter whose energy read ended (answered or given up); meters not
        # reached (the link was lost mid-cycle) have none
        rows_k = [k for k in due.tolist() if self.c_ts[k] != 0]
        n = len(rows_k)
        ended = time.time_ns()
        idx = np.asarray(rows_k, np.int64)
        registers = np.full((n, 5), NO_VALUE, np.int64)
        frames = [self.c_block[k] for k in rows_k]
        have = [i for i, f in enumerate(frames) if f is not None]
        outcome = np.asarray([self.c_outcome[k] for k in rows_k], np.int8)
        if have:
            values, ok = decode_energy_blocks([cast(Frame, frames[i]) for i in have])
            sel = np.asarray(have, np.int64)
            registers[sel[ok]] = values[ok]
            outcome[sel[~ok]] = OUTCOME_BAD_FRAME
        for i, k in enumerate(rows_k):
            if k in self.c_single:
                registers[i] = self.c_single[k]
            elif k in self.c_total97:
                registers[i, 0] = self.c_total97[k]
        batch = ReadingBatch(
            self.plan.id, self.cycle_no, self.cycle_started, ended,
            meter=self.plan.address[idx] if n else np.zeros(0, np.int64),
            ts=np.asarray([self.c_ts[k] for k in rows_k], np.int64),
            registers=registers,
            status=np.asarray([self.c_status[k] for k in rows_k], np.int32),
            outcome=outcome,
            error=np.asarray([self.c_error[k] for k in rows_k], np.int16),
            drift_s=np.asarray([self.c_drift.get(k, NO_DRIFT) for k in rows_k], np.int32),
            extra=[self.c_extra.get(k, {}) for k in rows_k] if self.c_extra else [],
        )
        self._demotions(idx, outcome)
        self.stats.meters_read = n
        self.stats.meters_ok = int(np.count_nonzero(outcome == OUTCOME_OK))
        self.stats.rows += n
        self.stats.rows_ok += self.stats.meters_ok
        self.sink.batch(batch)
        self._resolve_waiters(batch)
        if self.cycle_pending and self.running:
            self.cycle_pending = False
            self._begin_cycle()

    def _resolve_waiters(self, batch: ReadingBatch) -> None:
        waiters, self._cycle_waiters = self._cycle_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(batch)

    def _demotions(self, idx: np.ndarray, outcome: np.ndarray) -> None:
        if not idx.size:
            return
        ok = outcome == OUTCOME_OK
        good = idx[ok]
        bad = idx[~ok]
        promoted = good[self.demoted[good]]
        self.fail_cycles[good] = 0
        self.demoted[good] = False
        self.fail_cycles[bad] += 1
        newly = bad[(self.fail_cycles[bad] >= self.poll.demote_after) & ~self.demoted[bad]]
        self.demoted[newly] = True
        for k in promoted.tolist():
            self._event("promoted", "answers again: back on every cycle", self.plan.address_text(k))
        for k in newly.tolist():
            self._event("demoted", f"failed {self.poll.demote_after} cycles in a row: read every "
                        f"{self.poll.demoted_every} cycles", self.plan.address_text(k))


def _bcd(data: bytes, di_len: int) -> int | None:
    """A read reply's 4-byte BCD value after its DI, or None if it is not BCD."""
    raw = data[di_len:di_len + 4]
    if len(raw) != 4:
        return None
    digits = raw[::-1].hex()
    return int(digits) if digits.isdigit() else None
