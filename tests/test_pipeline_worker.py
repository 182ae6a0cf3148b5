"""WorkerCore: what the Faust worker does with each message, checked without Kafka.

The billing itself is the kernels' (tests/test_billing_*.py hold it to the reference); here:
batches and payments reach the right meters, decisions become commands in the book, results
close them, replays change nothing, and a terminal's state survives state_of / load_state.
"""

from __future__ import annotations

import json
from pathlib import Path
from random import Random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.collectors.batch import OUTCOME_OK, OUTCOME_TIMEOUT, ReadingBatch
from meterstream.errors import UserError
from meterstream.pipeline import topics
from meterstream.pipeline.config import load_worker_config
from meterstream.pipeline.worker import Out, WorkerCore

TARIFFS = """
timezone = "Asia/Shanghai"
withholding_grace_hours = 72
holidays = []
[cutoff_window]
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "00:00"
end = "23:59"
[plans.flat]
flat = "1.0000"
tier_period = "none"
alert1 = "20.00"
alert2 = "10.00"
cutoff = "0.00"
reconnect = "5.00"
max_kw = "100"
"""

ARCHIVE = """meter,terminal,area,class,plan,protected,initial_balance,role
330010010001,T1,A1,lowvoltage,flat,0,3.00,customer
330010010002,T1,A1,lowvoltage,flat,1,3.00,customer
330010020001,T2,A1,lowvoltage,flat,0,100.00,customer
"""

H = 3600 * 10**9
T0 = 1_717_200_000 * 10**9  # 2024-06-01 00:00 UTC: 08:00 local, a Saturday


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


@pytest.fixture
def core(tmp_path: Path) -> WorkerCore:
    (tmp_path / "a.csv").write_text(ARCHIVE)
    (tmp_path / "t.toml").write_text(TARIFFS)
    return WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=Clock())


def batch(terminal: str, started: int, rows: list[tuple[int, int, int, int]]) -> bytes:
    """rows of (meter, ts, total 0.01 kWh, outcome)"""
    full = [(m, ts, total, -1, -1, -1, -1, 0, out, 0, -(2**31)) for m, ts, total, out in rows]
    return ReadingBatch.from_rows(terminal, 1, started, started + 1, full).to_bytes()


def pay_json(doc: dict) -> bytes:
    """A routed payment record (pipeline/payments.py's Payment.to_json)."""
    return json.dumps(doc).encode()


def of(out: list[Out], topic: str) -> list[dict]:
    return [json.loads(o.value) for o in out if o.topic == topic]


def kinds(out: list[Out]) -> list[str]:
    return [d.get("kind") or d.get("to_state") for d in of(out, topics.EVENTS.name)]


def test_a_customer_runs_out_is_cut_off_pays_and_is_reconnected(core: WorkerCore) -> None:
    m = 330010010001
    core.on_link("T1", {"kind": "up"})
    assert of(core.on_batch(batch("T1", T0, [(m, T0, 100_00, OUTCOME_OK)])), topics.COMMANDS.name) == []
    # 3.50 kWh at 1 yuan: the balance of 3.00 goes to -0.50, below the cut-off threshold 0
    out = core.on_batch(batch("T1", T0 + H, [(m, T0 + H, 103_50, OUTCOME_OK)]))
    assert core.meter_view("330010010001")["balance"] == "-0.500000"
    (cmd,) = of(out, topics.COMMANDS.name)
    assert cmd["action"] == "trip" and cmd["meter"] == "330010010001" and cmd["terminal"] == "T1"
    # the collector confirms the trip
    core.on_result("T1", {"id": cmd["id"], "outcome": "confirmed", "detail": "ok",
                          "sent": "2024-06-01T00:00:01+00:00",
                          "acknowledged": "2024-06-01T00:00:01+00:00",
                          "done": "2024-06-01T00:00:03+00:00",
                          "status": {"word": "0050"}})
    # the customer pays 10.00: reconnect
    pay = {"payment_id": "P1", "meter": "330010010001", "amount_micro_yuan": 10_000_000,
           "status": "settled", "channel": "alipay", "ts_ns": T0 + 2 * H}
    out = core.on_payment("T1", pay_json(pay))
    (cmd2,) = of(out, topics.COMMANDS.name)
    assert cmd2["action"] in ("close", "allow-close")
    assert core.meter_view("330010010001")["balance"] == "9.500000"
    # the same payment again credits nothing
    out = core.on_payment("T1", pay_json(pay))
    assert "duplicate_payment" in kinds(out)
    assert core.meter_view("330010010001")["balance"] == "9.500000"
    assert of(out, topics.COMMANDS.name) == []


