"""The fleet generated from the configuration by its seed: areas, terminals, meters, archive.

Areas x terminal groups x meters per terminal, plus one supply meter per area (the public
transformer's metering point, class "public", role "supply"). Meter attributes are numpy
struct-of-arrays drawn vectorised from one seeded generator, so the same config and seed give
the same fleet. `write_archive` writes what the collectors and the billing replay read.
This module holds no live state (registers, relays: see meters.py) and opens no sockets.

Meter address (12 digits): PP AAA TTT MMMM = address prefix, area number (1-based), terminal
number within the area (1-based), position on the terminal (1-based); the supply meter of an
area is PP AAA 000 0001.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meterfield.config import CLASSES, KIND_LETTER, BusConfig, FieldConfig
from meterstream.errors import UserError

PROTOCOLS = ("dlt645-2007", "dlt645-1997", "modbus")
P2007, P1997, PMODBUS = 0, 1, 2
PREPAID = ("none", "energy", "money")
ROLES = ("customer", "supply")


@dataclass
class TerminalSpec:
    """One concentrator, serial server, DTU or Modbus gateway and the meters behind it."""

    index: int
    id: str
    area: int
    kind: str
    mode: str  # "listen" or "dial"
    group: int
    port: int  # configured listening port; 0 = ephemeral (known once started)
    bus: BusConfig
    firmware: str
    heartbeat_s: float
    meters: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def protocol(self) -> str:
        return "modbus" if self.kind == "gateway" else "dlt645"


@dataclass
class Fleet:
    """Every meter as struct-of-arrays (index i is meter i), and the terminals."""

    config: FieldConfig
    areas: tuple[str, ...]
    terminals: list[TerminalSpec]
    plans: tuple[str, ...]
    address: np.ndarray  # int64, the 12-digit address as a number
    terminal: np.ndarray  # int32 index into terminals
    area: np.ndarray  # int32 index into areas
    meter_class: np.ndarray  # int8 index into CLASSES
    plan: np.ndarray  # int16 index into plans
    protected: np.ndarray  # bool
    balance_cents: np.ndarray  # int64 initial balance, 0.01 yuan
    role: np.ndarray  # int8 index into ROLES
    protocol: np.ndarray  # int8 index into PROTOCOLS
    prepaid: np.ndarray  # int8 index into PREPAID
    unit: np.ndarray  # int16 Modbus unit id (0 for DL/T 645 meters)
    modbus_map: np.ndarray  # int8 index into map_names (-1 for DL/T 645 meters)
    map_names: tuple[str, ...]
    dead: np.ndarray  # bool: a DL/T 645 meter that never answers (share_dead)

    @property
    def n(self) -> int:
        return int(self.address.shape[0])

    def address_of(self, i: int) -> str:
        return f"{int(self.address[i]):012d}"

    def index_of(self, address: str) -> int:
        """Meter index of a 12-digit address (ValueError if it is not in the fleet)."""
        hits = np.flatnonzero(self.address == int(address))
        if hits.size == 0:
            raise ValueError(f"no meter {address} in this fleet")
        return int(hits[0])

    def terminal_by_id(self, terminal_id: str) -> TerminalSpec:
        for t in self.terminals:
            if t.id == terminal_id:
                return t
        raise KeyError(terminal_id)

    def write_archive(self, path: str | os.PathLike[str],
                      endpoints: dict[str, tuple[str, str, int]] | None = None) -> list[Path]:
        """Write the archive CSV and its two siblings; returns the three paths.

        PATH: meter,terminal,area,class,plan,protected,initial_balance,role (one row a meter;
        protected 1/0; initial_balance in yuan with 2 decimals; role customer|supply).
        PATH-terminals.csv: terminal,area,kind,mode,host,port,protocol,meters,firmware,heartbeat_s
        (mode listen: the collector connects to host:port; mode dial: the terminal dials
        host:port, the collector's address, and registers with "$REG,<terminal>,<firmware>").
        PATH-meters.csv: meter,terminal,protocol,unit,map,prepaid (how to talk to each meter).
        `endpoints` (terminal id -> (mode, host, port)) gives the actual ports once started.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        stem = p.with_suffix("") if p.suffix == ".csv" else p
        term_path = Path(f"{stem}-terminals.csv")
        meters_path = Path(f"{stem}-meters.csv")
        cfg = self.config
        addr = [f"{int(a):012d}" for a in self.address]
        term_ids = [t.id for t in self.terminals]
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["meter", "terminal", "area", "class", "plan", "protected",
                        "initial_balance", "role"])
            for i in range(self.n):
                cents = int(self.balance_cents[i])
                sign = "-" if cents < 0 else ""
                w.writerow([
                    addr[i], term_ids[self.terminal[i]], self.areas[self.area[i]],
                    CLASSES[self.meter_class[i]], self.plans[self.plan[i]],
                    1 if self.protected[i] else 0,
                    f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}", ROLES[self.role[i]],
                ])
        with open(term_path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["terminal", "area", "kind", "mode", "host", "port", "protocol", "meters",
                        "firmware", "heartbeat_s"])
            for t in self.terminals:
                if endpoints and t.id in endpoints:
                    mode, host, port = endpoints[t.id]
                elif t.mode == "dial":
                    mode, host, port = "dial", cfg.collector_host, cfg.collector_port
                else:
                    mode, host, port = "listen", cfg.host, t.port
                w.writerow([t.id, self.areas[t.area], t.kind, mode, host, port, t.protocol,
                            len(t.meters), t.firmware if t.mode == "dial" else "",
                            f"{t.heartbeat_s:g}" if t.mode == "dial" else ""])
        with open(meters_path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["meter", "terminal", "protocol", "unit", "map", "prepaid"])
            for i in range(self.n):
                m = int(self.modbus_map[i])
                w.writerow([addr[i], term_ids[self.terminal[i]], PROTOCOLS[self.protocol[i]],
                            int(self.unit[i]) or "", self.map_names[m] if m >= 0 else "",
                            PREPAID[self.prepaid[i]]])
        return [p, term_path, meters_path]


