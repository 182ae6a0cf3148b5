"""Collectors on Kafka, against a real Tansu broker and the simulated field over real TCP:
batches on `readings` equal the field's registers, link events on `links`, a command on
`commands` is executed against the field and its confirmed result arrives on `results`; two
collectors in one group split the terminals and one takes over the other's; the spool keeps
what the broker did not take and publishes it once it is back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Self

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from collect_helpers import (
    WAIT,
    Background,
    FakeTerminal,
    PortHold,
    collector_config,
    dial,
    field_archive,
    make_field,
    run,
    wait_until,
)

from meterfield.field import Field
from meterstream.collectors.archive import P1997, P2007, Archive
from meterstream.collectors.batch import CollectorEvent, ReadingBatch
from meterstream.collectors.commands import CONFIRMED, REFUSED
from meterstream.collectors.config import CollectorConfig
from meterstream.errors import UserError
from meterstream.pipeline import topics
from meterstream.pipeline.broker import EmbeddedBroker, free_port
from meterstream.pipeline.collector_kafka import (
    BadCommand,
    KafkaCollector,
    KafkaSink,
    Record,
    Spool,
    check_topics,
    decode_records,
    encode_record,
    parse_command,
    partition_of,
)
from meterstream.spool import SpoolLocked

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
SESSION_S = 3.0  # Tansu: group joins take about half of it (docs/broker.md)


class Tap:
    """Every message of some topics from the beginning, decoded, collected in the background."""

    def __init__(self, bootstrap: str, *names: str) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=50,
                                         auto_offset_reset="earliest")
        self.names = names
        self.messages: dict[str, list[Any]] = {n: [] for n in names}
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.consumer.start()
        self.consumer.assign([TopicPartition(n, p) for n in self.names
                              for p in range(PARTITIONS)])
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            got = await self.consumer.getmany(timeout_ms=100)
            for tp, msgs in got.items():
                self.messages[tp.topic].extend(msgs)

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.consumer.stop()

    def json(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(m.value) for m in self.messages[name]]

    def result(self, command_id: str) -> dict[str, Any] | None:
        for m in self.messages[topics.RESULTS.name]:
            d = json.loads(m.value)
            if d["id"] == command_id:
                return d
        return None

    async def wait_result(self, command_id: str) -> dict[str, Any]:
        await wait_until(lambda: self.result(command_id) is not None, 30.0,
                         f"the result of command {command_id}")
        r = self.result(command_id)
        assert r is not None
        return r


async def send_command(bootstrap: str, terminal: str, meter: str, action: str, *,
                       key: str | None = None, raw: bytes | None = None) -> str:
    cid = uuid.uuid4().hex
    doc = {"id": cid, "terminal": terminal, "meter": meter, "action": action,
           "reason": "test", "who": "pytest"}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topics.COMMANDS.name,
                                     raw if raw is not None else json.dumps(doc).encode(),
                                     key=(key or terminal).encode())
    finally:
        await producer.stop()
    return cid


def meter_of(arch: Archive, tid: str, protocol: int = P2007) -> str:
    plan = arch.terminals[tid]
    k = int(np.flatnonzero(plan.meter_protocol == protocol)[0])
    return plan.address_text(k)


def assert_batch_equals_field(field: Field, arch: Archive, batch: ReadingBatch) -> None:
    plan = arch.terminals[batch.terminal]
    assert batch.meter.tolist() == plan.address.tolist()
    now = field.now()
    for i, address in enumerate(batch.meter.tolist()):
        k = field.meter(f"{address:012d}")
        regs = list(field.bank.registers(k))
        if int(plan.meter_protocol[i]) == P1997:
            assert batch.registers[i].tolist() == [regs[0], -1, -1, -1, -1]
        else:
            assert batch.registers[i].tolist() == regs, (batch.terminal, address)
            assert int(batch.status[i]) == field.bank.status_word3(k, now)


def kafka_collector(arch: Archive, cfg: CollectorConfig, bootstrap: str, tmp: Path, name: str,
                    group: str) -> KafkaCollector:
    return KafkaCollector(arch, cfg, bootstrap, group=group, spool_dir=tmp / f"spool-{name}",
                          session_timeout_s=SESSION_S, client_id=name)


# --- without a broker -----------------------------------------------------------------------


def test_partition_of_is_the_producers_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    for tid in ("A001-C001", "A002-D003", "终端-7", "x"):
        for n in (1, 4, 7):
            assert partition_of(tid, n) == DefaultPartitioner()(tid.encode(), list(range(n)),
                                                                list(range(n)))
    assert {partition_of(f"T{i}", 4) for i in range(64)} == {0, 1, 2, 3}


def test_parse_command_and_its_errors() -> None:
    tid, cmd, who = parse_command(json.dumps({
        "id": "c1", "terminal": "A001-C001", "meter": "330010010001", "action": "trip",
        "reason": "arrears", "who": "kernel"}).encode())
    assert (tid, cmd.id, cmd.meter, cmd.action, cmd.reason, who) == (
        "A001-C001", "c1", "330010010001", "trip", "arrears", "kernel")
    for bad, why in [(b"{", "not JSON"), (b"[]", "not a JSON object"),
                     (b'{"id":"c","terminal":"T","meter":"330010010001"}', "'action'"),
                     (b'{"id":"c","terminal":"T","meter":"3300","action":"trip"}', "12-digit"),
                     (b'{"id":"c","terminal":"T","meter":"330010010001","action":"cut"}',
                      "unknown action")]:
        with pytest.raises(BadCommand, match=why):
            parse_command(bad)


def test_spool_records_torn_tail_bound_and_lock(tmp_path: Path) -> None:
    recs = [Record(i + 1, "t", f"k{i}".encode(), bytes([i]) * (i * 7), (("h", b"v"),) if i % 2
                   else ()) for i in range(20)]
    assert decode_records(b"".join(encode_record(r) for r in recs)) == (
        recs, sum(len(encode_record(r)) for r in recs))
    s = Spool(tmp_path, 1 << 20, file_bytes=200)
    with pytest.raises(SpoolLocked, match="another process"):
        Spool(tmp_path)
    assert s.append(recs[:10]) == 10 and s.append(recs[10:]) == 10
    assert len(s) == 2
    got: list[Record] = []
    while (item := s.oldest()) is not None:
        got += item[1]
        s.remove(item[0])
    assert got == recs and len(s) == 0 and s.bytes == 0
    # a crash in the middle of an append: the torn record is cut, the rest survives a restart
    s.append(recs[:3])
    s.close()
    f = next(tmp_path.glob("spool-*.rec"))
    f.write_bytes(f.read_bytes() + encode_record(recs[3])[:-2])
    s2 = Spool(tmp_path, 1 << 20)
    assert s2.max_seq() == 3
    item = s2.oldest()
    assert item is not None and item[1] == recs[:3]
    s2.close()
    small = Spool(tmp_path / "small", 100)
    assert small.append(recs[10:]) < 10  # the bound
    small.close()


def test_sink_spools_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    """Nothing listens at the address: everything goes to the spool, nothing is lost."""

    async def main() -> None:
        sink = KafkaSink(f"127.0.0.1:{free_port()}", spool_dir=tmp_path, request_timeout_s=1.0)
        await sink.start()
        assert sink.spooling
        for i in range(5):
            sink.event(CollectorEvent("up", f"T{i}", i))
        assert await sink.flush(WAIT)
        await sink.stop()
        assert sink.stats.spooled == 5 and sink.stats.published == 0
        assert sink.stats.last_error
        s = Spool(tmp_path)
        item = s.oldest()
        assert item is not None
        assert [json.loads(r.value)["terminal"] for r in item[1]] == [f"T{i}" for i in range(5)]
        assert all(r.topic == topics.LINKS.name for r in item[1])
        s.close()

    run(main())


def test_missing_topics_and_unreachable_broker_are_clear_errors() -> None:
    async def main() -> None:
        with pytest.raises(UserError, match="cannot reach the Kafka broker"):
            await check_topics(f"127.0.0.1:{free_port()}")

    run(main())
    with EmbeddedBroker(topics=[topics.READINGS.name], partitions=PARTITIONS) as broker:
        async def missing() -> None:
            with pytest.raises(UserError, match=f"topics missing.*{topics.COMMANDS.name}"):
                await check_topics(broker.bootstrap)

        run(missing())


# --- with the broker and the field ----------------------------------------------------------


def test_spool_is_published_once_the_broker_is_back(tmp_path: Path) -> None:
    """Records spooled while nothing listened are published, once each, by the next sink."""
    port = free_port()

    async def offline() -> None:
        sink = KafkaSink(f"127.0.0.1:{port}", spool_dir=tmp_path, request_timeout_s=1.0)
        await sink.start()
        for i in range(50):
            sink.batch(ReadingBatch.empty(f"T{i % 5}", i, i, i))
        await sink.stop()
        assert sink.stats.spooled == 50

    run(offline())
    with EmbeddedBroker(port=port, topics=topics.NAMES, partitions=PARTITIONS) as broker:
        async def online() -> None:
            sink = KafkaSink(broker.bootstrap, spool_dir=tmp_path, backoff_s=(0.05, 0.5))
            await sink.start()
            async with Tap(broker.bootstrap, topics.READINGS.name) as tap:
                await wait_until(lambda: not sink.spooling, 20.0, "the spool replayed")
                sink.batch(ReadingBatch.empty("T0", 99, 0, 0))  # after the spool: direct
                assert await sink.flush(WAIT)
                await wait_until(lambda: len(tap.messages[topics.READINGS.name]) >= 51)
                await asyncio.sleep(0.3)
                msgs = tap.messages[topics.READINGS.name]
                cycles = sorted(ReadingBatch.from_bytes(m.value).cycle for m in msgs)
                assert cycles == [*range(50), 99]  # each once
                for m in msgs:
                    b = ReadingBatch.from_bytes(m.value)
                    assert m.key == b.terminal.encode()
                    assert m.partition == partition_of(b.terminal, PARTITIONS)
                # per terminal, in the order handed
                for t in range(5):
                    seq = [ReadingBatch.from_bytes(m.value).cycle for m in msgs
                           if m.key == f"T{t}".encode()]
                    assert seq == sorted(seq)
            await sink.stop()
            assert sink.stats.replayed == 50 and sink.stats.published == 51
            assert not list(tmp_path.glob("spool-*.rec"))

        run(online())


@pytest.mark.slow
def test_batches_events_and_a_command_over_kafka(tmp_path: Path) -> None:
    async def main() -> None:
        with EmbeddedBroker(topics=topics.NAMES, partitions=PARTITIONS) as broker:
            hold = PortHold()
            field = make_field(collector_port=hold.port)
            async with field, Tap(broker.bootstrap, topics.READINGS.name, topics.LINKS.name,
                                  topics.RESULTS.name, topics.DEAD_LETTER.name) as tap:
                field.advance(3600)
                arch = field_archive(field, tmp_path)
                cfg = dataclasses.replace(collector_config(), dialin_port=hold.release())
                kc = kafka_collector(arch, cfg, broker.bootstrap, tmp_path, "one", "g-one")
                await kc.start()
                try:
                    await wait_until(lambda: kc.held == set(range(PARTITIONS)), 20.0,
                                     "all partitions held")
                    assert kc.terminals == set(arch.terminals)
                    await wait_until(lambda: all(s.online for s in kc.collector.sessions.values()),
                                     what="all online")
                    # link events on LINKS, keyed by terminal
                    await wait_until(lambda: {d["terminal"] for d in tap.json(topics.LINKS.name)
                                              if d["kind"] == "up"} == set(arch.terminals))
                    for m in tap.messages[topics.LINKS.name]:
                        assert m.key == json.loads(m.value)["terminal"].encode()
                    # one cycle per terminal: the batches on READINGS equal the field
                    for s in kc.collector.sessions.values():
                        await asyncio.wait_for(s.run_cycle(), WAIT)
                    await wait_until(lambda: len(tap.messages[topics.READINGS.name])
                                     >= len(arch.terminals), what="a batch per terminal")
                    seen = set()
                    for m in tap.messages[topics.READINGS.name]:
                        b = ReadingBatch.from_bytes(m.value)
                        assert m.key == b.terminal.encode()
                        assert m.partition == partition_of(b.terminal, PARTITIONS)
                        assert_batch_equals_field(field, arch, b)
                        seen.add(b.terminal)
                    assert seen == set(arch.terminals)
                    # a command through COMMANDS, executed against the field, confirmed on RESULTS
                    tid = "A001-C001"
                    meter = meter_of(arch, tid)
                    async with Background(lambda: field.advance(1.0)):
                        cid = await send_command(broker.bootstrap, tid, meter, "trip")
                        r = await tap.wait_result(cid)
                    assert r["outcome"] == CONFIRMED, r
                    assert (r["terminal"], r["meter"], r["action"], r["who"], r["reason"]) == (
                        tid, meter, "trip", "pytest", "test")
                    assert field.bank.relay_open_at(field.meter(meter), field.now())
                    m = next(m for m in tap.messages[topics.RESULTS.name]
                             if json.loads(m.value)["id"] == cid)
                    assert m.key == tid.encode() and ("command-id", cid.encode()) in m.headers
                    # keyed wrongly, unknown terminal, malformed: refused or dead-lettered
                    other = next(t for t in arch.terminals if partition_of(t, PARTITIONS)
                                 != partition_of(tid, PARTITIONS))
                    c2 = await send_command(broker.bootstrap, tid, meter, "close", key=other)
                    c3 = await send_command(broker.bootstrap, "NOPE", meter, "close")
                    await send_command(broker.bootstrap, tid, meter, "close", raw=b"{oops")
                    r2, r3 = await tap.wait_result(c2), await tap.wait_result(c3)
                    assert r2["outcome"] == REFUSED and "keyed wrongly" in r2["detail"]
                    assert r3["outcome"] == REFUSED and "not in this collector" in r3["detail"]
                    await wait_until(lambda: bool(tap.messages[topics.DEAD_LETTER.name]))
                    dl = tap.json(topics.DEAD_LETTER.name)[0]
                    assert dl["original"] == "{oops" and "not JSON" in dl["reason"]
                    assert field.bank.relay_open_at(field.meter(meter), field.now())
                    # every command's offset is committed once its result is out
                    await wait_until(lambda: not kc._tasks, what="commands done")
                    assert kc.commands_taken == 4
                finally:
                    await kc.stop()
                assert kc.sink.stats.published == kc.sink.stats.handed
                assert kc.sink.stats.errors == 0
                await _assert_committed_to_end(broker.bootstrap, "g-one")

    run(main(), timeout=120)


async def _assert_committed_to_end(bootstrap: str, group: str) -> None:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topics.COMMANDS.name, p) for p in range(PARTITIONS)]
        ends = await c.end_offsets(tps)
        for tp in tps:
            if ends[tp]:
                assert await c.committed(tp) == ends[tp], tp
    finally:
        await c.stop()


@pytest.mark.slow
def test_two_collectors_share_the_terminals_and_take_over(tmp_path: Path) -> None:
    async def main() -> None:
        with EmbeddedBroker(topics=topics.NAMES, partitions=PARTITIONS) as broker:
            hold_a, hold_b = PortHold(), PortHold()
            field = make_field(collector_port=hold_a.port)  # the DTUs dial collector a
            async with field, Tap(broker.bootstrap, topics.LINKS.name,
                                  topics.RESULTS.name) as tap:
                arch = field_archive(field, tmp_path)
                cfg = collector_config()
                a = kafka_collector(arch, dataclasses.replace(cfg, dialin_port=hold_a.release()),
                                    broker.bootstrap, tmp_path, "a", "g-two")
                b = kafka_collector(arch, dataclasses.replace(cfg, dialin_port=hold_b.release()),
                                    broker.bootstrap, tmp_path, "b", "g-two")
                both = (a, b)
                await a.start()
                await b.start()
                try:
                    def split() -> bool:
                        return (a.held | b.held == set(range(PARTITIONS)) and not a.held & b.held
                                and bool(a.held) and bool(b.held))

                    await wait_until(split, 30.0, "the partitions split between a and b")
                    # every terminal held by exactly one; the union is all
                    assert not a.terminals & b.terminals
                    assert a.terminals | b.terminals == set(arch.terminals)
                    for kc in both:
                        assert kc.terminals == {t for t in arch.terminals
                                                if partition_of(t, PARTITIONS) in kc.held}
                    # a DTU that dials the collector that does not hold it is rejected, clearly
                    dtu = "A001-D003"
                    stranger = a if dtu in b.terminals else b
                    conn = await dial(FakeTerminal([]), stranger.cfg.dialin_port, dtu)
                    await asyncio.wait_for(conn.lost, WAIT)
                    await wait_until(lambda: any(
                        d["kind"] == "rejected" and d["terminal"] == dtu
                        and "not held by this collector" in d.get("detail", "")
                        for d in tap.json(topics.LINKS.name)), what="the rejection")
                    # a command reaches the process that holds its terminal
                    tid = "A001-C001"
                    meter = meter_of(arch, tid)
                    holder = a if tid in a.terminals else b
                    other = b if holder is a else a
                    await wait_until(lambda: holder.collector.sessions[tid].online)
                    async with Background(lambda: field.advance(1.0)):
                        r = await tap.wait_result(
                            await send_command(broker.bootstrap, tid, meter, "trip"))
                    assert r["outcome"] == CONFIRMED, r
                    assert (holder.commands_taken, other.commands_taken) == (1, 0)
                    # the holder stops: the other takes its terminals over, commands follow
                    await holder.stop()
                    await wait_until(lambda: other.terminals == set(arch.terminals), 30.0,
                                     "the takeover")
                    assert other.held == set(range(PARTITIONS))
                    await wait_until(lambda: other.collector.sessions[tid].online)
                    async with Background(lambda: field.advance(1.0)):
                        r = await tap.wait_result(
                            await send_command(broker.bootstrap, tid, meter, "close"))
                    assert r["outcome"] == CONFIRMED, r
                    assert not field.bank.relay_open_at(field.meter(meter), field.now())
                    assert other.commands_taken == 1
                finally:
                    for kc in both:
                        await kc.stop()

    run(main(), timeout=150)



@pytest.mark.slow
def test_a_broker_outage_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    """The broker goes away while batches keep coming, and another takes its port: everything
    handed meanwhile arrives once, each terminal's batches in order."""
    port = free_port()

    async def main() -> None:
        b1 = EmbeddedBroker(port=port, topics=topics.NAMES, partitions=PARTITIONS).start()
        sink = KafkaSink(b1.bootstrap, spool_dir=tmp_path, request_timeout_s=2.0,
                         backoff_s=(0.1, 0.5))
        await sink.start()

        async def feed(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                sink.batch(ReadingBatch.empty(f"T{i % 5}", i, i, i))
                await asyncio.sleep(0.005)

        try:
            await feed(0, 20)
            assert await sink.flush(WAIT) and sink.stats.published == 20
            b1.stop()
            await feed(20, 200)
            await wait_until(lambda: sink.spooling, what="spooling")
            b2 = EmbeddedBroker(port=port, topics=topics.NAMES, partitions=PARTITIONS).start()
            try:
                await feed(200, 250)
                await wait_until(lambda: not sink.spooling and sink.pending == 0, 60.0,
                                 "the spool replayed")
                async with Tap(b2.bootstrap, topics.READINGS.name) as tap:
                    await wait_until(lambda: len(tap.messages[topics.READINGS.name]) >= 230)
                    await asyncio.sleep(0.3)
                    msgs = tap.messages[topics.READINGS.name]
                    cycles = [ReadingBatch.from_bytes(m.value).cycle for m in msgs]
                    assert sorted(cycles) == list(range(20, 250))  # b1's 20 went with it
                    for t in range(5):
                        mine = [c for c, m in zip(cycles, msgs, strict=True)
                                if m.key == f"T{t}".encode()]
                        assert mine == sorted(mine)
                assert sink.stats.published == 250 and sink.stats.spooled > 0
                assert sink.stats.replayed == sink.stats.spooled
            finally:
                await sink.stop()
                b2.stop()
        finally:
            b1.stop()
        assert not list(tmp_path.glob("spool-*.rec"))

    run(main(), timeout=120)


def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterstream", "collector", *args],
                          capture_output=True, text=True, timeout=60, check=False, **kw)


