"""DL/T 645 collection against the simulated field over real TCP: poll cycles whose batches
equal the field's registers and status words, clock reads and time set, remote control with
status word 3 read back, the vectorised request encoder, and the loaders' errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from collect_helpers import (
    WAIT,
    Background,
    PortHold,
    collector_config,
    field_archive,
    make_field,
    run,
    wait_until,
)

from meterfield.field import Field
from meterstream.collectors.archive import P1997, P2007, load_archive
from meterstream.collectors.batch import NO_DRIFT, OUTCOME_OK, ReadingBatch
from meterstream.collectors.collector import Collector
from meterstream.collectors.commands import CONFIRMED, REFUSED, UNCONFIRMED, Command
from meterstream.collectors.config import CollectorConfig, load_collector_config
from meterstream.collectors.dlt645 import Credentials, encode_read, encode_reads
from meterstream.collectors.sink import MemorySink
from meterstream.errors import UserError


async def started(field: Field, tmp: Path, cfg: CollectorConfig, hold: PortHold) -> tuple[
        Collector, MemorySink]:
    sink = MemorySink()
    cfg = dataclasses.replace(cfg, dialin_port=hold.release())
    col = Collector(field_archive(field, tmp), cfg, sink)
    await col.start()
    await wait_until(lambda: all(s.online for s in col.sessions.values()), what="all online")
    return col, sink


def expected_row(field: Field, address: int, protocol: int, now: int) -> tuple[list[int], int]:
    k = field.meter(f"{address:012d}")
    regs = list(field.bank.registers(k))
    if protocol == P1997:
        return [regs[0], -1, -1, -1, -1], -1
    return regs, field.bank.status_word3(k, now)


def assert_batch_equals_field(field: Field, col: Collector, tid: str, batch: ReadingBatch) -> None:
    plan = col.archive.terminals[tid]
    assert batch.terminal == tid
    assert batch.meter.tolist() == plan.address.tolist()
    assert (batch.outcome == OUTCOME_OK).all(), batch.to_json()
    now = field.now()
    for i, address in enumerate(batch.meter.tolist()):
        regs, status = expected_row(field, address, int(plan.meter_protocol[i]), now)
        assert batch.registers[i].tolist() == regs, (tid, address)
        assert int(batch.status[i]) == status, (tid, address)


def test_poll_cycle_equals_the_field(tmp_path: Path) -> None:
    async def main() -> None:
        port = PortHold()
        field = make_field(collector_port=port.port)
        async with field:
            field.advance(3600)  # registers and relays somewhere other than the start
            col, sink = await started(field, tmp_path, collector_config(), port)
            try:
                kinds = set()
                for tid, s in col.sessions.items():
                    batch = await asyncio.wait_for(s.run_cycle(), WAIT)
                    assert_batch_equals_field(field, col, tid, batch)
                    kinds.add(col.archive.terminals[tid].kind)
                    # the batch the sink got is the same object, and it survives the wire
                    assert batch in sink.batches
                    back = ReadingBatch.from_bytes(batch.to_bytes())
                    assert (back.terminal, back.cycle, back.started_ns, back.ended_ns) == (
                        batch.terminal, batch.cycle, batch.started_ns, batch.ended_ns)
                    for name in ("meter", "ts", "registers", "status", "outcome", "error",
                                 "drift_s"):
                        np.testing.assert_array_equal(getattr(back, name), getattr(batch, name))
                        assert getattr(back, name).dtype == getattr(batch, name).dtype
                    doc = json.loads(batch.to_json())
                    assert doc["terminal"] == tid and doc["meters"] == len(batch) == doc["ok"]
                    assert [r["meter"] for r in doc["readings"]] == [
                        f"{a:012d}" for a in batch.meter.tolist()]
                assert kinds == {"concentrator", "serial-server", "dtu"}
                # 1997 meters were there, with the total only
                assert any((t.meter_protocol == P1997).any() for t in col.archive.terminals.values())
                s = col.summary()
                assert s["success_rate"] == 1.0 and s["online"] == s["terminals"] == 6
                assert s["reads_failed"] == 0
            finally:
                await col.stop()

    run(main())


def test_relay_state_shows_in_the_status_word(tmp_path: Path) -> None:
    async def main() -> None:
        port = PortHold()
        field = make_field(collector_port=port.port)
        async with field:
            col, _sink = await started(field, tmp_path, collector_config(), port)
            try:
                tid = "A001-C001"
                plan = col.archive.terminals[tid]
                k = int(np.flatnonzero(plan.meter_protocol == P2007)[0])
                i = field.meter(plan.address_text(k))
                field.bank.control(i, 0x1A, field.now())  # trip: bit6 now, bit4 after 5 s
                b1 = await asyncio.wait_for(col.sessions[tid].run_cycle(), WAIT)
                assert int(b1.status[k]) & 0x50 == 0x40
                field.advance(6)
                b2 = await asyncio.wait_for(col.sessions[tid].run_cycle(), WAIT)
                assert int(b2.status[k]) & 0x50 == 0x50
                assert_batch_equals_field(field, col, tid, b2)
            finally:
                await col.stop()

    run(main())


def test_clock_drift_and_time_set(tmp_path: Path) -> None:
    """The field's clock is paused in 2024: every meter is far off; 2007 meters get an addressed
    08H, the 1997 ones a broadcast, and the next clock read finds them right."""

    async def main() -> None:
        port = PortHold()
        field = make_field(collector_port=port.port)
        async with field:
            cfg = collector_config(clock_every=1, time_sync="addressed", max_drift_s=60)
            col, sink = await started(field, tmp_path, cfg, port)
            try:
                tid = "A001-C001"
                plan = col.archive.terminals[tid]
                s = col.sessions[tid]
                clocks = [field.bank.meter_time(field.meter(plan.address_text(k)), field.now())
                          for k in range(plan.n)]  # the field is paused: they stay put
                b1 = await asyncio.wait_for(s.run_cycle(), WAIT)
                wall = datetime.now(cfg.zone).replace(tzinfo=None)
                assert b1.meter.tolist() == plan.address.tolist()
                for k in range(plan.n):
                    want = (clocks[k] - wall).total_seconds()
                    assert abs(int(b1.drift_s[k]) - want) <= 3, (k, b1.drift_s[k], want)
                drifted = {e.meter for e in sink.events if e.kind == "clock_drift"}
                assert drifted == {plan.address_text(k) for k in range(plan.n)}
                addressed = {e.meter for e in sink.events if e.kind == "time_set" and e.meter}
                assert addressed == {plan.address_text(k) for k in range(plan.n)
                                     if plan.meter_protocol[k] == P2007}
                assert any(e.kind == "time_set" and e.meter is None and "broadcast" in e.detail
                           for e in sink.events)
                # the broadcast holds the bus for its settling time and is no timeout
                assert s.stats.timeouts == 0 and s.stats.reads_failed == 0
                b2 = await asyncio.wait_for(s.run_cycle(), WAIT)
                assert (b2.outcome == OUTCOME_OK).all()
                assert s.stats.timeouts == 0
                assert (b2.drift_s != NO_DRIFT).all()
                assert (np.abs(b2.drift_s) <= 2).all(), b2.drift_s
                wall = datetime.now(cfg.zone).replace(tzinfo=None)
                for k in range(plan.n):  # the meters' clocks now read the collector's time
                    meter_now = field.bank.meter_time(field.meter(plan.address_text(k)),
                                                      field.now())
                    assert abs((meter_now - wall).total_seconds()) <= 3
            finally:
                await col.stop()

    run(main())


# --- commands ---------------------------------------------------------------------------------


def _meter(col: Collector, tid: str, protocol: int) -> str:
    plan = col.archive.terminals[tid]
    return plan.address_text(int(np.flatnonzero(plan.meter_protocol == protocol)[0]))


def test_trip_close_and_keep_power(tmp_path: Path) -> None:
    async def main() -> None:
        port = PortHold()
        field = make_field(collector_port=port.port)
        async with field:
            col, sink = await started(field, tmp_path, collector_config(), port)
            try:
                for tid in ("A001-C001", "A001-D003"):  # a concentrator and a dial-in DTU
                    meter = _meter(col, tid, P2007)
                    i = field.meter(meter)
                    async with Background(lambda: field.advance(1.0)):
                        r = await col.execute(Command(meter, "trip"))
                        assert r.outcome == CONFIRMED, r.to_json()
                        assert r.terminal == tid and r.status is not None and r.status & 0x10
                        assert r.acked_ns is not None and r.attempts == 1 and r.readbacks >= 1
                        assert field.bank.relay_open_at(i, field.now())
                        r = await col.execute(Command(meter, "allow-close"))
                        assert r.outcome == CONFIRMED, r.to_json()
                        assert r.status is not None and not r.status & 0x40
                        assert field.bank.relay_open_at(i, field.now())  # waits for the button
                        r = await col.execute(Command(meter, "close"))
                        assert r.outcome == CONFIRMED, r.to_json()
                        assert not field.bank.relay_open_at(i, field.now())
                        r = await col.execute(Command(meter, "keep-power-on"))
                        assert r.outcome == CONFIRMED and r.status is not None and (
                            r.status & 0x1000)
                        r = await col.execute(Command(meter, "trip"))
                        assert r.outcome == REFUSED, r.to_json()
                        assert "keep-power in force" in r.detail and r.error_word == 0x0020
                        assert not field.bank.relay_open_at(i, field.now())
                        r = await col.execute(Command(meter, "keep-power-off"))
                        assert r.outcome == CONFIRMED
                assert [c.outcome for c in sink.commands] == [
                    CONFIRMED, CONFIRMED, CONFIRMED, CONFIRMED, REFUSED, CONFIRMED] * 2
                json.loads(sink.commands[0].to_json())
                assert "000000" not in "".join(c.to_json() for c in sink.commands)
            finally:
                await col.stop()

    run(main())


def test_wrong_password_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        port = PortHold()
        field = make_field(collector_port=port.port)
        async with field:
            cfg = dataclasses.replace(collector_config(),
                                      credentials=Credentials(2, "123456", "00000000"))
            col, _sink = await started(field, tmp_path, cfg, port)
            try:
                meter = _meter(col, "A001-C001", P2007)
                r = await col.execute(Command(meter, "trip"))
                assert r.outcome == REFUSED and "password error" in r.detail, r.to_json()
                assert "123456" not in r.to_json()
                assert not field.bank.relay_command_open[field.meter(meter)]
            finally:
                await col.stop()

    run(main())


def test_1997_meter_and_unknown_meter_refused_without_sending(tmp_path: Path) -> None:
    async def main() -> None:
        port = PortHold()
        field = make_field(collector_port=port.port)
        async with field:
            col, sink = await started(field, tmp_path, collector_config(), port)
            try:
                tid = "A001-C001"
                before = field.terminals[tid].requests
                r = await col.execute(Command(_meter(col, tid, P1997), "trip"))
                assert r.outcome == REFUSED and "1997" in r.detail
                assert r.attempts == 0 and r.sent_ns is None
                r2 = await col.execute(Command("999999999999", "trip"))
                assert r2.outcome == REFUSED and "not in the archive" in r2.detail
                await asyncio.sleep(0.05)
                assert field.terminals[tid].requests == before
                assert sink.commands == [r, r2]
            finally:
                await col.stop()

    run(main())


def test_trip_unconfirmed_when_the_relay_never_moves(tmp_path: Path) -> None:
    async def main() -> None:
        port = PortHold()
        field = make_field(collector_port=port.port)
        async with field:
            cfg = dataclasses.replace(collector_config(), confirm_timeout_s=0.3)
            col, _sink = await started(field, tmp_path, cfg, port)
            try:
                meter = _meter(col, "A001-C001", P2007)
                r = await col.execute(Command(meter, "trip"))  # the field never advances
                assert r.outcome == UNCONFIRMED, r.to_json()
                assert r.acked_ns is not None and "did not show" in r.detail
                assert r.status is not None and r.status & 0x50 == 0x40  # commanded, not open
                assert r.readbacks >= 1
            finally:
                await col.stop()

    run(main())


# --- the vectorised request encoder -----------------------------------------------------------


@pytest.mark.parametrize("preamble", [0, 1, 2, 4, 8])
@pytest.mark.parametrize(("di", "protocol"), [(0x0001FF00, 2007), (0x04000503, 2007),
                                               (0x00010100, 2007), (0x9010, 1997),
                                               (0xC011, 1997)])
def test_encode_reads_equals_encode_read(di: int, protocol: int, preamble: int) -> None:
    rng = np.random.default_rng(di + preamble)
    addrs = np.concatenate([
        np.array([0, 1, 99, 123456789012, 999999999998, 330010010001], np.int64),
        rng.integers(0, 10**12, 200, dtype=np.int64)])
    blob = encode_reads(addrs, di, protocol=protocol, preamble=preamble)
    size = preamble + 12 + (4 if protocol == 2007 else 2)
    assert len(blob) == size * len(addrs)
    for k, a in enumerate(addrs.tolist()):
        assert blob[k * size:(k + 1) * size] == encode_read(
            f"{a:012d}", di, protocol=protocol, preamble=preamble), (a, di, preamble)
    assert encode_reads(np.zeros(0, np.int64), di, protocol=protocol, preamble=preamble) == b""


def test_encode_reads_refuses_the_broadcast_address() -> None:
    from meterstream.collectors.dlt645 import BROADCAST, CodecError

    with pytest.raises(CodecError):
        encode_read(BROADCAST, 0x0001FF00)
    with pytest.raises(CodecError):
        encode_reads(np.array([int(BROADCAST)], np.int64), 0x0001FF00)


def test_encode_reads_rejects_what_cannot_go_on_the_wire() -> None:
    from meterstream.collectors.dlt645 import CodecError

    with pytest.raises(CodecError):
        encode_reads(np.array([10**12], np.int64), 0x0001FF00)
    with pytest.raises(CodecError):
        encode_reads(np.array([-1], np.int64), 0x0001FF00)
    with pytest.raises(CodecError):
        encode_reads(np.array([1], np.int64), 0x10000, protocol=1997)
    with pytest.raises(CodecError):
        encode_reads(np.array([1], np.int64), 0x0001FF00, preamble=9)


# --- configuration and archive errors ---------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("toml", "words"), [
    ("[collector]\ntimeout_s = -1\n", ["collector.timeout_s"]),
    ("[collector]\nretries = \"two\"\n", ["collector.retries"]),
    ("[collector]\ntime_sync = \"sometimes\"\n", ["collector.time_sync"]),
    ("[collector]\nextra_dis = [\"12345678\"]\n", ["extra_dis", "12345678"]),
    ("[collector]\ntimezone = \"Mars/Olympus\"\n", ["timezone", "Mars/Olympus"]),
    ("[collector]\ntimout_s = 1\n", ["timout_s"]),
    ("[dialin]\nport = 70000\n", ["dialin.port"]),
    ("[terminals.\"A001-C001\"]\nstrict_checksum = \"no\"\n", ["strict_checksum"]),
    ("[terminals.\"A001-C001\"]\nstrict_checksums = false\n", ["strict_checksums"]),
])
def test_config_errors_name_file_key_and_reason(tmp_path: Path, toml: str,
                                                words: list[str]) -> None:
    path = _write(tmp_path / "collector.toml", toml)
    with pytest.raises(UserError) as e:
        load_collector_config(path)
    text = str(e.value)
    assert str(path) in text, text
    for w in words:
        assert w in text, text
    assert len(text.splitlines()) == 1


def test_config_overrides_per_terminal(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.toml", "[collector]\ntimeout_s = 1.5\n"
                  "[terminals.\"A001-C001\"]\nstrict_checksum = false\npreamble = 0\n")
    cfg = load_collector_config(path)
    assert cfg.poll_for("A001-C001").strict_checksum is False
    assert cfg.poll_for("A001-C001").preamble == 0
    assert cfg.poll_for("A001-C001").timeout_s == 1.5  # inherits [collector]
    assert cfg.poll_for("A002-C001").strict_checksum is True
    with pytest.raises(UserError, match="not valid TOML"):
        load_collector_config(_write(tmp_path / "bad.toml", "[collector\n"))
    with pytest.raises(UserError, match="not found"):
        load_collector_config(tmp_path / "missing.toml")


TERMS = "terminal,area,kind,mode,host,port,protocol,meters,firmware,heartbeat_s\n"
METERS = "meter,terminal,protocol,unit,map,prepaid\n"


@pytest.mark.parametrize(("terms", "meters", "which", "line", "words"), [
    ("A001-C001,A001,concentrator,listen,127.0.0.1,9000,dlt645,1,,\n",
     "33001001000X,A001-C001,dlt645-2007,,,none\n", "meters", 2, ["12 digits"]),
    ("A001-C001,A001,concentrator,listen,127.0.0.1,9000,dlt645,1,,\n",
     "330010010001,A001-C001,dlt645-2007,,,none\n330010010001,A001-C001,dlt645-2007,,,none\n",
     "meters", 3, ["listed twice"]),
    ("A001-C001,A001,concentrator,listen,127.0.0.1,9000,dlt645,1,,\n",
     "330010010001,A001-C009,dlt645-2007,,,none\n", "meters", 2, ["A001-C009"]),
    ("A001-C001,A001,concentrator,listen,127.0.0.1,9000,dlt645,1,,\n",
     "999999999999,A001-C001,dlt645-2007,,,none\n", "meters", 2, ["broadcast"]),
    ("A001-C001,A001,concentrator,listen,127.0.0.1,9000,dlt645,1,,\n",
     "330010010001,A001-C001,dlt645-2009,,,none\n", "meters", 2, ["dlt645-2009"]),
    ("A001-C001,A001,concentrator,listen,127.0.0.1,9000,dlt645,1,,\n"
     + "A001-C002,A001,concentrator,shout,127.0.0.1,9001,dlt645,1,,\n",
     "", "terminals", 3, ["shout"]),
    ("A001-C001,A001,concentrator,listen,127.0.0.1,nine,dlt645,1,,\n", "", "terminals", 2,
     ["port", "nine"]),
    ("A001-C001,A001,concentrator,listen,127.0.0.1,0,dlt645,1,,\n", "", "terminals", 2,
     ["port 0"]),
    ("A001-D001,A001,dtu,dial,127.0.0.1,9700,dlt645,1,,fast\n", "", "terminals", 2,
     ["heartbeat_s", "fast"]),
])
def test_archive_errors_name_file_line_and_reason(tmp_path: Path, terms: str, meters: str,
                                                  which: str, line: int,
                                                  words: list[str]) -> None:
    _write(tmp_path / "a-terminals.csv", TERMS + terms)
    _write(tmp_path / "a-meters.csv", METERS + meters)
    with pytest.raises(UserError) as e:
        load_archive(tmp_path / "a.csv")
    text = str(e.value)
    assert f"{tmp_path / f'a-{which}.csv'}:{line}" in text, text
    for w in words:
        assert w in text, text


def test_archive_missing_file_or_column(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="archive file not found"):
        load_archive(tmp_path / "none.csv")
    _write(tmp_path / "a-terminals.csv", "terminal,area,kind,mode,host,port\n")
    _write(tmp_path / "a-meters.csv", METERS)
    with pytest.raises(UserError) as e:
        load_archive(tmp_path / "a.csv")
    assert "protocol" in str(e.value) and "a-terminals.csv:1" in str(e.value)


def test_field_archive_loads(tmp_path: Path) -> None:
    field = make_field()
    field.write_archive(tmp_path / "x.csv")  # not started: listening ports are 0
    with pytest.raises(UserError, match="port 0"):
        load_archive(tmp_path / "x.csv")

    async def main() -> None:
        async with field:
            arch = field_archive(field, tmp_path, modbus=True)
            assert arch.meters == field.fleet.n
            assert {t.protocol for t in arch.terminals.values()} == {"dlt645", "modbus"}
            dtu = arch.terminals["A001-D003"]
            assert dtu.mode == "dial" and dtu.heartbeat_s == 0.2 and dtu.firmware

    run(main())




def test_commands_of_one_terminal_overlap(tmp_path: Path) -> None:
    """A command waiting for its read-back does not hold back the next command on the same
    terminal: both 1CH frames go out before the first relay has moved."""
    async def main() -> None:
        port = PortHold()
        field = make_field(collector_port=port.port)
        async with field:
            cfg = dataclasses.replace(collector_config(), confirm_timeout_s=10.0)
            col, _sink = await started(field, tmp_path, cfg, port)
            try:
                plan = col.archive.terminals["A001-C001"]
                meters = [plan.address_text(k) for k in range(plan.n)
                          if plan.meter_protocol[k] == P2007][:2]
                rows = [field.meter(m) for m in meters]
                jobs = [asyncio.ensure_future(col.execute(Command(m, "trip"))) for m in meters]
                # the field's clock stands still, so no relay moves: both are sent all the same
                await wait_until(lambda: all(field.bank.relay_command_open[i] for i in rows),
                                 what="both 1CH commands on the wire")
                async with Background(lambda: field.advance(1.0)):
                    results = await asyncio.wait_for(asyncio.gather(*jobs), WAIT)
                assert [r.outcome for r in results] == [CONFIRMED, CONFIRMED]
            finally:
                await col.stop()

    run(main())
