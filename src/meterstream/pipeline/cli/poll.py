"""`meterstream poll`: read one DI of one meter through its terminal, print one JSON line.

The reply is decoded as `meterstream frame decode` does (values with units, error bits); a
timeout or a broken reply is an outcome in the JSON, not a traceback. Exit status 0 when the
meter answered normally, 1 otherwise, 2 for a mistake in the arguments.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from meterstream.pipeline.cli._terminal import (
    add_terminal_args,
    close_session,
    config_from,
    open_session,
    run_loop,
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "poll", help="read one data item of one meter through its terminal (one JSON line)",
        description="Read one DL/T 645 data identifier of one meter through a terminal that "
        "listens (URL tcp://host:port) or that dials in (--listen host:port), and print the "
        "decoded reply as one JSON line. See docs/collectors.md.")
    add_terminal_args(p)
    p.add_argument("--di", required=True, metavar="DI",
                   help="data identifier in hex: 8 digits for 2007 (0001FF00), 4 for 1997 (9010)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meterstream.pipeline.cli.frame import parse_address, parse_di

    parse_address(args.meter)
    di = parse_di(args.di, args.protocol)
    cfg = config_from(args)
    return int(run_loop(_poll(args, cfg, di)))


async def _poll(args: argparse.Namespace, cfg: Any, di: int) -> int:
    from meterstream.collectors.sink import MemorySink
    from meterstream.pipeline.cli.frame import describe_frame

    sink = MemorySink()
    session, listener = await open_session(args, cfg, sink)
    try:
        frame, outcome = await session.read(args.meter.upper(), di, args.protocol)
    finally:
        await close_session(session, listener)
    out: dict[str, Any] = {"meter": args.meter.upper(),
                           "di": f"{di:08X}" if args.protocol == 2007 else f"{di:04X}",
                           "protocol": args.protocol}
    if frame is None:
        out["outcome"] = outcome
    else:
        described = describe_frame(frame)
        out["outcome"] = "error" if frame.is_abnormal else "ok"
        out["reply"] = described
    print(json.dumps(out, ensure_ascii=False))
    return 0 if out["outcome"] == "ok" else 1
