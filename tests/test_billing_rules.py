"""Each billing and control rule by hand: kernels and reference agree, and both give the
figures worked out here in integers (0.01 kWh, 0.0001 yuan/kWh, micro-yuan)."""

from __future__ import annotations

import tokenize
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
import reference_billing as ref
from billing_harness import (
    Scenario,
    build,
    kernel_replay,
    kernel_stream,
    reference_run,
    state_of_kernel,
    state_of_reference,
)

from meterstream.kernels import billing as K
from meterstream.kernels.layout import COLD_DTYPE, HOT_DTYPE, Fleet, from_bytes, last_seen, to_bytes
from meterstream.kernels.tariffs import (
    NS,
    PERIOD_MONTH,
    PERIOD_NONE,
    PERIOD_YEAR,
    PlanSpec,
    TariffSpec,
)

WEEK = (0, 1, 2, 3, 4)


def plan(**kw: object) -> PlanSpec:
    base: dict[str, object] = {
        "name": "home",
        "flat": 5000,
        "tou": None,
        "tier_period": PERIOD_NONE,
        "tiers": (),
        "alert1": 50_000_000,
        "alert2": 20_000_000,
        "cutoff": 0,
        "reconnect": 10_000_000,
        "max_kw_centi": 2000,
    }
    base.update(kw)
    return PlanSpec(**base)  # type: ignore[arg-type]


def tariff(
    p: PlanSpec,
    *,
    tz: str = "Asia/Shanghai",
    days: tuple[int, ...] = WEEK,
    start_h: int = 8,
    end_h: int = 18,
    holidays: tuple[date, ...] = (),
    grace_h: int = 72,
) -> TariffSpec:
    return TariffSpec(
        tz, grace_h * 3600 * NS, holidays, days, start_h * 3600 * NS, end_h * 3600 * NS, (p,)
    )


def at(text: str) -> int:
    """Epoch ns of an ISO time with offset."""
    dt = datetime.fromisoformat(text)
    return (
        (dt - datetime(1970, 1, 1, tzinfo=UTC))
        // __import__("datetime").timedelta(microseconds=1)
        * 1000
    )


def R(
    ts: str, total: int, t1: int = 0, t2: int = 0, t3: int = 0, t4: int = 0, m: int = 0
) -> ref.Event:
    return ref.Event(at(ts), m, regs=[total, t1, t2, t3, t4])


def P(ts: str, pid: str, amount: int, status: str = "settled", m: int = 0) -> ref.Event:
    return ref.Event(at(ts), m, pid=pid, amount=amount, status=status)


def run(
    t: TariffSpec, meters: list[ref.Meter], events: list[ref.Event]
) -> tuple[list[tuple[int, int, str, object]], list[ref.Meter]]:
    scn = Scenario(t, meters, events)
    got, fleet = kernel_replay(scn)
    want, final = reference_run(scn)
    assert got == want
    assert state_of_kernel(fleet) == state_of_reference(final)
    return want, final


def meter(p: PlanSpec, initial: int = 100_000_000, **kw: object) -> ref.Meter:
    return ref.Meter(address=f"4401{kw.pop('k', 0):08d}", plan=p, initial=initial, **kw)  # type: ignore[arg-type]


# Monday 2013-01-07, Shanghai (+08:00).
MON = "2013-01-07T{}+08:00"


def test_first_reading_sets_baselines_and_charges_nothing() -> None:
    p = plan()
    rows, (m,) = run(tariff(p), [meter(p)], [R(MON.format("09:00"), 123_456)])
    assert (
        rows == []
        and m.balance == 100_000_000
        and m.charged == 0
        and m.baseline == [123_456, 0, 0, 0, 0]
    )


def test_time_of_use_charge_is_exact() -> None:
    p = plan(tou=(8283, 6283, 5283, 2883))
    events = [
        R(MON.format("09:00"), 1000, 100, 200, 300, 400),
        R(MON.format("09:30"), 1010, 102, 202, 302, 404),
    ]
    _, (m,) = run(tariff(p), [meter(p)], events)
    assert m.charged == 2 * 8283 + 2 * 6283 + 2 * 5283 + 4 * 2883  # 51,230 micro-yuan


def test_flat_price_when_only_the_total_moved_or_no_tou() -> None:
    p = plan(tou=(8283, 6283, 5283, 2883), flat=5283)
    events = [
        R(MON.format("09:00"), 1000, 100, 200, 300, 400),
        R(MON.format("09:30"), 1010, 100, 200, 300, 400),
    ]
    _, (m,) = run(tariff(p), [meter(p)], events)
    assert m.charged == 10 * 5283
    q = plan(flat=4883)
    _, (n,) = run(tariff(q), [meter(q)], events)
    assert n.charged == 10 * 4883


