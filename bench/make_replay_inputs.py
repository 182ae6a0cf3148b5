"""Turn the recorded year (Low Carbon London, 325 households, 2013) into `meterstream replay`
inputs: an archive, cumulative register readings and a payment stream.

Registers are built from the real half-hourly consumption, exactly: each half hour's watt-hours
go to the tariff register (t1 sharp, t2 peak, t3 shoulder, t4 valley) of its time of day, the
meter shows each register truncated to 0.01 kWh, and the total register is the sum of the four
(all modulo 100,000,000, so the two meters that start near 999,999.99 kWh roll over). A reading
is taken at the end of each recorded half hour; the real gaps stay gaps. The payment stream is
seeded: top-ups sized on each meter's own consumption, bank withholdings that settle, fail or
never come back, and duplicated settlements. Never touches the source file.

    .venv/bin/python bench/make_replay_inputs.py OUT_DIR [--data PATH] [--meters N] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from numba import njit

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO / "src"))

from meterfield.lcl import Consumption, load_consumption, meter_address
from meterstream.kernels.tariffs import civil_from_days

TARIFFS = REPO / "config" / "tariffs-example.toml"
PROVENANCE = """Derived from lcl_2013_halfhourly.csv.gz: real half-hourly consumption of 325 London households
for 2013 from UK Power Networks' Low Carbon London smart-meter trial (published on the London
Datastore as "SmartMeter Energy Consumption Data in London Households"; the Kaggle extract "Smart
meters in London" carries the same files). Registers, archive and payments made by
bench/make_replay_inputs.py (seed {seed}); times are the recorded wall clock read as {zone}.
"""

ROLLOVER = 100_000_000  # registers in 0.01 kWh wrap at 999999.99 kWh
MEAN_PRICE_MICRO_PER_WH = 550  # ~0.55 yuan/kWh, to size top-ups

# Tariff register of each half hour of the day (0 = 00:00-00:30): 1 sharp 19-21, 2 peak 8-11,
# 13-19, 21-22, 3 shoulder 7-8, 11-13, 22-23, 4 valley 23-07.
_HOURS = [4] * 7 + [3] + [2] * 3 + [3] * 2 + [2] * 6 + [1] * 2 + [2] + [3] + [4]
TOU_OF_HALF_HOUR = np.repeat(np.array(_HOURS, np.int64), 2)
assert TOU_OF_HALF_HOUR.shape == (48,)


@njit(cache=True)
def _registers(
    starts: np.ndarray,
    ts: np.ndarray,
    wh: np.ndarray,
    tou: np.ndarray,
    first: np.ndarray,
    regs: np.ndarray,
) -> None:
    """regs[r] = (total, t1..t4) in 0.01 kWh after row r's half hour, exact (Wh accumulated)."""
    for m in range(starts.shape[0] - 1):
        acc = np.zeros(4, np.int64)
        for k in range(4):
            acc[k] = first[m, k] * 10  # Wh
        for r in range(starts[m], starts[m + 1]):
            slot = (ts[r] % 86400) // 1800
            acc[tou[slot] - 1] += wh[r]
            total = 0
            for k in range(4):
                shown = acc[k] // 10
                total += shown
                regs[r, 1 + k] = shown % 100_000_000
            regs[r, 0] = total % 100_000_000


@njit(cache=True)
def _put_int(out: np.ndarray, p: int, v: int, width: int) -> int:
    for k in range(width - 1, -1, -1):
        out[p + k] = 48 + v % 10
        v //= 10
    return p + width


@njit(cache=True)
def _put_kwh(out: np.ndarray, p: int, centi: int) -> int:
    whole = centi // 100
    digits = 1
    t = whole
    while t >= 10:
        t //= 10
        digits += 1
    p = _put_int(out, p, whole, digits)
    out[p] = 46
    return _put_int(out, p + 1, centi % 100, 2)


