"""What the collectors hand on: one reading batch per terminal per poll cycle, and events.

This is the interface between collection and the pipeline: `ReadingBatch` travels as compact
binary (`to_bytes` / `from_bytes`, numpy arrays behind a small header) and as one JSON line for
people (`to_json`). It holds readings and outcomes only: never money, tariffs or Kafka.

A batch row is one meter of the terminal read in that cycle (demoted meters that were not due
have no row). Registers are the forward active block (total, T1..T4) in 0.01 kWh, -1 where the
meter gave no value (a DL/T 645-1997 meter reports the total only; a failed read none); the
status word is status word 3, -1 where not read; the clock drift is meter clock minus collector
clock in whole seconds, `NO_DRIFT` where the clock was not read this cycle.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

# Read outcomes; the numeric codes are the collection kernels' (kernels/collection.py).
OUTCOME_OK = 0  # answered, values present
OUTCOME_TIMEOUT = 1  # no answer within the timeout, after every retry
OUTCOME_ERROR = 2  # an abnormal reply: `error` holds the meter's error byte (or word)
OUTCOME_BAD_FRAME = 3  # only broken frames came back (checksum, framing), after every retry
OUTCOME_NAMES = ("ok", "timeout", "error", "bad_frame")

NO_VALUE = -1
NO_DRIFT = -(2**31)

_MAGIC = b"MSB1"
_HEAD = struct.Struct("<4sHIqqI")  # magic, len(terminal), cycle, started_ns, ended_ns, rows


def _ts_text(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _kwh(v: int) -> str | None:
    return None if v < 0 else f"{v // 100}.{v % 100:02d}"


@dataclass(eq=False)
class ReadingBatch:
    """One terminal's poll cycle: arrays aligned by row (one row a meter read)."""

    terminal: str
    cycle: int  # the terminal's cycle number since the collector started it
    started_ns: int  # collector clock (epoch ns) when the cycle began
    ended_ns: int  # ... and when its last read finished
    meter: npt.NDArray[np.int64]  # the 12-digit address as a number
    ts: npt.NDArray[np.int64]  # epoch ns when the meter's energy reply arrived (or failed)
    registers: npt.NDArray[np.int64]  # (n, 5): total, T1..T4, 0.01 kWh; NO_VALUE if absent
    status: npt.NDArray[np.int32]  # status word 3, NO_VALUE if not read
    outcome: npt.NDArray[np.int8]  # OUTCOME_*
    error: npt.NDArray[np.int16]  # the meter's error byte / word for OUTCOME_ERROR, else 0
    drift_s: npt.NDArray[np.int32]  # meter clock - collector clock, s; NO_DRIFT if not read
    extra: list[dict[str, Any]] = field(default_factory=list)  # configured extra DIs, per row

    def __len__(self) -> int:
        return int(self.meter.shape[0])

    @property
    def ok(self) -> int:
        return int(np.count_nonzero(self.outcome == OUTCOME_OK))

    @classmethod
    def empty(cls, terminal: str, cycle: int, started_ns: int, ended_ns: int) -> ReadingBatch:
        return cls.from_rows(terminal, cycle, started_ns, ended_ns, [])

    @classmethod
    def from_rows(cls, terminal: str, cycle: int, started_ns: int, ended_ns: int,
                  rows: list[tuple[int, int, int, int, int, int, int, int, int, int, int]],
                  extra: list[dict[str, Any]] | None = None) -> ReadingBatch:
        """Rows of (meter, ts, total, t1, t2, t3, t4, status, outcome, error, drift_s)."""
        a = np.array(rows, dtype=np.int64).reshape(len(rows), 11)
        return cls(
            terminal, cycle, started_ns, ended_ns,
            meter=a[:, 0].copy(), ts=a[:, 1].copy(), registers=a[:, 2:7].copy(),
            status=a[:, 7].astype(np.int32), outcome=a[:, 8].astype(np.int8),
            error=a[:, 9].astype(np.int16), drift_s=a[:, 10].astype(np.int32),
            extra=list(extra) if extra else [],
        )

    # --- binary: what the pipeline publishes ------------------------------------------------

    def to_bytes(self) -> bytes:
        """Header, then the arrays little-endian in a fixed order; extras as one JSON tail."""
        tid = self.terminal.encode()
        n = len(self)
        parts = [
            _HEAD.pack(_MAGIC, len(tid), self.cycle, self.started_ns, self.ended_ns, n), tid,
            self.meter.astype("<i8").tobytes(), self.ts.astype("<i8").tobytes(),
            self.registers.astype("<i8").tobytes(), self.status.astype("<i4").tobytes(),
            self.outcome.astype("i1").tobytes(), self.error.astype("<i2").tobytes(),
            self.drift_s.astype("<i4").tobytes(),
        ]
        if self.extra:
            parts.append(json.dumps(self.extra, separators=(",", ":")).encode())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReadingBatch:
        """Inverse of `to_bytes`; ValueError (with what was wrong) for anything else."""
        if len(data) < _HEAD.size or data[:4] != _MAGIC:
            raise ValueError("not a reading batch (bad magic or too short)")
        _m, tlen, cycle, started, ended, n = _HEAD.unpack_from(data)
        pos = _HEAD.size
        need = pos + tlen + n * (8 + 8 + 40 + 4 + 1 + 2 + 4)
        if len(data) < need:
            raise ValueError(f"reading batch truncated: {len(data)} bytes, {n} rows need {need}")
        terminal = data[pos:pos + tlen].decode()
        pos += tlen

        def take(dtype: str, count: int) -> npt.NDArray[Any]:
            nonlocal pos
            arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
            pos += arr.nbytes
            return arr.astype(dtype[-2:] if dtype[0] == "<" else dtype)

        meter = take("<i8", n)
        ts = take("<i8", n)
        registers = take("<i8", n * 5).reshape(n, 5)
        status = take("<i4", n)
        outcome = take("i1", n)
        error = take("<i2", n)
        drift = take("<i4", n)
        extra = json.loads(data[pos:]) if pos < len(data) else []
        return cls(terminal, cycle, started, ended, meter, ts, registers, status, outcome, error,
                   drift, extra)

    # --- JSON: what people and the CLI read ------------------------------------------------

    def to_json(self) -> str:
        """One line: the batch with a reading object per row (kWh and time as text)."""
        readings = []
        for i in range(len(self)):
            r = self.registers[i]
            row: dict[str, Any] = {
                "meter": f"{int(self.meter[i]):012d}",
                "ts": _ts_text(int(self.ts[i])),
                "outcome": OUTCOME_NAMES[int(self.outcome[i])],
            }
            if self.outcome[i] == OUTCOME_ERROR:
                row["error"] = int(self.error[i])
            if r[0] >= 0:
                row["total"] = _kwh(int(r[0]))
            if (r[1:] >= 0).all():
                row["t1"], row["t2"], row["t3"], row["t4"] = (_kwh(int(x)) for x in r[1:])
            if self.status[i] >= 0:
                row["status"] = f"{int(self.status[i]):04X}"
            if self.drift_s[i] != NO_DRIFT:
                row["drift_s"] = int(self.drift_s[i])
            if self.extra and self.extra[i]:
                row["extra"] = self.extra[i]
            readings.append(row)
        return json.dumps({
            "type": "batch", "terminal": self.terminal, "cycle": self.cycle,
            "started": _ts_text(self.started_ns), "ended": _ts_text(self.ended_ns),
            "meters": len(self), "ok": self.ok, "readings": readings,
        }, ensure_ascii=False, separators=(",", ":"))


