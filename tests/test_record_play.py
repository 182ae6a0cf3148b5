"""Capture replay (`meterstream record play`): a converted slice of the recorded year, served over
real TCP on loopback to a real Collector, reads back exactly the converted registers, and the
recorded gaps come back as missed reads (timeouts)."""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from meterstream.capture import read_capture
from meterstream.collectors.archive import load_archive
from meterstream.collectors.batch import OUTCOME_OK, OUTCOME_TIMEOUT
from meterstream.collectors.collector import Collector, phase_of
from meterstream.collectors.config import parse_collector_config
from meterstream.collectors.sink import MemorySink
from meterstream.recording.convert import METER_STEP_NS, ZONE_OFFSET_S, convert_lcl
from meterstream.recording.play import ArrayBook, Player, ReadBook

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "lcl_slice.csv"
# (meter id, half-hour start) rows removed from the slice: recorded gaps
GAPS = {("MAC000003", "2013-01-01 05:00:00"), ("MAC000003", "2013-01-01 05:30:00"),
        ("MAC000004", "2013-01-02 12:00:00"), ("MAC000002", "2013-01-03 20:30:00")}


def slice_with_gaps(tmp: Path) -> Path:
    lines = SLICE.read_bytes().split(b"\n")
    keep = [ln for ln in lines if tuple(ln.decode().split(",")[:2]) not in GAPS]
    assert len(lines) - len(keep) == len(GAPS)
    out = tmp / "slice_gaps.csv"
    out.write_bytes(b"\n".join(keep))
    return out


def centi(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * 100 + int((frac + "00")[:2])


def expected(readings: Path) -> dict[str, dict[int, tuple[int, ...]]]:
    """slot wall second -> meter -> (total, t1..t4) in 0.01 kWh, from readings.csv."""
    out: dict[str, dict[int, tuple[int, ...]]] = {}
    with open(readings, newline="") as fh:
        for row in csv.DictReader(fh):
            regs = tuple(centi(row[k]) for k in ("total", "t1", "t2", "t3", "t4"))
            out.setdefault(row["ts"], {})[int(row["meter"])] = regs
    return out


def slot_ns(ts: str) -> int:
    wall = int((datetime.fromisoformat(ts) - datetime(1970, 1, 1)).total_seconds())
    return (wall - ZONE_OFFSET_S) * 1_000_000_000


async def _replay(tmp: Path) -> None:
    conv = convert_lcl(tmp / "conv", data_path=slice_with_gaps(tmp))
    assert conv.missed == len(GAPS) and conv.replies == 432 - len(GAPS)
    cap = read_capture(conv.paths["capture"])
    exp = expected(conv.paths["readings"])
    meters = [int(a) for a in cap.terminals[0]["meters"]]
    player = Player(cap, speed=0.0, port_base=0)
    assert isinstance(player.books[0], ArrayBook)  # one frame a record: the vectorised index
    async with player:
        player.write_archive(tmp / "play" / "a.csv")
        archive = load_archive(tmp / "play" / "a.csv")
        cfg = parse_collector_config({"collector": {
            "cycle_s": 86400.0, "timeout_s": 0.15, "retries": 0, "clock_every": 0,
            "demote_after": 1000}, "dialin": {"enabled": False}})
        assert phase_of("TRM0001", cfg.poll_for("TRM0001").cycle_s) > 3600  # no timer cycle
        sink = MemorySink()
        collector = Collector(archive, cfg, sink)
        await collector.start()
        session = collector.sessions["TRM0001"]
        try:
            for _ in range(400):
                if session.online:
                    break
                await asyncio.sleep(0.01)
            assert session.online
            # every half-hour read of the three days, gaps included
            slots = sorted({s for s in exp} | {g for g in _gap_slots()})
            seen_gaps = 0
            for ts in slots:
                # after the last meter's recorded request of this read, before the next read
                player.clock.set(slot_ns(ts) + len(meters) * METER_STEP_NS)
                batch = await asyncio.wait_for(session.run_cycle(), 10)
                if not session.online:  # a whole read silent: the link dropped; wait for it
                    for _ in range(600):
                        if session.online:
                            break
                        await asyncio.sleep(0.01)
                rows = {int(m): i for i, m in enumerate(batch.meter.tolist())}
                for m in meters:
                    want = exp.get(ts, {}).get(m)
                    i = rows[m]
                    if want is None:
                        assert batch.outcome[i] == OUTCOME_TIMEOUT, (ts, m)
                        assert (batch.registers[i] == -1).all()
                        seen_gaps += 1
                    else:
                        assert batch.outcome[i] == OUTCOME_OK, (ts, m)
                        assert tuple(batch.registers[i].tolist()) == want, (ts, m)
                        assert batch.status[i] == 0  # relay closed, as recorded
            assert seen_gaps == len(GAPS)
            assert player.stats.silent == len(GAPS)
        finally:
            await collector.stop()


def _gap_slots() -> set[str]:
    """readings.csv's ts of each gap (the end of the missing half hour)."""
    return {(datetime.fromisoformat(start) + timedelta(minutes=30)).isoformat()
            for _, start in GAPS}


def test_replay_slice_through_collector(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_replay(tmp_path), 90))


