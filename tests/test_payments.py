"""Payments intake: the channel JSON parser, the router, dead letters, the intake loop on a real
broker (Tansu) and `meterstream pay` as a process.

Waits are bounded polls of what a client can see (records, committed offsets); nothing here
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import tokenize
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.collectors.archive import Archive, TerminalPlan
from meterstream.kernels.tariffs import zone_segments
from meterstream.pipeline.broker import EmbeddedBroker, free_port
from meterstream.pipeline.payments import (
    MAX_DEAD_RAW_BYTES,
    MAX_MESSAGE_BYTES,
    IntakeStats,
    Payment,
    PaymentRouter,
    Refusal,
    Routed,
    dead_letter,
    dead_letter_raw,
    intake_one,
    parse_payment,
    run_intake,
)
from meterstream.pipeline.tariffs import parse_units
from meterstream.pipeline.topics import DEAD_LETTER, PAYMENTS, PAYMENTS_IN

ZONE = zone_segments(ZoneInfo("Asia/Shanghai"))
NS = 1_000_000_000
MICRO = 1_000_000
MAX_FEN = 10**9 * 100  # 1,000,000,000 yuan
WAIT = 60.0  # upper bound of every wait; a healthy run needs a few seconds at most
PARTITIONS = 2
TOPICS = [PAYMENTS_IN.name, PAYMENTS.name, DEAD_LETTER.name]
# Tansu takes half the rebalance timeout to let a consumer join: keep it short in tests.
FAST_GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 1000,
              "rebalance_timeout_ms": 1000}
SRC = Path(__file__).resolve().parents[1] / "src" / "meterstream"

GOOD = {"payment_id": "ALI-20261201-0001", "meter": "000000000001", "amount": "50.00",
        "status": "settled", "channel": "alipay", "ts": "2026-12-01T08:30:00+08:00"}
TS_GOOD = (1_796_085_000) * NS  # 2026-12-01T00:30:00Z


def doc(**changes: Any) -> bytes:
    """The GOOD payment with fields changed (a value of `...` removes the field)."""
    d = {**GOOD, **changes}
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def refusal(raw: bytes) -> Refusal:
    result = parse_payment(raw, zone=ZONE)
    assert isinstance(result, Refusal), result
    return result


# -- the parser: good payments --------------------------------------------------------------------


def test_a_good_payment() -> None:
    p = parse_payment(doc(), zone=ZONE)
    assert p == Payment("ALI-20261201-0001", 1, 50 * MICRO, "settled", "alipay", TS_GOOD)
    assert type(p.amount) is int and type(p.ts) is int and type(p.meter) is int
    assert p.address == "000000000001"


@pytest.mark.parametrize("ts", ["2026-12-01T08:30:00", "2026-12-01 08:30", "2026-12-01T00:30:00Z",
                                "2026-12-01T08:30:00+0800", "2026-12-01T01:30:00+01:00",
                                "2026-11-30T19:30:00-05"])
def test_times_with_an_offset_or_local_in_the_zone(ts: str) -> None:
    p = parse_payment(doc(ts=ts), zone=ZONE)
    assert isinstance(p, Payment) and p.ts == TS_GOOD


def test_a_local_time_is_read_in_the_configured_zone() -> None:
    london = zone_segments(ZoneInfo("Europe/London"))
    p = parse_payment(doc(ts="2026-12-01T00:30:00"), zone=london)
    assert isinstance(p, Payment) and p.ts == TS_GOOD


def test_fractional_seconds_are_kept_to_the_nanosecond() -> None:
    p = parse_payment(doc(ts="2026-12-01T08:30:00.123456789+08:00"), zone=ZONE)
    assert isinstance(p, Payment) and p.ts == TS_GOOD + 123_456_789


def test_status_is_case_insensitive_as_in_replay_and_unknown_fields_are_ignored() -> None:
    p = parse_payment(doc(status="PENDING", note="withholding", extra={"x": [1.5]}), zone=ZONE)
    assert isinstance(p, Payment) and p.status == "pending"


@pytest.mark.parametrize(("text", "fen"), [("50", 5000), ("50.5", 5050), ("0.01", 1),
                                           ("050.50", 5050), ("1.010", 101), ("+2.00", 200),
                                           (" 3.00 ", 300), ("1000000000.00", MAX_FEN)])
def test_amounts_as_replay_reads_them(text: str, fen: int) -> None:
    p = parse_payment(doc(amount=text), zone=ZONE)
    assert isinstance(p, Payment) and p.amount == fen * 10_000


@given(st.integers(1, MAX_FEN), st.sampled_from(["2", "short", "zeros", "lead"]))
def test_every_2_decimal_amount_is_exact_micro_yuan(fen: int, form: str) -> None:
    yuan, cents = divmod(fen, 100)
    text = {"2": f"{yuan}.{cents:02d}", "zeros": f"{yuan}.{cents:02d}000",
            "lead": f"000{yuan}.{cents:02d}",
            "short": f"{yuan}" if cents == 0 else (f"{yuan}.{cents // 10}" if cents % 10 == 0
                                                   else f"{yuan}.{cents:02d}")}[form]
    p = parse_payment(doc(amount=text), zone=ZONE)
    assert isinstance(p, Payment)
    assert type(p.amount) is int and p.amount == fen * 10_000


@given(st.text(alphabet="0123456789.-+ e", max_size=16))
def test_an_amount_is_accepted_exactly_when_parse_units_takes_it(text: str) -> None:
    try:
        micro: int | None = parse_units(text, 2, signed=True) * 10_000
    except ValueError:
        micro = None
    p = parse_payment(doc(amount=text), zone=ZONE)
    if micro is not None and 0 < micro <= MAX_FEN * 10_000:
        assert isinstance(p, Payment) and p.amount == micro
    else:
        assert isinstance(p, Refusal) and p.field == "amount"


# -- the parser: every refusal ---------------------------------------------------------------------

REFUSALS = [
    # whole message
    (b"", "message", "empty"),
    (b"  \n", "message", "empty"),
    (b"\xff\xfe{}", "message", "not UTF-8 text (byte 0)"),
    (b'{"payment_id": ', "message", "not JSON"),
    (b"payment", "message", "not JSON"),
    (b"NaN", "message", "not JSON: NaN"),
    (b'{"amount": Infinity}', "message", "not JSON: Infinity"),
    (b"[" * 50_000, "message", "not JSON"),
    (b"[1, 2]", "message", "found an array"),
    (b'"50.00"', "message", "found a string"),
    (b"null", "message", "found null"),
    (b" " * (MAX_MESSAGE_BYTES + 1), "message", f"more than {MAX_MESSAGE_BYTES}"),
    (doc()[:-1] + b', "amount": "5000.00"}', "message", "'amount' appears twice"),
    # missing fields, in FIELDS order
    (doc(payment_id=...), "payment_id", "missing"),
    (doc(meter=...), "meter", "missing"),
    (doc(amount=...), "amount", "missing"),
    (doc(status=...), "status", "missing"),
    (doc(channel=...), "channel", "missing"),
    (doc(ts=...), "ts", "missing"),
    # payment id
    (doc(payment_id=""), "payment_id", "empty"),
    (doc(payment_id=17), "payment_id", "expected a string, found a number (17)"),
    (doc(payment_id=None), "payment_id", "found null"),
    (doc(payment_id="x" * 129), "payment_id", "longer than 128 characters"),
    (doc(payment_id="A1\n"), "payment_id", "control"),
    (doc(payment_id=" A1"), "payment_id", "leading or trailing spaces"),
    (doc(payment_id="A\ud800"), "payment_id", "unpaired surrogate"),
    # meter
    (doc(meter=1), "meter", "found a number (1)"),
    (doc(meter="00000000001"), "meter", "not a 12-digit meter address"),
    (doc(meter="00000000000A"), "meter", "not a 12-digit meter address"),
    (doc(meter="٠٠٠٠٠٠٠٠٠٠٠١"), "meter", "not a 12-digit meter address"),
    # amount
    (doc(amount=50), "amount", 'a JSON number (50): send the amount as a decimal string'),
    (doc(amount=50.5), "amount", "a JSON number (50.5)"),
    (doc().replace(b'"50.00"', b"1e400"), "amount", "JSON number (1e400)"),
    (doc(amount=True), "amount", "found true"),
    (doc(amount=["50.00"]), "amount", "found an array"),
    (doc(amount=""), "amount", "'' not a decimal number"),
    (doc(amount="fifty"), "amount", "'fifty' not a decimal number"),
    (doc(amount="50,00"), "amount", "not a decimal number"),
    (doc(amount="1e3"), "amount", "not a decimal number"),
    (doc(amount=".50"), "amount", "not a decimal number"),
    (doc(amount="50.001"), "amount", "'50.001' more than 2 decimals"),
    (doc(amount="0.00"), "amount", "'0.00' is not positive"),
    (doc(amount="-5.00"), "amount", "'-5.00' is not positive"),
    (doc(amount="1000000000.01"), "amount", "beyond 1,000,000,000 yuan"),
    (doc(amount="9" * 30), "amount", "beyond 1,000,000,000 yuan"),
    (doc(amount="1" * 5000), "amount", "too long"),
    (doc(amount="٥٠.٠٠"), "amount", "ASCII digits"),
    # status
    (doc(status="paid"), "status", "'paid' is not one of settled, pending, failed"),
    (doc(status=1), "status", "expected a string"),
    # channel
    (doc(channel=""), "channel", "empty"),
    (doc(channel={"name": "bank"}), "channel", "found an object"),
    (doc(channel="c" * 65), "channel", "longer than 64"),
    # ts
    (doc(ts="yesterday"), "ts", "'yesterday' is not an ISO 8601 date and time"),
    (doc(ts="2026-02-30T08:30:00"), "ts", "ISO 8601"),
    (doc(ts="2026-12-01T24:00:00"), "ts", "ISO 8601"),
    (doc(ts="2026-12-01"), "ts", "ISO 8601"),
    (doc(ts="2300-01-01T00:00:00Z"), "ts", "years 1900..2199"),
    (doc(ts="2026-12-01T08:30:00+8"), "ts", "ISO 8601"),
    (doc(ts="2026-12-01T08:30:00.1234567891Z"), "ts", "ISO 8601"),
    (doc(ts="２０２６-12-01T08:30:00"), "ts", "ISO 8601"),
    (doc(ts=1796085000), "ts", "expected an ISO 8601 string, found a number"),
]


@pytest.mark.parametrize(("raw", "field", "words"), REFUSALS,
                         ids=[f"{i}-{f}" for i, (_, f, _) in enumerate(REFUSALS)])
def test_every_refusal_names_the_field_and_what_was_wrong(raw: bytes, field: str,
                                                          words: str) -> None:
    r = refusal(raw)
    assert r.field == field
    assert words in r.problem
    assert r.reason == f"{field}: {r.problem}" == str(r)
    assert len(r.reason) < 300  # a bad value is quoted short, not whole


def _never_the_guard(result: Payment | Refusal) -> None:
    # parse_payment turns an unexpected exception into a refusal; a test must never see one.
    assert not (isinstance(result, Refusal) and "could not be parsed" in result.problem), result


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    _never_the_guard(parse_payment(raw, zone=ZONE))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)


@settings(max_examples=500)
@given(st.fixed_dictionaries({}, optional={k: JSON | st.just(v) for k, v in GOOD.items()}))
def test_arbitrary_values_in_every_field_never_raise(fields: dict[str, Any]) -> None:
    raw = json.dumps(fields).encode()
    result = parse_payment(raw, zone=ZONE)
    _never_the_guard(result)
    if isinstance(result, Payment):
        assert type(result.amount) is int and 0 < result.amount <= MAX_FEN * 10_000


@given(st.text(max_size=60))
def test_arbitrary_text_in_each_field_never_raises(text: str) -> None:
    for name in GOOD:
        _never_the_guard(parse_payment(doc(**{name: text}), zone=ZONE))


def test_no_float_in_the_payments_path() -> None:
    """No float type named, no true division, in the parser, the intake and the CLI."""
    for rel in ("pipeline/payments.py", "pipeline/cli/pay.py"):
        with open(SRC / rel, "rb") as fh:
            for tok in tokenize.tokenize(fh.readline):
                if tok.type == tokenize.OP:
                    assert tok.string not in ("/", "/="), f"{rel}:{tok.start[0]}: true division"
                if tok.type == tokenize.NAME:
                    assert tok.string not in ("float", "float64", "float32", "Decimal"), (
                        f"{rel}:{tok.start[0]}: {tok.string}")


# -- the routed record -----------------------------------------------------------------------------

PAYMENTS_ST = st.builds(
    Payment, st.text(min_size=1, max_size=20), st.integers(0, 10**12 - 1),
    st.integers(1, MAX_FEN * 10_000), st.sampled_from(["settled", "pending", "failed"]),
    st.text(min_size=1, max_size=10), st.integers(-(2**62), 2**62))


@given(PAYMENTS_ST)
def test_routed_record_round_trips(p: Payment) -> None:
    try:
        data = p.to_json()
    except UnicodeEncodeError:  # a lone surrogate: parse_payment never makes such a Payment
        return
    assert Payment.from_json(data) == p


def test_routed_record_is_readable_exact_json() -> None:
    p = parse_payment(doc(), zone=ZONE)
    assert isinstance(p, Payment)
    assert json.loads(p.to_json()) == {
        "payment_id": "ALI-20261201-0001", "meter": "000000000001",
        "amount_micro_yuan": 50_000_000, "status": "settled", "channel": "alipay",
        "ts_ns": TS_GOOD}


@pytest.mark.parametrize("bad", [
    b"[]", b'{"payment_id": "a"}',
    b'{"payment_id":"a","meter":"1","amount_micro_yuan":1,"status":"settled","channel":"c","ts_ns":0}',
    (b'{"payment_id":"a","meter":"000000000001","amount_micro_yuan":1.5,"status":"settled",'
    b'"channel":"c","ts_ns":0}'),
    (b'{"payment_id":"a","meter":"000000000001","amount_micro_yuan":0,"status":"settled",'
    b'"channel":"c","ts_ns":0}'),
    (b'{"payment_id":"a","meter":"000000000001","amount_micro_yuan":1,"status":"paid",'
    b'"channel":"c","ts_ns":0}'),
    (b'{"payment_id":"a","meter":"000000000001","amount_micro_yuan":1,"status":"settled",'
    b'"channel":"c","ts_ns":"0"}'),
])
def test_from_json_refuses_what_to_json_never_writes(bad: bytes) -> None:
    with pytest.raises(ValueError):
        Payment.from_json(bad)


# -- the router ------------------------------------------------------------------------------------


def test_router_finds_the_terminal_and_refuses_an_unknown_meter() -> None:
    router = PaymentRouter({1: "T-north", 2: "T-south"})
    p = parse_payment(doc(), zone=ZONE)
    assert isinstance(p, Payment)
    assert router.route(p) == "T-north"
    other = parse_payment(doc(meter="000000000003"), zone=ZONE)
    assert isinstance(other, Payment)
    r = router.route(other)
    assert isinstance(r, Refusal)
    assert r.reason == "meter: unknown meter 000000000003 (not in the archive)"


def test_router_from_a_collection_archive() -> None:
    plan = TerminalPlan("C01", "A1", "concentrator", "listen", "127.0.0.1", 9000, "dlt645",
                        address=np.array([1, 220000000007], np.int64))
    router = PaymentRouter.from_archive(Archive({"C01": plan}, "a.csv"))
    assert len(router) == 2
    p = parse_payment(doc(meter="220000000007"), zone=ZONE)
    assert isinstance(p, Payment) and router.route(p) == "C01"


def test_intake_one_parses_then_routes() -> None:
    router = PaymentRouter({1: "T1"})
    routed = intake_one(doc(), router, ZONE)
    assert isinstance(routed, Routed) and routed.terminal == "T1"
    assert routed.payment.amount == 50 * MICRO
    assert isinstance(intake_one(doc(meter="000000000009"), router, ZONE), Refusal)
    assert intake_one(b"{", router, ZONE) == refusal(b"{")


# -- dead letters ----------------------------------------------------------------------------------


def test_dead_letter_keeps_text_as_text() -> None:
    raw = doc(amount=50)
    rec = json.loads(dead_letter(raw, "amount: a JSON number", PAYMENTS_IN.name, 41,
                                 partition=1, key=b"ALI-1", now_ns=TS_GOOD))
    assert rec == {"reason": "amount: a JSON number", "source": PAYMENTS_IN.name,
                   "partition": 1, "offset": 41, "key": "ALI-1", "key_encoding": "utf-8",
                   "raw": raw.decode(), "encoding": "utf-8", "raw_bytes": len(raw),
                   "ts": "2026-12-01T00:30:00+00:00"}
    assert dead_letter_raw(rec) == raw


def test_dead_letter_of_binary_is_base64_and_of_nothing_is_null() -> None:
    raw = b"\xff\x00\x81payment"
    rec = json.loads(dead_letter(raw, "message: not UTF-8 text (byte 0)", "t", 0, key=b"\xfe"))
    assert rec["encoding"] == "base64" and rec["key_encoding"] == "base64"
    assert dead_letter_raw(rec) == raw
    assert rec["partition"] is None and rec["ts"].endswith("+00:00")
    none = json.loads(dead_letter(None, "message: no value", "t", 3))
    assert none["raw"] is None and none["encoding"] is None and none["raw_bytes"] == 0
    assert none["key"] is None
    assert dead_letter_raw(none) is None


def test_dead_letter_of_a_huge_message_keeps_its_head_and_says_so() -> None:
    raw = b"x" * (MAX_DEAD_RAW_BYTES + 10)
    rec = json.loads(dead_letter(raw, "message: too large", "t", 7))
    assert rec["raw_truncated"] is True and rec["raw_bytes"] == len(raw)
    assert dead_letter_raw(rec) == raw[:MAX_DEAD_RAW_BYTES]


@given(st.binary(max_size=300), st.text(max_size=50))
def test_dead_letter_round_trips_any_bytes(raw: bytes, reason: str) -> None:
    rec = json.loads(dead_letter(raw, reason, PAYMENTS_IN.name, 5).decode("utf-8", "surrogatepass"))
    assert dead_letter_raw(rec) == raw
    assert rec["reason"] == reason and "raw_truncated" not in rec


# -- the intake loop on a real broker --------------------------------------------------------------


async def wait_until(check: Callable[[], Awaitable[bool] | bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(0.05)


async def produce(bootstrap: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(PAYMENTS_IN.name, value, key=key)
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, n: int) -> list[Any]:
    """The records of `topic` (all partitions): wait up to WAIT for n, then take any more.

    Counted by reading, not from end offsets: Tansu can report those short after batched
    produces (DESIGN.md, notes on the local broker).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        deadline = time.monotonic() + WAIT
        while len(records) < n and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        for batch in (await consumer.getmany(timeout_ms=300)).values():  # any beyond n
            records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def committed(bootstrap: str, group: str) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = [await consumer.committed(TopicPartition(PAYMENTS_IN.name, p))
                   for p in range(PARTITIONS)]
    finally:
        await consumer.stop()
    return sum(o or 0 for o in offsets)


