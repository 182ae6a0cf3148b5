"""Recorded consumption: the Low Carbon London half-hourly file, parsed exactly and fast.

Source: UK Power Networks' Low Carbon London smart-meter trial ("SmartMeter Energy Consumption
Data in London Households", London Datastore; the Kaggle extract "Smart meters in London" carries
the same files). 325 households, calendar year 2013, `meter,ts,kwh`, one row per half hour.

The parse is vectorised over the whole file (no per-row Python), and exact: `kwh` is turned
into integer watt-hours by decimal digit arithmetic, rounded half up, never through a float.
Rows must be sorted by meter (the published file is). It never modifies the source file.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from meterstream.errors import UserError

#: Where the recorded year lives next to a checkout (overridable with METERSTREAM_LCL_DATA).
DEFAULT_RELATIVE = Path("..") / "shared" / "data" / "lcl_2013_halfhourly.csv.gz"
HEADER = b"meter,ts,kwh"
INTERVAL_S = 1800


@dataclass(frozen=True)
class Consumption:
    """Half-hourly consumption of several meters, rows grouped by meter (CSR layout).

    `ts` is the start of each half hour in *wall seconds*: seconds since 1970-01-01 00:00 of
    the recorded local clock (the file carries no zone). `wh` is the energy consumed in that
    half hour in watt-hours. Rows of meter `i` are `starts[i]:starts[i+1]`, in time order.
    """

    meter_ids: tuple[str, ...]
    starts: np.ndarray  # int64 [n_meters + 1]
    ts: np.ndarray  # int64 [n_rows], wall seconds
    wh: np.ndarray  # int64 [n_rows]

    @property
    def n_meters(self) -> int:
        return len(self.meter_ids)

    @property
    def n_rows(self) -> int:
        return int(self.ts.shape[0])

    def rows(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ts, wh) of meter `i`."""
        a, b = int(self.starts[i]), int(self.starts[i + 1])
        return self.ts[a:b], self.wh[a:b]


