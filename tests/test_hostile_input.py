"""Hostile terminals over real TCP on loopback, next to the test field's honest ones on the same
collector: one that answers every request with an oversized frame (L = 255, checksum right),
and one that never stops sending valid frames nobody asked for. Each must cost only its own
terminal; the others keep polling every meter. (Garbage and FE floods, which take the session
down as "flooded", are tests/test_collect_faults.py::test_flooding_terminal_is_dropped_and_others
_unaffected; the frame reader's own bounds are tests/test_dlt645_frame.py and test_fuzz.py.)"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from collect_helpers import (
    HOST,
    WAIT,
    FakeConn,
    FakeMeter,
    FakeTerminal,
    PortHold,
    TimedSink,
    collector_config,
    field_archive,
    make_field,
    plan,
    run,
    wait_until,
)

from meterstream.collectors.collector import Collector
from meterstream.collectors.dlt645 import Frame, decode_request, encode_read_reply

ADDRS = [f"6600000000{k:02d}" for k in range(1, 5)]


class OversizedConn(FakeConn):
    """Answers each request for its meter with a 267-byte frame: right address, right DI,
    right checksum, and 251 bytes of value where the item has 2..20."""

    def data_received(self, data: bytes) -> None:
        for item in self.reader.feed(data):
            if isinstance(item, Frame) and not item.control & 0x80:
                req = decode_request(item)
                di = getattr(req, "di", 0)
                addr = getattr(req, "address", ADDRS[0])
                if len(f"{di:08X}") == 8:
                    self.write(encode_read_reply(addr, di, bytes(251)))


class ChattyConn(FakeConn):
    """Answers honestly, and in between sends valid reply frames nobody asked for (a meter
    address it does not have), 64 KiB every few milliseconds, without end."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._rng = random.Random(1)
        self._chatter()

    def _chatter(self) -> None:
        if self.closed:
            return
        frames = b"".join(encode_read_reply("660000009999", 0x0001FF00, self._rng.randbytes(20))
                          for _ in range(1800))
        self.write(frames)
        self._flooder = asyncio.get_event_loop().call_later(0.003, self._chatter)


class Hostile(FakeTerminal):
    def __init__(self, conn: type[FakeConn]) -> None:
        super().__init__([FakeMeter.make(a, seed=k, status=0x0100) for k, a in enumerate(ADDRS)])
        self.conn = conn

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: self.conn(self), HOST, 0)
        return int(self.server.sockets[0].getsockname()[1])


async def with_field(tmp: Path, term: Hostile, body: object) -> None:
    hold = PortHold()
    field = make_field(collector_port=hold.port)
    async with field:
        port = await term.start()
        arch = field_archive(field, tmp)
        arch.terminals["T-BAD"] = plan("T-BAD", port, ADDRS)
        sink = TimedSink()
        col = Collector(arch, collector_config(dialin_port=hold.release(), timeout_s=0.3), sink)
        await col.start()
        try:
            others = [x for t, x in col.sessions.items() if t != "T-BAD"]
            await wait_until(lambda: all(x.online for x in others), what="others online")
            await body(col, sink, arch)  # type: ignore[operator]
        finally:
            await col.stop()
            await term.close()


async def cycles_of_the_others_are_complete(col: Collector, arch: object, n: int) -> list[object]:
    bad = []
    for _ in range(n):
        batches = await asyncio.wait_for(
            asyncio.gather(*(x.run_cycle() for x in col.sessions.values())), WAIT)
        for b in batches:
            if b.terminal == "T-BAD":
                bad.append(b)
            else:
                assert b.ok == len(b) == arch.terminals[b.terminal].n, b.to_json()  # type: ignore[attr-defined]
    return bad


def test_oversized_frames_fail_that_terminal_only(tmp_path: Path) -> None:
    term = Hostile(OversizedConn)

    async def body(col: Collector, sink: TimedSink, arch: object) -> None:
        s = col.sessions["T-BAD"]
        bad = await cycles_of_the_others_are_complete(col, arch, 3)
        assert all(b.ok == 0 for b in bad)  # an oversized reply is no reading
        assert s.stats.reads_ok == 0
        assert s.reader.buffered < 12 + 255

    run(with_field(tmp_path, term, body))


def test_a_terminal_that_never_stops_sending_costs_only_itself(tmp_path: Path) -> None:
    term = Hostile(ChattyConn)

    async def body(col: Collector, sink: TimedSink, arch: object) -> None:
        s = col.sessions["T-BAD"]
        await cycles_of_the_others_are_complete(col, arch, 3)
        assert s.stats.stale > 1_000  # it really did send frames nobody asked for
        assert s.stats.downs >= 1  # and was dropped for it (and again after each reconnect)
        assert s.reader.buffered < 12 + 255

    run(with_field(tmp_path, term, body), timeout=120)


