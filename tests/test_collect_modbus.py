"""The Modbus session against the simulated field's pymodbus gateways over real TCP (ephemeral
ports on loopback), and its pure read planner and decoder. The field is paused (speed 0) and
moved with `Field.advance`; short timeouts keep failures fast. Waits poll with a generous bound
that only limits how long a failing test takes; nothing asserts on timing."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Self

import numpy as np
import pytest

from meterfield import Field, load_config
from meterfield.modbus import quantities
from meterstream.collectors.archive import TerminalPlan, load_archive
from meterstream.collectors.batch import (
    NO_DRIFT,
    NO_VALUE,
    OUTCOME_ERROR,
    OUTCOME_OK,
    OUTCOME_TIMEOUT,
    ReadingBatch,
)
from meterstream.collectors.commands import REFUSED, Command
from meterstream.collectors.config import (
    CollectorConfig,
    ModbusMap,
    ModbusRegister,
    load_collector_config,
)
from meterstream.collectors.modbus import (
    MAX_REGISTERS,
    WIDTH,
    ModbusSession,
    decode_range,
    energy_register,
    plan_reads,
    quantity_text,
    scaled,
)
from meterstream.collectors.sink import MemorySink
from meterstream.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIELD = ROOT / "config" / "field-test.toml"
COLLECTOR = ROOT / "config" / "collector.toml"
GATEWAYS = ("A001-G004", "A002-G004")
WAIT = 10.0  # seconds: only how long a failing test takes to fail
# A unit id the gateway does not hold: a real gateway answers 0B (target device failed to
# respond); pymodbus 3.16's simulator answers 04 (device failure). Either is an exception reply.
NO_SUCH_UNIT = (0x04, 0x0B)


def config(**poll: Any) -> CollectorConfig:
    cfg = load_collector_config(COLLECTOR)
    return dataclasses.replace(
        cfg, modbus_timeout_s=0.3, modbus_retries=1, connect_timeout_s=0.5,
        backoff_s=(0.05, 0.2), poll=dataclasses.replace(cfg.poll, **poll))


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


async def wait_until(what: str, ok: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT
    while not ok():
        if loop.time() > end:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


def gateway_plan(field: Field, tmp_path: Path, terminal: str = "A001-G004") -> TerminalPlan:
    field.write_archive(tmp_path / "a.csv")  # after start: the actual ports
    return load_archive(tmp_path / "a.csv").terminals[terminal]


def add_meter(plan: TerminalPlan, address: int, unit: int, map_name: str) -> None:
    plan.address = np.append(plan.address, np.int64(address))
    plan.meter_protocol = np.append(plan.meter_protocol, plan.meter_protocol[:1])
    plan.unit = np.append(plan.unit, np.int16(unit))
    plan.map_name = [*plan.map_name, map_name]


def rows(batch: ReadingBatch) -> dict[str, int]:
    """meter address -> row index."""
    return {f"{int(m):012d}": i for i, m in enumerate(batch.meter)}


def float32_bound(register: int) -> int:
    """How far a total read through a float32 kWh register may be from the meter's register
    (0.01 kWh): half an ulp of the stored float32, plus the rounding to 0.01 kWh."""
    ulp = float(np.spacing(np.float32(register / 100)))
    return int(0.5 + 50 * ulp)


# --- pure: read planning and decoding --------------------------------------------------------


def test_each_configured_map_is_read_with_the_fewest_requests() -> None:
    maps = load_collector_config(COLLECTOR).modbus_maps
    for name in ("sdm630", "dtsu666"):
        mp = maps[name]
        p = plan_reads(mp)
        assert len(p.reads) == 2, name  # one span over 125 registers apart is two requests
        assert p.energy.quantity == "import_kwh"
        assert p.energy in p.reads[0].registers  # the energy register's request goes first
        covered = [r for rng in p.reads for r in rng.registers]
        assert sorted(covered, key=lambda r: r.address) == sorted(mp.registers,
                                                                   key=lambda r: r.address)
        for rng in p.reads:
            assert rng.function == mp.function and 1 <= rng.count <= MAX_REGISTERS
            for r in rng.registers:
                assert rng.address <= r.address
                assert r.address + WIDTH[r.type] <= rng.address + rng.count
    # the SDM630's registers up to 0x004B are one request, the total at 0x0156 another
    assert [(g.address, g.count) for g in plan_reads(maps["sdm630"]).reads] == [(0, 0x4C),
                                                                                (0x156, 2)]


def test_a_long_map_is_split_at_125_registers_and_total_kwh_stands_in() -> None:
    regs = tuple(ModbusRegister(a, "voltage_a") for a in range(0, 300, 2)) + (
        ModbusRegister(298, "total_kwh", type="uint32"),)
    p = plan_reads(ModbusMap("long", 3, regs))
    assert p.energy.quantity == "total_kwh"
    # 0x0000..0x012B needs three requests of at most 125; the energy register's goes first
    assert [(g.address, g.count) for g in p.reads] == [(248, 52), (0, 124), (124, 124)]
    assert p.energy in p.reads[0].registers


def test_decoding_follows_type_word_order_and_scale() -> None:
    hi, lo = struct.unpack(">HH", struct.pack(">f", 2296.0))
    mp = ModbusMap("m", 3, (
        ModbusRegister(10, "voltage_a", 10.0, "float32"),
        ModbusRegister(12, "import_kwh", 100.0, "uint32"),
        ModbusRegister(14, "power_total", 1.0, "int16"),
        ModbusRegister(15, "current_a", 1000.0, "uint16"),
        ModbusRegister(16, "frequency", 1.0, "int32"),
    ), word_order="big")
    (rng,) = plan_reads(mp).reads
    words = [hi, lo, 0x0001, 0x86A1, 0xFF38, 4348, 0, 50]
    got = {r.quantity: v for r, v in decode_range(rng, words, "big")}
    assert str(got["voltage_a"]) == "229.6"
    assert energy_register(got["import_kwh"]) == 100001  # 0x186A1 / 100 = 1000.01 kWh
    assert got["power_total"] == -200
    assert quantity_text(mp.registers[3], got["current_a"]) == "4.348"
    assert got["frequency"] == 50
    little = [lo, hi, 0x86A1, 0x0001, 0xFF38, 4348, 50, 0]
    assert {r.quantity: v for r, v in decode_range(rng, little, "little")} == got
    assert decode_range(rng, [0x7FC0, 0, *words[2:]])[0][1] is None  # NaN: no value
    assert quantity_text(mp.registers[0], None) is None


def test_energy_rounds_half_even_and_float32_stays_within_half_an_ulp() -> None:
    # an integer register with a divisor can sit exactly on a tie: half-even
    assert energy_register(scaled(12345, 1000.0)) == 1234  # 12.345 kWh
    assert energy_register(scaled(12355, 1000.0)) == 1236  # 12.355 kWh
    assert energy_register(scaled(-1.0, 1.0)) is None
    assert energy_register(None) is None
    rng = np.random.default_rng(7)
    registers = np.concatenate([rng.integers(0, 99_999_999, 20_000), [0, 1, 13_107_199,
                                                                       13_107_200, 99_999_999]])
    for reg in registers.tolist():
        stored = float(np.float32(reg / 100))  # what a meter's float32 kWh register holds
        got = energy_register(scaled(stored, 1.0))
        assert got is not None and abs(got - reg) <= float32_bound(reg), reg
        if reg < 13_107_200:  # below 131,072 kWh a float32 register is exact to 0.01 kWh
            assert got == reg
    assert float32_bound(99_999_999) == 3


def test_extras_are_decimal_text_at_the_quantity_resolution() -> None:
    def text(q: str, raw: float, scale: float = 1.0, typ: str = "float32") -> str | None:
        reg = ModbusRegister(0, q, scale, typ)
        return quantity_text(reg, scaled(raw, scale))

    assert text("voltage_a", float(np.float32(229.6))) == "229.6"
    assert text("current_b", float(np.float32(4.348))) == "4.348"
    assert text("frequency", float(np.float32(5004.0)), 100.0) == "50.04"
    assert text("power_total", float(np.float32(-0.01))) == "0.0"
    assert text("voltage_c", 22961, 100.0, "uint16") == "229.61"  # an integer's scale: finer
    assert text("export_kwh", 0.0) == "0.00"


# --- over TCP against the field ----------------------------------------------------------------


def test_readings_equal_the_field_registers(tmp_path: Path) -> None:
    async def main() -> None:
        field = Field(load_config(FIELD))
        async with field:
            field.advance(300)
            cfg = config()
            for terminal in GATEWAYS:
                plan = gateway_plan(field, tmp_path, terminal)
                assert plan.n == 2 and plan.map_name == ["sdm630", "dtsu666"]
                sink = MemorySink()
                session = ModbusSession(plan, cfg, sink)
                try:
                    for step in (0, 7200):  # registers move: so do the readings
                        field.advance(step)
                        before = field.stats.modbus_requests
                        batch = await session.run_cycle()
                        # two requests a meter, as planned, counted by the gateway itself
                        assert field.stats.modbus_requests - before == 4
                        assert len(batch) == 2 and batch.ok == 2 and batch.terminal == terminal
                        for k in range(plan.n):
                            i = field.meter(plan.address_text(k))
                            row = rows(batch)[plan.address_text(k)]
                            want = field.bank.registers(i)[0]
                            got = int(batch.registers[row, 0])
                            assert abs(got - want) <= float32_bound(want)
                            assert (batch.registers[row, 1:] == NO_VALUE).all()
                            assert batch.status[row] == NO_VALUE
                            assert batch.drift_s[row] == NO_DRIFT
                            assert batch.outcome[row] == OUTCOME_OK
                            q = quantities(field.bank, i, field.now())
                            extra = batch.extra[row]
                            assert extra["voltage_a"] == f"{q['voltage_a']:.1f}"
                            assert extra["current_c"] == f"{q['current_c']:.3f}"
                            assert extra["frequency"] == f"{q['frequency']:.2f}"
                            assert extra["power_total"] == f"{q['power_total']:.1f}"
                            assert extra["export_kwh"] == "0.00"
                            assert set(extra) >= {"voltage_b", "voltage_c", "current_a",
                                                  "current_b"}
                            assert "import_kwh" not in extra  # it is the row's total
                    assert session.stats.reads_ok == 8 and session.stats.reads_failed == 0
                    assert session.stats.cycles == 2 and session.stats.meters_ok == 2
                    assert [e.kind for e in sink.events] == ["up"]
                    assert len(sink.batches) == 2 and sink.batches[-1] is batch  # handed on too
                finally:
                    await session.stop()
    run(main())


def test_a_missing_unit_is_demoted_while_the_others_are_read(tmp_path: Path) -> None:
    async def main() -> None:
        field = Field(load_config(FIELD))
        async with field:
            plan = gateway_plan(field, tmp_path)
            add_meter(plan, 330019990001, 9, "sdm630")  # no unit id 9 behind the gateway
            sink = MemorySink()
            session = ModbusSession(plan, config(demote_after=2, demoted_every=3), sink)
            try:
                seen = []
                for _cycle in range(8):
                    batch = await session.run_cycle()
                    r = rows(batch)
                    for k in range(2):
                        assert batch.outcome[r[plan.address_text(k)]] == OUTCOME_OK
                    seen.append("330019990001" in r)
                    if "330019990001" in r:
                        row = r["330019990001"]
                        assert batch.outcome[row] in (OUTCOME_TIMEOUT, OUTCOME_ERROR)
                        if batch.outcome[row] == OUTCOME_ERROR:
                            assert batch.error[row] in NO_SUCH_UNIT
                        assert batch.registers[row, 0] == NO_VALUE and batch.extra[row] == {}
                # read in cycles 1 and 2, demoted after 2, then every 3rd cycle: 5 and 8
                assert seen == [True, True, False, False, True, False, False, True]
                demoted = [e for e in sink.events if e.kind == "demoted"]
                assert len(demoted) == 1 and demoted[0].meter == "330019990001"
                assert not [e for e in sink.events if e.kind in ("down", "promoted")]
                assert session.online
            finally:
                await session.stop()
    run(main())


def test_a_demoted_meter_is_promoted_when_it_answers(tmp_path: Path) -> None:
    async def main() -> None:
        field = Field(load_config(FIELD))
        async with field:
            plan = gateway_plan(field, tmp_path)
            meter, unit = plan.address_text(1), int(plan.unit[1])
            plan.unit[1] = 9  # wired to the wrong unit id ...
            sink = MemorySink()
            session = ModbusSession(plan, config(demote_after=2, demoted_every=3), sink)
            try:
                for _cycle in range(2):
                    await session.run_cycle()
                assert [e.kind for e in sink.events if e.meter == meter] == ["demoted"]
                plan.unit[1] = unit  # ... and repaired
                present = []
                for _cycle in range(4):  # cycles 3..6: skipped, skipped, read, read
                    batch = await session.run_cycle()
                    present.append(meter in rows(batch))
                assert present == [False, False, True, True]
                assert batch.outcome[rows(batch)[meter]] == OUTCOME_OK
                assert [e.kind for e in sink.events if e.meter == meter] == ["demoted",
                                                                             "promoted"]
            finally:
                await session.stop()
    run(main())


def test_link_goes_down_in_an_outage_and_comes_back(tmp_path: Path) -> None:
    async def main() -> None:
        field = Field(load_config(FIELD))
        async with field:
            plan = gateway_plan(field, tmp_path)
            sink = MemorySink()
            session = ModbusSession(plan, config(cycle_s=0.05), sink, phase_s=0.01)
            session.start()
            try:
                await wait_until("scheduled batches", lambda: sum(b.ok for b in sink.batches) >= 4)
                assert session.online and sink.link_events("up")

                field.outage(terminal=plan.id)
                await field.settle_links()
                await wait_until("link down", lambda: bool(sink.link_events("down")))
                assert not session.online
                n = len(sink.batches)
                await wait_until("cycles while down", lambda: len(sink.batches) >= n + 3)
                assert all(len(b) == 0 for b in sink.batches[n + 1:])  # no rows while down
                assert len(sink.link_events("down")) == 1  # once, however often it retries
                assert "closed" in sink.link_events("down")[0].detail

                field.restore(terminal=plan.id)
                await field.settle_links()
                await wait_until("link up again", lambda: len(sink.link_events("up")) == 2)
                n = len(sink.batches)
                await wait_until("readings again", lambda: any(
                    b.ok == 2 for b in sink.batches[n:]))
                assert [e.kind for e in sink.events if e.is_link] == ["up", "down", "up"]
                assert session.stats.connects == 2 and session.stats.downs == 1
                assert session.stats.cycles >= len(sink.batches)
            finally:
                await session.stop()
            assert not session.online
    run(main())


def test_a_gateway_that_cannot_be_reached_is_down_once(tmp_path: Path) -> None:
    async def main() -> None:
        field = Field(load_config(FIELD))
        async with field:
            plan = gateway_plan(field, tmp_path)
            field.outage(terminal=plan.id)
            await field.settle_links()
            sink = MemorySink()
            one_shot = ModbusSession(plan, config(), sink)
            batch = await one_shot.run_cycle()  # not started: it tries to connect once
            assert len(batch) == 0 and one_shot.stats.cycles == 1 and not one_shot.online
            (down,) = sink.link_events("down")
            assert "cannot connect" in down.detail and f":{plan.port}" in down.detail
            await one_shot.stop()

            sink = MemorySink()
            session = ModbusSession(plan, config(cycle_s=0.05), sink)
            session.start()
            try:
                await wait_until("cycles while unreachable", lambda: len(sink.batches) >= 5)
                assert len(sink.link_events("down")) == 1 and not sink.link_events("up")
                field.restore(terminal=plan.id)
                await field.settle_links()
                await wait_until("link up", lambda: bool(sink.link_events("up")))
                await wait_until("readings", lambda: any(b.ok == 2 for b in sink.batches))
            finally:
                await session.stop()
    run(main())


def test_commands_are_refused_and_reported(tmp_path: Path) -> None:
    async def main() -> None:
        field = Field(load_config(FIELD))
        async with field:
            plan = gateway_plan(field, tmp_path)
            sink = MemorySink()
            session = ModbusSession(plan, config(), sink)
            result = await session.execute(Command(plan.address_text(0), "trip"))
            assert result.outcome == REFUSED and result.terminal == plan.id
            assert "Modbus" in result.detail and "relay" in result.detail
            assert result.attempts == 0 and result.sent_ns is None
            other = await session.execute(Command("330010010001", "close"))
            assert other.outcome == REFUSED and "not behind" in other.detail
            assert sink.commands == [result, other]
            await session.stop()
    run(main())


def test_stop_is_quiet_in_every_state(tmp_path: Path) -> None:
    async def main() -> None:
        field = Field(load_config(FIELD))
        async with field:
            plan = gateway_plan(field, tmp_path)
            session = ModbusSession(plan, config(), MemorySink())
            await session.stop()  # never started
            session.start()
            await session.stop()  # started, maybe still connecting
            await session.stop()  # twice
            session = ModbusSession(plan, config(), MemorySink())
            session.start()
            await wait_until("connected", lambda: session.online)
            cycle = asyncio.ensure_future(session.run_cycle())
            await asyncio.sleep(0)
            await session.stop()  # while a cycle reads
            batch = await cycle
            assert len(batch) <= 2
    run(main())


def test_an_unknown_map_is_a_user_error(tmp_path: Path) -> None:
    async def main() -> None:
        field = Field(load_config(FIELD))
        async with field:
            plan = gateway_plan(field, tmp_path)
            plan.map_name = ["sdm630", "acrel-adw300"]
            with pytest.raises(UserError, match=r"acrel-adw300.*\[modbus_maps\.acrel-adw300\]"):
                ModbusSession(plan, config(), MemorySink())
    run(main())


# --- against a bare gateway that answers late, slowly or never ---------------------------------


class BareGateway:
    """A minimal Modbus TCP server: answers FC03/FC04 with zero registers (0.0 kWh) after a
    delay (the next of `delays`, else `delay_s`), or never when `silent`. Each request is
    answered on its own task, so it also counts how many it holds at once."""

    def __init__(self, *, delay_s: float = 0.0, delays: tuple[float, ...] = (),
                 silent: bool = False) -> None:
        self.delay_s = delay_s
        self.delays = list(delays)
        self.silent = silent
        self.requests = 0
        self.outstanding = 0
        self.max_outstanding = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def plan(self) -> TerminalPlan:
        return TerminalPlan("A009-G001", "A009", "gateway", "listen", "127.0.0.1", self.port,
                            "modbus", address=np.array([330090010001, 330090010002], np.int64),
                            meter_protocol=np.array([2, 2], np.int8),
                            unit=np.array([1, 2], np.int16), map_name=["sdm630", "sdm630"])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                tid, _pid, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                pdu = await reader.readexactly(length - 1)
                self.requests += 1
                if self.silent:
                    continue
                delay = self.delays.pop(0) if self.delays else self.delay_s
                task = asyncio.ensure_future(self._answer(writer, tid, unit, pdu, delay))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, tid: int, unit: int, pdu: bytes,
                      delay: float) -> None:
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        try:
            await asyncio.sleep(delay)
        finally:
            self.outstanding -= 1
        fc, _address, count = struct.unpack(">BHH", pdu[:5])
        body = struct.pack(">BB", fc, 2 * count) + bytes(2 * count)
        writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)


def test_one_request_at_a_time_and_overruns_skip_cycles() -> None:
    async def main() -> None:
        async with BareGateway(delay_s=0.03) as gw:  # 4 requests a cycle: ~0.12 s
            sink = MemorySink()
            session = ModbusSession(gw.plan(), config(cycle_s=0.05), sink)
            session.start()
            try:
                await wait_until("batches", lambda: len(sink.batches) >= 3)
            finally:
                await session.stop()
            assert gw.max_outstanding == 1  # never two requests on the gateway at once
            assert all(b.ok == 2 for b in sink.batches)
            assert session.stats.overruns > 0  # cycles that fell due during a cycle: skipped
            cycles = [b.cycle for b in sink.batches]
            assert cycles == list(range(1, len(cycles) + 1))
    run(main())


def test_a_late_reply_is_retried_and_never_taken_for_the_next_one() -> None:
    async def main() -> None:
        # the first request is answered after its timeout (0.5 s); its late reply arrives while
        # the third request is outstanding (answered 0.3 s after it was sent)
        async with BareGateway(delays=(0.65, 0.0, 0.3, 0.0)) as gw:
            sink = MemorySink()
            cfg = dataclasses.replace(config(), modbus_timeout_s=0.5, modbus_retries=1)
            session = ModbusSession(gw.plan(), cfg, sink)
            try:
                batch = await session.run_cycle()
                await asyncio.sleep(0.2)  # the late reply has come and gone
                again = await session.run_cycle()
            finally:
                await session.stop()
            assert batch.ok == 2 and again.ok == 2
            assert list(batch.registers[:, 0]) == [0, 0]
            assert session.stats.timeouts == 1 and session.stats.reads_failed == 0
            assert gw.requests == 9  # 4 + the retry, then 4
    run(main())


def test_a_silent_gateway_times_out_and_its_link_is_dropped() -> None:
    async def main() -> None:
        async with BareGateway(silent=True) as gw:  # accepts, reads, never answers
            sink = MemorySink()
            cfg = dataclasses.replace(config(silent_after=2), modbus_timeout_s=0.1,
                                      modbus_retries=1)
            session = ModbusSession(gw.plan(), cfg, sink)
            try:
                batch = await session.run_cycle()
            finally:
                await session.stop()
            assert list(batch.outcome) == [OUTCOME_TIMEOUT, OUTCOME_TIMEOUT]
            assert (batch.registers == NO_VALUE).all()
            assert session.stats.timeouts == 4 and session.stats.reads_failed == 2
            assert gw.requests == 4  # a dead meter costs its energy request, retried once
            assert [e.kind for e in sink.events] == ["up", "down"]
            assert "no reply from the gateway to 2 reads in a row" in sink.events[1].detail
            assert not session.online
    run(main())
