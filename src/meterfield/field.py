"""The simulated field as one object: fleet, meter bank, terminals, clock, ticks and outages.

`Field(config)` generates the fleet, builds the meters' live state and the terminals; `start`
opens the listeners and starts the DTUs and the ticker; `stop` closes everything. Tests drive
it from code: a paused clock (speed 0) and `advance(seconds)` step registers and relays
deterministically; `outage(...)` / `restore(...)` take links down and bring them back.
It is the other side of the wire for tests, benchmarks and the demo; nothing in the head-end
imports it, and it imports nothing of meterstream but the DL/T 645 codec and UserError.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from meterfield.clock import NS, SimClock
from meterfield.config import CLASSES, FieldConfig, load_config
from meterfield.fleet import Fleet, generate_fleet
from meterfield.meters import MeterBank
from meterfield.modbus import ModbusGateway
from meterfield.profiles import RecordedProfile, SyntheticProfile
from meterfield.serving import Dlt645Port
from meterfield.terminals import Dlt645Terminal, FieldStats
from meterstream.errors import UserError

Terminal = Dlt645Terminal | ModbusGateway


@dataclass
class Outage:
    """A link outage over [start_ns, end_ns) of simulated time (end None: until restored)."""

    terminals: frozenset[str]
    start_ns: int
    end_ns: int | None
    label: str


def build_profile(cfg: FieldConfig, fleet: Fleet) -> SyntheticProfile | RecordedProfile:
    pc = cfg.profile
    if pc.kind == "recorded":
        from meterfield.lcl import load_consumption

        return RecordedProfile(load_consumption(pc.path), fleet.n)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7]))
    class_mean = np.asarray([pc.mean_w[c] for c in CLASSES], np.float64)[fleet.meter_class]
    z = rng.standard_normal(fleet.n)
    mean_w = np.rint(class_mean * np.exp(pc.spread * z - pc.spread**2 / 2)).astype(np.int64)
    shapes = {CLASSES.index("dedicated"): pc.shapes["dedicated"],
              CLASSES.index("public"): pc.shapes["lowvoltage"],
              CLASSES.index("lowvoltage"): pc.shapes["lowvoltage"]}
    return SyntheticProfile(mean_w, fleet.meter_class, shapes, pc.noise, cfg.seed)


class Field:
    """Meters, buses and terminals of a configuration, served on loopback."""

    def __init__(self, config: FieldConfig | str | os.PathLike[str], *,
                 clock: SimClock | None = None) -> None:
        cfg = config if isinstance(config, FieldConfig) else load_config(Path(config))
        self.config = cfg
        self.fleet = generate_fleet(cfg)
        if clock is None:
            start = cfg.start_ns if cfg.start_ns is not None else time.time_ns() // NS * NS
            clock = SimClock(start, cfg.speed, tz=cfg.timezone)
        self.clock = clock
        self.stats = FieldStats()
        self.profile = build_profile(cfg, self.fleet)
        now = clock.now_ns()
        self.start_ns = now
        self.bank = MeterBank(self.fleet, self.profile, now, clock.utc_offset_s(now))
        self.terminals: dict[str, Terminal] = {}
        collector = (cfg.collector_host, cfg.collector_port)
        for spec in self.fleet.terminals:
            term: Terminal
            if spec.kind == "gateway":
                term = ModbusGateway(spec, self.bank, dict(cfg.modbus_maps), self.stats,
                                     clock.now_ns, host=cfg.host)
            else:
                port = Dlt645Port(self.bank, spec.meters, clock.now_ns, preamble=spec.bus.preamble)
                term = Dlt645Terminal(spec, port, self.stats, host=cfg.host, collector=collector,
                                      backoff_s=cfg.backoff_s, seed=cfg.seed * 1_000_003 + spec.index)
            self.terminals[spec.id] = term
        self.area_terminals: dict[str, list[str]] = {a: [] for a in cfg.areas}
        for spec in self.fleet.terminals:
            self.area_terminals[cfg.areas[spec.area]].append(spec.id)
        self.outages: list[Outage] = []
        for o in cfg.outages:
            ids = self._targets(o.area, o.terminal, where="outages")
            start = self.start_ns + int(o.at_s * NS)
            self.outages.append(Outage(ids, start, start + int(o.duration_s * NS),
                                       f"area {o.area}" if o.area else f"terminal {o.terminal}"))
        self._rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 99]))
        self._next_random_ns = self._draw_random_gap(self.start_ns)
        self._down: set[str] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._link_tasks: set[asyncio.Task[None]] = set()
        self.running = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open every listener, start every DTU, start ticking."""
        self.tick()
        for tid in self._down:  # terminals that start inside an outage
            self.terminals[tid].link_enabled = False
        self.running = True
        try:
            await asyncio.gather(*(t.start() for t in self.terminals.values()))
        except (OSError, RuntimeError) as exc:
            await self.stop()
            raise UserError(f"cannot open a terminal's listening port: {exc}",
                            where=self.config.source) from None
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def stop(self) -> None:
        self.running = False
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        for task in list(self._link_tasks):
            task.cancel()
        await asyncio.gather(*(t.stop() for t in self.terminals.values()), return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run_forever(self) -> None:
        await asyncio.Event().wait()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)
            self.tick()

    # --- time ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance every register to the simulated now and apply outages that fell due."""
        now = self.clock.now_ns()
        self.bank.advance_to(now, self.clock.utc_offset_s(now))
        self._update_outages(now)

    def advance(self, seconds: float) -> None:
        """Move simulated time forward (tests, with a paused clock) and tick."""
        self.clock.advance(seconds)
        self.tick()

    def now(self) -> int:
        return self.clock.now_ns()

    # --- outages ------------------------------------------------------------------------------

    def _targets(self, area: str | None, terminal: str | None, *, where: str) -> frozenset[str]:
        if area is not None:
            if area not in self.area_terminals:
                raise UserError(f"unknown area {area!r}", where=where)
            return frozenset(self.area_terminals[area])
        if terminal is None or terminal not in self.terminals:
            raise UserError(f"unknown terminal {terminal!r}", where=where)
        return frozenset([terminal])

    def outage(self, *, terminal: str | None = None, area: str | None = None,
               duration_s: float | None = None) -> Outage:
        """Take a terminal's (or a whole area's) link down now, for `duration_s` simulated
        seconds or until `restore`."""
        ids = self._targets(area, terminal, where="Field.outage")
        now = self.clock.now_ns()
        end = None if duration_s is None else now + int(duration_s * NS)
        o = Outage(ids, now, end, f"area {area}" if area else f"terminal {terminal}")
        self.outages.append(o)
        self._update_outages(now)
        return o

    def restore(self, *, terminal: str | None = None, area: str | None = None) -> None:
        """End every current outage of that terminal or area now."""
        ids = self._targets(area, terminal, where="Field.restore")
        now = self.clock.now_ns()
        for o in self.outages:
            if o.terminals & ids and o.start_ns <= now and (o.end_ns is None or o.end_ns > now):
                o.end_ns = now
        self._update_outages(now)

    def _draw_random_gap(self, after_ns: int) -> int | None:
        per_day = self.config.random_outages.per_day
        if per_day <= 0:
            return None
        return after_ns + int(self._rng.exponential(86_400.0 / per_day) * NS)

    def _random_outages(self, now: int) -> None:
        ro = self.config.random_outages
        while self._next_random_ns is not None and self._next_random_ns <= now:
            at = self._next_random_ns
            dur = self._rng.uniform(*ro.duration_s)
            if self._rng.random() < ro.area_share:
                area = self.config.areas[int(self._rng.integers(len(self.config.areas)))]
                ids, label = frozenset(self.area_terminals[area]), f"area {area} (random)"
            else:
                tid = self.fleet.terminals[int(self._rng.integers(len(self.fleet.terminals)))].id
                ids, label = frozenset([tid]), f"terminal {tid} (random)"
            self.outages.append(Outage(ids, at, at + int(dur * NS), label))
            self._next_random_ns = self._draw_random_gap(at)

    def _update_outages(self, now: int) -> None:
        self._random_outages(now)
        down: set[str] = set()
        keep = []
        for o in self.outages:
            if o.end_ns is not None and o.end_ns <= now:
                continue  # over
            keep.append(o)
            if o.start_ns <= now:
                down |= o.terminals
        self.outages = keep
        changed = (down - self._down) | (self._down - down)
        self._down = down
        if not changed or not self.running:
            return
        loop = asyncio.get_running_loop()
        for tid in changed:
            task = loop.create_task(self.terminals[tid].set_link(tid not in down))
            self._link_tasks.add(task)
            task.add_done_callback(self._link_tasks.discard)

    async def settle_links(self) -> None:
        """Wait until every link change already decided has been carried out (tests)."""
        while self._link_tasks:
            await asyncio.gather(*list(self._link_tasks), return_exceptions=True)

    def down(self) -> frozenset[str]:
        """Terminals whose link is down because of an outage."""
        return frozenset(self._down)

    # --- what the outside sees ----------------------------------------------------------------

    def endpoints(self) -> dict[str, tuple[str, str, int]]:
        """terminal id -> (mode, host, port): where it listens, or which address it dials."""
        return {tid: t.endpoint() for tid, t in self.terminals.items()}

    def write_archive(self, path: str | os.PathLike[str]) -> list[Path]:
        """The archive CSV (and its -terminals / -meters siblings) of the generated fleet."""
        return self.fleet.write_archive(path, self.endpoints())

    def meter(self, address: str) -> int:
        """Index of a meter in the bank, by its 12-digit address."""
        return self.fleet.index_of(address)

    def address(self, i: int) -> str:
        return self.fleet.address_of(i)

    def press_button(self, address: str) -> bool:
        return self.bank.press_button(self.meter(address), self.clock.now_ns())

    def summary(self) -> dict[str, object]:
        s = self.stats
        now = self.clock.now_ns()
        dlt = [t for t in self.terminals.values() if isinstance(t, Dlt645Terminal)]
        return {
            "terminals_up": sum(1 for t in self.terminals.values() if t.up),
            "terminals": len(self.terminals),
            "meters": self.fleet.n,
            "dead": int(self.fleet.dead.sum()),
            "requests": sum(t.requests for t in dlt) + s.modbus_requests,
            "replies": sum(t.replies for t in dlt),
            "dropped": s.dropped,
            "corrupted": s.corrupted,
            "late": s.late,
            "relays_open": self.bank.relays_open(now),
            "outages": len(self._down),
            "sim_time": self.clock.local(now).isoformat(sep=" ", timespec="seconds"),
        }