def test_cli_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = str(ROOT / "config" / "collector.toml")
    for args, needle in [
        (["--broker", "http://x:1", "--archive", "a.csv", "--config", cfg], "kafka://"),
        (["--broker", "kafka://x", "--archive", "a.csv", "--config", cfg], "HOST:PORT"),
        (["--broker", "kafka://127.0.0.1:1", "--archive", "/nonexistent/a.csv", "--config",
          cfg], "not found"),
    ]:
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_cli_runs_a_collector_and_stops_cleanly(tmp_path: Path) -> None:
    from test_cli_collect import FieldThread

    with EmbeddedBroker(topics=topics.NAMES[:-1], partitions=PARTITIONS) as broker, \
            FieldThread() as ft:
        ft.field.write_archive(tmp_path / "a.csv")
        cfg = tmp_path / "c.toml"
        maps = (ROOT / "config" / "collector.toml").read_text().split("\n[modbus_maps.", 1)[1]
        cfg.write_text("[collector]\ntimeout_s = 0.5\n[dialin]\nenabled = false\n"
                       "[modbus]\ntimeout_s = 0.5\n")
        args = ["--broker", broker.url, "--archive", str(tmp_path / "a.csv"), "--config",
                str(cfg), "--spool", str(tmp_path / "spool")]
        r = _cli(*args)  # the gateways' Modbus maps are not defined: stops the start
        assert r.returncode == 2 and "modbus_maps" in r.stderr, r.stderr
        cfg.write_text(cfg.read_text() + "[modbus_maps." + maps)
        r = _cli(*args)  # the dead-letter topic is missing
        assert r.returncode == 2 and topics.DEAD_LETTER.name in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        broker.create_topics([topics.DEAD_LETTER.name])
        proc = subprocess.Popen([sys.executable, "-m", "meterstream", "collector", *args,
                                 "--session-timeout", "3", "--status-every", "0.3"],
                                stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        listening = sum(1 for t in ft.field.fleet.terminals if t.mode == "listen")

        def read() -> None:
            assert proc.stderr is not None
            lines.extend(proc.stderr)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            end = time.monotonic() + 30.0
            while not any(x.startswith("partitions 0,1,2,3") and f"{listening}/" in x
                          for x in list(lines)) and time.monotonic() < end:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(5)
        text = "".join(lines)
        assert proc.returncode == 0, text
        assert "meterstream collector: group meterstream-collectors" in lines[0], text
        assert any(x.startswith("partitions 0,1,2,3") and f"{listening}/" in x
                   for x in lines), text
        assert "stopped; published" in text and "Traceback" not in text
