"""The field's TOML configuration: its schema, its defaults, and validation at load time.

Every key is read through one checker that knows the file and the dotted key, so a bad value
raises UserError naming the file, the key and the reason, and an unknown key (a typo) is an
error too. Money and prices are parsed from decimal strings exactly. This module builds plain
frozen dataclasses; it never opens sockets and never generates the fleet (see fleet.py).
docs/field.md lists every key with its default and meaning.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meterstream.errors import UserError
from meterstream.tomlcheck import NAME_RE as _NAME_RE
from meterstream.tomlcheck import TomlTable

KINDS = ("concentrator", "serial-server", "dtu", "gateway")
#: How each kind is reached: listening terminals accept the collector, DTUs dial out to it.
KIND_MODE = {"concentrator": "listen", "serial-server": "listen", "dtu": "dial", "gateway": "listen"}
KIND_LETTER = {"concentrator": "C", "serial-server": "S", "dtu": "D", "gateway": "G"}
CLASSES = ("dedicated", "public", "lowvoltage")  # 专变, 公变, 低压
MODBUS_FUNCTIONS = (3, 4)

_TIME_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")

DEFAULT_TOU = {"00:00": 4, "08:00": 2, "11:00": 3, "17:00": 2, "19:00": 1, "21:00": 2,
               "22:00": 3, "23:00": 4}
#: Hourly load shapes (relative; normalised to a mean of 1): homes peak in the evening,
#: businesses during working hours.
DEFAULT_SHAPES = {
    "lowvoltage": (0.55, 0.5, 0.45, 0.45, 0.45, 0.5, 0.7, 0.95, 1.0, 0.9, 0.85, 0.9,
                   1.0, 0.9, 0.85, 0.85, 0.95, 1.2, 1.6, 1.8, 1.7, 1.5, 1.1, 0.75),
    "dedicated": (0.35, 0.33, 0.32, 0.32, 0.33, 0.4, 0.6, 1.0, 1.45, 1.6, 1.65, 1.55,
                  1.3, 1.5, 1.6, 1.6, 1.5, 1.3, 1.0, 0.8, 0.65, 0.5, 0.42, 0.38),
}
DEFAULT_MEAN_W = {"dedicated": 25_000, "public": 800, "lowvoltage": 450}


# --- the schema ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BusConfig:
    """Timing and faults of one terminal's bus (RS-485 or carrier behind it)."""

    pacing: bool = False  # byte pacing at `baud`, both directions
    baud: int = 2400
    bits_per_byte: int = 11  # 8E1: start + 8 + parity + stop -> 4.58 ms a byte at 2400
    turnaround_ms: tuple[float, float] = (0.0, 0.0)  # meter turnaround, uniform in range
    p_no_reply: float = 0.0
    p_corrupt: float = 0.0
    p_late: float = 0.0
    late_s: float = 6.0  # a late reply arrives this long after the request (past the timeout)
    preamble: int = 2  # FE bytes before each reply (0..4)

    @property
    def byte_s(self) -> float:
        return self.bits_per_byte / self.baud

    @property
    def zero_latency(self) -> bool:
        """No pacing, no turnaround, no late replies: replies can be written at once."""
        return (not self.pacing and self.turnaround_ms[1] <= 0.0 and self.p_late <= 0.0)


@dataclass(frozen=True)
class GroupConfig:
    """[[terminals]]: `per_area` terminals of one kind in every area (or `count` of them dealt
    over the areas in turn), `meters` behind each."""

    kind: str
    per_area: int
    meters: int
    meter_class: str
    share_1997: float
    share_money: float
    share_energy: float
    share_protected: float
    share_dead: float
    plan: str
    balance_cents: tuple[int, int]
    modbus_map: tuple[str, ...]
    firmware: str
    heartbeat_s: float
    bus: BusConfig

    count: int | None = None  # total over the field, instead of per_area

    @property
    def mode(self) -> str:
        return KIND_MODE[self.kind]

    def in_area(self, a: int, n_areas: int) -> int:
        """Terminals of this group in area a (0-based) of n_areas."""
        if self.count is None:
            return self.per_area
        return self.count // n_areas + (1 if a < self.count % n_areas else 0)


