"""`meterstream convert-lcl`: the recorded year (Low Carbon London) as field traffic.

Writes, into DIR, the archive (with its -terminals and -meters files), readings.csv and
payments.csv for `meterstream replay`, and traffic.cap for `meterstream record play`. The work
is in meterstream.recording.convert (docs/recording.md); heavy imports stay in the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meterstream.errors import UserError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert-lcl",
        aliases=["convert_lcl"],  # the module's name, as every other subcommand is spelled
        help="turn the recorded LCL year into an archive, a capture, readings and payments",
        description="Turn lcl_2013_halfhourly.csv.gz into a recorded year of field traffic: "
        "archive (12-digit addresses, terminals, areas, classes, plans), the 0001FF00 replies "
        "of every half-hour read as a capture file (gaps stay missed reads), readings.csv and a "
        "seeded payment stream for `meterstream replay`. See docs/recording.md.",
    )
    p.add_argument("--data", type=Path, metavar="FILE",
                   help="the recorded file (default ../shared/data/lcl_2013_halfhourly.csv.gz "
                   "or $METERSTREAM_LCL_DATA)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--meters", type=int, metavar="N", help="only the first N meters")
    p.add_argument("--seed", type=int, default=2013, help="archive, registers and payments seed")
    p.add_argument("--port-base", type=int, default=17100, metavar="N",
                   help="terminal i listens on N+i in the archive (default 17100)")
    p.add_argument("--dial-every", type=int, default=0, metavar="K",
                   help="every K-th terminal is a DTU that dials the collector (default 0: none)")
    p.add_argument("--collector", default="127.0.0.1:9700", metavar="HOST:PORT",
                   help="where DTUs dial (default 127.0.0.1:9700)")
    p.set_defaults(func=_handler)


def _handler(args: argparse.Namespace) -> int:
    if not 1 <= args.port_base <= 65000:
        raise UserError(f"{args.port_base}: give 1..65000", where="--port-base")
    if args.dial_every < 0:
        raise UserError(f"{args.dial_every}: give 0 or more", where="--dial-every")
    host, sep, port = args.collector.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise UserError(f"{args.collector!r} is not host:port", where="--collector")
    if args.out.exists() and not args.out.is_dir():
        raise UserError("exists and is not a directory", where=str(args.out))
    from meterstream.recording.convert import convert_lcl

    c = convert_lcl(args.out, data_path=args.data, meters=args.meters, seed=args.seed,
                    port_base=args.port_base, dial_every=args.dial_every,
                    collector=args.collector)
    print(f"{c.meters:,} meters behind {c.terminals:,} terminals: {c.reads:,} half-hour reads, "
          f"{c.replies:,} replies, {c.missed:,} missed (recorded gaps)")
    for k, path in c.paths.items():
        print(f"  {k}: {path} ({path.stat().st_size:,} bytes)")
    return 0
