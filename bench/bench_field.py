"""Simulated field serving speed: DL/T 645 energy-block reads over TCP at zero latency.

Target (issue): >= 40,000 read requests/s served on one core at zero latency (no pacing, no
turnaround). The field runs in its own process (uvloop when installed); the load client runs
in ANOTHER process with many concurrent connections, each keeping exactly one request
outstanding (half duplex), and counts whole replies. The baseline, measured in the same run on
the same connections by the same client, is a trivial asyncio server that answers every
received chunk with one fixed precomputed reply of the same length. Reported: wall rates of
both, their ratio, and the requests served per CPU second of each server process (the
"one core" figure: the client takes the other core); then a poll-cycle mix (energy block and
status word 3 of every meter, the status word computed afresh each time), and the same mix
with the field's remembered-request cache switched off (every frame through the codec's
reader, decoder and encoders), and "poll_fresh": 100,000 meters whose registers advance every
second, each read every few seconds, so that no reply bytes are reused (real polling). Also the
resident
memory of a
100,000-meter field and the time of one vectorised register tick over it. Figures, not asserts.

Run: .venv/bin/python bench/bench_field.py
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import socket
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median_rate, report

TERMINALS = 16
METERS_PER_TERMINAL = 64
CONNECTIONS = 64  # 4 per terminal
REQUESTS = 60_000  # per measured run
REPEATS = 5
BIG_AREAS, BIG_TERMINALS, BIG_METERS = 50, 4, 500  # 100,000 meters
DI_BLOCK = 0x0001FF00
DI_STATUS3 = 0x04000503  # computed afresh for every read (the relay state depends on time)


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run


FRESH_METERS_PER_TERMINAL = 6_250  # 100,000 meters: each read every few seconds at 40k/s ...
FRESH_TICK_S = 1.0  # ... while registers advance every second ...
FRESH_SPEED = 60.0  # ... by a simulated minute (one 60 s step, as in the demo); a meter is read
# every ~6 simulated minutes, so its registers have moved and every reply is encoded afresh


def bench_doc(areas: int = 1, per_area: int = TERMINALS, meters: int = METERS_PER_TERMINAL,
              tick_s: float = 1.0, speed: float = 1.0) -> dict[str, Any]:
    return {
        "field": {"seed": 1, "start": "2024-06-01T08:00:00", "speed": speed, "tick_s": tick_s},
        "areas": {"count": areas, "supply_meter": False},
        "bus": {"preamble": 0, "turnaround_ms": [0.0, 0.0]},
        "terminals": [{"kind": "concentrator", "per_area": per_area, "meters": meters}],
    }


def requests_per_terminal(dis: tuple[int, ...] = (DI_BLOCK,),
                          meters: int = METERS_PER_TERMINAL) -> list[list[bytes]]:
    """Per terminal, the read requests a connection cycles through: each DI of each meter."""
    from meterfield.config import parse_config
    from meterfield.fleet import generate_fleet
    from meterstream.collectors.dlt645 import encode_read

    fleet = generate_fleet(parse_config(bench_doc(meters=meters), "bench"))
    return [[encode_read(fleet.address_of(int(i)), di, preamble=0) for i in t.meters for di in dis]
            for t in fleet.terminals]


# --- the servers (child process) ------------------------------------------------------------------


class FixedReply(asyncio.Protocol):
    """Baseline: every chunk received gets the same precomputed reply."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.reply)