@dataclass(frozen=True)
class MeterConfig:
    relay_delay_s: float = 2.0
    press_delay_s: tuple[float, float] | None = (30.0, 300.0)  # None: only press_button()
    clock_ppm: tuple[float, float] = (-20.0, 20.0)
    clock_offset_s: tuple[float, float] = (-30.0, 30.0)
    password_level: int = 2
    password: str = "000000"
    unknown_di_error: int = 0x02  # "no-data" (bit1) or "other" (bit0, like some simulators)
    register_kwh: tuple[float, float] = (0.0, 20_000.0)
    prices_e4: tuple[int, int, int, int] = (7_000, 6_000, 5_000, 3_000)  # 0.0001 yuan/kWh
    alarm_cents: int = 1_000  # pre-trip alarm (bit7) below this remaining money
    local_cutoff: bool = False  # money-prepaid meters trip themselves past the overdraft limit
    overdraft_limit_cents: int = 0
    keep_power_if_protected: bool = True
    tou: tuple[tuple[int, int], ...] = ()  # (minute of day, tariff 1..4), sorted

    def tou_minutes(self) -> list[int]:
        """Tariff (1..4) of each of the 1440 minutes of a day, by the meter's own clock."""
        table = self.tou or _parse_tou_default()
        out = [0] * 1440
        starts = sorted(table)
        for k, (minute, tariff) in enumerate(starts):
            end = starts[k + 1][0] if k + 1 < len(starts) else 1440
            for m in range(minute, end):
                out[m] = tariff
        # before the first start: the last period of the day wraps around midnight
        first = starts[0][0]
        for m in range(first):
            out[m] = starts[-1][1]
        return out


@dataclass(frozen=True)
class ProfileConfig:
    kind: str = "synthetic"  # synthetic | recorded
    path: Path | None = None  # recorded: the LCL file (default: meterfield.lcl.default_path())
    mean_w: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MEAN_W))
    spread: float = 0.5  # lognormal sigma of a meter's mean load around its class mean
    noise: float = 0.25  # +- relative noise per meter per half hour
    shapes: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_SHAPES))
    line_loss: tuple[float, float] = (0.02, 0.06)  # supply meter = customers x (1 + loss)


@dataclass(frozen=True)
class OutageConfig:
    """A scheduled link outage of one terminal or one whole area, in simulated seconds."""

    area: str | None
    terminal: str | None
    at_s: float
    duration_s: float


@dataclass(frozen=True)
class RandomOutageConfig:
    per_day: float = 0.0  # expected outages per simulated day, over the whole field
    duration_s: tuple[float, float] = (300.0, 1800.0)
    area_share: float = 0.2  # the share of them that take a whole area


@dataclass(frozen=True)
class ModbusEntry:
    address: int
    quantity: str
    scale: float


@dataclass(frozen=True)
class ModbusMap:
    name: str
    function: int  # 3 holding registers, 4 input registers
    entries: tuple[ModbusEntry, ...]


@dataclass(frozen=True)
class FieldConfig:
    source: str
    seed: int
    start_ns: int | None  # None: the real time when the field starts
    speed: float
    timezone: str
    host: str
    port_base: int
    tick_s: float
    step_s: int
    address_prefix: str
    areas: tuple[str, ...]
    supply_meter: bool
    supply_plan: str
    collector_host: str
    collector_port: int
    backoff_s: tuple[float, float]
    meters: MeterConfig
    profile: ProfileConfig
    bus: BusConfig
    groups: tuple[GroupConfig, ...]
    outages: tuple[OutageConfig, ...]
    random_outages: RandomOutageConfig
    modbus_maps: Mapping[str, ModbusMap]

    def with_speed(self, speed: float) -> FieldConfig:
        if not (speed >= 0 and math.isfinite(speed)):
            raise UserError(f"speed must be a number >= 0, got {speed}", where="--speed")
        return replace(self, speed=float(speed))


# --- loading ------------------------------------------------------------------------------------


def _parse_tou_default() -> tuple[tuple[int, int], ...]:
    return tuple(sorted((int(t[:2]) * 60 + int(t[3:]), v) for t, v in DEFAULT_TOU.items()))


