"""Tariffs compiled into arrays, and the clock arithmetic the billing kernels do on them.

A validated tariff (`TariffSpec`, exact integers only) becomes a few int64 arrays: one row per
plan, one row per tier block, the time zone as a table of offset segments, the cut-off window
and the holidays. The kernels read those arrays and never call Python, never look a zone up,
never touch a float. This module does no file I/O: the caller resolves the zone (`zoneinfo`)
and hands its `tzinfo` in.

Units: prices and tier add-ons in 0.0001 yuan/kWh, tier bounds in 0.01 kWh, thresholds in
micro-yuan, `max_kw` held as max_kw x 100 (so the plausibility test stays in integers), times
in epoch nanoseconds, local times as "local nanoseconds" (epoch ns shifted by the zone offset).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, NamedTuple

import numpy as np
from numba import njit

#: Options of every kernel here: compiled once and cached on disk, and without reference counting
#: (NRT): the kernels allocate nothing, and NRT's atomic increments on each array passed between
#: the rule functions made the batch loop ~5x slower. NJIT_INLINE: the rule functions, inlined
#: into each batch loop.
NJIT: dict[str, Any] = {"cache": True, "_nrt": False}
NJIT_INLINE: dict[str, Any] = {**NJIT, "inline": "always"}

NS = 1_000_000_000
DAY_NS = 86_400 * NS
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Billing periods of the tier add-on (阶梯电价).
PERIOD_NONE = 0
PERIOD_YEAR = 1
PERIOD_MONTH = 2
PERIOD_NAMES = {"none": PERIOD_NONE, "year": PERIOD_YEAR, "month": PERIOD_MONTH}

# Columns of the `plans` array (int64 [n_plans, PLAN_COLS]).
P_FLAT = 0  # 0.0001 yuan/kWh
P_T1 = 1  # P_T1..P_T1+3: t1..t4 prices, 0.0001 yuan/kWh (0 when the plan has no TOU prices)
P_TOU = 5  # 1 when the plan prices t1..t4, else 0
P_MAX = 6  # max_kw x 100 (a reading above this average power is implausible)
P_PERIOD = 7  # PERIOD_NONE / PERIOD_YEAR / PERIOD_MONTH
P_ALERT1 = 8  # micro-yuan
P_ALERT2 = 9  # micro-yuan
P_CUTOFF = 10  # micro-yuan
P_RECONNECT = 11  # micro-yuan
P_TIER0 = 12  # first row of this plan's blocks in `tiers`
P_NTIERS = 13  # number of blocks (0: no add-on)
P_DT_FAST = 14  # INT64_MAX // (max_kw x 100): up to this many ns, max_kw*100*dt fits in int64
PLAN_COLS = 16  # two cache lines per plan; column 15 spare

# Columns of the `tiers` array (int64 [n_blocks, 2]).
T_UPTO = 0  # exclusive upper bound of the block, period consumption in 0.01 kWh (INT64_MAX: last)
T_ADD = 1  # add-on price of the block, 0.0001 yuan/kWh

# Columns of the `zone` array (int64 [n_segments, 3]): the zone as segments of constant offset.
Z_UTC = 0  # first UTC instant (epoch ns) of the segment; INT64_MIN for the first segment
Z_OFFSET = 1  # UTC offset in ns (local = utc + offset)
Z_LOCAL = 2  # first naive local time (local ns) read with this segment's offset; INT64_MIN first

# The `window` array (int64 [4]).
W_DAYS = 0  # bit d set: cut-offs permitted on weekday d (0 = Monday ... 6 = Sunday)
W_START = 1  # start of the permitted window, ns after local midnight (inclusive)
W_END = 2  # end, ns after local midnight (exclusive; up to 24:00)
W_GRACE = 3  # withholding grace in ns: a pending hold lasts [ts, ts + grace)

#: Bounds that keep every product of the kernels inside int64 (checked by the TOML reader).
MAX_PRICE = 10_000 * 10_000 - 1  # < 10,000 yuan/kWh
MAX_MAX_KW_CENTI = 10_000_000 * 100  # max_kw <= 10,000,000 kW
MAX_AMOUNT = 10**9 * 10**6  # |threshold| and payments <= 1e9 yuan

#: Years covered by the offset table. Parsers accept timestamps in these years only, which also
#: keeps every local-time sum of the kernels far from int64's ends (1677..2262).
ZONE_FIRST_YEAR = 1900
ZONE_LAST_YEAR = 2200  # exclusive

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class PlanSpec:
    """One validated price plan, exact integers only."""

    name: str
    flat: int  # 0.0001 yuan/kWh
    tou: tuple[int, int, int, int] | None  # t1..t4 in 0.0001 yuan/kWh, or None
    tier_period: int  # PERIOD_*
    tiers: tuple[tuple[int | None, int], ...]  # (upto in 0.01 kWh or None for the last, add)
    alert1: int  # micro-yuan
    alert2: int
    cutoff: int
    reconnect: int
    max_kw_centi: int  # max_kw x 100


@dataclass(frozen=True)
class TariffSpec:
    """A validated tariff file: what `pipeline.tariffs` reads and the kernels' arrays come from."""

    timezone: str
    grace_ns: int  # withholding grace in ns
    holidays: tuple[date, ...]  # local dates on which no cut-off is issued, sorted, unique
    window_days: tuple[int, ...]  # weekdays (0 = Monday) with a permitted cut-off window
    window_start_ns: int  # ns after local midnight, inclusive
    window_end_ns: int  # ns after local midnight, exclusive
    plans: tuple[PlanSpec, ...]

    def plan_index(self) -> dict[str, int]:
        return {p.name: i for i, p in enumerate(self.plans)}


