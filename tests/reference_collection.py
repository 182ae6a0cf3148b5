"""Plain-Python reference of the collection rules: objects and dicts, no numpy, no numba.

Written from the rules in docs/collection-kernels.md, not from the kernels: days are a dict of
day books pruned to the last D days instead of a ring, terminals and meters are objects, alarm
states are words. The property tests hold the kernels equal to this on random fleets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_NS = 86_400 * 1_000_000_000
WRAP = 100_000_000  # 999999.99 kWh + 0.01

# the kernels' codes, spelled out once here for comparison
EVENT_CODE = {"online": 0, "offline": 1, "alarm": 2, "covered": 3, "cleared": 4}
ALARM_CODE = {"none": 0, "pending": 1, "raised": 2, "covered": 3}


@dataclass
class Rules:
    k: int
    grace_ns: int
    hold_ns: int
    window_ns: int
    raise_share_bp: int
    clear_share_bp: int
    min_terminals: int
    meter_silent_k: int


@dataclass
class Terminal:
    area: int
    interval: int
    start: int
    link_up: bool = True
    link_at: int = 0
    last_batch: int = 0
    last_cycle: int = 0
    last_seen: int = 0
    missed: int = 0
    offline: bool = False
    since: int = 0
    alarm: str = "none"

    def __post_init__(self) -> None:
        self.link_at = self.last_batch = self.last_cycle = self.start


@dataclass
class Meter:
    terminal: int
    area: int
    klass: int
    role: int
    read_at: int = 0
    register: int = -1
    fails: int = 0
    silent: bool = False


@dataclass
class DayBook:
    attempted_by_class: dict[int, int] = field(default_factory=dict)
    ok_by_class: dict[int, int] = field(default_factory=dict)
    attempted_by_area: dict[int, int] = field(default_factory=dict)
    ok_by_area: dict[int, int] = field(default_factory=dict)
    last_read: dict[int, tuple[int, int]] = field(default_factory=dict)  # meter -> (ns, reg)


def bump(d: dict[int, int], key: int) -> None:
    d[key] = d.get(key, 0) + 1


class Fleet:
    def __init__(
        self,
        term_area: list[int],
        term_interval: list[int],
        meter_terminal: list[int],
        meter_area: list[int],
        meter_class: list[int],
        meter_role: list[int],
        n_areas: int,
        start_ns: int,
        offset_ns: int,
        ring_days: int,
    ) -> None:
        self.terminals = [Terminal(a, i, start_ns) for a, i in zip(term_area, term_interval)]
        self.meters = [
            Meter(t, a, c, r)
            for t, a, c, r in zip(meter_terminal, meter_area, meter_class, meter_role)
        ]
        self.n_areas = n_areas
        self.offset = offset_ns
        self.keep_days = ring_days
        self.books: dict[int, DayBook] = {}
        self.newest_day: int | None = None
        self.area_alarm = [False] * n_areas
        self.area_alarm_since = [0] * n_areas

    # --- days ---

    def day(self, ns: int) -> int:
        return (ns + self.offset) // DAY_NS

    def kept(self, day: int) -> bool:
        return (
            self.newest_day is not None
            and self.newest_day - self.keep_days < day <= self.newest_day
        )

    def book(self, day: int) -> DayBook:
        return self.books.setdefault(day, DayBook())

    def see_day(self, day: int) -> None:
        if self.newest_day is None or day > self.newest_day:
            self.newest_day = day
            for d in list(self.books):
                if not self.kept(d):
                    del self.books[d]

    # --- ingest ---

    def batch(
        self, terminal: int, cycle: int, reads: list[tuple[int, int, int, int]], silent_k: int
    ) -> int:
        """reads: (meter, ns, outcome, register). Returns reads applied or -1 for a replay."""
        term = self.terminals[terminal]
        if cycle <= term.last_batch:
            return -1
        term.last_batch = cycle
        term.last_seen = max(term.last_seen, cycle)
        if cycle >= term.link_at:
            term.link_up, term.link_at = True, cycle
        delivered = not reads
        applied = 0
        for meter_index, ns, outcome, register in reads:
            if not 0 <= meter_index < len(self.meters):
                continue
            meter = self.meters[meter_index]
            if meter.terminal != terminal:
                continue
            applied += 1
            day = self.day(ns)
            self.see_day(day)
            book = self.book(day) if self.kept(day) else None
            if book is not None:
                bump(book.attempted_by_class, meter.klass)
                bump(book.attempted_by_area, meter.area)
            if outcome == 0:
                delivered = True
                meter.fails, meter.silent = 0, False
                if ns >= meter.read_at:
                    meter.read_at, meter.register = ns, register
                if book is not None:
                    bump(book.ok_by_class, meter.klass)
                    bump(book.ok_by_area, meter.area)
                    held = book.last_read.get(meter_index)
                    if held is None or ns >= held[0]:
                        book.last_read[meter_index] = (ns, register)
            else:
                meter.fails += 1
                if meter.fails >= silent_k:
                    meter.silent = True
        if delivered:
            term.last_cycle = cycle
        return applied

    def link(self, terminal: int, kind: int, ns: int) -> int:
        term = self.terminals[terminal]
        if ns < term.link_at:
            return 0
        term.link_at = ns
        if kind == 0:
            term.link_up = False
        else:
            term.link_up = True
            term.last_seen = max(term.last_seen, ns)
        return 1

    # --- dropouts ---

    def detect(self, now: int, rules: Rules) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        rows: list[tuple[int, int]] = []
        for index, term in enumerate(self.terminals):
            overdue = now - term.last_cycle - rules.grace_ns
            term.missed = max(0, overdue // term.interval) if overdue >= 0 else 0
            silent_too_long = term.missed >= rules.k
            should_be_offline = (not term.link_up) or silent_too_long
            if should_be_offline and not term.offline:
                starts = []
                if silent_too_long:
                    starts.append(term.last_cycle + rules.k * term.interval + rules.grace_ns)
                if not term.link_up:
                    starts.append(term.link_at)
                term.offline, term.since, term.alarm = True, min(starts), "pending"
                rows.append((index, EVENT_CODE["offline"]))
            elif not should_be_offline and term.offline:
                rows.append((index, EVENT_CODE["cleared" if term.alarm == "raised" else "online"]))
                term.offline, term.since, term.alarm = False, 0, "none"

        area_rows: list[tuple[int, int]] = []
        for area in range(self.n_areas):
            members = [t for t in self.terminals if t.area == area]
            down = [t for t in members if t.offline]
            recent = [t for t in down if t.since >= now - rules.window_ns]
            if not self.area_alarm[area]:
                share_exceeded = len(recent) * 10_000 > rules.raise_share_bp * len(members)
                if members and len(recent) >= rules.min_terminals and share_exceeded:
                    self.area_alarm[area], self.area_alarm_since[area] = True, now
                    area_rows.append((area, 1))
            elif len(down) * 10_000 <= rules.clear_share_bp * len(members):
                self.area_alarm[area], self.area_alarm_since[area] = False, 0
                area_rows.append((area, 0))

        for index, term in enumerate(self.terminals):
            if not term.offline:
                continue
            if self.area_alarm[term.area]:
                if term.alarm == "pending":
                    term.alarm = "covered"
                    rows.append((index, EVENT_CODE["covered"]))
                continue
            if term.alarm == "covered":
                term.alarm = "pending"
            if term.alarm == "pending" and now - term.since >= rules.hold_ns:
                term.alarm = "raised"
                rows.append((index, EVENT_CODE["alarm"]))
        return rows, area_rows

    def meter_flags(self, meter_index: int) -> int:
        meter = self.meters[meter_index]
        return (1 if self.terminals[meter.terminal].offline else 0) | (2 if meter.silent else 0)

    # --- KPIs ---

    def success(
        self, day: int
    ) -> tuple[bool, list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(have day, per class (attempted, ok, bp), per area (attempted, ok, bp))."""
        have = self.kept(day)
        book = self.books.get(day, DayBook()) if have else DayBook()

        def row(att: dict[int, int], ok: dict[int, int], key: int) -> tuple[int, int, int]:
            a, o = att.get(key, 0), ok.get(key, 0)
            return a, o, (o * 10_000 // a if a else -1)

        classes = [row(book.attempted_by_class, book.ok_by_class, c) for c in range(3)]
        areas = [row(book.attempted_by_area, book.ok_by_area, a) for a in range(self.n_areas)]
        return have, classes, areas

    def meters_read(self, day: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Per class and per area: (meters, meters with an ok read on `day`)."""
        book = self.books.get(day) if self.kept(day) else None
        by_class = [[0, 0] for _ in range(3)]
        by_area = [[0, 0] for _ in range(self.n_areas)]
        for index, meter in enumerate(self.meters):
            read = book is not None and index in book.last_read
            for cell in (by_class[meter.klass], by_area[meter.area]):
                cell[0] += 1
                cell[1] += int(read)
        return [tuple(c) for c in by_class], [tuple(a) for a in by_area]  # type: ignore[misc]

    def line_loss(
        self, first_day: int, last_day: int, max_age: int
    ) -> tuple[bool, list[dict[str, int]]]:
        """(have both boundary days, per area: supply, customers, loss, loss_bp, missing, valid)."""
        blank = {"supply": 0, "customers": 0, "loss": 0, "loss_bp": 0, "missing": 0, "valid": 0}
        if last_day < first_day or not (self.kept(first_day - 1) and self.kept(last_day)):
            return False, [dict(blank) for _ in range(self.n_areas)]
        start_boundary = first_day * DAY_NS - self.offset
        end_boundary = (last_day + 1) * DAY_NS - self.offset
        opening = self.books.get(first_day - 1, DayBook()).last_read
        closing = self.books.get(last_day, DayBook()).last_read
        out = []
        for area in range(self.n_areas):
            supply = customers = missing = 0
            has_supply = False
            for index, meter in enumerate(self.meters):
                if meter.area != area or meter.role not in (0, 1):
                    continue
                has_supply = has_supply or meter.role == 1
                a, b = opening.get(index), closing.get(index)
                usable = (
                    a is not None
                    and b is not None
                    and start_boundary - a[0] <= max_age
                    and end_boundary - b[0] <= max_age
                )
                energy = 0
                if usable:
                    assert a is not None and b is not None
                    energy = b[1] - a[1]
                    if energy < 0:  # wrapped past 999999.99, or went backwards
                        energy += WRAP
                        usable = energy <= WRAP // 2
                if not usable:
                    missing += 1
                elif meter.role == 1:
                    supply += energy
                else:
                    customers += energy
            loss = supply - customers
            out.append(
                {
                    "supply": supply,
                    "customers": customers,
                    "loss": loss,
                    "loss_bp": loss * 10_000 // supply if supply > 0 else 0,
                    "missing": missing,
                    "valid": int(has_supply and missing == 0),
                }
            )
        return True, out

    def online(self) -> tuple[int, int, list[tuple[int, int]]]:
        per_area = [
            (
                sum(1 for t in self.terminals if t.area == a),
                sum(1 for t in self.terminals if t.area == a and not t.offline),
            )
            for a in range(self.n_areas)
        ]
        return len(self.terminals), sum(1 for t in self.terminals if not t.offline), per_area

    def customers(
        self, balance: list[int], cutoff: list[int], relay: list[int]
    ) -> list[tuple[int, int, int, int]]:
        """Per area: (customers, in arrears: balance < 0, below cut-off threshold, relay open)."""
        out = []
        for area in range(self.n_areas):
            mine = [i for i, m in enumerate(self.meters) if m.area == area and m.role == 0]
            out.append(
                (
                    len(mine),
                    sum(1 for i in mine if balance[i] < 0),
                    sum(1 for i in mine if balance[i] < cutoff[i]),
                    sum(1 for i in mine if relay[i] == 1),
                )
            )
        return out
