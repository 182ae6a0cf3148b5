"""The live dashboard's figures (issue 6): push lag over SSE, and the cost of one overview.

Two parts, each with its baseline measured in the same run:

- lag: the embedded Tansu broker, and start_worker (the worker, its payments intake and its
  API, config/demo.toml's worker settings) in its own process over a small synthetic archive
  (bench_pipeline.Fleet; no field, no collectors: payments need neither). This process holds
  an SSE client of GET /api/stream (aiohttp, real HTTP over loopback) and, as the baseline, a
  plain Kafka consumer of meterstream.events. N payments (settled top-ups to random meters)
  are produced to meterstream.payments-in (acks=all), one every gap_lo..gap_hi seconds,
  after one warm-up payment (reported apart: a fresh consumer group's first fetches).
  Measured for each payment from just before its produce to the `payment_applied` event
  naming its payment_id (a) arriving in an `events` message of the SSE stream and (b) arriving
  at the Kafka consumer: p50/p99/max of both, and of their difference per payment (what the
  push path adds to the worker's own publishing). Also each pushed overview's arrival at the
  client against its `ts` (the time the API computed it, ms precision; the same clock), and
  the worker process's CPU share while the page listens.
- snapshot: a WorkerCore over a synthetic archive of 10,000 terminals x 100 meters (1 M
  meters, 500 areas), fed `cycles` poll cycles of reading batches (so the collection state,
  balances and the kernels' own commands are real), and a command book per terminal filled
  through the book's API (closed cut-off / reconnect pairs confirmed, one in ten terminals
  with an escalated cut-off, `open` open commands each). Then, interleaved, `repeats` times:
  Api._refresh(force=True) (exactly what the live loop runs each second while a page is open:
  Api._snapshot, the KPI ring copy, the watched meters; the overview keeps per-book figures
  and reads again only the books that moved, --changed-share of them before each repeat; the
  first overview, which reads every book, is reported on its own), the SSE encoding of that overview
  (once per client), and the baseline WorkerCore.kpi_snapshot() alone (the KPI kernels on the
  same core). Medians, wall and CPU; the CPU share of one snapshot per second (live_s = 1 s).
  The books are measured at each level of --closed (default 0, 20, 256 closed commands per
  terminal; 256 is CommandPolicy.history_kept, what a busy terminal's book holds at steady
  state), filled on from one level to the next; also timed alone: reading every book as the
  overview does (open_commands, history, timeliness), to show where the time goes.

Run: .venv/bin/python bench/bench_dashboard.py [--part lag|snapshot|all]
Figures, not asserts; results in bench/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from datetime import datetime
from itertools import pairwise
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_pipeline import CYCLE_NS, T0, TARIFFS, Fleet, _cpu_of, _loadavg, _pct, _runner
from bench.common import report

PARTITIONS = 4  # config/demo.toml's worker
LAG_APP = "bench-dashboard-worker"
S = 1_000_000_000


def fleet_of(terminals: int, meters: int, areas: int) -> Fleet:
    """bench_pipeline's Fleet with `areas` areas (it puts 50 terminals in each): terminal ids
    A<area>-C<n> and addresses 33 AAA CCC MMMM renumbered to match."""
    f = Fleet(terminals, meters)
    per_area = max(1, -(-terminals // max(1, areas)))
    if terminals // per_area >= 999 or per_area >= 999 or meters >= 9999:
        raise SystemExit("bench_dashboard: at most 998 areas of 998 terminals of 9998 meters")
    f.tids = [f"A{t // per_area + 1:03d}-C{t % per_area + 1:03d}" for t in range(terminals)]
    pos = np.tile(np.arange(1, meters + 1), terminals)
    f.address = (330_000_000_000 + (f.t_idx // per_area + 1) * 10**7
                 + (f.t_idx % per_area + 1) * 10**4 + pos)
    return f


def _ms(xs: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(xs) * 1e3, 1), "p99": round(_pct(xs, 0.99) * 1e3, 1),
            "max": round(max(xs) * 1e3, 1)} if xs else {}


# --- part 1: push lag ----------------------------------------------------------------------------


def lag_worker_main(bootstrap: str, archive: str, data_dir: str, pipe: Connection) -> None:
    _runner()(_lag_worker(bootstrap, archive, data_dir, pipe))


async def _lag_worker(bootstrap: str, archive: str, data_dir: str, pipe: Connection) -> None:
    """start_worker with config/demo.toml's worker settings, the API on a free port."""
    from meterstream.pipeline.config import WorkerConfig
    from meterstream.pipeline.runner import start_worker

    cfg = WorkerConfig(partitions=PARTITIONS, tick_s=1.0, kpi_s=5.0, cycle_s=60.0,
                       http_port=0, producer_max_batch_size=1)
    run = await start_worker(bootstrap, Path(archive), TARIFFS, cfg, data_dir=Path(data_dir),
                             app_id=LAG_APP)
    await run.worker.wait_recovered()
    pipe.send({"url": run.url, "pid": os.getpid()})
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    counters = dict(run.worker.core.counters)
    await run.stop()
    pipe.send({"counters": counters, "errors": run.worker.errors})


