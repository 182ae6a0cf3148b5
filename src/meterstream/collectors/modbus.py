"""Modbus TCP gateways: one session a gateway, one unit id a meter, register maps from config.

Two layers. The pure one (no I/O, no pymodbus) plans the fewest register reads that cover a map
and decodes the words that come back (`plan_reads`, `decode_range`, `energy_register`,
`quantity_text`). The session around it owns the pymodbus client of the gateway connection, one
request outstanding at a time, timeouts, retries, demotion, reconnect with backoff, and hands
the sink one ReadingBatch a cycle: the same record the DL/T 645 sessions produce. It never holds
money or tariffs, and never switches a relay (Modbus meters have none: PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import struct
import time
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from meterstream.collectors.archive import TerminalPlan
from meterstream.collectors.batch import (
    NO_DRIFT,
    NO_VALUE,
    OUTCOME_BAD_FRAME,
    OUTCOME_ERROR,
    OUTCOME_NAMES,
    OUTCOME_OK,
    OUTCOME_TIMEOUT,
    CollectorEvent,
    ReadingBatch,
    SessionStats,
)
from meterstream.collectors.commands import REFUSED, Command, CommandResult
from meterstream.collectors.config import CollectorConfig, ModbusMap, ModbusRegister, PollConfig
from meterstream.collectors.sink import Sink
from meterstream.errors import UserError

# pymodbus logs every refused connect, timeout and unknown frame at WARNING/ERROR; the session
# reports what matters as events. Set the "pymodbus" logger's level after import to see them.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

MAX_REGISTERS = 125  # FC03/FC04 read at most 125 registers a request (Modbus application spec)
WIDTH = {"float32": 2, "int32": 2, "uint32": 2, "int16": 1, "uint16": 1}
_FORMAT = {"float32": "f", "int32": "i", "uint32": "I", "int16": "h", "uint16": "H"}
ENERGY_QUANTITIES = ("import_kwh", "total_kwh")  # the batch's total register: the first present
#: Decimal places of an extra quantity's text (the field's and most meters' resolution).
DECIMALS = {"voltage": 1, "current": 3, "power": 1, "frequency": 2, "kwh": 2}
_CTX = Context(prec=60)  # wide enough that a float32 divided by a scale is exact before rounding
_CENT = Decimal(100)


# --- pure: plan the reads, decode the words -------------------------------------------------


@dataclass(frozen=True)
class RegisterRange:
    """One read request: `count` registers from `address` of one table, and what they hold."""

    function: int  # 3 holding registers, 4 input registers
    address: int
    count: int
    registers: tuple[ModbusRegister, ...]


@dataclass(frozen=True)
class MapPlan:
    """How a meter of one map is read: the energy register and the requests, energy's first."""

    map: ModbusMap
    energy: ModbusRegister
    reads: tuple[RegisterRange, ...]


def energy_register_of(mp: ModbusMap) -> ModbusRegister:
    """import_kwh, else total_kwh (the configuration guarantees one of them)."""
    for q in ENERGY_QUANTITIES:
        for r in mp.registers:
            if r.quantity == q:
                return r
    raise ValueError(f"Modbus map {mp.name!r} has no import_kwh or total_kwh register")


def plan_reads(mp: ModbusMap, max_count: int = MAX_REGISTERS) -> MapPlan:
    """The fewest requests that cover every register of the map, none over `max_count`.

    Registers sorted by address are taken greedily: a register joins the current request while
    the request still spans at most `max_count` registers (greedy from the left is optimal for
    covering points with intervals of bounded length). Gaps inside a request are read too; the
    meter answers them (SDM630, DTSU666 and the simulated field do). The request holding the
    energy register goes first, so a dead meter costs one request, not all of them.
    """
    energy = energy_register_of(mp)
    ranges: list[RegisterRange] = []
    start = end = -1
    regs: list[ModbusRegister] = []
    for r in sorted(mp.registers, key=lambda x: x.address):
        stop = r.address + WIDTH[r.type]
        if regs and stop - start <= max_count:
            end = max(end, stop)
            regs.append(r)
            continue
        if regs:
            ranges.append(RegisterRange(mp.function, start, end - start, tuple(regs)))
        start, end, regs = r.address, stop, [r]
    if regs:
        ranges.append(RegisterRange(mp.function, start, end - start, tuple(regs)))
    ranges.sort(key=lambda g: energy not in g.registers)  # stable: energy's first, then address
    return MapPlan(mp, energy, tuple(ranges))


