"""The InfluxDB sink: readings, balances, commands, link states and KPIs as InfluxDB 2 points.

Points are line protocol with integer fields in the design's units (0.01 kWh, micro-yuan, basis
points), batched, gzipped and written by one thread with influxdb-client; while the server is
down they are spooled to disk (fsync'd append-only files) and written when it returns. It must
never block the event loop on the network, never write a float for money, and never tag a point
with a meter, payment or command id (tags are terminal, area, class, action, outcome only).
Schema, spool policy and configuration: docs/influx.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np
import numpy.typing as npt

from meterstream.collectors.batch import NO_DRIFT, OUTCOME_ERROR, CollectorEvent, ReadingBatch
from meterstream.collectors.commands import CommandResult
from meterstream.errors import UserError
from meterstream.spool import SpoolDir, SpoolLocked

if TYPE_CHECKING:
    from meterstream.tomlcheck import TomlTable

log = logging.getLogger("meterstream.influx")

#: Tag values of the meter classes (the collection kernels' CLASS_* codes 0, 1, 2).
CLASS_NAMES = ("dedicated", "public", "low_voltage")  # 专变, 公变, 低压

#: Relay field of `balance`: 0 closed, 1 open (the billing layout's relay_open).
RELAY_CLOSED, RELAY_OPEN = 0, 1

_REGISTER_FIELDS = ("total_centikwh", "t1_centikwh", "t2_centikwh", "t3_centikwh", "t4_centikwh")

#: Link event kinds written to `link` (a `rejected` dial-in names a terminal that is not in the
#: archive: an unbounded tag value, so it goes to the event stream, not here).
LINK_WRITTEN = ("up", "down", "heartbeat_missed", "registration", "replaced")

SPOOL_PREFIX, SPOOL_SUFFIX = "spool-", ".lp"
MAX_SLOTS = 64  # spool slots in one root: live sink processes sharing it
REJECTED_FILE = "rejected.lp"

#: The KPI fields the pipeline may write to `kpi` (integers: bp, counts, 0.01 kWh). kpi_line
#: refuses any other name, so a new KPI is added here first (and a dashboard can rely on it).
KPI_FIELDS = ("terminals", "online", "customers", "in_arrears", "cut_off", "meters",
              "success_rate_bp", "online_rate_bp", "line_loss_bp", "line_loss_centikwh",
              "reconnection_timeliness_bp")


@dataclass(frozen=True)
class Measurement:
    """What the sink writes to one measurement: its tags and its fields (name -> type)."""

    tags: tuple[str, ...]
    fields: Mapping[str, str]  # "int" or "string"


#: The schema the sink writes (docs/influx.md, "Schema"), machine-readable: the line builders
#: below take their names from here, and tests/test_deploy_grafana.py holds every Grafana panel's
#: Flux query to it, so a schema change cannot silently empty a panel.
SCHEMA: Mapping[str, Measurement] = {
    "reading": Measurement(("terminal", "area", "class"), {
        "meter": "string", **{f: "int" for f in _REGISTER_FIELDS}, "outcome": "int",
        "error": "int", "status": "int", "drift_s": "int"}),
    "balance": Measurement(("terminal", "area", "class"), {
        "meter": "string", "balance_microyuan": "int", "relay": "int"}),
    "command": Measurement(("terminal", "action", "outcome"), {
        "meter": "string", "id": "string", "attempts": "int", "readbacks": "int",
        "duration_ms": "int", "status": "int", "detail": "string"}),
    "link": Measurement(("terminal", "area"), {"up": "int", "kind": "string", "detail": "string"}),
    "kpi": Measurement(("area", "class"), {f: "int" for f in KPI_FIELDS}),
}


# --- line protocol -----------------------------------------------------------------------------

def _tag(v: str) -> str:
    """A tag key or value (or a field key): commas, equals signs and spaces escaped."""
    v = v.replace("\n", " ").replace("\r", " ")
    return v.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _measurement(v: str) -> str:
    return v.replace(",", "\\,").replace(" ", "\\ ")


def _string(v: str) -> str:
    """A string field value, quoted (no newlines: they would end the line)."""
    v = v.replace("\n", " ").replace("\r", " ")
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _series(measurement: str, tags: Mapping[str, str | None]) -> str:
    """`measurement,k=v,...` with the tags sorted by key; empty or None values left out.
    Only the tags SCHEMA gives the measurement are taken (a ValueError otherwise)."""
    extra = set(tags) - set(SCHEMA[measurement].tags)
    if extra:
        raise ValueError(f"tags {sorted(extra)} are not in the {measurement} schema")
    parts = [_measurement(measurement)]
    parts += [f"{_tag(k)}={_tag(v)}" for k, v in sorted(tags.items()) if v]
    return ",".join(parts)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def class_name(code: int | str) -> str:
    """The `class` tag value of a CLASS_* code (or of a name already)."""
    if isinstance(code, str):
        if code not in CLASS_NAMES:
            raise ValueError(f"unknown meter class {code!r}: use one of {', '.join(CLASS_NAMES)}")
        return code
    if not 0 <= int(code) < len(CLASS_NAMES):
        raise ValueError(f"unknown meter class code {code}: use 0 dedicated, 1 public, "
                         "2 low_voltage")
    return CLASS_NAMES[int(code)]


def unique_ts(ts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The timestamps made distinct by moving ties forward by whole nanoseconds.

    The meter is a field, not a tag, so two rows of one series at the same instant would be the
    same point to InfluxDB (the later overwrites the earlier). Distinct values are kept as they
    are unless a tie pushes one; the order of rows is not changed.
    """
    ts = np.asarray(ts, dtype=np.int64)
    n = ts.shape[0]
    if n < 2 or np.unique(ts).shape[0] == n:
        return ts
    order = np.argsort(ts, kind="stable")
    steps = np.arange(n, dtype=np.int64)
    fixed = np.maximum.accumulate(ts[order] - steps) + steps
    out = np.empty_like(ts)
    out[order] = fixed
    return out


