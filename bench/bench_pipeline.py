"""The pipeline's speed (issue 5): one Faust worker on the embedded broker, against a naive
Faust design in the same run, and payment-to-reconnect latency through the whole pipeline.

Three parts, every process on the same embedded Tansu broker (memory storage, loopback):

- worker: ONE WorkerApp (pipeline/app.py, the real worker: changelog table, commands, events)
  in its own process. The reading batches (ReadingBatch.to_bytes on meterstream.readings,
  keyed by terminal) are PRE-PRODUCED before the worker starts, so the figure is the worker's
  own rate and no producer competes with it for the two cores: readings processed per second
  from the first batch applied to the last batch applied with its state written to the
  changelog table and its commands and events out (the producer flushed, every send
  acknowledged). Then the topics are counted from outside: changelog records, commands.
- naive: the same readings (a subset: all cycles of the first terminals, in the same order),
  one JSON message per reading keyed by meter, a Faust table keyed by meter holding the meter's
  64-byte billing record (balance, registers, baselines), the kernels' billing rule per message
  (Billing.apply_readings on one reading: bill_reading then decide), a JSON command out for a
  cut-off; its own process, the same Faust settings (faust_settings), the same broker, uvloop.
- latency: a simulated field (its own process), a KafkaCollector (its own process) and
  start_worker (worker + payments intake, its own process); customers below the cut-off
  threshold are cut off first (relays open in the field), then pay one by one, spread over
  time while readings flow. Measured from the payment's produce to meterstream.payments-in
  (acknowledged) to (a) the reconnect command appearing on meterstream.commands (a consumer in
  this process) and (b) the confirmed result on meterstream.results (the collector read status
  word 3 back showing the relay closed), and (c) the relay closing in the field (polled there).

Run: .venv/bin/python bench/bench_pipeline.py [--part worker|naive|latency|all]
Figures, not asserts; results in bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report

ROOT = Path(__file__).resolve().parent.parent
TARIFFS = ROOT / "config" / "tariffs-example.toml"
PARTITIONS = 4  # WorkerConfig's default
WORKER_APP = "bench-worker"
NAIVE_APP = "bench-naive"
NAIVE_READINGS = "bench-naive.readings"
NAIVE_COMMANDS = "bench-naive.commands"
NAIVE_TABLE = "meters"
MIN = 60 * 10**9
# 2026-11-24 (a Tuesday) 10:00 Asia/Shanghai: inside the example tariffs' cut-off window
# (working days 08:00-18:00), no holiday; 15-minute cycles from there.
T0 = 1_795_485_600 * 10**9
CYCLE_NS = 15 * MIN


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


# --- the data: an archive and its reading batches ----------------------------------------------


class Fleet:
    """A synthetic archive of `terminals` concentrators x `meters` low-voltage meters, and the
    registers of each poll cycle (moving by each meter's load, into the time-of-use register
    of the local time)."""

    def __init__(self, terminals: int, meters: int, seed: int = 5) -> None:
        rng = np.random.default_rng(seed)
        self.terminals, self.meters = terminals, meters
        n = terminals * meters
        per_area = 50
        self.tids = [f"A{t // per_area + 1:03d}-C{t % per_area + 1:03d}" for t in range(terminals)]
        t_idx = np.repeat(np.arange(terminals), meters)
        pos = np.tile(np.arange(1, meters + 1), terminals)
        area = t_idx // per_area + 1
        conc = t_idx % per_area + 1
        self.address = 330_000_000_000 + area * 10**7 + conc * 10**4 + pos  # 33 AAA CCC MMMM
        self.t_idx = t_idx
        u = rng.random(n)
        self.plan = np.where(u < 0.70, "residential_tou",
                             np.where(u < 0.95, "residential_flat", "commercial"))
        self.protected = rng.random(n) < 0.01
        # balances: most customers comfortably in credit, 1 % just above their cut-off
        # threshold (0.00 yuan; commercial -100.00), so some cross it during the run
        fen = rng.integers(2_000, 50_000, n)  # 20.00 .. 500.00 yuan
        near = rng.random(n) < 0.01
        fen = np.where(near, rng.integers(0, 50, n), fen)
        fen = np.where(near & (self.plan == "commercial"), fen - 10_000, fen)
        self.initial_fen = fen
        self.near = near
        # 10 % DL/T 645-1997 meters (total register only)
        self.is1997 = rng.random(n) < 0.10
        total = rng.integers(50_000, 3_000_000, n)  # 500 .. 30,000 kWh in 0.01 kWh
        frac = rng.dirichlet(np.ones(4), n)
        tou = np.floor(frac * total[:, None]).astype(np.int64)
        tou[:, 2] += total - tou.sum(axis=1)  # exact: total = T1 + T2 + T3 + T4
        self.regs = np.concatenate([total[:, None], tou], axis=1)  # (n, 5)
        # mean load per meter, kW: lognormal around 0.45 kW (the field's lowvoltage mean)
        self.kw = np.minimum(rng.lognormal(np.log(0.3), 0.9, n), 15.0)
        self.rng = rng

    def write_archive(self, path: Path, terminals: int | None = None) -> None:
        """The worker's archive CSV (its first `terminals` terminals only, if given)."""
        n = (terminals or self.terminals) * self.meters
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["meter", "terminal", "area", "class", "plan", "protected",
                        "initial_balance", "role"])
            for i in range(n):
                t = int(self.t_idx[i])
                f = int(self.initial_fen[i])
                sign = "-" if f < 0 else ""
                w.writerow([f"{int(self.address[i]):012d}", self.tids[t], self.tids[t][:4],
                            "lowvoltage", self.plan[i], int(self.protected[i]),
                            f"{sign}{abs(f) // 100}.{abs(f) % 100:02d}", "customer"])

    def cycle(self, c: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Advance every meter by one 15-minute cycle (cycle 0: the start registers); returns
        (started_ns, ts, registers (n, 5) as read, outcome, status) for the whole fleet."""
        from meterstream.collectors.batch import OUTCOME_OK, OUTCOME_TIMEOUT

        rng = self.rng
        n = self.address.shape[0]
        started = T0 + c * CYCLE_NS
        if c > 0:
            d = rng.poisson(self.kw * 25.0)  # 0.01 kWh in 15 minutes at kw
            # time of use by local time (field-demo's table): 08:00-11:00 peak (T2), then
            # 11:00-17:00 shoulder (T3)
            local_h = 10 + (c * 15) // 60
            k = 2 if local_h < 11 else 3
            self.regs[:, 0] += d
            self.regs[:, k] += d
        # a meter's reply arrives in order along its bus, ~0.3 s apart
        pos = np.tile(np.arange(self.meters), self.terminals)
        ts = started + pos * 300_000_000 + rng.integers(0, 100_000_000, n)
        regs = self.regs.copy()
        regs[self.is1997, 1:] = -1
        outcome = np.full(n, OUTCOME_OK, np.int8)
        failed = rng.random(n) < 0.005
        outcome[failed] = OUTCOME_TIMEOUT
        regs[failed] = -1
        status = np.where(failed, -1, 0).astype(np.int32)
        return started, ts, regs, outcome, status

    def batches(self, c: int, terminals: int | None = None) -> list[tuple[str, bytes]]:
        """(terminal, ReadingBatch bytes) of one cycle."""
        from meterstream.collectors.batch import NO_DRIFT, ReadingBatch

        started, ts, regs, outcome, status = self.cycle(c)
        m = self.meters
        out = []
        for t in range(terminals or self.terminals):
            sl = slice(t * m, (t + 1) * m)
            b = ReadingBatch(self.tids[t], c + 1, started, int(ts[sl].max()),
                             self.address[sl].astype(np.int64), ts[sl].astype(np.int64),
                             regs[sl].astype(np.int64), status[sl], outcome[sl],
                             np.zeros(m, np.int16), np.full(m, NO_DRIFT, np.int32))
            out.append((self.tids[t], b.to_bytes()))
        return out


async def _produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> float:
    """Produce (key, value) pairs, acks=all, in order per key; returns the seconds it took."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=1 << 20, max_request_size=1 << 22)
    await producer.start()
    t0 = time.perf_counter()
    try:
        pending = []
        for key, value in items:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


async def _count(bootstrap: str, topic: str, idle_s: float = 2.0) -> tuple[int, int]:
    """(messages, distinct keys) of a topic, read from the beginning until nothing came for
    `idle_s` (Tansu's end offsets can be short after batched produces: docs/broker.md)."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                         enable_auto_commit=False, max_partition_fetch_bytes=8 << 20,
                         fetch_max_bytes=32 << 20)
    await c.start()
    n, keys = 0, set[bytes | None]()
    try:
        while True:
            got = await c.getmany(timeout_ms=int(idle_s * 1000), max_records=10_000)
            if not got:
                return n, len(keys)
            for msgs in got.values():
                n += len(msgs)
                keys.update(m.key for m in msgs)
    finally:
        await c.stop()


# --- the worker, in its own process --------------------------------------------------------------


def worker_main(bootstrap: str, archive: str, tariffs: str, datadir: str, expected: int,
                app_id: str, pipe: Connection) -> None:
    _runner()(_worker(bootstrap, archive, tariffs, datadir, expected, app_id, pipe))


async def _worker(bootstrap: str, archive: str, tariffs: str, datadir: str, expected: int,
                  app_id: str, pipe: Connection) -> None:
    from meterstream.pipeline.app import WorkerApp
    from meterstream.pipeline.worker import WorkerCore

    t_load = time.perf_counter()
    # cycle_s: the dropout rule's interval. The replayed cycles are hours old by the worker's
    # clock; a day keeps them from counting as missed cycles (the timer still runs every tick).
    core = WorkerCore(archive, tariffs, cycle_s=86_400.0)
    load_s = time.perf_counter() - t_load
    w = WorkerApp(core, bootstrap, datadir=datadir, partitions=PARTITIONS, app_id=app_id)
    marks: dict[str, float] = {}
    on_batch = core.on_batch

    def timed(value: bytes) -> Any:
        if "first" not in marks:
            marks["first"] = time.perf_counter()
            marks["cpu0"] = time.process_time()
        return on_batch(value)

    core.on_batch = timed  # type: ignore[method-assign]
    pipe.send({"loaded_s": load_s})
    await w.start()
    deadline = time.monotonic() + 900
    while core.counters["batches"] + core.counters["replayed_batches"] < expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.001)
    marks["applied"] = time.perf_counter()
    await w.app.producer.flush()  # changelog writes, commands, events: all acknowledged
    marks["end"] = time.perf_counter()
    marks["cpu1"] = time.process_time()
    out = {"counters": dict(core.counters), "errors": w.errors,
           "seconds": marks["end"] - marks["first"],
           "applied_seconds": marks["applied"] - marks["first"],
           "cpu_seconds": marks["cpu1"] - marks["cpu0"],
           "open_commands": sum(len(b.open_commands()) for b in core.books.values())}
    await w.stop()
    pipe.send(out)


def run_worker(bootstrap: str, archive: Path, tariffs: Path, tmp: Path, expected: int,
               broker_pid: int, app_id: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=worker_main, args=(bootstrap, str(archive), str(tariffs),
                                              str(tmp / app_id), expected, app_id, b),
                    daemon=True)
    p.start()
    info = a.recv()
    b0 = _cpu_of(broker_pid)
    out: dict[str, Any] = a.recv()
    b1 = _cpu_of(broker_pid)
    p.join(60)
    out.update(info)
    out["broker_cpu_seconds"] = b1 - b0  # includes the worker's start-up (group join) too
    return out


# --- the naive design, in its own process --------------------------------------------------------


def naive_main(bootstrap: str, archive: str, tariffs: str, datadir: str, expected: int,
               app_id: str, pipe: Connection) -> None:
    _runner()(_naive(bootstrap, archive, tariffs, datadir, expected, app_id, pipe))


async def _naive(bootstrap: str, archive: str, tariffs: str, datadir: str, expected: int,
                 app_id: str, pipe: Connection) -> None:
    """One message per reading (JSON), a table keyed by meter holding its billing record."""
    import faust

    from meterstream.kernels import billing as K
    from meterstream.kernels.billing import Billing
    from meterstream.kernels.layout import HOT_DTYPE
    from meterstream.pipeline.broker import faust_settings
    from meterstream.pipeline.replay import Rejected, read_archive
    from meterstream.pipeline.tariffs import compile_spec, load_tariffs

    spec = load_tariffs(Path(tariffs))
    tariff = compile_spec(spec)
    fleet = read_archive(Path(archive), spec, tariff, Rejected()).fleet
    billing = Billing(fleet, tariff)
    slot_of = {f"{int(a):012d}": s for s, a in enumerate(fleet.cold["address"].tolist())}
    hot = fleet.hot
    app = faust.App(app_id, **faust_settings(bootstrap, datadir=datadir,
                                                partitions=PARTITIONS))
    readings = app.topic(NAIVE_READINGS, key_type=str, value_serializer="json",
                         partitions=PARTITIONS)
    commands = app.topic(NAIVE_COMMANDS, key_type=str, value_serializer="json",
                         partitions=PARTITIONS)
    table = app.Table(NAIVE_TABLE, key_type=str, value_type=bytes, partitions=PARTITIONS)
    count = [0, 0, 0]  # readings, commands, errors
    marks: dict[str, float] = {}

    @app.agent(readings)
    async def bill(stream: Any) -> None:
        async for meter, r in stream.items():
            if not count[0]:
                marks["first"] = time.perf_counter()
                marks["cpu0"] = time.process_time()
            s = slot_of[meter]
            rec = table.get(meter)
            if rec is not None:  # the table holds the meter's record: it is the state
                hot[s] = np.frombuffer(rec, HOT_DTYPE, 1)[0]
            if r["outcome"] == 0 and r["total"] >= 0:
                t = [max(0, r[k]) for k in ("t1", "t2", "t3", "t4")]
                _c, _o, _d, act = billing.apply_readings(
                    np.array([s], np.int64), np.array([r["ts"]], np.int64),
                    np.array([r["total"]], np.int64), *(np.array([x], np.int64) for x in t))
                if act[0] & K.ACT_CUTOFF:
                    count[1] += 1
                    await commands.send(key=meter, value={
                        "meter": meter, "action": "trip", "ts": r["ts"],
                        "balance_micro_yuan": int(hot["balance"][s])})
                table[meter] = hot[s].tobytes()
            count[0] += 1

    pipe.send({"meters": fleet.n_meters})
    await app.start()
    deadline = time.monotonic() + 900
    while count[0] < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    marks["applied"] = time.perf_counter()
    await app.producer.flush()
    marks["end"] = time.perf_counter()
    marks["cpu1"] = time.process_time()
    out = {"readings": count[0], "commands": count[1],
           "seconds": marks["end"] - marks["first"],
           "cpu_seconds": marks["cpu1"] - marks["cpu0"],
           "balance_sum": int(hot["balance"].sum())}
    await app.stop()
    pipe.send(out)


def run_naive(bootstrap: str, archive: Path, tariffs: Path, tmp: Path,
              expected: int, app_id: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=naive_main, args=(bootstrap, str(archive), str(tariffs),
                                             str(tmp / app_id), expected, app_id, b),
                    daemon=True)
    p.start()
    a.recv()
    out: dict[str, Any] = a.recv()
    p.join(60)
    return out


def naive_messages(batches: list[tuple[str, bytes]]) -> list[tuple[bytes, bytes]]:
    """One JSON message per reading of the batches, keyed by meter, in the batches' order."""
    from meterstream.collectors.batch import ReadingBatch

    out = []
    for _tid, value in batches:
        b = ReadingBatch.from_bytes(value)
        for i in range(len(b)):
            r = b.registers[i].tolist()
            meter = f"{int(b.meter[i]):012d}"
            doc = {"meter": meter, "ts": int(b.ts[i]), "total": r[0], "t1": r[1], "t2": r[2],
                   "t3": r[3], "t4": r[4], "outcome": int(b.outcome[i])}
            out.append((meter.encode(), json.dumps(doc).encode()))
    return out


# --- parts 1 and 2 -----------------------------------------------------------------------------


def throughput(tmp: Path, terminals: int, meters: int, cycles: int, naive_terminals: int,
               parts: set[str], rounds: int) -> dict[str, Any]:
    """`rounds` runs of the worker and of the naive design, interleaved, on one broker: each
    round a fresh app id (consumer group, changelog topic) reading the same pre-produced
    topic from the beginning; medians reported."""
    from meterstream.pipeline import topics
    from meterstream.pipeline.broker import EmbeddedBroker

    fleet = Fleet(terminals, meters)
    archive = tmp / "archive.csv"
    fleet.write_archive(archive)
    naive_archive = tmp / "naive-archive.csv"
    fleet.write_archive(naive_archive, naive_terminals)
    t0 = time.perf_counter()
    all_batches = [fleet.batches(c) for c in range(cycles)]
    gen_s = time.perf_counter() - t0
    stream = [(tid.encode(), v) for cyc in all_batches for tid, v in cyc]
    naive_batches = [(tid, v) for cyc in all_batches for tid, v in cyc[:naive_terminals]]
    n_readings = terminals * meters * cycles
    figures: dict[str, Any] = {
        "terminals": terminals, "meters": terminals * meters, "cycles": cycles,
        "batches": len(stream), "readings": n_readings, "rounds": rounds,
        "batch_bytes": len(stream[0][1]), "near_cutoff_customers": int(fleet.near.sum()),
        "batch_generation_s": gen_s,
    }
    w_ids = [f"{WORKER_APP}-{k}" for k in range(rounds)]
    n_ids = [f"{NAIVE_APP}-{k}" for k in range(rounds)]
    names = [*topics.NAMES, *(f"{a}-terminal-state-changelog" for a in w_ids),
             NAIVE_READINGS, NAIVE_COMMANDS, *(f"{a}-{NAIVE_TABLE}-changelog" for a in n_ids)]
    w_runs: list[dict[str, Any]] = []
    n_runs: list[dict[str, Any]] = []
    with EmbeddedBroker(topics=names, partitions=PARTITIONS) as broker:
        assert broker._process is not None
        bpid = broker._process.pid
        msgs: list[tuple[bytes, bytes]] = []
        if "worker" in parts:
            prod_s = asyncio.run(_produce(broker.bootstrap, topics.READINGS.name, stream))
            figures["preproduce_s"] = prod_s
            print(f"worker: {len(stream):,} batches pre-produced in {prod_s:.1f} s", flush=True)
        if "naive" in parts:
            msgs = naive_messages(naive_batches)
            asyncio.run(_produce(broker.bootstrap, NAIVE_READINGS, msgs))
            print(f"naive: {len(msgs):,} messages pre-produced", flush=True)
        for k in range(rounds):
            if "worker" in parts:
                load0 = _loadavg()
                w = run_worker(broker.bootstrap, archive, TARIFFS, tmp, len(stream), bpid,
                               w_ids[k])
                w["load_before"] = load0
                w["changelog"] = asyncio.run(_count(broker.bootstrap,
                                                    f"{w_ids[k]}-terminal-state-changelog"))
                w["rate"] = n_readings / w["seconds"]
                w_runs.append(w)
                print(f"worker round {k + 1}: {w['rate']:,.0f} readings/s over "
                      f"{w['seconds']:.2f} s; {w['counters']['commands_sent']} commands; "
                      f"changelog {w['changelog'][0]:,} records", flush=True)
            if "naive" in parts:
                load0 = _loadavg()
                nv = run_naive(broker.bootstrap, naive_archive, TARIFFS, tmp, len(msgs), n_ids[k])
                nv["load_before"] = load0
                nv["changelog"] = asyncio.run(_count(broker.bootstrap,
                                                     f"{n_ids[k]}-{NAIVE_TABLE}-changelog"))
                nv["rate"] = nv["readings"] / nv["seconds"]
                n_runs.append(nv)
                print(f"naive round {k + 1}: {nv['rate']:,.0f} readings/s over "
                      f"{nv['seconds']:.2f} s", flush=True)
        totals = {t: asyncio.run(_count(broker.bootstrap, t))[0] for t in (
            topics.COMMANDS.name, topics.EVENTS.name, topics.DEAD_LETTER.name, NAIVE_COMMANDS)}
    if w_runs:
        c = w_runs[-1]["counters"]
        rate = statistics.median(w["rate"] for w in w_runs)
        figures.update({
            "worker_readings_per_s": rate,
            "worker_rounds_readings_per_s": [round(w["rate"]) for w in w_runs],
            "worker_seconds": statistics.median(w["seconds"] for w in w_runs),
            "worker_cpu_share": statistics.median(w["cpu_seconds"] / w["seconds"]
                                                  for w in w_runs),
            "worker_us_cpu_per_batch": statistics.median(1e6 * w["cpu_seconds"] / len(stream)
                                                         for w in w_runs),
            "broker_cpu_share": statistics.median(w["broker_cpu_seconds"] / w["seconds"]
                                                  for w in w_runs),
            "worker_batches_applied": [w["counters"]["batches"] for w in w_runs],
            "worker_readings_billed": c["readings"],
            "worker_errors": sum(w["errors"] for w in w_runs),
            "worker_commands_sent": [w["counters"]["commands_sent"] for w in w_runs],
            "commands_on_topic_all_rounds": totals[topics.COMMANDS.name],
            "events_on_topic_all_rounds": totals[topics.EVENTS.name],
            "dead_letters_on_topic": totals[topics.DEAD_LETTER.name],
            "changelog_records": [w["changelog"][0] for w in w_runs],
            "changelog_terminals": [w["changelog"][1] for w in w_runs],
            "worker_load_before": [w["load_before"] for w in w_runs],
            "worker_archive_load_s": w_runs[0]["loaded_s"],
        })
    if n_runs:
        nrate = statistics.median(n["rate"] for n in n_runs)
        figures.update({
            "naive_readings": n_runs[0]["readings"], "naive_terminals": naive_terminals,
            "naive_readings_per_s": nrate,
            "naive_rounds_readings_per_s": [round(n["rate"]) for n in n_runs],
            "naive_seconds": statistics.median(n["seconds"] for n in n_runs),
            "naive_cpu_share": statistics.median(n["cpu_seconds"] / n["seconds"]
                                                 for n in n_runs),
            "naive_us_cpu_per_reading": statistics.median(1e6 * n["cpu_seconds"] / n["readings"]
                                                          for n in n_runs),
            "naive_commands": [n["commands"] for n in n_runs],
            "naive_commands_on_topic_all_rounds": totals[NAIVE_COMMANDS],
            "naive_changelog_records": [n["changelog"][0] for n in n_runs],
            "naive_load_before": [n["load_before"] for n in n_runs],
        })
    if w_runs and n_runs:
        figures["worker_to_naive"] = figures["worker_readings_per_s"] / figures[
            "naive_readings_per_s"]
        figures["worker_to_naive_per_round"] = [round(w["rate"] / n["rate"], 1)
                                                for w, n in zip(w_runs, n_runs)]
    return figures


# --- part 3: payment to reconnect, through the whole pipeline ----------------------------------

LATENCY_APP = "bench-latency-worker"
FIELD_DEMO = ROOT / "config" / "field-demo.toml"
COLLECTOR_TOML = ROOT / "config" / "collector.toml"


def _free_run(n: int) -> int:
    """A base port with n free ports after it."""
    import socket

    rng = np.random.default_rng()
    for _ in range(100):
        base = int(rng.integers(20_000, 40_000))
        ok = True
        for port in range(base, base + n):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def latency_field_doc(collector_port: int, relay_delay_s: float) -> dict[str, Any]:
    """config/field-demo.toml as the demo runs it (speed 1: real time; its buses: concentrators
    with 20-80 ms turnaround, DTUs at 2400 baud 8E1 with 20-300 ms turnaround and 4 FE, the
    same fault rates), with every low-voltage customer below the cut-off threshold, no
    scheduled or random outages, and free ports."""
    import tomllib

    doc = tomllib.loads(FIELD_DEMO.read_text())
    doc["field"]["speed"] = 1.0
    doc["field"]["start"] = "now"
    doc["field"]["port_base"] = _free_run(40)
    doc["collector"]["port"] = collector_port
    doc["meters"]["relay_delay_s"] = relay_delay_s
    doc.pop("outages", None)
    doc["random_outages"] = {"per_day": 0.0}
    for g in doc["terminals"]:
        if g["kind"] in ("concentrator", "dtu"):
            g["balance_yuan"] = ["-5.00", "-0.50"]
    return doc


def field_main(doc: dict[str, Any], archive: str, pipe: Connection) -> None:
    _runner()(_field(doc, archive, pipe))


async def _field(doc: dict[str, Any], archive: str, pipe: Connection) -> None:
    """The field; reports every relay move (address, open, wall-clock ns) as it happens."""
    from meterfield.config import parse_config
    from meterfield.field import Field

    fld = Field(parse_config(doc, str(FIELD_DEMO), FIELD_DEMO.parent))
    await fld.start()
    fld.write_archive(archive)
    fleet, bank = fld.fleet, fld.bank
    pipe.send({"meters": fleet.n, "terminals": len(fld.terminals),
               "protected": int(fleet.protected.sum())})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def listen() -> None:
        pipe.recv()
        loop.call_soon_threadsafe(stop.set)

    loop.run_in_executor(None, listen)
    was = bank.relay_open.astype(bool).copy()
    while not stop.is_set():
        now = fld.now()
        due = bank.relay_due_ns <= now
        state = np.where(due, bank.relay_target, bank.relay_open).astype(bool)
        moved = np.flatnonzero(state != was)
        if moved.size:
            wall = time.time_ns()
            pipe.send([(fleet.address_of(int(i)), bool(state[i]), wall) for i in moved])
            was = state
        await asyncio.sleep(0.01)
    await fld.stop()
    pipe.send("stopped")


def collector_main(archive: str, dialin_port: int, bootstrap: str, confirm_poll_s: float,
                   spool: str, pipe: Connection) -> None:
    _runner()(_collector(archive, dialin_port, bootstrap, confirm_poll_s, spool, pipe))


async def _collector(archive: str, dialin_port: int, bootstrap: str, confirm_poll_s: float,
                     spool: str, pipe: Connection) -> None:
    """config/collector.toml as shipped, but for the dial-in port and confirm_poll_s."""
    import dataclasses

    from meterstream.collectors.archive import load_archive
    from meterstream.collectors.config import load_collector_config
    from meterstream.pipeline.collector_kafka import KafkaCollector

    base = load_collector_config(COLLECTOR_TOML)
    cfg = dataclasses.replace(base, dialin_port=dialin_port, confirm_poll_s=confirm_poll_s)
    col = KafkaCollector(load_archive(archive), cfg, bootstrap, spool_dir=spool,
                         session_timeout_s=3.0)
    await col.start()
    pipe.send("started")
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    summary = col.summary()
    await col.stop()
    pipe.send({"reads_ok": summary.get("reads_ok"), "commands": summary.get("commands")})


def latency_worker_main(bootstrap: str, archive: str, tariffs: str, data_dir: str,
                        pipe: Connection) -> None:
    _runner()(_latency_worker(bootstrap, archive, tariffs, data_dir, pipe))


async def _latency_worker(bootstrap: str, archive: str, tariffs: str, data_dir: str,
                          pipe: Connection) -> None:
    """start_worker (the worker, its payments intake, its API) with config/demo.toml's worker
    settings."""
    from meterstream.pipeline.config import WorkerConfig
    from meterstream.pipeline.runner import start_worker

    cfg = WorkerConfig(partitions=PARTITIONS, tick_s=1.0, kpi_s=5.0, cycle_s=60.0,
                       http_port=0, producer_max_batch_size=1)
    run = await start_worker(bootstrap, Path(archive), Path(tariffs), cfg,
                             data_dir=Path(data_dir), app_id=LATENCY_APP)
    pipe.send("started")
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    counters = dict(run.worker.core.counters)
    await run.stop()
    pipe.send({"counters": counters, "errors": run.worker.errors})


def _pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(np.ceil(q * len(s))) - 1))]


