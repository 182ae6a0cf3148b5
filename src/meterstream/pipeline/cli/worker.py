"""`meterstream worker`: one pipeline worker against a Kafka broker, with its payments intake
and its JSON API. Several workers with the same archive share the partitions (Kafka's
consumer group moves them, the changelog table moves their state). SIGINT / SIGTERM stop it.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker", help="run one pipeline worker (billing, control, commands, KPIs, API) on Kafka",
        description="Consume readings, link events, payments and command results for the "
        "partitions this worker holds; keep every terminal's state in a changelog table; send "
        "commands; serve the JSON API. See docs/pipeline.md.")
    p.add_argument("--broker", required=True, metavar="kafka://HOST:PORT")
    p.add_argument("--archive", required=True, metavar="FILE", help="the billing archive CSV")
    p.add_argument("--tariffs", required=True, metavar="FILE", help="tariffs TOML")
    p.add_argument("--config", metavar="FILE", help="worker TOML (config/worker.toml)")
    p.add_argument("--data-dir", default="var/worker", metavar="DIR",
                   help="where the worker keeps its local files (default var/worker)")
    p.add_argument("--app-id", default="meterstream-worker", metavar="ID",
                   help="the Faust app id (the consumer group and the changelog topic's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meterstream.errors import UserError
    from meterstream.pipeline.cli._kafka import bootstrap_of
    from meterstream.pipeline.cli._terminal import run_loop
    from meterstream.pipeline.config import load_worker_config

    bootstrap = bootstrap_of(args.broker)
    cfg = load_worker_config(args.config)
    for what in ("archive", "tariffs"):
        if not Path(getattr(args, what)).is_file():
            raise UserError(f"{what} file not found", where=getattr(args, what))
    return int(run_loop(_serve(bootstrap, args, cfg)))


async def _serve(bootstrap: str, args: argparse.Namespace, cfg: Any) -> int:
    import asyncio
    import signal
    import sys
    from pathlib import Path

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
    print(f"meterstream worker: {run.worker.core.fleet.n_meters:,} meters, "
          f"{run.worker.core.fleet.n_terminals:,} terminals; API {run.url}", file=sys.stderr,
          flush=True)
    try:
        await stop.wait()
    finally:
        await run.stop()
        if influx is not None:
            await influx.aclose()
    return 0