def _bus(t: TomlTable, base: BusConfig) -> BusConfig:
    out = BusConfig(
        pacing=t.boolean("pacing", base.pacing),
        baud=t.integer("baud", base.baud, 300, 115_200),
        bits_per_byte=t.integer("bits_per_byte", base.bits_per_byte, 8, 12),
        turnaround_ms=t.span("turnaround_ms", base.turnaround_ms, 0.0, 10_000.0),
        p_no_reply=t.share("p_no_reply", base.p_no_reply),
        p_corrupt=t.share("p_corrupt", base.p_corrupt),
        p_late=t.share("p_late", base.p_late),
        late_s=t.number("late_s", base.late_s, 0.0, 600.0),
        preamble=t.integer("preamble", base.preamble, 0, 4),
    )
    if out.p_no_reply + out.p_corrupt + out.p_late > 1.0:
        raise t.fail("p_no_reply", "p_no_reply + p_corrupt + p_late must not exceed 1")
    t.finish()
    return out


def _meters(t: TomlTable) -> MeterConfig:
    d = MeterConfig()
    press = t.raw("press_delay_s", list(d.press_delay_s or ()))
    press_delay: tuple[float, float] | None
    if press == "never":
        press_delay = None
    else:
        t.used.discard("press_delay_s")
        press_delay = t.span("press_delay_s", d.press_delay_s or (0.0, 0.0), 0.0)
    unknown = t.string("unknown_di_error", "no-data", ("no-data", "other"))
    prices_raw = t.raw("prices", ["0.7000", "0.6000", "0.5000", "0.3000"])
    if not isinstance(prices_raw, list) or len(prices_raw) != 4:
        raise t.fail("prices", "expected four decimal strings: T1..T4 in yuan/kWh, e.g. \"0.5283\"")
    prices = tuple(t._decimal(f"prices[{i}]", p, 4, Decimal(0)) for i, p in enumerate(prices_raw))
    tou_raw = t.raw("tou", None)
    tou: tuple[tuple[int, int], ...] = ()
    if tou_raw is not None:
        if not isinstance(tou_raw, Mapping) or not tou_raw:
            raise t.fail("tou", "expected a table of \"hh:mm\" = tariff (1..4)")
        entries = []
        for when, tariff in tou_raw.items():
            m = _TIME_RE.match(when)
            if not m:
                raise t.fail(f"tou.{when}", "the start of a period is \"hh:mm\" (00:00 .. 23:59)")
            if isinstance(tariff, bool) or not isinstance(tariff, int) or not 1 <= tariff <= 4:
                raise t.fail(f"tou.{when}", f"tariff must be 1..4 (T1..T4), got {tariff!r}")
            entries.append((int(m.group(1)) * 60 + int(m.group(2)), tariff))
        tou = tuple(sorted(entries))
    level = t.integer("password_level", d.password_level, 0, 0xFF)
    password = t.string("password", d.password)
    if not re.fullmatch(r"[0-9A-Fa-f]{6}", password):
        raise t.fail("password", "expected 6 hex digits, e.g. \"000000\"")
    out = MeterConfig(
        relay_delay_s=t.number("relay_delay_s", d.relay_delay_s, 0.0, 86_400.0),
        press_delay_s=press_delay,
        clock_ppm=t.span("clock_ppm", d.clock_ppm, -1000.0, 1000.0),
        clock_offset_s=t.span("clock_offset_s", d.clock_offset_s, -86_400.0, 86_400.0),
        password_level=level,
        password=password.upper(),
        unknown_di_error=0x02 if unknown == "no-data" else 0x01,
        register_kwh=t.span("register_kwh", d.register_kwh, 0.0, 999_999.0),
        prices_e4=prices,  # type: ignore[arg-type]
        alarm_cents=t.decimal("alarm_yuan", "10.00", 2, Decimal(0)),
        local_cutoff=t.boolean("local_cutoff", d.local_cutoff),
        overdraft_limit_cents=t.decimal("overdraft_limit_yuan", "0.00", 2, Decimal(0)),
        keep_power_if_protected=t.boolean("keep_power_if_protected", d.keep_power_if_protected),
        tou=tou,
    )
    t.finish()
    return out