class CompiledTariff(NamedTuple):
    """The arrays the kernels read (see the column constants above)."""

    plans: np.ndarray  # int64 [n_plans, PLAN_COLS]
    tiers: np.ndarray  # int64 [n_blocks, 2]
    zone: np.ndarray  # int64 [n_segments, 3]
    window: np.ndarray  # int64 [4]
    holidays: np.ndarray  # int64 [n], local day numbers (days since 1970-01-01), sorted
    plan_names: tuple[str, ...]
    timezone: str


def zone_segments(
    tz: tzinfo, first_year: int = ZONE_FIRST_YEAR, last_year: int = ZONE_LAST_YEAR
) -> np.ndarray:
    """The zone as segments of constant UTC offset (int64 [n, 3], columns Z_*).

    Sampled once a day between the given years, each change located to the second by
    bisection. A naive local time falls in the segment whose Z_LOCAL it has reached: in a
    repeated hour (clocks back) that is the first occurrence, in a skipped hour the offset
    before the change, as Python reads a naive time with fold=0.
    """
    return _zone_segments_cached(tz, first_year, last_year).copy()


@functools.lru_cache(maxsize=32)
def _zone_segments_cached(tz: tzinfo, first_year: int, last_year: int) -> np.ndarray:
    def offset_s(t: int) -> int:
        off = datetime.fromtimestamp(t, tz).utcoffset()
        assert off is not None
        return _exact_seconds(off)

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    t0 = int((datetime(first_year, 1, 1, tzinfo=UTC) - epoch).total_seconds())
    t1 = int((datetime(last_year, 1, 1, tzinfo=UTC) - epoch).total_seconds())
    starts = [INT64_MIN]
    offsets = [offset_s(t0)]
    prev_t, prev_off = t0, offsets[0]
    t = t0
    while t < t1:
        t = min(t + 86_400, t1)
        off = offset_s(t)
        if off != prev_off:
            lo, hi = prev_t, t  # offset(lo) == prev_off, offset(hi) != prev_off
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if offset_s(mid) == prev_off:
                    lo = mid
                else:
                    hi = mid
            starts.append(hi)
            offsets.append(offset_s(hi))
            prev_off = offsets[-1]
            if prev_off != off:  # two changes within one day: look again from the change
                t = hi
                prev_t = hi
                continue
        prev_t = t
    out = np.empty((len(starts), 3), np.int64)
    for k, (s, o) in enumerate(zip(starts, offsets)):
        out[k, Z_UTC] = INT64_MIN if k == 0 else s * NS
        out[k, Z_OFFSET] = o * NS
        out[k, Z_LOCAL] = INT64_MIN if k == 0 else s * NS + max(offsets[k - 1], o) * NS
    out.setflags(write=False)
    return out


def _exact_seconds(off: timedelta) -> int:
    if off.microseconds:
        raise ValueError(f"UTC offset {off} is not a whole number of seconds")
    return off.days * 86_400 + off.seconds