def generate_fleet(cfg: FieldConfig) -> Fleet:
    """The fleet a configuration describes; deterministic in cfg.seed."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed))
    terminals: list[TerminalSpec] = []
    # per-terminal columns, expanded to per-meter arrays with np.repeat
    t_counts: list[int] = []
    port_next = cfg.port_base
    for a, _area in enumerate(cfg.areas):
        number = 0
        for g, grp in enumerate(cfg.groups):
            for _k in range(grp.in_area(a, len(cfg.areas))):
                number += 1
                letter = KIND_LETTER[grp.kind]
                tid = f"{cfg.areas[a]}-{letter}{number:03d}"
                port = 0
                if grp.mode == "listen" and cfg.port_base:
                    port = port_next
                    port_next += 1
                    if port > 65_535:
                        raise UserError("field.port_base: not enough ports above it for every "
                                        "listening terminal", where=cfg.source)
                terminals.append(TerminalSpec(len(terminals), tid, a, grp.kind, grp.mode, g, port,
                                              grp.bus, grp.firmware, grp.heartbeat_s))
                t_counts.append(grp.meters)
    counts = np.asarray(t_counts, np.int64)
    n_cust = int(counts.sum())
    t_idx = np.repeat(np.arange(len(terminals), dtype=np.int32), counts)
    pos = np.arange(n_cust, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)  # 0-based
    t_area = np.asarray([t.area for t in terminals], np.int32)
    t_group = np.asarray([t.group for t in terminals], np.int32)
    t_number = np.zeros(len(terminals), np.int64)
    for t in terminals:  # number within the area, from the id
        t_number[t.index] = int(t.id.rsplit("-", 1)[1][1:])
    groups = cfg.groups
    g_of = t_group[t_idx]
    area = t_area[t_idx]
    prefix = int(cfg.address_prefix)
    address = (prefix * 10**10 + (area.astype(np.int64) + 1) * 10**7
               + t_number[t_idx] * 10**4 + pos + 1)

    def per_group(values: list[float]) -> np.ndarray:
        return np.asarray(values, np.float64)[g_of]

    is_gateway = per_group([1.0 if g.kind == "gateway" else 0.0 for g in groups]) > 0
    u = rng.random(n_cust)
    protocol = np.where(u < per_group([g.share_1997 for g in groups]), P1997, P2007).astype(np.int8)
    protocol[is_gateway] = PMODBUS
    u = rng.random(n_cust)
    money = per_group([g.share_money for g in groups])
    energy = per_group([g.share_energy for g in groups])
    prepaid = np.where(u < money, 2, np.where(u < money + energy, 1, 0)).astype(np.int8)
    prepaid[protocol != P2007] = 0  # 1997 and Modbus meters are not prepaid meters here
    protected = rng.random(n_cust) < per_group([g.share_protected for g in groups])
    lo = per_group([g.balance_cents[0] for g in groups]).astype(np.int64)
    hi = per_group([g.balance_cents[1] for g in groups]).astype(np.int64)
    balance = lo + (rng.random(n_cust) * (hi - lo + 1)).astype(np.int64)
    balance = np.minimum(balance, hi)
    cls = per_group([CLASSES.index(g.meter_class) for g in groups]).astype(np.int8)
    plans = tuple(sorted({g.plan for g in groups} | ({cfg.supply_plan} if cfg.supply_meter else set())))
    plan = per_group([plans.index(g.plan) for g in groups]).astype(np.int16)
    map_names = tuple(sorted({m for g in groups if g.kind == "gateway" for m in g.modbus_map}))
    unit = np.where(is_gateway, pos + 1, 0).astype(np.int16)
    mmap = np.full(n_cust, -1, np.int8)
    for gi, grp in enumerate(groups):
        if grp.kind != "gateway":
            continue
        sel = g_of == gi
        choice = np.asarray([map_names.index(m) for m in grp.modbus_map], np.int8)
        mmap[sel] = choice[pos[sel] % len(choice)]
    role = np.zeros(n_cust, np.int8)
    terminal = t_idx

    if cfg.supply_meter:
        sup_term: list[int] = []
        sup_area: list[int] = []
        for a in range(len(cfg.areas)):
            cands = [t for t in terminals if t.area == a]
            if not cands:
                continue
            dlt = [t for t in cands if t.kind != "gateway"]
            host = (dlt or cands)[0]
            sup_term.append(host.index)
            sup_area.append(a)
        k = len(sup_term)
        s_area = np.asarray(sup_area, np.int32)
        s_term = np.asarray(sup_term, np.int32)
        s_gw = np.asarray([terminals[t].kind == "gateway" for t in sup_term], bool)
        terminal = np.concatenate([terminal, s_term])
        area = np.concatenate([area, s_area])
        address = np.concatenate([address, prefix * 10**10 + (s_area.astype(np.int64) + 1) * 10**7 + 1])
        protocol = np.concatenate([protocol, np.where(s_gw, PMODBUS, P2007).astype(np.int8)])
        prepaid = np.concatenate([prepaid, np.zeros(k, np.int8)])
        protected = np.concatenate([protected, np.zeros(k, bool)])
        balance = np.concatenate([balance, np.zeros(k, np.int64)])
        cls = np.concatenate([cls, np.full(k, CLASSES.index("public"), np.int8)])
        plan = np.concatenate([plan, np.full(k, plans.index(cfg.supply_plan), np.int16)])
        role = np.concatenate([role, np.ones(k, np.int8)])
        s_unit = np.zeros(k, np.int16)
        s_map = np.full(k, -1, np.int8)
        for j, ti in enumerate(sup_term):
            if s_gw[j]:
                s_unit[j] = min(247, int(counts[ti]) + 1)
                s_map[j] = 0
        unit = np.concatenate([unit, s_unit])
        mmap = np.concatenate([mmap, s_map])

    # dead meters from their own stream, so adding share_dead changes nothing else of a fleet
    dead = np.zeros(terminal.shape[0], bool)
    share_dead = per_group([g.share_dead for g in groups])
    dead[:n_cust] = (np.random.default_rng([cfg.seed, 0xDEAD]).random(n_cust) < share_dead) & (
        protocol[:n_cust] != PMODBUS)

    order = np.argsort(terminal, kind="stable")
    bounds = np.searchsorted(terminal[order], np.arange(len(terminals) + 1))
    for t in terminals:
        t.meters = order[bounds[t.index]:bounds[t.index + 1]].astype(np.int64)
    return Fleet(
        config=cfg, areas=cfg.areas, terminals=terminals, plans=plans, address=address,
        terminal=terminal.astype(np.int32), area=area.astype(np.int32), meter_class=cls,
        plan=plan, protected=protected, balance_cents=balance, role=role, protocol=protocol,
        prepaid=prepaid, unit=unit, modbus_map=mmap, map_names=map_names or ("sdm630",),
        dead=dead,
    )