def _profile(t: TomlTable, base_dir: Path) -> ProfileConfig:
    d = ProfileConfig()
    kind = t.string("kind", d.kind, ("synthetic", "recorded"))
    path_raw = t.raw("path", None)
    path: Path | None = None
    if path_raw is not None:
        if not isinstance(path_raw, str) or not path_raw:
            raise t.fail("path", "expected a file path string")
        path = Path(path_raw)
        if not path.is_absolute():
            path = (base_dir / path).resolve()
    mean_t = t.sub("mean_w")
    mean = {c: mean_t.integer(c, DEFAULT_MEAN_W[c], 0, 10_000_000) for c in CLASSES}
    mean_t.finish()
    shapes_t = t.sub("shape")
    shapes: dict[str, tuple[float, ...]] = {}
    for c in ("lowvoltage", "dedicated"):
        v = shapes_t.raw(c, list(DEFAULT_SHAPES[c]))
        if (not isinstance(v, list) or len(v) not in (24, 48)
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v)
                or sum(v) <= 0):
            raise shapes_t.fail(c, "expected 24 (hourly) or 48 (half-hourly) non-negative numbers")
        shapes[c] = tuple(float(x) for x in v)
    shapes_t.finish()
    out = ProfileConfig(
        kind=kind,
        path=path,
        mean_w=mean,
        spread=t.number("spread", d.spread, 0.0, 3.0),
        noise=t.number("noise", d.noise, 0.0, 0.95),
        shapes=shapes,
        line_loss=t.span("line_loss", d.line_loss, 0.0, 0.5),
    )
    t.finish()
    return out


_ADDRESS_RE = re.compile(r"^0x[0-9A-Fa-f]{1,4}$")


def _modbus_maps(t: TomlTable) -> dict[str, ModbusMap]:
    from meterfield.modbus_maps import BUILTIN_MAPS, QUANTITIES

    maps = dict(BUILTIN_MAPS)
    for name in list(t.data):
        mt = t.sub(name)
        if not re.fullmatch(r"[a-z0-9_-]{1,32}", name):
            raise t.fail(name, "a map name is 1-32 of a-z 0-9 _ -")
        fc = mt.integer("function", 4)
        if fc not in MODBUS_FUNCTIONS:
            raise mt.fail("function", "3 (holding registers) or 4 (input registers)")
        entries = []
        for et in mt.subs("registers"):
            addr = et.raw("address", None)
            if isinstance(addr, str) and _ADDRESS_RE.match(addr):
                addr = int(addr, 16)
            if isinstance(addr, bool) or not isinstance(addr, int) or not 0 <= addr <= 0xFFFE:
                raise et.fail("address", "expected a register address 0..65534 (or \"0x2012\")")
            q = et.string("quantity", "", tuple(QUANTITIES))
            scale = et.number("scale", 1.0)
            et.finish()
            entries.append(ModbusEntry(addr, q, scale))
        if not entries:
            raise mt.fail("registers", "a map needs at least one [[...registers]] entry")
        mt.finish()
        addrs = sorted(e.address for e in entries)
        if any(b - a < 2 for a, b in itertools.pairwise(addrs)):
            raise mt.fail("registers", "float32 values take two registers: addresses overlap")
        maps[name] = ModbusMap(name, fc, tuple(sorted(entries, key=lambda e: e.address)))
    t.finish()
    return maps


