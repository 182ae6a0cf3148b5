"""`meterstream pay`: send a payment (or a CSV file of them) to the payments-in topic, as a channel.

Every payment is checked with the intake's own parser (pipeline/payments.py) before anything is
sent: a bad value is one line and exit status 2, and nothing reaches Kafka. Routing, duplicates
and crediting are the intake's and the kernels' job, never this command's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meterstream.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from meterstream.pipeline.payments import Payment, Refusal

#: The option that carries each field of the payment JSON (for one-line errors).
_OPTION = {"payment_id": "--id", "meter": "--meter", "amount": "--amount", "status": "--status",
           "channel": "--channel", "ts": "--ts"}
_SINGLE = ("meter", "amount", "id", "ts")  # options that --file replaces


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pay", help="send a payment to Kafka as a payment channel would (one JSON message)",
        description="Check a payment with the intake's parser and produce it to the "
        "meterstream.payments-in topic (key: the payment id), then print the JSON sent. "
        "--file sends every row of a payments CSV (ts,payment_id,meter,amount,status,channel, "
        "as `meterstream replay` reads) and reports refused rows as file:line: reason. "
        "See docs/payments.md.")
    p.add_argument("--broker", required=True, metavar="kafka://HOST:PORT",
                   help="the Kafka bootstrap server(s): kafka://host:port[,host:port...]")
    p.add_argument("--meter", metavar="ADDR", help="the meter's 12-digit address")
    p.add_argument("--amount", metavar="YUAN",
                   help="amount in yuan, positive, at most 2 decimals, e.g. 50.00")
    p.add_argument("--id", metavar="ID",
                   help="the channel's transaction id (default: CHANNEL-<random hex>)")
    p.add_argument("--status", default="settled", metavar="settled|pending|failed",
                   help="settled (default), pending (a withholding in progress) or failed")
    p.add_argument("--channel", default="counter", metavar="NAME",
                   help="payment channel, e.g. alipay, bank, 95598, counter (default: counter)")
    p.add_argument("--ts", metavar="ISO",
                   help="when it was paid: ISO 8601, local time in --timezone unless it has an "
                   "offset (default: now)")
    p.add_argument("--file", type=Path, metavar="payments.csv",
                   help="send every row of this CSV instead (replaces --meter/--amount/--id/--ts)")
    p.add_argument("--timezone", default=None, metavar="ZONE",
                   help="zone of times without an offset (default: Asia/Shanghai)")
    p.set_defaults(func=run)


def _zone(name: str | None) -> np.ndarray:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from meterstream.kernels.tariffs import zone_segments
    from meterstream.pipeline.tariffs import DEFAULT_TIMEZONE

    name = name or DEFAULT_TIMEZONE
    try:
        tz = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UserError(f'unknown time zone {name!r} (use an IANA name like "Asia/Shanghai")',
                        where="--timezone") from None
    return zone_segments(tz)


def channel_json(payment: Payment, zone: np.ndarray) -> bytes:
    """The documented channel JSON of a checked payment: amount with 2 decimals, ts with offset.

    Normalised so that the intake reads the same instant whatever zone it is configured with.
    """
    import json

    from meterstream.kernels.tariffs import utc_offset
    from meterstream.pipeline.replay import iso_local

    fen, rest = divmod(payment.amount, 10_000)
    assert rest == 0, "a parsed payment amount is whole fen"
    yuan, cents = divmod(fen, 100)
    doc = {"payment_id": payment.payment_id, "meter": payment.address,
           "amount": f"{yuan}.{cents:02d}", "status": payment.status,
           "channel": payment.channel,
           "ts": iso_local(payment.ts, int(utc_offset(zone, payment.ts)))}
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def _check(doc: dict[str, str], zone: np.ndarray) -> Payment | Refusal:
    """The payment of a channel document, or why it is refused: the intake's own parser."""
    import json

    from meterstream.pipeline.payments import parse_payment

    return parse_payment(json.dumps(doc, ensure_ascii=False).encode("utf-8"), zone=zone)


