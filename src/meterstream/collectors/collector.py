"""The collector process: every terminal of an archive, polled on a staggered schedule.

Builds one session per terminal (DL/T 645 or Modbus), starts the dial-in listener for DTUs, and
routes commands to the session that holds the meter's terminal. Cycle phases are spread over the
cycle by a hash of the terminal id, so thousands of terminals never fire together and a
terminal keeps its phase when others are added. Connection attempts are limited
(`max_connecting`) so a restart does not open ten thousand sockets in one instant.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterable
from typing import Any

from meterstream.collectors.archive import Archive, TerminalPlan
from meterstream.collectors.batch import CollectorEvent
from meterstream.collectors.commands import REFUSED, Command, CommandResult
from meterstream.collectors.config import CollectorConfig
from meterstream.collectors.session import Dlt645Session, Link
from meterstream.collectors.sink import Sink

REG_PREFIX = b"$REG,"
MAX_REG_LINE = 128
#: per-source buckets kept at most (a scan from many addresses must not grow memory)
MAX_TRACKED_SOURCES = 65536


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take` spends one when there is one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def level(self, now: float) -> float:
        return min(self.burst, self.tokens + (now - self.stamp) * self.rate)

    def take(self, now: float) -> bool:
        self.tokens = self.level(now)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RegistrationLimiter:
    """Dial-in connections allowed per source address and in all (token buckets).

    A connection over either limit is closed before a byte of it is read, and counted; the
    counts go out as one `rejected` event per `report_s` (never one per attempt: a flood of
    attempts must not become a flood of events). Per-source buckets that have refilled are
    forgotten at each report, and at most MAX_TRACKED_SOURCES are kept.
    """

    def __init__(self, per_ip_rate: float, per_ip_burst: float, global_rate: float,
                 global_burst: float, now: float) -> None:
        self.per_ip_rate, self.per_ip_burst = per_ip_rate, per_ip_burst
        self.all = TokenBucket(global_rate, global_burst, now)
        self.sources: dict[str, TokenBucket] = {}
        self.refused = 0  # since start
        self.window: dict[str, int] = {}  # refused per source since the last report
        self.window_global = 0  # ... of them refused by the global bucket

    def allow(self, source: str, now: float) -> bool:
        b = self.sources.get(source)
        if b is None:
            if len(self.sources) >= MAX_TRACKED_SOURCES:
                self.sources.pop(next(iter(self.sources)))
            b = self.sources[source] = TokenBucket(self.per_ip_rate, self.per_ip_burst, now)
        if not b.take(now):
            self._refuse(source)
            return False
        if not self.all.take(now):
            b.tokens = min(b.burst, b.tokens + 1.0)  # not this source's fault
            self.window_global += 1
            self._refuse(source)
            return False
        return True

    def _refuse(self, source: str) -> None:
        self.refused += 1
        if len(self.window) < MAX_TRACKED_SOURCES or source in self.window:
            self.window[source] = self.window.get(source, 0) + 1

    def report(self, now: float, every_s: float) -> str | None:
        """What was refused since the last report, as one line (None: nothing), and forget
        the sources whose buckets are full again."""
        for src in [s for s, b in self.sources.items() if b.level(now) >= b.burst]:
            del self.sources[src]
        if not self.window:
            return None
        n = sum(self.window.values())
        top = sorted(self.window.items(), key=lambda kv: -kv[1])[:3]
        line = (f"rate limit: {n:,} dial-in connection(s) closed unread in the last "
                f"{every_s:g} s ({self.window_global:,} over the global limit) from "
                f"{len(self.window):,} source(s); most from "
                + ", ".join(f"{s} ({k:,})" for s, k in top))
        self.window = {}
        self.window_global = 0
        return line


def phase_of(terminal: str, cycle_s: float) -> float:
    """Where in the cycle a terminal's poll starts: stable, and spread evenly by a hash."""
    return (zlib.crc32(terminal.encode()) / 2**32) * cycle_s


