"""The dial-in listener under a registration flood, over real TCP on loopback: token buckets per
source address and in all, excess connections closed before a byte is read, counted, and
reported as one event per interval; the archive's own DTU still registers and is polled.
(Terminals not in the archive are rejected: tests/test_collect_interop.py keeps that.)

Sources are told apart by binding the client end to different loopback addresses
(127.0.0.2, 127.0.0.3, ...: Linux routes all of 127/8 to lo)."""

from __future__ import annotations

import asyncio
import dataclasses

from collect_helpers import (
    HOST,
    FakeMeter,
    FakeTerminal,
    TimedSink,
    collector_config,
    plan,
    run,
    wait_until,
)
from collect_helpers import dial as dial_in

from meterstream.collectors.archive import Archive
from meterstream.collectors.collector import (
    MAX_TRACKED_SOURCES,
    Collector,
    RegistrationLimiter,
    TokenBucket,
)
from meterstream.collectors.config import parse_collector_config
from meterstream.errors import UserError

ADDR = "550000000001"


class Probe(asyncio.Protocol):
    """A hostile client: sends a registration line at once and notes what comes back."""

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.got = b""
        self.closed = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.line)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.got += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


async def attack(port: int, source: str, n: int, line: bytes = b"$REG,NOPE,X\r\n") -> list[Probe]:
    loop = asyncio.get_running_loop()
    probes = []
    for _ in range(n):
        p = Probe(line)
        await loop.create_connection(lambda p=p: p, HOST, port, local_addr=(source, 0))
        probes.append(p)
    await asyncio.wait_for(asyncio.gather(*(p.closed for p in probes)), 10)
    return probes


def limited(**dialin: object) -> object:
    cfg = collector_config()
    return dataclasses.replace(cfg, **{f"dialin_{k}": v for k, v in dialin.items()})


def collector_with_dtu(cfg: object) -> tuple[Collector, TimedSink, FakeTerminal]:
    term = FakeTerminal([FakeMeter.make(ADDR, seed=1, status=0x0100)])
    arch = Archive({"D-OK": plan("D-OK", 0, [ADDR], mode="dial", heartbeat_s=0.0)}, "<test>")
    sink = TimedSink()
    return Collector(arch, cfg, sink), sink, term  # type: ignore[arg-type]


def rejected(sink: TimedSink) -> list[str]:
    return [e.detail for e in sink.kinds("rejected")]


def test_a_flood_from_one_source_is_closed_unread_reported_once_and_the_dtu_still_polls() -> None:
    async def main() -> None:
        cfg = limited(per_ip_rate=0.001, per_ip_burst=5.0, report_s=0.3)
        col, sink, term = collector_with_dtu(cfg)
        await col.start()
        assert col.listener is not None
        port = col.listener.port
        try:
            probes = await attack(port, "127.0.0.2", 40)
            # five were read (and rejected for what they said), 35 closed before reading
            said = [d for d in rejected(sink) if "not in the archive" in d]
            assert len(said) == 5
            assert col.listener.limiter is not None and col.listener.limiter.refused == 35
            assert all(p.got == b"" for p in probes)
            # the archive's DTU, from another address, registers and is polled meanwhile
            conn = await dial_in(term, port, "D-OK")
            s = col.sessions["D-OK"]
            await wait_until(lambda: s.online, what="DTU registered")
            batch = await asyncio.wait_for(s.run_cycle(), 10)
            assert batch.ok == 1
            await wait_until(lambda: any("rate limit" in d for d in rejected(sink)), 5,
                             "throttle report")
            await attack(port, "127.0.0.2", 10)  # more in the next interval
            await asyncio.sleep(0.7)  # two more intervals: one with refusals, one without
            reports = [d for d in rejected(sink) if "rate limit" in d]
            assert len(reports) == 2, reports
            assert "35 dial-in connection(s) closed unread" in reports[0]
            assert "127.0.0.2 (35)" in reports[0] and "1 source(s)" in reports[0]
            assert "10 dial-in connection(s)" in reports[1]
            assert len(rejected(sink)) == 5 + 2  # not one event per attempt
            conn.close()
        finally:
            await col.stop()
            await term.close()

    run(main())


def test_the_global_bucket_limits_many_sources_and_blames_none_of_them() -> None:
    async def main() -> None:
        cfg = limited(per_ip_rate=0.001, per_ip_burst=5.0, global_rate=0.001,
                      global_burst=12.0, report_s=0.2)
        col, sink, term = collector_with_dtu(cfg)
        await col.start()
        assert col.listener is not None
        try:
            for k in range(10):
                await attack(col.listener.port, f"127.0.0.{10 + k}", 3)
            said = [d for d in rejected(sink) if "not in the archive" in d]
            assert len(said) == 12  # the global burst, whoever it came from
            await wait_until(lambda: any("rate limit" in d for d in rejected(sink)), 5,
                             "throttle report")
            (report,) = [d for d in rejected(sink) if "rate limit" in d]
            assert "18 dial-in connection(s)" in report and "(18 over the global limit)" in report
            # a source refused by the global bucket keeps its own tokens (a full bucket is
            # forgotten at the report: full, or forgotten, is the same here)
            lim = col.listener.limiter
            assert lim is not None
            last = lim.sources.get("127.0.0.19")
            assert last is None or last.tokens >= 5.0
            assert lim.refused == 18
        finally:
            await col.stop()
            await term.close()

    run(main())


def test_rate_limit_off_reads_every_connection() -> None:
    async def main() -> None:
        col, sink, term = collector_with_dtu(limited(rate_limit=False))
        await col.start()
        assert col.listener is not None
        try:
            await attack(col.listener.port, "127.0.0.3", 30)
            await wait_until(lambda: len(rejected(sink)) == 30, 5, "every attempt read")
            assert col.listener.limiter is None
        finally:
            await col.stop()
            await term.close()

    run(main())


# --- the buckets on their own (a clock of our own) --------------------------------------------


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    b = TokenBucket(2.0, 3.0, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.5) and not b.take(0.5)  # 1 token per 0.5 s
    assert b.level(100.0) == 3.0


def test_the_limiter_forgets_refilled_sources_and_stays_bounded() -> None:
    lim = RegistrationLimiter(1.0, 2.0, 1e9, 1e9, now=0.0)
    for k in range(MAX_TRACKED_SOURCES + 500):
        lim.allow(f"10.{k >> 16}.{(k >> 8) & 255}.{k & 255}", 0.0)
    assert len(lim.sources) == MAX_TRACKED_SOURCES
    assert lim.report(0.0, 1.0) is None  # nothing refused yet
    assert len(lim.sources) == MAX_TRACKED_SOURCES  # all still half empty
    assert lim.report(10.0, 1.0) is None and lim.sources == {}


def test_the_keys_are_checked() -> None:
    base = {"dialin": {"per_ip_rate": 0.0}}
    try:
        parse_collector_config(base, "c.toml")
    except UserError as exc:
        assert "c.toml" in str(exc) and "per_ip_rate" in str(exc)
    else:
        raise AssertionError("per_ip_rate = 0 accepted")
    cfg = parse_collector_config({"dialin": {"per_ip_burst": 50, "report_s": 5}}, "c.toml")
    assert cfg.dialin_per_ip_burst == 50.0 and cfg.dialin_report_s == 5.0