def decode_register(reg: ModbusRegister, words: list[int] | tuple[int, ...],
                    word_order: str = "big") -> float | int:
    """The raw number in `words` (the register's 1 or 2 words), before the scale."""
    if WIDTH[reg.type] == 2:
        hi, lo = (words[0], words[1]) if word_order == "big" else (words[1], words[0])
        data = struct.pack(">HH", hi & 0xFFFF, lo & 0xFFFF)
    else:
        data = struct.pack(">H", words[0] & 0xFFFF)
    value: float | int = struct.unpack(">" + _FORMAT[reg.type], data)[0]
    return value


def decode_range(rng: RegisterRange, words: list[int] | tuple[int, ...],
                 word_order: str = "big") -> list[tuple[ModbusRegister, Decimal | None]]:
    """Each register of the request with its value (raw / scale) as an exact Decimal; None for
    a float32 NaN or infinity."""
    out: list[tuple[ModbusRegister, Decimal | None]] = []
    for reg in rng.registers:
        k = reg.address - rng.address
        raw = decode_register(reg, words[k:k + WIDTH[reg.type]], word_order)
        out.append((reg, scaled(raw, reg.scale)))
    return out


def scaled(raw: float, scale: float) -> Decimal | None:
    """raw / scale, exactly: a float32 widened to a Python float is exact, and so is Decimal
    of it; the division keeps 60 digits. None for NaN or infinity."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return None
    d = Decimal(raw)
    if scale != 1.0:
        d = _CTX.divide(d, Decimal(repr(scale)))
    return d


def energy_register(value: Decimal | None) -> int | None:
    """kWh -> the batch's register in 0.01 kWh: the decimal value rounded half-even to an exact
    integer; None for a value no register can hold (negative, NaN).

    A float32 carries 24 significant bits (about 7 decimal digits): the value a meter stores is
    within half a unit in the last place (ulp) of its register, so the result is exact below
    131,072 kWh (ulp <= 0.0078 kWh) and within floor(0.5 + 50 x ulp) of it above (1 at
    131,072..262,144 kWh, 2 up to 524,288, 3 up to 1,048,576 kWh).
    """
    if value is None or value < 0:
        return None
    return int(_CTX.multiply(value, _CENT).to_integral_value(ROUND_HALF_EVEN))


def decimals_of(reg: ModbusRegister) -> int:
    """Places of the text of an extra: the quantity's resolution, or finer when an integer
    register's scale says so (uint16 voltage x 100: two places)."""
    kind = "kwh" if reg.quantity.endswith("_kwh") else reg.quantity.split("_")[0]
    places = DECIMALS.get(kind, 3)
    if reg.type != "float32" and reg.scale > 1.0:
        places = max(places, math.ceil(math.log10(reg.scale) - 1e-9))
    return places


def quantity_text(reg: ModbusRegister, value: Decimal | None) -> str | None:
    """The decimal text of an extra quantity ("229.6"), rounded half-even; None for NaN."""
    if value is None:
        return None
    q = value.quantize(Decimal(1).scaleb(-decimals_of(reg)), ROUND_HALF_EVEN, _CTX)
    if q.is_zero():
        q = q.copy_abs()  # never "-0.0"
    return f"{q:f}"


# --- the session -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    kind: str  # ok | timeout | error | bad_frame | lost
    words: tuple[int, ...] = ()
    code: int = 0  # the Modbus exception code of an error


_LOST = _Reply("lost")


