"""`meterstream collector`: one collector process on Kafka (docs/collectors-kafka.md).

Joins the collectors' consumer group on the commands topic, holds the terminals of the
partitions it is assigned, publishes batches, link events and command results, and executes the
commands for its terminals. Start several on the same archive and group: they share the
terminals with no manual sharding. A live status line goes to standard error; SIGINT and
SIGTERM stop it cleanly (running commands finish or are reported, queued messages are published
or spooled).
"""

from __future__ import annotations

import argparse
from typing import Any

from meterstream.errors import UserError
from meterstream.logs import add_arguments as add_log_arguments

LOGGER = "meterstream.collector"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "collector", help="a collector process on Kafka: publish readings, execute commands",
        description="Poll the terminals this process is assigned (by Kafka's consumer group on "
        "the commands topic), publish batches, link events and command results to Kafka, and "
        "execute the commands for its terminals. See docs/collectors-kafka.md.")
    p.add_argument("--broker", metavar="URL",
                   help="kafka://HOST:PORT (several: kafka://H1:P1,H2:P2; default "
                   "$METERSTREAM_BROKER)")
    p.add_argument("--archive", required=True, metavar="FILE",
                   help="archive CSV (with FILE-terminals.csv and FILE-meters.csv beside it)")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="collector TOML (e.g. config/collector.toml)")
    p.add_argument("--group", default=None, metavar="NAME",
                   help="consumer group of the collectors (default $METERSTREAM_COLLECTOR_GROUP, "
                   "else meterstream-collectors)")
    p.add_argument("--spool", default=None, metavar="DIR",
                   help="where messages wait while the broker is unreachable; one directory "
                   "per process (default $METERSTREAM_COLLECTOR_SPOOL, else var/collector-spool)")
    p.add_argument("--spool-max-mb", type=int, default=256, metavar="MB",
                   help="bound of the spool (default 256)")
    p.add_argument("--session-timeout", type=float, default=10.0, metavar="S",
                   help="consumer group session timeout: a collector that dies is replaced "
                   "after this long (default 10)")
    p.add_argument("--status-every", type=float, default=10.0, metavar="S",
                   help="status line period on standard error (default 10 s)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="Prometheus /metrics on this port (0: off; default "
                   "$METERSTREAM_METRICS_PORT, else 0)")
    p.add_argument("--metrics-host", default=None, metavar="HOST",
                   help="address of /metrics (default $METERSTREAM_METRICS_HOST, else 127.0.0.1)")
    add_log_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from meterstream import logs
    from meterstream.collectors.archive import load_archive
    from meterstream.collectors.config import load_collector_config
    from meterstream.pipeline.cli._terminal import run_loop
    from meterstream.pipeline.config import broker_of, env_value, port_of

    logs.setup(args)
    bootstrap = broker_of(args.broker)
    if args.group is None:
        args.group = env_value("METERSTREAM_COLLECTOR_GROUP") or "meterstream-collectors"
    args.spool = args.spool or env_value("METERSTREAM_COLLECTOR_SPOOL") or "var/collector-spool"
    args.metrics_port = port_of(args.metrics_port, "metrics-port", 0)
    args.metrics_host = args.metrics_host or env_value("METERSTREAM_METRICS_HOST") or "127.0.0.1"
    if not args.group:
        raise UserError("give a group name", where="--group")
    if not 1 <= args.spool_max_mb <= 1_000_000:
        raise UserError(f"{args.spool_max_mb}; give 1..1000000", where="--spool-max-mb")
    if not 1.0 <= args.session_timeout <= 300.0:
        raise UserError(f"{args.session_timeout} s; give 1..300", where="--session-timeout")
    if not 0.1 <= args.status_every <= 86400:
        raise UserError(f"{args.status_every} s; give 0.1..86400", where="--status-every")
    cfg = load_collector_config(args.config)
    dialin = {k: v for k, v in (("dialin_host", env_value("METERSTREAM_DIALIN_HOST")),
                                ("dialin_port", env_value("METERSTREAM_DIALIN_PORT")))
              if v is not None}
    if dialin:  # the environment over [dialin] host / port (docs/operations.md)
        cfg = dataclasses.replace(cfg, **dialin)
    archive = load_archive(args.archive)
    if not archive.terminals:
        raise UserError("the archive lists no terminals", where=args.archive)
    return int(run_loop(_collector(args, bootstrap, cfg, archive)))


def status_line(s: dict[str, Any], before: dict[str, Any]) -> str:
    k = s["kafka"]
    parts = ",".join(str(p) for p in s["partitions"]) or "none"
    return (f"partitions {parts}  terminals {s['online']}/{s['terminals']} online  "
            f"rows ok {s['rows_ok'] - before['rows_ok']:,}/{s['rows'] - before['rows']:,}  "
            f"published {k['published'] - before['kafka']['published']:,}  "
            f"pending {k['pending']:,}  "
            + (f"SPOOLING ({k['spool_bytes']:,} bytes)  " if k["spooling"] else "")
            + (f"lost {k['failed'] + k['refused']:,}  " if k["failed"] + k["refused"] else "")
            + f"commands {s['commands']:,} ({s['running']} running)")


async def _collector(args: argparse.Namespace, bootstrap: str, cfg: Any, archive: Any) -> int:
    import asyncio
    import signal

    from meterstream.logs import say
    from meterstream.pipeline.collector_kafka import KafkaCollector, KafkaSink

    sink = KafkaSink(bootstrap, spool_dir=args.spool, spool_max_bytes=args.spool_max_mb << 20)
    kc = KafkaCollector(archive, cfg, bootstrap, group=args.group, sink=sink,
                        session_timeout_s=args.session_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await kc.start()
    except OSError as exc:
        sink.spool.close()
        raise UserError(f"cannot listen for dial-in terminals on {cfg.dialin_host}:"
                        f"{cfg.dialin_port}: {exc.strerror}", where=f"{cfg.source}: dialin") from None
    except BaseException:
        sink.spool.close()
        raise
    server = None
    if args.metrics_port:
        from meterstream.pipeline import metrics

        try:
            server = metrics.serve(args.metrics_port, args.metrics_host)
        except OSError as exc:
            await kc.stop()
            raise UserError(f"cannot listen on {args.metrics_host}:{args.metrics_port}: "
                            f"{exc.strerror}", where="--metrics-port") from None
        say(f"meterstream collector: metrics on http://{args.metrics_host}:"
            f"{server.server_port}/metrics", logger=LOGGER)
    listener = kc.collector.listener
    say(f"meterstream collector: group {args.group} on {bootstrap}, {len(archive.terminals):,} "
        f"terminals in the archive over {kc.partitions} partitions"
        + (f", dial-in on {cfg.dialin_host}:{listener.port}" if listener else ""),
        logger=LOGGER, group=args.group, partitions=kc.partitions)
    before = kc.summary()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.status_every)
            except TimeoutError:
                pass
            now = kc.summary()
            say(status_line(now, before), logger=LOGGER, online=now["online"],
                terminals=now["terminals"], spooling=now["kafka"]["spooling"],
                pending=now["kafka"]["pending"])
            before = now
    finally:
        await kc.stop()
        if server is not None:
            metrics.stop(server)
        s = kc.sink.summary()
        say(f"meterstream collector: stopped; published {s['published']:,}, spooled "
            f"{s['spooled']:,} (waiting in {args.spool}: {s['spool_bytes']:,} bytes)",
            logger=LOGGER, published=s["published"], spooled=s["spooled"])
    return 0
