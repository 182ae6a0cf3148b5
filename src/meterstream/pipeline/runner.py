"""Running the pipeline's processes: a worker (with its payments intake and API), and the demo.

`run_worker` is what `meterstream worker` runs against a Kafka broker; `run_demo` starts the
embedded broker, the simulated field, the collectors, one worker with its API and a seeded
payment stream in one process on loopback, and stops them all, newest first, on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterstream.errors import UserError
from meterstream.pipeline import topics
from meterstream.pipeline.config import DemoConfig, PaymentStream, WorkerConfig


@dataclass
class Running:
    """What a worker process started: stopped in reverse order by `stop()`."""

    worker: Any = None
    stops: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    url: str = ""
    metrics_url: str = ""  # Prometheus /metrics, when worker.metrics_port is set

    async def stop(self) -> None:
        for stop in reversed(self.stops):
            with contextlib.suppress(Exception):
                await stop()
        self.stops.clear()


def all_topics(app_id: str) -> list[str]:
    """Every topic of the pipeline, the worker's changelog included (create them up front)."""
    from meterstream.pipeline.app import STATE_TABLE

    return [*topics.NAMES, f"{app_id}-{STATE_TABLE}-changelog"]


async def start_worker(bootstrap: str, archive: Path, tariffs: Path, cfg: WorkerConfig, *,
                       data_dir: Path, app_id: str = "meterstream-worker",
                       influx_sink: Any = None) -> Running:
    """The worker, its payments intake and its API, started."""
    from meterstream.pipeline.api import Api, MeterHistory, serve
    from meterstream.pipeline.app import WorkerApp
    from meterstream.pipeline.payments import PaymentRouter, run_intake
    from meterstream.pipeline.worker import WorkerCore

    run = Running()
    try:
        (data_dir / "faust").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the worker's data directory: {exc.strerror}",
                        where=str(data_dir)) from None
    core = WorkerCore(archive, tariffs, policy=cfg.policy, cycle_s=cfg.cycle_s,
                      rules=cfg.rules, influx=influx_sink)
    overrides: dict[str, Any] = {}
    if cfg.producer_max_batch_size is not None:
        overrides["producer_max_batch_size"] = cfg.producer_max_batch_size
    worker = WorkerApp(core, bootstrap, datadir=data_dir / "faust", partitions=cfg.partitions,
                       app_id=app_id, tick_s=cfg.tick_s, kpi_s=cfg.kpi_s,
                       audit_path=cfg.audit_path, events_kept=cfg.events_kept, **overrides)
    run.worker = worker
    await worker.start()
    run.stops.append(worker.stop)
    router = PaymentRouter({int(a): core.fleet.terminal_ids[int(t)] for a, t in
                            zip(core.fleet.cold["address"].tolist(),
                                core.fleet.cold["terminal"].tolist())})
    intake = asyncio.get_running_loop().create_task(
        run_intake(bootstrap, router, core.tariff.zone))

    async def stop_intake() -> None:
        intake.cancel()
        await asyncio.gather(intake, return_exceptions=True)

    run.stops.append(stop_intake)
    api = Api(worker, operator_tokens=cfg.operator_tokens(),
              history=MeterHistory(cfg.history_meters, entries=cfg.history_entries))
    try:
        runner = await serve(api, cfg.http_host, cfg.http_port)
    except OSError as exc:
        await run.stop()
        raise UserError(f"cannot listen on {cfg.http_host}:{cfg.http_port}: {exc.strerror}",
                        where=f"{cfg.source}: worker.http_port") from None
    run.stops.append(runner.cleanup)
    port = runner.addresses[0][1] if runner.addresses else cfg.http_port
    run.url = f"http://{cfg.http_host}:{port}/api/summary"
    if cfg.metrics_port:  # Prometheus, on a port of its own (pipeline/metrics.py)
        from meterstream.pipeline import metrics

        try:
            server = metrics.serve(cfg.metrics_port, cfg.http_host)
        except OSError as exc:
            await run.stop()
            raise UserError(f"cannot listen on {cfg.http_host}:{cfg.metrics_port}: "
                            f"{exc.strerror}", where=f"{cfg.source}: worker.metrics_port") from None
        run.stops.append(lambda: asyncio.to_thread(metrics.stop, server))
        run.metrics_url = f"http://{cfg.http_host}:{server.server_port}/metrics"
    return run


def payment_stream(stream: PaymentStream, meters: list[str],
                   now: Callable[[], int] = time.time_ns) -> Any:
    """An endless seeded stream of payment JSON documents, as channels would send them:
    top-ups, some of them twice (the channel's retry), bank withholdings that settle later and
    one that fails."""
    rng = random.Random(stream.seed)
    channels = ("alipay", "wechat", "bank", "95598", "counter")
    pending: list[dict[str, Any]] = []
    n = 0
    failing_done = not stream.failing_withholding
    while True:
        n += 1
        ts = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now() / 1e9))
        if pending and rng.random() < 0.5:
            doc = pending.pop(0)
            doc = {**doc, "status": "failed" if doc.pop("_fail", False) else "settled", "ts": ts}
            yield doc
            continue
        lo, hi = stream.amount_yuan
        doc = {"payment_id": f"DEMO-{stream.seed}-{n:06d}", "meter": rng.choice(meters),
               "amount": f"{rng.randint(lo, hi)}.{rng.randint(0, 99):02d}",
               "status": "settled", "channel": rng.choice(channels), "ts": ts}
        if rng.random() < stream.pending_share or not failing_done:
            doc["status"], doc["channel"] = "pending", "bank"
            pending.append({**doc, "_fail": not failing_done})
            failing_done = True
        yield doc
        if doc["status"] == "settled" and rng.random() < stream.duplicate_share:
            yield dict(doc)  # the channel sends it again: credited once


