"""`meterstream sim`: run the simulated field (meterfield) until Ctrl-C.

Prints where each terminal listens or which collector address it dials (a table; for many
terminals a summary plus a CSV file), then a live one-line summary refreshed in place.
SIGINT and SIGTERM stop it cleanly. The field package is imported inside the handler only,
so `meterstream --help` stays fast; a configuration mistake is one line and exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from meterstream.logs import add_arguments as add_log_arguments

TABLE_LIMIT = 40  # above this many terminals, print a summary and write the table to a file


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sim",
        help="run the simulated field (meters, concentrators, DTUs, Modbus gateways) on loopback",
        description="Run the simulated field described by a TOML file until Ctrl-C: DL/T 645 "
        "terminals that listen or dial out, Modbus TCP gateways, meters with registers, relays, "
        "clocks and faults. See docs/field.md.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="field TOML (e.g. config/field-demo.toml)")
    p.add_argument("--speed", type=float, metavar="X",
                   help="simulated seconds per real second (overrides field.speed; 0 pauses)")
    p.add_argument("--write-archive", metavar="PATH",
                   help="write the fleet archive CSV here (and PATH-terminals.csv, PATH-meters.csv)")
    add_log_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from meterfield.config import load_config
    from meterstream import logs

    logs.setup(args)
    cfg = load_config(args.config)
    if args.speed is not None:
        cfg = cfg.with_speed(args.speed)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    return int(runner(_serve(cfg, args.write_archive)))


def _format_endpoints(field: Any) -> list[str]:
    rows = [("terminal", "area", "kind", "mode", "address", "meters")]
    for spec in field.fleet.terminals:
        mode, host, port = field.terminals[spec.id].endpoint()
        rows.append((spec.id, field.fleet.areas[spec.area], spec.kind, mode, f"{host}:{port}",
                     str(len(spec.meters))))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _summary_line(s: dict[str, Any]) -> str:
    return (f"{s['sim_time']}  terminals up {s['terminals_up']}/{s['terminals']}  "
            f"meters {s['meters']:,}  requests {s['requests']:,}  dropped {s['dropped']:,}  "
            f"corrupted {s['corrupted']:,}  late {s['late']:,}  relays open {s['relays_open']:,}"
            f"  outages {s['outages']}")


async def _serve(cfg: Any, archive: str | None) -> int:
    import asyncio
    import os
    import signal
    import sys
    import tempfile
    from pathlib import Path

    from meterfield.field import Field

    field = Field(cfg)
    await field.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        out = sys.stdout
        n_term = len(field.terminals)
        print(f"meterfield: {field.fleet.n:,} meters behind {n_term:,} terminals in "
              f"{len(field.fleet.areas)} areas, speed x{field.clock.speed:g}", file=out)
        if archive:
            paths = field.write_archive(archive)
            print("archive: " + ", ".join(str(p) for p in paths), file=out)
        table = _format_endpoints(field)
        if n_term <= TABLE_LIMIT:
            print("\n".join(table), file=out)
        else:
            kinds: dict[tuple[str, str], int] = {}
            for spec in field.fleet.terminals:
                mode = field.terminals[spec.id].endpoint()[0]
                kinds[(spec.kind, mode)] = kinds.get((spec.kind, mode), 0) + 1
            for (kind, mode), k in sorted(kinds.items()):
                print(f"  {k:>6,} {kind} ({mode})", file=out)
            if archive:
                print(f"every terminal's address: {paths[1]}", file=out)
            else:
                fd, name = tempfile.mkstemp(prefix="meterfield-terminals-", suffix=".txt")
                os.close(fd)
                Path(name).write_text("\n".join(table) + "\n")
                print(f"every terminal's address: {name}", file=out)
        out.flush()
        tty = out.isatty()
        every = 0.5 if tty else 10.0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass
            line = _summary_line(field.summary())
            if tty:
                out.write("\r\x1b[2K" + line)
            else:
                out.write(line + "\n")
            out.flush()
        if tty:
            out.write("\n")
        print("meterfield: stopping", file=out)
    finally:
        await field.stop()
    return 0