def _group(t: TomlTable, bus: BusConfig, maps: Mapping[str, ModbusMap]) -> GroupConfig:
    kind = t.string("kind", "concentrator", KINDS)
    meters_max = 246 if kind == "gateway" else 9998  # unit ids 1..247, one spare for a supply meter
    cls = t.string("class", "lowvoltage", CLASSES)
    map_raw = t.raw("modbus_map", ["sdm630", "dtsu666"])
    map_names = [map_raw] if isinstance(map_raw, str) else map_raw
    if not isinstance(map_names, list) or not map_names or not all(isinstance(m, str) for m in map_names):
        raise t.fail("modbus_map", "expected a map name or a list of them (meters take them in turn)")
    for m in map_names:
        if m not in maps:
            raise t.fail("modbus_map", f"unknown map {m!r}; known: {', '.join(sorted(maps))}")
    span = t.raw("balance_yuan", ["50.00", "500.00"])
    if not isinstance(span, list) or len(span) != 2:
        raise t.fail("balance_yuan", "expected [min, max] as decimal strings, e.g. [\"-20.00\", \"300.00\"]")
    bmin = t._decimal("balance_yuan[0]", span[0], 2)
    bmax = t._decimal("balance_yuan[1]", span[1], 2)
    if bmin > bmax:
        raise t.fail("balance_yuan", "min is above max")
    default_plan = {"dedicated": "business", "public": "resident", "lowvoltage": "resident"}[cls]
    out = GroupConfig(
        kind=kind,
        per_area=t.integer("per_area", 1, 0, 999),
        count=t.integer("count", 0, 0, 999_999) if t.has("count") else None,
        meters=t.integer("meters", 8, 1, meters_max),
        meter_class=cls,
        share_1997=t.share("share_1997", 0.0),
        share_money=t.share("share_money", 0.0),
        share_energy=t.share("share_energy", 0.0),
        share_protected=t.share("share_protected", 0.0),
        share_dead=t.share("share_dead", 0.0),
        plan=_plan_key(t, "plan", default_plan),
        balance_cents=(bmin, bmax),
        modbus_map=tuple(map_names),
        firmware=t.name("firmware", "MF-DTU-1.0"),
        heartbeat_s=t.number("heartbeat_s", 30.0, 0.05, 3600.0),
        bus=_bus(t.sub("bus"), bus),
    )
    if out.share_money + out.share_energy > 1.0:
        raise t.fail("share_money", "share_money + share_energy must not exceed 1")
    if kind == "gateway" and out.share_1997 > 0:
        raise t.fail("share_1997", "a Modbus gateway holds Modbus meters only")
    t.finish()
    return out


def _start(t: TomlTable) -> int | None:
    v = t.raw("start", "now")
    tz = t.data.get("timezone", "Asia/Shanghai")
    if v == "now":
        return None
    if isinstance(v, datetime):
        when = v
    elif isinstance(v, str):
        try:
            when = datetime.fromisoformat(v)
        except ValueError:
            raise t.fail("start", f"{v!r} is not \"now\" nor an ISO date-time such as 2024-06-01T08:00:00") from None
    else:
        raise t.fail("start", "expected \"now\" or a date-time")
    try:
        zone = ZoneInfo(tz) if isinstance(tz, str) else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    if when.tzinfo is None and zone is not None:
        when = when.replace(tzinfo=zone)
    if not 2001 <= when.year <= 2098:
        raise t.fail("start", "the year must be 2001..2098 (a DL/T 645 clock holds 2000..2099)")
    return int(when.timestamp()) * 1_000_000_000