class _Registration:
    """A dial-in connection until its `$REG,<terminal>,<firmware>` line arrives."""

    def __init__(self, listener: DialInListener, link: Link) -> None:
        self.listener = listener
        self.link = link
        self.buf = b""
        self.timer = asyncio.get_running_loop().call_later(
            listener.collector.cfg.registration_timeout_s, self.expire)

    def expire(self) -> None:
        if self.link.session is None:
            self.listener.reject(self.link, "", "no registration packet in time")

    def data(self, link: Link, data: bytes) -> None:
        self.buf += data
        if self.listener.any_session is not None and not self.buf.startswith(b"$"):
            self.done()
            self.listener.any_session.attach(link, f"dialled in from {link.peer}")
            link.on_data = self.listener.any_session.on_data
            link.on_data(link, self.buf)
            return
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > MAX_REG_LINE:
                self.listener.reject(link, "", "registration line too long")
            return
        line, rest = self.buf[:end].rstrip(b"\r"), self.buf[end + 1:]
        self.done()
        self.listener.registered(link, line, rest)

    def lost(self, link: Link, exc: Exception | None) -> None:
        self.done()

    def done(self) -> None:
        self.timer.cancel()


class DialInListener:
    """Accepts DTUs that dial in, identifies each by its registration packet."""

    def __init__(self, collector: Collector, *, any_session: Dlt645Session | None = None) -> None:
        self.collector = collector
        self.any_session = any_session  # one-shot CLI: every connection is this terminal
        self.server: asyncio.Server | None = None
        self.rejected = 0
        self.limiter: RegistrationLimiter | None = None
        self._report: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.collector.cfg
        if cfg.dialin_rate_limit:
            self.limiter = RegistrationLimiter(cfg.dialin_per_ip_rate, cfg.dialin_per_ip_burst,
                                               cfg.dialin_global_rate, cfg.dialin_global_burst,
                                               loop.time())
            self._report = loop.call_later(cfg.dialin_report_s, self._report_throttled)
        self.server = await loop.create_server(self._accept, host, port, reuse_address=True,
                                               backlog=1024)

    def _report_throttled(self) -> None:
        assert self.limiter is not None
        loop = asyncio.get_running_loop()
        every = self.collector.cfg.dialin_report_s
        self._report = loop.call_later(every, self._report_throttled)
        line = self.limiter.report(loop.time(), every)
        if line is not None:
            self.collector.sink.event(CollectorEvent("rejected", "?", time.time_ns(), line))

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _accept(self) -> Link:
        link = Link()
        link.on_made = self._made
        return link

    def _made(self, link: Link) -> None:
        if self.limiter is not None:
            source = link.peer.rpartition(":")[0]
            if not self.limiter.allow(source, asyncio.get_running_loop().time()):
                link.close()  # before reading a byte; counted, reported once per interval
                return
        reg = _Registration(self, link)
        link.on_data = reg.data
        link.on_lost = reg.lost

    def registered(self, link: Link, line: bytes, rest: bytes) -> None:
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self.reject(link, "", "registration packet is not ASCII")
            return
        parts = text.split(",")
        if len(parts) < 2 or parts[0] != "$REG" or not parts[1]:
            self.reject(link, "", f"not a registration packet: {text[:40]!r}")
            return
        tid = parts[1]
        firmware = parts[2] if len(parts) > 2 else ""
        session = self.any_session or self.collector.dial_sessions.get(tid)
        if session is None:
            plan = self.collector.archive.terminals.get(tid)
            if plan is not None and plan.mode == "dial":
                # several collectors share the archive: another one holds this terminal
                self.reject(link, tid, f"terminal {tid} is not held by this collector (another "
                            "collector holds it): it must dial that one")
            else:
                self.reject(link, tid,
                            f"terminal {tid} is not in the archive (or does not dial in)")
            return
        self.collector.sink.event(CollectorEvent(
            "registration", session.plan.id, time.time_ns(),
            f"{tid} firmware {firmware or '?'} from {link.peer}"))
        session.attach(link, f"registered from {link.peer}")
        if rest:
            session.on_data(link, rest)

    def reject(self, link: Link, tid: str, why: str) -> None:
        self.rejected += 1
        self.collector.sink.event(CollectorEvent("rejected", tid or "?", time.time_ns(),
                                                 f"{link.peer}: {why}"))
        link.on_data = None
        link.on_lost = None
        link.close()

    async def stop(self) -> None:
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if self.server is not None:
            self.server.close()
            self.server = None


