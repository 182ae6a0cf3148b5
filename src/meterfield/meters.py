"""Live meter state for a whole fleet as numpy struct-of-arrays: registers, relay, clock, money.

Registers advance vectorised per tick, exactly in integers: each tariff register T1..T4 keeps
its energy in millijoules (W x ms), so the register is `mJ // 36e6` (0.01 kWh) and the
sub-resolution remainder is never lost; the total is the sum of T1..T4 as a real meter keeps
it; every register rolls over after 999999.99 kWh. The tariff of a step follows each meter's
own (drifting) clock and the time-of-use table. Relays move after a delay; an open relay
draws nothing; keep-power (保电) refuses trips. Money-prepaid meters deduct price x register
increments in micro-yuan. No per-meter Python loop runs on the per-tick path, and nothing
here does I/O or reads the wall clock: time is always passed in (simulated epoch ns).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np

from meterfield.config import CLASSES, FieldConfig
from meterfield.fleet import P2007, PMODBUS, Fleet
from meterfield.profiles import RecordedProfile, SyntheticProfile, meter_keys, slot_hash

UNIT_MJ = 36_000_000  # millijoules in one register unit (0.01 kWh = 10 Wh = 36 kJ)
ROLL = 100_000_000  # a register shows 000000.00 .. 999999.99 kWh
NEVER = np.iinfo(np.int64).max
NS = 1_000_000_000
MS = 1_000_000
HISTORY = 12  # settlement periods kept (DI0 = 01..0C)
_EPOCH = datetime(1970, 1, 1)

# 1CH actions (N1) and the 2-byte error words of a refusal (PROTOCOL.md).
TRIP, CLOSE_ALLOWED, CLOSE_DIRECT = 0x1A, 0x1B, 0x1C
ALARM, ALARM_RELEASE, KEEP_POWER, KEEP_POWER_RELEASE = 0x2A, 0x2B, 0x3A, 0x3B
ERR_OTHER, ERR_MAC, ERR_PASSWORD, ERR_DEADLINE, ERR_KEEP_POWER = 0x0001, 0x0002, 0x0004, 0x0010, 0x0020

# Status word 3 bits.
SW3_RELAY_OPEN = 1 << 4
SW3_RELAY_COMMAND_OPEN = 1 << 6
SW3_PRETRIP_ALARM = 1 << 7
SW3_TYPE_SHIFT = 8
SW3_KEEP_POWER = 1 << 12


class MeterBank:
    """Every meter's live state. Index i is meter i of the fleet."""

    def __init__(self, fleet: Fleet, profile: SyntheticProfile | RecordedProfile, start_ns: int,
                 tz_offset_s: int) -> None:
        cfg: FieldConfig = fleet.config
        mc = cfg.meters
        n = fleet.n
        self.n = n
        self.fleet = fleet
        self.profile = profile
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 645]))
        self.keys = meter_keys(n, cfg.seed ^ 0x5A5A)
        self.tz_offset_s = tz_offset_s
        self.step_ms = cfg.step_s * 1000
        self.tou = np.asarray(mc.tou_minutes(), np.int8) - 1  # 0..3 per minute of the day
        self.relay_delay_ns = round(mc.relay_delay_s * NS)
        self.prices_e4 = np.asarray(mc.prices_e4, np.int64)
        self.alarm_uy = mc.alarm_cents * 10_000
        self.local_cutoff = mc.local_cutoff
        self.overdraft_limit_uy = mc.overdraft_limit_cents * 10_000

        self.customer = np.flatnonzero(fleet.role == 0)
        self.supply = np.flatnonzero(fleet.role == 1)
        self.supply_area = fleet.area[self.supply].astype(np.intp)
        self.customer_area = fleet.area[self.customer].astype(np.intp)
        lo, hi = cfg.profile.line_loss
        area_loss = rng.uniform(lo, hi, len(fleet.areas))
        self.loss_ppm = np.rint(area_loss * 1e6).astype(np.int64)
        self.n_areas = len(fleet.areas)

        # --- registers: acc[i, t] in mJ, initial registers split by the TOU shares
        shares = np.bincount(self.tou, minlength=4).astype(np.float64) / 1440.0
        klo, khi = mc.register_kwh
        start_units = (rng.uniform(klo, khi, n) * 100).astype(np.int64)
        split = np.floor(start_units[:, None] * shares[None, :]).astype(np.int64)
        split[:, 0] += start_units - split.sum(axis=1)
        self.acc = split * UNIT_MJ + rng.integers(0, UNIT_MJ, (n, 4))
        self.start_units = split.astype(np.int32)
        self.power_w = np.zeros(n, np.int64)
        self.t_ms = start_ns // MS

        # --- clock: local wall = utc + zone + offset + drift since the last correction
        olo, ohi = mc.clock_offset_s
        self.clock_offset_ns = (rng.uniform(olo, ohi, n) * NS).astype(np.int64)
        plo, phi = mc.clock_ppm
        self.clock_ppm = rng.uniform(plo, phi, n)
        self.clock_epoch_ns = np.full(n, start_ns, np.int64)

        # --- relay, alarm, keep-power
        self.relay_open = np.zeros(n, bool)
        self.relay_command_open = np.zeros(n, bool)
        self.relay_target = np.zeros(n, bool)
        self.relay_due_ns = np.full(n, NEVER, np.int64)
        self.awaiting_press = np.zeros(n, bool)
        if mc.press_delay_s is None:
            self.press_delay_ns = np.full(n, NEVER, np.int64)
        else:
            a, b = mc.press_delay_s
            self.press_delay_ns = (rng.uniform(a, b, n) * NS).astype(np.int64)
        self.alarm = np.zeros(n, bool)
        self.keep_power = np.zeros(n, bool)
        if mc.keep_power_if_protected:
            self.keep_power[fleet.protected] = True
        self.prepaid = fleet.prepaid
        self.money_rows = np.flatnonzero(fleet.prepaid == 2)
        self.money_uy = fleet.balance_cents.astype(np.int64) * 10_000

        # --- instruments: nominal voltage per meter (0.1 V), phases
        self.nominal_dv = rng.integers(2180, 2360, n).astype(np.int64)
        three = (fleet.meter_class != CLASSES.index("lowvoltage")) | (fleet.protocol == PMODBUS)
        self.phases = np.where(three, 3, 1).astype(np.int64)

        # --- settlement history (monthly freeze), allocated when first needed
        self._hist: np.ndarray | None = None
        self.month = self._months(start_ns)
        self._power_slot = -1
        self._power_cache = np.zeros(n, np.int64)
        self.freezes = 0
        #: Bumped whenever registers or money may have changed (an advance, a set, a top-up):
        #: a reply built from them stays valid while the generation does.
        self.generation = 0

    # --- time ---------------------------------------------------------------------------------

    def _meter_wall_ns(self, now_ns: int, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Each meter's own clock as wall-clock epoch ns (vectorised)."""
        elapsed = (now_ns - self.clock_epoch_ns[rows]).astype(np.float64)
        drift = (elapsed * self.clock_ppm[rows] * 1e-6).astype(np.int64)
        return now_ns + self.tz_offset_s * NS + self.clock_offset_ns[rows] + drift

    def meter_wall_ns(self, i: int, now_ns: int) -> int:
        elapsed = float(now_ns - int(self.clock_epoch_ns[i]))
        drift = int(elapsed * float(self.clock_ppm[i]) * 1e-6)
        return now_ns + self.tz_offset_s * NS + int(self.clock_offset_ns[i]) + drift

    def meter_time(self, i: int, now_ns: int) -> datetime:
        """Meter i's clock reading (naive local wall time)."""
        return _EPOCH + timedelta(microseconds=self.meter_wall_ns(i, now_ns) // 1000)

    def set_meter_time(self, rows: np.ndarray | list[int], when: datetime, now_ns: int) -> None:
        """08H / 14H time set: the meters' clocks read `when` now; drift restarts from here."""
        rows = np.asarray(rows, np.intp)
        wall_ns = (when - _EPOCH) // timedelta(microseconds=1) * 1000
        self.clock_offset_ns[rows] = wall_ns - now_ns - self.tz_offset_s * NS
        self.clock_epoch_ns[rows] = now_ns

    def clock_error_s(self, i: int, now_ns: int) -> float:
        """How far meter i's clock is from true local time, in seconds."""
        return (self.meter_wall_ns(i, now_ns) - now_ns - self.tz_offset_s * NS) / NS

    def _months(self, now_ns: int) -> np.ndarray:
        wall_ms = self._meter_wall_ns(now_ns) // MS
        return wall_ms.astype("datetime64[ms]").astype("datetime64[M]").astype(np.int64)

    # --- advancing ----------------------------------------------------------------------------

    def _tariffs(self, t_ms: int) -> np.ndarray:
        wall_s = self._meter_wall_ns(t_ms * MS) // NS
        return self.tou[(wall_s // 60) % 1440].astype(np.intp)

    def _base_power(self, local_s: int) -> np.ndarray:
        slot = local_s // 1800
        if slot != self._power_slot:
            p = self.profile.power_w(local_s)
            p[self.supply] = 0
            self._power_cache = p
            self._power_slot = slot
        return self._power_cache

    def _settle(self, now_ns: int) -> None:
        due = np.flatnonzero(self.relay_due_ns <= now_ns)
        if due.size:
            self.relay_open[due] = self.relay_target[due]
            self.relay_due_ns[due] = NEVER
            self.awaiting_press[due] = False

    def advance_to(self, now_ns: int, tz_offset_s: int | None = None) -> None:
        """Advance every register to simulated time `now_ns`, in steps that meet each
        `step_s` boundary of local time (so every half hour of the profile is exact)."""
        if tz_offset_s is not None:
            self.tz_offset_s = tz_offset_s
        t1 = now_ns // MS
        t = self.t_ms
        if t1 <= t:
            self._settle(now_ns)
            return
        self.generation += 1
        money = self.money_rows
        before = self.acc[money] // UNIT_MJ if money.size else None
        off_ms = self.tz_offset_s * 1000
        step = self.step_ms
        rows = np.arange(self.n)
        while t < t1:
            b = min(((t + off_ms) // step + 1) * step - off_ms, t1)
            due = int(self.relay_due_ns.min())  # a relay moving inside the step ends it there
            if t * MS < due < b * MS:
                b = -(-due // MS)
            self._settle(t * MS)
            p = self._base_power((t + off_ms) // 1000).copy()
            p[self.relay_open] = 0
            if self.supply.size:
                # integers below 2**53 add exactly in float64
                sums = np.rint(np.bincount(self.customer_area, weights=p[self.customer],
                                           minlength=self.n_areas)).astype(np.int64)
                sp = sums[self.supply_area] * (1_000_000 + self.loss_ppm[self.supply_area]) // 1_000_000
                sp[self.relay_open[self.supply]] = 0
                p[self.supply] = sp
            self.power_w = p
            self.acc[rows, self._tariffs(t)] += p * (b - t)
            t = b
        self.t_ms = t1
        self._settle(now_ns)
        if money.size and before is not None:
            delta = self.acc[money] // UNIT_MJ - before
            self.money_uy[money] -= delta @ self.prices_e4
            if self.local_cutoff:
                self._local_cutoff(now_ns)
        months = self._months(now_ns)
        changed = np.flatnonzero(months != self.month)
        if changed.size:
            self._freeze(changed)
            self.month = months

    def _local_cutoff(self, now_ns: int) -> None:
        m = self.money_rows
        over = m[(self.money_uy[m] < -self.overdraft_limit_uy) & ~self.relay_command_open[m]
                 & ~self.keep_power[m]]
        if over.size:
            self.relay_command_open[over] = True
            self.relay_target[over] = True
            self.relay_due_ns[over] = now_ns + self.relay_delay_ns

    # --- registers ----------------------------------------------------------------------------

    def tariff_registers(self, rows: np.ndarray | slice | int = slice(None)) -> np.ndarray:
        """T1..T4 in 0.01 kWh (after rollover)."""
        return (self.acc[rows] // UNIT_MJ) % ROLL

    def registers(self, i: int) -> tuple[int, int, int, int, int]:
        """(total, T1, T2, T3, T4) in 0.01 kWh, as the meter shows them."""
        a, b, c, d = self.acc[i].tolist()
        a, b, c, d = a // UNIT_MJ % ROLL, b // UNIT_MJ % ROLL, c // UNIT_MJ % ROLL, d // UNIT_MJ % ROLL
        return ((a + b + c + d) % ROLL, a, b, c, d)

    def total_register(self, i: int) -> int:
        return self.registers(i)[0]

    def energy_mj(self, i: int) -> int:
        """Energy counted so far, remainder included (mJ), across all tariffs."""
        return int(self.acc[i].sum())

    def set_registers(self, i: int, tariff_units: tuple[int, int, int, int] | list[int]) -> None:
        """Set T1..T4 (0.01 kWh, remainder cleared): e.g. to test a rollover."""
        self.acc[i] = np.asarray(tariff_units, np.int64) * UNIT_MJ
        self.generation += 1

    def settlement(self, i: int, period: int) -> tuple[int, int, int, int, int]:
        """(total, T1..T4) frozen at the start of the period-th last month (1..12)."""
        h = self._history()
        t = [int(x) for x in h[period - 1, i]]
        return (sum(t) % ROLL, t[0], t[1], t[2], t[3])

    def _history(self) -> np.ndarray:
        if self._hist is None:
            # Before the field started: a plausible history back from the start registers,
            # one mean month (the meter's tariff shares of 730 h at its mean load) apart.
            mean_w = getattr(self.profile, "mean_w", None)
            monthly = (np.asarray(mean_w, np.int64) if mean_w is not None
                       else np.full(self.n, 450, np.int64)) * 730 // 10  # 0.01 kWh
            shares = np.bincount(self.tou, minlength=4).astype(np.int64)
            per_t = monthly[:, None] * shares[None, :] // 1440
            k = np.arange(1, HISTORY + 1, dtype=np.int64)[:, None, None]
            self._hist = np.maximum(0, self.start_units[None, :, :] - k * per_t[None, :, :]).astype(np.int32)
        return self._hist

    def _freeze(self, rows: np.ndarray) -> None:
        h = self._history()
        h[1:, rows] = h[:-1, rows]
        h[0, rows] = self.tariff_registers(rows)
        self.freezes += int(rows.size)

    # --- relay and control --------------------------------------------------------------------

    def relay_open_at(self, i: int, now_ns: int) -> bool:
        """Relay actual state (bit4) at `now_ns`, counting a move that fell due since the tick."""
        if self.relay_due_ns[i] <= now_ns:
            return bool(self.relay_target[i])
        return bool(self.relay_open[i])

    def relays_open(self, now_ns: int) -> int:
        due = self.relay_due_ns <= now_ns
        return int(np.count_nonzero(np.where(due, self.relay_target, self.relay_open)))

    def pretrip_alarm(self, i: int) -> bool:
        if self.alarm[i]:
            return True
        return bool(self.prepaid[i] == 2 and self.money_uy[i] < self.alarm_uy)

    def status_word3(self, i: int, now_ns: int) -> int:
        w = 0
        if self.relay_open_at(i, now_ns):
            w |= SW3_RELAY_OPEN
        if self.relay_command_open[i]:
            w |= SW3_RELAY_COMMAND_OPEN
        if self.pretrip_alarm(i):
            w |= SW3_PRETRIP_ALARM
        w |= int(self.prepaid[i]) << SW3_TYPE_SHIFT
        if self.keep_power[i]:
            w |= SW3_KEEP_POWER
        return w

    def _move_relay(self, i: int, open_: bool, at_ns: int, now_ns: int) -> None:
        actual = self.relay_open_at(i, now_ns)
        if self.relay_due_ns[i] <= now_ns:  # settle this meter first
            self.relay_open[i] = self.relay_target[i]
            self.relay_due_ns[i] = NEVER
        self.relay_target[i] = open_
        self.relay_due_ns[i] = NEVER if actual == open_ else at_ns

    def control(self, i: int, action: int, now_ns: int) -> int:
        """Carry out a 1CH action (credentials and deadline already checked). 0 or error word."""
        if action == TRIP:
            if self.keep_power[i]:
                return ERR_KEEP_POWER
            self.relay_command_open[i] = True
            self.awaiting_press[i] = False
            self._move_relay(i, True, now_ns + self.relay_delay_ns, now_ns)
        elif action == CLOSE_ALLOWED:
            self.relay_command_open[i] = False
            press = int(self.press_delay_ns[i])
            if self.relay_open_at(i, now_ns):
                self.awaiting_press[i] = True
                at = NEVER if press == NEVER else now_ns + press + self.relay_delay_ns
                self._move_relay(i, False, at, now_ns)
            else:  # already closed: a pending trip is cancelled
                self._move_relay(i, False, now_ns, now_ns)
        elif action == CLOSE_DIRECT:
            self.relay_command_open[i] = False
            self.awaiting_press[i] = False
            self._move_relay(i, False, now_ns + self.relay_delay_ns, now_ns)
        elif action == ALARM:
            self.alarm[i] = True
        elif action == ALARM_RELEASE:
            self.alarm[i] = False
        elif action == KEEP_POWER:
            # 保电: trips are refused from now on, and an open relay closes (most firmware).
            self.keep_power[i] = True
            if self.relay_command_open[i] or self.relay_target[i] or self.relay_open_at(i, now_ns):
                self.relay_command_open[i] = False
                self.awaiting_press[i] = False
                self._move_relay(i, False, now_ns + self.relay_delay_ns, now_ns)
        elif action == KEEP_POWER_RELEASE:
            self.keep_power[i] = False
        else:
            return ERR_OTHER
        return 0

    def press_button(self, i: int, now_ns: int) -> bool:
        """The customer presses the meter's button: a close-allowed relay closes after the
        relay delay. Returns False when the meter was not waiting for a press."""
        if not self.awaiting_press[i] or self.relay_due_ns[i] <= now_ns:
            return False
        at = now_ns + self.relay_delay_ns
        self.relay_due_ns[i] = min(self.relay_due_ns[i], at)
        return True

    # --- money (local prepaid meters) ---------------------------------------------------------

    def remaining_cents(self, i: int) -> int:
        return max(0, int(self.money_uy[i])) // 10_000

    def overdraft_cents(self, i: int) -> int:
        return max(0, -int(self.money_uy[i])) // 10_000

    def top_up(self, i: int, cents: int) -> None:
        """Money credited to a local prepaid meter (as a purchase through the ESAM would)."""
        self.money_uy[i] += cents * 10_000
        self.generation += 1

    # --- instruments --------------------------------------------------------------------------

    def _wobble(self, i: int, now_ns: int, salt: int, span: int) -> int:
        """A seeded, slowly changing integer in [-span, span] for meter i (changes each minute)."""
        h = slot_hash(self.keys[i:i + 1], (now_ns // (60 * NS)) * 7 + salt)
        return int(h[0] % np.uint64(2 * span + 1)) - span

    def voltage_dv(self, i: int, phase: int, now_ns: int) -> int:
        """Phase voltage in 0.1 V (B and C read 0 on a single-phase meter)."""
        if phase > 0 and self.phases[i] == 1:
            return 0
        return int(self.nominal_dv[i]) + self._wobble(i, now_ns, phase, 15)

    def power_w_phase(self, i: int, phase: int | None) -> int:
        """Active power in W: total (phase None) or one phase."""
        p = int(self.power_w[i])
        if phase is None:
            return p
        n = int(self.phases[i])
        if phase >= n:
            return 0
        return p // n + (p % n if phase == 0 else 0)

    def current_ma(self, i: int, phase: int, now_ns: int) -> int:
        v = self.voltage_dv(i, phase, now_ns)
        if v <= 0:
            return 0
        return self.power_w_phase(i, phase) * 10_000 // v

    def frequency_chz(self, i: int, now_ns: int) -> int:
        area = int(self.fleet.area[i])
        h = slot_hash(np.asarray([area], np.uint64), now_ns // (10 * NS))
        return 5000 + int(h[0] % np.uint64(9)) - 4

    def is_2007(self, i: int) -> bool:
        return bool(self.fleet.protocol[i] == P2007)
