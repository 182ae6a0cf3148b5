"""`meterstream replay`: recorded traffic through the billing kernels, no field, no Kafka.

Reads an archive, readings, payments and a tariffs file, puts every event in the order the
rules say (ts; at equal ts payments first; then file order), runs the same numba rules as the
live pipeline (kernels/billing.py) and writes balances, commands, events and rejected rows.
The readings file is parsed by a numba byte parser in one pass (millions of rows); the small
files by the standard library. It never changes its inputs, and never lets a float near money.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from numba import njit

from meterstream.errors import UserError
from meterstream.kernels import billing as K
from meterstream.kernels.layout import Fleet, PaymentIdConflict
from meterstream.kernels.tariffs import (
    DAY_NS,
    NJIT,
    NS,
    Z_OFFSET,
    Z_UTC,
    ZONE_FIRST_YEAR,
    ZONE_LAST_YEAR,
    CompiledTariff,
    TariffSpec,
    days_from_civil,
    local_to_utc,
    new_clock,
)
from meterstream.pipeline.tariffs import compile_spec, load_tariffs, parse_units

ARCHIVE_COLUMNS = (
    "meter",
    "terminal",
    "area",
    "class",
    "plan",
    "protected",
    "initial_balance",
    "role",
)
READING_COLUMNS = ("ts", "meter", "total", "t1", "t2", "t3", "t4")
PAYMENT_COLUMNS = ("ts", "payment_id", "meter", "amount", "status", "channel")
CLASSES = ("dedicated", "public", "lowvoltage")
ROLES = ("customer", "supply")
MAX_PAYMENT = 10**9 * 10**6  # micro-yuan

CHUNK_EVENTS = 1 << 18
CHUNK_BYTES = 32 << 20

TS_FORMAT = "ISO 8601 date and time, e.g. 2013-01-01T00:30:00 or 2013-01-01 00:30:00+08:00"

# Error codes of the numba readings parser.
E_FIELDS = 1
E_TS = 2
E_METER = 3
E_UNKNOWN = 4
E_NUMBER = 5
E_DECIMALS = 6
E_RANGE = 7


# ---------------------------------------------------------------------------------------------
# Byte-level parsing in numba (readings), shared with the payments' timestamps.


@njit(**NJIT)
def _digits(buf: np.ndarray, pos: int, width: int) -> int:
    v = 0
    for k in range(width):
        c = buf[pos + k]
        if c < 48 or c > 57:
            return -1
        v = v * 10 + (c - 48)
    return v


@njit(**NJIT)
def _strip(buf: np.ndarray, a: int, b: int) -> tuple[int, int]:
    while a < b and (buf[a] == 32 or buf[a] == 9):
        a += 1
    while b > a and (buf[b - 1] == 32 or buf[b - 1] == 9):
        b -= 1
    return a, b


@njit(**NJIT)
def parse_ts(buf: np.ndarray, a: int, b: int, zone: np.ndarray) -> tuple[bool, int]:
    """Epoch ns of an ISO 8601 time in buf[a:b]: YYYY-MM-DD[T ]hh:mm[:ss[.f{1,9}]][Z|±hh[:mm]].

    Without an offset the time is local in the tariff's zone (`zone`). Years 1900..2199.
    """
    a, b = _strip(buf, a, b)
    n = b - a
    if n < 16:
        return False, 0
    year = _digits(buf, a, 4)
    month = _digits(buf, a + 5, 2)
    day = _digits(buf, a + 8, 2)
    hh = _digits(buf, a + 11, 2)
    mi = _digits(buf, a + 14, 2)
    if (
        buf[a + 4] != 45
        or buf[a + 7] != 45
        or (buf[a + 10] != 84 and buf[a + 10] != 32)
        or buf[a + 13] != 58
    ):
        return False, 0
    if (
        year < ZONE_FIRST_YEAR
        or year >= ZONE_LAST_YEAR
        or month < 1
        or month > 12
        or day < 1
        or hh < 0
        or mi < 0
    ):
        return False, 0
    if hh > 23 or mi > 59:
        return False, 0
    leap = (year % 4 == 0 and year % 100 != 0) or year % 400 == 0
    mdays = 31
    if month == 2:
        mdays = 29 if leap else 28
    elif month == 4 or month == 6 or month == 9 or month == 11:
        mdays = 30
    if day > mdays:
        return False, 0
    p = a + 16
    ss = 0
    frac = 0
    if p < b and buf[p] == 58:
        if p + 3 > b:
            return False, 0
        ss = _digits(buf, p + 1, 2)
        if ss < 0 or ss > 59:
            return False, 0
        p += 3
        if p < b and buf[p] == 46:
            p += 1
            nd = 0
            scale = 100_000_000
            while p < b and 48 <= buf[p] <= 57:
                if nd == 9:
                    return False, 0
                frac += (buf[p] - 48) * scale
                scale //= 10
                nd += 1
                p += 1
            if nd == 0:
                return False, 0
    wall = ((days_from_civil(year, month, day) * 24 + hh) * 60 + mi) * 60 + ss
    wall_ns = wall * NS + frac
    if p == b:
        return True, local_to_utc(zone, wall_ns)
    c = buf[p]
    if c == 90 and p + 1 == b:  # Z
        return True, wall_ns
    if c != 43 and c != 45:
        return False, 0
    sign = 1 if c == 43 else -1
    p += 1
    oh = -1
    om = 0
    if b - p == 2:
        oh = _digits(buf, p, 2)
    elif b - p == 4:
        oh = _digits(buf, p, 2)
        om = _digits(buf, p + 2, 2)
    elif b - p == 5 and buf[p + 2] == 58:
        oh = _digits(buf, p, 2)
        om = _digits(buf, p + 3, 2)
    else:
        return False, 0
    if oh < 0 or oh > 23 or om < 0 or om > 59:
        return False, 0
    return True, wall_ns - sign * (oh * 3600 + om * 60) * NS


@njit(**NJIT)
def _parse_energy(buf: np.ndarray, a: int, b: int) -> tuple[int, int]:
    """(error code or 0, 0.01 kWh) of a register in kWh: digits[.digits], at most 2 decimals."""
    a, b = _strip(buf, a, b)
    if a == b:
        return E_NUMBER, 0
    whole = 0
    big = False
    p = a
    while p < b and 48 <= buf[p] <= 57:
        whole = whole * 10 + (buf[p] - 48)
        if whole > 999_999:
            big = True
            whole = 1_000_000
        p += 1
    if p == a:
        return E_NUMBER, 0
    frac = 0
    if p < b:
        if buf[p] != 46 or p + 1 == b:
            return E_NUMBER, 0
        p += 1
        nd = 0
        extra = False
        while p < b and 48 <= buf[p] <= 57:
            if nd < 2:
                frac = frac * 10 + (buf[p] - 48)
            elif buf[p] != 48:
                extra = True
            nd += 1
            p += 1
        if p != b:
            return E_NUMBER, 0
        if nd == 1:
            frac *= 10
        if extra:
            return E_DECIMALS, 0
    if big:
        return E_RANGE, 0
    return 0, whole * 100 + frac


@njit(**NJIT)
def _address(buf: np.ndarray, a: int, b: int) -> int:
    """The 12-digit meter address in buf[a:b] as an integer, -1 if it is not one."""
    a, b = _strip(buf, a, b)
    if b - a != 12:
        return -1
    v = 0
    for p in range(a, b):
        c = buf[p]
        if c < 48 or c > 57:
            return -1
        v = v * 10 + (c - 48)
    return v


@njit(**NJIT)
def _parse_readings(
    buf: np.ndarray,
    pos: int,
    stop: int,
    line: int,
    cols: np.ndarray,
    fields: np.ndarray,
    zone: np.ndarray,
    addresses: np.ndarray,
    slots: np.ndarray,
    n_ok: int,
    r_slot: np.ndarray,
    r_ts: np.ndarray,
    r_reg: np.ndarray,
    r_line: np.ndarray,
    n_err: int,
    err_line: np.ndarray,
    err_code: np.ndarray,
    err_col: np.ndarray,
    err_pos: np.ndarray,
) -> tuple[int, int, int, int]:
    """Parse the lines starting in buf[pos:stop]; `line` is the number of the line at `pos`.

    cols[k]: field index of READING_COLUMNS[k]; `fields` is scratch (int64[2 * n_fields]).
    Good rows go to r_* at n_ok.., bad ones to err_* at n_err.. (line, code, column k, byte
    offset of the line). Returns (pos, line, n_ok, n_err) after the last line parsed.
    """
    n = buf.shape[0]
    need = fields.shape[0] // 2
    while pos < stop:
        e = pos
        while e < n and buf[e] != 10:
            e += 1
        end = e
        if end > pos and buf[end - 1] == 13:
            end -= 1
        start = pos
        pos = e + 1
        this_line = line
        line += 1
        a, b = _strip(buf, start, end)
        if a == b:  # a blank line is not a row
            continue
        # Split into fields (double quotes around a field are removed).
        f = 0
        p = start
        while f < need:
            if p < end and buf[p] == 34:
                q = p + 1
                while q < end:
                    if buf[q] == 34:
                        if q + 1 < end and buf[q + 1] == 34:
                            q += 2
                            continue
                        break
                    q += 1
                fields[2 * f] = p + 1
                fields[2 * f + 1] = q
                p = q + 1
                while p < end and buf[p] != 44:
                    p += 1
            else:
                q = p
                while q < end and buf[q] != 44:
                    q += 1
                fields[2 * f] = p
                fields[2 * f + 1] = q
                p = q
            f += 1
            if p >= end:
                break
            p += 1  # the comma
        if f < need:
            err_line[n_err] = this_line
            err_code[n_err] = E_FIELDS
            err_col[n_err] = f
            err_pos[n_err] = start
            n_err += 1
            continue
        code = 0
        col = 0
        c = cols[0]
        ok, ts = parse_ts(buf, fields[2 * c], fields[2 * c + 1], zone)
        if not ok:
            code = E_TS
        slot = -1
        if code == 0:
            col = 1
            c = cols[1]
            addr = _address(buf, fields[2 * c], fields[2 * c + 1])
            if addr < 0:
                code = E_METER
            else:
                k = np.searchsorted(addresses, addr)
                if k < addresses.shape[0] and addresses[k] == addr:
                    slot = slots[k]
                else:
                    code = E_UNKNOWN
        if code == 0:
            for r in range(5):
                c = cols[2 + r]
                ecode, value = _parse_energy(buf, fields[2 * c], fields[2 * c + 1])
                if ecode != 0:
                    code = ecode
                    col = 2 + r
                    break
                r_reg[n_ok, r] = value
        if code != 0:
            err_line[n_err] = this_line
            err_code[n_err] = code
            err_col[n_err] = col
            err_pos[n_err] = start
            n_err += 1
            continue
        r_slot[n_ok] = slot
        r_ts[n_ok] = ts
        r_line[n_ok] = this_line
        n_ok += 1
    return pos, line, n_ok, n_err


@njit(**NJIT)
def _count_lines(buf: np.ndarray) -> int:
    n = 0
    for i in range(buf.shape[0]):
        if buf[i] == 10:
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Inputs.


@dataclass
class Rejected:
    """Rows that were not used: (file, line, reason), in file order per file."""

    rows: list[tuple[str, int, str]] = field(default_factory=list)

    def add(self, file: str, line: int, reason: str) -> None:
        self.rows.append((file, line, reason))


@dataclass
class Archive:
    """The meters that were accepted, in archive order, and their slots in the fleet."""

    addresses: list[str]  # archive order
    slot_of: dict[str, int]  # address -> slot
    fleet: Fleet


@dataclass
class Readings:
    slot: np.ndarray
    ts: np.ndarray
    reg: np.ndarray  # int64 [n, 5]: total, t1..t4 in 0.01 kWh
    line: np.ndarray


@dataclass
class Payments:
    slot: np.ndarray
    ts: np.ndarray
    key: np.ndarray
    amount: np.ndarray
    status: np.ndarray
    line: np.ndarray
    ids: list[str]


def _open_text(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} file not found", where=str(path)) from None
    except OSError as exc:
        raise UserError(f"cannot read the {what} file: {exc.strerror}", where=str(path)) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text (byte {exc.start})", where=str(path)) from None


def _header(names: list[str], wanted: tuple[str, ...], source: str) -> list[int]:
    """Field index of each wanted column; UserError naming what is missing."""
    clean = [n.strip().lower() for n in names]
    idx = []
    for w in wanted:
        if w not in clean:
            raise UserError(
                f"the header lacks the column {w!r} (it needs {','.join(wanted)}; "
                f"found {','.join(names)})",
                where=f"{source}:1",
            )
        idx.append(clean.index(w))
    return idx


def _rows(
    text: str, source: str, wanted: tuple[str, ...]
) -> Iterator[tuple[int, list[str] | None, str]]:
    """(line, the wanted fields or None, reason) of each data row."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError("empty file: expected a header line", where=source) from None
    idx = _header(header, wanted, source)
    need = max(idx) + 1
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < need:
                yield (
                    reader.line_num,
                    None,
                    f"row has {len(row)} fields, needs {need} (header: {','.join(header)})",
                )
                continue
            yield reader.line_num, [row[i].strip() for i in idx], ""
    except csv.Error as exc:
        raise UserError(f"line {reader.line_num}: not CSV: {exc}", where=source) from None