@dataclass(frozen=True)
class BatchMeta:
    """What the archive knows about a batch's terminal: its area and each row's meter class.

    `meter_class` is one CLASS_* code (or name) for every row, or an int array aligned with the
    batch's rows.
    """

    area: str
    meter_class: int | str | npt.NDArray[np.int8] = 2

    def class_per_row(self, n: int) -> list[str]:
        if isinstance(self.meter_class, (int, str, np.integer)):
            return [class_name(int(self.meter_class) if _is_int(self.meter_class)
                               else str(self.meter_class))] * n
        codes = np.asarray(self.meter_class)
        if codes.shape[0] != n:
            raise ValueError(f"meter_class has {codes.shape[0]} entries for {n} rows")
        return [class_name(int(c)) for c in codes.tolist()]


def reading_lines(batch: ReadingBatch, meta: BatchMeta,
                  classes: list[str] | None = None) -> list[str]:
    """One `reading` point per row: registers as integer 0.01 kWh fields, the meter as a field."""
    n = len(batch)
    if n == 0:
        return []
    if classes is None:
        classes = meta.class_per_row(n)
    prefix = {c: _series("reading", {"terminal": batch.terminal, "area": meta.area, "class": c})
              for c in set(classes)}
    meters = batch.meter.tolist()
    regs = batch.registers.tolist()
    status = batch.status.tolist()
    outcome = batch.outcome.tolist()
    error = batch.error.tolist()
    drift = batch.drift_s.tolist()
    ts = unique_ts(batch.ts).tolist()
    out = []
    for i in range(n):
        r = regs[i]
        o = outcome[i]
        if min(r) >= 0:  # the common row: the whole block read
            f = (f'meter="{meters[i]:012d}",total_centikwh={r[0]}i,t1_centikwh={r[1]}i,'
                 f"t2_centikwh={r[2]}i,t3_centikwh={r[3]}i,t4_centikwh={r[4]}i,outcome={o}i")
        else:
            parts = [f'meter="{meters[i]:012d}"']
            parts += [f"{name}={v}i" for name, v in zip(_REGISTER_FIELDS, r) if v >= 0]
            parts.append(f"outcome={o}i")
            f = ",".join(parts)
        if o == OUTCOME_ERROR:
            f += f",error={error[i]}i"
        if status[i] >= 0:
            f += f",status={status[i]}i"
        if drift[i] != NO_DRIFT:
            f += f",drift_s={drift[i]}i"
        out.append(f"{prefix[classes[i]]} {f} {ts[i]}")
    return out


