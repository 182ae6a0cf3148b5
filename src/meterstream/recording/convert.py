"""The recorded year as field traffic: the LCL file -> archive, capture, readings, payments.

The archive, the cumulative registers and the payment stream are bench/make_replay_inputs.py's
(one implementation: this module calls it); here they also become what the meters would have
put on the wire. At every half-hour read of a meter the capture holds the collector's 0001FF00
request and, when the recorded half hour exists, the meter's 91H energy-block reply (total,
T1..T4 of that reading, encoded with the project's codec layout), and the terminals and meters
files a collector needs. A recorded gap is a request with no reply: a missed read. Vectorised
(numpy): no per-read Python. Never modifies the source file, never holds a balance.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt

from meterstream.capture import REC_HEADER, TO_COLLECTOR, TO_FIELD, CaptureWriter
from meterstream.collectors.dlt645 import (
    ENERGY_BLOCK_DI,
    encode_read,
    encode_read_reply,
    encode_reads,
)
from meterstream.errors import UserError

REPO = Path(__file__).resolve().parents[3]
STATUS_DI = 0x04000503
READ_S = 1800  # one read per recorded half hour, at its end
ZONE_OFFSET_S = 8 * 3600  # the recorded wall clock is read as Asia/Shanghai (UTC+8, no DST)
PREAMBLE = 2  # FE bytes before every frame, as the collector and the field send them
METER_STEP_NS = 100_000_000  # meters of one terminal are read 0.1 s apart within a read
REPLY_AFTER_NS = 40_000_000  # a reply 40 ms after its request


def _make_replay_inputs() -> ModuleType:
    """bench/make_replay_inputs.py of this checkout (the one implementation of the registers)."""
    path = REPO / "bench" / "make_replay_inputs.py"
    if not path.exists():
        raise UserError("convert-lcl needs a meterstream checkout (bench/make_replay_inputs.py "
                        "builds the registers and payments); run it from the repository",
                        where=str(path))
    name = "meterstream_bench_make_replay_inputs"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


@dataclass
class Converted:
    paths: dict[str, Path]
    meters: int
    terminals: int
    reads: int
    replies: int
    missed: int


def _bcd_wire(values: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """[n, k] register values (0..99999999) -> [n, 4k] BCD bytes, low byte first, +33H applied."""
    n, k = values.shape
    out = np.empty((n, k, 4), np.uint8)
    v = values.copy()
    for b in range(4):
        two = v % 100
        out[:, :, b] = ((two // 10) << 4 | (two % 10)).astype(np.uint8)
        v //= 100
    return (out.reshape(n, 4 * k) + np.uint8(0x33)).astype(np.uint8)


def block_replies(addresses: npt.NDArray[np.int64], regs: npt.NDArray[np.int64],
                  meter_of_row: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """[rows, 38] 91H replies to 0001FF00 (FE FE, header, DI, 5 registers, CS, 16), exactly the
    bytes `encode_read_reply(address, 0x0001FF00, value, preamble=2)` gives, built for all rows
    at once."""
    n = regs.shape[0]
    heads = np.empty((addresses.shape[0], 2 + 14), np.uint8)  # FE FE 68 A 68 91 18 DI+33
    for i, a in enumerate(addresses.tolist()):
        one = encode_read_reply(f"{a:012d}", ENERGY_BLOCK_DI, bytes(20), preamble=PREAMBLE)
        heads[i] = np.frombuffer(one[:16], np.uint8)
    out = np.empty((n, 38), np.uint8)
    out[:, :16] = heads[meter_of_row]
    out[:, 16:36] = _bcd_wire(regs)
    head_sum = heads[:, 2:].astype(np.int64).sum(axis=1)
    out[:, 36] = ((head_sum[meter_of_row] + out[:, 16:36].astype(np.int64).sum(axis=1)) & 0xFF
                  ).astype(np.uint8)
    out[:, 37] = 0x16
    return out


def _records(ts_ns: npt.NDArray[np.int64], terminal: npt.NDArray[np.int64], kind: int,
             frames: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """[n, 16 + L] packed capture records of equal-length frames."""
    n, ln = frames.shape
    rec = np.empty((n, REC_HEADER + ln), np.uint8)
    head = np.zeros(n, dtype=np.dtype([("ts", "<i8"), ("len", "<u4"), ("term", "<u2"),
                                       ("kind", "u1"), ("check", "u1")]))
    head["ts"], head["len"], head["term"], head["kind"] = ts_ns, ln, terminal, kind
    hb = head.view(np.uint8).reshape(n, REC_HEADER)
    hb[:, 15] = ((hb[:, :15].astype(np.int64).sum(axis=1) + 0x5A) & 0xFF).astype(np.uint8)
    rec[:, :REC_HEADER] = hb
    rec[:, REC_HEADER:] = frames
    return rec


def convert_lcl(out: Path, *, data_path: Path | None = None, meters: int | None = None,
                seed: int = 2013, port_base: int = 17100, host: str = "127.0.0.1",
                dial_every: int = 0, collector: str = "127.0.0.1:9700") -> Converted:
    """Write archive.csv (+ -terminals.csv, -meters.csv), readings.csv, payments.csv,
    traffic.cap and README.txt into `out`."""
    mri = _make_replay_inputs()
    from meterfield.lcl import load_consumption

    if meters is not None and meters < 1:
        raise UserError(f"--meters {meters}: expected at least 1 meter")
    data = load_consumption(data_path, meters=meters)
    if data.n_meters == 0:
        raise UserError("the recorded file holds no meters", where=str(data_path))
    paths = mri.make_inputs(out, consumption=data, seed=seed)
    # The same draws in the same order as make_inputs: archive rows, then the registers.
    import tomllib

    rng = np.random.default_rng(seed)
    with open(mri.TARIFFS, "rb") as fh:
        plans = list(tomllib.load(fh)["plans"])
    archive = mri.archive_rows(data.n_meters, plans, rng)
    read_ts, regs = mri.registers_of(data, rng)  # wall seconds of each reading, [rows, 5]
    addresses = np.array([int(r[0]) for r in archive], np.int64)
    term_ids = sorted({r[1] for r in archive})
    term_of_meter = np.array([term_ids.index(r[1]) for r in archive], np.int64)
    pos_on_term = np.zeros(data.n_meters, np.int64)
    for t in range(len(term_ids)):
        idx = np.flatnonzero(term_of_meter == t)
        pos_on_term[idx] = np.arange(idx.size)

    # Every half-hour read of each meter, from its first recorded reading to its last.
    counts = np.diff(data.starts)
    first = np.where(counts > 0, read_ts[np.minimum(data.starts[:-1], max(data.n_rows - 1, 0))], 0)
    last = np.where(counts > 0, read_ts[np.maximum(data.starts[1:] - 1, 0)], -READ_S)
    n_slots = np.where(counts > 0, (last - first) // READ_S + 1, 0)
    slot_meter = np.repeat(np.arange(data.n_meters), n_slots)
    slot_start = np.repeat(np.cumsum(n_slots) - n_slots, n_slots)
    slot_ts = first[slot_meter] + (np.arange(slot_meter.size) - slot_start) * READ_S
    # which slots have a reading: rows of meter m land on slot (ts - first[m]) / READ_S
    row_meter = np.repeat(np.arange(data.n_meters), counts)
    if np.any((read_ts - first[row_meter]) % READ_S):
        raise UserError("recorded half hours are not on a 30-minute grid", where=str(data_path))
    row_slot = (np.cumsum(n_slots) - n_slots)[row_meter] + (read_ts - first[row_meter]) // READ_S
    have = np.zeros(slot_meter.size, bool)
    have[row_slot] = True

    # Times: the reading's wall clock as Asia/Shanghai, meters of a terminal 0.1 s apart.
    base_ns = (slot_ts - ZONE_OFFSET_S) * 1_000_000_000 + pos_on_term[slot_meter] * METER_STEP_NS
    req = np.frombuffer(encode_reads(addresses, ENERGY_BLOCK_DI, preamble=PREAMBLE),
                        np.uint8).reshape(data.n_meters, -1)
    req_rec = _records(base_ns, term_of_meter[slot_meter], TO_FIELD, req[slot_meter])
    rep = block_replies(addresses, regs, row_meter)
    rep_rec = _records(base_ns[row_slot] + REPLY_AFTER_NS, term_of_meter[row_meter],
                       TO_COLLECTOR, rep)
    # Interleave in time order: each request, then its reply (if any).
    order_ts = np.concatenate((base_ns, base_ns[row_slot] + REPLY_AFTER_NS))
    order_kind = np.concatenate((np.zeros(base_ns.size, np.int8), np.ones(row_slot.size, np.int8)))
    order = np.lexsort((order_kind, order_ts))
    width_req, width_rep = req_rec.shape[1], rep_rec.shape[1]

    cap_path = out / "traffic.cap"
    meta = {"source": str(data_path or "lcl_2013_halfhourly.csv.gz"), "made_by": "meterstream convert-lcl",
            "seed": seed, "timezone": "Asia/Shanghai", "read_s": READ_S,
            "note": "0001FF00 requests at every half-hour read; 91H replies where the half hour "
                    "was recorded (a request without a reply is a missed read); status word 3 "
                    "answered once per meter (relay closed)"}
    term_rows = []
    meters_rows = []
    with CaptureWriter(cap_path, meta=meta, flush_s=3600) as w:
        t0 = int(order_ts.min()) - 1_000_000_000 if order_ts.size else 0
        for t, tid in enumerate(term_ids):
            mine = np.flatnonzero(term_of_meter == t)
            dial = dial_every > 0 and t % dial_every == dial_every - 1
            if dial:
                chost, _, cport = collector.rpartition(":")
                info = {"mode": "dial", "host": chost, "port": int(cport)}
            else:
                info = {"mode": "listen", "host": host, "port": port_base + t if port_base else 0}
            info.update(area=archive[int(mine[0])][2], kind="dtu" if dial else "concentrator",
                        protocol="dlt645", firmware="LCL-REPLAY-1" if dial else "",
                        heartbeat_s=30 if dial else 0,
                        meters=[f"{int(a):012d}" for a in addresses[mine]])
            w.terminal(tid, ts_ns=t0, **info)
            term_rows.append([tid, info["area"], info["kind"], info["mode"], info["host"],
                              info["port"], "dlt645", len(mine), info["firmware"],
                              info["heartbeat_s"]])
            meters_rows += [[f"{int(a):012d}", tid, "dlt645-2007", "", "", "none"]
                            for a in addresses[mine]]
            # status word 3 of each meter, once: relay closed, no prepaid bits, no keep-power
            for m in mine.tolist():
                a = f"{int(addresses[m]):012d}"
                w.write(t, TO_FIELD, encode_read(a, STATUS_DI, preamble=PREAMBLE), ts_ns=t0)
                w.write(t, TO_COLLECTOR, encode_read_reply(a, STATUS_DI, b"\x00\x00",
                                                           preamble=PREAMBLE), ts_ns=t0)
        chunk = 1 << 18
        for s in range(0, order.size, chunk):
            part = order[s:s + chunk]
            is_rep = part >= base_ns.size
            pieces = np.empty(int((~is_rep).sum()) * width_req + int(is_rep.sum()) * width_rep,
                              np.uint8)
            widths = np.where(is_rep, width_rep, width_req)
            ends = np.cumsum(widths)
            starts = ends - widths
            ri = np.flatnonzero(~is_rep)
            pi = np.flatnonzero(is_rep)
            # scatter fixed-width rows into the byte run
            pieces[(starts[ri][:, None] + np.arange(width_req)).ravel()] = req_rec[part[ri]].ravel()
            pieces[(starts[pi][:, None] + np.arange(width_rep)).ravel()] = \
                rep_rec[part[pi] - base_ns.size].ravel()
            w.write_raw(pieces.tobytes(), part.size)
    stem = paths["archive"].with_suffix("")
    with open(f"{stem}-terminals.csv", "w", newline="", encoding="utf-8") as fh:
        cw = csv.writer(fh, lineterminator="\n")
        cw.writerow(["terminal", "area", "kind", "mode", "host", "port", "protocol", "meters",
                     "firmware", "heartbeat_s"])
        cw.writerows(term_rows)
    with open(f"{stem}-meters.csv", "w", newline="", encoding="utf-8") as fh:
        cw = csv.writer(fh, lineterminator="\n")
        cw.writerow(["meter", "terminal", "protocol", "unit", "map", "prepaid"])
        cw.writerows(meters_rows)
    paths["capture"] = cap_path
    paths["terminals"] = Path(f"{stem}-terminals.csv")
    paths["meters"] = Path(f"{stem}-meters.csv")
    return Converted(paths, data.n_meters, len(term_ids), int(slot_meter.size), int(row_slot.size),
                     int(slot_meter.size - row_slot.size))