@pytest.mark.slow
def test_a_terminal_that_never_stops_sending_is_closed_and_reported(tmp_path: Path) -> None:
    term = Hostile(ChattyConn)

    async def body(col: Collector, sink: TimedSink, arch: object) -> None:
        await cycles_of_the_others_are_complete(col, arch, 1)
        await wait_until(lambda: any(e.terminal == "T-BAD" for e in sink.kinds("down")), 3,
                         "chatty terminal reported down")

    run(with_field(tmp_path, term, body), timeout=120)


# --- malformed payments at the worker ----------------------------------------------------------
# The intake (pipeline/payments.py) refuses malformed channel messages to the dead-letter topic
# with the field and the reason: tests/test_payments.py::test_every_refusal_names_the_field_and
# _what_was_wrong (57 kinds) and test_intake_routes_good_payments_and_dead_letters_the_rest (on
# a real broker). Here: a record that reaches the worker's payments topic anyway (a producer
# that bypassed the intake, or a bug) is dead-lettered with its reason and never applied.

GOOD = {"payment_id": "P1", "meter": "330010010001", "amount_micro_yuan": 10_000_000,
        "status": "settled", "channel": "alipay", "ts_ns": 1_717_200_000 * 10**9}


def _with(**kw: object) -> bytes:
    import json

    doc = {**GOOD, **kw}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


MALFORMED = [
    (b"\xff\xfe", "Expecting"),  # taken for UTF-16 by json, then refused
    (b"{\"a\": \"\xff\"}", "utf-8"),
    (b"{not json", "Expecting"),
    (b"[1, 2]", "a JSON object"),
    (_with(payment_id=...), "lacks 'payment_id'"),
    (_with(meter=...), "lacks 'meter'"),
    (_with(payment_id=""), "payment_id"),
    (_with(payment_id=7), "payment_id"),
    (_with(amount_micro_yuan=10.5), "no fractional numbers"),
    (_with(amount_micro_yuan="10000000"), "amount_micro_yuan"),
    (_with(amount_micro_yuan=True), "amount_micro_yuan"),
    (_with(amount_micro_yuan=0), "not a positive payment"),
    (_with(amount_micro_yuan=-5_000_000), "not a positive payment"),
    (_with(meter=330010010001), "not a 12-digit address"),
    (_with(meter="999999999999"), "not behind terminal T1"),
    (_with(meter="330010020001"), "not behind terminal T1"),  # T2's meter, sent to T1
    (_with(status="paid"), "status"),
    (_with(ts_ns="2024-06-01T00:00:00Z"), "ts_ns"),
    (_with(meter="330010010002"), "already belongs"),  # the id again, for another meter
]


def test_malformed_payments_at_the_worker_are_dead_lettered_never_applied(
        tmp_path: Path) -> None:
    import json

    from test_pipeline_worker import ARCHIVE, TARIFFS, Clock

    from meterstream.pipeline import topics
    from meterstream.pipeline.worker import WorkerCore

    (tmp_path / "a.csv").write_text(ARCHIVE)
    (tmp_path / "t.toml").write_text(TARIFFS)
    core = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=Clock())
    before = core.balances_micro()
    out = core.on_payment("T1", _with())
    assert any(json.loads(o.value).get("kind") == "payment_applied" for o in out)
    assert core.balances_micro() == before + 10_000_000
    applied = core.counters["payments"]
    for raw, words in MALFORMED:
        balances = core.fleet.hot["balance"].copy()
        paid = core.fleet.cold["paid"].copy()
        out = core.on_payment("T1", raw)
        assert [o.topic for o in out] == [topics.DEAD_LETTER.name], (raw, out)
        doc = json.loads(out[0].value)
        assert words in doc["reason"], (raw, doc["reason"])
        assert doc["source"] == "payments" and doc["raw"] == raw.decode("utf-8", "replace")
        assert (core.fleet.hot["balance"] == balances).all(), raw
        assert (core.fleet.cold["paid"] == paid).all(), raw
    assert core.counters["payments"] == applied
    assert core.balances_micro() == before + 10_000_000
    # the id again for the same meter, even with another amount: a duplicate, acknowledged by
    # an event and never applied twice (the channel's id is the key: DESIGN.md)
    out = core.on_payment("T1", _with(amount_micro_yuan=20_000_000))
    assert [json.loads(o.value).get("kind") for o in out] == ["duplicate_payment"]
    assert core.balances_micro() == before + 10_000_000