def balance_lines(terminal: str, area: str, meter: npt.ArrayLike, balance: npt.ArrayLike,
                  relay: npt.ArrayLike, ts_ns: int,
                  meter_class: int | str | npt.ArrayLike = 2) -> list[str]:
    """One `balance` point per meter: integer micro-yuan and the relay (0 closed, 1 open).

    A snapshot of n meters at `ts_ns` is written at ts_ns, ts_ns + 1 ns, ... (the meter is a
    field, so each point of the series needs its own instant). Money must be an integer array:
    a float raises TypeError, whatever its value.
    """
    m = np.asarray(meter)
    b = np.asarray(balance)
    r = np.asarray(relay)
    if not np.issubdtype(b.dtype, np.integer):
        raise TypeError(f"balance must be integer micro-yuan, got dtype {b.dtype} "
                        "(never a float for money)")
    if not (np.issubdtype(m.dtype, np.integer) and np.issubdtype(r.dtype, np.integer)):
        raise TypeError("meter and relay must be integer arrays")
    n = m.shape[0]
    if b.shape[0] != n or r.shape[0] != n:
        raise ValueError(f"meter, balance, relay have {n}, {b.shape[0]}, {r.shape[0]} entries")
    mc: int | str | npt.NDArray[np.int8] = (
        meter_class if isinstance(meter_class, (int, str)) else np.asarray(meter_class))
    classes = BatchMeta(area, mc).class_per_row(n)
    prefix = {c: _series("balance", {"terminal": terminal, "area": area, "class": c})
              for c in set(classes)}
    t0 = int(ts_ns)
    return [f'{prefix[c]} meter="{mm:012d}",balance_microyuan={bb}i,relay={rr}i {t0 + i}'
            for i, (c, mm, bb, rr) in enumerate(zip(classes, m.tolist(), b.tolist(), r.tolist()))]


def command_line(result: CommandResult, *, outcome: str | None = None,
                 ts_ns: int | None = None) -> str:
    """One `command` point: tags terminal, action, outcome; the meter and command id as fields.

    `outcome` overrides the result's (the pipeline's own states: queued, escalated, ...); the
    time is `ts_ns`, else when the outcome was known, else when it was sent, else now.
    """
    c = result.command
    series = _series("command", {"terminal": result.terminal, "action": c.action,
                                 "outcome": outcome or result.outcome})
    fields = [f"meter={_string(c.meter)}", f"id={_string(c.id)}",
              f"attempts={int(result.attempts)}i", f"readbacks={int(result.readbacks)}i"]
    if result.sent_ns is not None and result.done_ns is not None:
        fields.append(f"duration_ms={(result.done_ns - result.sent_ns) // 1_000_000}i")
    if result.status is not None:
        fields.append(f"status={int(result.status)}i")
    if result.detail:
        fields.append(f"detail={_string(result.detail)}")
    t = ts_ns if ts_ns is not None else (result.done_ns or result.sent_ns or time.time_ns())
    return f"{series} {','.join(fields)} {int(t)}"


def link_line(event: CollectorEvent, area: str) -> str | None:
    """One `link` point (up 1/0, kind, detail), or None for kinds not written (LINK_WRITTEN)."""
    if event.kind not in LINK_WRITTEN:
        return None
    series = _series("link", {"terminal": event.terminal, "area": area})
    up = 0 if event.kind == "down" else 1
    fields = [f"up={up}i", f"kind={_string(event.kind)}"]
    if event.detail:
        fields.append(f"detail={_string(event.detail)}")
    return f"{series} {','.join(fields)} {int(event.ts_ns)}"


def kpi_line(ts_ns: int, values: Mapping[str, int | np.integer[Any] | None], *, area: str | None = None,
             meter_class: int | str | None = None) -> str | None:
    """One `kpi` point tagged by area and / or class (neither: the whole fleet).

    Every value must be an integer (basis points, counts, 0.01 kWh, micro-yuan); None leaves
    the field out; a point with no value is None.
    """
    tags = {"area": area, "class": None if meter_class is None else class_name(meter_class)}
    fields = []
    for k, v in values.items():
        if v is None:
            continue
        if not _is_int(v):
            raise TypeError(f"KPI {k!r} must be an integer (bp, count or exact unit), got {v!r}")
        if k not in SCHEMA["kpi"].fields:
            raise ValueError(f"KPI {k!r} is not in the kpi schema: add it to KPI_FIELDS "
                             "(influx.py) first, so that dashboards can rely on it")
        fields.append(f"{_tag(k)}={int(v)}i")
    if not fields:
        return None
    return f"{_series('kpi', tags)} {','.join(fields)} {int(ts_ns)}"


# --- configuration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class InfluxConfig:
    """The `[influx]` table (docs/influx.md, "Configuration")."""

    url: str
    org: str
    bucket: str
    spool_dir: Path
    token_env: str = "METERSTREAM_INFLUX_TOKEN"
    batch_size: int = 5000
    flush_s: float = 1.0
    spool_max_mb: int = 512
    timeout_s: float = 10.0
    backoff_s: tuple[float, float] = (1.0, 60.0)


