"""The seeded scenario runner: field, collectors, workers, payments and faults, then the money
invariant (`meterstream scenario`, docs/reliability.md).

One run starts the embedded broker behind a TCP proxy (scenario_proxy.LinkProxy), the simulated
field in real time (speed 1: readings carry the collector's clock), the collectors on Kafka in
this process, `meterstream worker` processes, a seeded payment stream (duplicates, out-of-order
delivery, withholdings that settle or fail) and the chosen faults on a schedule drawn from the
seed. At the end it reads what the workers saw from Kafka, replays it, and checks that
initial + settled payments - charges = balances for every meter, to the micro-yuan, and that the
balances equal `meterstream replay` (scenario_check). It never edits what it checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterstream.errors import UserError

FAULTS = ("kill", "workers", "broker-link", "influx-down", "flap", "dup")
ROOT = Path(__file__).resolve().parents[2]
APP_ID = "meterstream-worker"
INTAKE_GROUP = "payments-intake"
COLLECTOR_CLIENT = "meterstream-collector"  # the client-id prefix the link cut drops
REORDER_SHARE = 0.05  # dup: batches (after a terminal's first) delivered after the next one
VM_BIN = "/usr/bin/victoria-metrics"


@dataclass(frozen=True)
class ScenarioConfig:
    seed: int
    out: Path
    minutes: float = 3.0
    faults: frozenset[str] = frozenset()
    link_cut_s: float = 60.0  # the broker-link fault (clamped to 40 % of the run)
    influx_down_s: float = 600.0  # the influx-down fault (clamped to 50 % of the run)
    kills: int = 3  # SIGKILLs of the kill fault
    areas: int = 3
    cycle_s: float = 2.0  # the collectors' poll cycle
    flap_share: float = 0.3
    pay_every_s: float = 0.5
    partitions: int = 4
    rss_every_s: float = 2.0

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0


def parse_faults(text: str) -> frozenset[str]:
    names = [f.strip() for f in text.split(",") if f.strip()] if text else []
    for n in names:
        if n not in FAULTS:
            raise UserError(f"unknown fault {n!r}: one of {', '.join(FAULTS)}", where="--faults")
    return frozenset(names)


# --- the schedule -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    at_s: float
    action: str  # kill, start-worker, stop-worker, link-cut, link-restore, influx-stop, ...
    arg: int = 0


def schedule(cfg: ScenarioConfig) -> list[Step]:
    """The faults' moments, drawn from the seed (the same seed gives the same schedule)."""
    rng = random.Random(cfg.seed * 7919 + 1)
    T = cfg.seconds
    steps: list[Step] = []
    if "kill" in cfg.faults:
        for _ in range(cfg.kills):
            steps.append(Step(round(rng.uniform(0.15, 0.8) * T, 2), "kill",
                              rng.randrange(1 << 16)))
    if "workers" in cfg.faults:
        # two workers at start; a third joins; one leaves; another joins (3 again)
        # (spread out: each change of the group has a rebalance to finish first)
        a, b, c = (rng.uniform(lo, lo + 0.12) * T for lo in (0.15, 0.4, 0.62))
        steps += [Step(round(a, 2), "start-worker"), Step(round(b, 2), "stop-worker",
                                                          rng.randrange(1 << 16)),
                  Step(round(c, 2), "start-worker")]
    if "broker-link" in cfg.faults:
        d = min(cfg.link_cut_s, 0.4 * T)
        at = rng.uniform(0.15, 0.85 * T - d) if 0.85 * T - d > 0.15 else 0.15
        steps += [Step(round(at, 2), "link-cut"), Step(round(at + d, 2), "link-restore")]
    if "influx-down" in cfg.faults:
        d = min(cfg.influx_down_s, 0.5 * T)
        at = rng.uniform(0.1 * T, max(0.1 * T, 0.85 * T - d))
        steps += [Step(round(at, 2), "influx-stop"), Step(round(at + d, 2), "influx-start")]
    return sorted(steps, key=lambda s: (s.at_s, s.action))


# --- the field and its configuration --------------------------------------------------------------

def field_doc(cfg: ScenarioConfig, dialin_port: int) -> dict[str, Any]:
    """config/field-test.toml at speed 1 from now, `areas` areas, and customers around the
    cut-off threshold (so that cut-offs, reconnections and payments all happen)."""
    doc = copy.deepcopy(tomllib.loads((ROOT / "config" / "field-test.toml").read_text()))
    doc["field"].update(speed=1.0, start="now", seed=cfg.seed)
    doc["areas"]["count"] = cfg.areas
    doc["collector"]["port"] = dialin_port
    doc["meters"]["relay_delay_s"] = 0.3
    conc = next(g for g in doc["terminals"] if g["kind"] == "concentrator")
    conc["balance_yuan"] = ["-5.00", "12.00"]
    conc["share_protected"] = 0.2
    return doc


