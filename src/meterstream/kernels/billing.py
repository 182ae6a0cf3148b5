"""Prepaid billing and cost-control (费控) kernels: charges, payments, control decisions.

The rules (docs/billing.md) live in three numba functions, each the single implementation of
its rule: `bill_reading` (one reading against a meter's registers), `apply_payment` (one
payment row against the meter and the ledger) and `decide` (alerts, cut-off, reconnect after
an event). The batch kernels below (`apply_readings`, `apply_payments`, `decide_controls`,
`replay_events`) are loops around them, so the live pipeline and `meterstream replay` cannot
drift apart. They write their results into arrays the caller provides, allocate nothing, and
never do I/O or touch a float: money is int64 micro-yuan, energy int64 0.01 kWh.

Arguments, everywhere in the same order: the fleet state (`hot`, `cold`, `ledger`, see
kernels/layout.py), the compiled tariff (`plans`, `tiers`, `zone`, `window`, `holidays`, see
kernels/tariffs.py), `online` (uint8 per terminal), `clock` (an int64 cache from
`tariffs.new_clock()`), then the batch.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from meterstream.kernels.layout import (
    L_EXPIRY,
    L_NEXT,
    L_SLOT,
    L_STATE,
    LEDGER_FAILED,
    LEDGER_PENDING,
    LEDGER_SETTLED,
    LEDGER_UNSEEN,
    REGISTER_RANGE,
    Fleet,
)
from meterstream.kernels.tariffs import (
    C_DAY,
    C_HI,
    C_LO,
    C_MONTH_KEY,
    C_OFFSET,
    C_YEAR,
    DAY_NS,
    INT64_MIN,
    NJIT,
    NJIT_INLINE,
    NS,
    P_ALERT1,
    P_ALERT2,
    P_CUTOFF,
    P_DT_FAST,
    P_FLAT,
    P_MAX,
    P_NTIERS,
    P_PERIOD,
    P_RECONNECT,
    P_T1,
    P_TIER0,
    P_TOU,
    PERIOD_YEAR,
    T_ADD,
    T_UPTO,
    W_DAYS,
    W_END,
    W_GRACE,
    W_START,
    CompiledTariff,
    clock_fill,
    new_clock,
    period_key,
)

# Outcome of a reading (`outcome` output of apply_readings, `code` of replay_events).
OUT_ACCEPTED = 0  # billed; detail: mask of the registers that rolled over (0: none)
OUT_BASELINE = 1  # the meter's first reading: baselines set, nothing charged
OUT_BACKWARDS = 2  # a register went backwards: not billed; detail: mask of those registers
OUT_IMPLAUSIBLE = 3  # above the plan's max_kw: not billed; detail: d_total (0.01 kWh)
OUT_STALE = 4  # delivered late, inside an advance billed already: nothing to do

# Result of a payment row.
PAY_APPLIED = 10  # settled: balance += amount
PAY_DUPLICATE = 11  # the id was settled before: ignored
PAY_HOLD = 12  # pending: a withholding hold started
PAY_FAILED = 13  # failed: the id's hold (if any) ended, nothing paid
PAY_IGNORED = 14  # a repeated pending or failed row: nothing changes

# Status of a payment row.
STATUS_SETTLED = 0
STATUS_PENDING = 1
STATUS_FAILED = 2
STATUS_NAMES = {"settled": STATUS_SETTLED, "pending": STATUS_PENDING, "failed": STATUS_FAILED}

# Decision bits (`action` outputs, int16): commands, alerts, and a newly held cut-off whose
# reason (HOLD_*) sits in bits 8..10.
ACT_CUTOFF = 1
ACT_RECONNECT = 2
ACT_ALERT1 = 4
ACT_ALERT2 = 8
ACT_HELD = 16
HELD_SHIFT = 8

# Why a due cut-off is held, in the order they are checked.
HOLD_PROTECTED = 1  # keep-power customer (保电)
HOLD_HOLIDAY = 2  # local date is a listed holiday
HOLD_WINDOW = 3  # local time outside the permitted cut-off window
HOLD_WITHHOLDING = 4  # a bank withholding (代扣) for the meter is pending
HOLD_OFFLINE = 5  # the meter's terminal is offline: the cut-off is queued
HOLD_NAMES = {
    HOLD_PROTECTED: "protected",
    HOLD_HOLIDAY: "holiday",
    HOLD_WINDOW: "outside_window",
    HOLD_WITHHOLDING: "withholding_pending",
    HOLD_OFFLINE: "terminal_offline",
}

# Register bits of a rollover / backwards mask.
REGISTER_NAMES = ("total", "t1", "t2", "t3", "t4")

HALF_RANGE = REGISTER_RANGE // 2
D_FAST = (2**63 - 1) // (3600 * NS)  # d_total up to this: d_total * 3600e9 fits in int64
PREFETCH = 64  # readings ahead whose meter record is prefetched (1 M meters do not fit a cache)


@intrinsic
def _prefetch(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    """Hint the CPU to fetch arr[idx] into the cache (llvm.prefetch, read, high locality)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        builder.call(
            fn,
            [
                builder.bitcast(ptr, i8p),
                ir.Constant(i32, 0),
                ir.Constant(i32, 3),
                ir.Constant(i32, 1),
            ],
        )
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# The rules, one function each.


