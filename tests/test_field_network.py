"""The simulated field over real TCP on loopback (ephemeral ports): a plain socket client with
the codec's encoders and FrameReader, a dial-out DTU received by a test server, Modbus read
with pymodbus's client, faults on the bus, and link outages. No collector code, no timing
asserts: waits have generous timeouts and only bound how long a failure takes."""

from __future__ import annotations

import asyncio
import copy
import socket
import struct
import tomllib
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from meterfield.config import parse_config
from meterfield.field import Field
from meterfield.fleet import P2007
from meterfield.modbus import quantities
from meterfield.terminals import heartbeat_packet, registration_packet
from meterstream.collectors.dlt645 import (
    AckReply,
    ControlAction,
    Credentials,
    Frame,
    FrameReader,
    ReadReply,
    decode_reply,
    encode_control,
    encode_read,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "field-test.toml"
FAR = datetime(2099, 12, 31, 23, 59, 59)
WAIT = 10.0  # seconds: only how long a failing test takes to fail


def make_field(mutate: Callable[[dict[str, Any]], None] | None = None) -> Field:
    doc = copy.deepcopy(tomllib.loads(CONFIG.read_text()))
    if mutate:
        mutate(doc)
    return Field(parse_config(doc, str(CONFIG), CONFIG.parent))


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


class Client:
    """A collector's side of a transparent DL/T 645 channel: a plain non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.frames: list[Frame] = []
        self.errors: list[Any] = []
        self.packets: list[bytes] = []  # '$' lines of a DTU, stripped from the stream
        self._line = b""

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, (host, port))
        except OSError:
            s.close()
            raise
        return cls(s)

    def close(self) -> None:
        self.sock.close()

    def _take(self, data: bytes) -> None:
        # Strip "$...\r\n" lines (they only come between replies) before the frame reader.
        buf = self._line + data
        self._line = b""
        out = bytearray()
        while buf:
            if buf[:1] == b"$":
                end = buf.find(b"\n")
                if end < 0:
                    self._line = buf
                    break
                self.packets.append(buf[: end + 1])
                buf = buf[end + 1:]
                continue
            nxt = buf.find(b"$")
            if nxt < 0 or self.reader.buffered or not _between_frames(buf[:nxt]):
                out += buf
                break
            out += buf[:nxt]
            buf = buf[nxt:]
        for item in self.reader.feed(bytes(out)):
            (self.frames if isinstance(item, Frame) else self.errors).append(item)

    async def recv(self, timeout: float = WAIT) -> bool:
        """Read once; False at end of stream."""
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        if not data:
            return False
        self._take(data)
        return True

    async def send(self, request: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, request)

    async def frame(self, timeout: float = WAIT) -> Frame:
        while not self.frames:
            if not await self.recv(timeout):
                raise EOFError
        return self.frames.pop(0)

    async def ask(self, request: bytes) -> Any:
        await self.send(request)
        return decode_reply(await self.frame())


def _between_frames(chunk: bytes) -> bool:
    """True when `chunk` ends a whole number of frames (so a '$' after it starts a packet)."""
    probe = FrameReader()
    probe.feed(chunk)
    return probe.buffered == 0


async def connect(f: Field, terminal: str) -> Client:
    _mode, host, port = f.endpoints()[terminal]
    return await Client.connect(host, port)


def meters_2007(f: Field, terminal: str) -> list[int]:
    fl = f.fleet
    return [int(i) for i in fl.terminal_by_id(terminal).meters
            if fl.protocol[i] == P2007 and fl.role[i] == 0]


def test_read_trip_and_close_over_tcp() -> None:
    async def main() -> None:
        f = make_field()
        async with f:
            c = await connect(f, "A001-C001")
            i = next(m for m in meters_2007(f, "A001-C001") if f.bank.prepaid[m] == 0
                 or f.bank.money_uy[m] > 0)
            a = f.address(i)
            r = await c.ask(encode_read(a, 0x0001FF00))
            assert isinstance(r, ReadReply) and r.values == f.bank.registers(i)
            r = await c.ask(encode_control(a, ControlAction.TRIP, FAR, Credentials()))
            assert isinstance(r, AckReply) and r.function == 0x1C
            (sw,) = (await c.ask(encode_read(a, 0x04000503))).values
            assert sw & 0x40 and not sw & 0x10  # command at once, relay after its delay
            f.advance(5)  # relay_delay_s
            (sw,) = (await c.ask(encode_read(a, 0x04000503))).values
            assert sw & 0x50 == 0x50
            r = await c.ask(encode_control(a, ControlAction.CLOSE_DIRECT, FAR, Credentials()))
            assert isinstance(r, AckReply)
            (sw,) = (await c.ask(encode_read(a, 0x04000503))).values
            assert sw & 0x50 == 0x10
            f.advance(5)
            (sw,) = (await c.ask(encode_read(a, 0x04000503))).values
            assert sw & 0x50 == 0
            assert f.summary()["requests"] == 7
            c.close()
    run(main())


def test_registers_advance_with_a_fast_clock() -> None:
    async def main() -> None:
        f = make_field(lambda d: d["field"].update(speed=3600.0, tick_s=0.02))
        async with f:
            c = await connect(f, "A001-S002")
            a = f.address(meters_2007(f, "A001-S002")[0])
            first = (await c.ask(encode_read(a, 0x0001FF00))).values
            for _ in range(500):  # a simulated hour takes a real second
                await asyncio.sleep(0.02)
                now = (await c.ask(encode_read(a, 0x0001FF00))).values
                if now[0] > first[0]:
                    break
            assert now[0] > first[0] and now[0] == sum(now[1:])
            c.close()
    run(main())


def test_dtu_dials_out_registers_and_heartbeats() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

        async def on_dtu(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await accepted.put((r, w))

        server = await asyncio.start_server(on_dtu, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        f = make_field(lambda d: d["collector"].update(port=port))
        async with f:
            assert f.endpoints()["A001-D003"] == ("dial", "127.0.0.1", port)
            seen: dict[bytes, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
            while len(seen) < 2:  # both areas' DTUs
                r, w = await asyncio.wait_for(accepted.get(), WAIT)
                line = await asyncio.wait_for(r.readline(), WAIT)
                seen[line] = (r, w)
            reg = registration_packet("A001-D003", "MF-DTU-1.0")
            assert reg == b"$REG,A001-D003,MF-DTU-1.0\r\n" and reg in seen
            r, w = seen[reg]
            assert await asyncio.wait_for(r.readline(), WAIT) == heartbeat_packet("A001-D003", 1)
            assert await asyncio.wait_for(r.readline(), WAIT) == b"$HB,A001-D003,2\r\n"
            # the collector reads a meter over the DTU's connection
            i = meters_2007(f, "A001-D003")[0]
            w.write(encode_read(f.address(i), 0x0001FF00))
            reader = FrameReader()
            frames: list[Frame] = []
            while not frames:
                chunk = await asyncio.wait_for(r.read(4096), WAIT)
                assert chunk
                while chunk.startswith(b"$"):  # heartbeats only come between replies
                    chunk = chunk[chunk.index(b"\n") + 1:]
                frames += [x for x in reader.feed(chunk) if isinstance(x, Frame)]
            assert decode_reply(frames[0]).values == f.bank.registers(i)
            # the collector hangs up: the DTU comes back and registers again
            w.close()
            while True:
                r2, w2 = await asyncio.wait_for(accepted.get(), WAIT)
                if await asyncio.wait_for(r2.readline(), WAIT) == reg:
                    break
            assert f.stats.registrations >= 3 and f.stats.heartbeats >= 2
            w2.close()
            # an outage keeps it away; the restoration brings it back
            f.outage(terminal="A001-D003")
            await f.settle_links()
            assert not f.terminals["A001-D003"].up
            f.restore(terminal="A001-D003")
            await f.settle_links()
            while True:
                r3, w3 = await asyncio.wait_for(accepted.get(), WAIT)
                if await asyncio.wait_for(r3.readline(), WAIT) == reg:
                    break
            w3.close()
        server.close()
    run(main())


def test_dtu_retries_while_the_collector_is_gone() -> None:
    async def main() -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        f = make_field(lambda d: d["collector"].update(port=port))
        async with f:
            for _ in range(500):
                await asyncio.sleep(0.02)
                if f.stats.dial_failures >= 4:
                    break
            assert f.stats.dial_failures >= 4
            got: asyncio.Queue[bytes] = asyncio.Queue()

            async def on_dtu(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await got.put(await r.readline())
                w.close()

            server = await asyncio.start_server(on_dtu, "127.0.0.1", port, reuse_address=True)
            line = await asyncio.wait_for(got.get(), WAIT)
            assert line.startswith(b"$REG,A00")
            server.close()
    run(main())


def test_modbus_gateway_maps_follow_the_live_registers() -> None:
    from pymodbus.client import AsyncModbusTcpClient

    async def main() -> None:
        f = make_field()
        async with f:
            f.advance(300)
            _m, host, port = f.endpoints()["A001-G004"]
            client = AsyncModbusTcpClient(host, port=port)
            assert await client.connect()
            spec = f.fleet.terminal_by_id("A001-G004")
            by_unit = {int(f.fleet.unit[i]): int(i) for i in spec.meters}
            names = {u: f.fleet.map_names[f.fleet.modbus_map[i]] for u, i in by_unit.items()}
            assert names[1] == "sdm630" and names[2] == "dtsu666"

            def f32(regs: list[int], k: int) -> float:
                return struct.unpack(">f", struct.pack(">HH", regs[k], regs[k + 1]))[0]

            i = by_unit[1]
            q = quantities(f.bank, i, f.now())
            rr = await client.read_input_registers(0x0000, count=0x4C, device_id=1)
            assert not rr.isError()
            regs = rr.registers
            assert f32(regs, 0x00) == pytest.approx(f.bank.voltage_dv(i, 0, f.now()) / 10, rel=1e-6)
            assert f32(regs, 0x06) == pytest.approx(q["current_a"], rel=1e-6)
            assert f32(regs, 0x34) == pytest.approx(float(f.bank.power_w[i]), rel=1e-6)
            assert f32(regs, 0x46) == pytest.approx(q["frequency"], rel=1e-6)
            assert f32(regs, 0x48) == pytest.approx(f.bank.registers(i)[0] / 100, rel=1e-6)
            assert f32(regs, 0x4A) == 0.0
            rr = await client.read_input_registers(0x0156, count=2, device_id=1)
            assert f32(rr.registers, 0) == pytest.approx(f.bank.registers(i)[0] / 100, rel=1e-6)

            j = by_unit[2]
            q = quantities(f.bank, j, f.now())
            rr = await client.read_holding_registers(0x2006, count=0x14, device_id=2)
            assert not rr.isError()
            regs = rr.registers
            assert f32(regs, 0) == pytest.approx(f.bank.voltage_dv(j, 0, f.now()), rel=1e-6)  # V x 10
            assert f32(regs, 0x200C - 0x2006) == pytest.approx(q["current_a"] * 1000, rel=1e-6)
            assert f32(regs, 0x2012 - 0x2006) == pytest.approx(float(f.bank.power_w[j]) * 10, rel=1e-6)
            rr = await client.read_holding_registers(0x101E, count=2, device_id=2)
            before = f32(rr.registers, 0)
            assert before == pytest.approx(f.bank.registers(j)[0] / 100, rel=1e-6)
            f.advance(7200)  # registers move: so do the Modbus values
            rr = await client.read_holding_registers(0x101E, count=2, device_id=2)
            after = f32(rr.registers, 0)
            assert after > before
            assert after == pytest.approx(f.bank.registers(j)[0] / 100, rel=1e-6)
            rr = await client.read_holding_registers(0x1028, count=2, device_id=2)
            assert f32(rr.registers, 0) == 0.0
            # a map's registers are not in the other table
            rr = await client.read_holding_registers(0x0000, count=2, device_id=1)
            assert rr.isError()
            client.close()
    run(main())


def test_outage_closes_a_listening_terminal_and_it_comes_back() -> None:
    async def main() -> None:
        f = make_field()
        async with f:
            c = await connect(f, "A001-C001")
            a = f.address(meters_2007(f, "A001-C001")[0])
            assert isinstance(await c.ask(encode_read(a, 0x0001FF00)), ReadReply)
            f.outage(terminal="A001-C001", duration_s=600)
            await f.settle_links()
            assert "A001-C001" in f.down() and not f.terminals["A001-C001"].up
            try:
                alive = await c.recv()
            except OSError:  # reset by peer
                alive = False
            assert not alive
            c.close()
            with pytest.raises(OSError):
                await connect(f, "A001-C001")
            f.advance(599)
            await f.settle_links()
            assert "A001-C001" in f.down()
            f.advance(1)  # the outage is over in simulated time
            await f.settle_links()
            c = await connect(f, "A001-C001")
            assert isinstance(await c.ask(encode_read(a, 0x0001FF00)), ReadReply)
            c.close()
    run(main())


def test_area_outage_takes_every_terminal_of_the_area() -> None:
    async def main() -> None:
        f = make_field()
        async with f:
            f.outage(area="A002")
            await f.settle_links()
            area2 = {t for t in f.terminals if t.startswith("A002-")}
            assert f.down() == area2
            for t in ("A002-C001", "A002-S002", "A002-G004"):
                with pytest.raises(OSError):
                    await connect(f, t)
            c = await connect(f, "A001-C001")  # the other area is unaffected
            c.close()
            assert f.summary()["outages"] == len(area2)
            f.restore(area="A002")
            await f.settle_links()
            for t in ("A002-C001", "A002-G004"):
                (await connect(f, t)).close()
    run(main())


def test_scheduled_outage_from_the_config() -> None:
    async def main() -> None:
        f = make_field(lambda d: d.update(outages=[{"terminal": "A001-S002", "at_s": 60.0,
                                                    "duration_s": 120.0}]))
        async with f:
            (await connect(f, "A001-S002")).close()
            f.advance(60)
            await f.settle_links()
            with pytest.raises(OSError):
                await connect(f, "A001-S002")
            f.advance(120)
            await f.settle_links()
            (await connect(f, "A001-S002")).close()
    run(main())


def _bus(**keys: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        d["terminals"][0]["bus"] = keys
    return mutate


def test_faults_no_reply_and_corrupted_reply() -> None:
    async def main() -> None:
        f = make_field(_bus(p_no_reply=1.0))
        async with f:
            c = await connect(f, "A001-C001")
            a = f.address(meters_2007(f, "A001-C001")[0])
            await c.send(encode_read(a, 0x0001FF00))
            with pytest.raises(asyncio.TimeoutError):
                await c.frame(timeout=0.3)
            assert f.stats.dropped == 1
            c.close()
        f = make_field(_bus(p_corrupt=1.0))
        async with f:
            c = await connect(f, "A001-C001")
            for _ in range(5):
                await c.send(encode_read(a, 0x0001FF00))
            while not c.errors:
                await c.recv()
            assert c.frames == []  # one flipped byte is always caught (checksum, L or end byte)
            assert f.stats.corrupted == 5
            c.close()
    run(main())


def test_half_duplex_bus_with_pacing_answers_in_order_and_late_replies_come_late() -> None:
    async def main() -> None:
        f = make_field(_bus(pacing=True, turnaround_ms=[1.0, 3.0], preamble=4))
        async with f:
            c = await connect(f, "A001-C001")
            ms = meters_2007(f, "A001-C001")[:3]
            await c.send(b"".join(encode_read(f.address(i), 0x0001FF00) for i in ms))
            got = [decode_reply(await c.frame()) for _ in ms]
            assert [r.address for r in got] == [f.address(i) for i in ms]
            c.close()
        f = make_field(_bus(p_late=1.0, late_s=0.2))
        async with f:
            c = await connect(f, "A001-C001")
            a = f.address(meters_2007(f, "A001-C001")[0])
            r = await c.ask(encode_read(a, 0x0001FF00))
            assert isinstance(r, ReadReply) and f.stats.late == 1
            c.close()
    run(main())
