"""`meterstream record`: capture a live run's wire traffic; `record export` / `record play`.

    meterstream record --archive A.csv --out run.cap --write-archive B.csv   (the proxy)
    meterstream record export --capture run.cap --pcap run.pcap
    meterstream record play --capture run.cap [--speed X] [--write-archive P.csv]

The work is in meterstream.recording (docs/recording.md); this module parses arguments and
prints. Heavy imports stay in the handlers so `meterstream --help` answers fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meterstream.errors import UserError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "record",
        help="record wire traffic to a capture file; export it as pcap; play it back",
        description="Without a subcommand: a recording proxy between collectors and the "
        "terminals of an archive, writing every byte both ways to a capture file until Ctrl-C. "
        "Point the collector at the archive it writes (--write-archive). See docs/recording.md.",
    )
    p.add_argument("--archive", type=Path, metavar="A.csv",
                   help="the terminals to relay (A-terminals.csv, A-meters.csv beside it)")
    p.add_argument("--out", type=Path, metavar="run.cap", help="capture file to write")
    p.add_argument("--write-archive", type=Path, metavar="B.csv",
                   help="write the archive the collector must use (listening terminals point "
                   "at the proxy)")
    p.add_argument("--host", default="127.0.0.1", help="where the proxy listens (default 127.0.0.1)")
    p.add_argument("--port-base", type=int, default=0, metavar="N",
                   help="first proxy port, +1 per listening terminal (default 0: ephemeral)")
    p.add_argument("--dial-listen", metavar="HOST:PORT",
                   help="DTUs dial here (the address in the field's [collector] section)")
    p.add_argument("--dial-to", metavar="HOST:PORT",
                   help="the collector's dial-in port ([dialin] in its TOML) the DTUs are relayed to")
    p.add_argument("--append", action="store_true", help="append to an existing capture")
    p.set_defaults(func=_record)
    sub = p.add_subparsers(dest="record_command", metavar="SUBCOMMAND")
    e = sub.add_parser("export", help="write a capture as pcap (Wireshark, tshark)",
                       description="Write a capture file as classic libpcap: one TCP port pair "
                       "per terminal, reassemblable streams. See docs/recording.md.")
    e.add_argument("--capture", required=True, type=Path, metavar="FILE")
    e.add_argument("--pcap", required=True, type=Path, metavar="FILE")
    e.set_defaults(func=_export)
    y = sub.add_parser("play", help="serve the terminals of a capture to collectors",
                       description="Serve every terminal of a capture over TCP in its recorded "
                       "role (listening, or dialling the collector), answering each request with "
                       "the recorded reply of the current read, simulated time running at "
                       "--speed. Ctrl-C stops. See docs/recording.md.")
    y.add_argument("--capture", required=True, type=Path, metavar="FILE")
    y.add_argument("--speed", type=float, default=1.0, metavar="X",
                   help="simulated seconds per real second (default 1; 1800 = a half hour a second)")
    y.add_argument("--start", metavar="ISO",
                   help="simulated start, e.g. 2013-03-01T00:00:00+08:00 (default: the first record)")
    y.add_argument("--host", help="where listening terminals bind (default: as recorded)")
    y.add_argument("--port-base", type=int, metavar="N",
                   help="first listening port, +1 per terminal (0: ephemeral; default: as recorded)")
    y.add_argument("--collector", metavar="HOST:PORT",
                   help="where DTUs dial (default: as recorded)")
    y.add_argument("--write-archive", type=Path, metavar="P.csv",
                   help="write P-terminals.csv and P-meters.csv with the ports served")
    y.set_defaults(func=_play)


def _hostport(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise UserError(f"{text!r} is not host:port (e.g. 127.0.0.1:9700)", where=where)
    return host.strip("[]"), int(port)


def _port_base(n: int | None, where: str) -> None:
    if n is not None and not 0 <= n <= 65535:
        raise UserError(f"{n} is not a port (0..65535)", where=where)


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional
        import asyncio

        return asyncio.run


def _record(args: argparse.Namespace) -> int:
    if args.archive is None or args.out is None:
        raise UserError("give --archive A.csv and --out run.cap (or a subcommand: export, play)",
                        where="meterstream record")
    _port_base(args.port_base, "--port-base")
    if (args.dial_listen is None) != (args.dial_to is None):
        raise UserError("give both --dial-listen and --dial-to (DTUs dial the first; the proxy "
                        "relays to the collector's dial-in port, the second)", where="--dial-to")
    dial_listen = _hostport(args.dial_listen, "--dial-listen") if args.dial_listen else None
    dial_to = _hostport(args.dial_to, "--dial-to") if args.dial_to else None
    from meterstream.capture import CaptureWriter
    from meterstream.collectors.archive import load_archive

    archive = load_archive(args.archive)
    if args.write_archive is not None and Path(args.write_archive).resolve() == Path(args.archive).resolve():
        raise UserError("must differ from --archive (the proxy's ports replace the terminals')",
                        where="--write-archive")
    meta = {"made_by": "meterstream record", "archive": str(args.archive)}
    writer = CaptureWriter(args.out, meta=meta, append=args.append)
    return int(_runner()(_proxy(args, archive, writer, dial_listen, dial_to)))


async def _proxy(args: argparse.Namespace, archive: Any, writer: Any,
                 dial_listen: tuple[str, int] | None, dial_to: tuple[str, int] | None) -> int:
    import asyncio
    import signal
    import sys

    from meterstream.recording.proxy import RecordingProxy

    proxy = RecordingProxy(archive, writer, host=args.host, port_base=args.port_base,
                           dial_listen=dial_listen, dial_to=dial_to)
    try:
        await proxy.start()
    except OSError as exc:
        writer.close()
        raise UserError(f"cannot listen: {exc.strerror or exc}", where="meterstream record") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.write_archive is not None:
            proxy.write_archive(args.archive, args.write_archive)
        for tid, port in proxy.ports.items():
            plan = archive.terminals[tid]
            print(f"{tid}: {args.host}:{port} -> {plan.host}:{plan.port}")
        if dial_listen:
            print(f"dial-in: {dial_listen[0]}:{dial_listen[1]} -> {dial_to[0]}:{dial_to[1]}")  # type: ignore[index]
        print(f"recording to {args.out}" + (f"; collectors use {args.write_archive}"
                                            if args.write_archive else ""), flush=True)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 10.0)
            except TimeoutError:
                pass
            s = proxy.stats
            print(f"connections {s.connections:,}  open {len(proxy.relays):,}  bytes to field "
                  f"{s.to_field:,}  to collector {s.to_collector:,}  records {writer.records:,}",
                  file=sys.stderr, flush=True)
    finally:
        await proxy.stop()
        writer.close()
    print(f"wrote {writer.records:,} records ({writer.bytes:,} bytes of traffic) to {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from meterstream.capture import read_capture
    from meterstream.recording.pcap import export_pcap

    cap = read_capture(args.capture)
    s = export_pcap(cap, args.pcap)
    note = f" (capture damaged: {cap.damage}; exported what came before)" if cap.damage else ""
    print(f"wrote {s.packets:,} packets ({s.data_packets:,} with data, {s.payload_bytes:,} bytes, "
          f"{s.connections:,} connections of {len(cap.terminals):,} terminals) to {args.pcap}"
          + note)
    return 0


def _play(args: argparse.Namespace) -> int:
    if not 0 <= args.speed <= 1e9:
        raise UserError(f"{args.speed}: give 0..1e9 simulated seconds per real second",
                        where="--speed")
    _port_base(args.port_base, "--port-base")
    start_ns = None
    if args.start:
        from datetime import datetime

        try:
            when = datetime.fromisoformat(args.start)
        except ValueError:
            raise UserError(f"{args.start!r} is not an ISO date-time", where="--start") from None
        if when.tzinfo is None:
            raise UserError(f"{args.start!r} has no UTC offset (e.g. +08:00)", where="--start")
        start_ns = int(when.timestamp()) * 1_000_000_000
    collector = _hostport(args.collector, "--collector") if args.collector else None
    from meterstream.capture import read_capture

    cap = read_capture(args.capture)
    if not cap.terminals:
        raise UserError("the capture holds no terminals", where=str(args.capture))
    return int(_runner()(_serve(args, cap, start_ns, collector)))


async def _serve(args: argparse.Namespace, cap: Any, start_ns: int | None,
                 collector: tuple[str, int] | None) -> int:
    import asyncio
    import signal
    import sys
    from datetime import UTC, datetime

    from meterstream.recording.play import Player

    player = Player(cap, speed=args.speed, start_ns=start_ns, host=args.host,
                    port_base=args.port_base, collector=collector)
    try:
        await player.start()
    except OSError as exc:
        await player.stop()
        raise UserError(f"cannot listen: {exc.strerror or exc}", where="meterstream record play") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def when(ns: int) -> str:
        return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")

    try:
        if args.write_archive is not None:
            player.write_archive(args.write_archive)
        for tid, (mode, host, port) in list(player.endpoints.items())[:40]:
            print(f"  {tid}  {mode}  {host}:{port}")
        if player.skipped:
            print(f"not served: {len(player.skipped):,} Modbus terminals (replay answers DL/T 645 "
                  f"only): {', '.join(player.skipped[:5])}{' ...' if len(player.skipped) > 5 else ''}")
        print(f"serving {len(player.endpoints):,} terminals of {args.capture}, "
              f"{when(player.first_ns)} .. {when(player.last_ns)} at x{args.speed:g}", flush=True)
        ended = False
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 10.0)
            except TimeoutError:
                pass
            s = player.summary()
            print(f"{when(s['sim_ns'])}  requests {s['requests']:,}  answered {s['answered']:,}"
                  f"  silent {s['silent']:,}  connections {s['connections']:,}",
                  file=sys.stderr, flush=True)
            if s["ended"] and not ended:
                ended = True
                print("the recording has ended: the last reads keep being served",
                      file=sys.stderr, flush=True)
    finally:
        await player.stop()
    return 0
