"""The collection archive: which terminals exist, how to reach them, and the meters behind each.

Read from the archive files (docs/field.md, "The archive files"): `PATH` (the billing archive),
`PATH-terminals.csv` (terminal,area,kind,mode,host,port,protocol,meters,firmware,heartbeat_s) and
`PATH-meters.csv` (meter,terminal,protocol,unit,map,prepaid). Meters are held as arrays per
terminal, not an object each, so a million of them stay small. A bad row is a UserError naming
the file, the line and the reason. No sockets, no money.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from meterstream.errors import UserError

METER_PROTOCOLS = ("dlt645-2007", "dlt645-1997", "modbus")
P2007, P1997, PMODBUS = 0, 1, 2
MODES = ("listen", "dial")
TERMINAL_PROTOCOLS = ("dlt645", "modbus")

_TERM_COLS = ("terminal", "area", "kind", "mode", "host", "port", "protocol")
_METER_COLS = ("meter", "terminal", "protocol")


@dataclass
class TerminalPlan:
    """One terminal and its meters (arrays aligned by position on the terminal)."""

    id: str
    area: str
    kind: str
    mode: str  # listen: the collector connects to host:port; dial: the terminal dials in
    host: str
    port: int
    protocol: str  # dlt645 | modbus
    firmware: str = ""
    heartbeat_s: float = 0.0  # dial-in terminals: the heartbeat period (0: none expected)
    address: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    meter_protocol: npt.NDArray[np.int8] = field(default_factory=lambda: np.zeros(0, np.int8))
    unit: npt.NDArray[np.int16] = field(default_factory=lambda: np.zeros(0, np.int16))
    map_name: list[str] = field(default_factory=list)  # Modbus register map per meter

    @property
    def n(self) -> int:
        return int(self.address.shape[0])

    def address_text(self, k: int) -> str:
        return f"{int(self.address[k]):012d}"


@dataclass
class Archive:
    terminals: dict[str, TerminalPlan]
    source: str

    @property
    def meters(self) -> int:
        return sum(t.n for t in self.terminals.values())


def sibling_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """PATH-terminals.csv and PATH-meters.csv next to PATH (PATH without its .csv)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix == ".csv" else p
    return Path(f"{stem}-terminals.csv"), Path(f"{stem}-meters.csv")


def _read_rows(path: Path, needed: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.exists():
        raise UserError(f"archive file not found: {path} (write one with "
                        "`meterstream sim --write-archive PATH`, see docs/field.md)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"missing column(s) {', '.join(missing)}", where=f"{path}:1")
        return list(reader)


def load_archive(path: str | os.PathLike[str]) -> Archive:
    """The terminals and meters of the archive at PATH (its two sibling files)."""
    term_path, meter_path = sibling_paths(path)
    terminals: dict[str, TerminalPlan] = {}
    for line, row in enumerate(_read_rows(term_path, _TERM_COLS), start=2):
        where = f"{term_path}:{line}"
        tid = (row["terminal"] or "").strip()
        if not tid:
            raise UserError("empty terminal id", where=where)
        if tid in terminals:
            raise UserError(f"terminal {tid} is listed twice", where=where)
        mode = (row["mode"] or "").strip()
        if mode not in MODES:
            raise UserError(f"mode {mode!r} is not listen or dial", where=where)
        proto = (row["protocol"] or "").strip()
        if proto not in TERMINAL_PROTOCOLS:
            raise UserError(f"protocol {proto!r} is not dlt645 or modbus", where=where)
        try:
            port = int(row["port"] or 0)
        except ValueError:
            raise UserError(f"port {row['port']!r} is not a number", where=where) from None
        if not 0 <= port <= 65535 or (mode == "listen" and port == 0):
            raise UserError(f"port {port} is not a port a terminal listens on", where=where)
        hb_text = (row.get("heartbeat_s") or "").strip()
        try:
            heartbeat = float(hb_text) if hb_text else 0.0
        except ValueError:
            raise UserError(f"heartbeat_s {hb_text!r} is not a number", where=where) from None
        terminals[tid] = TerminalPlan(
            tid, (row["area"] or "").strip(), (row["kind"] or "").strip(), mode,
            (row["host"] or "").strip(), port, proto, (row.get("firmware") or "").strip(),
            heartbeat)
    per_term: dict[str, tuple[list[int], list[int], list[int], list[str]]] = {
        t: ([], [], [], []) for t in terminals}
    seen: set[int] = set()
    for line, row in enumerate(_read_rows(meter_path, _METER_COLS), start=2):
        where = f"{meter_path}:{line}"
        text = (row["meter"] or "").strip()
        if len(text) != 12 or not text.isdigit():
            raise UserError(f"meter address {text!r} is not 12 digits", where=where)
        addr = int(text)
        if text == "999999999999":
            raise UserError("meter address 999999999999 is the broadcast address, not a meter",
                            where=where)
        if addr in seen:
            raise UserError(f"meter {text} is listed twice", where=where)
        seen.add(addr)
        tid = (row["terminal"] or "").strip()
        if tid not in per_term:
            raise UserError(f"meter {text}: terminal {tid!r} is not in {term_path.name}",
                            where=where)
        proto = (row["protocol"] or "").strip()
        if proto not in METER_PROTOCOLS:
            raise UserError(f"protocol {proto!r} is not one of {', '.join(METER_PROTOCOLS)}",
                            where=where)
        unit_text = (row.get("unit") or "").strip()
        try:
            unit = int(unit_text) if unit_text else 0
        except ValueError:
            raise UserError(f"unit {unit_text!r} is not a number", where=where) from None
        p = METER_PROTOCOLS.index(proto)
        if p == PMODBUS and not 1 <= unit <= 247:
            raise UserError(f"Modbus unit id {unit} is not 1..247", where=where)
        if (p == PMODBUS) != (terminals[tid].protocol == "modbus"):
            raise UserError(f"meter {text} speaks {proto} but terminal {tid} speaks "
                            f"{terminals[tid].protocol}", where=where)
        a, pr, u, m = per_term[tid]
        a.append(addr)
        pr.append(p)
        u.append(unit)
        m.append((row.get("map") or "").strip())
    for tid, (a, pr, u, m) in per_term.items():
        t = terminals[tid]
        t.address = np.asarray(a, np.int64)
        t.meter_protocol = np.asarray(pr, np.int8)
        t.unit = np.asarray(u, np.int16)
        t.map_name = m
    return Archive(terminals, str(path))
