"""The recorded-consumption loader: exact Wh, wall-clock times, grouping, and clear errors."""

from __future__ import annotations

import gzip
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterfield.lcl import load_consumption, meter_address, parse_consumption
from meterstream.errors import UserError

SLICE = Path(__file__).parent / "data" / "lcl_slice.csv"


def reference_rows(text: str) -> list[tuple[str, int, int]]:
    """The same parse with the standard library: (meter, wall seconds, Wh rounded half up)."""
    from datetime import datetime

    out = []
    for line in text.splitlines()[1:]:
        if not line.strip():
            continue
        meter, ts, kwh = line.split(",")
        secs = int((datetime.fromisoformat(ts) - datetime(1970, 1, 1)).total_seconds())
        wh = int((Decimal(kwh) * 1000).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        out.append((meter, secs, wh))
    return out


def flatten(c) -> list[tuple[str, int, int]]:
    rows = []
    for i, mid in enumerate(c.meter_ids):
        ts, wh = c.rows(i)
        rows.extend((mid, int(t), int(w)) for t, w in zip(ts, wh))
    return rows


def test_slice_matches_a_standard_library_parse() -> None:
    c = load_consumption(SLICE)
    assert c.meter_ids == ("MAC000002", "MAC000003", "MAC000004")
    assert flatten(c) == reference_rows(SLICE.read_text())
    assert c.n_rows == 432
    # 2013-01-01 00:00 wall clock
    assert int(c.ts[0]) == 1356998400


def test_gzip_and_plain_give_the_same(tmp_path: Path) -> None:
    gz = tmp_path / "slice.csv.gz"
    gz.write_bytes(gzip.compress(SLICE.read_bytes()))
    a, b = load_consumption(SLICE), load_consumption(gz)
    assert a.meter_ids == b.meter_ids
    assert np.array_equal(a.ts, b.ts) and np.array_equal(a.wh, b.wh)


def test_meters_limit_keeps_the_first_meters() -> None:
    c = load_consumption(SLICE, meters=2)
    assert c.meter_ids == ("MAC000002", "MAC000003")
    assert c.n_rows == int(c.starts[-1])


kwh_text = st.one_of(
    st.integers(0, 99_999).map(str),
    st.tuples(st.integers(0, 999), st.text("0123456789", min_size=1, max_size=8)).map(
        lambda t: f"{t[0]}.{t[1]}"
    ),
)


@given(st.lists(kwh_text, min_size=1, max_size=20))
def test_kwh_is_exact_to_the_wh(values: list[str]) -> None:
    lines = ["meter,ts,kwh"]
    for i, v in enumerate(values):
        lines.append(f"MAC000007,2013-03-01 {i // 2:02d}:{30 * (i % 2):02d}:00,{v}")
    text = "\r\n".join(lines) + "\r\n"
    assert flatten(parse_consumption(text.encode())) == reference_rows(text)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("MAC000002,2013-01-01 00:00:00,abc", "kwh is not a decimal number"),
        ("MAC000002,2013-13-01 00:00:00,0.1", "bad date or time"),
        ("XYZ000002,2013-01-01 00:00:00,0.1", "expected 'MAC'"),
        ("MAC000002,2013-01-01T00:00:00,0.1", "expected a time"),
        ("MAC000002,2013", "row too short"),
    ],
)
def test_bad_rows_name_the_line_and_the_reason(row: str, reason: str) -> None:
    text = "meter,ts,kwh\nMAC000002,2013-01-01 00:00:00,0.1\n" + row + "\n"
    with pytest.raises(UserError) as err:
        parse_consumption(text.encode(), source="x.csv")
    assert "x.csv:3" in str(err.value) and reason in str(err.value)


def test_missing_header_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="header"):
        parse_consumption(b"a,b,c\n")
    with pytest.raises(UserError, match="not found"):
        load_consumption(tmp_path / "nope.csv.gz")


def test_rows_not_grouped_by_meter_are_refused() -> None:
    text = (
        "meter,ts,kwh\nMAC000002,2013-01-01 00:00:00,0.1\nMAC000003,2013-01-01 00:00:00,0.1\n"
        "MAC000002,2013-01-01 00:30:00,0.1\n"
    )
    with pytest.raises(UserError, match="grouped by meter"):
        parse_consumption(text.encode())


def test_meter_address_is_twelve_digits() -> None:
    assert meter_address(0) == "440100000000"
    assert meter_address(324) == "440100000324"
    assert len({meter_address(i) for i in range(325)}) == 325