def test_a_protected_customer_is_never_cut_off(core: WorkerCore) -> None:
    m = 330010010002
    core.on_link("T1", {"kind": "up"})
    core.on_batch(batch("T1", T0, [(m, T0, 100_00, OUTCOME_OK)]))
    out = core.on_batch(batch("T1", T0 + H, [(m, T0 + H, 110_00, OUTCOME_OK)]))
    assert of(out, topics.COMMANDS.name) == []
    held = [d for d in of(out, topics.EVENTS.name) if d.get("kind") == "cutoff_held"]
    assert held and held[0]["reason"] == "protected"


def test_a_pending_withholding_holds_the_cutoff(core: WorkerCore) -> None:
    m = 330010010001
    core.on_link("T1", {"kind": "up"})
    core.on_batch(batch("T1", T0, [(m, T0, 100_00, OUTCOME_OK)]))
    core.on_payment("T1", pay_json({"payment_id": "W1", "meter": "330010010001",
                           "amount_micro_yuan": 50_000_000, "status": "pending",
                           "channel": "bank", "ts_ns": T0 + 1}))
    out = core.on_batch(batch("T1", T0 + H, [(m, T0 + H, 110_00, OUTCOME_OK)]))
    assert of(out, topics.COMMANDS.name) == []
    held = [d for d in of(out, topics.EVENTS.name) if d.get("kind") == "cutoff_held"]
    assert held[0]["reason"] == "withholding_pending"


def test_an_offline_terminal_gets_its_cutoff_when_it_is_back(core: WorkerCore) -> None:
    m = 330010010001
    core.on_link("T1", {"kind": "up"})
    core.on_batch(batch("T1", T0, [(m, T0, 100_00, OUTCOME_OK)]))
    core.on_link("T1", {"kind": "down"})
    out = core.on_batch(batch("T1", T0 + H, [(m, T0 + H, 110_00, OUTCOME_OK)]))
    assert of(out, topics.COMMANDS.name) == []
    out = core.on_link("T1", {"kind": "up"})
    # the kernels held it as terminal_offline; the next reading decides again
    out += core.on_batch(batch("T1", T0 + 2 * H, [(m, T0 + 2 * H, 110_00, OUTCOME_OK)]))
    assert [c["action"] for c in of(out, topics.COMMANDS.name)] == ["trip"]


def test_replays_change_nothing(core: WorkerCore) -> None:
    m = 330010020001
    core.on_link("T2", {"kind": "up"})
    core.on_batch(batch("T2", T0, [(m, T0, 100_00, OUTCOME_OK)]))
    b = batch("T2", T0 + H, [(m, T0 + H, 150_00, OUTCOME_OK)])
    core.on_batch(b)
    before = core.state_of("T2")
    assert core.on_batch(b) == []  # the same batch again
    assert core.on_batch(batch("T2", T0, [(m, T0, 100_00, OUTCOME_OK)])) == []  # an older one
    assert core.state_of("T2") == before
    assert core.meter_view("330010020001")["balance"] == "50.000000"


def test_failed_reads_are_not_billed(core: WorkerCore) -> None:
    m = 330010020001
    core.on_batch(batch("T2", T0, [(m, T0, 100_00, OUTCOME_OK)]))
    core.on_batch(batch("T2", T0 + H, [(m, T0 + H, 0, OUTCOME_TIMEOUT)]))
    assert core.meter_view("330010020001")["balance"] == "100.000000"


def test_state_survives_a_move_to_another_worker(core: WorkerCore, tmp_path: Path) -> None:
    m = 330010010001
    core.on_link("T1", {"kind": "up"})
    core.on_batch(batch("T1", T0, [(m, T0, 100_00, OUTCOME_OK)]))
    core.on_batch(batch("T1", T0 + H, [(m, T0 + H, 103_50, OUTCOME_OK)]))
    core.on_payment("T1", pay_json({"payment_id": "P9", "meter": "330010010001",
                           "amount_micro_yuan": 1_000_000, "status": "settled",
                           "channel": "counter", "ts_ns": T0 + H + 1}))
    state = core.state_of("T1")
    other = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=Clock())
    other.load_state("T1", state)
    assert other.state_of("T1") == state
    assert other.meter_view("330010010001") == core.meter_view("330010010001")
    # the payment id is known to the new worker: a redelivery credits nothing
    again = other.on_payment("T1", pay_json({"payment_id": "P9", "meter": "330010010001",
                                    "amount_micro_yuan": 1_000_000, "status": "settled",
                                    "channel": "counter", "ts_ns": T0 + H + 1}))
    assert "duplicate_payment" in kinds(again)
    with pytest.raises(ValueError):
        other.load_state("T2", state)  # another terminal's meters


