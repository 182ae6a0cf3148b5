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

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, host, port, reuse_address=True,
                                               backlog=1024)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _accept(self) -> Link:
        link = Link()
        link.on_made = self._made
        return link

    def _made(self, link: Link) -> None:
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
