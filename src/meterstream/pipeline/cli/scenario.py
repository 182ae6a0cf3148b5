"""`meterstream scenario`: one seeded reliability run (field, collectors, workers, payments and
faults) ending with the money invariant; exit status 1 when it fails. docs/reliability.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scenario", help="a seeded fault scenario over the whole pipeline, then the money invariant",
        description="Run the simulated field, collectors on Kafka, workers and a payment stream "
        "with the chosen faults on a seeded schedule; then check initial + settled payments - "
        "charges = balances for every meter, and balances = meterstream replay on the traffic "
        "the workers saw. Exit status 1 when a check fails. See docs/reliability.md.")
    p.add_argument("--seed", required=True, type=int, metavar="N")
    p.add_argument("--minutes", type=float, default=3.0, metavar="M",
                   help="traffic this long, real time (default 3)")
    p.add_argument("--faults", default="", metavar="LIST",
                   help="comma-separated: kill,workers,broker-link,influx-down,flap,dup")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="where the run keeps its traffic, logs, replay and summary.json")
    p.add_argument("--link-cut-s", type=float, default=60.0, metavar="S",
                   help="how long broker-link cuts the collectors off (default 60)")
    p.add_argument("--influx-down-s", type=float, default=600.0, metavar="S",
                   help="how long influx-down keeps VictoriaMetrics down (default 600)")
    p.add_argument("--kills", type=int, default=3, metavar="K",
                   help="SIGKILLs of the kill fault (default 3)")
    p.add_argument("--areas", type=int, default=3, metavar="A",
                   help="areas of the field, 4 terminals each (default 3)")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from meterstream.errors import UserError
    from meterstream.scenario import ScenarioConfig, parse_faults
    from meterstream.scenario import run as run_scenario

    faults = parse_faults(args.faults)
    for name, value, lo, hi in (("--minutes", args.minutes, 0.25, 7 * 24 * 60.0),
                                ("--link-cut-s", args.link_cut_s, 1.0, 86400.0),
                                ("--influx-down-s", args.influx_down_s, 1.0, 86400.0),
                                ("--kills", args.kills, 1, 1000), ("--areas", args.areas, 1, 50)):
        if not lo <= value <= hi:
            raise UserError(f"{value:g} is out of range ({lo:g}..{hi:g})", where=name)
    cfg = ScenarioConfig(seed=args.seed, out=args.out, minutes=args.minutes, faults=faults,
                         link_cut_s=args.link_cut_s, influx_down_s=args.influx_down_s,
                         kills=args.kills, areas=args.areas)

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"scenario: {msg}", file=sys.stderr, flush=True)

    import logging

    # the Kafka clients' complaints while a fault is on go to the run's log, not the screen
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output directory: {exc.strerror}",
                        where="--out") from None
    handler = logging.FileHandler(args.out / "runner.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    import signal

    # SIGTERM stops a run as Ctrl-C does: the run's own cleanup stops the workers, the broker
    # and VictoriaMetrics (asyncio.run cancels the run's task on the way out)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rep = run_scenario(cfg, log=log)
    print(rep.summary())
    return 0 if rep.ok else 1