def read_archive(
    path: Path, spec: TariffSpec, tariff: CompiledTariff, rejected: Rejected
) -> Archive:
    """The accepted archive rows as a fleet (slots grouped by terminal, in order of appearance)."""
    source = str(path)
    text = _open_text(path, "archive")
    plan_index = spec.plan_index()
    seen: dict[str, int] = {}
    meters: list[
        tuple[str, str, int, int, int, int]
    ] = []  # address, terminal, plan, supply, prot, initial
    for line, f, reason in _rows(text, source, ARCHIVE_COLUMNS):
        if f is None:
            rejected.add(source, line, reason)
            continue
        meter, terminal, area, klass, plan, protected, initial, role = f
        bad = ""
        if len(meter) != 12 or not meter.isdigit() or not meter.isascii():
            bad = f"meter: {meter!r} is not a 12-digit meter address"
        elif meter in seen:
            bad = f"meter: {meter} is already in the archive (line {seen[meter]})"
        elif not terminal:
            bad = "terminal: empty"
        elif not area:
            bad = "area: empty"
        elif klass not in CLASSES:
            bad = f"class: {klass!r} is not one of {', '.join(CLASSES)}"
        elif plan not in plan_index:
            bad = f"plan: {plan!r} is not a plan of the tariffs file ({', '.join(plan_index)})"
        elif protected not in ("0", "1"):
            bad = f"protected: {protected!r} is not 0 or 1"
        elif role not in ROLES:
            bad = f"role: {role!r} is not one of {', '.join(ROLES)}"
        if not bad:
            try:
                micro = parse_units(initial, 6, signed=True)
                if abs(micro) > MAX_PAYMENT:
                    bad = "initial_balance: beyond 1,000,000,000 yuan"
            except ValueError as exc:
                bad = f"initial_balance: {exc} (yuan, at most 6 decimals), found {initial!r}"
        if bad:
            rejected.add(source, line, bad)
            continue
        seen[meter] = line
        meters.append(
            (meter, terminal, plan_index[plan], int(role == "supply"), int(protected), micro)
        )
    terminals: dict[str, int] = {}
    for m in meters:
        terminals.setdefault(m[1], len(terminals))
    order = sorted(range(len(meters)), key=lambda i: terminals[meters[i][1]])  # stable
    fleet = Fleet.build(
        terminal_ids=list(terminals),
        terminal_of=np.array([terminals[meters[i][1]] for i in order], np.int64),
        address=np.array([int(meters[i][0]) for i in order], np.int64),
        plan=np.array([meters[i][2] for i in order], np.int64),
        supply=np.array([meters[i][3] for i in order], np.int64),
        protected=np.array([meters[i][4] for i in order], np.int64),
        initial=np.array([meters[i][5] for i in order], np.int64),
        plans=tariff.plans,
    )
    slot_of = {meters[i][0]: slot for slot, i in enumerate(order)}
    return Archive([m[0] for m in meters], slot_of, fleet)