def test_before_first_read_is_silent(tmp_path: Path) -> None:
    async def go() -> None:
        conv = convert_lcl(tmp_path / "c", data_path=SLICE)
        cap = read_capture(conv.paths["capture"])
        player = Player(cap, speed=0.0, port_base=0)
        book = player.books[0]
        key = (bytes.fromhex("440100000000")[::-1], 0x11, b"\x00\xff\x01\x00")
        assert book.answer(key, player.first_ns - 1) is None
        first = book.answer(key, player.first_ns + 10**9)
        assert first is not None and first.startswith(b"\xfe\xfe\x68")
        # the last read keeps answering after the end of the recording
        last = book.answer(key, player.last_ns)
        assert last is not None and last != first
        assert book.answer(key, player.last_ns + 10**15) == last

    asyncio.run(go())


@pytest.mark.slow
def test_play_cli_with_collect(tmp_path: Path) -> None:
    """The commands as a user runs them: `record play` in one process, `collect` in another."""
    exe = [sys.executable, "-m", "meterstream"]
    conv = tmp_path / "conv"
    subprocess.run(exe + ["convert-lcl", "--data", str(SLICE), "--out", str(conv)], check=True,
                   capture_output=True)
    play = subprocess.Popen(exe + ["record", "play", "--capture", str(conv / "traffic.cap"),
                                   "--speed", "600", "--port-base", "0",
                                   "--write-archive", str(tmp_path / "p" / "a.csv")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert play.stdout is not None
        line = ""
        while "serving" not in line:  # "serving ..." once the archive is written
            line = play.stdout.readline()
            assert line, play.stderr.read() if play.stderr else "play ended"
        cfg = tmp_path / "c.toml"
        cfg.write_text("[collector]\ncycle_s = 0.5\ntimeout_s = 0.5\nclock_every = 0\n"
                       "[dialin]\nenabled = false\n")
        out = subprocess.run(exe + ["collect", "--archive", str(tmp_path / "p" / "a.csv"),
                                    "--config", str(cfg), "--cycles", "4"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
    finally:
        play.terminate()
        play.wait(10)
    exp = expected(conv / "readings.csv")
    allowed: dict[int, set[tuple[int, ...]]] = {}
    for per in exp.values():
        for m, regs in per.items():
            allowed.setdefault(m, set()).add(regs)
    import json

    rows = 0
    for ln in out.stdout.splitlines():
        obj = json.loads(ln)
        if obj.get("type") != "batch":
            continue
        for r in obj["readings"]:
            if r["outcome"] == "ok":
                regs = tuple(centi(r[k]) for k in ("total", "t1", "t2", "t3", "t4"))
                assert regs in allowed[int(r["meter"])]
                rows += 1
    assert rows >= 3


def test_dtu_dials_in_and_is_read(tmp_path: Path) -> None:
    """A DTU of the capture dials the collector, registers, and its meters read as recorded."""

    async def go() -> None:
        from collect_helpers import PortHold

        conv = convert_lcl(tmp_path / "c", data_path=SLICE, dial_every=1)
        cap = read_capture(conv.paths["capture"])
        assert cap.terminals[0]["mode"] == "dial"
        exp = expected(conv.paths["readings"])
        hold = PortHold()
        port = hold.release()
        cfg = parse_collector_config({"collector": {
            "cycle_s": 86400.0, "timeout_s": 0.3, "retries": 0, "clock_every": 0},
            "dialin": {"port": port}})
        player = Player(cap, speed=0.0, collector=("127.0.0.1", port))
        sink = MemorySink()
        collector = Collector(load_archive(conv.paths["archive"]), cfg, sink)
        await collector.start()
        session = collector.sessions["TRM0001"]
        async with player:
            try:
                for _ in range(500):
                    if session.online:
                        break
                    await asyncio.sleep(0.01)
                assert session.online
                assert any(e.kind == "registration" for e in sink.events)
                for ts in sorted(exp)[:6]:
                    player.clock.set(slot_ns(ts) + 3 * METER_STEP_NS)
                    batch = await asyncio.wait_for(session.run_cycle(), 10)
                    got = {int(m): tuple(r) for m, r in zip(batch.meter.tolist(),
                                                            batch.registers.tolist())}
                    assert got == exp[ts]
            finally:
                await collector.stop()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_books_from_chunked_live_traffic(tmp_path: Path) -> None:
    """Frames split over records, two frames in one record, FE runs, garbage and a DTU packet
    (as a live capture has them) index the same as one frame a record."""
    from meterstream.capture import TO_COLLECTOR, TO_FIELD, CaptureWriter
    from meterstream.collectors.dlt645 import ENERGY_BLOCK_DI, encode_read, encode_read_reply

    a, b = "440100000000", "440100000001"
    ra, rb = encode_read(a, ENERGY_BLOCK_DI, preamble=2), encode_read(b, ENERGY_BLOCK_DI, preamble=0)
    pa = encode_read_reply(a, ENERGY_BLOCK_DI, bytes.fromhex("11223344" * 5), preamble=4)
    pb = encode_read_reply(b, ENERGY_BLOCK_DI, bytes.fromhex("01020304" * 5), preamble=0)
    p = tmp_path / "live.cap"
    with CaptureWriter(p) as w:
        t = w.terminal("D1", ts_ns=0, mode="dial")
        w.write(t, TO_COLLECTOR, b"$REG,D1,FW\r\n", ts_ns=1)
        w.write(t, TO_FIELD, ra + rb, ts_ns=10)  # both requests in one record
        w.write(t, TO_COLLECTOR, pa[:7], ts_ns=20)  # a reply cut in two
        w.write(t, TO_COLLECTOR, pa[7:] + b"\x00junk$HB,D1,1\r\n", ts_ns=21)
        w.write(t, TO_COLLECTOR, pb, ts_ns=30)
        w.write(t, TO_FIELD, ra, ts_ns=40)  # asked again, never answered: a missed read
    book = Player(read_capture(p), speed=0.0).books[0]
    assert isinstance(book, ReadBook)  # frames across records: the frame reader's index
    key_a = (bytes.fromhex(a)[::-1], 0x11, b"\x00\xff\x01\x00")
    key_b = (bytes.fromhex(b)[::-1], 0x11, b"\x00\xff\x01\x00")
    assert book.answer(key_a, 35) == b"\xfe\xfe" + pa[4:]  # served with 2 FE
    assert book.answer(key_b, 35) == b"\xfe\xfe" + pb
    assert book.answer(key_a, 45) is None  # the later read of `a` got no reply
    assert book.answer(key_b, 45) == b"\xfe\xfe" + pb