def _iso_ns(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1e9)


async def _lag_run(bootstrap: str, base: str, meters: list[str], n: int, gap: tuple[float, float],
                   worker_pid: int) -> dict[str, Any]:
    import aiohttp
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from meterstream.pipeline import topics

    sse_at: dict[str, int] = {}  # payment_id -> arrival (wall ns) at the SSE client
    kafka_at: dict[str, int] = {}  # payment_id -> arrival at the Kafka consumer
    overviews: list[tuple[int, int, int]] = []  # (seq, ts ns, arrival ns)
    sse_bytes = [0]

    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    resp = await http.get(base + "/api/stream")
    assert resp.status == 200, resp.status

    async def read_sse() -> None:
        buf = b""
        async for chunk in resp.content.iter_any():
            now = time.time_ns()
            sse_bytes[0] += len(chunk)
            buf += chunk
            while b"\n\n" in buf:
                msg, buf = buf.split(b"\n\n", 1)
                event, data = "", []
                for line in msg.decode().split("\n"):
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                if not data:
                    continue  # a keep-alive comment
                doc = json.loads("\n".join(data))
                if event == "overview":
                    overviews.append((doc["seq"], _iso_ns(doc["ts"]), now))
                elif event == "events":
                    for e in doc:
                        if e.get("kind") == "payment_applied":
                            sse_at.setdefault(e["payment_id"], now)

    consumer = AIOKafkaConsumer(topics.EVENTS.name, bootstrap_servers=bootstrap,
                                auto_offset_reset="latest", enable_auto_commit=False,
                                fetch_max_wait_ms=10)
    await consumer.start()
    await consumer.seek_to_end()

    async def read_kafka() -> None:
        async for msg in consumer:
            now = time.time_ns()
            e = json.loads(msg.value)
            if e.get("kind") == "payment_applied":
                kafka_at.setdefault(e["payment_id"], now)

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(read_sse()), loop.create_task(read_kafka())]
    t_wait = time.monotonic()
    while not overviews and time.monotonic() - t_wait < 30:
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)  # the consumer's fetch loop is up; a few overviews pushed
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    rng = np.random.default_rng(6)
    paid: dict[str, int] = {}
    acks: list[float] = []
    loads = [_loadavg()]
    cpu0, wall0 = _cpu_of(worker_pid), time.monotonic()
    ov0 = len(overviews)
    warmup_s = None
    for k in range(-1, n):  # k = -1: a warm-up payment (the first fetches of a fresh group)
        pid = f"DASH-BENCH-{k:05d}" if k >= 0 else "DASH-BENCH-WARMUP"
        doc = {"payment_id": pid, "meter": meters[int(rng.integers(len(meters)))],
               "amount": f"{int(rng.integers(20, 200))}.00", "status": "settled",
               "channel": "alipay", "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00",
                                                        time.gmtime())}
        t0 = time.time_ns()
        await producer.send_and_wait(topics.PAYMENTS_IN.name, key=pid.encode(),
                                     value=json.dumps(doc).encode())
        if k < 0:
            end = time.monotonic() + 30
            while time.monotonic() < end and not (pid in sse_at and pid in kafka_at):
                await asyncio.sleep(0.05)
            warmup_s = [round((at[pid] - t0) / 1e9, 2) if pid in at else None
                        for at in (sse_at, kafka_at)]
            cpu0, wall0, ov0 = _cpu_of(worker_pid), time.monotonic(), len(overviews)
            continue
        acks.append((time.time_ns() - t0) / 1e9)
        paid[pid] = t0
        if k % 25 == 24:
            loads.append(_loadavg())
        await asyncio.sleep(float(rng.uniform(*gap)))
    end = time.monotonic() + 15
    while time.monotonic() < end and not all(p in sse_at and p in kafka_at for p in paid):
        await asyncio.sleep(0.1)
    cpu1, wall1 = _cpu_of(worker_pid), time.monotonic()
    ov1 = len(overviews)
    await producer.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    resp.close()
    await http.close()
    await consumer.stop()

    sse = [(sse_at[p] - t) / 1e9 for p, t in paid.items() if p in sse_at]
    kafka = [(kafka_at[p] - t) / 1e9 for p, t in paid.items() if p in kafka_at]
    added = [(sse_at[p] - kafka_at[p]) / 1e9 for p in paid if p in sse_at and p in kafka_at]
    ov_lag = [(arr - ts) / 1e9 for _seq, ts, arr in overviews[1:]]  # the first: on connect
    # where in the push rhythm the worker published: from the overview before to the event's
    # arrival at the Kafka consumer (uniform in 0..live_s if the two are not in step)
    arrivals = [a for _s, _t, a in overviews]
    phase = []
    for p in paid:
        if p in kafka_at:
            before = [a for a in arrivals if a <= kafka_at[p]]
            if before:
                phase.append((kafka_at[p] - before[-1]) / 1e9)
    gaps = [(b[2] - a[2]) / 1e9 for a, b in pairwise(overviews)]
    seqs = [s for s, _ts, _a in overviews]
    out: dict[str, Any] = {
        "lag_payments": n, "lag_payment_gap_s": list(gap),
        "lag_warmup_payment_sse_kafka_s": warmup_s,
        "lag_seen_sse": len(sse), "lag_seen_kafka": len(kafka),
        "lag_sse_ms": _ms(sse), "lag_kafka_events_ms": _ms(kafka),
        "lag_sse_minus_kafka_ms": _ms(added),
        "lag_sse_to_kafka_p50_ratio": (round(statistics.median(sse) / statistics.median(kafka), 1)
                                       if sse and kafka else None),
        "lag_produce_ack_ms": _ms(acks),
        "lag_kafka_after_last_overview_ms": _ms(phase),
        "lag_overviews_pushed": len(overviews),
        "lag_overview_seq_skipped": sum(b - a - 1 for a, b in pairwise(seqs)),
        "lag_overview_at_client_ms": _ms(ov_lag),
        "lag_overview_interval_ms": _ms(gaps),
        "lag_overviews_per_s": round((ov1 - ov0) / (wall1 - wall0), 2),
        "lag_worker_cpu_share": round((cpu1 - cpu0) / (wall1 - wall0), 3),
        "lag_sse_bytes": sse_bytes[0],
        "lag_load": " / ".join(loads),
    }
    return out