@njit(**NJIT)
def implausible(d_total: int, dt: int, max_centi_kw: int) -> bool:
    """d_total * 3600 > max_kw * 100 * seconds, exactly (dt in ns; max_centi_kw = max_kw*100).

    Evaluated as d_total*3600*1e9 > max_centi_kw*dt without overflowing int64. A reading not
    later than the last accepted one (dt <= 0) is implausible unless it adds nothing at dt = 0.
    A plan without a limit (max_centi_kw <= 0) never is.
    """
    if max_centi_kw <= 0:
        return False
    if dt < 0:
        return True
    a = d_total * 3600
    s = dt // NS
    r = dt - s * NS
    if s > a // max_centi_kw:
        return False
    d = a - max_centi_kw * s
    if d == 0:
        return False
    if d >= max_centi_kw:
        return True
    return d * NS > max_centi_kw * r


@njit(**NJIT_INLINE)
def tier_addon(tiers: np.ndarray, first: int, count: int, used: int, d_total: int) -> int:
    """Add-on of `d_total` consumed on top of `used` in the period: each part times its block."""
    add = 0
    u = used
    rem = d_total
    for j in range(first, first + count):
        upto = tiers[j, T_UPTO]
        if u < upto:
            room = upto - u
            part = min(room, rem)
            add += part * tiers[j, T_ADD]
            u += part
            rem -= part
            if rem == 0:
                break
    return add


@njit(**NJIT)
def _tier_addon(tiers: np.ndarray, first: int, count: int, used: int, d_total: int) -> int:
    """`tier_addon` for a reading that reaches past the period's first block (not inlined)."""
    return tier_addon(tiers, first, count, used, d_total)


@njit(**NJIT)
def _first_reading(
    hot: np.ndarray,
    plans: np.ndarray,
    zone: np.ndarray,
    clock: np.ndarray,
    s: int,
    ts: int,
    total: int,
    t1: int,
    t2: int,
    t3: int,
    t4: int,
) -> None:
    """A meter's first reading: it sets the baselines and the billing period, charges nothing."""
    r = hot[s]
    r.base_total = total
    r.base_t1 = t1
    r.base_t2 = t2
    r.base_t3 = t3
    r.base_t4 = t4
    r.last_ts = ts
    r.has_baseline = 1
    r.period = period_key(clock, zone, plans[r.plan, P_PERIOD], ts)
    r.used = 0


@njit(**NJIT)
def _wrap(d: int, bit: int, roll: int, back: int) -> tuple[int, int, int]:
    """A register's advance d (may be negative): a rollover past 999999.99 or a step back."""
    if d < 0:
        if -d >= HALF_RANGE:
            return d + REGISTER_RANGE, roll | bit, back
        return d, roll, back | bit
    return d, roll, back


