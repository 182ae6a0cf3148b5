"""Test harness: run the billing kernels on the reference's inputs and read their results back
in the reference's terms, plus hypothesis strategies for random tariffs, fleets and events."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import reference_billing as ref
from hypothesis import strategies as st

from meterstream.kernels import billing as K
from meterstream.kernels.layout import INT64_MIN, Fleet
from meterstream.kernels.tariffs import (
    NS,
    PERIOD_MONTH,
    PERIOD_NONE,
    PERIOD_YEAR,
    CompiledTariff,
    PlanSpec,
    TariffSpec,
    new_clock,
)
from meterstream.pipeline.tariffs import compile_spec

STATUS = {"settled": K.STATUS_SETTLED, "pending": K.STATUS_PENDING, "failed": K.STATUS_FAILED}
ZONES = (
    "Asia/Shanghai",
    "Europe/London",
    "America/New_York",
    "Australia/Lord_Howe",
    "UTC",
    "Asia/Kolkata",
)


@dataclass
class Scenario:
    tariff: TariffSpec
    meters: list[ref.Meter]
    events: list[ref.Event]


def build(scn: Scenario) -> tuple[Fleet, CompiledTariff]:
    """A fleet of the scenario's meters (one terminal each, online as the meter says)."""
    tariff = compile_spec(scn.tariff)
    plan_index = scn.tariff.plan_index()
    n = len(scn.meters)
    fleet = Fleet.build(
        terminal_ids=[f"T{i}" for i in range(n)],
        terminal_of=np.arange(n, dtype=np.int64),
        address=np.array([int(m.address) for m in scn.meters], np.int64),
        plan=np.array([plan_index[m.plan.name] for m in scn.meters], np.int64),
        supply=np.array([m.supply for m in scn.meters], np.int64),
        protected=np.array([m.protected for m in scn.meters], np.int64),
        initial=np.array([m.initial for m in scn.meters], np.int64),
        plans=tariff.plans,
    )
    fleet.terminal_online[:] = [m.online for m in scn.meters]
    return fleet, tariff


def rows_of(
    code: int, a: int, b: int, action: int, balance: int, pid: str
) -> list[tuple[str, object]]:
    """The reference's rows for one event's kernel outputs."""
    rows: list[tuple[str, object]] = []
    names = K.REGISTER_NAMES
    if code == K.OUT_ACCEPTED and a:
        rows.append(("rollover", tuple(names[k] for k in range(5) if a >> k & 1)))
    elif code == K.OUT_BACKWARDS:
        rows.append(("backwards", tuple(names[k] for k in range(5) if a >> k & 1)))
    elif code == K.OUT_IMPLAUSIBLE:
        rows.append(("implausible", (a, b)))
    elif code == K.PAY_DUPLICATE:
        rows.append(("duplicate", pid))
    elif code == K.PAY_FAILED:
        rows.append(("failed", pid))
    if action & K.ACT_ALERT1:
        rows.append(("alert1", balance))
    if action & K.ACT_ALERT2:
        rows.append(("alert2", balance))
    if action & K.ACT_HELD:
        rows.append(("cutoff_held", K.HOLD_NAMES[action >> K.HELD_SHIFT & 7]))
    if action & K.ACT_CUTOFF:
        rows.append(("cutoff", balance))
    if action & K.ACT_RECONNECT:
        rows.append(("reconnect", balance))
    return rows