async def _serve(kind: str, reply: bytes, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    field = None
    servers = []
    if kind in ("field", "field-uncached", "field-fresh"):
        from meterfield.config import parse_config
        from meterfield.field import Field
        from meterfield.serving import Dlt645Port

        if kind == "field-uncached":  # every request through FrameReader, decoder and encoder
            Dlt645Port.remember = lambda self, wire, frame: None  # type: ignore[method-assign]

        doc = (bench_doc(meters=FRESH_METERS_PER_TERMINAL, tick_s=FRESH_TICK_S, speed=FRESH_SPEED)
               if kind == "field-fresh" else bench_doc())
        field = Field(parse_config(doc, "bench"))
        await field.start()
        ports = [field.endpoints()[t.id][2] for t in field.fleet.terminals]
    else:
        for _ in range(TERMINALS):
            s = await loop.create_server(lambda: FixedReply(reply), "127.0.0.1", 0)
            servers.append(s)
        ports = [s.sockets[0].getsockname()[1] for s in servers]
    pipe.send(ports)
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        if cmd == "cpu":
            pipe.send(time.process_time())
        elif cmd == "stop":
            break
    if field is not None:
        await field.stop()
    for s in servers:
        s.close()


def server_main(kind: str, reply: bytes, pipe: Connection) -> None:
    _runner()(_serve(kind, reply, pipe))


# --- the load client (another process) ------------------------------------------------------------


class Load(asyncio.Protocol):
    """One connection, one request outstanding; counts whole replies (length from their L byte:
    replies carry no preamble here)."""

    def __init__(self, requests: list[bytes], state: dict[str, Any]) -> None:
        self.requests = requests
        self.k = 0
        self.state = state
        self.buf = b""
        self.busy = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> None:
        self.busy = True
        self.state["outstanding"] += 1
        self.transport.write(self.requests[self.k])
        self.k = (self.k + 1) % len(self.requests)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        st = self.state
        while len(buf) >= 10 and len(buf) >= 12 + buf[9]:
            buf = buf[12 + buf[9]:]
            st["done"] += 1
            st["outstanding"] -= 1
            self.busy = False
        self.buf = buf
        if self.busy:
            return
        if st["sent"] < st["target"]:
            st["sent"] += 1
            self.send()
        elif st["outstanding"] == 0 and not st["finished"].done():
            st["finished"].set_result(None)


async def _client(ports: list[int], reqs: list[list[bytes]], pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {"done": 0, "sent": 0, "target": 0, "outstanding": 0}
    conns: list[Load] = []
    for c in range(CONNECTIONS):
        t = c % len(ports)
        _tr, proto = await loop.create_connection(
            lambda t=t: Load(reqs[t], state), "127.0.0.1", ports[t])
        # connections of one terminal start evenly spread over its requests, so they do not
        # read the same meter moments apart
        per_terminal = -(-CONNECTIONS // len(ports))
        proto.k = (c // len(ports)) * len(reqs[t]) // per_terminal
        conns.append(proto)
    pipe.send("ready")
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        if cmd == "stop":
            break
        if cmd == "cpu":
            pipe.send(time.process_time())
            continue
        _run, n = cmd
        state.update(done=0, sent=0, target=n, finished=loop.create_future())
        for p in conns:
            if state["sent"] < n:
                state["sent"] += 1
                p.send()
        await state["finished"]
        pipe.send(state["done"])


def client_main(ports: list[int], reqs: list[list[bytes]], pipe: Connection) -> None:
    _runner()(_client(ports, reqs, pipe))


# --- one measurement ------------------------------------------------------------------------------


def measure(kind: str, reply: bytes, reqs: list[list[bytes]], warm_runs: int = 1) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    s_pipe, s_child = ctx.Pipe()
    server = ctx.Process(target=server_main, args=(kind, reply, s_child), daemon=True)
    server.start()
    ports = s_pipe.recv()
    if kind != "baseline":
        for request in reqs[0][:2]:
            check_reply(ports[0], request)
    c_pipe, c_child = ctx.Pipe()
    client = ctx.Process(target=client_main, args=(ports, reqs, c_child), daemon=True)
    client.start()
    assert c_pipe.recv() == "ready"

    def one_run() -> None:
        c_pipe.send(("run", REQUESTS))
        done = c_pipe.recv()
        assert done == REQUESTS, done

    for _ in range(warm_runs):  # warm up connections and caches outside the CPU window
        one_run()
    s_pipe.send("cpu")
    cpu0 = s_pipe.recv()
    c_pipe.send("cpu")
    ccpu0 = c_pipe.recv()
    rate = median_rate(one_run, REQUESTS, repeats=REPEATS, warmup=0)
    s_pipe.send("cpu")
    cpu = s_pipe.recv() - cpu0
    c_pipe.send("cpu")
    ccpu = c_pipe.recv() - ccpu0
    c_pipe.send("stop")
    s_pipe.send("stop")
    client.join(10)
    server.join(10)
    served = REQUESTS * REPEATS
    return {"rate": rate, "cpu_s": cpu, "per_cpu_s": served / cpu, "client_cpu_s": ccpu}


def check_reply(port: int, request: bytes) -> None:
    """The field really answers the benchmark's request with a valid read reply."""
    from meterstream.collectors.dlt645 import FrameReader, ReadReply, decode_reply

    reader = FrameReader()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        frames: list[Any] = []
        while not frames:
            chunk = s.recv(4096)
            assert chunk, "the field closed the connection"
            frames = reader.feed(chunk)
    r = decode_reply(frames[0])
    (req,) = FrameReader().feed(request)
    assert isinstance(r, ReadReply) and r.values is not None, r
    assert r.di == int.from_bytes(req.data, "little"), r


def field_reply_sample(reqs: list[list[bytes]]) -> bytes:
    """One real reply of the field (its length is what the client counts)."""
    from meterfield.config import parse_config
    from meterfield.field import Field
    from meterstream.collectors.dlt645 import FrameReader

    f = Field(parse_config(bench_doc(), "bench"))
    (frame,) = FrameReader().feed(reqs[0][0])
    port = f.terminals[f.fleet.terminals[0].id].port  # type: ignore[union-attr]
    reply = port.handle(frame)
    assert reply is not None
    return reply


# --- memory of a 100,000-meter field --------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def big_main(pipe: Connection) -> None:
    import numpy  # noqa: F401  (the interpreter with numpy loaded is the floor)

    from meterfield.config import parse_config

    floor = _rss_kib()
    from meterfield.field import Field

    cfg = parse_config(bench_doc(BIG_AREAS, BIG_TERMINALS, BIG_METERS), "bench-100k")
    t0 = time.perf_counter()
    field = Field(cfg)
    build_s = time.perf_counter() - t0

    async def serve() -> int:
        await field.start()
        rss = _rss_kib()
        await field.stop()
        return rss

    imported = _rss_kib()
    rss_started = _runner()(serve())
    field.advance(60)  # allocate what a tick allocates
    ticks = []
    for _ in range(7):
        t0 = time.perf_counter()
        field.advance(60)
        ticks.append(time.perf_counter() - t0)
    ticks.sort()
    bank = field.bank
    arrays = sum(v.nbytes for v in vars(bank).values() if hasattr(v, "nbytes"))
    pipe.send({
        "meters": field.fleet.n,
        "terminals": len(field.terminals),
        "rss_floor_mib": floor / 1024,
        "rss_built_mib": imported / 1024,
        "rss_started_mib": rss_started / 1024,
        "rss_after_ticks_mib": _rss_kib() / 1024,
        "bank_arrays_mib": arrays / 2**20,
        "build_s": build_s,
        "tick_ms": ticks[len(ticks) // 2] * 1000,
    })


def measure_big() -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=big_main, args=(b,), daemon=True)
    p.start()
    out = a.recv()
    p.join(30)
    return out


def main() -> None:
    reqs = requests_per_terminal()
    poll = requests_per_terminal((DI_BLOCK, DI_STATUS3))
    reply = field_reply_sample(reqs)
    base = measure("baseline", reply, reqs)
    fld = measure("field", reply, reqs)
    mixed = measure("field", reply, poll)
    cold = measure("field-uncached", reply, poll)
    fresh_reqs = requests_per_terminal((DI_BLOCK, DI_STATUS3), FRESH_METERS_PER_TERMINAL)
    every_request_once = -(-sum(map(len, fresh_reqs)) // REQUESTS) + 1
    fresh = measure("field-fresh", reply, fresh_reqs, warm_runs=every_request_once)
    big = measure_big()
    figures = {
        "connections": CONNECTIONS,
        "terminals": TERMINALS,
        "meters": TERMINALS * METERS_PER_TERMINAL,
        "field_requests_per_s": fld["rate"],
        "baseline_requests_per_s": base["rate"],
        "field_to_baseline_ratio": fld["rate"] / base["rate"],
        "field_requests_per_cpu_s": fld["per_cpu_s"],
        "baseline_requests_per_cpu_s": base["per_cpu_s"],
        "field_to_baseline_cpu_ratio": fld["per_cpu_s"] / base["per_cpu_s"],
        "field_us_per_request_cpu": 1e6 / fld["per_cpu_s"],
        "poll_mix_requests_per_s": mixed["rate"],
        "poll_mix_requests_per_cpu_s": mixed["per_cpu_s"],
        "poll_mix_uncached_requests_per_s": cold["rate"],
        "poll_mix_uncached_requests_per_cpu_s": cold["per_cpu_s"],
        "poll_fresh_meters": TERMINALS * FRESH_METERS_PER_TERMINAL,
        "poll_fresh_requests_per_s": fresh["rate"],
        "poll_fresh_requests_per_cpu_s": fresh["per_cpu_s"],
        "poll_fresh_to_baseline_cpu_ratio": fresh["per_cpu_s"] / base["per_cpu_s"],
        "client_cpu_s_field_runs": fld["client_cpu_s"],
        "field_100k_meters": big["meters"],
        "field_100k_terminals": big["terminals"],
        "field_100k_rss_mib": big["rss_started_mib"],
        "field_100k_rss_after_ticks_mib": big["rss_after_ticks_mib"],
        "python_numpy_floor_rss_mib": big["rss_floor_mib"],
        "field_100k_bank_arrays_mib": big["bank_arrays_mib"],
        "field_100k_build_s": big["build_s"],
        "field_100k_tick_ms": big["tick_ms"],
    }
    report("field", figures, notes=(
        "DL/T 645-2007 0001FF00 reads over TCP loopback, zero latency, one request outstanding "
        f"per connection; {REQUESTS:,} requests a run, median of {REPEATS}; poll_mix alternates "
        "0001FF00 and 04000503 (status word 3) per meter (uncached: no remembered requests, "
        "every frame through the codec's reader, decoder and encoders); poll_fresh is the honest "
        "polling figure: 100,000 meters with registers advancing every second by a simulated "
        "minute (clock speed 60), each meter read every few simulated minutes, so every read "
        "computes and encodes its values afresh "
        "(as in real polling, where registers move between a meter's reads), with the "
        "remembered-request cache on (request bytes repeat every cycle); field and baseline "
        "servers in their own process (uvloop), load client in another. per_cpu_s = requests "
        "served per CPU second of the server process. 100k: RSS of a started 100,000-meter "
        "field (200 listening terminals), tick = one vectorised 60 s register advance."))


if __name__ == "__main__":
    main()