@njit(**NJIT)
def _wrap_all(
    d0: int, d1: int, d2: int, d3: int, d4: int
) -> tuple[int, int, int, int, int, int, int]:
    """(d0..d4 after rollovers, rollover mask, backwards mask) when some register went down."""
    d0, roll, back = _wrap(d0, 1, 0, 0)
    d1, roll, back = _wrap(d1, 2, roll, back)
    d2, roll, back = _wrap(d2, 4, roll, back)
    d3, roll, back = _wrap(d3, 8, roll, back)
    d4, roll, back = _wrap(d4, 16, roll, back)
    return d0, d1, d2, d3, d4, roll, back


@njit(**NJIT)
def _count_anomaly(cold: np.ndarray, s: int, ts: int, outcome: int) -> None:
    """Count a reading that was not billed (or rolled over) and remember when it was seen."""
    c = cold[s]
    if outcome == OUT_BACKWARDS:
        c.n_backwards += 1
    elif outcome == OUT_IMPLAUSIBLE:
        c.n_implausible += 1
    else:
        c.n_rollover += 1
        return
    c.last_seen = max(c.last_seen, ts)


@njit(**NJIT_INLINE)
def _price(plans: np.ndarray, tiers: np.ndarray, p: int, used: int, d0: int, d1: int, d2: int,
           d3: int, d4: int) -> int:
    """The charge (micro-yuan) of an advance d0..d4 (0.01 kWh) on plan p with `used` so far in
    the period: exact integers."""
    # Time-of-use prices when the plan has them and the tariff registers moved, else flat.
    # Chosen without a branch: plans are mixed at random across a fleet.
    tou = (
        d1 * plans[p, P_T1]
        + d2 * plans[p, P_T1 + 1]
        + d3 * plans[p, P_T1 + 2]
        + d4 * plans[p, P_T1 + 3]
    )
    flat = d0 * plans[p, P_FLAT]
    use_tou = plans[p, P_TOU] & np.int64(d1 + d2 + d3 + d4 > 0)
    charge = flat + use_tou * (tou - flat)
    n_tiers = plans[p, P_NTIERS]
    if n_tiers > 0:
        j = plans[p, P_TIER0]
        if used + d0 <= tiers[j, T_UPTO]:  # all of it inside the first block: one product
            charge += d0 * tiers[j, T_ADD]
        else:
            charge += _tier_addon(tiers, j, n_tiers, used, d0)
    return charge


@njit(**NJIT_INLINE)
def bill_reading(
    hot: np.ndarray,
    cold: np.ndarray,
    plans: np.ndarray,
    tiers: np.ndarray,
    zone: np.ndarray,
    clock: np.ndarray,
    s: int,
    ts: int,
    total: int,
    t1: int,
    t2: int,
    t3: int,
    t4: int,
) -> tuple[int, int, int, int]:
    """Apply one reading of meter slot `s` at `ts`: (outcome, charge, detail_a, detail_b).

    detail_a is the rollover mask (accepted), the backwards mask, or d_total (implausible, then
    detail_b is the time since the last accepted reading in ns). Registers in 0.01 kWh. The
    common case (an accepted reading) runs inline; the rare ones call out of line.
    """
    r = hot[s]
    if r.has_baseline == 0:
        _first_reading(hot, plans, zone, clock, s, ts, total, t1, t2, t3, t4)
        return OUT_BASELINE, 0, 0, 0
    p = r.plan
    d0 = np.int64(total) - r.base_total
    d1 = np.int64(t1) - r.base_t1
    d2 = np.int64(t2) - r.base_t2
    d3 = np.int64(t3) - r.base_t3
    d4 = np.int64(t4) - r.base_t4
    roll = 0
    if (d0 | d1 | d2 | d3 | d4) < 0:  # some register is lower than its baseline
        d0, d1, d2, d3, d4, roll, back = _wrap_all(d0, d1, d2, d3, d4)
        if back != 0:
            _count_anomaly(cold, s, ts, OUT_BACKWARDS)
            return OUT_BACKWARDS, 0, back, 0
    dt = ts - r.last_ts
    max_centi_kw = plans[p, P_MAX]
    if 0 <= dt <= plans[p, P_DT_FAST] and d0 <= D_FAST:  # both products fit in int64
        bad = d0 * (3600 * NS) > max_centi_kw * dt
    else:
        bad = implausible(d0, dt, max_centi_kw)
    if bad:
        _count_anomaly(cold, s, ts, OUT_IMPLAUSIBLE)
        return OUT_IMPLAUSIBLE, 0, d0, dt
    used = r.used
    period = plans[p, P_PERIOD]
    if period != 0:
        if not (clock[C_LO] <= ts < clock[C_HI]):
            clock_fill(clock, zone, ts)
        key = clock[C_YEAR] if period == PERIOD_YEAR else clock[C_MONTH_KEY]
        if key != r.period:
            r.period = key
            used = 0
    charge = 0
    if r.supply == 0:
        charge = _price(plans, tiers, p, used, d0, d1, d2, d3, d4)
        r.balance -= charge
        r.charged += charge
    r.used = used + d0
    r.base_total = total
    r.base_t1 = t1
    r.base_t2 = t2
    r.base_t3 = t3
    r.base_t4 = t4
    r.last_ts = ts
    if roll != 0:
        _count_anomaly(cold, s, ts, OUT_ACCEPTED)
    return OUT_ACCEPTED, charge, roll, 0


