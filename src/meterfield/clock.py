"""The simulated clock: field time that can run faster than real time, or stand still for tests.

Registers, relays, meter clock drift and outages follow this clock; protocol timing (byte
pacing, turnaround, heartbeats, reconnect backoff) stays in real time and never reads it.
Time is integer epoch nanoseconds (UTC); local wall time comes from the configured zone.
It never sleeps and never touches the network.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

NS = 1_000_000_000


class SimClock:
    """Simulated time = start + (real time elapsed since start) x speed (+ manual jumps).

    speed 0 pauses the clock: it then moves only through `advance`, which is what tests use
    to step relays and registers deterministically.
    """

    def __init__(self, start_ns: int, speed: float = 1.0, *, tz: str | tzinfo = "Asia/Shanghai") -> None:
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        self._base_sim = int(start_ns)
        self._base_real = time.monotonic_ns()
        self._speed = float(speed)
        self.tz: tzinfo = ZoneInfo(tz) if isinstance(tz, str) else tz

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, speed: float) -> None:
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        now = self.now_ns()
        self._base_sim = now
        self._base_real = time.monotonic_ns()
        self._speed = float(speed)

    def now_ns(self) -> int:
        """Simulated epoch nanoseconds (UTC)."""
        if self._speed == 0.0:
            return self._base_sim
        return self._base_sim + int((time.monotonic_ns() - self._base_real) * self._speed)

    def advance(self, seconds: float) -> int:
        """Jump simulated time forward by `seconds`; returns the new time."""
        if seconds < 0:
            raise ValueError("the simulated clock never goes backwards")
        self._base_sim += round(seconds * NS)
        return self.now_ns()

    def utc_offset_s(self, at_ns: int | None = None) -> int:
        """The zone's offset from UTC in seconds at a simulated instant."""
        t = self.now_ns() if at_ns is None else at_ns
        dt = datetime.fromtimestamp(t // NS, tz=UTC).astimezone(self.tz)
        off = dt.utcoffset() or timedelta(0)
        return int(off.total_seconds())

    def local(self, at_ns: int | None = None) -> datetime:
        """Local wall time (naive) at a simulated instant."""
        t = self.now_ns() if at_ns is None else at_ns
        return datetime.fromtimestamp(t / NS, tz=UTC).astimezone(self.tz).replace(tzinfo=None)

    def to_ns(self, local: datetime) -> int:
        """A local wall time (naive, in the zone) or an aware datetime -> epoch nanoseconds."""
        aware = local if local.tzinfo is not None else local.replace(tzinfo=self.tz)
        return int(aware.timestamp()) * NS + aware.microsecond * 1000
