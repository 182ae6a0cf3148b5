"""`meterstream replay`: recorded traffic through the billing and control kernels.

Parses the arguments and hands over to pipeline/replay.py; heavy imports stay in the handler so
that `meterstream --help` answers fast. Never computes anything itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "replay",
        help="run recorded readings and payments through the billing kernels",
        description=(
            "Replay recorded readings and payments through the same billing and cost-control "
            "rules as the live system, and write DIR/balances.csv, commands.csv, events.csv and "
            "rejected.csv. Rules and file formats: docs/billing.md."
        ),
    )
    p.add_argument(
        "--archive",
        required=True,
        type=Path,
        metavar="A.csv",
        help="meters: meter,terminal,area,class,plan,protected,initial_balance,role",
    )
    p.add_argument(
        "--readings",
        required=True,
        type=Path,
        metavar="R.csv",
        help="registers: ts,meter,total,t1,t2,t3,t4 (kWh)",
    )
    p.add_argument(
        "--payments",
        required=True,
        type=Path,
        metavar="P.csv",
        help="payments: ts,payment_id,meter,amount,status,channel (yuan)",
    )
    p.add_argument(
        "--tariffs", required=True, type=Path, metavar="T.toml", help="tariffs TOML file"
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory (created)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_handler)


def _handler(args: argparse.Namespace) -> int:
    from meterstream.pipeline.replay import run_replay

    s = run_replay(
        args.archive,
        args.readings,
        args.payments,
        args.tariffs,
        args.out,
        progress=not args.no_progress,
    )
    print(
        f"replayed {s.readings:,} readings and {s.payments:,} payments of {s.meters:,} meters: "
        f"{s.commands:,} commands, {s.events:,} events, {s.rejected:,} rows rejected -> {args.out}"
    )
    return 0