@njit(**NJIT_INLINE)
def _recompute_hold(cold: np.ndarray, ledger: np.ndarray, s: int) -> None:
    """hold_until := the latest expiry among the meter's still pending payments."""
    until = INT64_MIN
    k = cold[s].pay_head
    while k >= 0:
        if ledger[k, L_STATE] == LEDGER_PENDING and ledger[k, L_EXPIRY] > until:
            until = ledger[k, L_EXPIRY]
        k = ledger[k, L_NEXT]
    cold[s].hold_until = until


@njit(**NJIT_INLINE)
def apply_payment(
    hot: np.ndarray,
    cold: np.ndarray,
    ledger: np.ndarray,
    window: np.ndarray,
    s: int,
    ts: int,
    key: int,
    amount: int,
    status: int,
) -> int:
    """Apply one payment row (ledger key `key`, amount in micro-yuan) to meter `s`: PAY_*.

    settled: applied once per id (a settled id is never applied again: PAY_DUPLICATE), and it
    ends the id's pending hold. pending: starts a hold on the meter until ts + grace (or a
    settled / failed row of the id). failed: ends the id's hold, pays nothing.
    """
    state = ledger[key, L_STATE]
    if state == LEDGER_SETTLED:
        return PAY_DUPLICATE
    c = cold[s]
    if state == LEDGER_UNSEEN:
        ledger[key, L_SLOT] = s
        ledger[key, L_NEXT] = c.pay_head
        c.pay_head = key
    if status == STATUS_SETTLED:
        hot[s].balance += amount
        c.paid += amount
        ledger[key, L_STATE] = LEDGER_SETTLED
        if state == LEDGER_PENDING:
            _recompute_hold(cold, ledger, s)
        return PAY_APPLIED
    if status == STATUS_PENDING:
        if state == LEDGER_PENDING:
            return PAY_IGNORED
        expiry = ts + window[W_GRACE]
        ledger[key, L_STATE] = LEDGER_PENDING
        ledger[key, L_EXPIRY] = expiry
        c.hold_until = max(c.hold_until, expiry)
        return PAY_HOLD
    if state == LEDGER_FAILED:
        return PAY_IGNORED
    ledger[key, L_STATE] = LEDGER_FAILED
    if state == LEDGER_PENDING:
        _recompute_hold(cold, ledger, s)
    return PAY_FAILED


@njit(**NJIT_INLINE)
def _is_holiday(holidays: np.ndarray, day: int) -> bool:
    lo = 0
    hi = holidays.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if holidays[mid] < day:
            lo = mid + 1
        else:
            hi = mid
    return lo < holidays.shape[0] and holidays[lo] == day