async def run_payments(bootstrap: str, stream: PaymentStream, meters: list[str]) -> None:
    """Produce the demo's payment stream to meterstream.payments-in until cancelled."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for doc in payment_stream(stream, meters):
            await producer.send_and_wait(topics.PAYMENTS_IN.name,
                                         key=doc["payment_id"].encode(),
                                         value=json.dumps(doc).encode())
            await asyncio.sleep(stream.every_s)
    finally:
        await producer.stop()


async def run_demo(cfg: DemoConfig, *, ready: asyncio.Event | None = None,
                   stop: asyncio.Event | None = None) -> int:
    """The whole pipeline on loopback until `stop` is set (or SIGINT / SIGTERM)."""
    import dataclasses

    from meterfield.config import load_config
    from meterfield.field import Field
    from meterstream.collectors.archive import load_archive
    from meterstream.collectors.config import load_collector_config
    from meterstream.pipeline.broker import EmbeddedBroker
    from meterstream.pipeline.collector_kafka import KafkaCollector

    out = sys.stdout
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    field_cfg = load_config(cfg.field).with_speed(cfg.speed)
    ccfg = load_collector_config(cfg.collector)
    run_dir = cfg.data_dir / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    app_id = "meterstream-worker"
    broker = EmbeddedBroker(topics=all_topics(app_id), partitions=cfg.worker.partitions,
                            log_path=run_dir / "broker.log")
    stops: list[Callable[[], Awaitable[Any]]] = []
    worker_run: Running | None = None
    try:
        await asyncio.to_thread(broker.start)
        stops.append(lambda: asyncio.to_thread(broker.stop))
        print(f"meterstream demo: broker {broker.url}", file=out, flush=True)
        # the field's DTUs dial the collector's dial-in port
        field_cfg = dataclasses.replace(field_cfg, collector_port=ccfg.dialin_port,
                                        collector_host=ccfg.dialin_host)
        fld = Field(field_cfg)
        await fld.start()
        stops.append(fld.stop)
        archive_path = run_dir / "archive.csv"
        fld.write_archive(archive_path)
        print(f"meterstream demo: field of {fld.fleet.n:,} meters behind "
              f"{len(fld.terminals)} terminals; archive {archive_path}", file=out, flush=True)
        influx_sink = None
        if cfg.worker.influx is not None:
            from meterstream.pipeline.influx import InfluxSink

            influx_sink = InfluxSink.from_config(cfg.worker.influx)
            stops.append(influx_sink.aclose)
        worker_run = await start_worker(broker.bootstrap, archive_path, cfg.tariffs, cfg.worker,
                                        data_dir=run_dir, app_id=app_id,
                                        influx_sink=influx_sink)
        stops.append(worker_run.stop)
        archive = load_archive(archive_path)
        collector = KafkaCollector(archive, ccfg, broker.bootstrap,
                                   spool_dir=run_dir / "collector-spool", session_timeout_s=3.0)
        await collector.start()
        stops.append(collector.stop)
        meters = [m for t in archive.terminals.values() for m in
                  (f"{int(a):012d}" for a in t.address.tolist())]
        pay_task = loop.create_task(run_payments(broker.bootstrap, cfg.payments, meters))

        async def stop_payments() -> None:
            pay_task.cancel()
            await asyncio.gather(pay_task, return_exceptions=True)

        stops.append(stop_payments)
        base = worker_run.url.rsplit("/api/", 1)[0]
        print(f"meterstream demo: dashboard {base}/  API {worker_run.url}  "
              "(Ctrl-C stops everything)", file=out,
              flush=True)
        if ready is not None:
            ready.set()
        tty = out.isatty()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5 if tty else 10.0)
            line = _summary_line(worker_run, collector, fld)
            out.write(("\r\x1b[2K" + line) if tty else line + "\n")
            out.flush()
        if tty:
            out.write("\n")
        print("meterstream demo: stopping", file=out, flush=True)
    finally:
        for s in reversed(stops):
            with contextlib.suppress(Exception):
                await s()
    return 0


def _summary_line(worker_run: Running, collector: Any, fld: Any) -> str:
    w = worker_run.worker
    c = w.core.counters
    k = w.kpis or {}
    s = collector.collector.summary()
    by: dict[str, int] = {}
    for book in w.core.books.values():
        for cmd in book.open_commands():
            by[cmd.state] = by.get(cmd.state, 0) + 1
    return (f"terminals online {s['online']}/{s['terminals']}  readings {c['readings']:,}  "
            f"payments {c['payments']:,} (dup {c['duplicate_payments']})  commands sent "
            f"{c['commands_sent']}  open {sum(by.values())}  cut off {k.get('cut_off', '-')}  "
            f"in arrears {k.get('in_arrears', '-')}  relays open (field) "
            f"{fld.summary()['relays_open']}")
