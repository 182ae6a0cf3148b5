"""Payments intake: channel JSON on `payments-in`, routed to the meter's terminal or dead-lettered.

`parse_payment` and `PaymentRouter` are pure (bytes in, a Payment or a Refusal out) and never
raise on any input; `run_intake` is the aiokafka loop around them, at-least-once. Amounts are
parsed from decimal text exactly as `meterstream replay` does (`pipeline.tariffs.parse_units`);
no binary float is ever made from a payment. Exactly-once crediting is not done here: the
kernels' payment ledger ignores a payment id it has seen (docs/payments.md).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from meterstream.pipeline.replay import MAX_PAYMENT, TS_FORMAT, iso_local, parse_ts_strings
from meterstream.pipeline.tariffs import parse_units
from meterstream.pipeline.topics import DEAD_LETTER, PAYMENTS, PAYMENTS_IN

if TYPE_CHECKING:
    from meterstream.collectors.archive import Archive

__all__ = [
    "FIELDS",
    "MAX_MESSAGE_BYTES",
    "STATUSES",
    "IntakeStats",
    "Payment",
    "PaymentRouter",
    "Refusal",
    "Routed",
    "dead_letter",
    "dead_letter_raw",
    "intake_one",
    "parse_payment",
    "run_intake",
]

log = logging.getLogger(__name__)

#: The fields of a channel's payment, in the order they are checked (the first problem wins).
FIELDS = ("payment_id", "meter", "amount", "status", "channel", "ts")
STATUSES = ("settled", "pending", "failed")
#: A payment is ~200 bytes; anything much larger is refused before it is parsed.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_ID_CHARS = 128
MAX_CHANNEL_CHARS = 64
#: Longer amount text is refused before parse_units sees it (int() of a long digit string
#: costs quadratic time, and beyond 4300 digits Python refuses it with its own message).
MAX_AMOUNT_CHARS = 32
#: Raw bytes kept in a dead-letter record; the source topic, partition and offset point at the
#: whole original.
MAX_DEAD_RAW_BYTES = MAX_MESSAGE_BYTES
_MICRO_PER_FEN = 10_000  # parse_units(text, 2) counts fen (0.01 yuan)
_SHOWN = 40  # characters of a bad value quoted in a reason


# ---------------------------------------------------------------------------------------------
# Records.


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an input was not used: the field (or "message" for the whole) and what was wrong."""

    field: str
    problem: str

    @property
    def reason(self) -> str:
        return f"{self.field}: {self.problem}"

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True)
class Payment:
    """A checked payment: amount in micro-yuan (> 0), ts in epoch ns, meter as its integer."""

    payment_id: str
    meter: int
    amount: int  # micro-yuan
    status: str  # settled | pending | failed
    channel: str
    ts: int  # epoch ns

    @property
    def address(self) -> str:
        """The meter's 12-digit address."""
        return f"{self.meter:012d}"

    def to_json(self) -> bytes:
        """The record of the routed `meterstream.payments` topic (exact integers, UTF-8)."""
        return json.dumps(
            {
                "payment_id": self.payment_id,
                "meter": self.address,
                "amount_micro_yuan": self.amount,
                "status": self.status,
                "channel": self.channel,
                "ts_ns": self.ts,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> Payment:
        """The inverse of `to_json`; ValueError when `data` is not such a record."""
        try:
            doc = json.loads(data, parse_float=_no_float, parse_constant=_no_constant)
        except RecursionError:
            raise ValueError("a routed payment is a flat JSON object (this is nested too "
                             "deeply to read)") from None
        if not isinstance(doc, dict):
            raise ValueError("a routed payment is a JSON object")  # noqa: TRY004
        try:
            pid, meter, amount = doc["payment_id"], doc["meter"], doc["amount_micro_yuan"]
            status, channel, ts = doc["status"], doc["channel"], doc["ts_ns"]
        except KeyError as exc:
            raise ValueError(f"a routed payment lacks {exc.args[0]!r}") from None
        if not (isinstance(pid, str) and pid and isinstance(channel, str)):
            raise ValueError("payment_id and channel are strings (payment_id not empty)")
        if not (isinstance(meter, str) and _is_address(meter)):
            raise ValueError(f"meter {meter!r} is not a 12-digit address")
        if type(amount) is not int or not 0 < amount <= MAX_PAYMENT:
            raise ValueError(f"amount_micro_yuan {amount!r} is not a positive payment")
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if type(ts) is not int:
            raise ValueError(f"ts_ns {ts!r} is not an integer")
        return cls(pid, int(meter), amount, status, channel, ts)


def _no_float(text: str) -> Any:
    raise ValueError(f"a routed payment holds no fractional numbers, found {text}")


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


# ---------------------------------------------------------------------------------------------
# Parsing a channel's JSON.


class _Number:
    """A JSON number, kept as its text: no int() or float() is ever made of it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _Duplicate(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON value")


def _shown(value: str) -> str:
    return repr(value) if len(value) <= _SHOWN else repr(value[: _SHOWN - 3]) + "..."


def _kind(value: Any) -> str:
    """The JSON type of a parsed value, as a person would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _Number):
        return f"a number ({value.text[:_SHOWN]})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _is_address(text: str) -> bool:
    return len(text) == 12 and text.isascii() and text.isdigit()


def _text_field(doc: dict[str, Any], name: str, limit: int) -> str | Refusal:
    """A required, non-empty, printable string field without surrounding spaces."""
    value = doc[name]
    if not isinstance(value, str):
        return Refusal(name, f"expected a string, found {_kind(value)}")
    if not value:
        return Refusal(name, "empty")
    if len(value) > limit:
        return Refusal(name, f"longer than {limit} characters ({len(value)})")
    if not value.isprintable():
        return Refusal(name, f"{_shown(value)} holds control or unpaired surrogate characters")
    if value != value.strip():
        return Refusal(name, f"{_shown(value)} has leading or trailing spaces")
    return value


def _amount(value: Any) -> int | Refusal:
    """Micro-yuan of the amount: a decimal string in yuan, positive, at most 2 decimals."""
    if isinstance(value, _Number):
        return Refusal(
            "amount",
            f"a JSON number ({value.text[:_SHOWN]}): send the amount as a decimal string in "
            'yuan, e.g. "50.00" (numbers are not exact in every JSON library)',
        )
    if not isinstance(value, str):
        return Refusal("amount", f"expected a decimal string in yuan, found {_kind(value)}")
    if len(value) > MAX_AMOUNT_CHARS:
        return Refusal("amount", f"{_shown(value)} is too long to be an amount in yuan")
    if not value.isascii():
        # parse_units' \d would take other scripts' digits; a payment amount is ASCII.
        return Refusal("amount", f"{value!r} is not a decimal number in ASCII digits")
    # The same parse and bounds as `meterstream replay` (replay.read_payments).
    try:
        micro = parse_units(value, 2, signed=True) * _MICRO_PER_FEN
    except ValueError as exc:
        return Refusal("amount", f"{value!r} {exc} (yuan, positive, at most 2 decimals)")
    if micro <= 0:
        return Refusal("amount", f"{value!r} is not positive")
    if micro > MAX_PAYMENT:
        return Refusal("amount", "beyond 1,000,000,000 yuan")
    return micro


def parse_payment(raw: bytes, *, zone: np.ndarray) -> Payment | Refusal:
    """A channel's payment JSON as a Payment, or the Refusal saying why not. Never raises.

    `zone` is the kernels' zone table (`CompiledTariff.zone`, `kernels.tariffs.zone_segments`):
    a `ts` without an offset is local time there. The first problem found is reported, the
    fields checked in the order of FIELDS; unknown fields are ignored.
    """
    try:
        return _parse(raw, zone)
    except Exception as exc:  # a bug here must not stop the intake: dead-letter and go on
        log.exception("payment parser failed")
        return Refusal("message", f"could not be parsed ({type(exc).__name__}: {exc})")


def _parse(raw: bytes, zone: np.ndarray) -> Payment | Refusal:
    if not isinstance(raw, bytes | bytearray | memoryview):
        return Refusal("message", f"expected bytes, found {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > MAX_MESSAGE_BYTES:
        return Refusal(
            "message", f"{len(raw)} bytes, more than {MAX_MESSAGE_BYTES} (a payment is one "
            "small JSON object)")
    if not raw.strip():
        return Refusal("message", "empty: expected a JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return Refusal("message", f"not UTF-8 text (byte {exc.start})")
    try:
        doc = json.loads(
            text,
            parse_float=_Number,
            parse_int=_Number,
            parse_constant=_constant,
            object_pairs_hook=_object,
        )
    except json.JSONDecodeError as exc:
        return Refusal("message", f"not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})")
    except _Duplicate as exc:
        return Refusal("message", f"the key {_shown(str(exc))} appears twice")
    except ValueError as exc:
        return Refusal("message", f"not JSON: {exc}")
    except RecursionError:
        return Refusal("message", "not JSON a payment can be: nested too deeply")
    if not isinstance(doc, dict):
        return Refusal("message", f"expected a JSON object with {', '.join(FIELDS)}, "
                       f"found {_kind(doc)}")
    for name in FIELDS:
        if name not in doc:
            return Refusal(name, "missing")

    pid = _text_field(doc, "payment_id", MAX_ID_CHARS)
    if isinstance(pid, Refusal):
        return pid
    meter = doc["meter"]
    if not isinstance(meter, str):
        return Refusal("meter", f"expected a 12-digit address as a string, found {_kind(meter)}")
    if not _is_address(meter):
        return Refusal("meter", f"{_shown(meter)} is not a 12-digit meter address")
    amount = _amount(doc["amount"])
    if isinstance(amount, Refusal):
        return amount
    status = doc["status"]
    if not isinstance(status, str):
        return Refusal("status", f"expected a string, found {_kind(status)}")
    if status.lower() not in STATUSES:
        return Refusal("status", f"{_shown(status)} is not one of {', '.join(STATUSES)}")
    channel = _text_field(doc, "channel", MAX_CHANNEL_CHARS)
    if isinstance(channel, Refusal):
        return channel
    ts_text = doc["ts"]
    if not isinstance(ts_text, str):
        return Refusal("ts", f"expected an ISO 8601 string, found {_kind(ts_text)}")
    ok = False
    ts = 0
    if ts_text.isascii() and len(ts_text) <= 64:
        oks, tss = parse_ts_strings([ts_text], zone)  # the readings' and replay's parser
        ok, ts = bool(oks[0]), int(tss[0])
    if not ok:
        return Refusal("ts", f"{_shown(ts_text)} is not an {TS_FORMAT} (years 1900..2199)")
    return Payment(pid, int(meter), amount, status.lower(), channel, ts)


# ---------------------------------------------------------------------------------------------
# Routing and dead letters.


class PaymentRouter:
    """Finds the terminal a payment goes to, from the archive (meter address -> terminal id)."""

    def __init__(self, archive_meter_to_terminal: Mapping[int, str]) -> None:
        self._terminal = dict(archive_meter_to_terminal)

    @classmethod
    def from_archive(cls, archive: Archive) -> PaymentRouter:
        """The router of a collection archive (`collectors.archive.load_archive`)."""
        return cls({int(a): tid for tid, plan in archive.terminals.items()
                    for a in plan.address.tolist()})

    def __len__(self) -> int:
        return len(self._terminal)

    def route(self, payment: Payment) -> str | Refusal:
        """The terminal id of the payment's meter, or a Refusal: unknown meter."""
        terminal = self._terminal.get(payment.meter)
        if terminal is None:
            return Refusal("meter", f"unknown meter {payment.address} (not in the archive)")
        return terminal


@dataclass(frozen=True, slots=True)
class Routed:
    terminal: str
    payment: Payment


def intake_one(raw: bytes, router: PaymentRouter, zone: np.ndarray) -> Routed | Refusal:
    """Parse and route one channel message: what the intake loop (or a Faust agent) does."""
    payment = parse_payment(raw, zone=zone)
    if isinstance(payment, Refusal):
        return payment
    terminal = router.route(payment)
    if isinstance(terminal, Refusal):
        return terminal
    return Routed(terminal, payment)


def dead_letter(
    raw: bytes | None,
    reason: str,
    source_topic: str,
    offset: int | None,
    *,
    partition: int | None = None,
    key: bytes | None = None,
    now_ns: int | None = None,
) -> bytes:
    """The dead-letter record of refused input (UTF-8 JSON): never lose what was refused.

    `raw` is kept as text when it is UTF-8 ("encoding": "utf-8"), else base64 ("base64"); the
    first MAX_DEAD_RAW_BYTES of it only (then "raw_truncated": true; "raw_bytes" is always the
    full length). The source record's key likewise ("key", "key_encoding"). `ts` is when it was
    refused (ISO 8601 UTC).
    """
    data = b"" if raw is None else bytes(raw)
    kept = data[:MAX_DEAD_RAW_BYTES]
    record: dict[str, Any] = {
        "reason": reason,
        "source": source_topic,
        "partition": partition,
        "offset": offset,
    }
    if key is not None:
        record["key"], record["key_encoding"] = _bytes_field(bytes(key))
    else:
        record["key"] = None
    text, encoding = _bytes_field(kept)
    # A cut may split a UTF-8 sequence: then it is base64 like any other non-text.
    record.update({"raw": text, "encoding": encoding, "raw_bytes": len(data)})
    if raw is None:
        record["raw"] = record["encoding"] = None
    if len(kept) < len(data):
        record["raw_truncated"] = True
    record["ts"] = iso_local(time.time_ns() if now_ns is None else now_ns, 0)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _bytes_field(data: bytes) -> tuple[str, str]:
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def dead_letter_raw(record: Mapping[str, Any]) -> bytes | None:
    """The original bytes (as kept) of a parsed dead-letter record."""
    raw = record.get("raw")
    if raw is None:
        return None
    if record.get("encoding") == "base64":
        return base64.b64decode(raw)
    return str(raw).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# The intake loop (aiokafka; no Faust).


@dataclass
class IntakeStats:
    """What `run_intake` has done since it started (for logs, tests and the demo's summary)."""

    routed: int = 0
    refused: int = 0
    committed: int = 0  # records whose offsets are committed
    ready: bool = False  # consumer and producer started


async def run_intake(
    bootstrap: str,
    router: PaymentRouter,
    zone: np.ndarray,
    *,
    group: str = "payments-intake",
    stats: IntakeStats | None = None,
    poll_ms: int = 200,
    max_records: int = 500,
    clock: Callable[[], int] = time.time_ns,
    consumer_options: Mapping[str, Any] | None = None,
) -> None:
    """Consume PAYMENTS_IN, produce each payment to PAYMENTS (key: terminal) or DEAD_LETTER.

    At-least-once: a batch's offsets are committed only after every record it produced is
    acknowledged (acks=all); a crash before that delivers the batch again, and the kernels'
    ledger ignores the payment ids it has seen. A commit refused after a rebalance is logged
    (the partitions' new owner routes the batch again). Runs until cancelled, then stops its
    clients and re-raises CancelledError. A Kafka error is raised (nothing more is committed).
    Topics are not created here: create them up front.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import CommitFailedError

    stats = stats if stats is not None else IntakeStats()
    consumer = AIOKafkaConsumer(
        PAYMENTS_IN.name,
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id=f"meterstream-{group}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **dict(consumer_options or {}),
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                client_id=f"meterstream-{group}")
    started: list[Any] = []
    try:
        await producer.start()
        started.append(producer)
        await consumer.start()
        started.append(consumer)
        stats.ready = True
        while True:
            batches = await consumer.getmany(timeout_ms=poll_ms, max_records=max_records)
            if not batches:
                continue
            acks = []
            offsets = {}
            n = 0
            for tp, records in batches.items():
                for rec in records:
                    topic, value, key = _outcome(rec, router, zone, clock, stats)
                    acks.append(await producer.send(topic, value, key=key))
                    n += 1
                offsets[tp] = records[-1].offset + 1
            for ack in acks:
                await ack  # raises the producer's error: nothing of this batch is committed
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:
                # A rebalance gave the partitions to another member, which reads this batch
                # again from the last commit: duplicates downstream, nothing lost.
                log.warning("payments intake: commit refused after a rebalance (%s); the "
                            "new owner of the partitions routes the batch again", exc)
                continue
            stats.committed += n
    finally:
        stats.ready = False
        for client in reversed(started):
            try:
                await client.stop()
            except Exception:  # stopping is best effort; the first error is what matters
                log.exception("stopping the payments intake's %s", type(client).__name__)


def _outcome(rec: Any, router: PaymentRouter, zone: np.ndarray, clock: Callable[[], int],
             stats: IntakeStats) -> tuple[str, bytes, bytes | None]:
    """(topic, value, key) to produce for one consumed record."""
    raw: bytes | None = rec.value
    result: Routed | Refusal
    if raw is None:
        result = Refusal("message", "no value (a null record)")
    else:
        result = intake_one(raw, router, zone)
    if isinstance(result, Routed):
        stats.routed += 1
        return PAYMENTS.name, result.payment.to_json(), result.terminal.encode("utf-8")
    stats.refused += 1
    log.warning("payment refused (%s[%d]@%d): %s", rec.topic, rec.partition, rec.offset,
                result.reason)
    value = dead_letter(raw, result.reason, rec.topic, rec.offset, partition=rec.partition,
                        key=rec.key, now_ns=clock())
    return DEAD_LETTER.name, value, rec.key
