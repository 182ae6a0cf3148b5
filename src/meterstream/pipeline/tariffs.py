"""Read and check a tariffs TOML file, then compile it into the kernels' arrays.

Every amount is exact: prices, add-ons, thresholds and energies are parsed from their decimal
text into integers (0.0001 yuan/kWh, micro-yuan, 0.01 kWh). TOML numbers are accepted too,
because floats are read as `decimal.Decimal` straight from the file's text (never through a
binary float). A file that breaks a rule raises UserError naming the file, the key and the
reason; nothing is compiled from a file with a mistake in it.
"""

from __future__ import annotations

import re
import tomllib
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meterstream.errors import UserError
from meterstream.kernels.tariffs import (
    MAX_AMOUNT,
    MAX_MAX_KW_CENTI,
    MAX_PRICE,
    NS,
    PERIOD_NAMES,
    PERIOD_NONE,
    WEEKDAYS,
    CompiledTariff,
    PlanSpec,
    TariffSpec,
    compile_tariff,
)

DEFAULT_TIMEZONE = "Asia/Shanghai"
MAX_GRACE_HOURS = 24 * 366 * 10
MAX_PLANS = 65_535
MAX_TIER_KWH_CENTI = 10**12  # 10,000,000,000 kWh

_DECIMAL = re.compile(r"^([+-]?)(\d+)(?:\.(\d+))?$")
_HHMM = re.compile(r"^(\d{2}):(\d{2})$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

_TOP_KEYS = {"timezone", "withholding_grace_hours", "holidays", "cutoff_window", "plans"}
_WINDOW_KEYS = {"days", "start", "end"}
_PLAN_KEYS = {
    "flat",
    "t1",
    "t2",
    "t3",
    "t4",
    "tier_period",
    "tiers",
    "alert1",
    "alert2",
    "cutoff",
    "reconnect",
    "max_kw",
}
_TIER_KEYS = {"upto_kwh", "add"}


class _Bad(Exception):
    """A rule broken at `key` (dotted path inside the file)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


def parse_units(text: str, decimals: int, *, signed: bool = False) -> int:
    """Exact integer of a decimal string in units of 10**-decimals ("0.5283", 4 -> 5283).

    Raises ValueError with a reason a person can act on. Trailing zeros beyond `decimals` are
    fine (their value is exact); other extra digits are not.
    """
    m = _DECIMAL.match(text.strip())
    if not m:
        raise ValueError("not a decimal number")
    sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
    if sign == "-" and not signed:
        raise ValueError("must not be negative")
    extra = frac[decimals:]
    if extra.strip("0"):
        raise ValueError(f"more than {decimals} decimals")
    frac = frac[:decimals].ljust(decimals, "0")
    value = int(whole) * 10**decimals + (int(frac) if frac else 0)
    return -value if sign == "-" else value


def _units(value: Any, decimals: int, key: str, what: str, *, signed: bool = False) -> int:
    """A TOML value (string, integer or exact decimal) as an integer of 10**-decimals units."""
    if isinstance(value, bool):
        raise _Bad(key, f"expected {what}, found true/false")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise _Bad(key, f"expected {what}, found {value}")
        text = format(value, "f")
    elif isinstance(value, str):
        text = value
    else:
        raise _Bad(key, f"expected {what}, found {type(value).__name__}")
    try:
        return parse_units(text, decimals, signed=signed)
    except ValueError as exc:
        raise _Bad(key, f"{exc} (expected {what}, found {text!r})") from None


def _price(value: Any, key: str) -> int:
    p = _units(value, 4, key, 'a price in yuan/kWh with at most 4 decimals, e.g. "0.5283"')
    if p > MAX_PRICE:
        raise _Bad(key, "price above 9999.9999 yuan/kWh")
    return p


def _yuan(value: Any, key: str) -> int:
    y = _units(
        value, 2, key, 'an amount in yuan with at most 2 decimals, e.g. "20.00"', signed=True
    )
    micro = y * 10_000
    if abs(micro) > MAX_AMOUNT:
        raise _Bad(key, "amount beyond 1,000,000,000 yuan")
    return micro


def _table(value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(key, "expected a table")
    for k in value:
        if k not in allowed:
            where = f"{key}.{k}" if key else k
            raise _Bad(where, f"unknown key (known: {', '.join(sorted(allowed))})")
    return value


def _clock(value: Any, key: str, *, allow_24: bool) -> int:
    """ns after midnight of a local "HH:MM"."""
    if not isinstance(value, str) or not _HHMM.match(value):
        raise _Bad(key, f'expected a local time "HH:MM", found {value!r}')
    hh, mm = int(value[:2]), int(value[3:])
    if allow_24 and hh == 24 and mm == 0:
        return 24 * 3600 * NS
    if hh > 23 or mm > 59:
        raise _Bad(
            key,
            f"no such time of day: {value!r}" + (' (use "24:00" for midnight)' if allow_24 else ""),
        )
    return (hh * 3600 + mm * 60) * NS


def _plan(name: str, raw: Any) -> PlanSpec:
    key = f"plans.{name}"
    t = _table(raw, key, _PLAN_KEYS)
    if "flat" not in t:
        raise _Bad(f"{key}.flat", "missing: every plan needs a flat price (yuan/kWh)")
    flat = _price(t["flat"], f"{key}.flat")
    tou_keys = [k for k in ("t1", "t2", "t3", "t4") if k in t]
    tou: tuple[int, int, int, int] | None = None
    if tou_keys:
        missing = [k for k in ("t1", "t2", "t3", "t4") if k not in t]
        if missing:
            raise _Bad(f"{key}.{missing[0]}", "missing: a plan gives all of t1..t4 or none of them")
        a, b, c, d = (_price(t[k], f"{key}.{k}") for k in ("t1", "t2", "t3", "t4"))
        tou = (a, b, c, d)
    period_name = t.get("tier_period")
    tiers_raw = t.get("tiers")
    if period_name is None:
        period = PERIOD_NONE
        if tiers_raw is not None:
            raise _Bad(
                f"{key}.tier_period", 'missing: tiers need a tier_period ("year" or "month")'
            )
    else:
        if not isinstance(period_name, str) or period_name not in PERIOD_NAMES:
            raise _Bad(
                f"{key}.tier_period", f'expected "year", "month" or "none", found {period_name!r}'
            )
        period = PERIOD_NAMES[period_name]
        if period == PERIOD_NONE and tiers_raw is not None:
            raise _Bad(
                f"{key}.tiers",
                'tier_period is "none": remove the tiers or choose "year" or "month"',
            )
        if period != PERIOD_NONE and tiers_raw is None:
            raise _Bad(
                f"{key}.tiers", f'missing: tier_period is "{period_name}" but no tiers are given'
            )
    tiers: list[tuple[int | None, int]] = []
    if tiers_raw is not None:
        if not isinstance(tiers_raw, list) or not tiers_raw:
            raise _Bad(f"{key}.tiers", "expected a non-empty list of {upto_kwh, add} tables")
        last_upto = 0
        for i, tier in enumerate(tiers_raw):
            tkey = f"{key}.tiers[{i}]"
            tt = _table(tier, tkey, _TIER_KEYS)
            if "add" not in tt:
                raise _Bad(f"{tkey}.add", "missing: each tier block has an add-on price (yuan/kWh)")
            add = _price(tt["add"], f"{tkey}.add")
            is_last = i == len(tiers_raw) - 1
            if is_last:
                if "upto_kwh" in tt:
                    raise _Bad(
                        f"{tkey}.upto_kwh",
                        "the last tier block has no upper bound: remove upto_kwh",
                    )
                tiers.append((None, add))
                continue
            if "upto_kwh" not in tt:
                raise _Bad(
                    f"{tkey}.upto_kwh", "missing: every tier block but the last has upto_kwh"
                )
            upto = _units(tt["upto_kwh"], 2, f"{tkey}.upto_kwh", "kWh with at most 2 decimals")
            if upto <= last_upto:
                raise _Bad(f"{tkey}.upto_kwh", "tier bounds must increase (and be above 0)")
            if upto > MAX_TIER_KWH_CENTI:
                raise _Bad(f"{tkey}.upto_kwh", "tier bound beyond 10,000,000,000 kWh")
            last_upto = upto
            tiers.append((upto, add))
    thresholds = {}
    for k in ("alert1", "alert2", "cutoff", "reconnect"):
        if k not in t:
            raise _Bad(
                f"{key}.{k}", "missing: a plan gives alert1, alert2, cutoff and reconnect (yuan)"
            )
        thresholds[k] = _yuan(t[k], f"{key}.{k}")
    if thresholds["reconnect"] < thresholds["cutoff"]:
        raise _Bad(
            f"{key}.reconnect", "must be at least the cutoff threshold (else the relay would flap)"
        )
    if "max_kw" not in t:
        raise _Bad(f"{key}.max_kw", "missing: the highest plausible average power in kW")
    max_kw = _units(t["max_kw"], 2, f"{key}.max_kw", "kW with at most 2 decimals")
    if max_kw <= 0:
        raise _Bad(f"{key}.max_kw", "must be above 0")
    if max_kw > MAX_MAX_KW_CENTI:
        raise _Bad(f"{key}.max_kw", "beyond 10,000,000 kW")
    return PlanSpec(
        name=name,
        flat=flat,
        tou=tou,
        tier_period=period,
        tiers=tuple(tiers),
        alert1=thresholds["alert1"],
        alert2=thresholds["alert2"],
        cutoff=thresholds["cutoff"],
        reconnect=thresholds["reconnect"],
        max_kw_centi=max_kw,
    )


def _spec(doc: dict[str, Any]) -> TariffSpec:
    _table(doc, "", _TOP_KEYS)
    tz_name = doc.get("timezone", DEFAULT_TIMEZONE)
    if not isinstance(tz_name, str) or not tz_name:
        raise _Bad("timezone", f'expected a zone name like "Asia/Shanghai", found {tz_name!r}')
    try:
        ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Bad(
            "timezone", f'unknown time zone {tz_name!r} (use an IANA name like "Asia/Shanghai")'
        ) from None
    if "withholding_grace_hours" not in doc:
        raise _Bad(
            "withholding_grace_hours", "missing: hours a pending bank withholding holds cut-offs"
        )
    grace_ms = _units(
        doc["withholding_grace_hours"], 3, "withholding_grace_hours", "hours (at most 3 decimals)"
    )
    if grace_ms > MAX_GRACE_HOURS * 1000:
        raise _Bad("withholding_grace_hours", f"more than {MAX_GRACE_HOURS} hours")
    grace_ns = grace_ms * 3600 * 1_000_000  # thousandths of an hour -> ns
    holidays_raw = doc.get("holidays", [])
    if not isinstance(holidays_raw, list):
        raise _Bad("holidays", 'expected a list of dates like ["2024-10-01", 2024-10-02]')
    holidays = set()
    for i, h in enumerate(holidays_raw):
        hkey = f"holidays[{i}]"
        if isinstance(h, date) and not hasattr(h, "hour"):
            d = h
        elif isinstance(h, str) and _DATE.match(h):
            try:
                d = date.fromisoformat(h)
            except ValueError:
                raise _Bad(hkey, f"no such date: {h!r}") from None
        else:
            raise _Bad(hkey, f"expected a date YYYY-MM-DD, found {h!r}")
        if not 1900 <= d.year <= 2199:
            raise _Bad(hkey, "year outside 1900..2199")
        holidays.add(d)
    if "cutoff_window" not in doc:
        raise _Bad("cutoff_window", "missing: the local days and hours when cut-offs may be issued")
    w = _table(doc["cutoff_window"], "cutoff_window", _WINDOW_KEYS)
    for k in ("days", "start", "end"):
        if k not in w:
            raise _Bad(f"cutoff_window.{k}", "missing")
    days_raw = w["days"]
    if not isinstance(days_raw, list) or not days_raw:
        raise _Bad(
            "cutoff_window.days",
            'expected a non-empty list like ["mon", "tue", "wed", "thu", "fri"]',
        )
    days = []
    for i, d in enumerate(days_raw):
        if not isinstance(d, str) or d.strip().lower() not in WEEKDAYS:
            raise _Bad(
                f"cutoff_window.days[{i}]", f"expected one of {', '.join(WEEKDAYS)}, found {d!r}"
            )
        day = WEEKDAYS.index(d.strip().lower())
        if day in days:
            raise _Bad(f"cutoff_window.days[{i}]", f"{d!r} is listed twice")
        days.append(day)
    start = _clock(w["start"], "cutoff_window.start", allow_24=False)
    end = _clock(w["end"], "cutoff_window.end", allow_24=True)
    if start >= end:
        raise _Bad("cutoff_window.end", "must be after start (the window is within one local day)")
    plans_raw = doc.get("plans")
    if plans_raw is None:
        raise _Bad("plans", "missing: at least one [plans.NAME] table")
    if not isinstance(plans_raw, dict) or not plans_raw:
        raise _Bad("plans", "expected at least one [plans.NAME] table")
    if len(plans_raw) > MAX_PLANS:
        raise _Bad("plans", f"more than {MAX_PLANS} plans")
    plans = tuple(_plan(name, raw) for name, raw in plans_raw.items())
    return TariffSpec(
        timezone=tz_name,
        grace_ns=grace_ns,
        holidays=tuple(sorted(holidays)),
        window_days=tuple(sorted(days)),
        window_start_ns=start,
        window_end_ns=end,
        plans=plans,
    )


def parse_tariffs(text: str, *, source: str = "<tariffs>") -> TariffSpec:
    """Check the text of a tariffs TOML file; raises UserError (file, key, reason)."""
    try:
        doc = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"not valid TOML: {exc}", where=source) from None
    try:
        return _spec(doc)
    except _Bad as bad:
        line = line_of(text, bad.key)
        where = f"{source}:{line}" if line else source
        raise UserError(f"{bad.key}: {bad.reason}", where=where) from None


_HEADER_LINE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def line_of(text: str, key: str) -> int | None:
    """Best-effort line number of a dotted key (or of its table) in a TOML text, for messages."""
    parts = [re.sub(r"\[\d+\]$", "", k) for k in key.split(".")]
    leaf = parts[-1]
    table = ".".join(parts[:-1])
    current = ""
    header_line = None
    for n, line in enumerate(text.splitlines(), start=1):
        m = _HEADER_LINE.match(line)
        if m:
            current = re.sub(r"\s+", "", m.group(1)).replace('"', "")
            if current == ".".join(parts):
                return n
            if current == table:
                header_line = n
            continue
        if current == table and re.match(rf"^\s*{re.escape(leaf)}\s*=", line):
            return n
    return header_line


def load_tariffs(path: str | Path) -> TariffSpec:
    """Read and check a tariffs TOML file; raises UserError (file, key, reason)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError("tariffs file not found", where=str(p)) from None
    except OSError as exc:
        raise UserError(f"cannot read the tariffs file: {exc.strerror}", where=str(p)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", where=str(p)) from None
    return parse_tariffs(text, source=str(p))


def compile_spec(spec: TariffSpec) -> CompiledTariff:
    """The kernels' arrays of a checked tariff (resolves its zone)."""
    return compile_tariff(spec, ZoneInfo(spec.timezone))
