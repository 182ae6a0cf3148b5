"""The billing and cost-control rules in plain Python: the reference the kernels are held to.

Written from the rules (docs/billing.md, issue 4), not from the kernels: Python ints, dicts and
the standard library's calendar and time zones (`zoneinfo`, `datetime`), one event at a time,
as readable as the rules. Slow on purpose; never imported by the package. `replay_files` runs a
whole `meterstream replay` (parsing included) and returns the text of the four output files.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from meterstream.kernels.tariffs import PERIOD_MONTH, PERIOD_NONE, PERIOD_YEAR, PlanSpec, TariffSpec

NS = 10**9
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ROLLOVER_AT = 100_000_000  # registers wrap from 999999.99 kWh to 0
HOLD_ORDER = ("protected", "holiday", "outside_window", "withholding_pending", "terminal_offline")


@dataclass
class Meter:
    """One meter's account and registers, as an operator would describe it."""

    address: str
    plan: PlanSpec
    initial: int  # micro-yuan
    supply: bool = False
    protected: bool = False
    online: bool = True  # its terminal is online
    balance: int = 0
    charged: int = 0
    paid: int = 0
    baseline: list[int] | None = None  # total, t1..t4 last billed (0.01 kWh)
    last_accepted: int | None = None  # epoch ns
    period: object = None
    used: int = 0
    relay_open: bool = False
    armed: dict[str, bool] = field(default_factory=dict)
    held: str | None = None
    payments: dict[str, str] = field(default_factory=dict)  # id -> pending/settled/failed
    holds: dict[str, int] = field(default_factory=dict)  # pending id -> expiry (epoch ns)

    def __post_init__(self) -> None:
        self.balance = self.initial
        self.armed = {
            "alert1": self.initial >= self.plan.alert1,
            "alert2": self.initial >= self.plan.alert2,
        }