class ModbusSession:
    """One Modbus TCP gateway: connect (reconnect with backoff), poll its unit ids every cycle.

    Per cycle each due meter is read with its map's planned requests, one request outstanding
    on the gateway at a time; a timeout is retried `modbus_retries` times, an exception reply
    is final (OUTCOME_ERROR, the code in `error`). A meter failing `demote_after` cycles in a
    row is read only every `demoted_every` cycles until it answers. While the link is down a
    cycle is counted and gives a batch with no rows (the "down" event is the signal).
    """

    def __init__(self, plan: TerminalPlan, cfg: CollectorConfig, sink: Sink, *,
                 phase_s: float = 0.0) -> None:
        if plan.protocol != "modbus":
            raise ValueError(f"terminal {plan.id} speaks {plan.protocol}, not modbus")
        if plan.mode != "listen":
            raise UserError(f"terminal {plan.id}: a Modbus gateway is reached by connecting to it "
                            f"(mode listen), not {plan.mode!r}", where=cfg.source)
        self.plan = plan
        self.cfg = cfg
        self.sink = sink
        self.phase_s = phase_s
        self.stats = SessionStats()
        self._plans: dict[str, MapPlan] = {}
        for k, name in enumerate(plan.map_name):
            self._map_plan(name, plan.address_text(k))
        self._rng = random.Random(plan.id)  # reconnect jitter: distinct per terminal, repeatable
        self._cycle_no = 0
        self._cycle_lock = asyncio.Lock()
        self._fails: dict[int, int] = {}  # meter -> failed cycles in a row
        self._demoted: dict[int, int] = {}  # meter -> the cycle it was demoted in
        self._silent: list[int] = []  # unit ids of the timed-out reads since the last reply
        self._client: AsyncModbusTcpClient | None = None
        self._online = False
        self._down_reported = False  # the current down period has had its "down" event
        self._generation = 0  # of the client: callbacks of an old one are ignored
        self._lost: asyncio.Future[str] | None = None
        self._attempt: asyncio.Task[bool] | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._cycle_task: asyncio.Task[None] | None = None

    # --- public ----------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        return self._online

    def start(self) -> None:
        """Connect (and reconnect with backoff) and schedule the cycles: the first at
        loop.time() + phase_s, then every cycle_s. Call inside the running loop."""
        loop = asyncio.get_running_loop()
        if self._link_task is None:
            self._link_task = loop.create_task(self._keep_link(), name=f"{self.plan.id} link")
        if self._cycle_task is None:
            self._cycle_task = loop.create_task(self._schedule(), name=f"{self.plan.id} cycles")

    async def stop(self) -> None:
        """Cancel the link and the cycles, close the client; never raises."""
        tasks = [t for t in (self._cycle_task, self._link_task, self._attempt) if t is not None]
        self._cycle_task = self._link_task = self._attempt = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._generation += 1
        self._online = False
        self._close_client()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result("stopped")  # a cycle still reading returns at once

    async def run_cycle(self) -> ReadingBatch:
        """One cycle now (after a running one): its batch goes to sink.batch() and is returned,
        as for a scheduled cycle. Without start() (a one-shot read) it connects first if it
        must."""
        async with self._cycle_lock:
            batch = await self._cycle()
        self.sink.batch(batch)
        return batch

    async def execute(self, command: Command) -> CommandResult:
        """Refused: Modbus meters have no relay control (PROTOCOL.md)."""
        meters = {self.plan.address_text(k) for k in range(self.plan.n)}
        if command.meter in meters:
            detail = (f"{command.action} refused: meter {command.meter} is a Modbus meter on "
                      f"gateway {self.plan.id}, and Modbus meters have no relay control; remote "
                      "control goes over DL/T 645 1CH (or vendor registers this collector does "
                      "not write)")
        else:
            detail = f"meter {command.meter} is not behind terminal {self.plan.id}"
        result = CommandResult(command, self.plan.id, REFUSED, detail, done_ns=time.time_ns())
        self.sink.command(result)
        return result

    # --- one cycle ---------------------------------------------------------------------------

    async def _cycle(self) -> ReadingBatch:
        poll = self.cfg.poll_for(self.plan.id)
        self._cycle_no += 1
        cycle = self._cycle_no
        self.stats.cycles += 1
        started = time.time_ns()
        if not self._online:
            await self._connect_for_cycle()
        rows: list[tuple[int, int, int, int, int, int, int, int, int, int, int]] = []
        extras: list[dict[str, str]] = []
        plan = self.plan
        for k in range(plan.n):
            if not self._online:
                break  # link lost in this cycle: the rest get no row
            meter = int(plan.address[k])
            since = self._demoted.get(meter)
            if since is not None and (cycle - since) % poll.demoted_every:
                continue
            read = await self._read_meter(k, poll)
            if read is None:
                break
            ts, total, outcome, error, extra = read
            rows.append((meter, ts, total, NO_VALUE, NO_VALUE, NO_VALUE, NO_VALUE, NO_VALUE,
                         outcome, error, NO_DRIFT))
            extras.append(extra)
            self._account(k, outcome, error, cycle, poll)
        batch = ReadingBatch.from_rows(plan.id, cycle, started, time.time_ns(), rows, extras)
        self.stats.meters_read = len(batch)
        self.stats.meters_ok = batch.ok
        return batch

    async def _read_meter(self, k: int, poll: PollConfig
                          ) -> tuple[int, int, int, int, dict[str, str]] | None:
        """(ts, total, outcome, error, extra) of meter k, or None when the link went down."""
        mp = self._map_plan(self.plan.map_name[k], self.plan.address_text(k))
        unit = int(self.plan.unit[k])
        extra: dict[str, str] = {}
        ts = total = 0
        for j, rng in enumerate(mp.reads):
            reply = await self._request(unit, rng, poll)
            if reply.kind == "lost":
                return None
            if j == 0:
                ts = time.time_ns()
            if reply.kind != "ok":
                self.stats.reads_failed += 1
                if j == 0:  # the energy register's request: the meter's read failed
                    outcome = {"timeout": OUTCOME_TIMEOUT, "error": OUTCOME_ERROR,
                               "bad_frame": OUTCOME_BAD_FRAME}[reply.kind]
                    return ts, NO_VALUE, outcome, reply.code, {}
                continue  # an extra's request: those quantities are missing this cycle
            self.stats.reads_ok += 1
            for reg, value in decode_range(rng, reply.words, mp.map.word_order):
                if reg is mp.energy:
                    register = energy_register(value)
                    if register is None:  # NaN or negative: no register reads so
                        self.stats.bad_frames += 1
                        return ts, NO_VALUE, OUTCOME_BAD_FRAME, 0, {}
                    total = register
                else:
                    text = quantity_text(reg, value)
                    if text is not None:
                        extra[reg.quantity] = text
        return ts, total, OUTCOME_OK, 0, extra

    async def _request(self, unit: int, rng: RegisterRange, poll: PollConfig) -> _Reply:
        """One read, retried on timeout; the gateway's silence over several meters drops the
        link (a half-open TCP connection answers nothing, and says nothing either)."""
        last = "timeout"
        for _attempt in range(1 + self.cfg.modbus_retries):
            client, lost = self._client, self._lost
            if not self._online or client is None or lost is None:
                return _LOST
            call = (client.read_holding_registers if rng.function == 3
                    else client.read_input_registers)
            task = asyncio.ensure_future(call(rng.address, count=rng.count, device_id=unit))
            try:
                done, _ = await asyncio.wait((task, lost), timeout=self.cfg.modbus_timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not task.done():
                    task.cancel()  # the client's lock is released; a late reply is dropped
            if task not in done:
                if lost.done():
                    return _LOST
                self.stats.timeouts += 1
                last = "timeout"
                continue
            try:
                pdu = task.result()
            except ConnectionException:
                return _LOST
            except (ModbusException, OSError):
                if not self._online:
                    return _LOST
                self.stats.timeouts += 1  # ModbusIOException: pymodbus gave up waiting
                last = "timeout"
                continue
            self._silent.clear()
            if pdu.isError():
                return _Reply("error", code=int(getattr(pdu, "exception_code", 0)))
            words = tuple(int(w) for w in getattr(pdu, "registers", ()))
            if len(words) != rng.count:
                self.stats.bad_frames += 1
                last = "bad_frame"
                continue
            return _Reply("ok", words)
        if last == "timeout":
            self._silent.append(unit)
            units = len({int(u) for u in self.plan.unit}) or 1
            if (len(self._silent) >= poll.silent_after
                    and len(set(self._silent)) >= min(poll.silent_after, units)):
                self._link_down(f"no reply from the gateway to {len(self._silent)} reads in a row "
                                f"(unit ids {', '.join(str(u) for u in sorted(set(self._silent)))})")
        return _Reply(last)

    def _account(self, k: int, outcome: int, error: int, cycle: int, poll: PollConfig) -> None:
        """Demote a meter that keeps failing; promote it when it answers."""
        meter = int(self.plan.address[k])
        text = self.plan.address_text(k)
        if outcome == OUTCOME_OK:
            self._fails.pop(meter, None)
            if self._demoted.pop(meter, None) is not None:
                self._event("promoted", "answers again: read every cycle", meter=text)
            return
        fails = self._fails.get(meter, 0) + 1
        self._fails[meter] = fails
        if fails >= poll.demote_after and meter not in self._demoted:
            self._demoted[meter] = cycle
            why = OUTCOME_NAMES[outcome] + (f" (Modbus exception {error})" if error else "")
            self._event("demoted", f"{fails} failed cycles in a row, last {why}; read every "
                        f"{poll.demoted_every} cycles until it answers", meter=text)

    def _map_plan(self, name: str, meter: str) -> MapPlan:
        mp = self._plans.get(name)
        if mp is None:
            m = self.cfg.modbus_maps.get(name)
            if m is None:
                known = ", ".join(sorted(self.cfg.modbus_maps)) or "none"
                raise UserError(f"meter {meter} on terminal {self.plan.id} uses Modbus map "
                                f"{name!r}, which the collector configuration does not define "
                                f"(defined: {known}); add [modbus_maps.{name or 'NAME'}]",
                                where=self.cfg.source)
            mp = self._plans[name] = plan_reads(m)
        return mp

    # --- the link ----------------------------------------------------------------------------

    async def _connect_for_cycle(self) -> None:
        """A cycle that finds the link down: without start(), try once now; with it, wait for a
        connect attempt already under way (never start a second one)."""
        if self._link_task is None:
            await self._connect_once()
        elif self._attempt is not None and not self._attempt.done():
            await asyncio.wait((self._attempt,))

    async def _keep_link(self) -> None:
        first, longest = self.cfg.backoff_s
        backoff = first
        while True:
            if not self._online:
                self._attempt = asyncio.get_running_loop().create_task(self._connect_once())
                if not await self._attempt:
                    await asyncio.sleep(min(longest, backoff * self._rng.uniform(0.5, 1.5)))
                    backoff = min(longest, backoff * 2)
                    continue
            backoff = first
            lost = self._lost
            if lost is not None:
                await asyncio.wait((lost,))
            await asyncio.sleep(min(longest, first * self._rng.uniform(0.5, 1.5)))

    async def _connect_once(self) -> bool:
        host, port = self.plan.host, self.plan.port
        self._generation += 1
        gen = self._generation
        # pymodbus's own timeout (connect and reply) stays longer than ours, so ours decide;
        # reconnect_delay=0: the session reconnects, not pymodbus.
        client = AsyncModbusTcpClient(
            host, port=port, name=self.plan.id, reconnect_delay=0, retries=0,
            timeout=max(self.cfg.connect_timeout_s, self.cfg.modbus_timeout_s) + 1.0,
            trace_connect=functools.partial(self._traced, gen))
        client.set_max_no_responses(1 << 30)  # silence is judged here (silent_after)
        try:
            ok = await asyncio.wait_for(client.connect(), self.cfg.connect_timeout_s)
            reason = "refused or unreachable"
        except TimeoutError:
            ok, reason = False, f"no answer within {self.cfg.connect_timeout_s:g} s"
        except OSError as exc:
            ok, reason = False, exc.strerror or str(exc)
        except BaseException:  # cancelled (stop): leave nothing half open
            client.close()
            raise
        if not ok or gen != self._generation:
            client.close()
            if gen == self._generation:
                self._connect_failed(f"cannot connect to {host}:{port}: {reason}")
            return False
        self._client = client
        self._online = True
        self._down_reported = False
        self._silent.clear()
        self._lost = asyncio.get_running_loop().create_future()
        self.stats.connects += 1
        self._event("up", f"connected to {host}:{port}")
        return True

    def _traced(self, gen: int, connected: bool) -> None:
        """pymodbus's connect/disconnect callback."""
        if not connected and gen == self._generation:
            self._link_down("the gateway closed the connection")

    def _link_down(self, reason: str) -> None:
        if not self._online:
            return
        self._online = False
        self._generation += 1
        self._close_client()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)
        self._report_down(reason)

    def _connect_failed(self, reason: str) -> None:
        if not self._down_reported:
            self._report_down(reason)

    def _report_down(self, reason: str) -> None:
        self._down_reported = True
        self.stats.downs += 1
        self._event("down", reason)

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _event(self, kind: str, detail: str, meter: str | None = None) -> None:
        self.sink.event(CollectorEvent(kind, self.plan.id, time.time_ns(), detail, meter))

    # --- the schedule ------------------------------------------------------------------------

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.phase_s
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self.run_cycle()
            cycle_s = self.cfg.poll_for(self.plan.id).cycle_s
            due += cycle_s
            now = loop.time()
            if now > due:  # the cycle ran past the next ones: skip them, keep the phase
                missed = int((now - due) // cycle_s) + 1
                self.stats.overruns += missed
                due += missed * cycle_s