class Collector:
    """All terminals of an archive in one asyncio process."""

    def __init__(self, archive: Archive, cfg: CollectorConfig, sink: Sink) -> None:
        self.archive = archive
        self.cfg = cfg
        self.sink = sink
        self.sessions: dict[str, Any] = {}
        self.dial_sessions: dict[str, Dlt645Session] = {}
        self.meter_terminal: dict[int, str] = {}
        self.listener: DialInListener | None = None
        self._limit: asyncio.Semaphore | None = None

    def _session(self, plan: TerminalPlan) -> Any:
        window = self.cfg.stagger_s
        phase = phase_of(plan.id, self.cfg.poll_for(plan.id).cycle_s if window is None else window)
        if plan.protocol == "modbus":
            from meterstream.collectors.modbus import ModbusSession

            return ModbusSession(plan, self.cfg, self.sink, phase_s=phase)
        return Dlt645Session(plan, self.cfg, self.sink, phase_s=phase,
                             connect_limit=self._limit)

    async def start(self, terminals: Iterable[str] | None = None) -> None:
        """Start the dial-in listener (when the archive has dial-in terminals) and the sessions
        of `terminals` (default: every terminal of the archive; `()` starts none, for a
        collector that takes terminals one by one with `start_terminal`)."""
        self._limit = asyncio.Semaphore(self.cfg.max_connecting)
        dial = False
        for plan in self.archive.terminals.values():
            dial = dial or plan.mode == "dial"
            for a in plan.address.tolist():
                self.meter_terminal[a] = plan.id
        if dial and self.cfg.dialin_enabled:
            self.listener = DialInListener(self)
            await self.listener.start(self.cfg.dialin_host, self.cfg.dialin_port)
        for tid in self.archive.terminals if terminals is None else terminals:
            self.start_terminal(tid)

    def start_terminal(self, tid: str) -> None:
        """Build and start the session of one terminal of the archive (nothing if it runs)."""
        if tid in self.sessions:
            return
        plan = self.archive.terminals[tid]
        s = self._session(plan)
        self.sessions[tid] = s
        if plan.mode == "dial":
            self.dial_sessions[tid] = s
        s.start()

    async def stop_terminal(self, tid: str) -> None:
        """Stop one terminal's session and forget it (its connection is closed; a command still
        in flight ends with a cancelled future, for the caller to report)."""
        s = self.sessions.pop(tid, None)
        self.dial_sessions.pop(tid, None)
        if s is not None:
            await s.stop()

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        await asyncio.gather(*(s.stop() for s in self.sessions.values()),
                             return_exceptions=True)

    async def execute(self, command: Command) -> CommandResult:
        tid = self.meter_terminal.get(int(command.meter)) if command.meter.isdigit() else None
        if tid is None:
            r = CommandResult(command, "", REFUSED, f"meter {command.meter} is not in the archive",
                              done_ns=time.time_ns())
            self.sink.command(r)
            return r
        session = self.sessions.get(tid)
        if session is None:  # another collector holds the terminal (start_terminal)
            r = CommandResult(command, tid, REFUSED, f"terminal {tid} is not held by this "
                              "collector: not sent", done_ns=time.time_ns())
            self.sink.command(r)
            return r
        result: CommandResult = await session.execute(command)
        return result

    def summary(self) -> dict[str, Any]:
        """Terminals online, counters since start, and the success rate of the last cycle of
        each terminal (meters read ok / meters read)."""
        online = sum(1 for s in self.sessions.values() if s.online)
        read = sum(s.stats.meters_read for s in self.sessions.values())
        ok = sum(s.stats.meters_ok for s in self.sessions.values())
        return {
            "terminals": len(self.sessions), "online": online,
            "meters": self.archive.meters,
            "reads_ok": sum(s.stats.reads_ok for s in self.sessions.values()),
            "reads_failed": sum(s.stats.reads_failed for s in self.sessions.values()),
            "cycles": sum(s.stats.cycles for s in self.sessions.values()),
            "meters_read": read, "meters_ok": ok,
            "rows": sum(s.stats.rows for s in self.sessions.values()),
            "rows_ok": sum(s.stats.rows_ok for s in self.sessions.values()),
            "success_rate": (ok / read) if read else None,
        }