class Clock:
    """Local calendar of UTC instants in the tariff's zone."""

    def __init__(self, tariff: TariffSpec) -> None:
        self.tz = ZoneInfo(tariff.timezone)

    def offset_ns(self, ts: int) -> int:
        when = datetime.fromtimestamp(ts // NS, self.tz)
        off = when.utcoffset()
        assert off is not None
        return (off.days * 86400 + off.seconds) * NS

    def local(self, ts: int) -> tuple[date, int]:
        """(local date, ns since local midnight) of an instant."""
        when = datetime.fromtimestamp(ts // NS, self.tz)
        tod = ((when.hour * 60 + when.minute) * 60 + when.second) * NS + ts % NS
        return when.date(), tod

    def from_local(self, wall: datetime, frac_ns: int) -> int:
        """Epoch ns of a naive local time (fold=0, as Python reads it)."""
        aware = wall.replace(tzinfo=self.tz)
        off = aware.utcoffset()
        assert off is not None
        naive_ns = (wall - datetime(1970, 1, 1)) // timedelta(microseconds=1) * 1000 + frac_ns
        return naive_ns - (off.days * 86400 + off.seconds) * NS


def period_of(tariff_clock: Clock, plan: PlanSpec, ts: int) -> object:
    d, _ = tariff_clock.local(ts)
    if plan.tier_period == PERIOD_YEAR:
        return d.year
    if plan.tier_period == PERIOD_MONTH:
        return (d.year, d.month)
    assert plan.tier_period == PERIOD_NONE
    return None


def tier_addon(plan: PlanSpec, used: int, d_total: int) -> int:
    """d_total split over the blocks by what the period used already; each part x its add."""
    add = 0
    lower = 0
    for upto, price in plan.tiers:
        top = used + d_total if upto is None else min(upto, used + d_total)
        bottom = max(lower, used)
        if top > bottom:
            add += (top - bottom) * price
        if upto is not None:
            lower = upto
    return add


def reading(clock: Clock, m: Meter, ts: int, regs: list[int]) -> tuple[str, object]:
    """Apply one reading: (outcome, detail). Outcomes: baseline, accepted, rollover, backwards,
    implausible. Detail: registers concerned, or (d_total, dt) for implausible."""
    names = ("total", "t1", "t2", "t3", "t4")
    if m.baseline is None:
        m.baseline = list(regs)
        m.last_accepted = ts
        m.period = period_of(clock, m.plan, ts)
        m.used = 0
        return "baseline", None
    deltas = []
    rolled = []
    backwards = []
    for name, new, old in zip(names, regs, m.baseline):
        if new < old and old - new >= ROLLOVER_AT // 2:
            deltas.append(new + ROLLOVER_AT - old)
            rolled.append(name)
        elif new < old:
            deltas.append(0)
            backwards.append(name)
        else:
            deltas.append(new - old)
    if backwards:
        return "backwards", tuple(backwards)
    d_total = deltas[0]
    assert m.last_accepted is not None
    dt = ts - m.last_accepted
    # d_total * 3600 > max_kw * 100 * seconds, seconds = dt / 1e9, exactly:
    if m.plan.max_kw_centi > 0 and d_total * 3600 * NS > m.plan.max_kw_centi * dt:
        return "implausible", (d_total, dt)
    period = period_of(clock, m.plan, ts)
    if period != m.period:
        m.period = period
        m.used = 0
    if not m.supply:
        tou = m.plan.tou
        if tou is not None and sum(deltas[1:]) > 0:
            charge = sum(d * p for d, p in zip(deltas[1:], tou))
        else:
            charge = d_total * m.plan.flat
        charge += tier_addon(m.plan, m.used, d_total)
        m.balance -= charge
        m.charged += charge
    m.used += d_total
    m.baseline = list(regs)
    m.last_accepted = ts
    return ("rollover", tuple(rolled)) if rolled else ("accepted", None)


def payment(tariff: TariffSpec, m: Meter, ts: int, pid: str, amount: int, status: str) -> str:
    """Apply one payment row: applied, duplicate, hold, failed or ignored."""
    state = m.payments.get(pid)
    if state == "settled":
        return "duplicate"
    if status == "settled":
        m.balance += amount
        m.paid += amount
        m.payments[pid] = "settled"
        m.holds.pop(pid, None)
        return "applied"
    if status == "pending":
        if state == "pending":
            return "ignored"
        m.payments[pid] = "pending"
        m.holds[pid] = ts + tariff.grace_ns
        return "hold"
    assert status == "failed"
    if state == "failed":
        return "ignored"
    m.payments[pid] = "failed"
    m.holds.pop(pid, None)
    return "failed"


def hold_reason(tariff: TariffSpec, clock: Clock, m: Meter, ts: int) -> str | None:
    if m.protected:
        return "protected"
    day, tod = clock.local(ts)
    if day in tariff.holidays:
        return "holiday"
    if (
        day.weekday() not in tariff.window_days
        or not tariff.window_start_ns <= tod < tariff.window_end_ns
    ):
        return "outside_window"
    if any(ts < expiry for expiry in m.holds.values()):
        return "withholding_pending"
    if not m.online:
        return "terminal_offline"
    return None


def decide(tariff: TariffSpec, clock: Clock, m: Meter, ts: int) -> list[tuple[str, object]]:
    """Decisions after an event: ("alert1"|"alert2", balance), ("cutoff_held", reason),
    ("cutoff"|"reconnect", balance)."""
    if m.supply:
        return []
    out: list[tuple[str, object]] = []
    for name, threshold in (("alert1", m.plan.alert1), ("alert2", m.plan.alert2)):
        if m.armed[name] and m.balance < threshold:
            out.append((name, m.balance))
            m.armed[name] = False
        elif not m.armed[name] and m.balance >= threshold:
            m.armed[name] = True
    if not m.relay_open:
        if m.balance < m.plan.cutoff:
            reason = hold_reason(tariff, clock, m, ts)
            if reason is None:
                m.relay_open = True
                m.held = None
                out.append(("cutoff", m.balance))
            elif reason != m.held:
                m.held = reason
                out.append(("cutoff_held", reason))
        else:
            m.held = None
    elif m.balance >= m.plan.reconnect:
        m.relay_open = False
        out.append(("reconnect", m.balance))
    return out


@dataclass
class Event:
    """A reading (regs), a payment (pid, amount, status) or a "tick" (status) of meter `meter`."""

    ts: int
    meter: int
    regs: list[int] | None = None
    pid: str = ""
    amount: int = 0
    status: str = ""


def run_one(tariff: TariffSpec, clock: Clock, m: Meter, ev: Event) -> list[tuple[str, object]]:
    """One event of meter `m`: its outcome row if it is not plain, then the decisions. A
    "tick" (status) is a decision at ev.ts without an event, as a timer would ask for."""
    out: list[tuple[str, object]] = []
    if ev.regs is not None:
        kind, detail = reading(clock, m, ev.ts, ev.regs)
        if kind in ("rollover", "backwards", "implausible"):
            out.append((kind, detail))
    elif ev.status != "tick":
        result = payment(tariff, m, ev.ts, ev.pid, ev.amount, ev.status)
        if result in ("duplicate", "failed"):
            out.append((result, ev.pid))
    out.extend(decide(tariff, clock, m, ev.ts))
    return out


def run(
    tariff: TariffSpec, meters: list[Meter], events: list[Event]
) -> list[tuple[int, int, str, object]]:
    """Apply events in the given order: (event index, meter index, what, detail) rows."""
    clock = Clock(tariff)
    out: list[tuple[int, int, str, object]] = []
    for i, ev in enumerate(events):
        for what, detail in run_one(tariff, clock, meters[ev.meter], ev):
            out.append((i, ev.meter, what, detail))
    return out


# ---------------------------------------------------------------------------------------------
# The whole replay, from the files' text to the outputs' text.

_TS = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}(?::?\d{2})?)?$"
)
_ENERGY = re.compile(r"^(\d+)(?:\.(\d+))?$")
_MONEY = re.compile(r"^([+-]?)(\d+)(?:\.(\d+))?$")
TS_WORDS = "is not an ISO 8601 date and time, e.g. 2013-01-01T00:30:00 or 2013-01-01 00:30:00+08:00 (years 1900..2199)"