def test_unknown_terminals_and_broken_batches_go_to_the_dead_letter(core: WorkerCore) -> None:
    (dead,) = core.on_batch(b"not a batch")
    assert dead.topic == topics.DEAD_LETTER.name and "reading batch" in json.loads(dead.value)["reason"]
    (dead,) = core.on_batch(batch("T9", T0, [(330010010001, T0, 1, OUTCOME_OK)]))
    assert "T9" in json.loads(dead.value)["reason"]


def test_a_bad_archive_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(ARCHIVE + "12345,T1,A1,lowvoltage,flat,0,1.00,customer\n")
    (tmp_path / "t.toml").write_text(TARIFFS)
    with pytest.raises(UserError, match="a.csv:5"):
        WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml")


def test_balances_add_up(core: WorkerCore) -> None:
    assert core.balances_micro() == 106_000_000
    assert isinstance(core.fleet.hot["balance"], np.ndarray)


def test_dropouts_are_one_area_alarm_and_kpis_count_reads(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(ARCHIVE)
    (tmp_path / "t.toml").write_text(TARIFFS)
    clock = Clock()
    core = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=clock, cycle_s=60.0)
    clock.t += 60 * 10**9
    core.on_batch(batch("T1", clock.t, [(330010010001, clock.t, 100_00, OUTCOME_OK),
                                        (330010010002, clock.t, 100_00, OUTCOME_TIMEOUT)]))
    core.on_batch(batch("T2", clock.t, [(330010020001, clock.t, 100_00, OUTCOME_OK)]))
    snap = core.kpi_snapshot()
    assert snap["reads_by_class"]["lowvoltage"] == [2, 3]
    assert snap["success_bp_by_class"]["lowvoltage"] == 6666
    assert snap["online"] == 2 and snap["terminals"] == 2
    assert core.detect_dropouts(["T1", "T2"]) == []
    # both terminals of area A1 go quiet for many cycles (the worker ticks every minute):
    # one area alarm, not two terminal ones
    out = []
    for _ in range(40):
        clock.t += 60 * 10**9
        out += core.detect_dropouts(["T1", "T2"])
    kinds_ = [json.loads(o.value)["kind"] for o in out]
    assert kinds_.count("area_dropout") == 1 and "terminal_offline" not in kinds_
    assert core.fleet.terminal_online.tolist() == [0, 0]
    # a terminal this worker does not hold never drops
    fresh = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=clock)
    clock.t += 40 * 60 * 10**9
    assert fresh.detect_dropouts([]) == []


def test_a_first_batch_delivered_after_the_second_is_billed_as_in_time_order(
        tmp_path: Path) -> None:
    """Delivery order is not time order (two collectors, a replayed spool): the worker ends
    where time order ends, which is where `meterstream replay` (it sorts by time) ends."""
    (tmp_path / "a.csv").write_text(ARCHIVE)
    (tmp_path / "t.toml").write_text(TARIFFS)
    m1, m2 = 330010010001, 330010010002
    b = [batch("T1", T0 + k * H, [(m1, T0 + k * H, 100_00 + k * 150, OUTCOME_OK),
                                  (m2, T0 + k * H, 500_00 + k * 75, OUTCOME_OK)])
         for k in range(4)]

    def run(order: list[int]) -> tuple[list[int], dict[str, int]]:
        core = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=Clock())
        for k in order:
            core.on_batch(b[k])
        return core.fleet.hot["balance"][:2].tolist(), core.counters

    in_order, c = run([0, 1, 2, 3])
    assert in_order == [3_000_000 - 4_500_000, 3_000_000 - 2_250_000]  # 4.50 and 2.25 kWh
    assert c["late_readings"] == 0
    late_first, c = run([1, 0, 2, 3])  # the first batch overtaken by the second
    assert late_first == in_order and c["late_readings"] == 2
    # and copies of every batch on the way change nothing
    assert run([1, 0, 0, 1, 2, 0, 3, 2, 1])[0] == in_order
    # a late batch between two billed ones lies inside an advance billed already
    middle, c = run([0, 2, 1, 3])
    assert middle == in_order and c["late_readings"] == 0 and c["replayed_batches"] == 1
    # the first batch arriving after advances were billed, or the first two both overtaken
    late_first, c = run([1, 2, 3, 0])
    assert late_first == in_order and c["late_readings"] == 2
    assert run([2, 1, 0, 3])[0] == in_order and run([3, 2, 1, 0])[0] == in_order
    # and the state (the earliest reading with it) survives a restart between them
    core = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=Clock())
    for k in (2, 3):
        core.on_batch(b[k])
    again = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=Clock())
    again.load_state("T1", core.state_of("T1"))
    for k in (1, 0):
        again.on_batch(b[k])
    assert again.fleet.hot["balance"][:2].tolist() == in_order
    # time order refuses the second reading (it went backwards from the first): overtaken,
    # the first becomes the baseline all the same, and the third is billed from it
    b = [batch("T1", T0 + k * H, [(m1, T0 + k * H, total, OUTCOME_OK)])
         for k, total in enumerate((100_00, 99_00, 101_00))]
    in_order, _ = run([0, 1, 2])
    assert in_order[0] == 3_000_000 - 1_000_000
    assert run([1, 0, 2])[0] == in_order


