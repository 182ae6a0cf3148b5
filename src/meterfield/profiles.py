"""Load profiles: the power each meter draws at a simulated local time, for the whole fleet.

Both profiles are piecewise constant per half hour of local time and return integer watts
for every meter at once (numpy, no per-meter Python), so that energy over whole half hours is
exact: W x 1800 s. Synthetic: a seeded mean load per meter times a daily shape per class times
a seeded noise per meter per half hour. Recorded: meter i replays household i mod H of the Low
Carbon London year (H = 325 in the full file), the simulated local date mapped onto 2013's day
of year and time of day. Profiles never hold register state and never do I/O after loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

import numpy as np

from meterfield.lcl import INTERVAL_S, Consumption

SLOTS_2013 = 365 * 48
EPOCH_2013_WALL = 1356998400  # 2013-01-01 00:00 in wall seconds
_EPOCH = datetime(1970, 1, 1)

_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_K3 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a cheap seeded hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * _K2
    x = x ^ (x >> np.uint64(27))
    x = x * _K3
    return x ^ (x >> np.uint64(31))


def slot_hash(keys: np.ndarray, slot: int) -> np.ndarray:
    """A uint64 hash of (key, slot) per element; `keys` are pre-mixed uint64 meter keys."""
    with np.errstate(over="ignore"):
        return mix64(keys ^ (np.uint64(slot & 0xFFFFFFFFFFFF) * _K1))


def meter_keys(n: int, seed: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return mix64(np.arange(n, dtype=np.uint64) * _K1 + np.uint64(seed & 0xFFFFFFFFFFFFFFFF))


class SyntheticProfile:
    """mean_w[i] x shape[class, half hour] x (1 +- noise), integer watts, seeded."""

    kind = "synthetic"

    def __init__(self, mean_w: np.ndarray, meter_class: np.ndarray,
                 shapes: Mapping[int, tuple[float, ...]], noise: float, seed: int) -> None:
        self.mean_w = mean_w.astype(np.int64)
        self.meter_class = meter_class.astype(np.intp)
        n_classes = int(meter_class.max(initial=0)) + 1
        table = np.zeros((max(n_classes, 3), 48), np.int64)
        for c in range(table.shape[0]):
            s = shapes.get(c) or shapes.get(-1)
            assert s is not None
            arr = np.asarray(s, np.float64)
            if arr.shape[0] == 24:
                arr = np.repeat(arr, 2)
            arr = arr / arr.mean()
            table[c] = np.rint(arr * 1000).astype(np.int64)
        self.shape_pm = table  # per mille of the mean
        self.noise_pm = round(noise * 1000)
        self.keys = meter_keys(self.mean_w.shape[0], seed)

    def power_w(self, local_s: int) -> np.ndarray:
        slot = local_s // INTERVAL_S
        shape = self.shape_pm[:, slot % 48][self.meter_class]
        p = self.mean_w * shape // 1000
        if self.noise_pm:
            span = np.uint64(2 * self.noise_pm + 1)
            noise = (slot_hash(self.keys, slot) % span).astype(np.int64) + (1000 - self.noise_pm)
            p = p * noise // 1000
        return p


def slot_2013(local_s: int) -> int:
    """The half hour of 2013 that plays at a local time: same day of year (29 Feb -> 28 Feb,
    31 Dec of a leap year -> 31 Dec) and time of day."""
    day = _EPOCH + timedelta(days=local_s // 86400)
    doy = day.timetuple().tm_yday
    if doy >= 60 and _is_leap(day.year):
        doy -= 1  # 29 Feb plays 28 Feb again; later days shift back one

    return (doy - 1) * 48 + (local_s % 86400) // INTERVAL_S


def _is_leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def dense_year(c: Consumption) -> np.ndarray:
    """[17520 half hours, H households] Wh of 2013; a gap plays the household's mean half hour.

    Rows off the half-hour grid or outside 2013 are ignored (the recorded file has none)."""
    h = c.n_meters
    dtype = np.uint16 if (c.wh.size == 0 or int(c.wh.max()) < 65535) else np.int32
    out = np.zeros((SLOTS_2013, h), dtype)
    for k in range(h):
        ts, wh = c.rows(k)
        rel = ts - EPOCH_2013_WALL
        ok = (rel >= 0) & (rel % INTERVAL_S == 0) & (rel < SLOTS_2013 * INTERVAL_S)
        slots = rel[ok] // INTERVAL_S
        mean = int(wh[ok].sum() // max(1, slots.size))
        col = np.full(SLOTS_2013, mean, np.int64)
        col[slots] = wh[ok]
        out[:, k] = col
    return out


class RecordedProfile:
    """Meter i plays household i mod H: 2 x Wh of the half hour = constant watts over it."""

    kind = "recorded"

    def __init__(self, consumption: Consumption, n_meters: int) -> None:
        self.dense = dense_year(consumption)
        self.households = consumption.n_meters
        self.household = (np.arange(n_meters) % self.households).astype(np.intp)

    def power_w(self, local_s: int) -> np.ndarray:
        row = self.dense[slot_2013(local_s)]
        return 2 * row[self.household].astype(np.int64)

    def wh(self, meter: int, local_s: int) -> int:
        """The recorded Wh meter `meter` plays in the half hour containing `local_s`."""
        return int(self.dense[slot_2013(local_s), meter % self.households])