@njit(cache=True)
def _format_readings(
    order: np.ndarray,
    ts: np.ndarray,
    meter: np.ndarray,
    addr: np.ndarray,
    regs: np.ndarray,
    out: np.ndarray,
) -> int:
    """Rows 'YYYY-MM-DDThh:mm:ss,ADDRESS,total,t1,t2,t3,t4\\n' of readings `order`; bytes used."""
    p = 0
    for i in order:
        t = ts[i]
        y, mo, d = civil_from_days(t // 86400)
        s = t % 86400
        p = _put_int(out, p, y, 4)
        out[p] = 45
        p = _put_int(out, p + 1, mo, 2)
        out[p] = 45
        p = _put_int(out, p + 1, d, 2)
        out[p] = 84
        p = _put_int(out, p + 1, s // 3600, 2)
        out[p] = 58
        p = _put_int(out, p + 1, s // 60 % 60, 2)
        out[p] = 58
        p = _put_int(out, p + 1, s % 60, 2)
        out[p] = 44
        p = _put_int(out, p + 1, addr[meter[i]], 12)
        for k in range(5):
            out[p] = 44
            p = _put_kwh(out, p + 1, regs[i, k])
        out[p] = 10
        p += 1
    return p


def registers_of(
    data: Consumption, rng: np.random.Generator, *, near_top: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(reading ts in wall seconds, regs int64 [rows, 5]) for every recorded half hour."""
    first = rng.integers(0, 2_000_000, size=(data.n_meters, 4))  # up to 20,000 kWh per register
    for m in range(min(near_top, data.n_meters)):  # these roll over within the year
        first[m] = [ROLLOVER // 4 - 50_000 + k for k in range(4)]
    regs = np.zeros((data.n_rows, 5), np.int64)
    _registers(data.starts, data.ts, data.wh, TOU_OF_HALF_HOUR, first.astype(np.int64), regs)
    return data.ts + 1800, regs


def _when(ts: int) -> str:
    return (datetime(1970, 1, 1) + timedelta(seconds=int(ts))).strftime("%Y-%m-%dT%H:%M:%S")


def payments_of(
    data: Consumption, addresses: list[str], rng: np.random.Generator
) -> list[tuple[int, str, str, str, str, str]]:
    """(ts, payment_id, meter, amount, status, channel) rows, by time."""
    rows: list[tuple[int, str, str, str, str, str]] = []
    seq = 0
    for m in range(data.n_meters):
        ts, wh = data.rows(m)
        if ts.shape[0] == 0:
            continue
        per_day_micro = max(
            int(wh.sum()) * MEAN_PRICE_MICRO_PER_WH // max(1, (int(ts[-1]) - int(ts[0])) // 86400),
            1,
        )
        withholding = rng.random() < 0.25
        t = int(ts[0]) + int(rng.integers(3, 20)) * 86400
        while t < int(ts[-1]):
            days = int(rng.integers(14, 36))
            yuan = max(
                10, int(per_day_micro * days * rng.uniform(0.6, 1.5)) // 1_000_000 // 10 * 10
            )
            amount = (
                f"{yuan}.{int(rng.integers(0, 100)):02d}" if rng.random() < 0.3 else f"{yuan}.00"
            )
            at = t - t % 86400 + int(rng.integers(8 * 3600, 22 * 3600))
            seq += 1
            if withholding:
                pid = f"BW{seq:08d}"
                rows.append((at, pid, addresses[m], amount, "pending", "bank_withholding"))
                fate = rng.random()
                if fate < 0.80:
                    rows.append(
                        (
                            at + int(rng.integers(3600, 60 * 3600)),
                            pid,
                            addresses[m],
                            amount,
                            "settled",
                            "bank_withholding",
                        )
                    )
                elif fate < 0.95:
                    back = at + int(rng.integers(2 * 3600, 48 * 3600))
                    rows.append((back, pid, addresses[m], amount, "failed", "bank_withholding"))
                    seq += 1
                    rows.append(
                        (back + 86400, f"AP{seq:08d}", addresses[m], amount, "settled", "alipay")
                    )
                # else: the bank never answers; the hold expires after the grace period
            else:
                channel = str(rng.choice(["alipay", "wechat", "95598_online", "counter"]))
                pid = f"{channel[:2].upper()}{seq:08d}"
                rows.append((at, pid, addresses[m], amount, "settled", channel))
                if rng.random() < 0.04:  # the channel sends the settlement again
                    rows.append(
                        (
                            at + int(rng.integers(0, 600)),
                            pid,
                            addresses[m],
                            amount,
                            "settled",
                            channel,
                        )
                    )
            t += days * 86400
    rows.sort(key=lambda r: r[0])
    return rows


def archive_rows(n: int, plans: list[str], rng: np.random.Generator) -> list[list[str]]:
    rows = []
    for i in range(n):
        terminal = i // 32
        klass = "dedicated" if i % 97 == 5 else "public" if i % 41 == 7 else "lowvoltage"
        plan = (
            "dedicated_tou"
            if klass == "dedicated"
            else "commercial"
            if klass == "public"
            else ("residential_tou" if rng.random() < 0.6 else "residential_flat")
        )
        assert plan in plans
        rows.append(
            [
                meter_address(i),
                f"TRM{terminal + 1:04d}",
                f"AREA{terminal // 4 + 1:02d}",
                klass,
                plan,
                "1" if rng.random() < 0.03 else "0",
                f"{int(rng.integers(20, 300))}.{int(rng.integers(0, 100)):02d}",
                "customer",
            ]
        )
    return rows


def make_inputs(
    out: Path,
    *,
    data_path: Path | None = None,
    meters: int | None = None,
    seed: int = 2013,
    consumption: Consumption | None = None,
) -> dict[str, Path]:
    """Write archive.csv, readings.csv, payments.csv and README.txt into `out`; their paths."""
    import tomllib

    out.mkdir(parents=True, exist_ok=True)
    data = consumption if consumption is not None else load_consumption(data_path, meters=meters)
    rng = np.random.default_rng(seed)
    with open(TARIFFS, "rb") as fh:
        plans = list(tomllib.load(fh)["plans"])
    archive = archive_rows(data.n_meters, plans, rng)
    addresses = [r[0] for r in archive]
    paths = {k: out / f"{k}.csv" for k in ("archive", "readings", "payments")}
    with open(paths["archive"], "w", encoding="utf-8") as fh:
        fh.write("meter,terminal,area,class,plan,protected,initial_balance,role\n")
        fh.writelines(",".join(r) + "\n" for r in archive)
    ts, regs = registers_of(data, rng)
    meter = np.repeat(np.arange(data.n_meters), np.diff(data.starts))
    order = np.lexsort((meter, ts))  # by time, then meter: as a head-end logs them
    addr = np.array([int(a) for a in addresses], np.int64)
    buf = np.empty(data.n_rows * 96 + 1, np.uint8)  # a row is at most 19+1+12+5*10+1 = 83 bytes
    used = _format_readings(order, ts, meter, addr, regs, buf)
    with open(paths["readings"], "wb") as fh:
        fh.write(b"ts,meter,total,t1,t2,t3,t4\n")
        fh.write(buf[:used].tobytes())
    pays = payments_of(data, addresses, rng)
    with open(paths["payments"], "w", encoding="utf-8") as fh:
        fh.write("ts,payment_id,meter,amount,status,channel\n")
        fh.writelines(f"{_when(t)},{pid},{m},{a},{s},{c}\n" for t, pid, m, a, s, c in pays)
    (out / "README.txt").write_text(PROVENANCE.format(seed=seed, zone="Asia/Shanghai"))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument(
        "--data", type=Path, default=None, help="the recorded file (default ../shared/data/...)"
    )
    ap.add_argument("--meters", type=int, default=None, help="only the first N meters")
    ap.add_argument("--seed", type=int, default=2013)
    args = ap.parse_args(argv)
    paths = make_inputs(args.out, data_path=args.data, meters=args.meters, seed=args.seed)
    for k, p in paths.items():
        print(f"{k}: {p} ({p.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