def test_a_late_batch_never_rewrites_the_balance_history(tmp_path: Path) -> None:
    """Balance points go to InfluxDB at their batch's time; a copy writes none (it would
    overwrite the point at that time with today's balance), a backfill writes one now."""
    (tmp_path / "a.csv").write_text(ARCHIVE)
    (tmp_path / "t.toml").write_text(TARIFFS)

    class Sink:  # records what the worker hands the InfluxDB sink
        def __init__(self) -> None:
            self.balances: list[tuple[int, list[int]]] = []

        def write_batch(self, batch: object, meta: object) -> int:
            return 0

        def write_balances(self, terminal: str, area: str, meter: object, balance: object,
                           relay: object, ts_ns: int, meter_class: object = 2) -> int:
            self.balances.append((ts_ns, [int(x) for x in np.asarray(meter)]))
            return 0

    sink, clock = Sink(), Clock()
    clock.t = T0 + 10 * H
    core = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=clock, influx=sink)
    m1 = 330010010001
    b = [batch("T1", T0 + k * H, [(m1, T0 + k * H, 100_00 + 150 * k, OUTCOME_OK)])
         for k in range(3)]
    core.on_batch(b[1])
    core.on_batch(b[2])
    assert [ts for ts, _ in sink.balances] == [T0 + H + 1, T0 + 2 * H + 1]  # ended_ns
    core.on_batch(b[1])  # a copy: nothing to write
    assert len(sink.balances) == 2
    core.on_batch(b[0])  # the first batch, late: it moved the balance now
    assert sink.balances[-1] == (clock.t, [m1]) and len(sink.balances) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=2, max_size=7), st.randoms(use_true_random=False))
def test_any_delivery_order_ends_where_time_order_ends(tmp_path_factory: pytest.TempPathFactory,
                                                       steps: list[int], rnd: Random) -> None:
    """Batches of a terminal in any order, copies among them: the balances of time order."""
    d = tmp_path_factory.mktemp("order")
    (d / "a.csv").write_text(ARCHIVE)
    (d / "t.toml").write_text(TARIFFS)
    totals = [100_00 + sum(steps[:k]) for k in range(len(steps))]
    b = [batch("T1", T0 + k * H, [(330010010001, T0 + k * H, v, OUTCOME_OK)])
         for k, v in enumerate(totals)]

    def run(order: list[int]) -> int:
        core = WorkerCore(d / "a.csv", d / "t.toml", now=Clock())
        for k in order:
            core.on_batch(b[k])
        return int(core.fleet.hot["balance"][0])

    order = list(range(len(b)))
    rnd.shuffle(order)
    order += rnd.choices(range(len(b)), k=rnd.randint(0, 3))  # copies, late
    assert run(order) == run(list(range(len(b)))) == 3_000_000 - (totals[-1] - totals[0]) * 10_000