async def _latency_run(bootstrap: str, tmp: Path, n_pay: int, gap_s: float,
                       relay_delay_s: float, confirm_poll_s: float) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from meterstream.pipeline import topics
    from meterstream.pipeline.broker import free_port

    ctx = mp.get_context("spawn")
    archive = tmp / "field-archive.csv"
    dialin = free_port()
    fa, fb = ctx.Pipe()
    fproc = ctx.Process(target=field_main, args=(latency_field_doc(dialin, relay_delay_s),
                                                 str(archive), fb), daemon=True)
    fproc.start()
    finfo = fa.recv()
    wa, wb = ctx.Pipe()
    from meterstream.scenario import open_window_tariffs

    tariffs = open_window_tariffs(tmp, "tariffs-open-window.toml")
    wproc = ctx.Process(target=latency_worker_main, args=(
        bootstrap, str(archive), str(tariffs), str(tmp / "latency-worker"), wb), daemon=True)
    wproc.start()
    wa.recv()
    relay: dict[str, list[tuple[bool, int]]] = {}

    def drain_field() -> None:
        while fa.poll():
            for addr, is_open, wall in fa.recv():
                relay.setdefault(addr, []).append((is_open, wall))

    # everything on commands and results, with the wall-clock time it arrived here
    tap = AIOKafkaConsumer(topics.COMMANDS.name, topics.RESULTS.name, bootstrap_servers=bootstrap,
                           auto_offset_reset="latest", enable_auto_commit=False,
                           fetch_max_wait_ms=10)
    await tap.start()
    await tap.seek_to_end()
    seen_cmd: dict[str, list[tuple[dict[str, Any], int]]] = {}
    seen_res: dict[str, list[tuple[dict[str, Any], int]]] = {}

    async def tapping() -> None:
        async for msg in tap:
            now = time.time_ns()
            doc = json.loads(msg.value)
            if msg.topic == topics.COMMANDS.name:
                seen_cmd.setdefault(doc["meter"], []).append((doc, now))
            else:
                seen_res.setdefault(doc["meter"], []).append((doc, now))

    tap_task = asyncio.get_running_loop().create_task(tapping())
    ca, cb = ctx.Pipe()
    cproc = ctx.Process(target=collector_main, args=(str(archive), dialin, bootstrap,
                                                     confirm_poll_s, str(tmp / "spool"), cb),
                        daemon=True)
    cproc.start()
    ca.recv()
    t_start = time.monotonic()
    # phase 1: the customers below the threshold are cut off (their relays open in the field)
    last_change, n_open = time.monotonic(), 0
    while time.monotonic() - t_start < 400:
        await asyncio.sleep(0.5)
        drain_field()
        now_open = sum(1 for ev in relay.values() if ev[-1][0])
        if now_open != n_open:
            n_open, last_change = now_open, time.monotonic()
        elif n_open >= n_pay and time.monotonic() - last_change > 15:
            break
    cutoff_s = time.monotonic() - t_start
    cut = sorted(a for a, ev in relay.items() if ev[-1][0])
    rng = np.random.default_rng(11)
    payers = [cut[i] for i in rng.permutation(len(cut))[:n_pay]]
    print(f"latency: {len(cut)} customers cut off in the field after {cutoff_s:.0f} s; "
          f"{len(payers)} pay, one every ~{gap_s:g} s", flush=True)
    # phase 2: they pay, one at a time, spread over time while the collectors keep polling
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    paid: dict[str, int] = {}
    loads = []
    for k, addr in enumerate(payers):
        doc = {"payment_id": f"BENCH-{k:05d}", "meter": addr, "amount": "50.00",
               "status": "settled", "channel": "alipay",
               "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
        t0 = time.time_ns()
        await producer.send_and_wait(topics.PAYMENTS_IN.name, key=doc["payment_id"].encode(),
                                     value=json.dumps(doc).encode())
        paid[addr] = t0
        drain_field()
        if k % 50 == 0:
            loads.append(_loadavg())
        await asyncio.sleep(gap_s * float(rng.uniform(0.5, 1.5)))
    await producer.stop()

    def closed_at(addr: str) -> int | None:
        return next((w for is_open, w in relay.get(addr, []) if not is_open and w >= paid[addr]),
                    None)

    def command_at(addr: str) -> int | None:
        return next((t for d, t in seen_cmd.get(addr, [])
                     if d["action"] in ("close", "allow-close") and t >= paid[addr]), None)

    def confirmed_at(addr: str) -> int | None:
        return next((t for d, t in seen_res.get(addr, [])
                     if d.get("action") in ("close", "allow-close")
                     and d.get("outcome") == "confirmed" and t >= paid[addr]), None)

    end = time.monotonic() + 60
    while time.monotonic() < end and not all(confirmed_at(a) and closed_at(a) for a in payers):
        await asyncio.sleep(0.5)
        drain_field()
    tap_task.cancel()
    await asyncio.gather(tap_task, return_exceptions=True)
    await tap.stop()
    ca.send("stop")
    csum = ca.recv()
    wa.send("stop")
    wsum = wa.recv()
    fa.send("stop")
    while True:
        got = fa.recv()
        if got == "stopped":
            break
        for addr, is_open, wall in got:
            relay.setdefault(addr, []).append((is_open, wall))
    for p in (cproc, wproc, fproc):
        p.join(30)
    def since_paid(at: Any) -> list[float]:
        return [(t - paid[a]) / 1e9 for a in payers if (t := at(a)) is not None]

    cmd, conf, close = since_paid(command_at), since_paid(confirmed_at), since_paid(closed_at)
    out: dict[str, Any] = {
        "latency_field_meters": finfo["meters"], "latency_field_terminals": finfo["terminals"],
        "latency_relay_delay_s": relay_delay_s, "latency_confirm_poll_s": confirm_poll_s,
        "latency_cut_off_in_field": len(cut), "latency_cutoff_phase_s": cutoff_s,
        "latency_payments": len(payers), "latency_payment_gap_s": gap_s,
        "latency_commands_seen": len(cmd), "latency_confirmed_seen": len(conf),
        "latency_relays_closed": len(close),
        "latency_collector_reads_ok": csum["reads_ok"],
        "latency_worker_batches": wsum["counters"]["batches"],
        "latency_worker_payments": wsum["counters"]["payments"],
        "latency_worker_errors": wsum["errors"], "latency_load": " / ".join(loads),
    }
    # the slowest confirmations, with the collector's own times (sent = 1CH written,
    # acknowledged = 9CH back) and how many payers of the same terminal paid in the 10 s before

    def iso_ns(text: str | None) -> int | None:
        from datetime import datetime

        return int(datetime.fromisoformat(text).timestamp() * 1e9) if text else None

    slow = []
    for a in sorted((a for a in payers if confirmed_at(a)),
                    key=lambda a: confirmed_at(a) - paid[a], reverse=True)[:5]:  # type: ignore[operator]
        res = next(d for d, t in seen_res[a] if t == confirmed_at(a))
        tid = res.get("terminal", "?")
        busy = sum(1 for b in payers if b != a and paid[b] <= paid[a] and paid[a] - paid[b] < 10e9
                   and next((d.get("terminal") for d, _t in seen_cmd.get(b, [])), None) == tid)
        sent, acked = iso_ns(res.get("sent")), iso_ns(res.get("acknowledged"))
        slow.append(f"{tid} {a}: command {(command_at(a) - paid[a]) / 1e9:.2f} s, "  # type: ignore[operator]
                    f"1CH sent {(sent - paid[a]) / 1e9 if sent else float('nan'):.2f} s, "
                    f"9CH {(acked - paid[a]) / 1e9 if acked else float('nan'):.2f} s, "
                    f"confirmed {(confirmed_at(a) - paid[a]) / 1e9:.2f} s, "  # type: ignore[operator]
                    f"attempts {res.get('attempts')}, readbacks {res.get('readbacks')}, "
                    f"{busy} other payer(s) of the terminal in the 10 s before")
    out["latency_slowest"] = slow
    # the stages, from the collector's own times in its confirmed results: command on the wire
    # -> 1CH written (waiting in the terminal's job queue, behind its bus), 1CH -> confirmed
    queue, execute = [], []
    for a in payers:
        ct, ft = command_at(a), confirmed_at(a)
        if ct and ft:
            res = next(d for d, t in seen_res[a] if t == ft)
            sent = iso_ns(res.get("sent"))
            if sent:
                queue.append((sent - ct) / 1e9)
                execute.append((ft - sent) / 1e9)
    for name, xs in (("command_to_1ch", queue), ("1ch_to_confirmed", execute)):
        if xs:
            out[f"latency_{name}_p50_s"] = statistics.median(xs)
            out[f"latency_{name}_p99_s"] = _pct(xs, 0.99)
    # what else the slowest one's terminal had on the commands topic in the minute before
    if slow:
        a = max((a for a in payers if confirmed_at(a)),
                key=lambda a: confirmed_at(a) - paid[a])  # type: ignore[operator]
        tid = next(d["terminal"] for d, _t in seen_cmd[a])
        others = sorted((t, d["action"], d["meter"]) for m, lst in seen_cmd.items()
                        for d, t in lst if d["terminal"] == tid and m != a
                        and paid[a] - 60e9 <= t <= paid[a] + 60e9)
        out["latency_slowest_own_messages"] = sorted(
            [f"{(t - paid[a]) / 1e9:+.2f} s command {d['id']} {d['action']}"
             for d, t in seen_cmd.get(a, []) if t >= paid[a] - 60e9]
            + [f"{(t - paid[a]) / 1e9:+.2f} s result {d.get('id')} {d.get('outcome')}: "
               f"{d.get('detail', '')}" for d, t in seen_res.get(a, []) if t >= paid[a] - 60e9],
            key=lambda x: float(x.split(" s ", 1)[0]))
        out["latency_slowest_terminal_other_commands"] = [
            f"{(t - paid[a]) / 1e9:+.1f} s {act} {m}" for t, act, m in others][:20]
    for name, xs in (("command", cmd), ("confirmed", conf), ("relay_closed", close)):
        if xs:
            out[f"latency_pay_to_{name}_p50_s"] = statistics.median(xs)
            out[f"latency_pay_to_{name}_p99_s"] = _pct(xs, 0.99)
            out[f"latency_pay_to_{name}_max_s"] = max(xs)
    return out


def latency(tmp: Path, n_pay: int, gap_s: float, relay_delay_s: float,
            confirm_poll_s: float) -> dict[str, Any]:
    from meterstream.pipeline.broker import EmbeddedBroker
    from meterstream.pipeline.runner import all_topics

    with EmbeddedBroker(topics=all_topics(LATENCY_APP), partitions=PARTITIONS) as broker:
        return asyncio.run(_latency_run(broker.bootstrap, tmp, n_pay, gap_s, relay_delay_s,
                                        confirm_poll_s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--part", choices=("worker", "naive", "throughput", "latency", "all"),
                    default="all")
    ap.add_argument("--terminals", type=int, default=2000)
    ap.add_argument("--meters", type=int, default=250)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--naive-terminals", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--payments", type=int, default=200)
    ap.add_argument("--payment-gap-s", type=float, default=3.0)
    ap.add_argument("--relay-delay-s", type=float, default=1.0,
                    help="the field's relay delay (field-demo.toml: 1.0; the demo runs at speed 1)")
    ap.add_argument("--confirm-poll-s", type=float, default=0.5,
                    help="the collector's read-back interval (config/collector.toml: 0.5)")
    ap.add_argument("--name", default="pipeline")
    args = ap.parse_args()
    parts = {"worker", "naive", "latency"} if args.part == "all" else (
        {"worker", "naive"} if args.part == "throughput" else {args.part})
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as d:
        tmp = Path(d)
        if parts & {"worker", "naive"}:
            figures.update(throughput(tmp, args.terminals, args.meters, args.cycles,
                                      args.naive_terminals, parts, args.rounds))
        if "latency" in parts:
            figures.update(latency(tmp, args.payments, args.payment_gap_s,
                                   args.relay_delay_s, args.confirm_poll_s))
    report(args.name, figures, notes="see the module docstring of bench/bench_pipeline.py")


if __name__ == "__main__":
    main()