def _reading_reason(code: int, col: int, line_text: str, idx: list[int], n_header: int) -> str:
    if code == E_FIELDS:
        return f"row has {col} fields, needs {max(idx) + 1} (header has {n_header})"
    name = READING_COLUMNS[col]
    try:
        value = next(csv.reader([line_text]))[idx[col]].strip()
    except (StopIteration, IndexError, csv.Error):
        value = "?"
    if code == E_TS:
        return f"ts: {value!r} is not an {TS_FORMAT} (years 1900..2199)"
    if code == E_METER:
        return f"meter: {value!r} is not a 12-digit meter address"
    if code == E_UNKNOWN:
        return f"meter: {value} is not in the archive"
    if code == E_NUMBER:
        return f"{name}: {value!r} is not a register value in kWh (digits, at most 2 decimals)"
    if code == E_DECIMALS:
        return f"{name}: {value!r} has more than 2 decimals"
    return f"{name}: {value} is beyond the register range 0..999999.99 kWh"


def read_readings(
    path: Path, archive: Archive, tariff: CompiledTariff, rejected: Rejected, progress: bool
) -> Readings:
    """All readings rows: good ones as arrays (file order), bad ones into `rejected`."""
    from tqdm import tqdm

    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError("readings file not found", where=source) from None
    except OSError as exc:
        raise UserError(f"cannot read the readings file: {exc.strerror}", where=source) from None
    buf = np.frombuffer(raw, np.uint8)
    head_end = raw.find(b"\n")
    head_end = len(raw) if head_end < 0 else head_end
    try:
        header_text = raw[:head_end].decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError:
        raise UserError("line 1: the header is not UTF-8 text", where=source) from None
    if not header_text.strip():
        raise UserError("empty file: expected the header ts,meter,total,t1,t2,t3,t4", where=source)
    header = next(csv.reader([header_text]))
    idx = _header(header, READING_COLUMNS, source)
    cols = np.array(idx, np.int64)
    fields = np.zeros(2 * (max(idx) + 1), np.int64)
    cap = _count_lines(buf) + 1
    slot = np.empty(cap, np.int64)
    ts = np.empty(cap, np.int64)
    reg = np.empty((cap, 5), np.int64)
    line_no = np.empty(cap, np.int64)
    err_line = np.empty(cap, np.int64)
    err_code = np.empty(cap, np.int64)
    err_col = np.empty(cap, np.int64)
    err_pos = np.empty(cap, np.int64)
    addr_items = sorted((int(a), s) for a, s in archive.slot_of.items())
    addresses = np.array([a for a, _ in addr_items], np.int64)
    slots = np.array([s for _, s in addr_items], np.int64)
    pos, line, n_ok, n_err = head_end + 1, 2, 0, 0
    with tqdm(
        total=len(raw),
        unit="B",
        unit_scale=True,
        desc="readings",
        file=sys.stderr,
        disable=not progress,
        leave=False,
        initial=head_end + 1,
    ) as bar:
        while pos < len(raw):
            stop = min(pos + CHUNK_BYTES, len(raw))
            new_pos, line, n_ok, n_err = _parse_readings(
                buf,
                pos,
                stop,
                line,
                cols,
                fields,
                tariff.zone,
                addresses,
                slots,
                n_ok,
                slot,
                ts,
                reg,
                line_no,
                n_err,
                err_line,
                err_code,
                err_col,
                err_pos,
            )
            bar.update(new_pos - pos)
            pos = new_pos
    for k in range(n_err):
        start = int(err_pos[k])
        end = raw.find(b"\n", start)
        text = raw[start : len(raw) if end < 0 else end].decode("utf-8", "replace").rstrip("\r")
        reason = _reading_reason(int(err_code[k]), int(err_col[k]), text, idx, len(header))
        rejected.add(source, int(err_line[k]), reason)
    return Readings(slot[:n_ok], ts[:n_ok], reg[:n_ok], line_no[:n_ok])