def parse_ts(clock: Clock, text: str) -> int | None:
    m = _TS.match(text.strip())
    if not m:
        return None
    y, mo, d, hh, mi = (int(m.group(k)) for k in range(1, 6))
    ss = int(m.group(6) or 0)
    frac = int((m.group(7) or "").ljust(9, "0") or 0)
    if not 1900 <= y <= 2199 or hh > 23 or mi > 59 or ss > 59:
        return None
    try:
        wall = datetime(y, mo, d, hh, mi, ss)
    except ValueError:
        return None
    zone = m.group(8)
    if zone is None:
        return clock.from_local(wall, frac)
    naive = (wall - datetime(1970, 1, 1)) // timedelta(seconds=1) * NS + frac
    if zone == "Z":
        return naive
    digits = zone[1:].replace(":", "")
    oh, om = int(digits[:2]), int(digits[2:] or 0)
    if oh > 23 or om > 59:
        return None
    sign = 1 if zone[0] == "+" else -1
    return naive - sign * (oh * 3600 + om * 60) * NS


def money(text: str, decimals: int) -> int | str:
    """Exact integer in 10**-decimals, or the reason it is not one."""
    m = _MONEY.match(text.strip())
    if not m:
        return "not a decimal number"
    frac = m.group(3) or ""
    if frac[decimals:].strip("0"):
        return f"more than {decimals} decimals"
    v = int(m.group(2)) * 10**decimals + int(frac[:decimals].ljust(decimals, "0") or 0)
    return -v if m.group(1) == "-" else v


def energy(text: str) -> int | str:
    m = _ENERGY.match(text.strip())
    if not m:
        return "number"
    frac = m.group(2) or ""
    if frac[2:].strip("0"):
        return "decimals"
    if int(m.group(1)) > 999_999:
        return "range"
    return int(m.group(1)) * 100 + int(frac[:2].ljust(2, "0"))