def compile_tariff(spec: TariffSpec, tz: tzinfo) -> CompiledTariff:
    """The kernels' arrays of a validated tariff; `tz` is the resolved `spec.timezone`."""
    n = len(spec.plans)
    plans = np.zeros((n, PLAN_COLS), np.int64)
    blocks: list[tuple[int, int]] = []
    for i, p in enumerate(spec.plans):
        plans[i, P_FLAT] = p.flat
        if p.tou is not None:
            plans[i, P_TOU] = 1
            for k in range(4):
                plans[i, P_T1 + k] = p.tou[k]
        plans[i, P_MAX] = p.max_kw_centi
        plans[i, P_DT_FAST] = INT64_MAX // p.max_kw_centi if p.max_kw_centi > 0 else -1
        plans[i, P_PERIOD] = p.tier_period
        plans[i, P_ALERT1] = p.alert1
        plans[i, P_ALERT2] = p.alert2
        plans[i, P_CUTOFF] = p.cutoff
        plans[i, P_RECONNECT] = p.reconnect
        plans[i, P_TIER0] = len(blocks)
        plans[i, P_NTIERS] = len(p.tiers)
        for upto, add in p.tiers:
            blocks.append((INT64_MAX if upto is None else upto, add))
    tiers = np.zeros((max(len(blocks), 1), 2), np.int64)
    for k, (upto, add) in enumerate(blocks):
        tiers[k, T_UPTO] = upto
        tiers[k, T_ADD] = add
    window = np.zeros(4, np.int64)
    for d in spec.window_days:
        window[W_DAYS] |= 1 << d
    window[W_START] = spec.window_start_ns
    window[W_END] = spec.window_end_ns
    window[W_GRACE] = spec.grace_ns
    holidays = np.array(
        sorted({(d - date(1970, 1, 1)).days for d in spec.holidays}), dtype=np.int64
    )
    return CompiledTariff(
        plans=plans,
        tiers=tiers,
        zone=zone_segments(tz),
        window=window,
        holidays=holidays,
        plan_names=tuple(p.name for p in spec.plans),
        timezone=spec.timezone,
    )


# ---------------------------------------------------------------------------------------------
# Clock arithmetic in numba: the kernels' only view of calendars and zones.


@njit(**NJIT)
def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    if m <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


@njit(**NJIT)
def civil_from_days(z: int) -> tuple[int, int, int]:
    """(year, month, day) of a day number (days since 1970-01-01)."""
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    return y, m, d


@njit(**NJIT)
def zone_segment(zone: np.ndarray, ts: int) -> int:
    """Index of the segment holding UTC instant `ts` (epoch ns)."""
    lo = 0
    hi = zone.shape[0] - 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if zone[mid, Z_UTC] <= ts:
            lo = mid
        else:
            hi = mid - 1
    return lo


@njit(**NJIT)
def utc_offset(zone: np.ndarray, ts: int) -> int:
    """UTC offset in ns at UTC instant `ts`."""
    return zone[zone_segment(zone, ts), Z_OFFSET]


@njit(**NJIT)
def local_to_utc(zone: np.ndarray, local: int) -> int:
    """Epoch ns of a naive local time (local ns); fold=0 in repeated and skipped hours."""
    lo = 0
    hi = zone.shape[0] - 1
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if zone[mid, Z_LOCAL] <= local:
            lo = mid
        else:
            hi = mid - 1
    return local - zone[lo, Z_OFFSET]


# A clock cache: the caller owns an int64[CLOCK_SIZE] array (start it with new_clock()); the
# kernels keep in it the local day of the last instant they looked at, so that a batch of
# readings from one poll cycle does the calendar arithmetic once. It only ever caches.
C_LO = 0  # cached range of UTC instants [C_LO, C_HI): one local day within one zone segment
C_HI = 1
C_OFFSET = 2  # UTC offset in ns over the range
C_DAY = 3  # local day number
C_YEAR = 4  # local year
C_MONTH_KEY = 5  # year * 12 + month - 1
CLOCK_SIZE = 8


def new_clock() -> np.ndarray:
    """An empty clock cache for the kernels (int64[CLOCK_SIZE])."""
    c = np.zeros(CLOCK_SIZE, np.int64)
    c[C_LO] = 1
    c[C_HI] = 0  # empty range: the first lookup fills it
    return c


@njit(**NJIT)
def clock_fill(clock: np.ndarray, zone: np.ndarray, ts: int) -> None:
    """Make `clock` cover UTC instant `ts`."""
    if clock[C_LO] <= ts < clock[C_HI]:
        return
    k = zone_segment(zone, ts)
    off = zone[k, Z_OFFSET]
    local = ts + off
    day = local // DAY_NS
    lo = day * DAY_NS - off
    lo = max(lo, zone[k, Z_UTC])
    hi = (day + 1) * DAY_NS - off
    if k + 1 < zone.shape[0] and zone[k + 1, Z_UTC] < hi:
        hi = zone[k + 1, Z_UTC]
    y, m, _d = civil_from_days(day)
    clock[C_LO] = lo
    clock[C_HI] = hi
    clock[C_OFFSET] = off
    clock[C_DAY] = day
    clock[C_YEAR] = y
    clock[C_MONTH_KEY] = y * 12 + m - 1


@njit(**NJIT)
def period_key(clock: np.ndarray, zone: np.ndarray, period: int, ts: int) -> int:
    """The billing-period key of UTC instant `ts`: local year, year*12+month-1, or 0."""
    if period == PERIOD_NONE:
        return 0
    clock_fill(clock, zone, ts)
    if period == PERIOD_YEAR:
        return clock[C_YEAR]
    return clock[C_MONTH_KEY]