def parse_config(doc: Mapping[str, Any], source: str = "<config>", base_dir: Path | None = None) -> FieldConfig:
    """Validate a parsed TOML document into a FieldConfig; UserError names file, key, reason."""
    top = TomlTable(doc, source, "", "docs/field.md")
    base = base_dir or Path.cwd()
    f = top.sub("field")
    tz = f.string("timezone", "Asia/Shanghai")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise f.fail("timezone", f"unknown time zone {tz!r} (e.g. Asia/Shanghai)") from None
    start_ns = _start(f)
    step_s = f.integer("step_s", 60, 1, 1800)
    if 1800 % step_s:
        raise f.fail("step_s", f"{step_s} must divide 1800 so that steps meet every half hour")
    prefix = f.string("address_prefix", "33")
    if not re.fullmatch(r"\d\d", prefix):
        raise f.fail("address_prefix", "expected two digits, e.g. \"33\"")
    cfg_field = {
        "seed": f.integer("seed", 1, 0, 2**63 - 1),
        "start_ns": start_ns,
        "speed": f.number("speed", 1.0, 0.0, 1e7),
        "timezone": tz,
        "host": f.string("host", "127.0.0.1"),
        "port_base": f.integer("port_base", 0, 0, 65_535),
        "tick_s": f.number("tick_s", 1.0, 0.01, 60.0),
        "step_s": step_s,
        "address_prefix": prefix,
    }
    f.finish()

    a = top.sub("areas")
    names_raw = a.raw("names", None)
    if names_raw is None:
        count = a.integer("count", 1, 1, 999)
        areas = tuple(f"A{i:03d}" for i in range(1, count + 1))
    else:
        if a.has("count"):
            raise a.fail("count", "give either count or names, not both")
        if (not isinstance(names_raw, list) or not names_raw or len(names_raw) > 999
                or not all(isinstance(n, str) and _NAME_RE.match(n) for n in names_raw)):
            raise a.fail("names", "expected 1..999 names of A-Z 0-9 . _ -")
        if len(set(names_raw)) != len(names_raw):
            raise a.fail("names", "area names must be unique")
        areas = tuple(names_raw)
    supply_meter = a.boolean("supply_meter", True)
    supply_plan = _plan_key(a, "supply_plan", "none")
    a.finish()

    c = top.sub("collector")
    collector_host = c.string("host", "127.0.0.1")
    collector_port = c.integer("port", 9700, 1, 65_535)
    backoff = c.span("backoff_s", (1.0, 30.0), 0.01, 3600.0)
    c.finish()

    meters = _meters(top.sub("meters"))
    profile = _profile(top.sub("profile"), base)
    bus = _bus(top.sub("bus"), BusConfig())
    maps = _modbus_maps(top.sub("modbus_maps"))
    groups = tuple(_group(g, bus, maps) for g in top.subs("terminals"))
    if not groups:
        raise UserError("terminals: at least one [[terminals]] group is needed", where=source)
    outages = []
    for o in top.subs("outages"):
        area = o.raw("area", None)
        term = o.raw("terminal", None)
        if (area is None) == (term is None):
            raise o.fail("area", "give exactly one of area = \"...\" or terminal = \"...\"")
        if area is not None and area not in areas:
            raise o.fail("area", f"unknown area {area!r}; areas are {', '.join(areas[:5])}...")
        if term is not None and not isinstance(term, str):
            raise o.fail("terminal", "expected a terminal id such as \"A001-C001\"")
        outages.append(OutageConfig(area, term, o.number("at_s", 0.0, 0.0),
                                    o.number("duration_s", 600.0, 0.0)))
        o.finish()
    r = top.sub("random_outages")
    random_outages = RandomOutageConfig(
        per_day=r.number("per_day", 0.0, 0.0, 10_000.0),
        duration_s=r.span("duration_s", (300.0, 1800.0), 0.0),
        area_share=r.share("area_share", 0.2),
    )
    r.finish()
    top.finish()
    n_meters = sum(sum(g.in_area(a, len(areas)) for a in range(len(areas))) * g.meters
                   for g in groups)
    if n_meters == 0:
        raise UserError("terminals: the groups describe no meters at all", where=source)
    if sum(g.in_area(0, len(areas)) for g in groups) > 999:
        raise UserError("terminals: at most 999 terminals per area (the address has 3 digits for it)",
                        where=source)
    return FieldConfig(
        source=source,
        areas=areas,
        supply_meter=supply_meter,
        supply_plan=supply_plan,
        collector_host=collector_host,
        collector_port=collector_port,
        backoff_s=backoff,
        meters=meters,
        profile=profile,
        bus=bus,
        groups=groups,
        outages=tuple(outages),
        random_outages=random_outages,
        modbus_maps=maps,
        **cfg_field,  # type: ignore[arg-type]
    )


def _plan_key(t: TomlTable, k: str, default: str) -> str:
    v = t.string(k, default)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,32}", v):
        raise t.fail(k, f"{v!r}: a plan name is 1-32 of A-Z a-z 0-9 . _ -")
    return v


def load_config(path: str | Path) -> FieldConfig:
    """Read and validate a field TOML file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the field configuration: {exc.strerror}", where=str(p)) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", where=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"not valid TOML: {exc}", where=str(p)) from None
    return parse_config(doc, str(p), p.resolve().parent)