@njit(**NJIT_INLINE)
def hold_reason(
    hot: np.ndarray,
    cold: np.ndarray,
    zone: np.ndarray,
    window: np.ndarray,
    holidays: np.ndarray,
    online: np.ndarray,
    clock: np.ndarray,
    s: int,
    ts: int,
) -> int:
    """Why a cut-off of meter `s` may not be issued at `ts` (HOLD_*), or 0 if it may."""
    if hot[s].protected != 0:
        return HOLD_PROTECTED
    clock_fill(clock, zone, ts)
    day = clock[C_DAY]
    tod = ts + clock[C_OFFSET] - day * DAY_NS
    if _is_holiday(holidays, day):
        return HOLD_HOLIDAY
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    if (window[W_DAYS] >> weekday) & 1 == 0 or tod < window[W_START] or tod >= window[W_END]:
        return HOLD_WINDOW
    if ts < cold[s].hold_until:
        return HOLD_WITHHOLDING
    if online[cold[s].terminal] == 0:
        return HOLD_OFFLINE
    return 0


@njit(**NJIT_INLINE)
def decide(
    hot: np.ndarray,
    cold: np.ndarray,
    plans: np.ndarray,
    zone: np.ndarray,
    window: np.ndarray,
    holidays: np.ndarray,
    online: np.ndarray,
    clock: np.ndarray,
    s: int,
    ts: int,
) -> int:
    """Decide for meter `s` at `ts` after an event: the ACT_* bits (commands take effect).

    Alerts fire when the balance falls from >= to < their threshold and re-arm when it is back
    at or above it. A closed relay below the cut-off threshold is cut off unless held (then
    ACT_HELD is reported once per new reason); an open relay at or above the reconnect
    threshold is reconnected, at any time. Supply meters are never decided on.
    """
    r = hot[s]
    if r.supply != 0:
        return 0
    p = r.plan
    bal = r.balance
    # An alert fires when armed and the balance is below it; afterwards it is armed exactly
    # when the balance is at or above it. No branches: balances are anywhere across a fleet.
    at1 = np.int64(bal >= plans[p, P_ALERT1])
    at2 = np.int64(bal >= plans[p, P_ALERT2])
    act = ACT_ALERT1 * (r.armed1 & (1 - at1)) | ACT_ALERT2 * (r.armed2 & (1 - at2))
    r.armed1 = at1
    r.armed2 = at2
    if r.relay_open == 0:
        if bal < plans[p, P_CUTOFF]:
            act |= _cutoff_due(hot, cold, zone, window, holidays, online, clock, s, ts)
        else:
            r.held = 0
    elif bal >= plans[p, P_RECONNECT]:
        act |= ACT_RECONNECT
        r.relay_open = 0
    return act


@njit(**NJIT)
def _cutoff_due(
    hot: np.ndarray,
    cold: np.ndarray,
    zone: np.ndarray,
    window: np.ndarray,
    holidays: np.ndarray,
    online: np.ndarray,
    clock: np.ndarray,
    s: int,
    ts: int,
) -> int:
    """A closed relay below the cut-off threshold: cut off now (ACT_CUTOFF), or hold it and
    report the reason once (ACT_HELD | reason << HELD_SHIFT), or 0 when held for the same
    reason as before."""
    r = hot[s]
    reason = hold_reason(hot, cold, zone, window, holidays, online, clock, s, ts)
    if reason == 0:
        r.relay_open = 1
        r.held = 0
        return ACT_CUTOFF
    if r.held != reason:
        r.held = reason
        return ACT_HELD | (reason << HELD_SHIFT)
    return 0


# ---------------------------------------------------------------------------------------------
# Batch kernels: loops around the rules.