def fast_collector_config(dialin_port: int, cycle_s: float = 2.0) -> Any:
    """config/collector.toml for a run of minutes on loopback: a `cycle_s` poll cycle, short
    timeouts, one retry, no clock reads, read-backs 0.2 s apart; the collectors of this runner,
    the end-to-end and the dashboard tests."""
    from meterstream.collectors.config import load_collector_config

    base = load_collector_config(ROOT / "config" / "collector.toml")
    return dataclasses.replace(
        base, poll=dataclasses.replace(base.poll, cycle_s=cycle_s, timeout_s=0.5, retries=1,
                                       clock_every=0),
        dialin_port=dialin_port, confirm_poll_s=0.2, confirm_timeout_s=10.0,
        modbus_timeout_s=0.5)


def open_window_tariffs(out: Path, name: str = "tariffs.toml") -> Path:
    """The example tariffs with no holidays and a cut-off window open at every hour of every
    day, written to out/name: runs that must see cut-offs whenever they run (this runner, the
    end-to-end and dashboard tests, bench_pipeline's latency part) use it."""
    text = (ROOT / "config" / "tariffs-example.toml").read_text()
    text = re.sub(r"(?ms)^holidays = \[.*?^\]\n", "holidays = []\n", text, count=1)
    text = re.sub(r"(?m)^days = \[.*\]$", 'days = ["mon", "tue", "wed", "thu", "fri", "sat", '
                  '"sun"]', text, count=1)
    text = re.sub(r'(?m)^start = "08:00"$', 'start = "00:00"', text, count=1)
    text = re.sub(r'(?m)^end = "18:00"$', 'end = "24:00"', text, count=1)
    path = out / name
    path.write_text(text)
    return path


# --- worker processes ---------------------------------------------------------------------------

def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class WorkerProc:
    """One `meterstream worker` subprocess (restartable on the same data directory)."""

    def __init__(self, out: Path, name: str, bootstrap: str, archive: Path, tariffs: Path,
                 cfg: ScenarioConfig, influx_url: str | None) -> None:
        self.name = name
        self.dir = out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "worker.toml"
        # http_port 0: any free port (two workers picking "free" ports at once can collide)
        text = (f"[worker]\npartitions = {cfg.partitions}\nhttp_port = 0\n"
                f"tick_s = 0.5\nkpi_s = 2.0\ncycle_s = {cfg.cycle_s}\n"
                "producer_max_batch_size = 1\n"
                "[commands]\nresult_timeout_s = 30.0\nbackoff_base_s = 2.0\nbackoff_cap_s = 20.0\n")
        if influx_url:  # one spool root for all: each takes a slot, a stopped one's is adopted
            text += (f'[influx]\nurl = "{influx_url}"\norg = "county"\nbucket = "meterstream"\n'
                     f'spool_dir = "{out / "influx-spool"}"\nbatch_size = 500\n'
                     "flush_s = 0.5\ntimeout_s = 3.0\nbackoff_s = [0.2, 2.0]\n")
        conf.write_text(text)
        self.args = [sys.executable, "-m", "meterstream", "worker", "--broker",
                     f"kafka://{bootstrap}", "--archive", str(archive), "--tariffs", str(tariffs),
                     "--config", str(conf), "--data-dir", str(self.dir), "--app-id", APP_ID]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.stop_timeouts = 0
        self.stopped = False  # stopped by the runner (a clean stop), not to be restarted

    def start(self) -> None:
        env = {**os.environ, "METERSTREAM_INFLUX_TOKEN": "scenario-token"}
        with open(self.dir / "worker.log", "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=env, cwd=ROOT)
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no goodbye."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    def stop(self) -> int | None:
        """SIGTERM, a clean stop; SIGKILL after 30 s (counted in `stop_timeouts`)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.stopped = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.stop_timeouts += 1
            self.proc.kill()
            return self.proc.wait(10)

    def rss(self) -> int | None:
        return rss_kb(self.proc.pid) if self.alive and self.proc is not None else None


# --- VictoriaMetrics (the InfluxDB v2 write API) -----------------------------------------------------

class Victoria:
    def __init__(self, data: Path, binary: str = VM_BIN) -> None:
        from meterstream.pipeline.broker import free_port

        if not os.access(binary, os.X_OK):
            raise UserError(f"{binary} not found: the influx-down fault needs VictoriaMetrics "
                            "(apt-get install victoria-metrics, or bash scripts/setup.sh --test)",
                            where="--faults influx-down")
        self.binary, self.data, self.port = binary, data, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.data.parent / "victoria-metrics.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"-httpListenAddr=127.0.0.1:{self.port}",
                 f"-storageDataPath={self.data}", "-search.latencyOffset=0s",
                 "-loggerLevel=ERROR"], stdout=log, stderr=log)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("victoria-metrics did not answer /health")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def reading_keys(self) -> set[tuple[str, str, int]]:
        """(terminal, class, ts ms) of every reading_total_centikwh sample it holds."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10).close()
        q = urllib.parse.urlencode({"match[]": '{__name__="reading_total_centikwh"}',
                                    "start": "0"})
        got: set[tuple[str, str, int]] = set()
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{q}", timeout=30) as r:
            for line in r.read().splitlines():
                if line.strip():
                    s = json.loads(line)
                    m = s["metric"]
                    for t in s["timestamps"]:
                        got.add((m.get("terminal", ""), m.get("class", ""), int(t)))
        return got


# --- the payment channels -------------------------------------------------------------------------

class PaymentChannels:
    """A seeded stream of channel payments with delivery delays: top-ups (some sent twice, the
    copy later), withholdings (pending, then settled or failed; some settled row delivered before
    its pending one), and every message delivered after a random delay, so delivery order is not
    payment order."""

    def __init__(self, rng: random.Random, meters: list[str], bootstrap: str) -> None:
        self.rng, self.meters, self.bootstrap = rng, meters, bootstrap
        self.queue: list[tuple[float, int, dict[str, Any]]] = []
        self.n = 0
        self.sent = 0
        self.duplicates = 0
        self.reordered = 0
        self.withholdings = {"settled": 0, "failed": 0}
        self._producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                          client_id="scenario-payments")
        await self._producer.start()

    def _at(self, delay: float, doc: dict[str, Any]) -> None:
        self.queue.append((time.monotonic() + delay, len(self.queue) + self.sent, doc))

    def make(self) -> None:
        rng = self.rng
        self.n += 1
        ts_ns = time.time_ns()
        doc = {"payment_id": f"SC-{self.n:06d}", "meter": rng.choice(self.meters),
               "amount": f"{rng.randint(5, 60)}.{rng.randint(0, 99):02d}", "status": "settled",
               "channel": rng.choice(("alipay", "wechat", "95598", "counter")),
               "ts": _iso_utc(ts_ns)}
        r = rng.random()
        if r < 0.2:  # a bank withholding: pending now, settled or failed a few seconds later
            fail = rng.random() < 0.4
            self.withholdings["failed" if fail else "settled"] += 1
            pend = {**doc, "status": "pending", "channel": "bank"}
            later = {**pend, "status": "failed" if fail else "settled",
                     "ts": _iso_utc(ts_ns + int(rng.uniform(2, 6) * 1e9))}
            if rng.random() < 0.25:  # the outcome overtakes the pending row on the way
                self.reordered += 1
                self._at(rng.uniform(0, 1), later)
                self._at(rng.uniform(1.5, 3), pend)
            else:
                self._at(rng.uniform(0, 1), pend)
                self._at(rng.uniform(2, 6), later)
            return
        self._at(rng.uniform(0, 2), doc)
        if r < 0.35:  # the channel retries: the same payment again, later
            self.duplicates += 1
            self._at(rng.uniform(0.5, 5), dict(doc))

    async def pump(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        self.queue.sort(key=lambda q: (q[0], q[1]))
        while self.queue and (everything or self.queue[0][0] <= now):
            _due, _n, doc = self.queue.pop(0)
            await self._producer.send_and_wait("meterstream.payments-in",
                                               key=doc["payment_id"].encode(),
                                               value=json.dumps(doc).encode())
            self.sent += 1

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()


def _iso_utc(ns: int) -> str:
    s, frac = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:09d}+00:00"


