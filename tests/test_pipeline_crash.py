"""The worker killed with SIGKILL mid-stream (several times) and restarted: every balance ends
equal, to the micro-yuan, to `meterstream replay` on the same traffic. And two workers share
the partitions: when one stops, the other takes its terminals over with their state.

The traffic is seeded and deterministic: cumulative registers of 120 meters behind 6 terminals
over 30 cycles, and payments (settled, sent twice, pending then settled, pending then failed).
The workers are real `meterstream worker` processes on a real broker (Tansu on loopback).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from meterstream.collectors.batch import NO_DRIFT, OUTCOME_OK, ReadingBatch
from meterstream.pipeline import topics
from meterstream.pipeline.broker import EmbeddedBroker, free_port
from meterstream.pipeline.replay import run_replay
from meterstream.pipeline.runner import all_topics

ROOT = Path(__file__).resolve().parents[1]
TERMINALS = [f"T{t:02d}" for t in range(1, 7)]
PER_TERMINAL = 20
CYCLES = 30
T0 = 1_717_203_600 * 10**9  # 2024-06-01 09:00 local (Asia/Shanghai), a Saturday
CYCLE_NS = 900 * 10**9  # 15 minutes


def meters() -> list[tuple[str, str]]:
    return [(f"3300{t + 1:02d}00{k + 1:04d}", tid) for t, tid in enumerate(TERMINALS)
            for k in range(PER_TERMINAL)]


def write_archive(path: Path) -> None:
    rng = random.Random(5)
    rows = ["meter,terminal,area,class,plan,protected,initial_balance,role"]
    for i, (m, tid) in enumerate(meters()):
        plan = "residential_tou" if i % 3 else "residential_flat"
        rows.append(f"{m},{tid},A{1 + i // 60},lowvoltage,{plan},{int(i % 17 == 0)},"
                    f"{rng.randint(-5, 60)}.{rng.randint(0, 99):02d},customer")
    path.write_text("\n".join(rows) + "\n")


def traffic(t0: int = T0) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]]]:
    """(batches: (terminal, bytes) in cycle order, payments: channel documents with ts)."""
    rng = random.Random(11)
    regs = {m: [rng.randint(100_000, 500_000)] + [0, 0, 0, 0] for m, _ in meters()}
    for r in regs.values():
        r[1:] = [r[0] // 4] * 3 + [r[0] - 3 * (r[0] // 4)]
    batches = []
    for c in range(CYCLES):
        started = t0 + c * CYCLE_NS
        for tid in TERMINALS:
            rows = []
            for m, t in meters():
                if t != tid:
                    continue
                d = [rng.randint(0, 40) for _ in range(4)]  # 0..0.40 kWh per tariff
                regs[m][1:] = [a + b for a, b in zip(regs[m][1:], d)]
                regs[m][0] += sum(d)
                rows.append((int(m), started + 1_000_000, *regs[m], 0x0000, OUTCOME_OK, 0,
                             NO_DRIFT))
            batches.append((tid, ReadingBatch.from_rows(tid, c + 1, started, started + 2_000_000,
                                                        rows).to_bytes()))
    payments = []
    addresses = [m for m, _ in meters()]
    for n in range(40):
        ts = t0 + rng.randint(0, CYCLES - 1) * CYCLE_NS + 500_000_000
        doc = {"payment_id": f"P{n:03d}", "meter": rng.choice(addresses),
               "amount": f"{rng.randint(5, 80)}.{rng.randint(0, 99):02d}", "status": "settled",
               "channel": "alipay", "ts_ns": ts}
        if n % 7 == 3:  # a bank withholding: pending, then settled or failed
            payments.append({**doc, "status": "pending", "channel": "bank"})
            doc = {**doc, "status": "failed" if n % 2 else "settled", "channel": "bank",
                   "ts_ns": ts + CYCLE_NS}
        payments.append(doc)
        if n % 5 == 0:
            payments.append(dict(doc))  # sent twice by the channel
    payments.sort(key=lambda d: d["ts_ns"])
    return batches, payments


def iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+08:00", time.gmtime(ns / 1e9 + 8 * 3600))


def write_replay_inputs(tmp: Path, batches: list[tuple[str, bytes]],
                        payments: list[dict[str, Any]]) -> None:
    lines = ["ts,meter,total,t1,t2,t3,t4"]
    for _tid, raw in batches:
        b = ReadingBatch.from_bytes(raw)
        for i in range(len(b)):
            regs = [f"{int(v) // 100}.{int(v) % 100:02d}" for v in b.registers[i]]
            lines.append(f"{iso(int(b.ts[i]))},{int(b.meter[i]):012d},{','.join(regs)}")
    (tmp / "readings.csv").write_text("\n".join(lines) + "\n")
    rows = ["ts,payment_id,meter,amount,status,channel"]
    rows += [f"{iso(p['ts_ns'])},{p['payment_id']},{p['meter']},{p['amount']},{p['status']},"
             f"{p['channel']}" for p in payments]
    (tmp / "payments.csv").write_text("\n".join(rows) + "\n")


def replay_balances(tmp: Path) -> dict[str, str]:
    run_replay(tmp / "a.csv", tmp / "readings.csv", tmp / "payments.csv",
               ROOT / "config" / "tariffs-example.toml", tmp / "replay", progress=False)
    out = {}
    for line in (tmp / "replay" / "balances.csv").read_text().splitlines()[1:]:
        meter, balance, *_ = line.split(",")
        out[meter] = balance
    return out


class Worker:
    """`meterstream worker` as a subprocess."""

    def __init__(self, tmp: Path, bootstrap: str, name: str) -> None:
        self.port = free_port()
        cfg = tmp / f"{name}.toml"
        cfg.write_text(f"[worker]\npartitions = 2\nhttp_port = {self.port}\ntick_s = 0.5\n"
                       "producer_max_batch_size = 1\n")
        self.args = [sys.executable, "-m", "meterstream", "worker", "--broker",
                     f"kafka://{bootstrap}", "--archive", str(tmp / "a.csv"), "--tariffs",
                     str(ROOT / "config" / "tariffs-example.toml"), "--config", str(cfg),
                     "--data-dir", str(tmp / name)]
        self.log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=self.log, cwd=ROOT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.log.close()

    def tail(self) -> str:
        """The end of its log, for an assertion message."""
        return Path(self.log.name).read_bytes()[-3000:].decode("utf-8", "replace")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def balances(self, addresses: list[str]) -> dict[str, str]:
        out = {}
        for a in addresses:
            try:
                out[a] = self.get(f"/api/meters/{a}")["balance"]
            except OSError:
                return {}
        return out


async def produce(bootstrap: str, batches: list[tuple[str, bytes]],
                  payments: list[dict[str, Any]], *, pace_s: float,
                  on_step: Any = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        pays = iter(payments)
        nxt = next(pays, None)
        for k, (tid, raw) in enumerate(batches):
            started = ReadingBatch.from_bytes(raw).started_ns
            while nxt is not None and nxt["ts_ns"] <= started + CYCLE_NS:
                doc = {**nxt, "ts": iso(nxt["ts_ns"])}
                del doc["ts_ns"]
                await producer.send_and_wait(topics.PAYMENTS_IN.name,
                                             key=doc["payment_id"].encode(),
                                             value=json.dumps(doc).encode())
                nxt = next(pays, None)
            await producer.send_and_wait(topics.READINGS.name, key=tid.encode(), value=raw)
            if on_step is not None:
                on_step(k)
            await asyncio.sleep(pace_s)
        while nxt is not None:
            doc = {**nxt, "ts": iso(nxt["ts_ns"])}
            del doc["ts_ns"]
            await producer.send_and_wait(topics.PAYMENTS_IN.name, key=doc["payment_id"].encode(),
                                         value=json.dumps(doc).encode())
            nxt = next(pays, None)
    finally:
        await producer.stop()


def wait_equal(workers: list[Worker], want: dict[str, str], timeout: float = 120.0) -> None:
    """Poll the workers' API until every balance equals `want` (each meter from any worker
    that answers for it); AssertionError with the differences after `timeout`."""
    end = time.monotonic() + timeout
    got: dict[str, str] = {}
    while time.monotonic() < end:
        got = {}
        for w in workers:
            for a, b in w.balances(list(want)).items():
                if b == want[a]:
                    got[a] = b
        if len(got) == len(want):
            return
        time.sleep(1.0)
    missing = {a: want[a] for a in want if a not in got}
    raise AssertionError(f"{len(missing)} balances differ from replay, e.g. "
                         f"{list(missing.items())[:3]}")


@pytest.mark.slow
def test_sigkill_the_worker_mid_stream_balances_equal_replay(tmp_path: Path) -> None:
    write_archive(tmp_path / "a.csv")
    batches, payments = traffic()
    write_replay_inputs(tmp_path, batches, payments)
    want = replay_balances(tmp_path)
    assert len(want) == len(meters())

    with EmbeddedBroker(topics=all_topics("meterstream-worker"), partitions=2) as broker:
        w = Worker(tmp_path, broker.bootstrap, "w1")
        w.start()
        kills = {len(batches) // 5, len(batches) // 2, 4 * len(batches) // 5}
        done = []

        def step(k: int) -> None:
            if k in kills:
                w.kill()  # SIGKILL: no flush, no commit, no goodbye
                done.append(k)
                w.start()

        asyncio.run(produce(broker.bootstrap, batches, payments, pace_s=0.05, on_step=step))
        assert len(done) == 3
        try:
            wait_equal([w], want)
        finally:
            assert w.stop() == 0, w.tail()


@pytest.mark.slow
def test_two_workers_share_and_one_takes_over(tmp_path: Path) -> None:
    write_archive(tmp_path / "a.csv")
    batches, payments = traffic()
    write_replay_inputs(tmp_path, batches, payments)
    want = replay_balances(tmp_path)
    half = len(batches) // 2

    with EmbeddedBroker(topics=all_topics("meterstream-worker"), partitions=2) as broker:
        a, b = Worker(tmp_path, broker.bootstrap, "wa"), Worker(tmp_path, broker.bootstrap, "wb")
        a.start()
        b.start()
        first = [p for p in payments if p["ts_ns"] <= ReadingBatch.from_bytes(
            batches[half - 1][1]).started_ns + CYCLE_NS]
        asyncio.run(produce(broker.bootstrap, batches[:half], first, pace_s=0.01))
        # both hold terminals
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                held = (a.get("/api/summary")["terminals_held"],
                        b.get("/api/summary")["terminals_held"])
            except OSError:
                held = (0, 0)
            if held[0] and held[1] and sum(held) == len(TERMINALS):
                break
            time.sleep(0.5)
        assert held[0] and held[1] and sum(held) == len(TERMINALS), held
        assert b.stop() == 0, b.tail()  # b leaves: a takes its partitions and their state
        rest = [p for p in payments if p not in first]
        asyncio.run(produce(broker.bootstrap, batches[half:], rest, pace_s=0.01))
        try:
            wait_equal([a], want)
        finally:
            assert a.stop() == 0, a.tail()
