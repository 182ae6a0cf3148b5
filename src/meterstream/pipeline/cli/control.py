"""`meterstream control`: one remote-control command (1CH) with read-back of status word 3.

Prints the outcome as JSON: confirmed (the relay bit shows it), refused (with the meter's
reason) or unconfirmed. The password and operator code come from the environment variables
the collector configuration names (default METERSTREAM_METER_PASSWORD and
METERSTREAM_OPERATOR_CODE), never from a flag. Exit status 0 when confirmed, 1 otherwise,
2 for a mistake in the arguments.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from meterstream.errors import UserError
from meterstream.pipeline.cli._terminal import (
    add_terminal_args,
    close_session,
    config_from,
    open_session,
    run_loop,
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "control", help="send one remote-control command to a meter and confirm it by read-back",
        description="Trip, close (direct or allowed) or keep-power a meter through its terminal, "
        "then read status word 3 until the relay bit shows the action or the confirmation "
        "timeout passes. See docs/collectors.md.")
    add_terminal_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--trip", action="store_const", const="trip", dest="action",
                      help="open the relay (跳闸)")
    what.add_argument("--close", action="store_const", const="close", dest="action",
                      help="close the relay directly (直接合闸)")
    what.add_argument("--allow-close", action="store_const", const="allow-close", dest="action",
                      help="allow closing: the customer presses the meter's button (合闸允许)")
    what.add_argument("--keep-power", choices=("on", "off"), metavar="on|off",
                      help="keep power (保电) on or off")
    p.add_argument("--reason", default="", help="who asks and why (kept with the result)")
    p.add_argument("--confirm-timeout", type=float, metavar="S",
                   help="how long to read the relay back (default: the config's, 60 s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from meterstream.pipeline.cli.frame import parse_address

    address = parse_address(args.meter)
    if not address.isdigit():
        raise UserError("a command goes to one meter: give its 12 digits", where="--meter")
    action = args.action or f"keep-power-{args.keep_power}"
    cfg = config_from(args)
    if args.confirm_timeout is not None:
        if not 0.1 <= args.confirm_timeout <= 3600:
            raise UserError(f"{args.confirm_timeout} s; give 0.1..3600", where="--confirm-timeout")
        cfg = dataclasses.replace(cfg, confirm_timeout_s=args.confirm_timeout)
    return int(run_loop(_control(args, cfg, address, action)))


async def _control(args: argparse.Namespace, cfg: Any, address: str, action: str) -> int:
    from meterstream.collectors.commands import CONFIRMED, Command
    from meterstream.collectors.sink import MemorySink

    sink = MemorySink()
    session, listener = await open_session(args, cfg, sink)
    try:
        result = await session.execute(Command(address, action, reason=args.reason))
    finally:
        await close_session(session, listener)
    print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
    return 0 if result.outcome == CONFIRMED else 1
