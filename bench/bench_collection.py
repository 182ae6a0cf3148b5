"""Collection kernels at fleet scale: dropout detection and KPIs on 10,000 terminals / 1,000,000 meters.

Each figure has a baseline measured in the same run: a trivial numba loop over the same arrays
doing the least the rule needs (offline = link down or k cycles late; per-area sums of register
steps and balances), so the ratio says what the full rules (alarm states, hysteresis, the ring,
freshness and wrap checks) cost over touching the data at all. Also the per-batch cost of
apply_collection_batch called from Python, the way an agent calls it. Figures, not asserts.

Run: .venv/bin/python bench/bench_collection.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median_rate, report
from meterstream.kernels import collection as C

TERMINALS = 10_000
METERS_PER_TERMINAL = 100
TERMINALS_PER_AREA = 5
METERS = TERMINALS * METERS_PER_TERMINAL
AREAS = TERMINALS // TERMINALS_PER_AREA
S = 1_000_000_000
CYCLE = 15 * 60 * S
#: 2024-03-01 00:00 Asia/Shanghai
MIDNIGHT = 19_783 * C.DAY_NS - C.SHANGHAI_OFFSET_NS
RULES = C.CollectionRules()
STORM_SHARE = 0.3
REPEATS = 7


def build(rng: np.random.Generator) -> C.CollectionState:
    """The fleet, with two days of complete reads (day-end registers) already applied."""
    term_area = np.repeat(np.arange(AREAS, dtype=np.int32), TERMINALS_PER_AREA)
    meter_terminal = np.repeat(np.arange(TERMINALS, dtype=np.int32), METERS_PER_TERMINAL)
    meter_area = term_area[meter_terminal]
    # the county's mix: ~0.5 % 专变, one 公变 supply meter per area, the rest 低压
    meter_class = np.full(METERS, C.CLASS_LOWVOLTAGE, np.int8)
    meter_class[rng.random(METERS) < 0.005] = C.CLASS_DEDICATED
    meter_role = np.zeros(METERS, np.int8)
    supply = np.arange(AREAS) * TERMINALS_PER_AREA * METERS_PER_TERMINAL
    meter_role[supply] = C.ROLE_SUPPLY
    meter_class[supply] = C.CLASS_PUBLIC
    state = C.new_collection_state(
        term_area,
        np.full(TERMINALS, CYCLE),
        meter_terminal,
        meter_area,
        meter_class,
        meter_role,
        AREAS,
        start_ns=MIDNIGHT - C.DAY_NS,
    )
    registers = rng.integers(0, 50_000_000, METERS)
    for day in (0, 1):
        when = MIDNIGHT + day * C.DAY_NS - 20 * 60 * S
        registers += rng.integers(0, 2_000, METERS)
        for t in range(TERMINALS):  # cycles staggered 100 ms apart: 23:40 .. 23:57
            lo, hi = t * METERS_PER_TERMINAL, (t + 1) * METERS_PER_TERMINAL
            outcome = (rng.random(METERS_PER_TERMINAL) < 0.005).astype(np.int8)  # 0.5 % fail
            cycle = when + t * S // 10
            state.apply_collection_batch(
                t,
                cycle,
                np.arange(lo, hi, dtype=np.int32),
                np.full(METERS_PER_TERMINAL, cycle, np.int64),
                outcome,
                registers[lo:hi],
                RULES,
            )
    return state


@njit(cache=True)
def baseline_dropouts(
    now_ns: int,
    late_ns: int,
    term_area: np.ndarray,
    term_link_up: np.ndarray,
    term_last_cycle_ns: np.ndarray,
    term_offline: np.ndarray,
    term_meter_start: np.ndarray,
    term_meters: np.ndarray,
    meter_flags: np.ndarray,
    area_offline: np.ndarray,
) -> int:
    """The least a dropout check does: offline = link down or late, flag the meters of the
    terminals that changed, count offline terminals per area."""
    area_offline[:] = 0
    n = 0
    for t in range(term_area.shape[0]):
        off = term_link_up[t] == 0 or now_ns - term_last_cycle_ns[t] >= late_ns
        if off != term_offline[t]:
            term_offline[t] = off
            for j in range(term_meter_start[t], term_meter_start[t + 1]):
                meter_flags[term_meters[j]] = off
        if off:
            area_offline[term_area[t]] += 1
            n += 1
    return n


@njit(cache=True)
def baseline_kpis(
    s0: int,
    s1: int,
    close_register: np.ndarray,
    meter_area: np.ndarray,
    meter_role: np.ndarray,
    balance: np.ndarray,
    relay: np.ndarray,
    out_energy: np.ndarray,
    out_read: np.ndarray,
    out_arrears: np.ndarray,
) -> None:
    """One pass over the meters: register steps, reads and arrears summed per area."""
    out_energy[:] = 0
    out_read[:] = 0
    out_arrears[:] = 0
    for m in range(meter_area.shape[0]):
        a = meter_area[m]
        step = close_register[s1, m] - close_register[s0, m]
        out_energy[a] += step if meter_role[m] == 1 else -step
        out_read[a] += close_register[s1, m] >= 0
        out_arrears[a] += (balance[m] < 0) + (relay[m] == 1)


@njit(cache=True)
def baseline_batch(
    meter_slot: np.ndarray,
    read_ns: np.ndarray,
    outcome: np.ndarray,
    register: np.ndarray,
    meter_read_ns: np.ndarray,
    meter_register: np.ndarray,
) -> int:
    """The least a batch does: last read and register of each ok read."""
    n = 0
    for i in range(meter_slot.shape[0]):
        if outcome[i] == 0:
            m = meter_slot[i]
            meter_read_ns[m] = read_ns[i]
            meter_register[m] = register[i]
            n += 1
    return n


def main() -> None:
    rng = np.random.default_rng(645)
    state = build(rng)
    now = MIDNIGHT + C.DAY_NS + 5 * 60 * S  # 00:05, everyone read 8 to 25 minutes ago
    rows = C.DropoutRows.for_state(state)
    late = RULES.k * CYCLE + RULES.grace_ns
    base_offline = np.zeros(TERMINALS, np.int8)
    base_flags = np.zeros(METERS, np.int8)
    base_area = np.zeros(AREAS, np.int32)

    def detect() -> None:
        state.detect_dropouts(now, RULES, rows)

    def base_detect() -> None:
        baseline_dropouts(
            now,
            late,
            state.term_area,
            state.term_link_up,
            state.term_last_cycle_ns,
            base_offline,
            state.term_meter_start,
            state.term_meters,
            base_flags,
            base_area,
        )

    # a storm: 30 % of the terminals (whole areas) lose their link, then get it back. The link
    # events are applied as apply_link_event would (flag and time), vectorised, so the loop
    # times detect_dropouts and not 3,000 Python calls.
    storm = np.arange(int(TERMINALS * STORM_SHARE))
    clock = [now]

    def flip(up: int) -> None:
        clock[0] += S
        state.term_link_up[storm] = up
        state.term_link_ns[storm] = clock[0]

    def detect_storm() -> None:
        flip(0)
        state.detect_dropouts(clock[0], RULES, rows)
        flip(1)
        state.detect_dropouts(clock[0], RULES, rows)

    def base_storm() -> None:
        for up in (0, 1):
            flip(up)
            baseline_dropouts(
                clock[0],
                late,
                state.term_area,
                state.term_link_up,
                state.term_last_cycle_ns,
                base_offline,
                state.term_meter_start,
                state.term_meters,
                base_flags,
                base_area,
            )

    detect()
    assert rows.n_terminal_rows == 0  # the steady fleet is all online
    flip(0)
    state.detect_dropouts(clock[0], RULES, rows)
    storm_rows, storm_area_rows = rows.n_terminal_rows, rows.n_area_rows
    flip(1)
    state.detect_dropouts(clock[0], RULES, rows)

    day = state.day_of(MIDNIGHT)
    kpis = C.Kpis.for_state(state)
    balance = rng.integers(-5_000_000, 200_000_000, METERS)
    cutoff = np.zeros(METERS, np.int64)
    relay = (balance < -1_000_000).astype(np.int8)

    def compute() -> None:
        C.compute_kpis(
            state,
            kpis,
            day=day,
            loss_first_day=day,
            loss_last_day=day,
            loss_max_age_ns=C.DAY_NS,
            balance=balance,
            cutoff_threshold=cutoff,
            relay=relay,
        )

    s0, s1 = (day - 1) % state.ring_day.shape[0], day % state.ring_day.shape[0]
    e, r, a = (np.zeros(AREAS, np.int64) for _ in range(3))

    def base_compute() -> None:
        baseline_kpis(
            s0,
            s1,
            state.close_register,
            state.meter_area,
            state.meter_role,
            balance,
            relay,
            e,
            r,
            a,
        )

    compute()
    assert kpis.have_loss == 1 and int(kpis.loss_valid.sum()) > 0

    # batches as an agent applies them: one Python call per terminal cycle of 100 reads
    n_batches = 2_000
    slots = [
        np.arange(t * METERS_PER_TERMINAL, (t + 1) * METERS_PER_TERMINAL, dtype=np.int32)
        for t in range(n_batches)
    ]
    outcome = np.zeros(METERS_PER_TERMINAL, np.int8)
    register = np.full(METERS_PER_TERMINAL, 60_000_000, np.int64)

    def batches() -> None:
        clock[0] += CYCLE
        ts = np.full(METERS_PER_TERMINAL, clock[0], np.int64)
        for t in range(n_batches):
            state.apply_collection_batch(t, clock[0], slots[t], ts, outcome, register, RULES)

    empty_slots = np.zeros(0, np.int32)
    empty_ts = np.zeros(0, np.int64)
    empty_outcome = np.zeros(0, np.int8)

    def empty_batches() -> None:
        clock[0] += CYCLE
        for t in range(n_batches):
            state.apply_collection_batch(
                t, clock[0], empty_slots, empty_ts, empty_outcome, empty_ts, RULES
            )

    def base_batches() -> None:
        ts = np.full(METERS_PER_TERMINAL, clock[0], np.int64)
        for t in range(n_batches):
            baseline_batch(
                slots[t], ts, outcome, register, state.meter_read_ns, state.meter_register
            )

    rates = {
        "detect": median_rate(detect, TERMINALS, repeats=REPEATS),
        "base_detect": median_rate(base_detect, TERMINALS, repeats=REPEATS),
        "storm": median_rate(detect_storm, 2 * TERMINALS, repeats=REPEATS),
        "base_storm": median_rate(base_storm, 2 * TERMINALS, repeats=REPEATS),
        "kpis": median_rate(compute, METERS, repeats=REPEATS),
        "base_kpis": median_rate(base_compute, METERS, repeats=REPEATS),
        "batches": median_rate(batches, n_batches, repeats=REPEATS),
        "base_batches": median_rate(base_batches, n_batches, repeats=REPEATS),
        "empty_batches": median_rate(empty_batches, n_batches, repeats=REPEATS),
    }
    us = {k: 1e6 / v for k, v in rates.items()}  # microseconds per item
    figures = {
        "detect steady (no transitions): us per call": TERMINALS * us["detect"],
        "detect steady, baseline loop: us per call": TERMINALS * us["base_detect"],
        "detect steady, kernel / baseline time": round(us["detect"] / us["base_detect"], 2),
        "detect storm: us per call": TERMINALS * us["storm"],
        "detect storm, down call: terminal rows": storm_rows,
        "detect storm, down call: area alarms": storm_area_rows,
        "detect storm, baseline loop: us per call": TERMINALS * us["base_storm"],
        "detect storm, kernel / baseline time": round(us["storm"] / us["base_storm"], 2),
        "compute_kpis (five kernels): ms per call": METERS * us["kpis"] / 1e3,
        "compute_kpis: meters per second": rates["kpis"],
        "compute_kpis, baseline loop: ms per call": METERS * us["base_kpis"] / 1e3,
        "compute_kpis, kernel / baseline time": round(us["kpis"] / us["base_kpis"], 2),
        "apply_collection_batch (100 reads, from Python): us per batch": us["batches"],
        "apply_collection_batch: reads per second": rates["batches"] * METERS_PER_TERMINAL,
        "apply_collection_batch, baseline kernel: us per batch": us["base_batches"],
        "apply_collection_batch, kernel / baseline time": round(
            us["batches"] / us["base_batches"], 2
        ),
        "apply_collection_batch, empty batch (the call itself): us": us["empty_batches"],
    }
    report(
        "collection",
        figures,
        notes=(
            f"{TERMINALS} terminals in {AREAS} areas of {TERMINALS_PER_AREA}, "
            f"{METERS_PER_TERMINAL} meters each ({METERS} meters, one supply meter per area), "
            f"ring of {state.ring_day.shape[0]} days, two days of reads applied. Medians of "
            f"{REPEATS} runs. Storm: {STORM_SHARE:.0%} of terminals (whole areas) lose the link, "
            "detect, regain it, detect; a pass is one of those two detect calls. Baselines: "
            "numba loops over the same arrays doing the least the rule needs."
        ),
    )


if __name__ == "__main__":
    main()