def kernel_replay(scn: Scenario) -> tuple[list[tuple[int, int, str, object]], Fleet]:
    """The events through `replay_events`, in the given order."""
    fleet, tariff = build(scn)
    pays = [(i, e) for i, e in enumerate(scn.events) if e.regs is None]
    reads = [(i, e) for i, e in enumerate(scn.events) if e.regs is not None]
    n_pay = len(pays)
    pos = {i: k for k, (i, _) in enumerate(pays)}
    pos.update({i: n_pay + k for k, (i, _) in enumerate(reads)})
    order = np.array([pos[i] for i in range(len(scn.events))], np.int64)
    keys = [fleet.payment_key(e.pid, e.meter) for _, e in pays]

    def arr(values: list[int]) -> np.ndarray:
        return np.array(values, np.int64)

    regs = np.array([e.regs for _, e in reads], np.int64).reshape(len(reads), 5)
    n = len(scn.events)
    code = np.zeros(max(n, 1), np.int8)
    a = np.zeros(max(n, 1), np.int64)
    b = np.zeros(max(n, 1), np.int64)
    action = np.zeros(max(n, 1), np.int16)
    balance = np.zeros(max(n, 1), np.int64)
    K.replay_events(
        fleet.hot,
        fleet.cold,
        fleet.ledger,
        tariff.plans,
        tariff.tiers,
        tariff.zone,
        tariff.window,
        tariff.holidays,
        fleet.terminal_online,
        new_clock(),
        order,
        n_pay,
        arr([e.meter for _, e in pays]),
        arr([e.ts for _, e in pays]),
        arr(keys),
        arr([e.amount for _, e in pays]),
        arr([STATUS[e.status] for _, e in pays]),
        arr([e.meter for _, e in reads]),
        arr([e.ts for _, e in reads]),
        *(np.ascontiguousarray(regs[:, k]) for k in range(5)),
        0,
        n,
        code,
        a,
        b,
        action,
        balance,
    )
    out = []
    for i, e in enumerate(scn.events):
        for what, detail in rows_of(
            int(code[i]), int(a[i]), int(b[i]), int(action[i]), int(balance[i]), e.pid
        ):
            out.append((i, e.meter, what, detail))
    return out, fleet


def kernel_stream(scn: Scenario) -> tuple[list[tuple[int, int, str, object]], Fleet]:
    """The events through the streaming kernels: runs of readings through `apply_readings`,
    runs of payments through `apply_payments`, ticks (status "tick") through
    `decide_controls`, in batches as they come."""
    fleet, tariff = build(scn)
    bill = K.Billing(fleet, tariff)
    out: list[tuple[int, int, str, object]] = []
    i = 0
    events = scn.events
    while i < len(events):
        kind = _kind(events[i])
        j = i
        while j < len(events) and _kind(events[j]) == kind:
            j += 1
        run = events[i:j]
        slot = np.array([e.meter for e in run], np.int64)
        ts = np.array([e.ts for e in run], np.int64)
        if kind == "reading":
            regs = np.array([e.regs for e in run], np.int64)
            _charge, outcome, detail, action = bill.apply_readings(
                slot, ts, *(regs[:, k].copy() for k in range(5))
            )
            for k, e in enumerate(run):
                for what, d in rows_of(int(outcome[k]), int(detail[k]), 0, int(action[k]), 0, ""):
                    out.append((i + k, e.meter, what, d))
        elif kind == "payment":
            result, action = bill.apply_payments(
                slot,
                ts,
                [e.pid for e in run],
                np.array([e.amount for e in run], np.int64),
                np.array([STATUS[e.status] for e in run], np.int64),
            )
            for k, e in enumerate(run):
                for what, d in rows_of(int(result[k]), 0, 0, int(action[k]), 0, e.pid):
                    out.append((i + k, e.meter, what, d))
        else:
            for k, e in enumerate(run):
                action = bill.decide_controls(np.array([e.meter], np.int64), e.ts)
                for what, d in rows_of(-1, 0, 0, int(action[0]), 0, ""):
                    out.append((i + k, e.meter, what, d))
        i = j
    return without_balances(out), fleet


def _kind(e: ref.Event) -> str:
    if e.regs is not None:
        return "reading"
    return "tick" if e.status == "tick" else "payment"


def reference_run(scn: Scenario) -> tuple[list[tuple[int, int, str, object]], list[ref.Meter]]:
    meters = copy.deepcopy(scn.meters)
    return ref.run(scn.tariff, meters, scn.events), meters


def without_balances(
    rows: list[tuple[int, int, str, object]],
) -> list[tuple[int, int, str, object]]:
    """Rows with the balance of decisions and the time of implausible readings blanked (the
    streaming kernels report neither per event; the state at the end is compared instead)."""
    out = []
    for i, m, what, d in rows:
        if what in ("alert1", "alert2", "cutoff", "reconnect"):
            d = None
        elif what == "implausible":
            d = (d[0], None)  # type: ignore[index]
        out.append((i, m, what, d))
    return out