def load_influx_config(t: TomlTable, base_dir: Path | None = None) -> InfluxConfig:
    """The `[influx]` table, checked: a bad value is a UserError naming the file and key.
    A relative `spool_dir` is taken from `base_dir` (the config file's directory) when given."""
    url = t.string("url", "")
    if not url.startswith(("http://", "https://")):
        raise t.fail("url", f"{url!r}: give the server's base URL, e.g. http://127.0.0.1:8086")
    org = t.string("org", "")
    bucket = t.string("bucket", "")
    for k, v in (("org", org), ("bucket", bucket)):
        if not v:
            raise t.fail(k, "required (the InfluxDB 2 organization and bucket to write to)")
    spool = Path(t.string("spool_dir", "var/influx-spool"))
    if base_dir is not None and not spool.is_absolute():
        spool = base_dir / spool
    cfg = InfluxConfig(
        url=url, org=org, bucket=bucket, spool_dir=spool,
        token_env=t.string("token_env", "METERSTREAM_INFLUX_TOKEN"),
        batch_size=t.integer("batch_size", 5000, 1, 1_000_000),
        flush_s=t.number("flush_s", 1.0, 0.01, 3600.0),
        spool_max_mb=t.integer("spool_max_mb", 512, 1, 1_000_000),
        timeout_s=t.number("timeout_s", 10.0, 0.1, 600.0),
        backoff_s=t.span("backoff_s", (1.0, 60.0), 0.01, 3600.0),
    )
    t.finish()
    return cfg


# --- the spool ---------------------------------------------------------------------------------

class Spool(SpoolDir):
    """A spool of line-protocol files (meterstream.spool): each append is whole lines; a torn
    tail is cut at its last complete line."""

    prefix, suffix, what = SPOOL_PREFIX, SPOOL_SUFFIX, "influx spool"

    def __init__(self, directory: Path, max_bytes: int, file_bytes: int = 4 << 20) -> None:
        # one process per directory: a spool whose lock is free belongs to a process that is
        # gone, and a live sink may adopt it (InfluxSink, `adopt_dir`)
        super().__init__(directory, max_bytes, file_bytes, exclusive=True)

    @staticmethod
    def complete(data: bytes) -> int:
        return data.rfind(b"\n") + 1

    def append(self, data: bytes) -> bool:
        """Append whole lines (ending in a newline) durably; False when the bound is reached."""
        with self.lock:
            if self.bytes + len(data) > self.max_bytes:
                return False
            self._append_locked(data)
            return True

    def oldest(self) -> tuple[Path, bytes] | None:
        """The oldest file and its complete lines."""
        return self.oldest_bytes()


# --- sending -----------------------------------------------------------------------------------

class SendRetry(Exception):
    """The server is down or overloaded (connection error, timeout, 5xx, 429, auth): try later."""


class SendReject(Exception):
    """The server refused the data itself (4xx): never retried; the points go to `rejected`."""


class Sender(Protocol):
    def send(self, body: bytes) -> None: ...  # raises SendRetry / SendReject
    def close(self) -> None: ...


#: 4xx answers that say nothing about the data (credentials, bucket, rate): retried.
_RETRY_4XX = (401, 403, 404, 408, 429)