def test_tier_add_on_splits_over_the_blocks_and_resets_each_year() -> None:
    p = plan(flat=0, tier_period=PERIOD_YEAR, tiers=((276_000, 0), (480_000, 500), (None, 3000)))
    events = [
        R("2013-06-01T00:00:00+08:00", 0),
        R("2013-09-01T00:00:00+08:00", 275_000),  # all in block 1: add 0
        R(
            "2013-11-01T00:00:00+08:00", 500_000
        ),  # 1,000 in block 1, 204,000 in block 2, 20,000 in block 3
        R("2013-12-31T23:59:00+08:00", 500_100),  # 100 in block 3
        R("2014-01-01T00:29:00+08:00", 500_200),  # a new local year: block 1 again
    ]
    rows, (m,) = run(tariff(p, grace_h=0), [meter(p, initial=10**12)], events)
    assert rows == []
    assert m.charged == 204_000 * 500 + 20_000 * 3000 + 100 * 3000 + 0
    assert m.used == 100


def test_month_period_follows_local_time_not_utc() -> None:
    p = plan(flat=0, tier_period=PERIOD_MONTH, tiers=((1000, 0), (None, 10_000)))
    # 2013-01-31T16:30Z is already February 1st in Shanghai.
    events = [
        R("2013-01-31T10:00:00+08:00", 0),
        R("2013-01-31T23:00:00+08:00", 900),
        R("2013-01-31T16:30:00Z", 1800),
    ]
    _, (m,) = run(tariff(p), [meter(p)], events)
    assert m.charged == 0  # 900 in January's first block, then 900 in February's first block
    assert m.used == 900


def test_rollover_is_a_wrap_not_a_refund() -> None:
    p = plan(flat=10_000)
    events = [R(MON.format("09:00"), 99_999_950), R(MON.format("09:30"), 30)]
    rows, (m,) = run(tariff(p), [meter(p)], events)
    assert rows == [(1, 0, "rollover", ("total",))]
    assert m.charged == 80 * 10_000 and m.baseline == [30, 0, 0, 0, 0]


def test_backwards_register_is_an_anomaly_and_keeps_the_baseline() -> None:
    p = plan(flat=10_000)
    events = [
        R(MON.format("09:00"), 5000),
        R(MON.format("09:30"), 4990),
        R(MON.format("10:00"), 5010),
    ]
    rows, (m,) = run(tariff(p), [meter(p)], events)
    assert rows == [(1, 0, "backwards", ("total",))]
    assert m.charged == 10 * 10_000  # billed from 5000, not from 4990


def test_replaying_an_old_reading_charges_nothing() -> None:
    p = plan(flat=10_000)
    events = [
        R(MON.format("09:00"), 5000),
        R(MON.format("09:30"), 5010),
        R(MON.format("09:30"), 5010),
    ]
    rows, (m,) = run(tariff(p), [meter(p)], events)
    assert rows == [] and m.charged == 10 * 10_000


def test_implausible_reading_at_the_limit_and_just_above() -> None:
    p = plan(flat=1, max_kw_centi=2000)  # 20 kW: 10 kWh per half hour at most
    ok = [R(MON.format("09:00"), 0), R(MON.format("09:30"), 1000)]
    rows, (m,) = run(tariff(p), [meter(p)], ok)
    assert rows == [] and m.charged == 1000
    bad = [R(MON.format("09:00"), 0), R(MON.format("09:30"), 1001), R(MON.format("10:00"), 1001)]
    rows, (m,) = run(tariff(p), [meter(p)], bad)
    assert rows == [(1, 0, "implausible", (1001, 1800 * NS))]
    assert m.charged == 1001  # the next reading is judged over the hour since the last accepted one


def test_supply_meters_are_tracked_never_charged_alerted_or_cut_off() -> None:
    p = plan(flat=10_000)
    events = [R(MON.format("09:00"), 0), R(MON.format("09:30"), 500)]
    rows, (m,) = run(tariff(p), [meter(p, initial=-5, supply=True)], events)
    assert rows == [] and m.charged == 0 and m.used == 500 and not m.relay_open


def test_settled_payment_applies_once_per_id() -> None:
    p = plan()
    events = [P(MON.format("09:00"), "T1", 5_000_000), P(MON.format("09:01"), "T1", 5_000_000)]
    rows, (m,) = run(tariff(p), [meter(p)], events)
    assert rows == [(1, 0, "duplicate", "T1")]
    assert m.paid == 5_000_000 and m.balance == 105_000_000


