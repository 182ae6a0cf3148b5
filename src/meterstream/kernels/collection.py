"""Collection kernels: dropout detection (掉线) and live collection KPIs, on struct-of-arrays state.

Keeps what the head-end knows about each terminal and meter (last seen, missed poll cycles,
offline flags, per-day read counters, the last register of each day) and turns it into offline
flags, alarms (one per area outage, not one per terminal) and the KPIs the operations team is
judged on: collection success rate (采集成功率), online rate (在线率), line loss per area (台区线损),
customers in arrears (欠费) and cut off (停电).
It must never do I/O, asyncio or Faust, never accumulate floats, and never import the billing
layout: money arrives as plain int64 micro-yuan arrays.

State (all numpy, one row per terminal / meter / area / ring day; see `CollectionState`):

- terminals: area, cycle interval, link flag and time of the last link change, last batch,
  last delivering cycle, last contact, missed cycles, offline flag and since, alarm state, and
  the meters behind each terminal as a CSR index (`term_meter_start`, `term_meters`);
- meters: terminal, area, class (0 专变 dedicated, 1 公变 public, 2 低压 low voltage), role
  (0 customer, 1 supply meter of its area), last successful read (time and total register,
  0.01 kWh), consecutive failed reads, flags (1: terminal offline, 2: meter silent);
- areas: terminals, offline terminals, recently dropped terminals, alarm flag and since;
- a ring of D local days: per (day, class) and (day, area) attempted / ok read counters, and per
  (day, meter) the register and time of the meter's last successful read of that day.

Kernels (each `@njit(cache=True)`, plain typed arrays in, results into caller arrays):
`apply_collection_batch`, `apply_link_event`, `detect_dropouts`, `success_counts`,
`meters_read_counts`, `line_loss`, `online_counts`, `customer_counts`. The rules and the
decisions taken where the requirement is silent are in docs/collection-kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from meterstream.errors import UserError

# --- codes ---------------------------------------------------------------------------------

#: Read outcomes in a cycle batch. Anything but OUTCOME_OK counts as a failed read.
OUTCOME_OK = 0
OUTCOME_TIMEOUT = 1
OUTCOME_ERROR = 2

#: Meter classes (the utility reports collection success per class).
CLASS_DEDICATED = 0  # 专变: dedicated-transformer customers
CLASS_PUBLIC = 1  # 公变: public transformers (their supply meters, 考核表)
CLASS_LOWVOLTAGE = 2  # 低压: low-voltage customers
N_CLASSES = 3

#: Meter roles for line loss: customers of an area and the area's supply meter.
ROLE_CUSTOMER = 0
ROLE_SUPPLY = 1

#: Relay states as the billing layout holds them.
RELAY_CLOSED = 0
RELAY_OPEN = 1

#: Link events from the collectors.
LINK_DOWN = 0
LINK_UP = 1
LINK_HEARTBEAT = 2

#: Meter flag bits. A meter with any bit set is offline: no command should be sent to it.
METER_TERMINAL_OFFLINE = 1  # its terminal is offline (set and cleared by detect_dropouts)
METER_SILENT = 2  # its own last `meter_silent_k` reads failed (set by apply_collection_batch)

#: Alarm state of a terminal (meaningful while it is offline).
ALARM_NONE = 0  # online
ALARM_PENDING = 1  # offline, alarm held for `hold_ns` in case an area outage forms
ALARM_RAISED = 2  # offline, individual alarm emitted
ALARM_COVERED = 3  # offline, covered by its area's mass-dropout alarm

#: Terminal rows written by detect_dropouts.
EV_ONLINE = 0  # back online; no individual alarm was outstanding: nothing to clear
EV_OFFLINE = 1  # flagged offline with its meters (hold commands); alarm pending
EV_ALARM = 2  # emit one individual offline alarm
EV_COVERED = 3  # covered by its area's alarm: emit nothing for this terminal
EV_CLEARED = 4  # back online after an individual alarm: clear it

#: Area rows written by detect_dropouts.
AREA_CLEARED = 0
AREA_RAISED = 1

# --- units and sentinels -------------------------------------------------------------------

DAY_NS = 86_400 * 1_000_000_000
BP = 10_000  # basis points in one
NO_READ = -1  # register value of "no successful read"
NEVER_NS = 0  # time of "never" (epoch 0; real timestamps are later)
EMPTY_DAY = -(1 << 62)  # day index of a ring slot that holds no day yet
#: A total register counts 0.00 .. 999999.99 kWh and then wraps to 0.
REGISTER_MODULUS = 100_000_000

DEFAULT_RING_DAYS = 4
#: Asia/Shanghai: local day = UTC + 8 h (no daylight saving).
SHANGHAI_OFFSET_NS = 8 * 3_600 * 1_000_000_000


# --- ingest --------------------------------------------------------------------------------


@njit(cache=True)
def apply_collection_batch(
    terminal: int,
    cycle_ns: int,
    meter_slot: np.ndarray,  # int32 [n]: meter index of each read
    read_ns: np.ndarray,  # int64 [n]: time the read refers to (the collector's clock)
    outcome: np.ndarray,  # int8 [n]: OUTCOME_*
    register: np.ndarray,  # int64 [n]: total register, 0.01 kWh (used when outcome is ok)
    meter_silent_k: int,
    day_offset_ns: int,
    term_last_batch_ns: np.ndarray,
    term_last_cycle_ns: np.ndarray,
    term_last_seen_ns: np.ndarray,
    term_link_up: np.ndarray,
    term_link_ns: np.ndarray,
    meter_terminal: np.ndarray,
    meter_area: np.ndarray,
    meter_class: np.ndarray,
    meter_read_ns: np.ndarray,
    meter_register: np.ndarray,
    meter_fail_streak: np.ndarray,
    meter_flags: np.ndarray,
    ring_day: np.ndarray,
    class_attempted: np.ndarray,
    class_ok: np.ndarray,
    area_attempted: np.ndarray,
    area_ok: np.ndarray,
    close_register: np.ndarray,
    close_ns: np.ndarray,
) -> int:
    """Apply one terminal's poll-cycle batch. Returns the reads applied, or -1 for a replay.

    A batch whose `cycle_ns` is not newer than the terminal's last batch is a replay and changes
    nothing. A read of a meter that is not behind `terminal` (or out of range) is skipped; the
    caller sees it as `len(meter_slot) - returned`. A batch proves the link (link up at
    `cycle_ns` unless a newer link event says otherwise) and counts as a delivering cycle when it
    has at least one ok read or no reads at all (nothing was due).
    """
    if cycle_ns <= term_last_batch_ns[terminal]:
        return -1
    term_last_batch_ns[terminal] = cycle_ns
    term_last_seen_ns[terminal] = max(term_last_seen_ns[terminal], cycle_ns)
    if cycle_ns >= term_link_ns[terminal]:
        term_link_up[terminal] = 1
        term_link_ns[terminal] = cycle_ns

    n_days = ring_day.shape[0]
    n_meters = meter_terminal.shape[0]
    newest = ring_day[0]
    for s in range(1, n_days):
        newest = max(newest, ring_day[s])

    n = meter_slot.shape[0]
    applied = 0
    delivered = n == 0
    # the local day of the previous read, as [day_start, day_end): reads of one cycle nearly
    # always share a day, so most reads skip the division
    day = EMPTY_DAY
    day_start = 0
    day_end = 0
    s = 0
    for i in range(n):
        m = meter_slot[i]
        if m < 0 or m >= n_meters or meter_terminal[m] != terminal:
            continue
        applied += 1
        ts = read_ns[i]
        ok = outcome[i] == OUTCOME_OK
        if not day_start <= ts < day_end:
            day = (ts + day_offset_ns) // DAY_NS
            day_start = day * DAY_NS - day_offset_ns
            day_end = day_start + DAY_NS
            s = day % n_days
            if day > newest:
                # roll the ring forward: the days after `newest` up to `day` get fresh
                # counters; register slots need no clearing (each carries its own time)
                first = newest + 1
                first = max(first, day - n_days + 1)
                for x in range(first, day + 1):
                    r = x % n_days
                    ring_day[r] = x
                    for c in range(class_attempted.shape[1]):
                        class_attempted[r, c] = 0
                        class_ok[r, c] = 0
                    for a in range(area_attempted.shape[1]):
                        area_attempted[r, a] = 0
                        area_ok[r, a] = 0
                newest = day
        in_ring = ring_day[s] == day  # re-read: a later day in this batch may have evicted it
        if in_ring:
            class_attempted[s, meter_class[m]] += 1
            area_attempted[s, meter_area[m]] += 1
        if ok:
            delivered = True
            meter_fail_streak[m] = 0
            meter_flags[m] = meter_flags[m] & ~METER_SILENT
            if ts >= meter_read_ns[m]:  # of reads at the same instant the last applied wins
                meter_read_ns[m] = ts
                meter_register[m] = register[i]
            if in_ring:
                class_ok[s, meter_class[m]] += 1
                area_ok[s, meter_area[m]] += 1
                held = close_register[s, m]
                held_ns = close_ns[s, m]
                of_day = day_start <= held_ns < day_end
                if held == NO_READ or not of_day or ts >= held_ns:
                    close_register[s, m] = register[i]
                    close_ns[s, m] = ts
        else:
            meter_fail_streak[m] += 1
            if meter_fail_streak[m] >= meter_silent_k:
                meter_flags[m] = meter_flags[m] | METER_SILENT
    if delivered:
        term_last_cycle_ns[terminal] = cycle_ns
    return applied


@njit(cache=True)
def apply_link_event(
    terminal: int,
    kind: int,
    ts_ns: int,
    term_link_up: np.ndarray,
    term_link_ns: np.ndarray,
    term_last_seen_ns: np.ndarray,
) -> int:
    """Apply a link event (LINK_DOWN / LINK_UP / LINK_HEARTBEAT). Returns 1, or 0 if stale.

    An event older than the terminal's last link change (event or batch) is stale and ignored,
    so events replayed or arriving late from another topic cannot undo newer knowledge. A
    heartbeat is proof of a live link, like LINK_UP. Up and heartbeat count as contact.
    """
    if ts_ns < term_link_ns[terminal]:
        return 0
    term_link_ns[terminal] = ts_ns
    if kind == LINK_DOWN:
        term_link_up[terminal] = 0
    else:
        term_link_up[terminal] = 1
        term_last_seen_ns[terminal] = max(term_last_seen_ns[terminal], ts_ns)
    return 1


# --- dropouts ------------------------------------------------------------------------------


@njit(cache=True)
def detect_dropouts(
    now_ns: int,
    k: int,
    grace_ns: int,
    hold_ns: int,
    window_ns: int,
    raise_share_bp: int,
    clear_share_bp: int,
    min_terminals: int,
    term_area: np.ndarray,
    term_cycle_ns: np.ndarray,
    term_link_up: np.ndarray,
    term_link_ns: np.ndarray,
    term_last_cycle_ns: np.ndarray,
    term_missed: np.ndarray,
    term_offline: np.ndarray,
    term_offline_since_ns: np.ndarray,
    term_alarm: np.ndarray,
    term_meter_start: np.ndarray,
    term_meters: np.ndarray,
    meter_flags: np.ndarray,
    area_terminals: np.ndarray,
    area_offline: np.ndarray,
    area_recent: np.ndarray,
    area_alarm: np.ndarray,
    area_alarm_since_ns: np.ndarray,
    out_terminal: np.ndarray,  # int32 [>= 2 x n_terminals]
    out_event: np.ndarray,  # int8  [>= 2 x n_terminals]: EV_*
    out_area: np.ndarray,  # int32 [>= n_areas]
    out_area_event: np.ndarray,  # int8 [>= n_areas]: AREA_RAISED / AREA_CLEARED
) -> tuple[int, int]:
    """Flag terminals (and their meters) offline or online, raise and clear area alarms.

    Returns (terminal rows, area rows) written to the out arrays. Three passes:
    1. each terminal: cycles missed = max(0, (now - last delivering cycle - grace) // interval);
       offline iff link down or missed >= k. Rows EV_OFFLINE / EV_ONLINE / EV_CLEARED, meter
       flags; per area: terminals, offline, and recent (offline since >= now - window).
    2. each area: raise when recent >= min_terminals and recent / terminals > raise share;
       clear when offline / terminals <= clear share (clear share < raise share: hysteresis).
    3. each offline terminal: pending in an alarmed area -> EV_COVERED; covered in an area no
       longer alarmed -> pending again; pending for hold_ns outside an alarm -> EV_ALARM.
    """
    n_t = term_area.shape[0]
    n_a = area_terminals.shape[0]
    if out_terminal.shape[0] < 2 * n_t or out_event.shape[0] < 2 * n_t:
        raise ValueError("detect_dropouts: out_terminal/out_event need 2 x n_terminals rows")
    if out_area.shape[0] < n_a or out_area_event.shape[0] < n_a:
        raise ValueError("detect_dropouts: out_area/out_area_event need n_areas rows")
    for a in range(n_a):
        area_terminals[a] = 0
        area_offline[a] = 0
        area_recent[a] = 0

    rows = 0
    recent_from = now_ns - window_ns
    for t in range(n_t):
        interval = term_cycle_ns[t]
        late = now_ns - term_last_cycle_ns[t] - grace_ns
        missed = late // interval if late >= 0 else 0
        term_missed[t] = missed
        down = term_link_up[t] == 0
        offline = down or missed >= k
        if offline and term_offline[t] == 0:
            # since: the earliest start among the conditions that hold now
            since = now_ns
            if missed >= k:
                since = term_last_cycle_ns[t] + k * interval + grace_ns
            if down and term_link_ns[t] < since:
                since = term_link_ns[t]
            term_offline[t] = 1
            term_offline_since_ns[t] = since
            term_alarm[t] = ALARM_PENDING
            for j in range(term_meter_start[t], term_meter_start[t + 1]):
                m = term_meters[j]
                meter_flags[m] = meter_flags[m] | METER_TERMINAL_OFFLINE
            out_terminal[rows] = t
            out_event[rows] = EV_OFFLINE
            rows += 1
        elif not offline and term_offline[t] == 1:
            out_terminal[rows] = t
            out_event[rows] = EV_CLEARED if term_alarm[t] == ALARM_RAISED else EV_ONLINE
            rows += 1
            term_offline[t] = 0
            term_offline_since_ns[t] = NEVER_NS
            term_alarm[t] = ALARM_NONE
            for j in range(term_meter_start[t], term_meter_start[t + 1]):
                m = term_meters[j]
                meter_flags[m] = meter_flags[m] & ~METER_TERMINAL_OFFLINE
        a = term_area[t]
        area_terminals[a] += 1
        if term_offline[t] == 1:
            area_offline[a] += 1
            if term_offline_since_ns[t] >= recent_from:
                area_recent[a] += 1

    area_rows = 0
    for a in range(n_a):
        n = area_terminals[a]
        if area_alarm[a] == 0:
            recent = area_recent[a]
            if n > 0 and recent >= min_terminals and recent * BP > raise_share_bp * n:
                area_alarm[a] = 1
                area_alarm_since_ns[a] = now_ns
                out_area[area_rows] = a
                out_area_event[area_rows] = AREA_RAISED
                area_rows += 1
        elif area_offline[a] * BP <= clear_share_bp * n:
            area_alarm[a] = 0
            area_alarm_since_ns[a] = NEVER_NS
            out_area[area_rows] = a
            out_area_event[area_rows] = AREA_CLEARED
            area_rows += 1

    for t in range(n_t):
        if term_offline[t] == 0:
            continue
        state = term_alarm[t]
        if area_alarm[term_area[t]] == 1:
            if state == ALARM_PENDING:
                term_alarm[t] = ALARM_COVERED
                out_terminal[rows] = t
                out_event[rows] = EV_COVERED
                rows += 1
        else:
            if state == ALARM_COVERED:
                state = ALARM_PENDING
                term_alarm[t] = ALARM_PENDING
            if state == ALARM_PENDING and now_ns - term_offline_since_ns[t] >= hold_ns:
                term_alarm[t] = ALARM_RAISED
                out_terminal[rows] = t
                out_event[rows] = EV_ALARM
                rows += 1
    return rows, area_rows


# --- KPIs ----------------------------------------------------------------------------------


@njit(cache=True)
def _rate_bp(part: int, whole: int) -> int:
    """part / whole in basis points, rounded down (100 % only when perfect); -1 when whole is 0."""
    if whole == 0:
        return -1
    return part * BP // whole


@njit(cache=True)
def success_counts(
    day: int,
    ring_day: np.ndarray,
    class_attempted: np.ndarray,
    class_ok: np.ndarray,
    area_attempted: np.ndarray,
    area_ok: np.ndarray,
    out_class_attempted: np.ndarray,  # int64 [N_CLASSES]
    out_class_ok: np.ndarray,
    out_class_bp: np.ndarray,  # int64 [N_CLASSES]: ok / attempted in bp, -1 if none attempted
    out_area_attempted: np.ndarray,  # int64 [n_areas]
    out_area_ok: np.ndarray,
    out_area_bp: np.ndarray,
) -> int:
    """Read-based collection success of local `day`: ok reads / attempted reads, per class and area.

    Returns 1, or 0 when `day` is not in the ring (outputs then zero counts and -1 rates).
    """
    s = day % ring_day.shape[0]
    have = ring_day[s] == day
    for c in range(out_class_attempted.shape[0]):
        att = class_attempted[s, c] if have else 0
        ok = class_ok[s, c] if have else 0
        out_class_attempted[c] = att
        out_class_ok[c] = ok
        out_class_bp[c] = _rate_bp(ok, att)
    for a in range(out_area_attempted.shape[0]):
        att = area_attempted[s, a] if have else 0
        ok = area_ok[s, a] if have else 0
        out_area_attempted[a] = att
        out_area_ok[a] = ok
        out_area_bp[a] = _rate_bp(ok, att)
    return 1 if have else 0


@njit(cache=True)
def meters_read_counts(
    day: int,
    day_offset_ns: int,
    ring_day: np.ndarray,
    close_register: np.ndarray,
    close_ns: np.ndarray,
    meter_class: np.ndarray,
    meter_area: np.ndarray,
    out_class_meters: np.ndarray,  # int64 [N_CLASSES]
    out_class_read: np.ndarray,  # int64 [N_CLASSES]: meters with >= 1 ok read on `day`
    out_area_meters: np.ndarray,  # int64 [n_areas]
    out_area_read: np.ndarray,
) -> int:
    """Meter-based collection success of local `day` (the utility's 采集成功率): meters read / meters.

    Returns 1, or 0 when `day` is not in the ring (then no meter counts as read).
    """
    for c in range(out_class_meters.shape[0]):
        out_class_meters[c] = 0
        out_class_read[c] = 0
    for a in range(out_area_meters.shape[0]):
        out_area_meters[a] = 0
        out_area_read[a] = 0
    s = day % ring_day.shape[0]
    have = ring_day[s] == day
    lo = day * DAY_NS - day_offset_ns  # the local day is [lo, lo + DAY_NS)
    hi = lo + DAY_NS
    for m in range(meter_class.shape[0]):
        c = meter_class[m]
        a = meter_area[m]
        out_class_meters[c] += 1
        out_area_meters[a] += 1
        if have and close_register[s, m] != NO_READ and lo <= close_ns[s, m] < hi:
            out_class_read[c] += 1
            out_area_read[a] += 1
    return 1 if have else 0


@njit(cache=True)
def line_loss(
    first_day: int,
    last_day: int,
    max_age_ns: int,
    day_offset_ns: int,
    ring_day: np.ndarray,
    close_register: np.ndarray,
    close_ns: np.ndarray,
    meter_area: np.ndarray,
    meter_role: np.ndarray,
    out_supply: np.ndarray,  # int64 [n_areas]: supply meters' consumption, 0.01 kWh
    out_customers: np.ndarray,  # int64 [n_areas]: customers' consumption, 0.01 kWh
    out_loss: np.ndarray,  # int64 [n_areas]: supply - customers, 0.01 kWh
    out_loss_bp: np.ndarray,  # int64 [n_areas]: loss / supply in bp (floor); 0 if no supply
    out_missing: np.ndarray,  # int64 [n_areas]: meters without a usable read at a boundary
    out_valid: np.ndarray,  # int8 [n_areas]: 1 when a supply meter exists and none is missing
) -> int:
    """Line loss per area over local days first_day..last_day (台区线损).

    Each meter's register at a boundary is the one of its last successful read in the local day
    that ends at the boundary (the start boundary closes day first_day - 1, the end boundary
    closes last_day), and no older than `max_age_ns` before the boundary; otherwise the meter is
    missing for the interval. A register below its start value wraps (999999.99 -> 0) when the
    wrapped step is at most half the register range; otherwise it went backwards and the meter
    counts as missing. Sums run over the meters that are not missing. Roles other than customer
    and supply are ignored. Returns 1, or 0 when either boundary day is not in the ring.
    """
    n_a = out_supply.shape[0]
    for a in range(n_a):
        out_supply[a] = 0
        out_customers[a] = 0
        out_loss[a] = 0
        out_loss_bp[a] = 0
        out_missing[a] = 0
        out_valid[a] = 0  # first: "has a supply meter"; at the end: valid
    n_days = ring_day.shape[0]
    s0 = (first_day - 1) % n_days
    s1 = last_day % n_days
    if last_day < first_day or ring_day[s0] != first_day - 1 or ring_day[s1] != last_day:
        return 0
    b0 = first_day * DAY_NS - day_offset_ns
    b1 = (last_day + 1) * DAY_NS - day_offset_ns
    # a boundary read is usable when in [b - min(day, max age), b): of the day the boundary
    # closes and young enough (a slot holding an older day fails the lower bound)
    reach = min(DAY_NS, max_age_ns)
    for m in range(meter_area.shape[0]):
        role = meter_role[m]
        if role != ROLE_CUSTOMER and role != ROLE_SUPPLY:
            continue
        a = meter_area[m]
        if role == ROLE_SUPPLY:
            out_valid[a] = 1
        r0 = close_register[s0, m]
        t0 = close_ns[s0, m]
        r1 = close_register[s1, m]
        t1 = close_ns[s1, m]
        usable = r0 != NO_READ and r1 != NO_READ and b0 - reach <= t0 < b0 and b1 - reach <= t1 < b1
        step = r1 - r0
        if usable and step < 0:
            step += REGISTER_MODULUS
            usable = step <= REGISTER_MODULUS // 2
        if not usable:
            out_missing[a] += 1
        elif role == ROLE_SUPPLY:
            out_supply[a] += step
        else:
            out_customers[a] += step
    for a in range(n_a):
        out_valid[a] = 1 if out_valid[a] == 1 and out_missing[a] == 0 else 0
        loss = out_supply[a] - out_customers[a]
        out_loss[a] = loss
        if out_supply[a] > 0:
            out_loss_bp[a] = loss * BP // out_supply[a]
    return 1


@njit(cache=True)
def online_counts(
    term_area: np.ndarray,
    term_offline: np.ndarray,
    out_terminals: np.ndarray,  # int64 [n_areas]
    out_online: np.ndarray,  # int64 [n_areas]
) -> tuple[int, int]:
    """Terminals and online terminals per area; returns the fleet totals (terminals, online)."""
    for a in range(out_terminals.shape[0]):
        out_terminals[a] = 0
        out_online[a] = 0
    online = 0
    for t in range(term_area.shape[0]):
        a = term_area[t]
        out_terminals[a] += 1
        if term_offline[t] == 0:
            out_online[a] += 1
            online += 1
    return term_area.shape[0], online


@njit(cache=True)
def customer_counts(
    meter_area: np.ndarray,
    meter_role: np.ndarray,
    balance: np.ndarray,  # int64 [n_meters], micro-yuan
    cutoff_threshold: np.ndarray,  # int64 [n_meters], micro-yuan
    relay: np.ndarray,  # int8 [n_meters]: RELAY_CLOSED / RELAY_OPEN
    out_customers: np.ndarray,  # int64 [n_areas]
    out_in_arrears: np.ndarray,  # balance < 0 (owes money, 欠费)
    out_below_cutoff: np.ndarray,  # balance < its cut-off threshold (due for cut-off)
    out_cut_off: np.ndarray,  # relay open (停电)
) -> None:
    """Customers per area, and how many are in arrears, below their cut-off threshold, cut off."""
    for a in range(out_customers.shape[0]):
        out_customers[a] = 0
        out_in_arrears[a] = 0
        out_below_cutoff[a] = 0
        out_cut_off[a] = 0
    for m in range(meter_area.shape[0]):
        if meter_role[m] != ROLE_CUSTOMER:
            continue
        a = meter_area[m]
        out_customers[a] += 1
        if balance[m] < 0:
            out_in_arrears[a] += 1
        if balance[m] < cutoff_threshold[m]:
            out_below_cutoff[a] += 1
        if relay[m] == RELAY_OPEN:
            out_cut_off[a] += 1


# --- state and the Python side -------------------------------------------------------------


@dataclass(frozen=True)
class CollectionRules:
    """The dropout rules, as the kernels' scalar parameters (nanoseconds, basis points)."""

    k: int = 3  # missed cycles that make a terminal offline
    grace_ns: int = 60 * 1_000_000_000  # a cycle due at t counts as missed at t + grace
    hold_ns: int = 15 * 60 * 1_000_000_000  # an individual alarm waits this long for an area
    window_ns: int = 15 * 60 * 1_000_000_000  # drops this recent count towards a mass dropout
    raise_share_bp: int = 3_000  # mass dropout: more than 30 % of an area dropped in the window
    clear_share_bp: int = 1_000  # cleared when at most 10 % of the area is still offline
    min_terminals: int = 2  # and at least this many dropped (a 1-terminal area alarms alone)
    meter_silent_k: int = 3  # failed reads in a row that flag a meter silent

    def __post_init__(self) -> None:
        where = "collection rules"
        if self.k < 1 or self.meter_silent_k < 1 or self.min_terminals < 1:
            raise UserError("k, meter_silent_k and min_terminals must be at least 1", where=where)
        if min(self.grace_ns, self.hold_ns, self.window_ns) < 0:
            raise UserError("grace, hold and window must not be negative", where=where)
        if not 0 <= self.clear_share_bp < self.raise_share_bp <= BP:
            raise UserError(
                f"need 0 <= clear_share_bp < raise_share_bp <= {BP} so an area alarm does not "
                f"flap; got clear {self.clear_share_bp}, raise {self.raise_share_bp}",
                where=where,
            )


@dataclass
class CollectionState:
    """The struct-of-arrays state the kernels run on. Field names match kernel parameters."""

    day_offset_ns: int  # local time - UTC, ns: local day = (t + offset) // DAY_NS
    # terminals [n_terminals]
    term_area: np.ndarray  # int32: dropout grouping (the 台区, or a cell/channel)
    term_cycle_ns: np.ndarray  # int64: poll-cycle interval
    term_link_up: np.ndarray  # int8: 1 up, 0 down
    term_link_ns: np.ndarray  # int64: time of the last link change (event or batch)
    term_last_batch_ns: np.ndarray  # int64: cycle time of the last batch applied (replay guard)
    term_last_cycle_ns: np.ndarray  # int64: cycle time of the last delivering batch
    term_last_seen_ns: np.ndarray  # int64: last contact of any kind
    term_missed: np.ndarray  # int32: cycles missed, as of the last detect_dropouts
    term_offline: np.ndarray  # int8
    term_offline_since_ns: np.ndarray  # int64: start of the current offline spell
    term_alarm: np.ndarray  # int8: ALARM_*
    term_meter_start: np.ndarray  # int64 [n_terminals + 1]: CSR of the meters behind each
    term_meters: np.ndarray  # int32 [n_meters]
    # meters [n_meters]
    meter_terminal: np.ndarray  # int32
    meter_area: np.ndarray  # int32: the 台区 (line loss, success per area, customers)
    meter_class: np.ndarray  # int8: CLASS_*
    meter_role: np.ndarray  # int8: ROLE_*
    meter_read_ns: np.ndarray  # int64: last successful read (= last seen of the meter)
    meter_register: np.ndarray  # int64: total register at that read, 0.01 kWh; NO_READ
    meter_fail_streak: np.ndarray  # int32: failed reads since the last ok one
    meter_flags: np.ndarray  # int8: METER_* bits
    # areas [n_areas]
    area_terminals: np.ndarray  # int32 (as of the last detect_dropouts)
    area_offline: np.ndarray  # int32
    area_recent: np.ndarray  # int32: offline with since >= now - window
    area_alarm: np.ndarray  # int8: 1 while a mass dropout is raised
    area_alarm_since_ns: np.ndarray  # int64
    # ring of local days [D]: slot day % D holds `day` when ring_day[slot] == day
    ring_day: np.ndarray  # int64
    class_attempted: np.ndarray  # int64 [D, N_CLASSES]
    class_ok: np.ndarray  # int64 [D, N_CLASSES]
    area_attempted: np.ndarray  # int64 [D, n_areas]
    area_ok: np.ndarray  # int64 [D, n_areas]
    close_register: np.ndarray  # int64 [D, n_meters]: register of the day's last ok read
    close_ns: np.ndarray  # int64 [D, n_meters]: its time (a slot is stale if of another day)

    @property
    def n_terminals(self) -> int:
        return int(self.term_area.shape[0])

    @property
    def n_meters(self) -> int:
        return int(self.meter_terminal.shape[0])

    @property
    def n_areas(self) -> int:
        return int(self.area_alarm.shape[0])

    def day_of(self, ns: int) -> int:
        """Local day index of an epoch-ns time."""
        return (ns + self.day_offset_ns) // DAY_NS

    def apply_collection_batch(
        self,
        terminal: int,
        cycle_ns: int,
        meter_slot: np.ndarray,
        read_ns: np.ndarray,
        outcome: np.ndarray,
        register: np.ndarray,
        rules: CollectionRules,
    ) -> int:
        return apply_collection_batch(
            terminal,
            cycle_ns,
            meter_slot,
            read_ns,
            outcome,
            register,
            rules.meter_silent_k,
            self.day_offset_ns,
            self.term_last_batch_ns,
            self.term_last_cycle_ns,
            self.term_last_seen_ns,
            self.term_link_up,
            self.term_link_ns,
            self.meter_terminal,
            self.meter_area,
            self.meter_class,
            self.meter_read_ns,
            self.meter_register,
            self.meter_fail_streak,
            self.meter_flags,
            self.ring_day,
            self.class_attempted,
            self.class_ok,
            self.area_attempted,
            self.area_ok,
            self.close_register,
            self.close_ns,
        )

    def apply_link_event(self, terminal: int, kind: int, ts_ns: int) -> int:
        return apply_link_event(
            terminal, kind, ts_ns, self.term_link_up, self.term_link_ns, self.term_last_seen_ns
        )

    def detect_dropouts(self, now_ns: int, rules: CollectionRules, out: DropoutRows) -> None:
        out.n_terminal_rows, out.n_area_rows = detect_dropouts(
            now_ns,
            rules.k,
            rules.grace_ns,
            rules.hold_ns,
            rules.window_ns,
            rules.raise_share_bp,
            rules.clear_share_bp,
            rules.min_terminals,
            self.term_area,
            self.term_cycle_ns,
            self.term_link_up,
            self.term_link_ns,
            self.term_last_cycle_ns,
            self.term_missed,
            self.term_offline,
            self.term_offline_since_ns,
            self.term_alarm,
            self.term_meter_start,
            self.term_meters,
            self.meter_flags,
            self.area_terminals,
            self.area_offline,
            self.area_recent,
            self.area_alarm,
            self.area_alarm_since_ns,
            out.terminal,
            out.event,
            out.area,
            out.area_event,
        )


@dataclass
class DropoutRows:
    """Caller-side buffers for detect_dropouts: rows [:n_terminal_rows] and [:n_area_rows]."""

    terminal: np.ndarray  # int32 [2 x n_terminals]
    event: np.ndarray  # int8: EV_*
    area: np.ndarray  # int32 [n_areas]
    area_event: np.ndarray  # int8: AREA_*
    n_terminal_rows: int = 0
    n_area_rows: int = 0

    @classmethod
    def for_state(cls, state: CollectionState) -> DropoutRows:
        return cls(
            terminal=np.zeros(2 * state.n_terminals, np.int32),
            event=np.zeros(2 * state.n_terminals, np.int8),
            area=np.zeros(state.n_areas, np.int32),
            area_event=np.zeros(state.n_areas, np.int8),
        )

    def terminal_rows(self) -> list[tuple[int, int]]:
        """(terminal, EV_*) rows of the last call, in order."""
        n = self.n_terminal_rows
        return [(int(t), int(e)) for t, e in zip(self.terminal[:n], self.event[:n])]

    def area_rows(self) -> list[tuple[int, int]]:
        """(area, AREA_*) rows of the last call, in order."""
        n = self.n_area_rows
        return [(int(a), int(e)) for a, e in zip(self.area[:n], self.area_event[:n])]


def new_collection_state(
    term_area: np.ndarray,
    term_cycle_ns: np.ndarray,
    meter_terminal: np.ndarray,
    meter_area: np.ndarray,
    meter_class: np.ndarray,
    meter_role: np.ndarray,
    n_areas: int,
    *,
    start_ns: int,
    day_offset_ns: int = SHANGHAI_OFFSET_NS,
    ring_days: int = DEFAULT_RING_DAYS,
) -> CollectionState:
    """A fresh state for an archive: every terminal assumed up at `start_ns`, given k cycles.

    Batches whose cycle time is not after `start_ns` are refused as replays. Raises UserError
    naming the first bad archive entry.
    """
    term_area = np.ascontiguousarray(term_area, np.int32)
    term_cycle_ns = np.ascontiguousarray(term_cycle_ns, np.int64)
    meter_terminal = np.ascontiguousarray(meter_terminal, np.int32)
    meter_area = np.ascontiguousarray(meter_area, np.int32)
    meter_class = np.ascontiguousarray(meter_class, np.int8)
    meter_role = np.ascontiguousarray(meter_role, np.int8)
    n_t, n_m = term_area.shape[0], meter_terminal.shape[0]
    _check_archive(
        term_area, term_cycle_ns, meter_terminal, meter_area, meter_class, meter_role, n_areas
    )
    if ring_days < 2:
        raise UserError(f"ring_days must be at least 2 (line loss needs two days), got {ring_days}")

    order = np.argsort(meter_terminal, kind="stable").astype(np.int32)
    start = np.zeros(n_t + 1, np.int64)
    start[1:] = np.cumsum(np.bincount(meter_terminal, minlength=n_t))

    def full(n: int | tuple[int, int], value: int, dtype: type) -> np.ndarray:
        return np.full(n, value, dtype)

    return CollectionState(
        day_offset_ns=int(day_offset_ns),
        term_area=term_area,
        term_cycle_ns=term_cycle_ns,
        term_link_up=full(n_t, 1, np.int8),
        term_link_ns=full(n_t, start_ns, np.int64),
        term_last_batch_ns=full(n_t, start_ns, np.int64),
        term_last_cycle_ns=full(n_t, start_ns, np.int64),
        term_last_seen_ns=full(n_t, NEVER_NS, np.int64),
        term_missed=full(n_t, 0, np.int32),
        term_offline=full(n_t, 0, np.int8),
        term_offline_since_ns=full(n_t, NEVER_NS, np.int64),
        term_alarm=full(n_t, ALARM_NONE, np.int8),
        term_meter_start=start,
        term_meters=order,
        meter_terminal=meter_terminal,
        meter_area=meter_area,
        meter_class=meter_class,
        meter_role=meter_role,
        meter_read_ns=full(n_m, NEVER_NS, np.int64),
        meter_register=full(n_m, NO_READ, np.int64),
        meter_fail_streak=full(n_m, 0, np.int32),
        meter_flags=full(n_m, 0, np.int8),
        area_terminals=np.bincount(term_area, minlength=n_areas).astype(np.int32),
        area_offline=full(n_areas, 0, np.int32),
        area_recent=full(n_areas, 0, np.int32),
        area_alarm=full(n_areas, 0, np.int8),
        area_alarm_since_ns=full(n_areas, NEVER_NS, np.int64),
        ring_day=full(ring_days, EMPTY_DAY, np.int64),
        class_attempted=full((ring_days, N_CLASSES), 0, np.int64),
        class_ok=full((ring_days, N_CLASSES), 0, np.int64),
        area_attempted=full((ring_days, n_areas), 0, np.int64),
        area_ok=full((ring_days, n_areas), 0, np.int64),
        close_register=full((ring_days, n_m), NO_READ, np.int64),
        close_ns=full((ring_days, n_m), NEVER_NS, np.int64),
    )


def _check_archive(
    term_area: np.ndarray,
    term_cycle_ns: np.ndarray,
    meter_terminal: np.ndarray,
    meter_area: np.ndarray,
    meter_class: np.ndarray,
    meter_role: np.ndarray,
    n_areas: int,
) -> None:
    """Raise UserError for the first archive entry the kernels cannot index safely."""
    n_t = term_area.shape[0]
    if term_cycle_ns.shape[0] != n_t:
        raise UserError(
            f"{n_t} terminals but {term_cycle_ns.shape[0]} cycle intervals; give one per terminal",
            where="archive",
        )
    lengths = [x.shape[0] for x in (meter_terminal, meter_area, meter_class, meter_role)]
    if len(set(lengths)) != 1:
        raise UserError(
            "meter_terminal, meter_area, meter_class, meter_role have lengths "
            f"{', '.join(map(str, lengths))}; give one entry per meter in each",
            where="archive",
        )
    for name, values, bound in (
        ("term_area", term_area, n_areas),
        ("meter_terminal", meter_terminal, n_t),
        ("meter_area", meter_area, n_areas),
        ("meter_class", meter_class, N_CLASSES),
    ):
        bad = np.flatnonzero((values < 0) | (values >= bound))
        if bad.size:
            i = int(bad[0])
            raise UserError(
                f"{name}[{i}] = {int(values[i])} is outside 0..{bound - 1}; fix the archive entry",
                where="archive",
            )
    bad = np.flatnonzero(term_cycle_ns <= 0)
    if bad.size:
        i = int(bad[0])
        raise UserError(
            f"terminal {i} has cycle interval {int(term_cycle_ns[i])} ns; it must be positive",
            where="archive",
        )


# --- KPI bundle ----------------------------------------------------------------------------


@dataclass
class Kpis:
    """Caller-side buffers for compute_kpis, allocated once per state."""

    class_attempted: np.ndarray
    class_ok: np.ndarray
    class_bp: np.ndarray
    area_attempted: np.ndarray
    area_ok: np.ndarray
    area_bp: np.ndarray
    class_meters: np.ndarray
    class_read: np.ndarray
    area_meters: np.ndarray
    area_read: np.ndarray
    area_terminals: np.ndarray
    area_online: np.ndarray
    loss_supply: np.ndarray
    loss_customers: np.ndarray
    loss: np.ndarray
    loss_bp: np.ndarray
    loss_missing: np.ndarray
    loss_valid: np.ndarray
    customers: np.ndarray
    in_arrears: np.ndarray
    below_cutoff: np.ndarray
    cut_off: np.ndarray
    terminals: int = 0
    online: int = 0
    have_day: int = 0
    have_loss: int = 0

    @classmethod
    def for_state(cls, state: CollectionState) -> Kpis:
        c, a = N_CLASSES, state.n_areas
        z = np.zeros
        return cls(
            z(c, np.int64),
            z(c, np.int64),
            z(c, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(c, np.int64),
            z(c, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int8),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
            z(a, np.int64),
        )


def compute_kpis(
    state: CollectionState,
    out: Kpis,
    *,
    day: int,
    loss_first_day: int,
    loss_last_day: int,
    loss_max_age_ns: int,
    balance: np.ndarray,
    cutoff_threshold: np.ndarray,
    relay: np.ndarray,
) -> None:
    """Every KPI into `out`: success of `day` (reads and meters), online, line loss, customers."""
    s = state
    out.have_day = success_counts(
        day,
        s.ring_day,
        s.class_attempted,
        s.class_ok,
        s.area_attempted,
        s.area_ok,
        out.class_attempted,
        out.class_ok,
        out.class_bp,
        out.area_attempted,
        out.area_ok,
        out.area_bp,
    )
    meters_read_counts(
        day,
        s.day_offset_ns,
        s.ring_day,
        s.close_register,
        s.close_ns,
        s.meter_class,
        s.meter_area,
        out.class_meters,
        out.class_read,
        out.area_meters,
        out.area_read,
    )
    out.terminals, out.online = online_counts(
        s.term_area, s.term_offline, out.area_terminals, out.area_online
    )
    out.have_loss = line_loss(
        loss_first_day,
        loss_last_day,
        loss_max_age_ns,
        s.day_offset_ns,
        s.ring_day,
        s.close_register,
        s.close_ns,
        s.meter_area,
        s.meter_role,
        out.loss_supply,
        out.loss_customers,
        out.loss,
        out.loss_bp,
        out.loss_missing,
        out.loss_valid,
    )
    customer_counts(
        s.meter_area,
        s.meter_role,
        balance,
        cutoff_threshold,
        relay,
        out.customers,
        out.in_arrears,
        out.below_cutoff,
        out.cut_off,
    )