def test_the_dropouts_table_sets_when_a_terminals_own_alarm_goes_out(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(ARCHIVE)
    (tmp_path / "t.toml").write_text(TARIFFS)
    (tmp_path / "w.toml").write_text("[worker]\ncycle_s = 60.0\n[dropouts]\nk = 2\n"
                                     "hold_s = 120\n")
    rules = load_worker_config(tmp_path / "w.toml").rules
    assert (rules.k, rules.hold_ns, rules.grace_ns) == (2, 120 * 10**9, 60 * 10**9)

    def minutes_to_alarm(**kw: object) -> int | None:
        """T1 goes quiet while T2 of its area reports: minutes until T1's own alarm."""
        clock = Clock()
        core = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=clock, cycle_s=60.0,
                          **kw)  # type: ignore[arg-type]
        for minute in range(1, 13):
            clock.t += 60 * 10**9
            if minute == 1:
                core.on_batch(batch("T1", clock.t, [(330010010001, clock.t, 100_00, OUTCOME_OK)]))
            core.on_batch(batch("T2", clock.t, [(330010020001, clock.t, 100_00, OUTCOME_OK)]))
            kinds_ = [json.loads(o.value)["kind"] for o in core.detect_dropouts(["T1", "T2"])]
            assert "area_dropout" not in kinds_  # one terminal of two: not an area outage
            if "terminal_offline" in kinds_:
                return minute
        return None

    # missed at 2 cycles + 60 s grace (minute 4), alarmed 120 s later; the default holds 15 min
    assert minutes_to_alarm(rules=rules) == 6
    assert minutes_to_alarm() is None


def test_the_memory_the_worker_keeps_for_the_dashboard_is_configured(tmp_path: Path) -> None:
    from meterstream.pipeline.api import Api

    (tmp_path / "w.toml").write_text("[worker]\nevents_kept = 100\nhistory_meters = 8\n"
                                     "history_entries = 4\n")
    cfg = load_worker_config(tmp_path / "w.toml")
    assert (cfg.events_kept, cfg.history_meters, cfg.history_entries) == (100, 8, 4)
    assert (load_worker_config(None).history_meters, load_worker_config(None).history_entries) \
        == (1024, 32)  # at most about 43 MB of customer history (docs/dashboard.md)
    (tmp_path / "w.toml").write_text("[worker]\nhistory_entries = 0\n")
    with pytest.raises(UserError, match="worker.history_entries: 0 is below the minimum 1"):
        load_worker_config(tmp_path / "w.toml")
    from meterstream.pipeline.api import MeterHistory

    class _W:
        core = None

    api = Api(_W(), history=MeterHistory(8, entries=4))
    for k in range(20):  # a customer's events beyond the bound push the oldest out
        api.history.event("330010010001", {"kind": "payment_applied", "n": k})
    assert [e["n"] for e in api.history.events_of("330010010001")] == [16, 17, 18, 19]


def test_billing_follows_the_relay_an_operator_closed(core: WorkerCore) -> None:
    m = 330010010001
    core.on_link("T1", {"kind": "up"})
    core.on_batch(batch("T1", T0, [(m, T0, 100_00, OUTCOME_OK)]))
    (trip,) = of(core.on_batch(batch("T1", T0 + H, [(m, T0 + H, 103_50, OUTCOME_OK)])),
                 topics.COMMANDS.name)
    core.on_result("T1", {"id": trip["id"], "outcome": "confirmed", "detail": "ok",
                          "sent": "2024-06-01T01:00:01+00:00", "done": "2024-06-01T01:00:03+00:00",
                          "status": {"word": "0050"}})
    assert core.meter_view("330010010001")["relay"] == "open"
    # an operator closes the relay of the customer still in arrears
    (close,) = of(core.manual("T1", "330010010001", "close", "alice", "medical equipment"),
                  topics.COMMANDS.name)
    done = {"id": close["id"], "outcome": "confirmed", "detail": "ok",
            "sent": "2024-06-01T01:10:01+00:00", "done": "2024-06-01T01:10:03+00:00",
            "status": {"word": "0000"}}
    core.on_result("T1", done)
    assert core.meter_view("330010010001")["relay"] == "closed"
    # a replay of an older result changes nothing
    core.on_result("T1", {**trip, "outcome": "confirmed", "status": {"word": "0050"},
                          "done": "2024-06-01T01:00:03+00:00"})
    assert core.meter_view("330010010001")["relay"] == "closed"
    # billing decides on the relay as it is: still below the cut-off, so it is cut off again
    out = core.on_batch(batch("T1", T0 + 2 * H, [(m, T0 + 2 * H, 103_60, OUTCOME_OK)]))
    assert [c["action"] for c in of(out, topics.COMMANDS.name)] == ["trip"]