def test_cutoff_waits_for_the_window_then_happens_and_payment_reconnects_at_night() -> None:
    p = plan(flat=1_000_000, cutoff=0, reconnect=10_000_000, alert1=-(10**12), alert2=-(10**12))
    events = [
        R("2013-01-05T09:00:00+08:00", 0),  # Saturday
        R("2013-01-05T09:30:00+08:00", 200),  # -100 yuan on a Saturday: held
        R("2013-01-05T10:00:00+08:00", 200),  # still held, no new event
        R("2013-01-07T07:59:00+08:00", 200),  # Monday before 08:00: held
        R("2013-01-07T08:00:00+08:00", 200),  # window opens: cut off
        P("2013-01-07T23:00:00+08:00", "A", 105_000_000),  # 5 yuan short of reconnect
        P("2013-01-07T23:05:00+08:00", "B", 5_000_000),  # reconnect at night
    ]
    rows, (m,) = run(tariff(p), [meter(p, initial=100_000_000)], events)
    assert rows == [
        (1, 0, "cutoff_held", "outside_window"),
        (4, 0, "cutoff", -100_000_000),
        (6, 0, "reconnect", 10_000_000),
    ]
    assert not m.relay_open


def test_holiday_and_protected_hold_a_cutoff() -> None:
    p = plan(flat=1_000_000, alert1=-(10**12), alert2=-(10**12))
    events = [R(MON.format("09:00"), 0), R(MON.format("09:30"), 200)]
    rows, _ = run(tariff(p, holidays=(date(2013, 1, 7),)), [meter(p)], events)
    assert rows == [(1, 0, "cutoff_held", "holiday")]
    rows, _ = run(tariff(p), [meter(p, protected=True)], events)
    assert rows == [(1, 0, "cutoff_held", "protected")]


def test_pending_withholding_holds_until_settled_failed_or_grace() -> None:
    p = plan(flat=1_000_000, alert1=-(10**12), alert2=-(10**12))
    t = tariff(p, grace_h=2)
    start = [
        P(MON.format("09:00"), "W", 1, "pending"),
        R(MON.format("09:00"), 0),
        R(MON.format("09:30"), 200),
    ]
    rows, _ = run(t, [meter(p)], [*start, R(MON.format("10:59"), 200), R(MON.format("11:00"), 200)])
    # held while strictly before 09:00 + 2 h; at 11:00 the hold is over
    assert rows == [(2, 0, "cutoff_held", "withholding_pending"), (4, 0, "cutoff", -100_000_000)]
    rows, _ = run(
        t,
        [meter(p)],
        [*start, P(MON.format("09:40"), "W", 1, "failed"), R(MON.format("09:45"), 200)],
    )
    assert rows == [
        (2, 0, "cutoff_held", "withholding_pending"),
        (3, 0, "failed", "W"),
        (3, 0, "cutoff", -100_000_000),
    ]
    rows, m = run(t, [meter(p)], [*start, P(MON.format("09:40"), "W", 150_000_000, "settled")])
    assert rows == [(2, 0, "cutoff_held", "withholding_pending")] and m[0].paid == 150_000_000


def test_alerts_fire_on_the_way_down_and_rearm_on_the_way_up() -> None:
    p = plan(
        flat=1_000_000, alert1=50_000_000, alert2=20_000_000, cutoff=-(10**12), reconnect=-(10**12)
    )
    events = [
        R(MON.format("09:00"), 0),
        R(MON.format("09:30"), 60),  # 100 -> 40 yuan: alert1
        R(MON.format("10:00"), 90),  # 40 -> 10: alert2
        P(MON.format("10:10"), "A", 50_000_000),  # 60: both re-armed
        R(MON.format("10:30"), 100),  # 50: still >= alert1
        R(MON.format("11:00"), 101),  # 49: alert1 again
    ]
    rows, _ = run(tariff(p), [meter(p)], events)
    assert rows == [
        (1, 0, "alert1", 40_000_000),
        (2, 0, "alert2", 10_000_000),
        (5, 0, "alert1", 49_000_000),
    ]
    # An alert starts disarmed when the initial balance is already below it.
    rows, _ = run(
        tariff(p),
        [meter(p, initial=30_000_000)],
        [R(MON.format("09:00"), 0), R(MON.format("09:30"), 20)],
    )
    assert rows == [(1, 0, "alert2", 10_000_000)]


