"""Capture files: a run's wire traffic as (time ns, terminal, direction, bytes) records.

The format is documented in docs/recording.md ("The capture file"). It is append-only and
streamable: a writer appends records as traffic passes and flushes often, and a reader takes
every complete record up to the first incomplete or damaged one, so a file cut by a crash reads
back up to its last complete record. Bytes only: this module never parses DL/T 645, never opens
a socket and never holds money.

    header   8 bytes magic b"MSCAP\\r\\n\\x1a", u16 version (1), u32 n, n bytes of UTF-8 JSON
    record   i64 ts_ns, u32 length, u16 terminal, u8 kind, u8 check, then `length` bytes

All integers little-endian. `check` = (sum of the other 15 header bytes + 0x5A) & 0xFF, so a
zero-filled or torn tail is not taken for a record.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import numpy as np
import numpy.typing as npt
from numba import njit

from meterstream.errors import UserError

MAGIC = b"MSCAP\r\n\x1a"
VERSION = 1
_FILE_HEAD = struct.Struct("<8sHI")
_REC = struct.Struct("<qIHBB")
REC_HEADER = _REC.size  # 16
MAX_PAYLOAD = 1 << 24  # a record longer than this is damage, not traffic
MAX_META = 1 << 20

# Record kinds.
TERMINAL = 1  # payload: JSON {"id": ..., "mode": "listen"|"dial", ...}; defines the index
TO_FIELD = 2  # bytes the collector sent towards the terminal (collector -> field)
TO_COLLECTOR = 3  # bytes the terminal sent (field -> collector)
OPEN = 4  # a connection of the terminal was made; payload: UTF-8 note (peer)
CLOSE = 5  # the connection ended; payload: UTF-8 note (who closed, why)
KINDS = {TERMINAL: "terminal", TO_FIELD: "to_field", TO_COLLECTOR: "to_collector",
         OPEN: "open", CLOSE: "close"}


def _check(head15: bytes) -> int:
    return (sum(head15) + 0x5A) & 0xFF


def pack_record(ts_ns: int, terminal: int, kind: int, payload: bytes) -> bytes:
    """One record's bytes."""
    head = struct.pack("<qIHB", ts_ns, len(payload), terminal, kind)
    return head + bytes((_check(head),)) + payload


@dataclass(frozen=True)
class Record:
    ts_ns: int
    terminal: int
    kind: int
    payload: bytes