def yuan(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    return f"{sign}{abs(micro) // 10**6}.{abs(micro) % 10**6:06d}"


def local_iso(clock: Clock, ts: int) -> str:
    when = datetime.fromtimestamp(ts // NS, clock.tz)
    frac = f".{ts % NS:09d}".rstrip("0") if ts % NS else ""
    off = when.utcoffset()
    assert off is not None
    secs = off.days * 86400 + off.seconds
    sign = "+" if secs >= 0 else "-"
    h, rest = divmod(abs(secs), 3600)
    mnt, s = divmod(rest, 60)
    off_text = f"{sign}{h:02d}:{mnt:02d}" + (f":{s:02d}" if s else "")
    return when.strftime("%Y-%m-%dT%H:%M:%S") + frac + off_text


def _table(
    text: str, wanted: tuple[str, ...]
) -> tuple[list[str], list[int], list[tuple[int, list[str]]]]:
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    header = next(reader)
    names = [h.strip().lower() for h in header]
    idx = [names.index(w) for w in wanted]
    rows = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        rows.append((reader.line_num, row))
    return header, idx, rows


def replay_files(
    tariff: TariffSpec, archive: str, readings: str, payments: str, names: tuple[str, str, str]
) -> dict[str, str]:
    """The four output files of `meterstream replay` for these inputs (texts)."""
    clock = Clock(tariff)
    plans = {p.name: p for p in tariff.plans}
    rejected: list[tuple[str, int, str]] = []
    meters: dict[str, Meter] = {}
    first_line: dict[str, int] = {}
    header, idx, rows = _table(
        archive,
        ("meter", "terminal", "area", "class", "plan", "protected", "initial_balance", "role"),
    )
    for line, row in rows:
        if len(row) <= max(idx):
            rejected.append(
                (
                    names[0],
                    line,
                    f"row has {len(row)} fields, needs {max(idx) + 1} (header: {','.join(header)})",
                )
            )
            continue
        meter, terminal, area, klass, plan, protected, initial, role = (row[i].strip() for i in idx)
        reason = ""
        if not re.fullmatch(r"[0-9]{12}", meter):
            reason = f"meter: {meter!r} is not a 12-digit meter address"
        elif meter in meters:
            reason = f"meter: {meter} is already in the archive (line {first_line[meter]})"
        elif not terminal:
            reason = "terminal: empty"
        elif not area:
            reason = "area: empty"
        elif klass not in ("dedicated", "public", "lowvoltage"):
            reason = f"class: {klass!r} is not one of dedicated, public, lowvoltage"
        elif plan not in plans:
            reason = f"plan: {plan!r} is not a plan of the tariffs file ({', '.join(plans)})"
        elif protected not in ("0", "1"):
            reason = f"protected: {protected!r} is not 0 or 1"
        elif role not in ("customer", "supply"):
            reason = f"role: {role!r} is not one of customer, supply"
        else:
            value = money(initial, 6)
            if isinstance(value, str):
                reason = f"initial_balance: {value} (yuan, at most 6 decimals), found {initial!r}"
            elif abs(value) > 10**15:
                reason = "initial_balance: beyond 1,000,000,000 yuan"
        if reason:
            rejected.append((names[0], line, reason))
            continue
        first_line[meter] = line
        meters[meter] = Meter(
            meter, plans[plan], value, supply=role == "supply", protected=protected == "1"
        )  # type: ignore[arg-type]
    order = list(meters)
    index = {a: i for i, a in enumerate(order)}
    mlist = [meters[a] for a in order]

    events: list[tuple[int, int, int, Event]] = []  # (ts, 0 payment / 1 reading, line, event)
    header, idx, rows = _table(readings, ("ts", "meter", "total", "t1", "t2", "t3", "t4"))
    cols = ("ts", "meter", "total", "t1", "t2", "t3", "t4")
    for line, row in rows:
        if len(row) <= max(idx):
            rejected.append(
                (
                    names[1],
                    line,
                    f"row has {len(row)} fields, needs {max(idx) + 1} (header has {len(header)})",
                )
            )
            continue
        f = [row[i].strip() for i in idx]
        ts = parse_ts(clock, f[0])
        reason = ""
        regs: list[int] = []
        if ts is None:
            reason = f"ts: {f[0]!r} {TS_WORDS}"
        elif not re.fullmatch(r"[0-9]{12}", f[1]):
            reason = f"meter: {f[1]!r} is not a 12-digit meter address"
        elif f[1] not in index:
            reason = f"meter: {f[1]} is not in the archive"
        else:
            for k in range(2, 7):
                v = energy(f[k])
                if v == "number":
                    reason = f"{cols[k]}: {f[k]!r} is not a register value in kWh (digits, at most 2 decimals)"
                elif v == "decimals":
                    reason = f"{cols[k]}: {f[k]!r} has more than 2 decimals"
                elif v == "range":
                    reason = f"{cols[k]}: {f[k]} is beyond the register range 0..999999.99 kWh"
                if reason:
                    break
                regs.append(v)  # type: ignore[arg-type]
        if reason:
            rejected.append((names[1], line, reason))
            continue
        assert ts is not None
        events.append((ts, 1, line, Event(ts, index[f[1]], regs=regs)))

    owner: dict[str, str] = {}
    header, idx, rows = _table(
        payments, ("ts", "payment_id", "meter", "amount", "status", "channel")
    )
    for line, row in rows:
        if len(row) <= max(idx):
            rejected.append(
                (
                    names[2],
                    line,
                    f"row has {len(row)} fields, needs {max(idx) + 1} (header: {','.join(header)})",
                )
            )
            continue
        ts_text, pid, meter, amount_text, status, _channel = (row[i].strip() for i in idx)
        ts = parse_ts(clock, ts_text)
        reason = ""
        amount = 0
        if ts is None:
            reason = f"ts: {ts_text!r} {TS_WORDS}"
        elif not pid:
            reason = "payment_id: empty"
        elif not re.fullmatch(r"[0-9]{12}", meter):
            reason = f"meter: {meter!r} is not a 12-digit meter address"
        elif meter not in index:
            reason = f"meter: {meter} is not in the archive"
        else:
            v = money(amount_text, 2)
            if isinstance(v, str):
                reason = f"amount: {amount_text!r} {v} (yuan, positive, at most 2 decimals)"
            elif v <= 0:
                reason = f"amount: {amount_text!r} is not positive"
            elif v > 10**11:
                reason = "amount: beyond 1,000,000,000 yuan"
            else:
                amount = v * 10_000
        if not reason and status.lower() not in ("settled", "pending", "failed"):
            reason = f"status: {status!r} is not one of settled, pending, failed"
        if not reason and owner.get(pid, meter) != meter:
            reason = f"payment_id: {pid!r} already belongs to meter {owner[pid]}"
        if reason:
            rejected.append((names[2], line, reason))
            continue
        assert ts is not None
        owner[pid] = meter
        events.append(
            (ts, 0, line, Event(ts, index[meter], pid=pid, amount=amount, status=status.lower()))
        )

    events.sort(key=lambda e: (e[0], e[1], e[2]))
    ordered = [e[3] for e in events]
    results = run(tariff, mlist, ordered)
    commands = ["ts,meter,action,balance"]
    out_events = ["ts,meter,kind,detail"]
    for i, mi, what, detail in results:
        ev = ordered[i]
        when = local_iso(clock, ev.ts)
        addr = mlist[mi].address
        if what in ("cutoff", "reconnect"):
            commands.append(f"{when},{addr},{what},{yuan(detail)}")  # type: ignore[arg-type]
            continue
        if what in ("rollover", "backwards"):
            text = " ".join(detail)  # type: ignore[arg-type]
        elif what == "implausible":
            d_total, dt = detail  # type: ignore[misc]
            secs = f"{dt // NS}" if dt % NS == 0 else f"{dt // NS}.{dt % NS:09d}".rstrip("0")
            text = f"{d_total // 100}.{d_total % 100:02d} kWh in {secs} s"
        elif what in ("duplicate", "failed"):
            what = "duplicate_payment" if what == "duplicate" else "payment_failed"
            text = str(detail)
        elif what in ("alert1", "alert2"):
            text = yuan(detail)  # type: ignore[arg-type]
        else:
            text = str(detail)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow([when, addr, what, text])
        out_events.append(buf.getvalue())
    balances = ["meter,balance,charged,paid,relay"]
    for m in mlist:
        balances.append(
            f"{m.address},{yuan(m.balance)},{yuan(m.charged)},{yuan(m.paid)},{'open' if m.relay_open else 'closed'}"
        )
    rej = io.StringIO()
    w = csv.writer(rej, lineterminator="\n")
    w.writerow(["file", "line", "reason"])
    order_files = {n: k for k, n in enumerate(names)}
    w.writerows(sorted(rejected, key=lambda r: (order_files[r[0]], r[1])))
    return {
        "balances.csv": "\n".join(balances) + "\n",
        "commands.csv": "\n".join(commands) + "\n",
        "events.csv": "\n".join(out_events) + "\n",
        "rejected.csv": rej.getvalue(),
    }
