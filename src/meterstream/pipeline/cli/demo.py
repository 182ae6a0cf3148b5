"""`meterstream demo`: the whole head-end on loopback in one command.

Starts the embedded Kafka-protocol broker (Tansu), the simulated field of config/demo.toml, the
collectors, one worker with its JSON API, and a seeded payment stream (duplicates, bank
withholdings, one that fails); prints where the API is and a live line; Ctrl-C stops it all.
"""

from __future__ import annotations

import argparse
from typing import Any

from meterstream.logs import add_arguments as add_log_arguments


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="run broker, simulated field, collectors, worker and API on loopback",
        description="One command for the whole pipeline on this machine: broker, field, "
        "collectors, worker, API, payments. See docs/pipeline.md.")
    p.add_argument("--config", default="config/demo.toml", metavar="FILE",
                   help="demo TOML (default config/demo.toml)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="Prometheus /metrics of the worker and collectors on this port (0: off; "
                   "default $METERSTREAM_METRICS_PORT, else worker.metrics_port)")
    add_log_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from meterstream import logs
    from meterstream.pipeline.cli._terminal import run_loop
    from meterstream.pipeline.config import load_demo_config, port_of
    from meterstream.pipeline.runner import run_demo

    logs.setup(args)
    cfg = load_demo_config(args.config)
    port = port_of(args.metrics_port, "metrics-port", cfg.worker.metrics_port)
    cfg = dataclasses.replace(cfg, worker=dataclasses.replace(cfg.worker, metrics_port=port))
    return int(run_loop(run_demo(cfg)))
