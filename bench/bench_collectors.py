"""Collector speed, memory and a county's cycle, against the simulated field in another process.

Three parts (issue 3), each with its baseline or reference measured in the same run:

- throughput: one collector process polls a zero-latency field (another process) continuously
  (energy block + status word 3 of every meter, registers moving between reads); reads per
  second (request/reply round trips) and per CPU second of the collector. Baseline: a trivial
  asyncio client on the same field with the same number of connections, one request
  outstanding each, that sends precomputed frames and only counts reply bytes.
- memory: 10,000 terminals x 100 meters (1,000,000 meters) in two field processes, all held
  and polled by one collector; its RSS after every terminal delivered a cycle, against the RSS
  of the same interpreter with the archive loaded and nothing connected.
- county: the county of the design (72,175 low-voltage meters behind 290 concentrators, 1,189
  public-transformer and 371 dedicated-transformer meters, each behind its own terminal) with
  2400-baud byte pacing on every bus, 1 % dead meters and a few transient faults; the wall time
  of one cycle of every terminal, and the reported success rate against the field's injected
  failure rate (dead meters / meters).

Run: .venv/bin/python bench/bench_collectors.py [--part throughput|memory|county|all]
Figures, not asserts; results in bench/results/collectors.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report

ROOT = Path(__file__).resolve().parent.parent
COUNTY = ROOT / "config" / "field-county.toml"


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --- the field, in its own process -----------------------------------------------------------


def field_main(doc: dict[str, Any] | None, toml_path: str | None, archive: str,
               pipe: Connection) -> None:
    _raise_nofile()
    _runner()(_field(doc, toml_path, archive, pipe))


async def _field(doc: dict[str, Any] | None, toml_path: str | None, archive: str,
                 pipe: Connection) -> None:
    from meterfield.config import load_config, parse_config
    from meterfield.field import Field

    cfg = load_config(toml_path) if toml_path else parse_config(doc or {}, "bench")
    field = Field(cfg)
    await field.start()
    field.write_archive(archive)
    pipe.send({"meters": field.fleet.n, "terminals": len(field.terminals),
               "dead": int(field.fleet.dead.sum())})
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        if cmd == "cpu":
            pipe.send(time.process_time())
        elif cmd == "summary":
            pipe.send(field.summary())
        elif cmd == "stop":
            break
    await field.stop()
    pipe.send("stopped")


def start_field(doc: dict[str, Any] | None, toml_path: str | None, archive: str
                ) -> tuple[Any, Connection, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=field_main, args=(doc, toml_path, archive, b), daemon=True)
    p.start()
    info = a.recv()
    return p, a, info


def stop_field(p: Any, pipe: Connection) -> None:
    pipe.send("stop")
    pipe.recv()
    p.join(30)


# --- the collector, in its own process -------------------------------------------------------


def collector_main(archive: str, cfg_doc: dict[str, Any], mode: str, params: dict[str, Any],
                   pipe: Connection) -> None:
    _raise_nofile()
    _runner()(_collector(archive, cfg_doc, mode, params, pipe))


async def _collector(archive_path: str, cfg_doc: dict[str, Any], mode: str,
                     params: dict[str, Any], pipe: Connection) -> None:
    from meterstream.collectors.archive import load_archive
    from meterstream.collectors.collector import Collector
    from meterstream.collectors.config import parse_collector_config

    floor = _rss_mib()
    archive = load_archive(archive_path)
    loaded = _rss_mib()
    cfg = parse_collector_config(cfg_doc, "bench")

    class CountingSink:
        """Keeps counts of the first batch of every terminal; drops the rest."""

        def __init__(self) -> None:
            self.first: dict[str, tuple[int, int, int, int]] = {}  # (rows, ok, ended, took)
            self.downs = 0

        def batch(self, b: Any) -> None:
            if b.terminal not in self.first and len(b):
                self.first[b.terminal] = (len(b), b.ok, b.ended_ns, b.ended_ns - b.started_ns)

        def event(self, e: Any) -> None:
            if e.kind == "down":
                self.downs += 1

        def command(self, r: Any) -> None:
            pass

    sink = CountingSink()
    collector = Collector(archive, cfg, sink)
    t_start = time.time_ns()
    await collector.start()
    out: dict[str, Any] = {"rss_floor_mib": floor, "rss_archive_mib": loaded,
                           "terminals": len(archive.terminals), "meters": archive.meters}
    if mode == "rate":
        await asyncio.sleep(params["warmup_s"])
        rates, cpu_rates = [], []
        for _ in range(params["windows"]):
            s0 = collector.summary()["reads_ok"]
            c0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(params["window_s"])
            s1 = collector.summary()["reads_ok"]
            c1, t1 = time.process_time(), time.perf_counter()
            rates.append((s1 - s0) / (t1 - t0))
            cpu_rates.append((s1 - s0) / max(c1 - c0, 1e-9))
        out.update(rate=statistics.median(rates), rates=rates,
                   per_cpu_s=statistics.median(cpu_rates), rss_mib=_rss_mib(),
                   summary=collector.summary())
    else:  # first cycle of every terminal
        deadline = time.monotonic() + params["timeout_s"]
        n_dlt = len(archive.terminals)
        while len(sink.first) < n_dlt and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        rows = sum(v[0] for v in sink.first.values())
        ok = sum(v[1] for v in sink.first.values())
        last = max((v[2] for v in sink.first.values()), default=t_start)
        longest = max((v[3] for v in sink.first.values()), default=0)
        out.update(delivered=len(sink.first), rows=rows, rows_ok=ok,
                   cycle_wall_s=(last - t_start) / 1e9, longest_cycle_s=longest / 1e9,
                   rss_mib=_rss_mib(),
                   downs=sink.downs, summary=collector.summary())
    await collector.stop()
    pipe.send(out)


def run_collector(archive: str, cfg_doc: dict[str, Any], mode: str,
                  params: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=collector_main, args=(archive, cfg_doc, mode, params, b), daemon=True)
    p.start()
    out: dict[str, Any] = a.recv()
    p.join(60)
    return out


# --- the baseline client -----------------------------------------------------------------


def baseline_main(archive: str, connections_per_terminal: int, params: dict[str, Any],
                  pipe: Connection) -> None:
    _raise_nofile()
    _runner()(_baseline(archive, connections_per_terminal, params, pipe))


async def _baseline(archive_path: str, per_terminal: int, params: dict[str, Any],
                    pipe: Connection) -> None:
    """Per terminal one connection, one request outstanding, precomputed frames (energy block
    and status word 3 of every meter in turn), a reply counted once its bytes are in."""
    from meterstream.collectors.archive import load_archive
    from meterstream.collectors.dlt645 import encode_reads

    archive = load_archive(archive_path)
    loop = asyncio.get_running_loop()
    count = [0]

    class Load(asyncio.Protocol):
        def __init__(self, frames: list[bytes], sizes: list[int]) -> None:
            self.frames, self.sizes = frames, sizes
            self.k = 0
            self.got = 0
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            transport.write(self.frames[0])

        def data_received(self, data: bytes) -> None:
            self.got += len(data)
            if self.got >= self.sizes[self.k]:
                self.got = 0
                count[0] += 1
                self.k = (self.k + 1) % len(self.frames)
                self.transport.write(self.frames[self.k])

    for plan in archive.terminals.values():
        if plan.protocol != "dlt645" or plan.mode != "listen":
            continue
        block = encode_reads(plan.address, 0x0001FF00, preamble=2)
        status = encode_reads(plan.address, 0x04000503, preamble=2)
        frames, sizes = [], []
        for k in range(plan.n):
            frames.append(block[k * 18:(k + 1) * 18])
            sizes.append(2 + 12 + 24)  # FE FE + frame with DI and 20 bytes of registers
            frames.append(status[k * 18:(k + 1) * 18])
            sizes.append(2 + 12 + 6)
        for _ in range(per_terminal):
            await loop.create_connection(lambda f=frames, s=sizes: Load(f, s), plan.host,
                                         plan.port)
    await asyncio.sleep(params["warmup_s"])
    rates, cpu_rates = [], []
    for _ in range(params["windows"]):
        n0, c0, t0 = count[0], time.process_time(), time.perf_counter()
        await asyncio.sleep(params["window_s"])
        n1, c1, t1 = count[0], time.process_time(), time.perf_counter()
        rates.append((n1 - n0) / (t1 - t0))
        cpu_rates.append((n1 - n0) / max(c1 - c0, 1e-9))
    pipe.send({"rate": statistics.median(rates), "rates": rates,
               "per_cpu_s": statistics.median(cpu_rates)})


def run_baseline(archive: str, params: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=baseline_main, args=(archive, 1, params, b), daemon=True)
    p.start()
    out: dict[str, Any] = a.recv()
    p.terminate()
    p.join(10)
    return out


# --- the parts ---------------------------------------------------------------------------

THROUGHPUT_TERMINALS = 64
THROUGHPUT_METERS = 250


def throughput(tmp: Path, terminals: int = THROUGHPUT_TERMINALS,
               meters: int = THROUGHPUT_METERS, warmup_s: float = 3.0, window_s: float = 5.0,
               windows: int = 5) -> dict[str, Any]:
    doc = {
        "field": {"seed": 3, "start": "2024-06-01T08:00:00", "speed": 60.0, "tick_s": 1.0},
        "areas": {"count": 1, "supply_meter": False},
        "bus": {"preamble": 2, "turnaround_ms": [0.0, 0.0]},
        "terminals": [{"kind": "concentrator", "per_area": terminals, "meters": meters}],
    }
    archive = str(tmp / "throughput.csv")
    p, pipe, info = start_field(doc, None, archive)
    params = {"warmup_s": warmup_s, "window_s": window_s, "windows": windows}
    cfg = {"collector": {"cycle_s": 0.05, "stagger_s": 0.05, "timeout_s": 2.0, "retries": 1,
                         "clock_every": 0}, "dialin": {"enabled": False}}
    try:
        pipe.send("cpu")
        f0 = pipe.recv()
        col = run_collector(archive, cfg, "rate", params)
        pipe.send("cpu")
        f1 = pipe.recv()
        base = run_baseline(archive, params)
        col2 = run_collector(archive, cfg, "rate", params)  # again, after the baseline
    finally:
        stop_field(p, pipe)
    rate = statistics.median(col["rates"] + col2["rates"])
    per_cpu = statistics.median([col["per_cpu_s"], col2["per_cpu_s"]])
    field_window_s = params["warmup_s"] + params["window_s"] * params["windows"]
    return {
        "throughput_terminals": terminals,
        "throughput_meters": info["meters"],
        "collector_reads_per_s": rate,
        "collector_reads_per_cpu_s": per_cpu,
        "collector_us_cpu_per_read": 1e6 / per_cpu,
        "baseline_reads_per_s": base["rate"],
        "baseline_reads_per_cpu_s": base["per_cpu_s"],
        "collector_to_baseline_wall": rate / base["rate"],
        "collector_to_baseline_cpu": per_cpu / base["per_cpu_s"],
        "field_cpu_share_during_collector_run": (f1 - f0) / (field_window_s + 3.0),
        "collector_success": col["summary"]["success_rate"],
    }


def _merge_archives(parts: list[str], out: str) -> None:
    """Concatenate archives (and their -terminals / -meters siblings) into one."""
    from meterstream.collectors.archive import sibling_paths

    targets = [Path(out), *sibling_paths(out)]
    sources = [[Path(p), *sibling_paths(p)] for p in parts]
    for k, target in enumerate(targets):
        with open(target, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            for j, src in enumerate(sources):
                with open(src[k], newline="") as sh:
                    r = csv.reader(sh)
                    header = next(r)
                    if j == 0:
                        w.writerow(header)
                    w.writerows(r)


def memory(tmp: Path, areas: int = 50, per_area: int = 100, meters: int = 100
           ) -> dict[str, Any]:
    """`areas` x `per_area` concentrators x `meters` meters in each of two field processes
    (defaults: 2 x 5,000 terminals, 1,000,000 meters), all held by one collector."""
    fields = []
    parts = []
    try:
        for prefix in ("33", "34"):
            doc = {
                "field": {"seed": int(prefix), "start": "2024-06-01T08:00:00", "speed": 1.0,
                          "tick_s": 10.0, "address_prefix": prefix},
                # distinct area names, so the two fields' terminal ids differ too
                "areas": {"names": [f"{'AB'[int(prefix) - 33]}{k:03d}"
                                    for k in range(1, areas + 1)],
                          "supply_meter": False},
                "bus": {"preamble": 2},
                "terminals": [{"kind": "concentrator", "per_area": per_area,
                               "meters": meters}],
            }
            path = str(tmp / f"million-{prefix}.csv")
            fields.append(start_field(doc, None, path))
            parts.append(path)
        archive = str(tmp / "million.csv")
        _merge_archives(parts, archive)
        cfg = {"collector": {"cycle_s": 600.0, "stagger_s": 20.0, "timeout_s": 5.0,
                             "retries": 1, "clock_every": 0, "max_connecting": 512},
               "dialin": {"enabled": False}}
        out = run_collector(archive, cfg, "first", {"timeout_s": 600.0})
    finally:
        for p, pipe, _info in fields:
            stop_field(p, pipe)
    return {
        "million_terminals": out["terminals"],
        "million_meters": out["meters"],
        "million_terminals_delivered_a_cycle": out["delivered"],
        "million_rows_ok": out["rows_ok"],
        "million_cycle_wall_s": out["cycle_wall_s"],
        "million_collector_rss_mib": out["rss_mib"],
        "million_rss_python_floor_mib": out["rss_floor_mib"],
        "million_rss_archive_loaded_mib": out["rss_archive_mib"],
    }


def county(tmp: Path) -> dict[str, Any]:
    archive = str(tmp / "county.csv")
    p, pipe, info = start_field(None, str(COUNTY), archive)
    cfg = {"collector": {"cycle_s": 900.0, "stagger_s": 0.5, "timeout_s": 0.8, "retries": 1,
                         "preamble": 0, "clock_every": 0, "silent_after": 3},
           "dialin": {"enabled": False}}
    try:
        out = run_collector(archive, cfg, "first", {"timeout_s": 600.0})
        pipe.send("summary")
        fs = pipe.recv()
    finally:
        stop_field(p, pipe)
    injected = info["dead"] / info["meters"]
    success = out["rows_ok"] / out["rows"] if out["rows"] else 0.0
    return {
        "county_terminals": info["terminals"],
        "county_meters": info["meters"],
        "county_dead_meters": info["dead"],
        "county_terminals_delivered": out["delivered"],
        "county_cycle_wall_s": out["cycle_wall_s"],
        "county_longest_terminal_cycle_s": out["longest_cycle_s"],
        "county_rows": out["rows"],
        "county_failed_rows": out["rows"] - out["rows_ok"],
        "county_success_rate_pct": f"{100 * success:.4f}",
        "county_injected_failure_pct": f"{100 * injected:.4f}",
        "county_gap_pp": f"{abs((100 - 100 * success) - 100 * injected):.4f}",
        "county_link_downs": out["downs"],
        "county_field_dropped": fs["dropped"],
        "county_field_corrupted": fs["corrupted"],
        "county_collector_rss_mib": out["rss_mib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--part", choices=("throughput", "memory", "county", "all"), default="all")
    args = ap.parse_args()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-collectors-") as d:
        tmp = Path(d)
        if args.part in ("throughput", "all"):
            figures.update(throughput(tmp))
        if args.part in ("memory", "all"):
            figures.update(memory(tmp))
        if args.part in ("county", "all"):
            figures.update(county(tmp))
    name = "collectors" if args.part == "all" else f"collectors-{args.part}"
    report(name, figures, notes=(
        "throughput: 64 concentrators x 250 meters at zero latency in a field process (registers "
        "moving: speed 60, 1 s ticks), energy block + status word 3 per meter, cycles back to "
        "back; collector and baseline client each in their own process (uvloop); medians of "
        "5-second windows. memory: 10,000 terminals x 100 meters in two field processes, one "
        "collector; RSS once every terminal delivered a cycle. county: config/field-county.toml "
        "(2400-baud pacing, turnaround 0-20 ms, 1 % dead meters, 0.2 % lost and 0.1 % corrupted "
        "replies), cycles started within 0.5 s, collector timeout 0.8 s, 1 retry, no FE preamble on requests, silent_after 3; one cycle of every terminal (wall time from the collector's start, connecting included)."))
    os.sys.stdout.flush()


if __name__ == "__main__":
    main()