@njit(**NJIT)
def apply_readings(
    hot: np.ndarray,
    cold: np.ndarray,
    plans: np.ndarray,
    tiers: np.ndarray,
    zone: np.ndarray,
    window: np.ndarray,
    holidays: np.ndarray,
    online: np.ndarray,
    clock: np.ndarray,
    slot: np.ndarray,
    ts: np.ndarray,
    total: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    t3: np.ndarray,
    t4: np.ndarray,
    charge: np.ndarray,
    outcome: np.ndarray,
    detail: np.ndarray,
    action: np.ndarray,
) -> None:
    """Apply a batch of readings in order, deciding for each meter after its reading.

    Per reading i: charge[i] (micro-yuan), outcome[i] (OUT_*), detail[i] (see OUT_*) and
    action[i] (ACT_* bits, int16).
    """
    n = slot.shape[0]
    for i in range(n):
        if i + PREFETCH < n:
            _prefetch(hot, slot[i + PREFETCH])  # type: ignore[call-arg]
        # Slots are 0 .. n_meters-1: unsigned, so indexing skips the negative-index wraparound.
        s = np.uint64(slot[i])
        t = ts[i]
        o, c, a, _b = bill_reading(
            hot, cold, plans, tiers, zone, clock, s, t, total[i], t1[i], t2[i], t3[i], t4[i]
        )
        # Decide before writing the outputs: numba cannot tell that the output arrays do not
        # alias the meter record, so a store to them first would force decide to reload it.
        act = decide(hot, cold, plans, zone, window, holidays, online, clock, s, t)
        charge[i] = c
        outcome[i] = o
        detail[i] = a
        action[i] = act


@njit(**NJIT_INLINE)
def _set_first(first: np.ndarray, s: int, ts: int, total: int, t1: int, t2: int, t3: int,
               t4: int) -> None:
    """Meter `s`'s earliest reading is now this one."""
    f = first[s]
    f.ts = ts
    f.total = total
    f.t1 = t1
    f.t2 = t2
    f.t3 = t3
    f.t4 = t4


@njit(**NJIT)
def backfill_reading(
    hot: np.ndarray,
    cold: np.ndarray,
    first: np.ndarray,
    plans: np.ndarray,
    tiers: np.ndarray,
    zone: np.ndarray,
    clock: np.ndarray,
    s: int,
    ts: int,
    total: int,
    t1: int,
    t2: int,
    t3: int,
    t4: int,
) -> tuple[int, int, int]:
    """A reading of meter `s` delivered after newer ones: (outcome, charge, detail).

    Older than the meter's earliest reading (`first`), it starts an advance nobody billed: the
    advance to that reading is billed now and the reading becomes the earliest, which is what
    time order (replay) bills. Charges are exact integers, linear in the advance, and the tier
    add-on depends only on the period's total, so the order does not change the sum when both
    readings fall in the meter's current billing period; an advance of an earlier period is
    priced from the start of its tier blocks. A reading between the earliest and the last lies
    inside an advance billed already (OUT_STALE). When time order would refuse the earliest
    reading against this one (backwards, or implausible), this one takes its place as the
    baseline if nothing was billed since; otherwise it is only counted."""
    r = hot[s]
    f = first[s]
    if r.has_baseline == 0 or ts >= f.ts:
        return OUT_STALE, 0, 0
    d0 = f.total - np.int64(total)
    d1 = f.t1 - np.int64(t1)
    d2 = f.t2 - np.int64(t2)
    d3 = f.t3 - np.int64(t3)
    d4 = f.t4 - np.int64(t4)
    roll = 0
    back = 0
    if (d0 | d1 | d2 | d3 | d4) < 0:
        d0, d1, d2, d3, d4, roll, back = _wrap_all(d0, d1, d2, d3, d4)
    if back != 0 or implausible(d0, f.ts - ts, plans[r.plan, P_MAX]):
        o = OUT_BACKWARDS if back != 0 else OUT_IMPLAUSIBLE
        _count_anomaly(cold, s, f.ts, o)
        if r.last_ts == f.ts:  # the earliest is still the baseline: nothing billed from it
            r.base_total = total
            r.base_t1 = t1
            r.base_t2 = t2
            r.base_t3 = t3
            r.base_t4 = t4
            r.last_ts = ts
            _set_first(first, s, ts, total, t1, t2, t3, t4)
        return o, 0, back if back != 0 else d0
    charge = 0
    key = period_key(clock, zone, plans[r.plan, P_PERIOD], f.ts)
    same = key == r.period
    if r.supply == 0:
        charge = _price(plans, tiers, r.plan, r.used if same else 0, d0, d1, d2, d3, d4)
        r.balance -= charge
        r.charged += charge
    if same:
        r.used += d0
    _set_first(first, s, ts, total, t1, t2, t3, t4)
    if roll != 0:
        _count_anomaly(cold, s, f.ts, OUT_ACCEPTED)
    return OUT_ACCEPTED, charge, roll