def state_of_kernel(fleet: Fleet) -> list[tuple[object, ...]]:
    hot, cold = fleet.hot, fleet.cold
    out = []
    for s in range(fleet.n_meters):
        has = bool(hot["has_baseline"][s])
        base = (
            [int(hot[f][s]) for f in ("base_total", "base_t1", "base_t2", "base_t3", "base_t4")]
            if has
            else None
        )
        hold = int(cold["hold_until"][s])
        out.append(
            (
                int(hot["balance"][s]),
                int(hot["charged"][s]),
                int(cold["paid"][s]),
                bool(hot["relay_open"][s]),
                bool(hot["armed1"][s]),
                bool(hot["armed2"][s]),
                K.HOLD_NAMES.get(int(hot["held"][s])),
                base,
                int(hot["last_ts"][s]) if has else None,
                int(hot["used"][s]) if has else None,
                None if hold == INT64_MIN else hold,
            )
        )
    return out


def state_of_reference(meters: list[ref.Meter]) -> list[tuple[object, ...]]:
    out = []
    for m in meters:
        has = m.baseline is not None
        out.append(
            (
                m.balance,
                m.charged,
                m.paid,
                m.relay_open,
                m.armed["alert1"],
                m.armed["alert2"],
                m.held,
                list(m.baseline) if has else None,
                m.last_accepted,
                m.used if has else None,
                max(m.holds.values()) if m.holds else None,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Strategies.

PRICE = st.integers(0, 10_000)  # 0.0001 yuan/kWh
MONEY = st.integers(-3_000_000, 3_000_000)  # micro-yuan, around the thresholds


@st.composite
def plans(draw: st.DrawFn, name: str) -> PlanSpec:
    tou = draw(st.none() | st.tuples(PRICE, PRICE, PRICE, PRICE))
    period = draw(st.sampled_from([PERIOD_NONE, PERIOD_YEAR, PERIOD_MONTH]))
    tiers: tuple[tuple[int | None, int], ...] = ()
    if period != PERIOD_NONE:
        bounds = sorted(set(draw(st.lists(st.integers(1, 20_000), max_size=3))))
        adds = draw(st.lists(PRICE, min_size=len(bounds) + 1, max_size=len(bounds) + 1))
        tiers = tuple(zip([*bounds, None], adds))
    cutoff = draw(MONEY)
    return PlanSpec(
        name=name,
        flat=draw(PRICE),
        tou=tou,
        tier_period=period,
        tiers=tiers,
        alert1=draw(MONEY),
        alert2=draw(MONEY),
        cutoff=cutoff,
        reconnect=cutoff + draw(st.integers(0, 2_000_000)),
        max_kw_centi=draw(st.integers(1, 5_000)),
    )


@st.composite
def tariffs(draw: st.DrawFn, start: date) -> TariffSpec:
    days = draw(st.sets(st.integers(0, 6), min_size=1))
    a = draw(st.integers(0, 24 * 60 - 1))
    b = draw(st.integers(a + 1, 24 * 60))
    holidays = draw(
        st.sets(st.integers(0, 40).map(lambda k: start + timedelta(days=k)), max_size=6)
    )
    n_plans = draw(st.integers(1, 3))
    return TariffSpec(
        timezone=draw(st.sampled_from(ZONES)),
        grace_ns=draw(st.integers(0, 100)) * 3600 * NS,
        holidays=tuple(sorted(holidays)),
        window_days=tuple(sorted(days)),
        window_start_ns=a * 60 * NS,
        window_end_ns=b * 60 * NS,
        plans=tuple(draw(plans(f"p{k}")) for k in range(n_plans)),
    )


STEPS = st.sampled_from([0, 1, 1800, 1800, 1800, 3600, 6 * 3600, 86_400, 7 * 86_400, 40 * 86_400])


@st.composite
def scenarios(
    draw: st.DrawFn, *, ticks: bool = False, backwards_time: bool = False, max_events: int = 60
) -> Scenario:
    year = draw(st.integers(1995, 2035))
    start = date(year, draw(st.integers(1, 12)), draw(st.integers(1, 28)))
    tariff = draw(tariffs(start))
    n = draw(st.integers(1, 4))
    meters = []
    registers = []
    for k in range(n):
        plan = draw(st.sampled_from(tariff.plans))
        meters.append(
            ref.Meter(
                address=f"4401{k:08d}",
                plan=plan,
                initial=draw(MONEY),
                supply=draw(st.integers(0, 9)) == 0,
                protected=draw(st.integers(0, 4)) == 0,
                online=draw(st.integers(0, 5)) != 0,
            )
        )
        near_top = draw(st.booleans())
        registers.append(
            [
                draw(st.integers(99_990_000, 99_999_999))
                if near_top
                else draw(st.integers(0, 5_000_000))
                for _ in range(5)
            ]
        )
    t0 = (start - date(1970, 1, 1)).days * 86_400 * NS + draw(st.integers(0, 86_399)) * NS
    ts = t0
    events = []
    for _ in range(draw(st.integers(0, max_events))):
        step = draw(STEPS) * NS + draw(st.sampled_from([0, 0, 0, 1, 999_999_999]))
        if backwards_time and draw(st.integers(0, 9)) == 0:
            step = -step
        ts += step
        m = draw(st.integers(0, n - 1))
        kind = draw(
            st.sampled_from(["reading"] * 5 + ["payment"] * 2 + (["tick"] if ticks else []))
        )
        if kind == "reading":
            regs = registers[m]
            mode = draw(st.sampled_from(["normal"] * 10 + ["same", "back", "jump", "random"]))
            new = list(regs)
            for r in range(5):
                if mode == "normal":
                    new[r] = (regs[r] + draw(st.integers(0, 100))) % ref.ROLLOVER_AT
                elif mode == "back":
                    new[r] = max(regs[r] - draw(st.integers(0, 50)), 0)
                elif mode == "jump":
                    new[r] = (regs[r] + draw(st.integers(0, 60_000_000))) % ref.ROLLOVER_AT
                elif mode == "random":
                    new[r] = draw(st.integers(0, ref.ROLLOVER_AT - 1))
            if mode in ("normal", "same") or draw(st.booleans()):
                registers[m] = new
            events.append(ref.Event(ts, m, regs=new))
        elif kind == "payment":
            events.append(
                ref.Event(
                    ts,
                    m,
                    pid=f"P{draw(st.integers(0, 15))}-{m}",
                    amount=draw(
                        st.integers(1, 10_000_000)
                        | st.integers(1, 100).map(lambda k: k * 100_000)
                        | st.integers(1, 10_000).map(lambda k: k * 1_000_000)
                    ),
                    status=draw(
                        st.sampled_from(["settled", "settled", "pending", "pending", "failed"])
                    ),
                )
            )
        else:
            events.append(ref.Event(ts, m, status="tick"))
    return Scenario(tariff, meters, events)


def _dec(units: int, decimals: int) -> str:
    sign = "-" if units < 0 else ""
    q, r = divmod(abs(units), 10**decimals)
    return f"{sign}{q}.{r:0{decimals}d}" if decimals else f"{sign}{q}"


def tariff_toml(t: TariffSpec) -> str:
    """A tariffs file that reads back as `t` (thresholds must be whole cents)."""
    days = ", ".join(
        f'"{("mon", "tue", "wed", "thu", "fri", "sat", "sun")[d]}"' for d in t.window_days
    )
    start, end = t.window_start_ns // (60 * NS), t.window_end_ns // (60 * NS)
    lines = [
        f'timezone = "{t.timezone}"',
        f"withholding_grace_hours = {_dec(t.grace_ns // (3600 * 10**6), 3)}",
        "holidays = [" + ", ".join(f'"{d.isoformat()}"' for d in t.holidays) + "]",
        "[cutoff_window]",
        f"days = [{days}]",
        f'start = "{start // 60:02d}:{start % 60:02d}"',
        f'end = "{end // 60:02d}:{end % 60:02d}"',
    ]
    for p in t.plans:
        assert all(v % 10_000 == 0 for v in (p.alert1, p.alert2, p.cutoff, p.reconnect))
        lines += [f"[plans.{p.name}]", f'flat = "{_dec(p.flat, 4)}"']
        if p.tou is not None:
            lines += [f't{k + 1} = "{_dec(v, 4)}"' for k, v in enumerate(p.tou)]
        if p.tier_period != PERIOD_NONE:
            lines.append(f'tier_period = "{"year" if p.tier_period == PERIOD_YEAR else "month"}"')
            blocks = [
                (
                    "{ "
                    + (f'upto_kwh = "{_dec(u, 2)}", ' if u is not None else "")
                    + f'add = "{_dec(a, 4)}" }}'
                )
                for u, a in p.tiers
            ]
            lines.append("tiers = [" + ", ".join(blocks) + "]")
        lines += [
            f'{k} = "{_dec(getattr(p, k) // 10_000, 2)}"'
            for k in ("alert1", "alert2", "cutoff", "reconnect")
        ]
        lines.append(f'max_kw = "{_dec(p.max_kw_centi, 2)}"')
    return "\n".join(lines) + "\n"