@njit(**NJIT)
def _parse_ts_batch(
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    zone: np.ndarray,
    ok: np.ndarray,
    ts: np.ndarray,
) -> None:
    for i in range(starts.shape[0]):
        good, t = parse_ts(buf, starts[i], ends[i], zone)
        ok[i] = good
        ts[i] = t


def parse_ts_strings(texts: list[str], zone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ok, epoch ns) of each ISO 8601 string, with the same parser as the readings."""
    encoded = [t.encode("utf-8") for t in texts]
    lengths = np.array([len(b) for b in encoded], np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    buf = np.frombuffer(b"".join(encoded) or b"\0", np.uint8)
    ok = np.zeros(len(texts), np.bool_)
    ts = np.zeros(len(texts), np.int64)
    if texts:
        _parse_ts_batch(buf, starts, ends, zone, ok, ts)
    return ok, ts


def read_payments(
    path: Path, archive: Archive, tariff: CompiledTariff, rejected: Rejected
) -> Payments:
    """All payment rows: good ones as arrays (file order, ids mapped to ledger keys)."""
    source = str(path)
    text = _open_text(path, "payments")
    rows = list(_rows(text, source, PAYMENT_COLUMNS))
    ok_ts, ts_all = parse_ts_strings(
        [f[0] if f is not None else "" for _, f, _ in rows], tariff.zone
    )
    fleet = archive.fleet
    slot, ts, key, amount, status, lines, ids = [], [], [], [], [], [], []
    for k, (line, f, reason) in enumerate(rows):
        if f is None:
            rejected.add(source, line, reason)
            continue
        ts_text, pid, meter, amount_text, status_text, _channel = f
        bad = ""
        micro = 0
        if not ok_ts[k]:
            bad = f"ts: {ts_text!r} is not an {TS_FORMAT} (years 1900..2199)"
        elif not pid:
            bad = "payment_id: empty"
        elif len(meter) != 12 or not meter.isdigit() or not meter.isascii():
            bad = f"meter: {meter!r} is not a 12-digit meter address"
        elif meter not in archive.slot_of:
            bad = f"meter: {meter} is not in the archive"
        else:
            try:
                micro = parse_units(amount_text, 2, signed=True) * 10_000
                if micro <= 0:
                    bad = f"amount: {amount_text!r} is not positive"
                elif micro > MAX_PAYMENT:
                    bad = "amount: beyond 1,000,000,000 yuan"
            except ValueError as exc:
                bad = f"amount: {amount_text!r} {exc} (yuan, positive, at most 2 decimals)"
        if not bad and status_text.lower() not in K.STATUS_NAMES:
            bad = f"status: {status_text!r} is not one of settled, pending, failed"
        if not bad:
            s = archive.slot_of[meter]
            try:
                key.append(fleet.payment_key(pid, s))
            except PaymentIdConflict as exc:
                owner = int(fleet.cold["address"][exc.owner])
                bad = f"payment_id: {pid!r} already belongs to meter {owner:012d}"
        if bad:
            rejected.add(source, line, bad)
            continue
        slot.append(s)
        ts.append(int(ts_all[k]))
        amount.append(micro)
        status.append(K.STATUS_NAMES[status_text.lower()])
        lines.append(line)
        ids.append(pid)

    def arr(x: list[int]) -> np.ndarray:
        return np.array(x, np.int64)

    return Payments(arr(slot), arr(ts), arr(key), arr(amount), arr(status), arr(lines), ids)


# ---------------------------------------------------------------------------------------------
# Outputs.


def yuan(micro: int) -> str:
    """Micro-yuan as yuan with exactly 6 decimals."""
    q, r = divmod(abs(micro), 1_000_000)
    return f"{'-' if micro < 0 else ''}{q}.{r:06d}"


def kwh(centi: int) -> str:
    q, r = divmod(centi, 100)
    return f"{q}.{r:02d}"


def seconds(ns: int) -> str:
    q, r = divmod(ns, NS)
    return f"{q}" if r == 0 else f"{q}.{r:09d}".rstrip("0")


def iso_local(ts: int, offset: int) -> str:
    """An instant as local ISO 8601 with its UTC offset, e.g. 2013-01-01T08:00:00+08:00."""
    days, rem = divmod(ts + offset, DAY_NS)
    d = date(1970, 1, 1) + timedelta(days=days)
    secs, ns = divmod(rem, NS)
    frac = f".{ns:09d}".rstrip("0") if ns else ""
    off_s = offset // NS
    sign = "+" if off_s >= 0 else "-"
    oh, rest = divmod(abs(off_s), 3600)
    om, os_ = divmod(rest, 60)
    off = f"{sign}{oh:02d}:{om:02d}" + (f":{os_:02d}" if os_ else "")
    return f"{d.isoformat()}T{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}{frac}{off}"


def registers(mask: int) -> str:
    return " ".join(name for bit, name in enumerate(K.REGISTER_NAMES) if mask >> bit & 1)


@dataclass
class Summary:
    readings: int
    payments: int
    meters: int
    rejected: int
    commands: int
    events: int


def run_replay(
    archive_path: Path,
    readings_path: Path,
    payments_path: Path,
    tariffs_path: Path,
    out: Path,
    *,
    progress: bool = True,
) -> Summary:
    """Replay the files into `out` (balances.csv, commands.csv, events.csv, rejected.csv)."""
    from tqdm import tqdm

    for p, what in (
        (archive_path, "archive"),
        (readings_path, "readings"),
        (payments_path, "payments"),
    ):
        if not p.is_file():
            raise UserError(f"{what} file not found", where=str(p))
    spec = load_tariffs(tariffs_path)
    tariff = compile_spec(spec)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the output directory: {exc.strerror}", where=str(out)
        ) from None
    rejected = Rejected()
    archive = read_archive(archive_path, spec, tariff, rejected)
    readings = read_readings(readings_path, archive, tariff, rejected, progress)
    payments = read_payments(payments_path, archive, tariff, rejected)
    fleet = archive.fleet

    n_pay = int(payments.ts.shape[0])
    n_read = int(readings.ts.shape[0])
    order = np.argsort(np.concatenate([payments.ts, readings.ts]), kind="stable")
    reg = readings.reg
    total, t1, t2, t3, t4 = (np.ascontiguousarray(reg[:, k]) for k in range(5))
    clock = new_clock()
    n = n_pay + n_read
    m = min(CHUNK_EVENTS, max(n, 1))
    code = np.zeros(m, np.int8)
    det_a = np.zeros(m, np.int64)
    det_b = np.zeros(m, np.int64)
    action = np.zeros(m, np.int16)
    balance = np.zeros(m, np.int64)
    address = [f"{int(a):012d}" for a in fleet.cold["address"]]
    zone_starts = tariff.zone[:, Z_UTC]
    n_commands = 0
    n_events = 0
    with (
        open(out.joinpath("commands.csv"), "w", newline="", encoding="utf-8") as cfh,
        open(out.joinpath("events.csv"), "w", newline="", encoding="utf-8") as efh,
    ):
        commands = csv.writer(cfh, lineterminator="\n")
        events = csv.writer(efh, lineterminator="\n")
        commands.writerow(["ts", "meter", "action", "balance"])
        events.writerow(["ts", "meter", "kind", "detail"])
        with tqdm(
            total=n,
            unit="event",
            unit_scale=True,
            desc="replay",
            file=sys.stderr,
            disable=not progress,
        ) as bar:
            for start in range(0, n, CHUNK_EVENTS):
                stop = min(start + CHUNK_EVENTS, n)
                K.replay_events(
                    fleet.hot,
                    fleet.cold,
                    fleet.ledger,
                    tariff.plans,
                    tariff.tiers,
                    tariff.zone,
                    tariff.window,
                    tariff.holidays,
                    fleet.terminal_online,
                    clock,
                    order,
                    n_pay,
                    payments.slot,
                    payments.ts,
                    payments.key,
                    payments.amount,
                    payments.status,
                    readings.slot,
                    readings.ts,
                    total,
                    t1,
                    t2,
                    t3,
                    t4,
                    start,
                    stop,
                    code,
                    det_a,
                    det_b,
                    action,
                    balance,
                )
                k = stop - start
                c, a = code[:k], det_a[:k]
                hit = (
                    (c == K.OUT_BACKWARDS)
                    | (c == K.OUT_IMPLAUSIBLE)
                    | ((c == K.OUT_ACCEPTED) & (a != 0))
                    | (c == K.PAY_DUPLICATE)
                    | (c == K.PAY_FAILED)
                    | (action[:k] != 0)
                )
                for j in np.flatnonzero(hit).tolist():
                    e = int(order[start + j])
                    if e < n_pay:
                        s, t = int(payments.slot[e]), int(payments.ts[e])
                    else:
                        s, t = int(readings.slot[e - n_pay]), int(readings.ts[e - n_pay])
                    seg = int(np.searchsorted(zone_starts, t, side="right")) - 1
                    when = iso_local(t, int(tariff.zone[max(seg, 0), Z_OFFSET]))
                    meter = address[s]
                    cj, aj, act, bal = int(c[j]), int(a[j]), int(action[j]), int(balance[j])
                    rows: list[list[str]] = []
                    if cj == K.OUT_ACCEPTED and aj:
                        rows.append([when, meter, "rollover", registers(aj)])
                    elif cj == K.OUT_BACKWARDS:
                        rows.append([when, meter, "backwards", registers(aj)])
                    elif cj == K.OUT_IMPLAUSIBLE:
                        rows.append(
                            [
                                when,
                                meter,
                                "implausible",
                                f"{kwh(aj)} kWh in {seconds(int(det_b[j]))} s",
                            ]
                        )
                    elif cj == K.PAY_DUPLICATE:
                        rows.append([when, meter, "duplicate_payment", payments.ids[e]])
                    elif cj == K.PAY_FAILED:
                        rows.append([when, meter, "payment_failed", payments.ids[e]])
                    if act & K.ACT_ALERT1:
                        rows.append([when, meter, "alert1", yuan(bal)])
                    if act & K.ACT_ALERT2:
                        rows.append([when, meter, "alert2", yuan(bal)])
                    if act & K.ACT_HELD:
                        rows.append(
                            [when, meter, "cutoff_held", K.HOLD_NAMES[act >> K.HELD_SHIFT & 7]]
                        )
                    events.writerows(rows)
                    n_events += len(rows)
                    if act & K.ACT_CUTOFF:
                        commands.writerow([when, meter, "cutoff", yuan(bal)])
                        n_commands += 1
                    if act & K.ACT_RECONNECT:
                        commands.writerow([when, meter, "reconnect", yuan(bal)])
                        n_commands += 1
                bar.update(k)
    with open(out.joinpath("balances.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["meter", "balance", "charged", "paid", "relay"])
        hot, cold = fleet.hot, fleet.cold
        for meter in archive.addresses:
            s = archive.slot_of[meter]
            w.writerow(
                [
                    meter,
                    yuan(int(hot["balance"][s])),
                    yuan(int(hot["charged"][s])),
                    yuan(int(cold["paid"][s])),
                    "open" if hot["relay_open"][s] else "closed",
                ]
            )
    with open(out.joinpath("rejected.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "line", "reason"])
        w.writerows(rejected.rows)
    return Summary(n_read, n_pay, len(archive.addresses), len(rejected.rows), n_commands, n_events)