@njit(**NJIT)
def apply_late_readings(
    hot: np.ndarray,
    cold: np.ndarray,
    first: np.ndarray,
    plans: np.ndarray,
    tiers: np.ndarray,
    zone: np.ndarray,
    window: np.ndarray,
    holidays: np.ndarray,
    online: np.ndarray,
    clock: np.ndarray,
    slot: np.ndarray,
    ts: np.ndarray,
    total: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    t3: np.ndarray,
    t4: np.ndarray,
    charge: np.ndarray,
    outcome: np.ndarray,
    detail: np.ndarray,
    action: np.ndarray,
) -> None:
    """`apply_readings` for a batch delivered after a newer one of its terminal: backfill_reading
    for each reading; a billed one is decided on at the meter's newest time."""
    for i in range(slot.shape[0]):
        s = np.uint64(slot[i])
        o, c, a = backfill_reading(hot, cold, first, plans, tiers, zone, clock, s, ts[i],
                                   total[i], t1[i], t2[i], t3[i], t4[i])
        act = 0
        if o == OUT_ACCEPTED:
            act = decide(hot, cold, plans, zone, window, holidays, online, clock, s,
                         hot[s].last_ts)
        charge[i] = c
        outcome[i] = o
        detail[i] = a
        action[i] = act


@njit(**NJIT)
def apply_payments(
    hot: np.ndarray,
    cold: np.ndarray,
    ledger: np.ndarray,
    plans: np.ndarray,
    zone: np.ndarray,
    window: np.ndarray,
    holidays: np.ndarray,
    online: np.ndarray,
    clock: np.ndarray,
    slot: np.ndarray,
    ts: np.ndarray,
    key: np.ndarray,
    amount: np.ndarray,
    status: np.ndarray,
    result: np.ndarray,
    action: np.ndarray,
) -> None:
    """Apply a batch of payment rows in order (result[i]: PAY_*), deciding after each."""
    for i in range(slot.shape[0]):
        s = slot[i]
        result[i] = apply_payment(hot, cold, ledger, window, s, ts[i], key[i], amount[i], status[i])
        action[i] = decide(hot, cold, plans, zone, window, holidays, online, clock, s, ts[i])


@njit(**NJIT)
def decide_controls(
    hot: np.ndarray,
    cold: np.ndarray,
    plans: np.ndarray,
    zone: np.ndarray,
    window: np.ndarray,
    holidays: np.ndarray,
    online: np.ndarray,
    clock: np.ndarray,
    slots: np.ndarray,
    now: int,
    action: np.ndarray,
) -> None:
    """Decide for the given meters at time `now` (e.g. when a cut-off window opens)."""
    for i in range(slots.shape[0]):
        action[i] = decide(hot, cold, plans, zone, window, holidays, online, clock, slots[i], now)


@njit(**NJIT)
def replay_events(
    hot: np.ndarray,
    cold: np.ndarray,
    ledger: np.ndarray,
    plans: np.ndarray,
    tiers: np.ndarray,
    zone: np.ndarray,
    window: np.ndarray,
    holidays: np.ndarray,
    online: np.ndarray,
    clock: np.ndarray,
    order: np.ndarray,
    n_pay: int,
    p_slot: np.ndarray,
    p_ts: np.ndarray,
    p_key: np.ndarray,
    p_amount: np.ndarray,
    p_status: np.ndarray,
    r_slot: np.ndarray,
    r_ts: np.ndarray,
    r_total: np.ndarray,
    r_t1: np.ndarray,
    r_t2: np.ndarray,
    r_t3: np.ndarray,
    r_t4: np.ndarray,
    start: int,
    stop: int,
    code: np.ndarray,
    detail_a: np.ndarray,
    detail_b: np.ndarray,
    action: np.ndarray,
    balance: np.ndarray,
) -> None:
    """Replay events order[start:stop] (e < n_pay: payment row e, else reading row e - n_pay).

    For the j-th event of the range: code (OUT_* or PAY_*), details, action (ACT_*) and the
    meter's balance after the event, written at j - start.
    """
    for j in range(start, stop):
        e = order[j]
        o = j - start
        if e < n_pay:
            s = p_slot[e]
            t = p_ts[e]
            code[o] = apply_payment(
                hot, cold, ledger, window, s, t, p_key[e], p_amount[e], p_status[e]
            )
            detail_a[o] = 0
            detail_b[o] = 0
        else:
            k = e - n_pay
            s = r_slot[k]
            t = r_ts[k]
            out, _c, a, b = bill_reading(
                hot,
                cold,
                plans,
                tiers,
                zone,
                clock,
                s,
                t,
                r_total[k],
                r_t1[k],
                r_t2[k],
                r_t3[k],
                r_t4[k],
            )
            code[o] = out
            detail_a[o] = a
            detail_b[o] = b
        action[o] = decide(hot, cold, plans, zone, window, holidays, online, clock, s, t)
        balance[o] = hot[s].balance