# --- readings delivered twice, late -----------------------------------------------------------

class Duplicator:
    """The `dup` fault: copies of some reading batches and routed payments, published again a
    few seconds later (after newer ones: out of order), as a redelivery would."""

    def __init__(self, rng: random.Random, bootstrap: str, partitions: int) -> None:
        self.rng, self.bootstrap, self.partitions = rng, bootstrap, partitions
        self.held: list[tuple[float, str, bytes | None, bytes]] = []
        self.copies = {"readings": 0, "payments": 0}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                         client_id="scenario-dup", fetch_max_wait_ms=100)
        await self.consumer.start()
        tps = [TopicPartition(t, p) for t in ("meterstream.readings", "meterstream.payments")
               for p in range(self.partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                         client_id="scenario-dup")
        await self.producer.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            got = await self.consumer.getmany(timeout_ms=200)
            for tp, msgs in got.items():
                for m in msgs:
                    if any(k == "scenario-copy" for k, _v in (m.headers or ())):
                        continue
                    share = 0.1 if tp.topic == "meterstream.readings" else 0.3
                    if m.value is not None and self.rng.random() < share:
                        self.held.append((time.monotonic() + self.rng.uniform(2, 8), tp.topic,
                                          m.key, m.value))
            await self.release()

    async def release(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for due, topic, key, value in self.held:
            if everything or due <= now:
                await self.producer.send_and_wait(topic, value, key=key,
                                                  headers=[("scenario-copy", b"1")])
                self.copies["readings" if topic.endswith("readings") else "payments"] += 1
            else:
                keep.append((due, topic, key, value))
        self.held = keep

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.release(everything=True)
        await self.consumer.stop()
        await self.producer.stop()


# --- the run ------------------------------------------------------------------------------------

@dataclass
class Report:
    seed: int
    minutes: float
    faults: list[str]
    injected: dict[str, int] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    invariant: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.invariant.get("ok")) and all(c["ok"] for c in self.checks.values())

    def summary(self) -> str:
        inv = self.invariant
        lost = inv.get("money_lost_micro_yuan", "?")
        lines = [
            (f"meterstream scenario: seed {self.seed}, {self.minutes:g} min, faults "
             f"{','.join(self.faults) or 'none'}"),
            "faults injected: " + (", ".join(f"{k} {v}" for k, v in self.injected.items())
                                   or "none"),
            "traffic: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                    for k, v in self.counts.items()),
        ]
        for name, c in self.checks.items():
            detail = c.get("detail", "")
            lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {name}: {detail}")
        lines.append(f"money invariant: {'ok' if inv.get('ok') else 'FAILED'} over "
                     f"{inv.get('meters', 0)} meters (settled {_y(inv.get('settled_micro_yuan'))}"
                     f" yuan, charged {_y(inv.get('charged_micro_yuan'))} yuan); balances = "
                     f"replay: {'yes' if not inv.get('replay_mismatches') else 'NO'}")
        for k in ("ledger_mismatches", "paid_mismatches", "replay_mismatches"):
            for x in inv.get(k, [])[:3]:
                lines.append(f"  {k[:-11]}: {x}")
        lines.append(f"money lost: {_y(lost) if isinstance(lost, int) else lost} yuan")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "minutes": self.minutes, "faults": self.faults,
                "ok": self.ok, "injected": self.injected, "counts": self.counts,
                "checks": self.checks, "invariant": self.invariant}