class CaptureWriter:
    """Appends records to a capture file; terminals get their index on first use.

    `flush_s`: the buffer is flushed to the OS when a write comes this long after the last flush
    (0: every record), and always on `flush()` / `close()`. Appending to an existing capture
    continues its terminal table.
    """

    def __init__(self, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None,
                 flush_s: float = 0.2, append: bool = False) -> None:
        self.path = Path(path)
        self.flush_s = flush_s
        self.terminals: dict[str, int] = {}
        self.records = 0
        self.bytes = 0
        existing = append and self.path.exists() and self.path.stat().st_size > 0
        if existing:
            with open(self.path, "rb") as fh:
                if fh.read(2) == b"\x1f\x8b":
                    raise UserError("cannot append to a gzip-compressed capture (gunzip it "
                                    "first)", where=str(path))
            cap = read_capture(self.path)
            self.terminals = {t["id"]: i for i, t in enumerate(cap.terminals)}
            size = cap.valid_bytes
            with open(self.path, "r+b") as fh:  # drop a torn tail before appending
                fh.truncate(size)
        try:
            self._fh: IO[bytes] = open(self.path, "ab" if existing else "wb")  # noqa: SIM115
        except OSError as exc:
            raise UserError(f"cannot write the capture: {exc.strerror}", where=str(path)) from None
        if not existing:
            m = dict(meta or {})
            m.setdefault("created_ns", time.time_ns())
            text = json.dumps(m, sort_keys=True).encode()
            self._fh.write(_FILE_HEAD.pack(MAGIC, VERSION, len(text)) + text)
        self._last_flush = time.monotonic()

    def terminal(self, tid: str, *, ts_ns: int | None = None, **info: Any) -> int:
        """The index of terminal `tid` (a TERMINAL record is written the first time)."""
        idx = self.terminals.get(tid)
        if idx is None:
            idx = len(self.terminals)
            if idx > 0xFFFF:
                raise ValueError("a capture holds at most 65,536 terminals")
            self.terminals[tid] = idx
            body = json.dumps({"id": tid, **info}, sort_keys=True).encode()
            self.write(idx, TERMINAL, body, ts_ns=ts_ns)
        return idx

    def write(self, terminal: int, kind: int, payload: bytes, *, ts_ns: int | None = None) -> None:
        self._fh.write(pack_record(time.time_ns() if ts_ns is None else ts_ns, terminal, kind,
                                   payload))
        self.records += 1
        self.bytes += len(payload)
        if self.flush_s <= 0 or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def write_raw(self, data: bytes, records: int) -> None:
        """Bytes already packed with `pack_record` (bulk writers: the LCL converter)."""
        self._fh.write(data)
        self.records += records

    def flush(self) -> None:
        self._fh.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Capture:
    """A capture read into memory: the records as aligned arrays over one bytes buffer."""

    path: str
    version: int
    meta: dict[str, Any]
    terminals: list[dict[str, Any]]
    buf: bytes
    ts: npt.NDArray[np.int64]
    terminal: npt.NDArray[np.int32]
    kind: npt.NDArray[np.int8]
    offset: npt.NDArray[np.int64]  # payload start in buf
    length: npt.NDArray[np.int64]
    valid_bytes: int  # bytes of the file up to the end of the last complete record
    damage: str = ""  # why reading stopped before the end of the file ("" : clean end)
    tail_bytes: int = 0  # bytes after the last complete record
    _ids: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def payload(self, i: int) -> bytes:
        o = int(self.offset[i])
        return self.buf[o:o + int(self.length[i])]

    def records(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield Record(int(self.ts[i]), int(self.terminal[i]), int(self.kind[i]),
                         self.payload(i))

    def terminal_index(self, tid: str) -> int:
        if not self._ids:
            self._ids = {t["id"]: i for i, t in enumerate(self.terminals)}
        return self._ids[tid]

    def stream(self, terminal: int, kind: int) -> bytes:
        """Every payload of one terminal and direction, concatenated in record order."""
        sel = np.flatnonzero((self.terminal == terminal) & (self.kind == kind))
        return b"".join(self.payload(int(i)) for i in sel)


def _open_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise UserError("capture file not found", where=str(path)) from None
    except OSError as exc:
        raise UserError(f"cannot read the capture: {exc.strerror}", where=str(path)) from None
    if raw[:2] == b"\x1f\x8b":  # a gzip-compressed capture (e.g. `gzip run.cap`)
        parts = []
        rest = raw
        try:
            while rest[:2] == b"\x1f\x8b":  # concatenated members, as appending gzip writes
                d = zlib.decompressobj(wbits=31)
                parts.append(d.decompress(rest))
                if not d.eof:
                    break  # a cut stream: keep what decompressed
                rest = d.unused_data
        except zlib.error:
            pass  # damaged: keep what decompressed before the damage
        raw = b"".join(parts)
    return raw


def read_capture(path: str | os.PathLike[str]) -> Capture:
    """Read every complete record of the capture at `path` (plain or gzip-compressed).

    A file that is not a capture, or of a newer version, is a UserError; a torn or damaged
    tail is not: reading stops there and `damage` says why (`valid_bytes` is where it stopped).
    """
    p = Path(path)
    raw = _open_bytes(p)
    return parse_capture(raw, source=str(p))


def parse_capture(raw: bytes, *, source: str = "<capture>") -> Capture:
    if len(raw) < _FILE_HEAD.size or raw[:8] != MAGIC:
        raise UserError("not a meterstream capture file (no MSCAP header; see docs/recording.md)",
                        where=source)
    _, version, meta_len = _FILE_HEAD.unpack_from(raw, 0)
    if version != VERSION:
        raise UserError(f"capture format version {version}; this meterstream reads version "
                        f"{VERSION}", where=source)
    if meta_len > MAX_META or _FILE_HEAD.size + meta_len > len(raw):
        raise UserError("capture header is cut or damaged", where=source)
    pos = _FILE_HEAD.size + meta_len
    try:
        meta = json.loads(raw[_FILE_HEAD.size:pos])
    except ValueError:
        raise UserError("capture header metadata is not JSON", where=source) from None
    n_max = (len(raw) - pos) // REC_HEADER + 1
    ts = np.empty(n_max, np.int64)
    term = np.empty(n_max, np.int32)
    kind = np.empty(n_max, np.int8)
    off = np.empty(n_max, np.int64)
    length = np.empty(n_max, np.int64)
    buf = np.frombuffer(raw, np.uint8)
    n, stop, code = _scan(buf, pos, ts, term, kind, off, length)
    damage = _DAMAGE[code].format(pos=stop) if code else ""
    terminals: list[dict[str, Any]] = []
    for i in np.flatnonzero(kind[:n] == TERMINAL).tolist():
        o, ln = int(off[i]), int(length[i])
        try:
            info = json.loads(raw[o:o + ln])
            assert isinstance(info, dict) and isinstance(info.get("id"), str)
        except (ValueError, AssertionError):
            n, stop = i, o - REC_HEADER
            damage = f"terminal record at byte {stop} is not JSON with an id"
            break
        terminals.append(info)
    end = len(raw)
    return Capture(source, version, meta, terminals, raw, ts[:n].copy(), term[:n].copy(),
                   kind[:n].copy(), off[:n].copy(), length[:n].copy(), stop, damage, end - stop)


_DAMAGE = {
    1: "incomplete record header at byte {pos}",
    2: "damaged record header at byte {pos}",
    3: "incomplete record at byte {pos}",
    4: "terminal record at byte {pos} does not define the next terminal index",
    5: "record at byte {pos} names a terminal not defined before it",
}


@njit(cache=True)
def _scan(buf: npt.NDArray[np.uint8], pos: int, ts: npt.NDArray[np.int64],
          term: npt.NDArray[np.int32], kind: npt.NDArray[np.int8], off: npt.NDArray[np.int64],
          length: npt.NDArray[np.int64]) -> tuple[int, int, int]:
    """One pass over the records from `pos`: (records, where reading stopped, damage code)."""
    end = buf.shape[0]
    n = 0
    terminals = 0
    while pos < end:
        if end - pos < REC_HEADER:
            return n, pos, 1
        s = 0
        for k in range(15):
            s += buf[pos + k]
        t = 0
        for k in range(8):
            t |= int(buf[pos + k]) << (8 * k)
        ln = int(buf[pos + 8]) | int(buf[pos + 9]) << 8 | int(buf[pos + 10]) << 16 \
            | int(buf[pos + 11]) << 24
        tm = int(buf[pos + 12]) | int(buf[pos + 13]) << 8
        kd = int(buf[pos + 14])
        if (s + 0x5A) & 0xFF != buf[pos + 15] or kd < 1 or kd > 5 or ln > MAX_PAYLOAD:
            return n, pos, 2
        start = pos + REC_HEADER
        if start + ln > end:
            return n, pos, 3
        if kd == TERMINAL:
            if tm != terminals:
                return n, pos, 4
            terminals += 1
        elif tm >= terminals:
            return n, pos, 5
        ts[n] = t
        term[n] = tm
        kind[n] = kd
        off[n] = start
        length[n] = ln
        n += 1
        pos = start + ln
    return n, pos, 0