def lag(tmp: Path, n: int, gap: tuple[float, float], terminals: int,
        meters: int) -> dict[str, Any]:
    from meterstream.pipeline.broker import EmbeddedBroker
    from meterstream.pipeline.runner import all_topics

    fleet = fleet_of(terminals, meters, max(1, terminals // 10))
    archive = tmp / "lag-archive.csv"
    fleet.write_archive(archive)
    addresses = [f"{int(a):012d}" for a in fleet.address.tolist()]
    ctx = mp.get_context("spawn")
    with EmbeddedBroker(topics=all_topics(LAG_APP), partitions=PARTITIONS) as broker:
        a, b = ctx.Pipe()
        p = ctx.Process(target=lag_worker_main, args=(broker.bootstrap, str(archive),
                                                      str(tmp / "lag-worker"), b), daemon=True)
        p.start()
        info = a.recv()
        base = info["url"].rsplit("/api/", 1)[0]
        print(f"lag: worker up at {base}; {n} payments, one every {gap[0]:g}..{gap[1]:g} s",
              flush=True)
        out = asyncio.run(_lag_run(broker.bootstrap, base, addresses, n, gap, info["pid"]))
        a.send("stop")
        wsum = a.recv()
        p.join(30)
    out.update({"lag_meters": terminals * meters, "lag_terminals": terminals,
                "lag_worker_payments": wsum["counters"]["payments"],
                "lag_worker_errors": wsum["errors"]})
    return out


# --- part 2: the cost of one overview at a million meters ---------------------------------------


def fill_books(core: Any, closed_to: int, open_per: int, state: dict[str, Any]) -> float:
    """Fill each terminal's command book through its API up to `closed_to` closed commands
    (cut-off confirmed, then reconnect confirmed 40 s after its cause, on a meter of the
    terminal; one terminal in ten gets an escalated cut-off first) and `open_per` open ones.
    Continues from `state` (a second call adds to the first's books). Returns seconds."""
    from meterstream.pipeline.commands import CONFIRMED, CUTOFF, RECONNECT, UNCONFIRMED

    t0 = time.perf_counter()
    fleet = core.fleet
    ts = state.setdefault("ts", T0 - 7 * 86_400 * S)
    for i, tid in enumerate(fleet.terminal_ids):
        book = core.book(tid)
        sl = fleet.block(i)
        addrs = core.addresses[sl.start:sl.stop]
        open_ = book.open_commands()
        if not state.get("escalated") and i % 10 == 0:  # an escalation with its work order
            c = book.issue(addrs[-1], CUTOFF, "arrears", ts)
            assert c is not None
            for _ in range(book.policy.max_attempts):
                book.on_sent(c.id, ts)
                book.on_result(c.id, UNCONFIRMED, "no read-back", None, ts + S, None)
        n = k = len(book.history())  # counted here: history() copies every command
        while n < min(closed_to, book.policy.history_kept):
            m = addrs[k % max(1, len(addrs) - 2 - open_per)]
            k += 1
            for action, lat in ((CUTOFF, 20), (RECONNECT, 40)):
                c = book.issue(m, action, "balance", ts, cause_ns=ts)
                if c is None:
                    continue
                book.on_sent(c.id, ts + S)
                book.on_result(c.id, CONFIRMED, "", ts + 2 * S, ts + lat * S, 0)
                n += 1
                ts += 60 * S
            book.drain_audit()
            book.drain_events()
        for j in range(len(open_), open_per):  # open: issued / sent, on their own meters
            c = book.issue(addrs[-2 - j], CUTOFF if j % 2 == 0 else RECONNECT, "balance", ts)
            if c is not None and j % 2:
                book.on_sent(c.id, ts)
        book.drain_audit()
        book.drain_events()
    state["ts"], state["escalated"] = ts, True
    return time.perf_counter() - t0


def _timed(fn: Any) -> tuple[float, float, Any]:
    c0, t0 = time.process_time(), time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, time.process_time() - c0, r


def snapshot(tmp: Path, terminals: int, meters: int, areas: int, cycles: int,
             closed: list[int], open_per: int, repeats: int,
             changed_share: float) -> dict[str, Any]:
    from meterstream.pipeline.api import Api, _sse
    from meterstream.pipeline.app import KPI_RING, kpi_point
    from meterstream.pipeline.worker import WorkerCore

    t0 = time.perf_counter()
    fleet = fleet_of(terminals, meters, areas)
    archive = tmp / "snapshot-archive.csv"
    fleet.write_archive(archive)
    clock = [T0 + cycles * CYCLE_NS + 60 * S]  # the worker's now: just after the last cycle
    core = WorkerCore(archive, TARIFFS, cycle_s=CYCLE_NS / S, now=lambda: clock[0])
    setup_s = time.perf_counter() - t0
    print(f"snapshot: {core.fleet.n_meters:,} meters, {core.fleet.n_terminals:,} terminals, "
          f"{len(core.areas)} areas loaded in {setup_s:.0f} s", flush=True)
    t0 = time.perf_counter()
    kernel_commands = 0
    for c in range(cycles):
        for _tid, value in fleet.batches(c):
            kernel_commands += sum(1 for o in core.on_batch(value) if o.topic.endswith("commands"))
    feed_s = time.perf_counter() - t0
    ring: deque[dict[str, Any]] = deque(maxlen=KPI_RING)
    point = kpi_point(core.kpi_snapshot(), core.counters)
    ring.extend(dict(point) for _ in range(KPI_RING))  # a full ring, as after 6 h
    held = list(core.fleet.terminal_ids)
    worker = SimpleNamespace(core=core, owned=lambda: held, kpi_ring=ring, event_listeners=[])
    api = Api(worker)
    # a watched customer page (its balance point taken each second)
    api.history.watch(core.addresses[0])
    figures: dict[str, Any] = {
        "snap_meters": core.fleet.n_meters, "snap_terminals": core.fleet.n_terminals,
        "snap_areas": len(core.areas), "snap_cycles_fed": cycles,
        "snap_readings_fed": core.counters["readings"],
        "snap_kernel_commands": kernel_commands,
        "snap_archive_load_s": round(setup_s, 1), "snap_feed_s": round(feed_s, 1),
        "snap_repeats": repeats, "snap_open_per_terminal": open_per,
        "snap_load_before": _loadavg(),
    }
    state: dict[str, Any] = {}
    for level in closed:
        fill_s = fill_books(core, level, open_per, state)
        hist = sum(len(b.history()) for b in core.books.values())
        opened = sum(len(b.open_commands()) for b in core.books.values())
        print(f"snapshot: books filled to {level} closed each in {fill_s:.0f} s "
              f"({hist:,} closed, {opened:,} open)", flush=True)
        # the books were filled behind the worker's back: all of them changed (in the worker,
        # every change of a book passes WorkerCore._dispatch, which marks it)
        core.changed_books.update(core.books)
        first_w, first_c, _ = _timed(lambda: api._refresh(force=True))  # every book read
        core.kpi_snapshot()
        snap_w, snap_c, kpi_w, kpi_c, enc_w, books_w = [], [], [], [], [], []
        rng = random.Random(level)
        ids = list(core.books)
        n_changed = max(1, round(len(ids) * changed_share))
        doc: dict[str, Any] = {}

        def read_books() -> None:  # what _snapshot and reconnection_stats read of the books
            for book in core.books.values():
                book.open_commands()
                book.history()
                book.timeliness()

        for _ in range(repeats):
            core.changed_books.update(rng.sample(ids, n_changed))  # books moved this second
            w, c, doc = _timed(lambda: api._refresh(force=True))
            snap_w.append(w)
            snap_c.append(c)
            w, c, _ = _timed(core.kpi_snapshot)
            kpi_w.append(w)
            kpi_c.append(c)
            w, _c, _ = _timed(lambda d=doc: _sse("overview", d))
            enc_w.append(w)
            w, _c, _ = _timed(read_books)
            books_w.append(w)
        size = len(_sse("overview", doc))
        med = statistics.median
        tag = f"snap_closed{level}"
        figures.update({
            f"{tag}_books": len(core.books), f"{tag}_commands_closed": hist,
            f"{tag}_commands_open": opened, f"{tag}_fill_s": round(fill_s, 1),
            f"{tag}_first_overview_ms": round(first_w * 1e3, 1),
            f"{tag}_first_overview_cpu_ms": round(first_c * 1e3, 1),
            f"{tag}_books_changed_per_overview": n_changed,
            f"{tag}_overview_ms": round(med(snap_w) * 1e3, 1),
            f"{tag}_overview_runs_ms": [round(x * 1e3, 1) for x in snap_w],
            f"{tag}_overview_cpu_ms": round(med(snap_c) * 1e3, 1),
            f"{tag}_kpi_snapshot_ms": round(med(kpi_w) * 1e3, 1),
            f"{tag}_kpi_snapshot_cpu_ms": round(med(kpi_c) * 1e3, 1),
            f"{tag}_overview_to_kpi": round(med(snap_w) / med(kpi_w), 2),
            f"{tag}_books_read_ms": round(med(books_w) * 1e3, 1),
            f"{tag}_sse_encode_ms_per_client": round(med(enc_w) * 1e3, 2),
            f"{tag}_overview_bytes": size,
            # one snapshot per live_s = 1 s while a page listens
            f"{tag}_cpu_share_at_1_per_s": round(med(snap_c), 3),
            f"{tag}_load": _loadavg(),
        })
        print(f"snapshot: closed {level}: overview {med(snap_w) * 1e3:.1f} ms "
              f"(cpu {med(snap_c) * 1e3:.1f}), kpi_snapshot {med(kpi_w) * 1e3:.1f} ms",
              flush=True)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--part", choices=("lag", "snapshot", "all"), default="all")
    ap.add_argument("--payments", type=int, default=100)
    ap.add_argument("--gap-s", type=float, nargs=2, default=(0.5, 1.0), metavar=("LO", "HI"),
                    help="seconds between payments, uniform in LO..HI")
    ap.add_argument("--lag-terminals", type=int, default=20)
    ap.add_argument("--lag-meters", type=int, default=50)
    ap.add_argument("--terminals", type=int, default=10_000)
    ap.add_argument("--meters", type=int, default=100)
    ap.add_argument("--areas", type=int, default=500)
    ap.add_argument("--cycles", type=int, default=2, help="poll cycles fed before measuring")
    ap.add_argument("--closed", default="0,20,256",
                    help="closed commands per terminal's book, a level per measurement")
    ap.add_argument("--open", type=int, default=2, help="open commands per terminal's book")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--changed-share", type=float, default=0.01,
                    help="share of the books that moved between two overviews (the overview "
                         "reads only those again)")
    ap.add_argument("--name", default="dashboard")
    args = ap.parse_args()
    try:
        closed = sorted(int(x) for x in args.closed.split(","))
    except ValueError:
        ap.error(f"--closed: give numbers separated by commas, got {args.closed!r}")
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as d:
        tmp = Path(d)
        if args.part in ("lag", "all"):
            figures.update(lag(tmp, args.payments, tuple(args.gap_s), args.lag_terminals,
                               args.lag_meters))
        if args.part in ("snapshot", "all"):
            figures.update(snapshot(tmp, args.terminals, args.meters, args.areas, args.cycles,
                                    closed, args.open, args.repeats, args.changed_share))
    report(args.name, figures, notes="see the module docstring of bench/bench_dashboard.py")


if __name__ == "__main__":
    main()