# ---------------------------------------------------------------------------------------------
# Thin Python conveniences over the kernels (allocate outputs, unpack fleet and tariff).


class Billing:
    """A fleet with its compiled tariff: calls the kernels with the right arrays."""

    def __init__(self, fleet: Fleet, tariff: CompiledTariff) -> None:
        self.fleet = fleet
        self.tariff = tariff
        self.clock = new_clock()

    def apply_readings(
        self,
        slot: np.ndarray,
        ts: np.ndarray,
        total: np.ndarray,
        t1: np.ndarray,
        t2: np.ndarray,
        t3: np.ndarray,
        t4: np.ndarray,
        *,
        late: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(charge, outcome, detail, action) of a batch of readings; `late`: a batch delivered
        after a newer one of its terminal (apply_late_readings). Keeps `Fleet.first`: a
        meter's first reading is recorded there."""
        n = slot.shape[0]
        charge = np.zeros(n, np.int64)
        outcome = np.zeros(n, np.int8)
        detail = np.zeros(n, np.int64)
        action = np.zeros(n, np.int16)
        f, t = self.fleet, self.tariff
        rest = (t.plans, t.tiers, t.zone, t.window, t.holidays, f.terminal_online, self.clock,
                slot, ts, total, t1, t2, t3, t4, charge, outcome, detail, action)
        if late:
            apply_late_readings(f.hot, f.cold, f.first, *rest)
        else:
            apply_readings(f.hot, f.cold, *rest)
            new = outcome == OUT_BASELINE  # a meter's first reading: its earliest so far
            if new.any():
                at = slot[new]
                for name, v in (("ts", ts), ("total", total), ("t1", t1), ("t2", t2),
                                ("t3", t3), ("t4", t4)):
                    f.first[name][at] = v[new]
        return charge, outcome, detail, action

    def apply_payments(
        self,
        slot: np.ndarray,
        ts: np.ndarray,
        payment_ids: list[str],
        amount: np.ndarray,
        status: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(result, action) of a batch of payment rows (ids are mapped to ledger keys here)."""
        f, t = self.fleet, self.tariff
        key = np.array([f.payment_key(pid, int(s)) for pid, s in zip(payment_ids, slot)], np.int64)
        n = slot.shape[0]
        result = np.zeros(n, np.int8)
        action = np.zeros(n, np.int16)
        apply_payments(
            f.hot,
            f.cold,
            f.ledger,
            t.plans,
            t.zone,
            t.window,
            t.holidays,
            f.terminal_online,
            self.clock,
            slot,
            ts,
            key,
            amount,
            status,
            result,
            action,
        )
        return result, action

    def decide_controls(self, slots: np.ndarray, now: int) -> np.ndarray:
        """ACT_* bits for each of `slots`, decided at `now`."""
        f, t = self.fleet, self.tariff
        action = np.zeros(slots.shape[0], np.int16)
        decide_controls(
            f.hot,
            f.cold,
            t.plans,
            t.zone,
            t.window,
            t.holidays,
            f.terminal_online,
            self.clock,
            slots,
            now,
            action,
        )
        return action
