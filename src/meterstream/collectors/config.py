"""The collector's configuration: poll timing, retries, dial-in, clocks, commands, Modbus maps.

Loaded from TOML and checked at start (`load_collector_config`): a bad value is a UserError
`FILE: KEY: reason`, an unknown key too. Per-terminal overrides live under
`[terminals."ID"]`. Meter passwords and operator codes are read from the environment variables
the file names, else from a secrets file (mode 600, outside any repository: $METERSTREAM_SECRETS_FILE
or `[control] secrets_file`), else (discouraged) from the file itself, and are never shown: `repr`
hides them, errors name the key, never the value.
Every key is described in docs/collectors.md.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meterstream.collectors.dlt645 import Credentials, lookup
from meterstream.errors import UserError
from meterstream.tomlcheck import TomlTable

DOCS = "docs/collectors.md"
TIME_SYNC = ("off", "addressed", "broadcast")
MODBUS_QUANTITIES = ("voltage_a", "voltage_b", "voltage_c", "current_a", "current_b", "current_c",
                     "power_a", "power_b", "power_c", "power_total", "frequency", "import_kwh",
                     "export_kwh", "total_kwh")
MODBUS_TYPES = ("float32", "int32", "uint32", "int16", "uint16")


@dataclass(frozen=True)
class PollConfig:
    """How one terminal is polled (the [collector] values, or a terminal's overrides)."""

    cycle_s: float = 60.0
    timeout_s: float = 2.0
    retries: int = 2
    preamble: int = 2
    strict_checksum: bool = True
    demote_after: int = 3
    demoted_every: int = 10
    silent_after: int = 2
    flood_bytes: int = 65536
    extra_dis: tuple[int, ...] = ()
    clock_every: int = 60
    max_drift_s: float = 60.0
    time_sync: str = "addressed"


@dataclass(frozen=True)
class ModbusRegister:
    address: int
    quantity: str
    scale: float = 1.0  # the register holds value x scale
    type: str = "float32"


@dataclass(frozen=True)
class ModbusMap:
    name: str
    function: int  # 3 holding or 4 input registers
    registers: tuple[ModbusRegister, ...]
    word_order: str = "big"  # "big": high word first


@dataclass(frozen=True)
class CollectorConfig:
    source: str = "<defaults>"
    poll: PollConfig = PollConfig()
    overrides: Mapping[str, PollConfig] = field(default_factory=dict)
    timezone: str = "Asia/Shanghai"
    stagger_s: float | None = None  # cycle starts spread over this window (None: the cycle)
    connect_timeout_s: float = 5.0
    backoff_s: tuple[float, float] = (1.0, 60.0)
    max_connecting: int = 256
    dialin_host: str = "127.0.0.1"
    dialin_port: int = 9700
    dialin_enabled: bool = True
    registration_timeout_s: float = 10.0
    # dial-in registration attempts, token buckets (collector.RegistrationLimiter)
    dialin_rate_limit: bool = True
    dialin_per_ip_rate: float = 2.0  # connections a second per source address, sustained
    dialin_per_ip_burst: float = 20.0
    dialin_global_rate: float = 200.0  # ... from all sources together
    dialin_global_burst: float = 2000.0
    dialin_report_s: float = 60.0  # refused connections are reported once per this interval
    heartbeat_grace: float = 2.5  # missed when silent for grace x heartbeat_s
    heartbeat_down_after: int = 2  # missed heartbeats in a row -> link down
    deadline_min: float = 30.0
    confirm_timeout_s: float = 60.0
    confirm_poll_s: float = 2.0
    credentials: Credentials = field(default_factory=Credentials, repr=False)
    modbus_timeout_s: float = 2.0
    modbus_retries: int = 1
    modbus_maps: Mapping[str, ModbusMap] = field(default_factory=dict)

    def poll_for(self, terminal: str) -> PollConfig:
        return self.overrides.get(terminal, self.poll)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def _poll(t: TomlTable, base: PollConfig) -> PollConfig:
    dis: list[int] = []
    for i, text in enumerate(t.raw("extra_dis", [f"{d:08X}" for d in base.extra_dis])):
        if not isinstance(text, str):
            raise t.fail("extra_dis", f"entry {i}: expected a hex string such as \"02010100\"")
        try:
            di = int(text, 16)
        except ValueError:
            raise t.fail("extra_dis", f"entry {i}: {text!r} is not hex") from None
        if len(text) != 8 or lookup(di, 2007) is None:
            raise t.fail("extra_dis", f"entry {i}: {text!r} is not a DL/T 645-2007 data "
                         "identifier the codec knows (docs/dlt645.md)")
        dis.append(di)
    return PollConfig(
        cycle_s=t.number("cycle_s", base.cycle_s, 0.01, 86400.0),
        timeout_s=t.number("timeout_s", base.timeout_s, 0.01, 60.0),
        retries=t.integer("retries", base.retries, 0, 10),
        preamble=t.integer("preamble", base.preamble, 0, 4),
        strict_checksum=t.boolean("strict_checksum", base.strict_checksum),
        demote_after=t.integer("demote_after", base.demote_after, 1, 1000),
        demoted_every=t.integer("demoted_every", base.demoted_every, 1, 10000),
        silent_after=t.integer("silent_after", base.silent_after, 1, 100),
        flood_bytes=t.integer("flood_bytes", base.flood_bytes, 1024, 1 << 30),
        extra_dis=tuple(dis),
        clock_every=t.integer("clock_every", base.clock_every, 0, 1_000_000),
        max_drift_s=t.number("max_drift_s", base.max_drift_s, 1.0, 86400.0),
        time_sync=t.string("time_sync", base.time_sync, TIME_SYNC),
    )


SECRETS_ENV = "METERSTREAM_SECRETS_FILE"
SECRET_KEYS = ("meter_password", "operator_code")
#: the API's operator tokens: `[operator_tokens]` name = "token" (at least this long)
TOKEN_MIN_LEN = 16


def _secret(t: TomlTable, k: str, default: str) -> str:
    """A string that is a secret: a wrong type is named, its value never shown."""
    v = t.raw(k, default)
    if not isinstance(v, str):
        raise t.fail(k, f"expected a quoted string, got a {type(v).__name__} (value not shown)")
    return v


def _in_repository(p: Path) -> Path | None:
    for d in p.resolve().parents:
        if (d / ".git").exists():
            return d
    return None


def load_secrets(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The secrets file: TOML with `meter_password` and/or `operator_code` (the collector's),
    and an `[operator_tokens]` table of operator name = API token (the worker's). Refused,
    like ssh refuses a private key, when group or others may read or write it, and when it
    lies inside a git work tree (secrets never live in a repository)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError("secrets file not found", where=str(p)) from None
    except OSError as exc:
        raise UserError(f"cannot read the secrets file: {exc.strerror}", where=str(p)) from None
    if st.st_mode & 0o077:
        raise UserError(f"permissions {st.st_mode & 0o777:04o} are too open: a secrets file must "
                        f"be readable by its owner only (chmod 600 {p})", where=str(p))
    repo = _in_repository(p)
    if repo is not None:
        raise UserError(f"a secrets file must not live in a repository (inside {repo}): keep "
                        "it e.g. in /etc/meterstream/ with mode 600", where=str(p))
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read the secrets file: {exc.strerror}", where=str(p)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        # the decoder's message gives line and column; it does not quote the file
        raise UserError(f"not valid TOML: {str(exc).splitlines()[0]}", where=str(p)) from None
    t = TomlTable(doc, str(p), "", DOCS)
    out: dict[str, Any] = {k: _secret(t, k, "") for k in SECRET_KEYS if t.has(k)}
    if t.has("operator_tokens"):
        tt = t.sub("operator_tokens")
        tokens: dict[str, str] = {}  # token -> operator name
        for name in list(tt.data):
            token = _secret(tt, name, "")
            if len(token) < TOKEN_MIN_LEN:
                raise tt.fail(name, f"a token needs at least {TOKEN_MIN_LEN} characters "
                              "(value not shown)")
            if token in tokens:
                raise tt.fail(name, f"the same token as {tokens[token]!r}: give each operator "
                              "their own (value not shown)")
            tokens[token] = name
        out["operator_tokens"] = tokens
    t.finish()
    return out


def _credentials(t: TomlTable, base: Path | None) -> Credentials:
    """Each secret from its environment variable, else the secrets file ($SECRETS_ENV or the
    `secrets_file` key), else (discouraged) `password` / `operator` in this file."""
    level = t.integer("password_level", 2, 0, 255)
    pw_env = t.string("password_env", "METERSTREAM_METER_PASSWORD")
    op_env = t.string("operator_env", "METERSTREAM_OPERATOR_CODE")
    secrets_path = os.environ.get(SECRETS_ENV) or (
        t.string("secrets_file", "") if t.has("secrets_file") else "")
    secrets: dict[str, Any] = {}
    if secrets_path:
        sp = Path(secrets_path)
        from_env = bool(os.environ.get(SECRETS_ENV))
        if not sp.is_absolute() and base is not None and not from_env:
            sp = base / sp
        try:
            secrets = load_secrets(sp)
        except UserError as exc:  # say which setting named the file
            if from_env:
                raise UserError(f"{exc} (named by ${SECRETS_ENV})") from None
            raise t.fail("secrets_file", str(exc)) from None
    password = (os.environ.get(pw_env) or secrets.get("meter_password")
                or _secret(t, "password", "000000"))
    operator = (os.environ.get(op_env) or secrets.get("operator_code")
                or _secret(t, "operator", "00000000"))
    try:
        return Credentials(level, password, operator)
    except ValueError as exc:  # the message names the field, never its value
        where = f"${pw_env} / ${op_env}, {secrets_path or 'no secrets file'}, or the file"
        raise t.fail("password", f"{exc} (from {where})") from None


def _modbus_maps(t: TomlTable) -> dict[str, ModbusMap]:
    maps: dict[str, ModbusMap] = {}
    for name in list(t.data):
        m = t.sub(name)
        function = m.integer("function", 4, 3, 4)
        word_order = m.string("word_order", "big", ("big", "little"))
        regs = []
        for r in m.subs("registers"):
            raw = r.raw("address")
            if isinstance(raw, str):
                try:
                    address = int(raw, 0)
                except ValueError:
                    raise r.fail("address", f"{raw!r} is not a number") from None
            elif isinstance(raw, int) and not isinstance(raw, bool):
                address = raw
            else:
                raise r.fail("address", "expected a register address (\"0x0048\" or 72)")
            if not 0 <= address <= 0xFFFF:
                raise r.fail("address", f"{address} is not a 16-bit register address")
            regs.append(ModbusRegister(
                address, r.string("quantity", "", MODBUS_QUANTITIES),
                r.number("scale", 1.0, 1e-9, 1e9), r.string("type", "float32", MODBUS_TYPES)))
            r.finish()
        if not any(x.quantity in ("import_kwh", "total_kwh") for x in regs):
            raise m.fail("registers", "a map needs an import_kwh or total_kwh register")
        m.finish()
        maps[name] = ModbusMap(name, function, tuple(regs), word_order)
    t.finish()
    return maps


def parse_collector_config(doc: Mapping[str, Any], source: str = "<config>",
                           base_dir: Path | None = None) -> CollectorConfig:
    top = TomlTable(doc, source, "", DOCS)
    c = top.sub("collector")
    poll = _poll(c, PollConfig())
    tz = c.string("timezone", "Asia/Shanghai")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise c.fail("timezone", f"{tz!r} is not a time zone name (e.g. Asia/Shanghai)") from None
    backoff = c.span("backoff_s", (1.0, 60.0), 0.01, 3600.0)
    stagger = c.number("stagger_s", poll.cycle_s, 0.0, 86400.0) if c.has("stagger_s") else None
    cfg = CollectorConfig(
        source=source, poll=poll, timezone=tz, stagger_s=stagger,
        connect_timeout_s=c.number("connect_timeout_s", 5.0, 0.1, 120.0),
        backoff_s=backoff, max_connecting=c.integer("max_connecting", 256, 1, 100_000))
    c.finish()
    d = top.sub("dialin")
    cfg = replace(
        cfg, dialin_enabled=d.boolean("enabled", True), dialin_host=d.string("host", "127.0.0.1"),
        dialin_port=d.integer("port", 9700, 0, 65535),
        registration_timeout_s=d.number("registration_timeout_s", 10.0, 0.1, 600.0),
        heartbeat_grace=d.number("heartbeat_grace", 2.5, 1.0, 100.0),
        heartbeat_down_after=d.integer("heartbeat_down_after", 2, 1, 100),
        dialin_rate_limit=d.boolean("rate_limit", True),
        dialin_per_ip_rate=d.number("per_ip_rate", 2.0, 0.001, 1e6),
        dialin_per_ip_burst=d.number("per_ip_burst", 20.0, 1.0, 1e6),
        dialin_global_rate=d.number("global_rate", 200.0, 0.001, 1e7),
        dialin_global_burst=d.number("global_burst", 2000.0, 1.0, 1e7),
        dialin_report_s=d.number("report_s", 60.0, 0.05, 86400.0))
    d.finish()
    k = top.sub("control")
    cfg = replace(
        cfg, credentials=_credentials(k, base_dir), deadline_min=k.number("deadline_min", 30.0, 1.0, 1440.0),
        confirm_timeout_s=k.number("confirm_timeout_s", 60.0, 0.1, 3600.0),
        confirm_poll_s=k.number("confirm_poll_s", 2.0, 0.01, 600.0))
    k.finish()
    mb = top.sub("modbus")
    cfg = replace(cfg, modbus_timeout_s=mb.number("timeout_s", 2.0, 0.05, 60.0),
                  modbus_retries=mb.integer("retries", 1, 0, 10))
    mb.finish()
    cfg = replace(cfg, modbus_maps=_modbus_maps(top.sub("modbus_maps")))
    terms = top.sub("terminals")
    overrides = {}
    for tid in list(terms.data):
        sub = terms.sub(tid)
        overrides[tid] = _poll(sub, poll)
        sub.finish()
    terms.finish()
    top.finish()
    return replace(cfg, overrides=overrides)


def load_collector_config(path: str | os.PathLike[str]) -> CollectorConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"collector configuration not found: {p}") from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=str(p)) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"not valid TOML: {exc}", where=str(p)) from None
    return parse_collector_config(doc, str(p), p.resolve().parent)
