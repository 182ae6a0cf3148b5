"""`meterstream collect`: continuous collection of every terminal of an archive.

JSON lines (one per batch, link / meter event and command result) go to --out (standard
output by default); a live line per cycle period goes to standard error: terminals online,
reads ok / failed in that period, and the collection success rate (meters read ok / meters
read). SIGINT and SIGTERM stop it cleanly. Until the pipeline publishes to Kafka this is how a
collector's output is seen.
"""

from __future__ import annotations

import argparse
from typing import Any

from meterstream.errors import UserError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "collect", help="poll every terminal of an archive continuously (JSON lines out)",
        description="Connect to (or accept) every terminal of the archive, poll each meter "
        "every cycle, and write batches and events as JSON lines. See docs/collectors.md.")
    p.add_argument("--archive", required=True, metavar="FILE",
                   help="archive CSV (with FILE-terminals.csv and FILE-meters.csv beside it)")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="collector TOML (e.g. config/collector.toml)")
    p.add_argument("--out", default="-", metavar="FILE",
                   help="JSON lines here (default: standard output)")
    p.add_argument("--no-batches", action="store_true",
                   help="write events only, not the reading batches")
    p.add_argument("--cycles", type=int, metavar="N",
                   help="stop after N cycle periods (default: run until Ctrl-C)")
    p.add_argument("--cycle", type=float, metavar="S",
                   help="override collector.cycle_s for every terminal")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from meterstream.collectors.archive import load_archive
    from meterstream.collectors.config import load_collector_config
    from meterstream.pipeline.cli._terminal import run_loop

    cfg = load_collector_config(args.config)
    if args.cycle is not None:
        if not 0.01 <= args.cycle <= 86400:
            raise UserError(f"{args.cycle} s; give 0.01..86400", where="--cycle")
        cfg = dataclasses.replace(
            cfg, poll=dataclasses.replace(cfg.poll, cycle_s=args.cycle),
            overrides={k: dataclasses.replace(v, cycle_s=args.cycle)
                       for k, v in cfg.overrides.items()})
    if args.cycles is not None and args.cycles < 1:
        raise UserError(f"{args.cycles}; give 1 or more", where="--cycles")
    archive = load_archive(args.archive)
    if not archive.terminals:
        raise UserError("the archive lists no terminals", where=args.archive)
    import sys

    try:
        out = sys.stdout if args.out == "-" else open(args.out, "a", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise UserError(f"cannot write: {exc.strerror}", where=args.out) from None
    try:
        return int(run_loop(_collect(args, cfg, archive, out)))
    finally:
        if out is not sys.stdout:
            out.close()


def status_line(now: dict[str, Any], before: dict[str, Any]) -> str:
    ok = now["rows_ok"] - before["rows_ok"]
    read = now["rows"] - before["rows"]
    rate = f"{100.0 * ok / read:.2f} %" if read else "-"
    return (f"terminals online {now['online']}/{now['terminals']}  "
            f"reads ok {now['reads_ok'] - before['reads_ok']:,}  "
            f"failed {now['reads_failed'] - before['reads_failed']:,}  "
            f"meters read ok {ok:,}/{read:,}  success {rate}")


async def _collect(args: argparse.Namespace, cfg: Any, archive: Any, out: Any) -> int:
    import asyncio
    import signal
    import sys

    from meterstream.collectors.collector import Collector
    from meterstream.collectors.sink import JsonLinesSink

    sink = JsonLinesSink(out, batches=not args.no_batches)
    collector = Collector(archive, cfg, sink)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await collector.start()
    except OSError as exc:
        raise UserError(f"cannot listen for dial-in terminals on {cfg.dialin_host}:"
                        f"{cfg.dialin_port}: {exc.strerror}", where=f"{cfg.source}: dialin") from None
    err = sys.stderr
    print(f"meterstream collect: {archive.meters:,} meters behind {len(archive.terminals):,} "
          f"terminals, a cycle every {cfg.poll.cycle_s:g} s"
          + (f", dial-in on {cfg.dialin_host}:{collector.listener.port}"
             if collector.listener else ""), file=err, flush=True)
    before = collector.summary()
    periods = 0
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), cfg.poll.cycle_s)
            except TimeoutError:
                pass
            now = collector.summary()
            print(status_line(now, before), file=err, flush=True)
            before = now
            out.flush()
            periods += 1
            if args.cycles is not None and periods >= args.cycles:
                break
    finally:
        await collector.stop()
        out.flush()
    return 0