# Link events: the kernels' link codes are up/down; the rest are for people and the audit.
LINK_KINDS = ("up", "down", "heartbeat_missed", "registration", "replaced", "rejected")
# Meter events seen while collecting.
METER_KINDS = ("demoted", "promoted", "block_refused", "clock_drift", "time_set", "stale_reply")


@dataclass(frozen=True)
class CollectorEvent:
    """A link event (meter is None) or a meter event, with a reason a person can read."""

    kind: str
    terminal: str
    ts_ns: int
    detail: str = ""
    meter: str | None = None

    @property
    def is_link(self) -> bool:
        return self.kind in LINK_KINDS

    def to_json(self) -> str:
        d: dict[str, Any] = {"type": "link" if self.is_link else "meter", "kind": self.kind,
                             "terminal": self.terminal, "ts": _ts_text(self.ts_ns)}
        if self.meter is not None:
            d["meter"] = self.meter
        if self.detail:
            d["detail"] = self.detail
        return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


@dataclass
class SessionStats:
    """Counters of one terminal session since the collector started it."""

    cycles: int = 0
    overruns: int = 0  # a cycle still running when the next one fell due
    reads_ok: int = 0  # requests answered with a usable reply
    reads_failed: int = 0  # reads given up after every retry (timeout, error, bad frame)
    timeouts: int = 0  # requests that timed out (each attempt)
    bad_frames: int = 0  # broken frames received (checksum, framing)
    stale: int = 0  # replies that answered an earlier request (late) and were dropped
    discarded: int = 0  # garbage bytes skipped by the frame reader
    connects: int = 0
    downs: int = 0
    meters_ok: int = 0  # meter rows of the last cycle with outcome ok
    meters_read: int = 0  # meter rows of the last cycle
    rows: int = 0  # meter rows of every cycle so far
    rows_ok: int = 0  # ... with outcome ok
