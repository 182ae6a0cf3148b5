"""The tariffs file: every rule checked with file, key and reason; exact amounts; the zone table."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.errors import UserError
from meterstream.kernels.tariffs import (
    INT64_MAX,
    NS,
    P_ALERT1,
    P_CUTOFF,
    P_FLAT,
    P_MAX,
    P_NTIERS,
    P_PERIOD,
    P_RECONNECT,
    P_T1,
    P_TIER0,
    P_TOU,
    PERIOD_MONTH,
    PERIOD_YEAR,
    W_DAYS,
    W_END,
    W_GRACE,
    W_START,
    local_to_utc,
    utc_offset,
    zone_segments,
)
from meterstream.pipeline.cli import main
from meterstream.pipeline.tariffs import compile_spec, load_tariffs, parse_tariffs, parse_units

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "tariffs-example.toml"

BASE = """
timezone = "Asia/Shanghai"
withholding_grace_hours = 72
holidays = ["2013-10-01", 2013-10-02]

[cutoff_window]
days = ["mon", "tue", "wed", "thu", "fri"]
start = "08:00"
end = "18:00"

[plans.home]
flat = "0.5283"
t1 = "0.8283"
t2 = "0.6283"
t3 = "0.5283"
t4 = "0.2883"
tier_period = "year"
tiers = [{ upto_kwh = "2760", add = "0" }, { upto_kwh = 4800, add = "0.05" }, { add = 0.3 }]
alert1 = "50.00"
alert2 = "20"
cutoff = "-10.50"
reconnect = "10.00"
max_kw = "20"
"""


def test_example_file_compiles() -> None:
    spec = load_tariffs(EXAMPLE)
    assert spec.timezone == "Asia/Shanghai" and spec.grace_ns == 72 * 3600 * NS
    assert {p.name for p in spec.plans} >= {
        "residential_tou",
        "residential_flat",
        "dedicated_tou",
        "transformer",
    }
    c = compile_spec(spec)
    assert c.plans.dtype == np.int64 and c.tiers.dtype == np.int64 and c.zone.dtype == np.int64


def test_amounts_are_exact_integers_in_their_units() -> None:
    spec = parse_tariffs(BASE)
    (p,) = spec.plans
    assert p.flat == 5283 and p.tou == (8283, 6283, 5283, 2883)
    assert p.tier_period == PERIOD_YEAR
    assert p.tiers == ((276_000, 0), (480_000, 500), (None, 3000))
    assert (p.alert1, p.alert2, p.cutoff, p.reconnect) == (
        50_000_000,
        20_000_000,
        -10_500_000,
        10_000_000,
    )
    assert p.max_kw_centi == 2000
    c = compile_spec(spec)
    row = c.plans[0]
    assert (
        row[P_FLAT] == 5283
        and list(row[P_T1 : P_T1 + 4]) == [8283, 6283, 5283, 2883]
        and row[P_TOU] == 1
    )
    assert row[P_MAX] == 2000 and row[P_PERIOD] == PERIOD_YEAR
    assert (
        row[P_ALERT1] == 50_000_000
        and row[P_CUTOFF] == -10_500_000
        and row[P_RECONNECT] == 10_000_000
    )
    t0, nt = row[P_TIER0], row[P_NTIERS]
    assert c.tiers[t0 : t0 + nt].tolist() == [[276_000, 0], [480_000, 500], [INT64_MAX, 3000]]
    assert c.window[W_DAYS] == 0b0011111
    assert c.window[W_START] == 8 * 3600 * NS and c.window[W_END] == 18 * 3600 * NS
    assert c.window[W_GRACE] == 72 * 3600 * NS
    assert c.holidays.tolist() == [15979, 15980]  # 2013-10-01, 2013-10-02


def _variant(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new)


BROKEN = [
    (_variant('flat = "0.5283"', 'flat = "0.52831"'), "plans.home.flat", "more than 4 decimals"),
    (_variant('flat = "0.5283"', 'flat = "abc"'), "plans.home.flat", "not a decimal number"),
    (_variant('flat = "0.5283"', 'flat = "-0.1"'), "plans.home.flat", "must not be negative"),
    (_variant('flat = "0.5283"\n', ""), "plans.home.flat", "missing"),
    (_variant('t4 = "0.2883"\n', ""), "plans.home.t4", "all of t1..t4 or none"),
    (
        _variant('tier_period = "year"', 'tier_period = "week"'),
        "plans.home.tier_period",
        "expected",
    ),
    (_variant('tier_period = "year"\n', ""), "plans.home.tier_period", "tiers need a tier_period"),
    (
        _variant('tier_period = "year"', 'tier_period = "none"'),
        "plans.home.tiers",
        'tier_period is "none"',
    ),
    (
        _variant("{ add = 0.3 }", "{ upto_kwh = 9000, add = 0.3 }"),
        "plans.home.tiers[2].upto_kwh",
        "last tier",
    ),
    (
        _variant('{ upto_kwh = 4800, add = "0.05" }', '{ add = "0.05" }'),
        "plans.home.tiers[1].upto_kwh",
        "missing",
    ),
    (_variant("upto_kwh = 4800", "upto_kwh = 2000"), "plans.home.tiers[1].upto_kwh", "increase"),
    (
        _variant('upto_kwh = "2760"', 'upto_kwh = "2760.001"'),
        "plans.home.tiers[0].upto_kwh",
        "more than 2 decimals",
    ),
    (
        _variant("{ add = 0.3 }", "{ add = 0.3, price = 1 }"),
        "plans.home.tiers[2].price",
        "unknown key",
    ),
    (_variant("tiers = [", "tiers = [] #"), "plans.home.tiers", "non-empty list"),
    (
        _variant('reconnect = "10.00"', 'reconnect = "-20"'),
        "plans.home.reconnect",
        "at least the cutoff",
    ),
    (
        _variant('alert1 = "50.00"', 'alert1 = "50.001"'),
        "plans.home.alert1",
        "more than 2 decimals",
    ),
    (_variant('alert2 = "20"\n', ""), "plans.home.alert2", "missing"),
    (_variant('max_kw = "20"', "max_kw = 0"), "plans.home.max_kw", "above 0"),
    (_variant('max_kw = "20"', "max_kw = true"), "plans.home.max_kw", "true/false"),
    (_variant('max_kw = "20"', 'max_kw = "20"\nmaxkw = 3'), "plans.home.maxkw", "unknown key"),
    (
        _variant('timezone = "Asia/Shanghai"', 'timezone = "Mars/Olympus"'),
        "timezone",
        "unknown time zone",
    ),
    (
        _variant("withholding_grace_hours = 72", "withholding_grace_hours = -1"),
        "withholding_grace_hours",
        "negative",
    ),
    (_variant("withholding_grace_hours = 72\n", ""), "withholding_grace_hours", "missing"),
    (_variant('"2013-10-01", 2013-10-02', '"2013-10-32"'), "holidays[0]", "no such date"),
    (_variant('"2013-10-01", 2013-10-02', '"tomorrow"'), "holidays[0]", "YYYY-MM-DD"),
    (
        _variant('days = ["mon", "tue", "wed", "thu", "fri"]', 'days = ["mon", "funday"]'),
        "cutoff_window.days[1]",
        "expected one of",
    ),
    (
        _variant('days = ["mon", "tue", "wed", "thu", "fri"]', 'days = ["mon", "mon"]'),
        "cutoff_window.days[1]",
        "twice",
    ),
    (
        _variant('days = ["mon", "tue", "wed", "thu", "fri"]', "days = []"),
        "cutoff_window.days",
        "non-empty",
    ),
    (_variant('start = "08:00"', 'start = "8:00"'), "cutoff_window.start", "HH:MM"),
    (_variant('start = "08:00"', 'start = "25:00"'), "cutoff_window.start", "no such time"),
    (_variant('end = "18:00"', 'end = "07:00"'), "cutoff_window.end", "after start"),
    (_variant("[cutoff_window]", "[cutoff_windows]"), "cutoff_windows", "unknown key"),
    (BASE + "\n[plans.empty]\n", "plans.empty.flat", "missing"),
    (BASE + "\n[[broken", "", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key", "reason"), BROKEN)
def test_each_broken_rule_names_file_key_and_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_tariffs(text, source="t.toml")
    message = str(exc.value)
    assert re.match(rf"t\.toml(:\d+)?: {re.escape(key)}", message) and reason in message, message


def test_the_message_names_the_line() -> None:
    with pytest.raises(UserError) as exc:
        parse_tariffs(_variant('t3 = "0.5283"', 't3 = "0.52833"'), source="t.toml")
    assert str(exc.value).startswith("t.toml:15: plans.home.t3: more than 4 decimals")
    with pytest.raises(UserError) as exc:
        parse_tariffs(_variant('alert2 = "20"\n', ""), source="t.toml")
    assert str(exc.value).startswith("t.toml:11: plans.home.alert2: missing")


def test_end_of_day_window_and_numbers_read_exactly() -> None:
    spec = parse_tariffs(
        _variant('end = "18:00"', 'end = "24:00"').replace('flat = "0.5283"', "flat = 0.5283")
    )
    assert spec.window_end_ns == 24 * 3600 * NS and spec.plans[0].flat == 5283
    spec = parse_tariffs(_variant('tier_period = "year"', 'tier_period = "month"'))
    assert spec.plans[0].tier_period == PERIOD_MONTH


def test_broken_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "t.toml"
    bad.write_text(_variant('flat = "0.5283"', 'flat = "0.52831"'))
    empty = tmp_path / "e.csv"
    empty.write_text("x\n")
    code = main(
        [
            "replay",
            "--archive",
            str(empty),
            "--readings",
            str(empty),
            "--payments",
            str(empty),
            "--tariffs",
            str(bad),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{bad}:12: plans.home.flat: more than 4 decimals" in err
    assert not (tmp_path / "out").exists()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**12), st.integers(0, 6), st.integers(0, 4), st.booleans())
def test_parse_units_is_exact(value: int, frac_digits: int, decimals: int, negative: bool) -> None:
    text = str(value).rjust(frac_digits + 1, "0")
    if frac_digits:
        text = text[:-frac_digits] + "." + text[-frac_digits:]
    text = ("-" if negative else "") + text
    exact = Decimal(text) * 10**decimals
    if exact == exact.to_integral_value():
        assert parse_units(text, decimals, signed=True) == int(exact)
    else:
        with pytest.raises(ValueError, match="decimals"):
            parse_units(text, decimals, signed=True)


ZONES = [
    "Asia/Shanghai",
    "Europe/London",
    "America/New_York",
    "Australia/Lord_Howe",
    "America/Sao_Paulo",
    "Asia/Kolkata",
]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ZONES), st.integers(-2_200_000_000, 7_200_000_000))
def test_zone_table_matches_zoneinfo(name: str, seconds: int) -> None:
    tz = ZoneInfo(name)
    zone = zone_segments(tz)
    ts = seconds * NS
    off = datetime.fromtimestamp(seconds, tz).utcoffset()
    assert off is not None
    assert utc_offset(zone, ts) == int(off.total_seconds()) * NS
    # A naive local time reads as Python reads it (fold=0), also in skipped and repeated hours.
    wall = datetime(1970, 1, 1) + timedelta(seconds=seconds)
    aware_off = wall.replace(tzinfo=tz).utcoffset()
    assert aware_off is not None
    assert local_to_utc(zone, ts) == ts - int(aware_off.total_seconds()) * NS


def test_zone_table_around_a_dst_change() -> None:
    zone = zone_segments(ZoneInfo("Europe/London"))
    # 2013-03-31 01:00 UTC: clocks go 01:00 -> 02:00 local.
    change = int((datetime(2013, 3, 31, 1, tzinfo=UTC) - EPOCH).total_seconds()) * NS
    assert utc_offset(zone, change - 1) == 0 and utc_offset(zone, change) == 3600 * NS
    local_0130 = change + 1800 * NS  # 01:30 local does not exist: read with the offset before
    assert local_to_utc(zone, local_0130) == local_0130