ROUTER = PaymentRouter({1: "T-north", 2: "T-north", 3: "T-south"})


def _traffic() -> list[tuple[bytes | None, bytes | None]]:
    good = [
        doc(payment_id="P1", meter="000000000001", amount="50.00"),
        doc(payment_id="P2", meter="000000000003", amount="0.01", channel="95598"),
        doc(payment_id="P3", meter="000000000002", amount="20", status="pending"),
        doc(payment_id="P3", meter="000000000002", amount="20", status="settled"),
        doc(payment_id="P1", meter="000000000001", amount="50.00"),  # a duplicate
    ]
    bad = [
        b"\xff\xfenot json",
        doc(payment_id="P4", amount=50.0),
        doc(payment_id="P5", amount="12.345"),
        doc(payment_id="P6", meter="000000000099"),  # unknown meter
        b"",
    ]
    return ([(json.loads(v)["payment_id"].encode(), v) for v in good]
            + [(f"bad{i}".encode(), v) for i, v in enumerate(bad)] + [(b"tombstone", None)])


@pytest.mark.slow
def test_intake_routes_good_payments_and_dead_letters_the_rest() -> None:
    traffic = _traffic()
    n_good, n_bad = 5, 6

    async def scenario() -> None:
        async with EmbeddedBroker(topics=TOPICS, partitions=PARTITIONS) as broker:
            await produce(broker.bootstrap, traffic)
            stats = IntakeStats()
            task = asyncio.create_task(run_intake(
                broker.bootstrap, ROUTER, ZONE, group="intake-test", stats=stats,
                consumer_options=FAST_GROUP))
            try:
                assert await wait_until(lambda: stats.committed >= len(traffic) or task.done())
                assert not task.done(), task
                routed = await read_topic(broker.bootstrap, PAYMENTS.name, n_good)
                dead = await read_topic(broker.bootstrap, DEAD_LETTER.name, n_bad)
                # committed only after every record was acknowledged: all of them
                assert await committed(broker.bootstrap, "intake-test") == len(traffic)
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert task.cancelled()
            assert (stats.routed, stats.refused) == (n_good, n_bad)

            # good ones keyed by terminal, duplicates routed like any payment (the ledger
            # ignores them), in order per payment id
            assert len(routed) == n_good
            got = [(r.key.decode(), Payment.from_json(r.value)) for r in routed]
            by_id: dict[str, list[tuple[str, Payment]]] = {}
            for terminal, p in got:
                by_id.setdefault(p.payment_id, []).append((terminal, p))
            assert [t for t, _ in by_id["P1"]] == ["T-north", "T-north"]
            assert by_id["P1"][0][1] == by_id["P1"][1][1]
            assert by_id["P1"][0][1].amount == 50 * MICRO
            assert by_id["P2"] == [("T-south", Payment("P2", 3, 10_000, "settled", "95598",
                                                       TS_GOOD))]
            assert [p.status for _, p in by_id["P3"]] == ["pending", "settled"]
            # same terminal, same partition of PAYMENTS
            assert len({r.partition for r in routed if r.key == b"T-north"}) == 1

            # the rest on the dead-letter topic with the reason and the original bytes
            assert len(dead) == n_bad
            records = [json.loads(r.value) for r in dead]
            originals = {key: value for key, value in traffic}
            reasons = {}
            for r, rec in zip(dead, records, strict=True):
                assert rec["source"] == PAYMENTS_IN.name and isinstance(rec["offset"], int)
                assert r.key is not None and rec["key"] == r.key.decode()
                assert dead_letter_raw(rec) == originals[r.key]
                reasons[r.key] = rec["reason"]
            assert reasons[b"bad0"] == "message: not UTF-8 text (byte 0)"
            assert reasons[b"bad1"].startswith("amount: a JSON number (50.0)")
            assert reasons[b"bad2"].startswith("amount: '12.345' more than 2 decimals")
            assert reasons[b"bad3"] == "meter: unknown meter 000000000099 (not in the archive)"
            assert reasons[b"bad4"] == "message: empty: expected a JSON object"
            assert reasons[b"tombstone"] == "message: no value (a null record)"

            # a restart of the same group starts after what was committed: nothing again
            await produce(broker.bootstrap, [(b"P7", doc(payment_id="P7"))])
            stats2 = IntakeStats()
            task = asyncio.create_task(run_intake(
                broker.bootstrap, ROUTER, ZONE, group="intake-test", stats=stats2,
                consumer_options=FAST_GROUP))
            try:
                assert await wait_until(lambda: stats2.committed >= 1 or task.done())
                assert not task.done(), task
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert (stats2.routed, stats2.refused) == (1, 0)
            again = await read_topic(broker.bootstrap, PAYMENTS.name, n_good + 1)
            ids = sorted(Payment.from_json(r.value).payment_id for r in again)
            assert ids == ["P1", "P1", "P2", "P3", "P3", "P7"]

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_failure_before_the_commit_delivers_the_batch_again() -> None:
    """At-least-once: an intake that dies mid-batch commits nothing; the next one redoes it."""
    traffic = _traffic()

    def broken_clock() -> int:  # called for the first dead letter, after good records
        raise RuntimeError("the intake died")

    async def scenario() -> None:
        async with EmbeddedBroker(topics=TOPICS, partitions=PARTITIONS) as broker:
            await produce(broker.bootstrap, traffic)
            with pytest.raises(RuntimeError, match="the intake died"):
                await asyncio.wait_for(run_intake(
                    broker.bootstrap, ROUTER, ZONE, group="crashy", clock=broken_clock,
                    consumer_options=FAST_GROUP), WAIT)
            assert await committed(broker.bootstrap, "crashy") == 0
            stats = IntakeStats()
            task = asyncio.create_task(run_intake(
                broker.bootstrap, ROUTER, ZONE, group="crashy", stats=stats,
                consumer_options=FAST_GROUP))
            try:
                assert await wait_until(lambda: stats.committed >= len(traffic) or task.done())
                assert not task.done(), task
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert (stats.routed, stats.refused) == (5, 6)
            dead = await read_topic(broker.bootstrap, DEAD_LETTER.name, 6)
            assert sorted(r.key for r in dead) == [*(f"bad{i}".encode() for i in range(5)),
                                                   b"tombstone"]
            # what the first run had produced before it died comes again: at least once
            routed = await read_topic(broker.bootstrap, PAYMENTS.name, 5)
            assert len(routed) >= 5
            assert {Payment.from_json(r.value).payment_id for r in routed} == {"P1", "P2", "P3"}

    asyncio.run(scenario())


