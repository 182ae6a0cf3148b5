"""Shared by `meterstream poll` and `meterstream control`: one terminal, reached once.

`tcp://host:port` connects to a terminal that listens; `--listen host:port` waits for one to
dial in (its `$REG` packet, if it sends one, is taken off the stream). Options common to both
commands are added here; the heavy imports stay inside the functions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from typing import Any

from meterstream.errors import UserError


def add_terminal_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", nargs="?", metavar="URL",
                   help="tcp://host:port of a terminal that listens (concentrator, serial server)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="instead of URL: wait for a terminal (DTU) to dial in here")
    p.add_argument("--meter", required=True, metavar="ADDR",
                   help="12-digit meter address (AAAAAAAAAAAA: whichever single meter answers)")
    p.add_argument("--protocol", type=int, choices=(2007, 1997), default=2007,
                   help="DL/T 645 edition of the meter (default 2007)")
    p.add_argument("--config", metavar="FILE",
                   help="collector TOML for timeouts, retries, preamble and credentials "
                   "(default: built-in defaults; docs/collectors.md)")
    p.add_argument("--timeout", type=float, metavar="S", help="per-request timeout (s)")
    p.add_argument("--retries", type=int, metavar="N", help="retries per request")
    p.add_argument("--wait", type=float, default=30.0, metavar="S",
                   help="how long to wait for the connection or the dial-in (default 30)")


def _hostport(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{text!r} is not host:port (e.g. 127.0.0.1:9700)", where=where)
    return host.strip("[]"), int(port)


def config_from(args: argparse.Namespace) -> Any:
    from meterstream.collectors.config import CollectorConfig, load_collector_config

    cfg = load_collector_config(args.config) if args.config else CollectorConfig()
    poll = cfg.poll
    if args.timeout is not None:
        if not 0.01 <= args.timeout <= 60:
            raise UserError(f"{args.timeout} s; give 0.01..60", where="--timeout")
        poll = dataclasses.replace(poll, timeout_s=args.timeout)
    if args.retries is not None:
        if not 0 <= args.retries <= 10:
            raise UserError(f"{args.retries}; give 0..10", where="--retries")
        poll = dataclasses.replace(poll, retries=args.retries)
    return dataclasses.replace(cfg, poll=poll)


def target(args: argparse.Namespace) -> tuple[str, str, int]:
    """(mode, host, port) from URL or --listen."""
    if bool(args.url) == bool(args.listen):
        raise UserError("give either URL (tcp://host:port) or --listen HOST:PORT", where="URL")
    if args.listen:
        host, port = _hostport(args.listen, "--listen")
        return "dial", host, port
    url = args.url
    if not url.startswith("tcp://"):
        raise UserError(f"{url!r}: only tcp://host:port is supported", where="URL")
    host, port = _hostport(url[len("tcp://"):].rstrip("/"), "URL")
    if port == 0:
        raise UserError("port 0 is not a terminal's port", where="URL")
    return "listen", host, port


async def open_session(args: argparse.Namespace, cfg: Any, sink: Any) -> tuple[Any, Any]:
    """A started session for the one terminal, connected (or dialled in); and its listener."""
    import numpy as np

    from meterstream.collectors.archive import P1997, P2007, Archive, TerminalPlan
    from meterstream.collectors.collector import Collector, DialInListener
    from meterstream.collectors.session import Dlt645Session

    mode, host, port = target(args)
    meter = args.meter.upper()
    plan = TerminalPlan(
        "cli", "", "terminal", mode, host, port, "dlt645",
        address=np.asarray([int(meter) if meter.isdigit() else 0], np.int64),
        meter_protocol=np.asarray([P2007 if args.protocol == 2007 else P1997], np.int8))
    session = Dlt645Session(plan, cfg, sink, phase_s=1e9)  # no poll cycles: one-off jobs only
    listener = None
    if mode == "dial":
        listener = DialInListener(Collector(Archive({}, "<cli>"), cfg, sink), any_session=session)
        try:
            await listener.start(host, port)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}",
                            where="--listen") from None
    session.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.wait
    while not session.online:
        if loop.time() > deadline:
            downs = [e.detail for e in getattr(sink, "events", []) if e.kind == "down"]
            await session.stop()
            if listener is not None:
                await listener.stop()
            if mode == "dial":
                raise UserError(f"no terminal dialled in within {args.wait:g} s",
                                where="--listen")
            raise UserError(downs[-1] if downs else f"no connection within {args.wait:g} s",
                            where="URL")
        await asyncio.sleep(0.02)
    return session, listener


async def close_session(session: Any, listener: Any) -> None:
    await session.stop()
    if listener is not None:
        await listener.stop()


def run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.run(coro)
