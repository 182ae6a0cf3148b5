"""The recording proxy between a real Collector and the simulated field over loopback: listening
terminals through the proxy's ports, DTUs dialling the proxy, which relays them to the
collector's dial-in port. What the collector read must be exactly what the capture holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from collect_helpers import HOST, PortHold, collector_config, make_field, wait_until

from meterstream.capture import CLOSE, OPEN, TO_COLLECTOR, TO_FIELD, CaptureWriter, read_capture
from meterstream.collectors.archive import load_archive
from meterstream.collectors.batch import OUTCOME_OK
from meterstream.collectors.collector import Collector
from meterstream.collectors.dlt645 import Frame, FrameReader, decode_energy_blocks
from meterstream.collectors.sink import MemorySink
from meterstream.recording.proxy import RecordingProxy


def frames(data: bytes) -> list[Frame]:
    return [f for f in FrameReader().feed(data) if isinstance(f, Frame)]


async def record_field(tmp: Path, cap_path: Path) -> MemorySink:
    dtu_hold, coll_hold = PortHold(), PortHold()
    field = make_field(collector_port=dtu_hold.port)
    async with field:
        field.write_archive(tmp / "field.csv")
        writer = CaptureWriter(cap_path, meta={"test": True})
        proxy = RecordingProxy(load_archive(tmp / "field.csv"), writer,
                               dial_listen=(HOST, dtu_hold.release()),
                               dial_to=(HOST, coll_hold.port))
        await proxy.start()
        proxy.write_archive(tmp / "field.csv", tmp / "via-proxy.csv")
        archive = load_archive(tmp / "via-proxy.csv")
        archive.terminals = {k: v for k, v in archive.terminals.items() if v.protocol != "modbus"}
        for tid, plan in archive.terminals.items():  # the collector only knows the proxy
            if plan.mode == "listen":
                assert plan.port == proxy.ports[tid]
        sink = MemorySink()
        collector = Collector(archive, collector_config(dialin_port=coll_hold.release()), sink)
        await collector.start()
        try:
            await wait_until(lambda: all(s.online for s in collector.sessions.values()),
                             what="every terminal online through the proxy")
            for _ in range(2):
                field.advance(1800)  # registers move between the two cycles
                await asyncio.gather(*(s.run_cycle() for s in collector.sessions.values()))
        finally:
            await collector.stop()
            await asyncio.sleep(0.05)
            await proxy.stop()
            writer.close()
    return sink


@pytest.mark.slow
def test_proxy_records_what_the_collector_read(tmp_path: Path) -> None:
    cap_path = tmp_path / "run.cap"
    sink = asyncio.run(asyncio.wait_for(record_field(tmp_path, cap_path), 60))
    cap = read_capture(cap_path)
    assert cap.damage == "" and cap.meta["test"] is True
    ids = {t["id"]: i for i, t in enumerate(cap.terminals)}
    batches = [b for b in sink.batches if len(b)]
    assert {b.terminal for b in batches} <= set(ids)
    assert any(cap.terminals[ids[b.terminal]]["mode"] == "dial" for b in batches)  # DTUs too
    for tid, t in ids.items():
        if cap.terminals[t].get("protocol") == "modbus":
            continue
        kinds = set(cap.kind[cap.terminal == t].tolist())
        assert {OPEN, TO_FIELD, TO_COLLECTOR} <= kinds, tid
    assert CLOSE in set(cap.kind.tolist())
    for b in batches:
        t = ids[b.terminal]
        requests = frames(cap.stream(t, TO_FIELD))
        replies = [f for f in frames(cap.stream(t, TO_COLLECTOR)) if f.control == 0x91
                   and f.data[:4] == b"\x00\xff\x01\x00"]
        assert requests and all(not f.control & 0x80 for f in requests)
        values, ok = decode_energy_blocks(replies)
        recorded: dict[int, list[tuple[int, ...]]] = {}
        for f, v, good in zip(replies, values, ok):
            if good:
                recorded.setdefault(int(f.address), []).append(tuple(v.tolist()))
        for i, m in enumerate(b.meter.tolist()):
            if b.outcome[i] == OUTCOME_OK and (b.registers[i, 1:] >= 0).all():
                assert tuple(b.registers[i].tolist()) in recorded[int(m)], (b.terminal, m)
    # a DTU's stream starts with its registration line, byte for byte as it sent it
    dial = [t for t in ids.values() if cap.terminals[t]["mode"] == "dial"]
    assert dial
    first = cap.stream(dial[0], TO_COLLECTOR)
    assert first.startswith(f"$REG,{cap.terminals[dial[0]]['id']},".encode())
    assert np.all(np.diff(cap.ts[cap.kind != 1]) > -10**9)  # stamped as it passed


@pytest.mark.slow
def test_record_cli_as_a_user_runs_it(tmp_path: Path) -> None:
    """`meterstream sim`, `meterstream record` and `meterstream collect` in three processes, as
    docs/recording.md tells a user to run them; then `record export` of what was recorded."""
    import subprocess
    import sys
    import time

    exe = [sys.executable, "-m", "meterstream"]
    dtu_hold, coll_hold = PortHold(), PortHold()
    field_toml = tmp_path / "field.toml"
    text = (Path(__file__).resolve().parents[1] / "config" / "field-test.toml").read_text()
    field_toml.write_text(text.replace("port = 9700", f"port = {dtu_hold.port}")
                          .replace('speed = 0.0 ', 'speed = 1.0 '))
    coll_toml = tmp_path / "collector.toml"
    ctext = (Path(__file__).resolve().parents[1] / "config" / "collector.toml").read_text()
    coll_toml.write_text(ctext.replace("cycle_s = 60.0", "cycle_s = 1.0")
                         .replace("timeout_s = 2.0", "timeout_s = 0.5")
                         .replace("clock_every = 60", "clock_every = 0")
                         .replace("backoff_s = [1.0, 60.0]", "backoff_s = [0.1, 0.5]")
                         .replace("port = 9700", f"port = {coll_hold.port}"))
    procs: list[subprocess.Popen[str]] = []

    def start(args: list[str]) -> subprocess.Popen[str]:
        p = subprocess.Popen(exe + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    def wait_line(p: subprocess.Popen[str], word: str) -> None:
        assert p.stdout is not None
        while True:
            line = p.stdout.readline()
            assert line, p.stderr.read() if p.stderr else "ended"
            if word in line:
                return

    try:
        sim = start(["sim", "--config", str(field_toml), "--write-archive", str(tmp_path / "a.csv")])
        wait_line(sim, "archive:")
        dtu_port, coll_port = dtu_hold.release(), coll_hold.release()
        rec = start(["record", "--archive", str(tmp_path / "a.csv"), "--out",
                     str(tmp_path / "run.cap"), "--write-archive", str(tmp_path / "b.csv"),
                     "--dial-listen", f"{HOST}:{dtu_port}", "--dial-to", f"{HOST}:{coll_port}"])
        wait_line(rec, "recording to")
        out = subprocess.run(exe + ["collect", "--archive", str(tmp_path / "b.csv"), "--config",
                                    str(coll_toml), "--cycles", "3"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        time.sleep(0.3)
        rec.send_signal(2)
        rec.wait(10)
        assert rec.returncode == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    cap = read_capture(tmp_path / "run.cap")
    assert cap.damage == ""
    modes = {t["id"]: t["mode"] for t in cap.terminals}
    assert "dial" in modes.values() and "listen" in modes.values()
    ok_rows = out.stdout.count('"outcome":"ok"')
    assert ok_rows > 0
    replies = sum(len([f for f in frames(cap.stream(t, TO_COLLECTOR)) if f.control == 0x91])
                  for t in range(len(cap.terminals)))
    assert replies >= ok_rows
    r = subprocess.run(exe + ["record", "export", "--capture", str(tmp_path / "run.cap"),
                              "--pcap", str(tmp_path / "run.pcap")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "packets" in r.stdout