class ClientSender:
    """influxdb-client's v2 write API, synchronous (the sink's thread calls it), gzip on."""

    def __init__(self, url: str, token: str, org: str, bucket: str, timeout_s: float) -> None:
        from influxdb_client import InfluxDBClient, WritePrecision
        from influxdb_client.client.write_api import SYNCHRONOUS

        self._client = InfluxDBClient(url=url, token=token, org=org, enable_gzip=True,
                                      timeout=int(timeout_s * 1000))
        self._api = self._client.write_api(write_options=SYNCHRONOUS)
        self._org, self._bucket = org, bucket
        self._precision: Any = WritePrecision.NS

    def send(self, body: bytes) -> None:
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self._api.write(bucket=self._bucket, org=self._org, record=body,
                            write_precision=self._precision)
        except ApiException as e:
            reason = _api_reason(e)
            status = int(e.status or 0)
            if 400 <= status < 500 and status not in _RETRY_4XX:
                raise SendReject(f"HTTP {status}: {reason}") from None
            raise SendRetry(f"HTTP {status}: {reason}") from None
        except (HTTPError, OSError) as e:
            raise SendRetry(f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._client.close()


def _api_reason(e: Any) -> str:
    import json

    body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")
    try:
        msg = json.loads(body).get("message")
    except (ValueError, AttributeError):
        msg = None
    return str(msg or body.strip() or e.reason or "no reason given")[:500]


# --- the sink ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class InfluxStats:
    """Counters since the sink started (points unless said otherwise)."""

    written: int = 0  # accepted by the server
    spooled: int = 0  # appended to the spool (the server was down or slow)
    retried: int = 0  # sent again from the spool (each attempt counts its points)
    rejected: int = 0  # refused by the server as bad data (4xx): in the rejected file
    refused: int = 0  # not taken: the spool was at its bound (docs/influx.md, "Spool")
    spool_bytes: int = 0  # on disk now
    spool_files: int = 0
    pending: int = 0  # in memory, not yet sent or spooled
    errors: int = 0  # points lost to a failure of the sink itself (logged: disk, a bug)
    adopted: int = 0  # bytes of spool files taken over from stopped processes (adopt_dir)
    server_up: bool = True  # the last attempt reached the server
    last_error: str = ""


class _Item:
    """Points waiting in memory: formatted lazily, in the sink's thread."""

    __slots__ = ("make", "n")

    def __init__(self, n: int, make: Callable[[], list[str]]) -> None:
        self.n = n
        self.make = make


class InfluxSink:
    """Writes points to InfluxDB 2 from one thread; spools to disk while the server is down.

    The write_* methods only queue (the event loop never waits on the network) and return the
    number of points taken: 0 when the spool is full and refusing (docs/influx.md). `flush()`
    and `close()` block; their `aflush()` / `aclose()` twins run them in a thread for asyncio.
    `on_event(kind, detail)` is called from the sink's thread on `server_down`, `server_up`,
    `rejected`, `spool_full` and `spool_ok` (use `loop.call_soon_threadsafe` to reach a loop).
    """

    def __init__(self, url: str, token: str, org: str, bucket: str,
                 spool_dir: str | os.PathLike[str], *, batch_size: int = 5000,
                 flush_s: float = 1.0, spool_max_mb: float = 512, timeout_s: float = 10.0,
                 backoff_s: tuple[float, float] = (1.0, 60.0), spool_file_bytes: int = 4 << 20,
                 max_pending: int | None = None,
                 on_event: Callable[[str, str], None] | None = None,
                 sender: Sender | None = None, adopt_dir: str | os.PathLike[str] | None = None,
                 adopt_s: float = 30.0) -> None:
        if batch_size < 1 or flush_s <= 0 or spool_max_mb <= 0:
            raise ValueError("batch_size, flush_s and spool_max_mb must be positive")
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.backoff_s = backoff_s
        self.max_pending = max_pending if max_pending is not None else 20 * batch_size
        self.on_event = on_event
        self.spool = Spool(Path(spool_dir), int(spool_max_mb * (1 << 20)), spool_file_bytes)
        self.rejected_path = Path(spool_dir) / REJECTED_FILE
        self._sender = sender or ClientSender(url, token, org, bucket, timeout_s)
        self._stats = InfluxStats()
        self._cv = threading.Condition()
        self._items: deque[_Item] = deque()
        self._pending = 0
        self._oldest_at = 0.0  # monotonic time the oldest pending item was queued
        self._taken = 0  # items handed to the writer and not finished
        self._flush_wanted = False
        self._drained_last = False
        self._stop = False
        self._full = False  # the spool refused: reported once until it has room again
        self._backoff = backoff_s[0]
        self._retry_at = 0.0 if len(self.spool) else float("inf")
        # spools of stopped sinks in the same root (a worker scaled down while the server was
        # away): looked for at start and every adopt_s, taken over, written with ours
        self.adopt_dir = None if adopt_dir is None else Path(adopt_dir)
        self.adopt_s = adopt_s
        self._adopt_at = 0.0 if self.adopt_dir is not None else float("inf")
        self._thread = threading.Thread(target=self._run, name="influx-sink", daemon=True)
        self._thread.start()
        from meterstream.pipeline import metrics

        metrics.watch("influx", self)  # its stats at every scrape (pipeline/metrics.py)

    @classmethod
    def from_config(cls, cfg: InfluxConfig, env: Mapping[str, str] | None = None,
                    **kwargs: Any) -> InfluxSink:
        """A sink on the first free slot of `cfg.spool_dir` (`slot-0`, `slot-1`, ...: one per
        live process sharing the root), adopting the spools of slots whose process is gone."""
        env = os.environ if env is None else env
        token = env.get(cfg.token_env, "")
        if not token:
            log.warning("influx: %s is not set; writing without a token (InfluxDB 2 will "
                        "answer 401 and the points will wait in the spool)", cfg.token_env)
        for slot in range(MAX_SLOTS):
            try:
                return cls(cfg.url, token, cfg.org, cfg.bucket, cfg.spool_dir / f"slot-{slot}",
                           batch_size=cfg.batch_size, flush_s=cfg.flush_s,
                           spool_max_mb=cfg.spool_max_mb, timeout_s=cfg.timeout_s,
                           backoff_s=cfg.backoff_s, adopt_dir=cfg.spool_dir, **kwargs)
            except SpoolLocked:
                continue
        raise UserError(f"all {MAX_SLOTS} spool slots are in use by live processes",
                        where=str(cfg.spool_dir))

    # --- what the pipeline calls ---------------------------------------------------------------

    def write_batch(self, batch: ReadingBatch, meta: BatchMeta) -> int:
        """A collector's reading batch: one `reading` point per row (formatted in the thread;
        do not change the batch's arrays afterwards)."""
        n = len(batch)
        if not n:
            return 0
        classes = meta.class_per_row(n)  # a wrong meta fails here, in the caller
        return self._put(_Item(n, lambda: reading_lines(batch, meta, classes)))

    def write_balances(self, terminal: str, area: str, meter: npt.ArrayLike,
                       balance: npt.ArrayLike, relay: npt.ArrayLike, ts_ns: int,
                       meter_class: int | str | npt.ArrayLike = 2) -> int:
        """A balance snapshot of some meters (the arrays are copied: state may move on)."""
        lines = balance_lines(terminal, area, np.array(meter), np.array(balance),
                              np.array(relay), ts_ns, meter_class)
        return self._put(_Item(len(lines), lambda: lines)) if lines else 0

    def write_command(self, result: CommandResult, *, outcome: str | None = None,
                      ts_ns: int | None = None) -> int:
        line = command_line(result, outcome=outcome, ts_ns=ts_ns)
        return self._put(_Item(1, lambda: [line]))

    def write_link(self, event: CollectorEvent, area: str) -> int:
        line = link_line(event, area)
        return self._put(_Item(1, lambda: [line])) if line else 0

    def write_kpi(self, ts_ns: int, values: Mapping[str, int | np.integer[Any] | None], *, area: str | None = None,
                  meter_class: int | str | None = None) -> int:
        line = kpi_line(ts_ns, values, area=area, meter_class=meter_class)
        return self._put(_Item(1, lambda: [line])) if line else 0

    def write_points(self, lines: str | Iterable[str]) -> int:
        """Line-protocol lines as they are (each with its own timestamp; blank lines dropped)."""
        text = [lines] if isinstance(lines, str) else list(lines)
        got = [s for chunk in text for s in chunk.splitlines() if s.strip()]
        return self._put(_Item(len(got), lambda: got)) if got else 0

    @property
    def stats(self) -> InfluxStats:
        with self._cv:
            return replace(self._stats, spool_bytes=self.spool.bytes,
                           spool_files=len(self.spool), pending=self._pending)

    def flush(self, timeout: float | None = None) -> bool:
        """Hand everything queued to the server (or the spool); True when nothing is left in
        memory or on disk, i.e. the server has every point written so far."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._flush_wanted = True
            self._cv.notify_all()
            while self._items or self._taken:
                if not self._wait(deadline):
                    return False
            return len(self.spool) == 0

    def wait_drained(self, timeout: float | None = None) -> bool:
        """flush(), then wait until the spool is empty (the server took the backlog)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush(timeout)
        with self._cv:
            while self._items or self._taken or len(self.spool):
                if not self._wait(deadline):
                    return False
            return True

    def make_durable(self, spill_after_s: float = 1.0) -> None:
        """Return once every point taken so far is on the server or in the spool, so that a
        process killed now loses none of them. Points still queued after `spill_after_s` (a
        slow server) are spooled from this thread; a request in flight ends within the
        client's timeout, written or spooled."""
        deadline = time.monotonic() + spill_after_s
        with self._cv:
            self._flush_wanted = True
            self._cv.notify_all()
            while self._items and self._wait(deadline):
                pass
            left = list(self._items)
            self._items.clear()
            self._pending = 0
        if left:
            self._spool_lines(self._format(left), sum(i.n for i in left))
        with self._cv:
            while self._taken:
                self._cv.wait()

    async def amake_durable(self, spill_after_s: float = 1.0) -> None:
        await asyncio.to_thread(self.make_durable, spill_after_s)

    def retry_now(self) -> None:
        """Try the spool now instead of at the end of the current backoff."""
        with self._cv:
            if len(self.spool):
                self._retry_at = 0.0
                self._backoff = self.backoff_s[0]
            self._cv.notify_all()

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush, stop the thread, close the client. What the server did not take stays in the
        spool and is written by the next sink started on the same directory."""
        from meterstream.pipeline import metrics

        metrics.unwatch("influx", self)
        self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:
            left = list(self._items)
            self._items.clear()
            self._pending = 0
        if left:  # a flush that timed out: keep what is still in memory on disk
            self._spool_lines(self._format(left), sum(i.n for i in left))
        self.spool.close()
        self._sender.close()

    async def aflush(self, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.flush, timeout)

    async def await_drained(self, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.wait_drained, timeout)

    async def aclose(self, timeout: float | None = 30.0) -> None:
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------

    def _wait(self, deadline: float | None) -> bool:
        if deadline is None:
            self._cv.wait()
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self._cv.wait(left)
        return True

    def _put(self, item: _Item) -> int:
        spill: list[_Item] = []
        with self._cv:
            if self._stop:
                raise RuntimeError("the InfluxDB sink is closed")
            if self._full and not self._stats.server_up:
                self._stats = replace(self._stats, refused=self._stats.refused + item.n)
                return 0
            if not self._items:
                self._oldest_at = time.monotonic()
            self._items.append(item)
            self._pending += item.n
            # the server is slow and memory is at its bound: the oldest go to disk from here
            while self._pending > self.max_pending and len(self._items) > 1:
                old = self._items.popleft()
                self._pending -= old.n
                spill.append(old)
            if self._pending >= self.batch_size or spill:
                self._cv.notify_all()
        if spill:
            self._spool_lines(self._format(spill), sum(i.n for i in spill))
        return item.n

    def _take(self) -> list[_Item]:
        """Up to batch_size points of queued items (at least one item). Holds the lock."""
        got: list[_Item] = []
        n = 0
        while self._items and (not got or n + self._items[0].n <= self.batch_size):
            item = self._items.popleft()
            got.append(item)
            n += item.n
        self._pending -= n
        self._taken += len(got)
        if self._items:
            self._oldest_at = time.monotonic()
        return got

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    now = time.monotonic()
                    due = bool(self._items) and (
                        self._pending >= self.batch_size or self._flush_wanted or self._stop
                        or now - self._oldest_at >= self.flush_s)
                    drain = len(self.spool) > 0 and now >= self._retry_at
                    if now >= self._adopt_at and not self._stop:
                        self._adopt_at = now + self.adopt_s
                        items = None
                        break
                    if due and not (drain and not self._drained_last):  # take turns
                        items = self._take()
                        self._drained_last = False
                        break
                    if drain:
                        items = []
                        self._drained_last = True
                        break
                    if not self._items:
                        self._flush_wanted = False
                    if self._stop:
                        return
                    waits = [self._retry_at - now if len(self.spool) else None,
                             self._oldest_at + self.flush_s - now if self._items else None,
                             self._adopt_at - now if self.adopt_dir is not None else None]
                    timeout = min((w for w in waits if w is not None), default=None)
                    self._cv.wait(None if timeout is None else max(timeout, 0.001))
            try:
                if items is None:
                    self._adopt()
                elif items:
                    self._handle(self._format(items))
                else:
                    self._drain_one()
            except Exception:  # a bug must not kill the thread: say so, count, go on
                log.exception("influx sink: unexpected error")
                self._count(errors=sum(i.n for i in items or ()))
            finally:
                with self._cv:
                    self._taken -= len(items or ())
                    self._cv.notify_all()

    def _adopt(self) -> None:
        """Take over the spools in `adopt_dir` (the root itself and its subdirectories) that no
        live process holds; their points are then written with this sink's own."""
        assert self.adopt_dir is not None
        try:
            found = [self.adopt_dir, *sorted(p for p in self.adopt_dir.iterdir() if p.is_dir())]
        except OSError:
            return
        for d in found:
            if d.resolve() == self.spool.dir.resolve() or not any(
                    d.glob(f"{SPOOL_PREFIX}*{SPOOL_SUFFIX}")):
                continue
            try:
                other = Spool(d, self.spool.max_bytes, self.spool.file_bytes)
            except SpoolLocked:
                continue  # its process is alive and writes it itself
            except UserError as e:
                log.warning("influx: cannot look at spool %s: %s", d, e)
                continue
            try:
                n_bytes = other.bytes
                n = self.spool.adopt(other)
            finally:
                other.close()
            if n:
                with self._cv:
                    self._retry_at = 0.0 if self._stats.server_up else min(
                        self._retry_at, time.monotonic() + self._backoff)
                    self._count_locked(adopted=n_bytes)
                self._event("spool_adopted", f"took over {n} spool files ({n_bytes} bytes) "
                            f"left in {d} by a process that is gone")

    def _format(self, items: list[_Item]) -> list[str]:
        lines: list[str] = []
        for item in items:
            try:
                lines += item.make()
            except Exception:
                log.exception("influx sink: could not format %d points; they are lost", item.n)
                self._count(errors=item.n)
        return lines

    def _handle(self, lines: list[str]) -> None:
        """Send new points; while the server is known down they go straight to the spool (the
        spool's own retries find out when it is back)."""
        if not lines:
            return
        body = ("\n".join(lines) + "\n").encode()
        if not self._stats.server_up:
            self._spool_body(body, len(lines))
            return
        try:
            self._sender.send(body)
        except SendRetry as e:
            self._went_down(str(e))
            self._spool_body(body, len(lines))
        except SendReject as e:
            self._reject(body, len(lines), str(e))
        else:
            self._count(written=len(lines))
            self._came_up()

    def _drain_one(self) -> None:
        got = self.spool.oldest()
        if got is None:
            return
        path, body = got
        n = body.count(b"\n")
        self._count(retried=n)
        try:
            self._sender.send(body)
        except SendRetry as e:
            self._went_down(str(e))
            return
        except SendReject as e:
            self._reject(body, n, str(e))
        else:
            self._count(written=n)
        self.spool.remove(path)  # only now: the server took it (or refused it as bad data)
        with self._cv:
            self._retry_at = 0.0 if len(self.spool) else float("inf")
        self._came_up()
        if self._full and self.spool.bytes < self.spool.max_bytes:
            self._full = False
            self._event("spool_ok", f"spool at {self.spool.bytes} bytes: taking points again")

    def _spool_lines(self, lines: list[str], n: int) -> None:
        if lines:
            self._spool_body(("\n".join(lines) + "\n").encode(), n)

    def _spool_body(self, body: bytes, n: int) -> None:
        try:
            ok = self.spool.append(body)
        except OSError as e:
            log.error("influx spool %s: cannot write (%s): %d points lost", self.spool.dir, e, n)
            self._count(errors=n)
            return
        if ok:
            self._count(spooled=n)
            with self._cv:
                if self._retry_at == float("inf"):
                    self._retry_at = time.monotonic() + self._backoff
            return
        self._count(refused=n)
        if not self._full:
            self._full = True
            self._event("spool_full", f"spool {self.spool.dir} reached its bound of "
                        f"{self.spool.max_bytes} bytes; refusing new points until the server "
                        "takes the backlog (nothing spooled is dropped)")

    def _reject(self, body: bytes, n: int, reason: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            with open(self.rejected_path, "ab") as fh:
                fh.write(f"# {stamp} {n} points rejected: {reason}\n".encode())
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            log.error("influx: cannot keep %d rejected points in %s (%s)", n, self.rejected_path, e)
            self._count(errors=n)
            return
        self._count(rejected=n)
        self._event("rejected", f"{n} points refused by the server ({reason}); kept in "
                    f"{self.rejected_path}")

    def _went_down(self, reason: str) -> None:
        with self._cv:
            was_up = self._stats.server_up
            self._stats = replace(self._stats, server_up=False, last_error=reason)
            self._retry_at = time.monotonic() + self._backoff * random.uniform(0.8, 1.2)
            self._backoff = min(self._backoff * 2, self.backoff_s[1])
        if was_up:
            self._event("server_down", f"{reason}; spooling to {self.spool.dir}")

    def _came_up(self) -> None:
        with self._cv:
            was_down = not self._stats.server_up
            self._stats = replace(self._stats, server_up=True)
            self._backoff = self.backoff_s[0]
        if was_down:
            self._event("server_up", f"server answering again; {len(self.spool)} spool files "
                        "left")

    def _count(self, **delta: int) -> None:
        with self._cv:
            self._count_locked(**delta)

    def _count_locked(self, **delta: int) -> None:
        self._stats = replace(self._stats, **{k: getattr(self._stats, k) + v
                                              for k, v in delta.items()})

    def _event(self, kind: str, detail: str) -> None:
        level = logging.INFO if kind in ("server_up", "spool_ok") else logging.ERROR
        if kind == "spool_adopted":
            level = logging.WARNING
        if kind == "server_down":
            level = logging.WARNING
        log.log(level, "influx %s: %s", kind, detail)
        if self.on_event is not None:
            try:
                self.on_event(kind, detail)
            except Exception:
                log.exception("influx on_event callback failed")