# -- meterstream pay ---------------------------------------------------------------------------------


def pay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterstream", "pay", *args],
                          check=False, capture_output=True, text=True, timeout=WAIT)


@pytest.mark.slow
def test_pay_cli_sends_one_checked_payment_and_refuses_a_bad_one(tmp_path: Path) -> None:
    with EmbeddedBroker(topics=TOPICS, partitions=PARTITIONS) as broker:
        ok = pay("--broker", broker.url, "--meter", "000000000001", "--amount", "50",
                 "--id", "CTR-1", "--ts", "2026-12-01 08:30")
        assert ok.returncode == 0, ok.stderr
        sent = json.loads(ok.stdout)
        assert sent == {"payment_id": "CTR-1", "meter": "000000000001", "amount": "50.00",
                        "status": "settled", "channel": "counter",
                        "ts": "2026-12-01T08:30:00+08:00"}
        records = asyncio.run(read_topic(broker.bootstrap, PAYMENTS_IN.name, 1))
        assert [(r.key, r.value) for r in records] == [(b"CTR-1", ok.stdout.strip().encode())]
        p = parse_payment(records[0].value, zone=ZONE)
        assert isinstance(p, Payment) and p.amount == 50 * MICRO and p.ts == TS_GOOD

        # a default id and time
        ok2 = pay("--broker", broker.url, "--meter", "000000000002", "--amount", "0.01",
                  "--channel", "alipay", "--status", "pending")
        assert ok2.returncode == 0, ok2.stderr
        sent2 = json.loads(ok2.stdout)
        assert sent2["payment_id"].startswith("alipay-") and sent2["status"] == "pending"
        assert isinstance(parse_payment(ok2.stdout.encode(), zone=ZONE), Payment)

        for args, words in [
            (["--amount", "50.001"], "--amount: '50.001' more than 2 decimals"),
            (["--amount", "-3"], "--amount: '-3' is not positive"),
            (["--amount", "0"], "--amount: '0' is not positive"),
            (["--amount", "5", "--meter", "12345"], "--meter: '12345' is not a 12-digit"),
            (["--amount", "5", "--status", "paid"], "--status: 'paid' is not one of"),
            (["--amount", "5", "--ts", "noon"], "--ts: 'noon' is not an ISO 8601"),
            (["--amount", "5", "--timezone", "Mars/Olympus"], "--timezone: unknown time zone"),
        ]:
            argv = ["--broker", broker.url, "--meter", "000000000001", *args]
            bad = pay(*argv)
            assert bad.returncode == 2, (args, bad)
            assert bad.stdout == ""
            assert bad.stderr.count("\n") == 1 and words in bad.stderr, (args, bad.stderr)
        assert len(asyncio.run(read_topic(broker.bootstrap, PAYMENTS_IN.name, 2))) == 2

        for argv, words in [
            (["--broker", "localhost:9092", "--meter", "000000000001", "--amount", "1"],
             "--broker: expected kafka://HOST:PORT"),
            (["--broker", broker.url, "--meter", "000000000001"], "missing --amount"),
            (["--broker", broker.url, "--file", str(tmp_path / "p.csv"), "--amount", "1"],
             "leave out --amount"),
            (["--broker", f"kafka://127.0.0.1:{free_port()}", "--meter", "000000000001",
              "--amount", "1"], "cannot reach the broker"),
        ]:
            bad = pay(*argv)
            assert bad.returncode == 2 and bad.stderr.count("\n") == 1, (argv, bad.stderr)
            assert words in bad.stderr, (argv, bad.stderr)