def _y(micro: Any) -> str:
    if not isinstance(micro, int):
        return "?"
    sign = "-" if micro < 0 else ""
    m = abs(micro)
    return f"{sign}{m // 1_000_000:,}.{m % 1_000_000:06d}"


def slope_kb_per_min(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, KB) samples, KB per minute; None with fewer than 3."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    sxx = sum((t - mx) ** 2 for t, _ in samples)
    if sxx == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in samples) / sxx * 60.0


def rss_report(rss: dict[str, list[tuple[float, int]]]) -> str:
    """Each process's RSS slope over the last two thirds of its life, then per third (KB/min):
    bounded buffers filling show as a slope that falls from one third to the next, a leak as
    one that does not. A process sampled fewer than 20 times gives a warm-up slope: left out."""
    parts = []
    for k, v in rss.items():
        if len(v) < 20:
            continue
        n = len(v)
        thirds = [slope_kb_per_min(v[i * n // 3:(i + 1) * n // 3]) for i in range(3)]
        last = slope_kb_per_min(v[n // 3:])
        if last is not None:
            parts.append(f"{k} {last:+.0f} (thirds " + "/".join(
                f"{x:+.0f}" if x is not None else "?" for x in thirds) + ")")
    return ", ".join(parts) or "n/a"


def write_rss(path: Path, rss: dict[str, list[tuple[float, int]]]) -> None:
    """The RSS samples as CSV (process, seconds into the run, KB), to plot or fit again."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("process,seconds,rss_kb\n")
        for name, samples in rss.items():
            fh.writelines(f"{name},{t:.1f},{kb}\n" for t, kb in samples)


async def run_scenario(cfg: ScenarioConfig, *, log: Callable[[str], None] | None = None) -> Report:
    """One seeded run; the report says what was injected, counted and checked."""
    from meterfield.config import parse_config
    from meterfield.field import Field
    from meterstream.collectors.archive import load_archive
    from meterstream.pipeline import topics
    from meterstream.pipeline.broker import EmbeddedBroker, free_port
    from meterstream.pipeline.collector_kafka import KafkaCollector, KafkaSink
    from meterstream.pipeline.replay import run_replay
    from meterstream.pipeline.runner import all_topics
    from meterstream.scenario_check import (
        check_invariant,
        group_lag,
        read_topics,
        replay_money,
        settled_by_meter,
        worker_money,
        write_replay_inputs,
    )
    from meterstream.scenario_proxy import LinkProxy

    say = log or (lambda _m: None)
    out = cfg.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output directory: {exc.strerror}",
                        where="--out") from None
    for stale in ("readings.csv", "payments.csv", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    rep = Report(cfg.seed, cfg.minutes, sorted(cfg.faults))
    rng = random.Random(cfg.seed)
    steps = schedule(cfg)
    (out / "schedule.json").write_text(json.dumps([dataclasses.asdict(s) for s in steps],
                                                  indent=1))
    tariffs = open_window_tariffs(out)

    # the proxy first: the broker advertises its port, so every client goes through it
    # (the proxy listens before the broker starts: creating the topics already goes through it)
    proxy = await LinkProxy("127.0.0.1", 0).start()
    for attempt in range(3):  # a port picked for the broker can be taken before Tansu binds it
        broker_port = free_port()
        while broker_port == proxy.port:
            broker_port = free_port()
        proxy.target = ("127.0.0.1", broker_port)
        broker = EmbeddedBroker(port=broker_port, topics=all_topics(APP_ID),
                                partitions=cfg.partitions, advertised_port=proxy.port,
                                log_path=out / "broker.log")
        try:
            await asyncio.to_thread(broker.start)
            break
        except UserError:
            if attempt == 2:
                await proxy.stop()
                raise
        except BaseException:
            await proxy.stop()
            raise
    bootstrap = f"127.0.0.1:{proxy.port}"
    stops: list[Callable[[], Any]] = [lambda: asyncio.to_thread(broker.stop), proxy.stop]
    vm: Victoria | None = None
    workers: list[WorkerProc] = []
    try:
        # the collector's dial-in port, held (bound, not listening) until the collector takes
        # it, so that the field's ephemeral listeners cannot take it meanwhile
        hold = socket.socket()
        hold.bind(("127.0.0.1", 0))
        dialin = int(hold.getsockname()[1])
        stops.append(lambda: asyncio.to_thread(hold.close))
        fld = Field(parse_config(field_doc(cfg, dialin), "scenario field", ROOT / "config"))
        await fld.start()
        stops.append(fld.stop)
        archive = out / "archive.csv"
        fld.write_archive(archive)
        if "influx-down" in cfg.faults:
            vm = Victoria(out / "vm")
            await asyncio.to_thread(vm.start)
            stops.append(lambda: asyncio.to_thread(vm.stop))  # type: ignore[union-attr]

        def new_worker() -> WorkerProc:
            w = WorkerProc(out, f"worker-{len(workers) + 1}", bootstrap, archive, tariffs, cfg,
                           vm.url if vm else None)
            workers.append(w)
            w.start()
            return w

        def crashed(ws: list[WorkerProc]) -> None:
            """A worker that exited on its own is a finding (counted); it is restarted."""
            for w in ws:
                if w.proc is not None and w.proc.poll() is not None and w.proc.returncode not in (
                        0, -signal.SIGKILL, -signal.SIGTERM) and not w.stopped:
                    rep.counts["worker crashes"] = rep.counts.get("worker crashes", 0) + 1
                    say(f"{w.name} exited with status {w.proc.returncode}: restarted "
                        f"(see {w.dir / 'worker.log'})")
                    w.start()

        n_start = 2 if "workers" in cfg.faults else 1
        for _ in range(n_start):
            new_worker()
        say(f"broker {broker.bootstrap} behind proxy {bootstrap}; field of {fld.fleet.n} meters, "
            f"{len(fld.terminals)} terminals; {n_start} worker(s)")

        # the collectors, in this process, through the proxy
        handed: dict[tuple[str, int], int] = {}

        reorder = random.Random(cfg.seed * 41 + 7) if "dup" in cfg.faults else None
        first_late = set(reorder.sample(sorted(fld.terminals), len(fld.terminals) // 3)
                         if reorder else ())

        class RecordingSink(KafkaSink):
            """Records every batch handed; with `dup`, delivers some out of order: the first
            batch of a third of the terminals, and REORDER_SHARE of the others, go out right
            after the terminal's next batch."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.held: dict[str, Any] = {}  # terminal -> its batch waiting for the next
                self.seen: set[str] = set()
                self.reordered = 0
                self.closing = False

            def batch(self, batch: Any) -> None:
                handed[(batch.terminal, batch.started_ns)] = handed.get(
                    (batch.terminal, batch.started_ns), 0) + 1
                if reorder is None or self.closing:
                    super().batch(batch)
                    return
                earlier = self.held.pop(batch.terminal, None)
                if earlier is not None:
                    super().batch(batch)
                    super().batch(earlier)
                    self.reordered += 1
                    return
                first = batch.terminal not in self.seen
                self.seen.add(batch.terminal)
                if (batch.terminal in first_late) if first else reorder.random() < REORDER_SHARE:
                    self.held[batch.terminal] = batch
                else:
                    super().batch(batch)

            def release(self) -> None:
                """The run is over: what is held goes out (late, after nothing)."""
                self.closing = True
                for held in self.held.values():
                    super().batch(held)
                self.held.clear()

        ccfg = fast_collector_config(dialin, cfg.cycle_s)
        sink = RecordingSink(bootstrap, spool_dir=out / "collector-spool",
                             spool_max_bytes=64 << 20, request_timeout_s=3.0,
                             backoff_s=(0.2, 2.0),
                             producer_options={"client_id": f"{COLLECTOR_CLIENT}-sink"})
        collector = KafkaCollector(load_archive(archive), ccfg, bootstrap, sink=sink,
                                   session_timeout_s=6.0, client_id=f"{COLLECTOR_CLIENT}-1")
        hold.close()
        await collector.start()
        stops.append(collector.stop)

        meters = [fld.address(i) for i in range(fld.fleet.n) if int(fld.fleet.role[i]) == 0]
        pay = PaymentChannels(random.Random(cfg.seed * 31 + 3), meters, bootstrap)
        await pay.start()
        stops.append(pay.stop)
        dup = None
        if "dup" in cfg.faults:
            dup = Duplicator(random.Random(cfg.seed * 37 + 5), bootstrap, cfg.partitions)
            await dup.start()

        # flapping terminals: 30 % of them, in two groups that go down and up every few cycles
        flappers: list[str] = []
        flap_episodes = 0
        if "flap" in cfg.faults:
            tids = sorted(fld.terminals)
            flappers = sorted(rng.sample(tids, max(1, round(cfg.flap_share * len(tids)))))
        flap_state: dict[str, float] = {}  # terminal -> monotonic time of its next toggle
        down_intervals: dict[str, list[list[float]]] = {t: [] for t in fld.terminals}

        t0 = time.monotonic()
        for tid in flappers:
            flap_state[tid] = t0 + rng.uniform(2, 5) * cfg.cycle_s
        rss: dict[str, list[tuple[float, int]]] = {"runner": []}
        next_rss = t0
        pending = list(steps)
        injected: dict[str, int] = {}
        spool_peak = 0
        polled_during_cut = 0
        cut_rows_at: int | None = None
        next_pay = t0
        end = t0 + cfg.seconds
        say(f"running {cfg.minutes:g} min; schedule: "
            + (", ".join(f"{s.action}@{s.at_s:g}s" for s in steps) or "no faults"))
        while (now := time.monotonic()) < end:
            while pending and t0 + pending[0].at_s <= now:
                s = pending.pop(0)
                live = [w for w in workers if w.alive]
                if s.action == "kill" and live:
                    w = live[s.arg % len(live)]
                    w.kill()
                    w.start()  # restarted at once, on the same data directory
                elif s.action == "start-worker":
                    new_worker()
                elif s.action == "stop-worker" and len(live) > 1:
                    await asyncio.to_thread(live[s.arg % len(live)].stop)
                elif s.action == "link-cut":
                    proxy.cut(COLLECTOR_CLIENT)
                    cut_rows_at = collector.collector.summary()["rows"]
                elif s.action == "link-restore":
                    proxy.restore()
                    if cut_rows_at is not None:
                        polled_during_cut = collector.collector.summary()["rows"] - cut_rows_at
                elif s.action == "influx-stop" and vm is not None:
                    await asyncio.to_thread(vm.stop)
                elif s.action == "influx-start" and vm is not None:
                    await asyncio.to_thread(vm.start)
                else:
                    continue
                injected[s.action] = injected.get(s.action, 0) + 1
                say(f"{now - t0:6.1f}s  {s.action}")
            for tid in flappers:
                if now >= flap_state[tid]:
                    if tid in fld.down():
                        fld.restore(terminal=tid)
                        down_intervals[tid][-1][1] = now
                        flap_state[tid] = now + rng.uniform(2, 4) * cfg.cycle_s
                    else:
                        fld.outage(terminal=tid)
                        down_intervals[tid].append([now, float("inf")])
                        flap_episodes += 1
                        flap_state[tid] = now + rng.uniform(2, 4) * cfg.cycle_s
            if now >= next_pay:
                pay.make()
                next_pay = now + rng.uniform(0.5, 1.5) * cfg.pay_every_s
            await pay.pump()
            spool_peak = max(spool_peak, sink.spool.bytes)
            crashed(workers)
            if now >= next_rss:
                next_rss = now + cfg.rss_every_s
                me = rss_kb(os.getpid())
                if me:
                    rss["runner"].append((now - t0, me))
                for w in workers:
                    v = w.rss()
                    if v:  # one series per process (a killed worker's restart is another)
                        rss.setdefault(f"{w.name}#{w.starts}", []).append((now - t0, v))
            await asyncio.sleep(0.05)
        # end of traffic: faults off, everything still held delivered
        if proxy.cut_prefix is not None:
            proxy.restore()
            if cut_rows_at is not None:
                polled_during_cut = collector.collector.summary()["rows"] - cut_rows_at
        if vm is not None and (vm.proc is None or vm.proc.poll() is not None):
            await asyncio.to_thread(vm.start)
        for tid in flappers:
            if tid in fld.down():
                fld.restore(terminal=tid)
                down_intervals[tid][-1][1] = time.monotonic()
        await pay.pump(everything=True)
        if dup is not None:
            await dup.stop()
        sink.release()
        rep.injected = {**injected, **({"flap-episodes": flap_episodes} if flappers else {}),
                        **({"reading-copies": dup.copies["readings"],
                            "payment-copies": dup.copies["payments"],
                            "batches-reordered": sink.reordered} if dup else {})}
        say("traffic over: stopping the collectors, waiting for the workers to drain")
        await collector.stop()
        stops.remove(collector.stop)
        sink_stats = sink.summary()
        # the workers drain everything that is in Kafka
        deadline = time.monotonic() + 180
        lag = -1
        while time.monotonic() < deadline:
            crashed(workers)
            lag = (await group_lag(bootstrap, APP_ID, [topics.READINGS.name,
                                                        topics.PAYMENTS.name, topics.LINKS.name,
                                                        topics.RESULTS.name])
                   + await group_lag(bootstrap, INTAKE_GROUP, [topics.PAYMENTS_IN.name]))
            if lag == 0:
                break
            await asyncio.sleep(1.0)
        # Committed offsets are not enough: Tansu's end offsets can be short after batched
        # produces (DESIGN.md), so a lag of 0 may still leave the last messages unprocessed.
        # The workers are still running: check again until the state settles (bounded); only a
        # difference that lasts is a failure.
        changelog = f"{APP_ID}-terminal-state-changelog"
        settle_end = time.monotonic() + 120
        settle_t0 = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            seen = await read_topics(bootstrap, [topics.READINGS.name, topics.PAYMENTS.name,
                                                 topics.PAYMENTS_IN.name, topics.EVENTS.name,
                                                 topics.COMMANDS.name, topics.LINKS.name,
                                                 topics.RESULTS.name, topics.DEAD_LETTER.name,
                                                 changelog])
            readings, payments = seen[topics.READINGS.name], seen[topics.PAYMENTS.name]
            n_r, n_p = write_replay_inputs(out, readings, payments)
            await asyncio.to_thread(run_replay, archive, out / "readings.csv",
                                    out / "payments.csv", tariffs, out / "replay",
                                    progress=False)
            money, went_back = await asyncio.to_thread(worker_money, archive, tariffs,
                                                       seen[changelog],
                                                       out / "changelog-trail.csv")
            inv = check_invariant(money, settled_by_meter(payments),
                                  replay_money(out / "replay"))
            if inv.ok or time.monotonic() > settle_end:
                break
            say(f"invariant not met yet ({len(inv.replay_bad)} meters differ): checking again")
            await asyncio.sleep(3.0)
        rep.counts["invariant checks"] = attempts
        rep.counts["settled after s"] = round(time.monotonic() - settle_t0)
        rep.invariant = inv.to_dict()
        events = [json.loads(m.value) for m in seen[topics.EVENTS.name] if m.value]
        kinds: dict[str, int] = {}
        for e in events:
            k = e.get("kind") or e.get("type") or "?"
            kinds[k] = kinds.get(k, 0) + 1
        copies = sum(1 for m in readings if any(k == "scenario-copy" for k, _ in m.headers))
        rep.counts = {**rep.counts, "reading batches": len(readings), "reading rows": n_r,
                      "batch copies (dup fault)": copies,
                      "payment messages": len(seen[topics.PAYMENTS_IN.name]),
                      "routed payments": n_p, "payment ids": pay.n,
                      "channel duplicates": pay.duplicates, "reordered withholdings": pay.reordered,
                      "commands": len(seen[topics.COMMANDS.name]),
                      "results": len(seen[topics.RESULTS.name]),
                      "dead letters": len(seen[topics.DEAD_LETTER.name]),
                      "events": len(events), "worker lag at end": lag}
        rep.checks["drained"] = {"ok": lag == 0, "detail": f"worker and intake lag {lag}"}
        rep.checks["state never went back"] = {
            "ok": not went_back,
            "detail": f"{len(seen[changelog])} changelog records; {len(went_back)} went back"
                      + (f", e.g. {went_back[0]}" if went_back else "")}
        # every payment id the channels made reached the workers
        routed_ids = {json.loads(m.value)["payment_id"] for m in payments if m.value}
        missing = pay.n - len(routed_ids)
        rep.checks["payments routed"] = {
            "ok": missing == 0 and pay.sent >= pay.n,
            "detail": f"{len(routed_ids)} of {pay.n} payment ids routed, {pay.sent} channel "
                      f"messages, duplicates credited once (ledger check below)"}
        # collectors: every batch handed reached the readings topic
        in_topic: dict[tuple[str, int], int] = {}
        for m in readings:
            if m.value and not any(k == "scenario-copy" for k, _ in m.headers):
                from meterstream.collectors.batch import ReadingBatch

                b = ReadingBatch.from_bytes(m.value)
                in_topic[(b.terminal, b.started_ns)] = in_topic.get((b.terminal, b.started_ns),
                                                                    0) + 1
        lost_batches = [k for k in handed if k not in in_topic]
        twice = sum(v - 1 for v in in_topic.values() if v > 1)
        if "broker-link" in cfg.faults:
            rep.checks["broker link cut"] = {
                "ok": not lost_batches and sink_stats["refused"] == 0 and polled_during_cut > 0
                and sink_stats["spooled"] > 0 and sink_stats["spool_bytes"] == 0,
                "detail": f"{proxy.stats.dropped} connections dropped, {proxy.stats.refused} "
                          f"refused; {polled_during_cut} rows polled during the cut; "
                          f"{sink_stats['spooled']} records spooled (peak {spool_peak:,} bytes, "
                          f"bound 64 MiB, {sink_stats['refused']} dropped), "
                          f"{sink_stats['replayed']} replayed; {len(lost_batches)} of "
                          f"{len(handed)} batches lost; {twice} published twice (billed once)"}
        else:
            rep.checks["batches delivered"] = {
                "ok": not lost_batches,
                "detail": f"{len(handed) - len(lost_batches)} of {len(handed)} batches in the "
                          f"readings topic; {twice} published twice"}
        stop_timeouts = sum(w.stop_timeouts for w in workers)
        if "kill" in cfg.faults or "workers" in cfg.faults:
            rep.checks["workers"] = {
                "ok": rep.counts.get("worker crashes", 0) == 0 and not stop_timeouts,
                "detail": f"{len(workers)} worker processes, {sum(w.starts for w in workers)} "
                          f"starts, {sum(w.kills for w in workers)} SIGKILLs, max "
                          f"{_max_alive(steps, n_start)} at once; {stop_timeouts} clean stops "
                          "that took over 30 s"}
        if vm is not None:
            # the workers' sinks write their spools back with backoff: wait for them (bounded)
            want = _influx_keys(readings, archive)
            waited = time.monotonic()
            while True:
                gone = want - await asyncio.to_thread(vm.reading_keys)
                if not gone or time.monotonic() - waited > 90:
                    break
                await asyncio.sleep(2.0)
            rep.checks["influx down"] = {
                "ok": not gone,
                "detail": f"{len(want) - len(gone)} of {len(want)} readings in VictoriaMetrics "
                          f"after {min(cfg.influx_down_s, 0.5 * cfg.seconds):g} s down; "
                          f"{len(gone)} lost ({time.monotonic() - waited:.0f} s to catch up)"}
        if flappers:
            rep.checks["flapping terminals"] = _flap_check(
                flappers, down_intervals, seen[topics.LINKS.name], seen[topics.COMMANDS.name],
                events, flap_episodes, cfg, t0, rss)
        rep.counts["rss slope KB/min (last 2/3)"] = rss_report(rss)
        write_rss(out / "rss.csv", rss)
        rep.counts["event kinds"] = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(w.stop)
        for stop in reversed(stops):
            with contextlib.suppress(Exception):
                await stop()
    (out / "summary.json").write_text(json.dumps(rep.to_dict(), indent=1))
    return rep


def _max_alive(steps: list[Step], n_start: int) -> int:
    n = top = n_start
    for s in steps:
        n += {"start-worker": 1, "stop-worker": -1}.get(s.action, 0)
        top = max(top, n)
    return top


def _influx_keys(readings: list[Any], archive: Path) -> set[tuple[str, str, int]]:
    """(terminal, class, ts ms) of every ok reading with a total: what the reading points of
    the InfluxDB sink must hold (its class tag names, docs/influx.md)."""
    import csv

    from meterstream.collectors.batch import OUTCOME_OK, ReadingBatch

    names = {"dedicated": "dedicated", "public": "public", "lowvoltage": "low_voltage"}
    cls = {}
    with open(archive, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            cls[int(row["meter"])] = names[row["class"]]
    keys: set[tuple[str, str, int]] = set()
    seen: set[tuple[str, int]] = set()
    for m in readings:
        if not m.value:
            continue
        b = ReadingBatch.from_bytes(m.value)
        if (b.terminal, b.started_ns) in seen:
            continue
        seen.add((b.terminal, b.started_ns))
        from meterstream.pipeline.influx import unique_ts

        ts = unique_ts(b.ts)
        for i in range(len(b)):
            if int(b.outcome[i]) == OUTCOME_OK and int(b.registers[i, 0]) >= 0:
                keys.add((b.terminal, cls.get(int(b.meter[i]), "low_voltage"),
                          int(ts[i]) // 1_000_000))
    return keys


def _flap_check(flappers: list[str], down: dict[str, list[list[float]]], links: list[Any],
                commands: list[Any], events: list[dict[str, Any]], episodes: int,
                cfg: ScenarioConfig, t0: float, rss: dict[str, list[tuple[float, int]]]
                ) -> dict[str, Any]:
    """Dropouts flagged (a link `down` for every flapping terminal), no command to a terminal
    whose link had been down for a while, alarms bounded (area alarms, not one per terminal per
    cycle), memory reported."""
    link_events: dict[str, list[tuple[int, str]]] = {}
    for m in links:
        if m.value:
            e = json.loads(m.value)
            link_events.setdefault(e.get("terminal", ""), []).append((m.timestamp_ms,
                                                                       e.get("kind", "")))
    unflagged = [t for t in flappers if down[t] and not any(k == "down" for _ts, k in
                                                            link_events.get(t, []))]
    # a command is "to an offline terminal" when its terminal's last link event before it was
    # `down` more than `slack` earlier (the worker learns of a down link by Kafka, not at once)
    slack_ms = int(3 * cfg.cycle_s * 1000)
    offline_cmds = 0
    for m in commands:
        if not m.value:
            continue
        tid = json.loads(m.value).get("terminal", "")
        before = [(ts, k) for ts, k in link_events.get(tid, []) if ts <= m.timestamp_ms
                  and k in ("up", "down")]
        if before and before[-1][1] == "down" and m.timestamp_ms - before[-1][0] > slack_ms:
            offline_cmds += 1
    alarms = [e for e in events if e.get("kind") in ("terminal_offline", "area_dropout")]
    areas = {e.get("terminal") for e in alarms if e.get("kind") == "area_dropout"}
    bound = episodes + cfg.areas * 4
    return {"ok": not unflagged and offline_cmds == 0 and len(alarms) <= bound,
            "detail": f"{len(flappers)} terminals flapping, {episodes} down episodes, "
                      f"{len(flappers) - len(unflagged)} flagged down; {offline_cmds} commands "
                      f"to a terminal offline > {slack_ms / 1000:g} s; {len(alarms)} alarms "
                      f"({len(areas)} area alarms; bound {bound}); RSS slope KB/min "
                      + rss_report(rss)}


def run(cfg: ScenarioConfig, *, log: Callable[[str], None] | None = None) -> Report:
    return asyncio.run(run_scenario(cfg, log=log))


__all__ = ["FAULTS", "Report", "ScenarioConfig", "parse_faults", "run", "run_scenario",
           "schedule"]
