"""Interop with DL/T 645 implementations we did not write (fake terminals over real TCP): any
preamble, the all-AA wildcard, error bit0 for an unknown DI, slow meters, replies in 1-byte
chunks, wrong checksums (strict by default, tolerated per terminal), late replies; and the
dial-in listener: registration, rejection, replacement, heartbeats."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from collect_helpers import (
    WAIT,
    FakeMeter,
    FakeTerminal,
    PortHold,
    TimedSink,
    collector_config,
    dial,
    plan,
    run,
    wait_until,
)

from meterstream.collectors.archive import Archive
from meterstream.collectors.batch import OUTCOME_BAD_FRAME, OUTCOME_OK, OUTCOME_TIMEOUT
from meterstream.collectors.collector import Collector
from meterstream.collectors.config import CollectorConfig, parse_collector_config
from meterstream.collectors.dlt645 import ReadReply, decode_reply
from meterstream.collectors.session import Dlt645Session

ADDRS = ["550000000001", "550000000002", "550000000003"]
BLOCK, STATUS = 0x0001FF00, 0x04000503


def meters(n: int = 3) -> list[FakeMeter]:
    return [FakeMeter.make(a, seed=100 + k, status=0x0010 * k) for k, a in enumerate(ADDRS[:n])]


async def with_session(term: FakeTerminal, body: Any, *, n: int = 3,
                       cfg: CollectorConfig | None = None, tid: str = "T-IOP",
                       **poll: object) -> TimedSink:
    port = await term.start()
    sink = TimedSink()
    s = Dlt645Session(plan(tid, port, ADDRS[:n]), cfg or collector_config(**poll), sink,
                      phase_s=3600.0)
    s.start()
    try:
        await wait_until(lambda: s.online, what="online")
        await body(s)
    finally:
        await s.stop()
        await term.close()
    return sink


def assert_cycle_ok(batch: Any, ms: list[FakeMeter]) -> None:
    assert batch.meter.tolist() == [int(m.address) for m in ms]
    assert (batch.outcome == OUTCOME_OK).all(), batch.to_json()
    assert batch.registers.tolist() == [list(m.registers) for m in ms]
    assert batch.status.tolist() == [m.status for m in ms]


@pytest.mark.parametrize("preamble", [0, 1, 4, 7])
def test_any_number_of_fe_before_a_reply(preamble: int) -> None:
    async def body(s: Dlt645Session) -> None:
        for _ in range(2):
            assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), meters())
        assert s.stats.bad_frames == 0 and s.stats.discarded == 0

    run(with_session(FakeTerminal(meters(), preamble=preamble), body))


def test_wildcard_read_reply_carries_the_real_address() -> None:
    ms = meters(1)

    async def body(s: Dlt645Session) -> None:
        frame, why = await asyncio.wait_for(s.read("AAAAAAAAAAAA", BLOCK), WAIT)
        assert why == "ok" and frame.address == ADDRS[0]
        reply = decode_reply(frame)
        assert isinstance(reply, ReadReply) and reply.values == ms[0].registers

    run(with_session(FakeTerminal(ms), body, n=1))


@pytest.mark.parametrize("error", [0x01, 0x02])
def test_block_refused_with_bit0_or_bit1_reads_the_five_single_dis(error: int) -> None:
    ms = meters()
    ms[1].block_error = error

    async def body(s: Dlt645Session) -> None:
        first = len(term.requests)
        assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), ms)
        asked = [r.di for r in term.requests[first:] if r.address == ADDRS[1]]
        assert asked == [BLOCK, 0x00010000, 0x00010100, 0x00010200, 0x00010300, 0x00010400,
                         STATUS]
        first = len(term.requests)
        assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), ms)
        asked = [r.di for r in term.requests[first:] if r.address == ADDRS[1]]
        assert asked[0] != BLOCK and len(asked) == 6  # remembered: no block request again

    term = FakeTerminal(ms)
    term.unknown_di_error = error
    sink = asyncio.run(asyncio.wait_for(with_session(term, body), 60))
    refused = sink.kinds("block_refused")
    assert [e.meter for e in refused] == [ADDRS[1]]


def test_meter_slower_than_ours_is_still_ok() -> None:
    async def body(s: Dlt645Session) -> None:
        assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), meters())
        assert s.stats.timeouts == 0

    term = FakeTerminal(meters())
    term.delay_s = 0.8 * 0.3
    run(with_session(term, body, timeout_s=0.3))


def test_reply_in_one_byte_chunks() -> None:
    async def body(s: Dlt645Session) -> None:
        assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), meters())
        frame, why = await asyncio.wait_for(s.read(ADDRS[2], STATUS), WAIT)
        assert why == "ok" and frame.data[4:6] == (0x20).to_bytes(2, "little")

    term = FakeTerminal(meters(), preamble=4)
    term.chunk = 1
    run(with_session(term, body, timeout_s=0.5))


def test_wrong_checksum_fails_unless_the_terminal_is_configured_lenient() -> None:
    async def strict(s: Dlt645Session) -> None:
        b = await asyncio.wait_for(s.run_cycle(), WAIT)
        assert (b.outcome == OUTCOME_BAD_FRAME).all(), b.to_json()
        assert (b.registers == -1).all() and s.stats.bad_frames >= 3
        frame, why = await asyncio.wait_for(s.read(ADDRS[0], STATUS), WAIT)
        assert (frame, why) == (None, "bad frame")
        assert s.online  # broken frames are not silence

    async def lenient(s: Dlt645Session) -> None:
        b = await asyncio.wait_for(s.run_cycle(), WAIT)
        assert_cycle_ok(b, meters())
        frame, why = await asyncio.wait_for(s.read(ADDRS[0], STATUS), WAIT)
        assert why == "ok" and not frame.checksum_ok

    term = FakeTerminal(meters())
    term.bad_checksum = True
    run(with_session(term, strict))
    cfg = parse_collector_config({"collector": {"timeout_s": 0.3, "retries": 1,
                                                "clock_every": 0, "cycle_s": 3600},
                                  "terminals": {"T-LAX": {"strict_checksum": False}}})
    assert cfg.poll_for("T-LAX").strict_checksum is False
    term = FakeTerminal(meters())
    term.bad_checksum = True
    run(with_session(term, lenient, cfg=cfg, tid="T-LAX"))


def test_late_reply_is_stale_and_the_next_read_gets_its_own() -> None:
    timeout = 0.25

    async def body(s: Dlt645Session) -> None:
        # one-off reads: the status reply comes after our timeout, during the next read
        term.delay_once[(ADDRS[0], STATUS)] = 1.6 * timeout
        frame, why = await asyncio.wait_for(s.read(ADDRS[0], STATUS), WAIT)
        assert (frame, why) == (None, "timeout")
        frame, why = await asyncio.wait_for(s.read(ADDRS[0], BLOCK), WAIT)
        assert why == "ok" and decode_reply(frame).values == term.meters[ADDRS[0]].registers
        assert s.stats.stale == 1
        # in a cycle: meter 1's late block reply arrives while meter 2's block is asked
        term.delay_once[(ADDRS[0], BLOCK)] = 1.6 * timeout
        b = await asyncio.wait_for(s.run_cycle(), WAIT)
        assert b.outcome.tolist() == [OUTCOME_TIMEOUT, OUTCOME_OK, OUTCOME_OK]  # no retries
        assert b.registers[1:].tolist() == [list(m.registers) for m in meters()[1:]]
        assert b.registers[0].tolist() == [-1] * 5
        assert s.stats.stale == 2 and s.stats.timeouts == 2

    term = FakeTerminal(meters())
    run(with_session(term, body, timeout_s=timeout, retries=0))
    # with retries the cycle still ends ok: the late meter is asked again at the end
    term = FakeTerminal(meters())

    async def body2(s: Dlt645Session) -> None:
        term.delay_once[(ADDRS[0], BLOCK)] = 1.6 * timeout
        assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), meters())
        assert s.stats.stale == 1
        assert [r.address for r in term.requests if r.di == BLOCK] == [
            ADDRS[0], ADDRS[1], ADDRS[2], ADDRS[0]]

    run(with_session(term, body2, timeout_s=timeout, retries=1))


def test_terminal_without_meters_still_ends_its_cycle() -> None:
    async def main() -> None:
        term = FakeTerminal([])
        port = await term.start()
        sink = TimedSink()
        s = Dlt645Session(plan("T-EMPTY", port, []), collector_config(), sink, phase_s=3600.0)
        s.start()
        try:
            await wait_until(lambda: s.online)
            b = await asyncio.wait_for(s.run_cycle(), WAIT)
            assert len(b) == 0 and b.terminal == "T-EMPTY" and sink.batches == [b]
            assert term.requests == []
        finally:
            await s.stop()
            await term.close()

    run(main())


# --- the dial-in listener ---------------------------------------------------------------------


async def dial_collector(tids: list[str], *, heartbeat_s: float = 0.0, n: int = 3,
                         cfg: CollectorConfig | None = None) -> tuple[Collector, TimedSink]:
    hold = PortHold()
    terms = {t: plan(t, 0, ADDRS[:n], mode="dial", heartbeat_s=heartbeat_s) for t in tids}
    sink = TimedSink()
    base = cfg or collector_config()
    col = Collector(Archive(terms, "test"), dataclasses.replace(base, dialin_port=hold.release()),
                    sink)
    await col.start()
    return col, sink


def test_unknown_or_bad_registration_is_rejected() -> None:
    async def main() -> None:
        cfg = dataclasses.replace(collector_config(), registration_timeout_s=0.3)
        col, sink = await dial_collector(["D-ONE"], cfg=cfg)
        assert col.listener is not None
        term = FakeTerminal(meters())
        try:
            conn = await dial(term, col.listener.port, "D-NOPE")
            await asyncio.wait_for(conn.lost, WAIT)  # closed by the collector
            ev = sink.kinds("rejected")
            assert [e.terminal for e in ev] == ["D-NOPE"] and "not in the archive" in ev[0].detail
            # not a registration line; and no line at all within registration_timeout_s
            loop = asyncio.get_running_loop()
            _t, c2 = await loop.create_connection(lambda: _raw(term, b"HELLO\r\n"),
                                                  "127.0.0.1", col.listener.port)
            _t, c3 = await loop.create_connection(lambda: _raw(term, b""), "127.0.0.1",
                                                  col.listener.port)
            await asyncio.wait_for(asyncio.gather(c2.lost, c3.lost), WAIT)
            details = [e.detail for e in sink.kinds("rejected")]
            assert len(details) == 3
            assert any("not a registration packet" in d for d in details)
            assert any("no registration packet in time" in d for d in details)
            assert not col.sessions["D-ONE"].online and sink.kinds("up") == []
            assert col.listener.rejected == 3
        finally:
            await col.stop()
            await term.close()

    run(main())


def _raw(term: FakeTerminal, first: bytes) -> Any:
    from collect_helpers import FakeConn

    return FakeConn(term, first)


def test_second_connection_of_a_terminal_replaces_the_first() -> None:
    async def main() -> None:
        col, sink = await dial_collector(["D-ONE"])
        assert col.listener is not None
        s = col.sessions["D-ONE"]
        t1, t2 = FakeTerminal(meters()), FakeTerminal(meters())
        try:
            c1 = await dial(t1, col.listener.port, "D-ONE")
            await wait_until(lambda: s.online)
            assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), meters())
            c2 = await dial(t2, col.listener.port, "D-ONE", firmware="FAKE-2.0")
            await asyncio.wait_for(c1.lost, WAIT)  # the stale one is closed
            assert [e.kind for e in sink.events if e.is_link] == [
                "registration", "up", "registration", "replaced"]
            n1 = len(t1.requests)
            assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), meters())
            assert len(t1.requests) == n1 and len(t2.requests) == 6
            assert s.online and not c2.closed and sink.kinds("down") == []
            assert "FAKE-2.0" in sink.kinds("registration")[1].detail
        finally:
            await col.stop()
            await t1.close()
            await t2.close()

    run(main())


@pytest.mark.parametrize("split", [False, True])
def test_heartbeats_between_frames_are_stripped(split: bool) -> None:
    async def main() -> None:
        col, sink = await dial_collector(["D-HB"])
        assert col.listener is not None
        s = col.sessions["D-HB"]
        term = FakeTerminal(meters())
        term.heartbeat = b"$HB,D-HB,17\r\n"
        term.heartbeat_split = split
        try:
            await dial(term, col.listener.port, "D-HB")
            await wait_until(lambda: s.online)
            for _ in range(3):
                assert_cycle_ok(await asyncio.wait_for(s.run_cycle(), WAIT), meters())
            assert s.stats.bad_frames == 0 and s.stats.stale == 0 and s.stats.timeouts == 0
            assert sink.kinds("down") == [] and len(sink.kinds("up")) == 1
            assert s.stats.discarded == 0  # packets, whole or cut, never reach the frame reader
        finally:
            await col.stop()
            await term.close()

    run(main())


def test_heartbeat_missed_when_a_dtu_goes_quiet() -> None:
    async def main() -> None:
        hb = 0.1
        cfg = dataclasses.replace(collector_config(), heartbeat_grace=2.5, heartbeat_down_after=2)
        col, sink = await dial_collector(["D-Q"], heartbeat_s=hb, n=1, cfg=cfg)
        assert col.listener is not None
        term = FakeTerminal(meters(1))
        try:
            conn = await dial(term, col.listener.port, "D-Q")
            for seq in range(1, 11):  # a second of heartbeats on time: nothing missed
                conn.write(f"$HB,D-Q,{seq}\r\n".encode())
                await asyncio.sleep(hb)
            assert sink.kinds("heartbeat_missed") == []
            assert col.sessions["D-Q"].stats.discarded == 0
            await wait_until(lambda: sink.kinds("heartbeat_missed"), what="heartbeat_missed")
            assert "heartbeat every 0.1 s" in sink.kinds("heartbeat_missed")[0].detail
            await wait_until(lambda: sink.kinds("down"), what="down after missed heartbeats")
            assert "heartbeats missed" in sink.kinds("down")[0].detail
            await asyncio.wait_for(conn.lost, WAIT)
        finally:
            await col.stop()
            await term.close()

    run(main())