def default_path() -> Path:
    """The recorded year: $METERSTREAM_LCL_DATA, else ../shared/data next to the checkout."""
    env = os.environ.get("METERSTREAM_LCL_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return (repo / DEFAULT_RELATIVE).resolve()


_ERRORS = {
    1: "row too short for 'MACnnnnnn,YYYY-MM-DD hh:mm:ss,kwh'",
    2: "expected 'MAC' and six digits, then a comma",
    3: "expected a time 'YYYY-MM-DD hh:mm:ss', then a comma",
    4: "bad date or time",
    5: "kwh is not a decimal number of at most 12 characters",
}


@njit(cache=True)
def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    if m <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


@njit(cache=True)
def _num(buf: np.ndarray, pos: int, width: int) -> int:
    v = 0
    for k in range(width):
        c = buf[pos + k]
        if c < 48 or c > 57:
            return -1
        v = v * 10 + (c - 48)
    return v


@njit(cache=True)
def _parse_rows(buf: np.ndarray, meter: np.ndarray, ts: np.ndarray, wh: np.ndarray) -> tuple[int, int, int]:
    """One pass over the file after its header line. Returns (rows, bad line number, error code)."""
    n = buf.shape[0]
    i = 0
    while i < n and buf[i] != 10:
        i += 1
    i += 1
    line = 1
    rows = 0
    while i < n:
        line += 1
        e = i
        while e < n and buf[e] != 10:
            e += 1
        end = e
        if end > i and buf[end - 1] == 13:
            end -= 1
        if end == i:  # blank line
            i = e + 1
            continue
        if end - i < 31:
            return rows, line, 1
        m = _num(buf, i + 3, 6)
        if buf[i] != 77 or buf[i + 1] != 65 or buf[i + 2] != 67 or m < 0 or buf[i + 9] != 44:
            return rows, line, 2
        if buf[i + 14] != 45 or buf[i + 17] != 45 or buf[i + 20] != 32 or buf[i + 23] != 58 \
                or buf[i + 26] != 58 or buf[i + 29] != 44:
            return rows, line, 3
        year = _num(buf, i + 10, 4)
        month = _num(buf, i + 15, 2)
        day = _num(buf, i + 18, 2)
        hh = _num(buf, i + 21, 2)
        mi = _num(buf, i + 24, 2)
        ss = _num(buf, i + 27, 2)
        if year < 0 or month < 1 or month > 12 or day < 1 or day > 31 or hh < 0 or hh > 23 \
                or mi < 0 or mi > 59 or ss < 0 or ss > 59:
            return rows, line, 4
        # kwh -> Wh, exact decimal arithmetic, rounded half up at the Wh.
        k = i + 30
        if end - k > 12:
            return rows, line, 5
        whole = 0
        frac = 0  # fraction in 1e-9 units
        scale = 100_000_000
        seen_dot = False
        digits = 0
        while k < end:
            c = buf[k]
            if c == 46 and not seen_dot:
                seen_dot = True
            elif 48 <= c <= 57:
                digits += 1
                if not seen_dot:
                    whole = whole * 10 + (c - 48)
                elif scale > 0:
                    frac += (c - 48) * scale
                    scale //= 10
            else:
                return rows, line, 5
            k += 1
        if digits == 0:
            return rows, line, 5
        meter[rows] = m
        ts[rows] = _days_from_civil(year, month, day) * 86400 + hh * 3600 + mi * 60 + ss
        wh[rows] = whole * 1000 + (frac + 500_000) // 1_000_000
        rows += 1
        i = e + 1
    return rows, 0, 0


def parse_consumption(raw: bytes, *, source: str = "<bytes>") -> Consumption:
    """Parse the bytes of a `meter,ts,kwh` file (LCL layout). Raises UserError on a bad row."""
    if not raw.startswith(HEADER):
        raise UserError(f"expected the header {HEADER.decode()!r} on line 1", where=source)
    buf = np.frombuffer(raw, dtype=np.uint8)
    cap = int(np.count_nonzero(buf == 10)) + 1
    meter = np.empty(cap, np.int64)
    ts = np.empty(cap, np.int64)
    wh = np.empty(cap, np.int64)
    rows, bad_line, code = _parse_rows(buf, meter, ts, wh)
    if code:
        raise UserError(_ERRORS[code], where=f"{source}:{bad_line}")
    meter, ts, wh = meter[:rows], ts[:rows].copy(), wh[:rows].copy()
    change = np.flatnonzero(np.diff(meter)) + 1
    group_starts = np.concatenate(([0], change, [rows])).astype(np.int64)
    nums = meter[group_starts[:-1]]
    if np.unique(nums).shape[0] != nums.shape[0]:
        raise UserError("rows are not grouped by meter (sort the file by meter, then time)", where=source)
    ids = tuple(f"MAC{int(x):06d}" for x in nums)
    return Consumption(ids, group_starts, ts, wh)


def load_consumption(path: str | os.PathLike[str] | None = None, *, meters: int | None = None) -> Consumption:
    """Read the recorded file (gzip or plain), optionally only its first `meters` meters."""
    p = Path(path) if path is not None else default_path()
    if not p.exists():
        raise UserError(
            "recorded consumption file not found; pass its path or set METERSTREAM_LCL_DATA", where=str(p)
        )
    with open(p, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(p, "rb") as fh:
        raw = fh.read()
    data = parse_consumption(raw, source=str(p))
    if meters is not None and meters < data.n_meters:
        end = int(data.starts[meters])
        data = Consumption(data.meter_ids[:meters], data.starts[: meters + 1].copy(), data.ts[:end], data.wh[:end])
    return data


def meter_address(index: int, *, prefix: int = 4401) -> str:
    """The 12-digit DL/T 645 address given to recorded meter number `index` (0-based)."""
    return f"{prefix:04d}{index:08d}"
