"""The money invariant of a scenario run, from what is in Kafka after it.

The traffic the workers saw is what the readings and payments topics hold (duplicates and late
copies included); the balances they reached are the last value of each terminal in the state
table's changelog, decoded with the worker's own `WorkerCore.load_state`. For every meter:
initial + settled payments - charges = balance, to the micro-yuan, and balance, charges and
payments equal `meterstream replay` on the same traffic. Never touches a float for money.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meterstream.collectors.batch import OUTCOME_OK, ReadingBatch


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


async def read_topics(bootstrap: str, names: Iterable[str], *, quiet_s: float = 1.5,
                      timeout_s: float = 60.0) -> dict[str, list[Msg]]:
    """Every message of `names` from the beginning to the end offsets, and on until nothing new
    came for `quiet_s` (Tansu's end offsets can be short after batched produces)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    names = list(names)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="scenario-reader",
                                enable_auto_commit=False, fetch_max_wait_ms=50,
                                max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    out: dict[str, list[Msg]] = {n: [] for n in names}
    try:
        tps = [TopicPartition(n, p) for n in names
               for p in sorted(consumer.partitions_for_topic(n) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        quiet_since = None
        while loop.time() < deadline:
            got = await consumer.getmany(timeout_ms=250, max_records=10_000)
            for tp, msgs in got.items():
                out[tp.topic].extend(Msg(tp.topic, tp.partition, m.offset, m.key, m.value,
                                         m.timestamp, tuple(m.headers or ())) for m in msgs)
            reached = all([await consumer.position(tp) >= ends[tp] for tp in tps])
            if got or not reached:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= quiet_s:
                break
    finally:
        await consumer.stop()
    return out


async def group_lag(bootstrap: str, group: str, names: Iterable[str]) -> int:
    """Messages of `names` not yet committed by consumer group `group` (committed offsets are
    read with a consumer's `committed`, which Tansu answers; docs/broker.md)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                client_id="scenario-lag", enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(n, p) for n in names
               for p in sorted(consumer.partitions_for_topic(n) or ())]
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        lag = 0
        for tp in tps:
            done = await consumer.committed(tp)
            lag += max(0, ends[tp] - (done if done is not None else begins[tp]))
        return lag
    finally:
        await consumer.stop()


def _iso(ns: int) -> str:
    """UTC ISO 8601 with all nine digits (the replay parser reads them exactly)."""
    s, frac = divmod(ns, 10**9)
    return datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def _kwh(centi: int) -> str:
    return f"{centi // 100}.{centi % 100:02d}"


def _yuan2(micro: int) -> str:
    assert micro % 10_000 == 0, micro  # payments are whole fen
    return f"{micro // 1_000_000}.{micro // 10_000 % 100:02d}"


def micro_of(yuan: str) -> int:
    """Exact micro-yuan of a decimal string with at most 6 decimals ('-1.5' -> -1500000)."""
    from meterstream.pipeline.tariffs import parse_units

    return parse_units(yuan, 6, signed=True)


def write_replay_inputs(out: Path, readings: list[Msg], payments: list[Msg]) -> tuple[int, int]:
    """The readings and routed payments the workers saw, as `meterstream replay` reads them
    (readings.csv, payments.csv in `out`); (reading rows, payment rows). The same rows the
    worker bills: ok rows with a total (a 1997 meter's missing T1..T4 as 0, as the worker does)."""
    n_r = 0
    with open(out / "readings.csv", "w", newline="", encoding="utf-8") as fh:
        fh.write("ts,meter,total,t1,t2,t3,t4\n")
        for m in readings:
            if not m.value:
                continue
            b = ReadingBatch.from_bytes(m.value)
            for i in range(len(b)):
                regs = [int(v) for v in b.registers[i]]
                if int(b.outcome[i]) != OUTCOME_OK or regs[0] < 0:
                    continue
                regs = [regs[0]] + [max(0, r) for r in regs[1:]]
                fh.write(f"{_iso(int(b.ts[i]))},{int(b.meter[i]):012d},"
                         f"{','.join(_kwh(r) for r in regs)}\n")
                n_r += 1
    n_p = 0
    with open(out / "payments.csv", "w", newline="", encoding="utf-8") as fh:
        fh.write("ts,payment_id,meter,amount,status,channel\n")
        for m in payments:
            if not m.value:
                continue
            p = json.loads(m.value)
            fh.write(f"{_iso(int(p['ts_ns']))},{p['payment_id']},{p['meter']},"
                     f"{_yuan2(int(p['amount_micro_yuan']))},{p['status']},{p['channel']}\n")
            n_p += 1
    return n_r, n_p


def settled_by_meter(payments: list[Msg]) -> dict[str, int]:
    """micro-yuan per meter of the payment ids that settled (each id once, whatever order and
    however often its rows came): what the ledger must have credited."""
    amount: dict[str, tuple[str, int]] = {}
    for m in payments:
        if not m.value:
            continue
        p = json.loads(m.value)
        if p["status"] == "settled":
            amount[p["payment_id"]] = (p["meter"], int(p["amount_micro_yuan"]))
    out: dict[str, int] = {}
    for meter, micro in amount.values():
        out[meter] = out.get(meter, 0) + micro
    return out


@dataclass
class MeterMoney:
    initial: int
    paid: int
    charged: int
    balance: int


def worker_money(archive: Path, tariffs: Path, changelog: list[Msg],
                 trail: Path | None = None) -> tuple[dict[str, MeterMoney], list[str]]:
    """Every meter's money as the workers left it: the last changelog value of each terminal,
    loaded into a fresh WorkerCore (a terminal never written keeps its initial state).
    `trail`: a CSV of every changelog record (where, the terminal's last batch, its meters'
    paid and charged sums), to see where a terminal's state went back. Also returns those
    regressions: a record whose last batch, paid or charged sum is below the terminal's
    previous record (none of them ever goes down: a state written from a stale or initial
    copy is money lost even when later events hide it)."""
    from meterstream.pipeline.worker import WorkerCore

    core = WorkerCore(archive, tariffs)
    last: dict[str, bytes] = {}
    probe = WorkerCore(archive, tariffs) if trail is not None else None
    rows = ["partition,offset,timestamp_ms,terminal,last_batch_ns,paid_micro,charged_micro"]
    prev: dict[str, tuple[int, int, int]] = {}
    back: list[str] = []
    for m in changelog:  # one partition per terminal key: offsets in order within it
        if m.key is not None:
            key = json.loads(m.key) if m.key[:1] == b'"' else m.key.decode()
            if m.value is None:
                last.pop(key, None)
            else:
                last[key] = m.value
                if probe is not None and key in probe.terminal_index:
                    probe.load_state(key, m.value)
                    sl = probe.fleet.block(probe.terminal_index[key])
                    now = (probe.last_batch.get(key, 0), int(probe.fleet.cold["paid"][sl].sum()),
                           int(probe.fleet.hot["charged"][sl].sum()))
                    rows.append(f"{m.partition},{m.offset},{m.timestamp_ms},{key},"
                                f"{now[0]},{now[1]},{now[2]}")
                    was = prev.get(key)
                    if was is not None and any(n < w for n, w in zip(now, was, strict=True)):
                        back.append(f"{key} at changelog {m.partition}/{m.offset}: (last batch, "
                                    f"paid, charged) {now} after {was}")
                    prev[key] = now
    if trail is not None:
        trail.write_text("\n".join(rows) + "\n")
    for terminal, value in last.items():
        if terminal in core.terminal_index:
            core.load_state(terminal, value)
    hot, cold = core.fleet.hot, core.fleet.cold
    return {a: MeterMoney(int(cold["initial"][s]), int(cold["paid"][s]), int(hot["charged"][s]),
                          int(hot["balance"][s])) for s, a in enumerate(core.addresses)}, back


def replay_money(out: Path) -> dict[str, tuple[int, int, int]]:
    """meter -> (balance, charged, paid) micro-yuan from replay's balances.csv."""
    got = {}
    with open(out / "balances.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            got[row["meter"]] = (micro_of(row["balance"]), micro_of(row["charged"]),
                                 micro_of(row["paid"]))
    return got


@dataclass
class Invariant:
    meters: int = 0
    settled_micro: int = 0
    charged_micro: int = 0
    lost_micro: int = 0  # sum over meters of |initial + settled - charged - balance|
    ledger_bad: list[str] = field(default_factory=list)  # initial + settled - charged != balance
    replay_bad: list[str] = field(default_factory=list)  # balance/charged/paid != replay
    paid_bad: list[str] = field(default_factory=list)  # the ledger's paid != settled payments

    @property
    def ok(self) -> bool:
        return not (self.ledger_bad or self.replay_bad or self.paid_bad)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "meters": self.meters, "settled_micro_yuan": self.settled_micro,
                "charged_micro_yuan": self.charged_micro, "money_lost_micro_yuan": self.lost_micro,
                "ledger_mismatches": self.ledger_bad[:20], "replay_mismatches": self.replay_bad[:20],
                "paid_mismatches": self.paid_bad[:20]}


def check_invariant(money: dict[str, MeterMoney], settled: dict[str, int],
                    replay: dict[str, tuple[int, int, int]]) -> Invariant:
    inv = Invariant(meters=len(money))
    for meter, m in money.items():
        s = settled.get(meter, 0)
        inv.settled_micro += s
        inv.charged_micro += m.charged
        gap = m.initial + s - m.charged - m.balance
        inv.lost_micro += abs(gap)
        if gap:
            inv.ledger_bad.append(f"{meter}: initial {m.initial} + settled {s} - charged "
                                  f"{m.charged} = {m.initial + s - m.charged}, balance {m.balance}")
        if m.paid != s:
            inv.paid_bad.append(f"{meter}: ledger paid {m.paid}, settled payments {s}")
        r = replay.get(meter)
        if r is None or r != (m.balance, m.charged, m.paid):
            inv.replay_bad.append(f"{meter}: worker (balance, charged, paid) "
                                  f"{(m.balance, m.charged, m.paid)}, replay {r}")
    return inv