def test_offline_terminal_queues_the_cutoff_until_it_is_back() -> None:
    p = plan(flat=1_000_000, alert1=-(10**12), alert2=-(10**12))
    scn = Scenario(
        tariff(p),
        [meter(p, online=False)],
        [R(MON.format("09:00"), 0), R(MON.format("09:30"), 200)],
    )
    rows, _ = run(scn.tariff, scn.meters, scn.events)
    assert rows == [(1, 0, "cutoff_held", "terminal_offline")]
    fleet, compiled = build(scn)
    bill = K.Billing(fleet, compiled)
    bill.apply_readings(
        np.array([0, 0]),
        np.array([e.ts for e in scn.events]),
        *(np.array([e.regs[k] for e in scn.events]) for k in range(5)),
    )  # type: ignore[index]
    fleet.terminal_online[0] = 1
    action = bill.decide_controls(np.array([0]), at(MON.format("09:31")))
    assert action[0] == K.ACT_CUTOFF and fleet.hot["relay_open"][0] == 1


def test_decide_controls_cuts_off_when_the_window_opens() -> None:
    p = plan(flat=1_000_000, alert1=-(10**12), alert2=-(10**12))
    scn = Scenario(
        tariff(p),
        [meter(p)],
        [
            R("2013-01-07T07:00:00+08:00", 0),
            R("2013-01-07T07:30:00+08:00", 200),
            ref.Event(at("2013-01-07T08:00:00+08:00"), 0, status="tick"),
        ],
    )
    got, fleet = kernel_stream(scn)
    assert [r[2:] for r in got] == [("cutoff_held", "outside_window"), ("cutoff", None)]
    assert fleet.hot["relay_open"][0] == 1


def test_streaming_batch_reports_charges_and_outcomes() -> None:
    p = plan(flat=10_000)
    scn = Scenario(tariff(p), [meter(p), meter(p, k=1)], [])
    fleet, compiled = build(scn)
    bill = K.Billing(fleet, compiled)
    ts = np.array([at(MON.format("09:00"))] * 2 + [at(MON.format("09:30"))] * 2)
    total = np.array([100, 99_999_990, 90, 5])
    zero = np.zeros(4, np.int64)
    charge, outcome, detail, _ = bill.apply_readings(
        np.array([0, 1, 0, 1]), ts, total, zero, zero, zero, zero
    )
    assert outcome.tolist() == [K.OUT_BASELINE, K.OUT_BASELINE, K.OUT_BACKWARDS, K.OUT_ACCEPTED]
    assert detail.tolist() == [0, 0, 1, 1] and charge.tolist() == [0, 0, 0, 15 * 10_000]
    assert last_seen(fleet).tolist() == [ts[2], ts[3]]


def test_state_layout_is_integers_in_cache_lines() -> None:
    assert HOT_DTYPE.itemsize == 64 and COLD_DTYPE.itemsize == 64
    for dt in (HOT_DTYPE, COLD_DTYPE):
        for name in dt.names:
            assert dt.fields[name][0].kind in "iu", name


def test_block_bytes_are_versioned_and_checked() -> None:
    p = plan()
    scn = Scenario(
        tariff(p), [meter(p), meter(p, k=1)], [P(MON.format("09:00"), "X", 5, "pending", m=1)]
    )
    _, fleet = kernel_replay(scn)
    data = to_bytes(fleet, 1)
    assert data[:4] == b"MSTB"
    with pytest.raises(ValueError, match="magic"):
        from_bytes(fleet, 1, b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="version"):
        from_bytes(fleet, 1, data[:4] + b"\x09\x00" + data[6:])
    with pytest.raises(ValueError, match="other meters"):
        from_bytes(fleet, 0, data)
    other = Fleet(
        fleet.hot.copy(), fleet.cold.copy(), fleet.terminal_start.copy(), fleet.terminal_ids
    )
    from_bytes(other, 1, data)
    assert other.meter_payments(1) == [other.payment_ids["X"]]
    assert other.cold["hold_until"][1] == fleet.cold["hold_until"][1] > 0


def test_no_float_in_the_money_path() -> None:
    """The kernels and the parsers never name a float type nor divide with `/`."""
    src = Path(__file__).resolve().parents[1] / "src" / "meterstream"
    for rel in (
        "kernels/billing.py",
        "kernels/layout.py",
        "kernels/tariffs.py",
        "pipeline/tariffs.py",
        "pipeline/replay.py",
    ):
        with open(src / rel, "rb") as fh:
            for tok in tokenize.tokenize(fh.readline):
                if tok.type == tokenize.OP:
                    assert tok.string not in ("/", "/="), f"{rel}:{tok.start[0]}: true division"
                if tok.type == tokenize.NAME:
                    assert tok.string not in ("float", "float64", "float32"), (
                        f"{rel}:{tok.start[0]}: {tok.string}"
                    )