@pytest.mark.slow
def test_pay_cli_sends_a_payments_file_and_reports_refused_rows(tmp_path: Path) -> None:
    csv_path = tmp_path / "payments.csv"
    csv_path.write_text(
        "ts,payment_id,meter,amount,status,channel\n"
        "2026-12-01 08:30,B-1,000000000001,10.00,settled,bank\n"
        "2026-12-01 08:30,B-2,000000000001,10.005,settled,bank\n"
        "\n"
        "2026-12-01T00:30:00Z,B-3,000000000002,7.5,pending,95598\n"
        "noon,B-4,000000000002,1,settled,bank\n"
        "2026-12-01 08:30,B-5\n"
        '"2026-12-01 08:30","B,6",000000000003,"1.00",FAILED,alipay\n', encoding="utf-8")
    with EmbeddedBroker(topics=TOPICS, partitions=PARTITIONS) as broker:
        out = pay("--broker", broker.url, "--file", str(csv_path))
        assert out.returncode == 1, out.stderr
        assert out.stdout.startswith("sent 3 payments to meterstream.payments-in")
        assert "3 rows refused" in out.stdout
        assert out.stderr.splitlines() == [
            (f"{csv_path}:3: amount: '10.005' more than 2 decimals (yuan, positive, at most 2 "
            "decimals)"),
            (f"{csv_path}:6: ts: 'noon' is not an ISO 8601 date and time, e.g. "
            "2013-01-01T00:30:00 or 2013-01-01 00:30:00+08:00 (years 1900..2199)"),
            (f"{csv_path}:7: row has 2 fields, needs 6 (header: ts,payment_id,meter,amount,"
            "status,channel)"),
        ]
        records = asyncio.run(read_topic(broker.bootstrap, PAYMENTS_IN.name, 3))
        got = {r.key.decode(): parse_payment(r.value, zone=ZONE) for r in records}
        assert set(got) == {"B-1", "B-3", "B,6"}
        assert got["B-1"] == Payment("B-1", 1, 10 * MICRO, "settled", "bank", TS_GOOD)
        assert got["B-3"] == Payment("B-3", 2, 7_500_000, "pending", "95598", TS_GOOD)
        assert got["B,6"] == Payment("B,6", 3, MICRO, "failed", "alipay", TS_GOOD)

        empty = tmp_path / "empty.csv"
        empty.write_text("ts,meter\n", encoding="utf-8")
        bad = pay("--broker", broker.url, "--file", str(empty))
        assert bad.returncode == 2 and "lacks the column 'payment_id'" in bad.stderr
        assert pay("--broker", broker.url, "--file", str(tmp_path / "nope.csv")).returncode == 2
