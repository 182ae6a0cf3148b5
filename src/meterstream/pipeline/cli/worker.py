"""`meterstream worker`: one pipeline worker against a Kafka broker, with its payments intake
and its JSON API. Several workers with the same archive share the partitions (Kafka's
consumer group moves them, the changelog table moves their state). SIGINT / SIGTERM stop it.
"""

from __future__ import annotations

import argparse
from typing import Any

from meterstream.logs import add_arguments as add_log_arguments


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker", help="run one pipeline worker (billing, control, commands, KPIs, API) on Kafka",
        description="Consume readings, link events, payments and command results for the "
        "partitions this worker holds; keep every terminal's state in a changelog table; send "
        "commands; serve the JSON API. See docs/pipeline.md.")
    p.add_argument("--broker", metavar="kafka://HOST:PORT",
                   help="the Kafka broker (default $METERSTREAM_BROKER)")
    p.add_argument("--archive", required=True, metavar="FILE", help="the billing archive CSV")
    p.add_argument("--tariffs", required=True, metavar="FILE", help="tariffs TOML")
    p.add_argument("--config", metavar="FILE", help="worker TOML (config/worker.toml)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the worker keeps its local files (default $METERSTREAM_DATA_DIR, "
                   "else var/worker)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="Prometheus /metrics on this port (0: off; default "
                   "$METERSTREAM_METRICS_PORT, else worker.metrics_port)")
    add_log_arguments(p)
    p.add_argument("--app-id", default="meterstream-worker", metavar="ID",
                   help="the Faust app id (the consumer group and the changelog topic's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from meterstream import logs
    from meterstream.errors import UserError
    from meterstream.pipeline.cli._terminal import run_loop
    from meterstream.pipeline.config import (
        broker_of,
        env_value,
        load_worker_config,
        port_of,
        worker_env,
    )

    logs.setup(args)
    bootstrap = broker_of(args.broker)
    cfg = worker_env(load_worker_config(args.config))  # METERSTREAM_* over the TOML keys
    cfg = dataclasses.replace(cfg, metrics_port=port_of(args.metrics_port, "metrics-port",
                                                        cfg.metrics_port))
    args.data_dir = args.data_dir or env_value("METERSTREAM_DATA_DIR") or "var/worker"
    for what in ("archive", "tariffs"):
        if not Path(getattr(args, what)).is_file():
            raise UserError(f"{what} file not found", where=getattr(args, what))
    return int(run_loop(_serve(bootstrap, args, cfg)))


async def _serve(bootstrap: str, args: argparse.Namespace, cfg: Any) -> int:
    import asyncio
    import signal
    from pathlib import Path

    from meterstream.logs import say
    from meterstream.pipeline.runner import start_worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    influx = None
    if cfg.influx is not None:
        from meterstream.pipeline.influx import InfluxSink

        influx = InfluxSink.from_config(cfg.influx)
    run = await start_worker(bootstrap, Path(args.archive), Path(args.tariffs), cfg,
                             data_dir=Path(args.data_dir), app_id=args.app_id, influx_sink=influx)
    say(f"meterstream worker: {run.worker.core.fleet.n_meters:,} meters, "
        f"{run.worker.core.fleet.n_terminals:,} terminals; API {run.url}"
        + (f"; metrics {run.metrics_url}" if run.metrics_url else ""),
        logger="meterstream.worker", api=run.url, metrics=run.metrics_url)
    try:
        await stop.wait()
    finally:
        await run.stop()
        if influx is not None:
            await influx.aclose()
    return 0