def run(args: argparse.Namespace) -> int:
    from meterstream.pipeline.cli._kafka import bootstrap_of

    bootstrap = bootstrap_of(args.broker)
    zone = _zone(args.timezone)
    if args.file is not None:
        given = [f"--{name}" for name in _SINGLE if getattr(args, name) is not None]
        if given:
            raise UserError(f"--file sends the file's rows: leave out {', '.join(given)}")
        return _send_file(args, bootstrap, zone)
    missing = [f"--{name}" for name in ("meter", "amount") if getattr(args, name) is None]
    if missing:
        raise UserError(f"missing {' and '.join(missing)} (or give --file payments.csv)")
    from meterstream.pipeline.payments import Refusal

    payment = _check(_document(args, zone), zone)
    if isinstance(payment, Refusal):
        raise UserError(payment.problem, where=_OPTION.get(payment.field, payment.field))
    value = channel_json(payment, zone)
    _produce(bootstrap, args.broker, [(payment.payment_id, value)])
    print(value.decode("utf-8"))
    return 0


def _document(args: argparse.Namespace, zone: np.ndarray) -> dict[str, str]:
    import secrets
    import time

    from meterstream.kernels.tariffs import utc_offset
    from meterstream.pipeline.replay import iso_local

    ts = args.ts
    if ts is None:
        now = time.time_ns()
        ts = iso_local(now, int(utc_offset(zone, now)))
    pid = args.id if args.id is not None else f"{args.channel}-{secrets.token_hex(8)}"
    return {"payment_id": pid, "meter": args.meter, "amount": args.amount,
            "status": args.status, "channel": args.channel, "ts": ts}


def _send_file(args: argparse.Namespace, bootstrap: str, zone: np.ndarray) -> int:
    # The CSV reading of `meterstream replay` (header, quoting, blank lines, short rows).
    from meterstream.pipeline.payments import Refusal
    from meterstream.pipeline.replay import PAYMENT_COLUMNS, _open_text, _rows

    source = str(args.file)
    text = _open_text(args.file, "payments")
    good: list[tuple[str, bytes]] = []
    refused: list[str] = []
    for line, fields, reason in _rows(text, source, PAYMENT_COLUMNS):
        if fields is None:
            refused.append(f"{source}:{line}: {reason}")
            continue
        doc = dict(zip(("ts", "payment_id", "meter", "amount", "status", "channel"), fields,
                       strict=True))
        payment = _check(doc, zone)
        if isinstance(payment, Refusal):
            refused.append(f"{source}:{line}: {payment.reason}")
            continue
        good.append((payment.payment_id, channel_json(payment, zone)))
    if good:
        _produce(bootstrap, args.broker, good)
    for row in refused:
        print(row, file=sys.stderr)
    from meterstream.pipeline.topics import PAYMENTS_IN

    print(f"sent {len(good):,} payment{'' if len(good) == 1 else 's'} to {PAYMENTS_IN.name} at {args.broker}; "
          f"{len(refused):,} rows refused")
    return 1 if refused else 0


def _produce(bootstrap: str, url: str, messages: list[tuple[str, bytes]]) -> None:
    from meterstream.pipeline.cli._terminal import run_loop

    run_loop(_produce_async(bootstrap, url, messages))


async def _produce_async(bootstrap: str, url: str, messages: list[tuple[str, bytes]]) -> None:
    import logging

    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from meterstream.pipeline.topics import PAYMENTS_IN

    # A broker that cannot be reached is one line (the UserError below), not also aiokafka's log.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                client_id="meterstream-pay", request_timeout_ms=15_000)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise UserError(f"cannot reach the broker: {exc}", where=url) from None
    try:
        acks = [await producer.send(PAYMENTS_IN.name, value, key=key.encode("utf-8"))
                for key, value in messages]
        for ack in acks:
            await ack
    except KafkaError as exc:
        raise UserError(f"the broker did not take the payments: {exc}", where=url) from None
    finally:
        await producer.stop()
