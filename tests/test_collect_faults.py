"""Faults over real TCP on loopback: a dead meter, a terminal that goes silent mid-cycle (and a
DTU that dials in again), a terminal that floods garbage, an area-wide outage in the field.
Fake terminals answer with the codec's encoders; the field is config/field-test.toml."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from collect_helpers import (
    WAIT,
    FakeMeter,
    FakeTerminal,
    PortHold,
    TimedSink,
    collector_config,
    dial,
    field_archive,
    make_field,
    plan,
    run,
    wait_until,
)

from meterstream.collectors.archive import Archive
from meterstream.collectors.batch import OUTCOME_OK, OUTCOME_TIMEOUT, ReadingBatch
from meterstream.collectors.collector import Collector
from meterstream.collectors.dlt645 import ReadRequest
from meterstream.collectors.session import Dlt645Session

ADDRS = [f"4400000000{k:02d}" for k in range(1, 6)]


def fake_meters(n: int = 5) -> list[FakeMeter]:
    return [FakeMeter.make(a, seed=k, status=0x0100) for k, a in enumerate(ADDRS[:n])]


async def session_on(term: FakeTerminal, sink: TimedSink, n: int = 5,
                     **poll: object) -> Dlt645Session:
    port = await term.start()
    cfg = collector_config(**poll)
    s = Dlt645Session(plan("T-FAKE", port, ADDRS[:n]), cfg, sink, phase_s=3600.0)
    s.start()
    await wait_until(lambda: s.online, what="session online")
    return s


def row(batch: ReadingBatch, address: str) -> int | None:
    hits = np.flatnonzero(batch.meter == int(address))
    return int(hits[0]) if hits.size else None


def test_dead_meter_costs_its_timeouts_only_and_is_demoted_then_promoted() -> None:
    async def main() -> None:
        term = FakeTerminal(fake_meters())
        dead = ADDRS[1]
        term.silent.add(dead)
        sink = TimedSink()
        s = await session_on(term, sink, timeout_s=0.2, retries=1, demote_after=2,
                             demoted_every=3)
        try:
            seen: list[int | None] = []
            for cycle in range(1, 8):
                if cycle == 6:
                    term.silent.clear()  # it answers again
                first = len(term.requests)
                batch = await asyncio.wait_for(s.run_cycle(), WAIT)
                asked = [r.address for r in term.requests[first:]]
                k = row(batch, dead)
                seen.append(None if k is None else int(batch.outcome[k]))
                for m in fake_meters():  # every other meter: read, ok, exactly its requests
                    if m.address == dead:
                        continue
                    i = row(batch, m.address)
                    assert i is not None and batch.outcome[i] == OUTCOME_OK, (cycle, m.address)
                    assert batch.registers[i].tolist() == list(m.registers)
                    assert batch.status[i] == 0x0100
                    assert asked.count(m.address) == 2  # block + status word
                if k is not None and batch.outcome[k] == OUTCOME_TIMEOUT:
                    # its timeout and one retry, the retry at the end of the cycle
                    assert asked.count(dead) == 2
                    assert asked[-1] == dead and asked[asked.index(dead) + 1] != dead
                    assert batch.registers[k].tolist() == [-1] * 5
                elif k is None:
                    assert dead not in asked  # demoted and not due: not even asked
            # cycles 1, 2 fail -> demoted; 3 due (every 3rd) and fails; 4, 5 skipped; 6 due and
            # answers -> promoted; 7 read again like the others
            assert seen == [OUTCOME_TIMEOUT, OUTCOME_TIMEOUT, OUTCOME_TIMEOUT, None, None,
                            OUTCOME_OK, OUTCOME_OK]
            assert [e.meter for e in sink.kinds("demoted")] == [dead]
            assert [e.meter for e in sink.kinds("promoted")] == [dead]
            assert sink.kinds("down") == [] and s.online
            assert s.stats.timeouts == 6 and s.stats.reads_failed == 3
        finally:
            await s.stop()
            await term.close()

    run(main())


@pytest.mark.parametrize("mode", ["listen", "dial"])
def test_terminal_silent_mid_cycle_is_down_within_two_timeouts(mode: str) -> None:
    """The fake stops answering everything in the middle of a cycle (TCP stays open): the link
    is reported down within 2 x timeout; once the terminal is back (reconnected, or the DTU
    dials in again and registers) its cycles resume with every meter ok."""

    async def main() -> None:
        timeout = 0.25
        term = FakeTerminal(fake_meters())
        sink = TimedSink()
        hold = PortHold()
        if mode == "listen":
            port = await term.start()
            p = plan("T-SIL", port, ADDRS)
        else:
            p = plan("T-SIL", 0, ADDRS, mode="dial")
        cfg = collector_config(dialin_port=hold.release(), cycle_s=0.4, timeout_s=timeout,
                               retries=1, silent_after=2)
        col = Collector(Archive({"T-SIL": p}, "test"), cfg, sink)
        await col.start()
        s = col.sessions["T-SIL"]
        try:
            if mode == "dial":
                assert col.listener is not None
                conn = await dial(term, col.listener.port, "T-SIL")
            await wait_until(lambda: sum(b.ok == 5 for b in sink.batches) >= 2,
                             what="two good cycles")
            # going silent three requests into the next cycle (after m1's block, m1's status)
            cycle_start = len(term.requests) - len(term.requests) % 10
            term.mute_after = cycle_start + 10 + 3
            await wait_until(lambda: sink.kinds("down"), what="link down")
            down = sink.kinds("down")[0]
            down_at = sink.at[sink.events.index(down)]
            assert term.muted_at is not None
            assert down_at - term.muted_at <= 2 * timeout + 0.25
            assert "silent" in down.detail
            # the partial cycle: the meters read before the silence are ok, no invented rows
            partial = next(b for b in reversed(sink.batches) if b.ended_ns <= down.ts_ns + 10**7)
            assert (partial.outcome == OUTCOME_OK).all() and 1 <= len(partial) < 5
            n_down = len(sink.batches)
            term.mute = False
            if mode == "dial":
                await asyncio.wait_for(conn.lost, WAIT)  # the collector hung up on it
                conn = await dial(term, col.listener.port, "T-SIL")
            await wait_until(lambda: len(sink.kinds("up")) >= 2, what="link up again")
            up_at = sink.at[sink.events.index(sink.kinds("up")[-1])]
            await wait_until(lambda: any(b.ok == 5 for b in sink.batches[n_down:]),
                             what="a good cycle after the reconnection")
            good = next(b for b in sink.batches[n_down:] if b.ok == 5)
            assert good.started_ns >= sink.kinds("up")[-1].ts_ns and up_at > down_at
            assert s.online and len(sink.kinds("down")) == 1
            if mode == "dial":
                assert len(sink.kinds("registration")) == 2
        finally:
            await col.stop()
            await term.close()

    run(main())


@pytest.mark.parametrize("flood", ["garbage", "fe"])
def test_flooding_terminal_is_dropped_and_others_unaffected(tmp_path: Path, flood: str) -> None:
    async def main() -> None:
        hold = PortHold()
        field = make_field(collector_port=hold.port)
        term = FakeTerminal(fake_meters())
        if flood == "fe":
            term.flood_fe = True
        else:
            term.flood = True
        async with field:
            port = await term.start()
            arch = field_archive(field, tmp_path)
            arch.terminals["T-FLOOD"] = plan("T-FLOOD", port, ADDRS)
            sink = TimedSink()
            cfg = collector_config(dialin_port=hold.release(), timeout_s=0.3)
            col = Collector(arch, cfg, sink)
            await col.start()
            s = col.sessions["T-FLOOD"]
            most = [0]
            feed = s.on_data

            def watched(link: object, data: bytes) -> None:
                feed(link, data)  # type: ignore[arg-type]
                most[0] = max(most[0], s.reader.buffered)

            s.on_data = watched  # type: ignore[method-assign]
            others = [x for t, x in col.sessions.items() if t != "T-FLOOD"]
            try:
                await wait_until(lambda: all(x.online for x in others), what="others online")
                for _ in range(3):
                    batches = await asyncio.wait_for(
                        asyncio.gather(*(x.run_cycle() for x in col.sessions.values())), WAIT)
                    for b in batches:
                        if b.terminal == "T-FLOOD":
                            assert b.ok == 0
                        else:
                            assert b.ok == len(b) == arch.terminals[b.terminal].n, b.to_json()
                await wait_until(lambda: sink.kinds("down"), what="flood down")
                downs = sink.kinds("down")
                assert {e.terminal for e in downs} == {"T-FLOOD"}
                assert all("flood" in e.detail for e in downs), [e.detail for e in downs]
                assert most[0] < 267
                if flood == "garbage":
                    assert most[0] > 200  # the flood made it hold a long candidate
                assert s.stats.reads_ok == 0
            finally:
                await col.stop()
                await term.close()

    run(main())


def test_area_outage_downs_exactly_that_area(tmp_path: Path) -> None:
    async def main() -> None:
        hold = PortHold()
        field = make_field(collector_port=hold.port)
        async with field:
            arch = field_archive(field, tmp_path)
            sink = TimedSink()
            cfg = collector_config(dialin_port=hold.release(), cycle_s=0.3, timeout_s=0.3)
            col = Collector(arch, cfg, sink)
            await col.start()
            try:
                await wait_until(lambda: all(s.online for s in col.sessions.values()))
                area = {t for t, p in arch.terminals.items() if p.area == "A002"}
                assert area == {"A002-C001", "A002-S002", "A002-D003"}
                field.outage(area="A002")
                await field.settle_links()
                await wait_until(lambda: {e.terminal for e in sink.kinds("down")} == area,
                                 what="down events of A002")
                await asyncio.sleep(0.5)  # reconnection attempts fail meanwhile: no more events
                assert sorted(e.terminal for e in sink.kinds("down")) == sorted(area)
                assert {t for t, s in col.sessions.items() if not s.online} == area
                n_up = len(sink.kinds("up"))
                n_batches = len(sink.batches)
                field.restore(area="A002")
                await field.settle_links()
                await wait_until(lambda: {e.terminal for e in sink.kinds("up")[n_up:]} == area,
                                 what="up events of A002")
                assert len(sink.kinds("up")) == n_up + 3
                await wait_until(lambda: {b.terminal for b in sink.batches[n_batches:]
                                          if len(b) and b.ok == len(b)} >= area,
                                 what="good cycles of A002 again")
                assert all(s.online for s in col.sessions.values())
                assert len(sink.kinds("down")) == 3
            finally:
                await col.stop()

    run(main())


def test_one_off_read_while_offline_ends_at_once() -> None:
    """A one-off read while the terminal is offline ends with "link down", it does not wait
    for a link that may never return (a command does the same: "terminal offline")."""

    async def main() -> None:
        term = FakeTerminal(fake_meters(2))
        sink = TimedSink()
        s = await session_on(term, sink, n=2)
        try:
            frame, why = await asyncio.wait_for(s.read(ADDRS[0], 0x04000503), WAIT)
            assert why == "ok" and frame.data[4:6] == b"\x00\x01"
            await term.close()
            await wait_until(lambda: not s.online, what="down")
            assert isinstance(term.requests[-1], ReadRequest)
            frame, why = await asyncio.wait_for(s.read(ADDRS[0], 0x04000503), WAIT)
            assert (frame, why) == (None, "link down")
        finally:
            await s.stop()

    run(main())
