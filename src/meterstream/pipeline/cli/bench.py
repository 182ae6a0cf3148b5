"""`meterstream bench`: the benchmark suite, its JSON results and its markdown report with plots.

Parses and checks the arguments and hands over to meterstream.benchsuite (which runs the
scripts of the checkout's bench/); heavy imports stay in the handler. Never measures anything
itself. Parts, sizes and the report: docs/benchmarks.md ("The suite").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meterstream.errors import UserError

PART_NAMES = ("codec", "kernels", "collectors", "pipeline", "influx", "latency", "replay")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bench",
        help="run the benchmark suite and write bench/results/<date>.json and .md with plots",
        description=(
            "Run the benchmark suite (or the parts named with --part), each figure the median "
            "of --runs runs and each comparison a ratio measured in the same run, and write "
            "<date>.json (raw runs, medians, ratios, machine), <date>.md and PNG plots into "
            "--out (default bench/results of the checkout). A report of the same day keeps "
            "the parts not run again. Parts: " + ", ".join(PART_NAMES) + ". See "
            "docs/benchmarks.md."
        ),
    )
    p.add_argument("--part", action="extend", nargs="+", metavar="NAME", default=None,
                   help="only these parts (repeatable): " + ", ".join(PART_NAMES))
    p.add_argument("--runs", type=int, default=None, metavar="N",
                   help="runs per figure (default 3; --quick: 1)")
    p.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="the recorded year (default ../shared/data/lcl_2013_halfhourly.csv.gz "
                        "or $METERSTREAM_LCL_DATA)")
    p.add_argument("--quick", action="store_true",
                   help="one run, small sizes: checks the suite works, not a measurement")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where the report goes (default bench/results of the checkout)")
    p.add_argument("--payments", type=int, default=None, metavar="N",
                   help="payments per run and loss level of the latency part (default 20; "
                        "--quick: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_handler)


def _handler(args: argparse.Namespace) -> int:
    parts = list(dict.fromkeys(args.part or PART_NAMES))
    for name in parts:
        if name not in PART_NAMES:
            raise UserError(f"{name!r} is not a part; use one of {', '.join(PART_NAMES)}",
                            where="--part")
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        raise UserError(f"{runs}: give at least 1", where="--runs")
    payments = args.payments if args.payments is not None else (3 if args.quick else 20)
    if payments < 1:
        raise UserError(f"{payments}: give at least 1", where="--payments")
    if args.data is not None and not args.data.is_file():
        raise UserError("file not found (the recorded year: lcl_2013_halfhourly.csv.gz)",
                        where=f"--data {args.data}")
    from meterstream.benchsuite import command_line, run_suite

    json_path, md_path = run_suite(
        parts, runs=runs, quick=args.quick, data=args.data, out=args.out, payments=payments,
        progress=not args.no_progress, command=command_line(sys.argv[2:] if len(sys.argv) > 2
                                                            and sys.argv[1] == "bench" else []))
    print(f"bench: {', '.join(parts)} ({runs} run(s) each) -> {md_path} and {json_path.name}")
    return 0
