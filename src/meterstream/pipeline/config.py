"""The worker's and the demo's configuration: TOML, checked at start (file, key, reason).

`config/worker.toml` is the production worker's; `config/demo.toml` the one-command demo's,
which names the field, tariffs and collector files it runs (relative to itself) and adds a
seeded payment stream. Every key is described in docs/pipeline.md.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from meterstream.collectors.config import SECRETS_ENV, TOKEN_MIN_LEN, load_secrets
from meterstream.errors import UserError
from meterstream.kernels.collection import CollectionRules
from meterstream.pipeline.commands import CommandPolicy
from meterstream.tomlcheck import TomlTable

DOCS = "docs/pipeline.md"


@dataclass(frozen=True)
class WorkerConfig:
    source: str = "<defaults>"
    partitions: int = 4
    tick_s: float = 1.0
    kpi_s: float = 10.0
    cycle_s: float = 60.0  # the collectors' cycle: k missed ones drop a terminal
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    operator_tokens_env: str = "METERSTREAM_OPERATOR_TOKENS"  # "name:token,name:token"
    metrics_port: int = 0  # Prometheus /metrics on http_host (0: off); docs/operations.md
    # Tansu 0.6.0 reports short end offsets after batched produces, which cuts a changelog
    # recovery short (DESIGN.md): 1 there; Kafka takes the 1 MiB default
    producer_max_batch_size: int | None = None
    policy: CommandPolicy = field(default_factory=CommandPolicy)
    influx: Any = None  # an InfluxConfig, or None: no InfluxDB
    audit_path: Path | None = None  # the tamper-evident audit trail (meterstream.audit), or None
    rules: CollectionRules = field(default_factory=CollectionRules)  # [dropouts]
    # what the worker keeps in memory for the API and the dashboard (bounded, docs/dashboard.md)
    events_kept: int = 2000  # the last events and the last commands out, each
    history_meters: int = 1024  # customers whose history is kept (those something happened to)
    history_entries: int = 32  # events kept per such customer
    secrets_file: Path | None = None  # its [operator_tokens] (collectors/config.py load_secrets)

    def operator_tokens(self) -> dict[str, str]:
        """token -> operator name: from the environment variable when it is set, else from
        the secrets file's `[operator_tokens]` (never from a file in the repository)."""
        raw = os.environ.get(self.operator_tokens_env, "").strip()
        if raw:
            out: dict[str, str] = {}
            for part in raw.split(","):
                name, sep, token = part.strip().partition(":")
                if sep and name and len(token) >= TOKEN_MIN_LEN:
                    out[token] = name
            return out
        if self.secrets_file is None:
            return {}
        return dict(load_secrets(self.secrets_file).get("operator_tokens", {}))


@dataclass(frozen=True)
class PaymentStream:
    """The demo's simulated payment channels."""

    every_s: float = 5.0
    seed: int = 7
    duplicate_share: float = 0.1
    pending_share: float = 0.1  # bank withholdings (pending, later settled)
    failing_withholding: bool = True  # one withholding that fails after a while
    amount_yuan: tuple[int, int] = (20, 200)


@dataclass(frozen=True)
class DemoConfig:
    source: str
    field: Path
    tariffs: Path
    collector: Path
    speed: float
    data_dir: Path
    worker: WorkerConfig
    payments: PaymentStream


def _secrets_file(w: TomlTable, base: Path) -> Path | None:
    """$METERSTREAM_SECRETS_FILE, else `[worker] secrets_file` (relative to the config file's
    directory); read once here so that a broken or too open file is refused at start."""
    env = os.environ.get(SECRETS_ENV, "")
    if not env and not w.has("secrets_file"):
        return None
    path = Path(env) if env else base / w.string("secrets_file", "")
    try:
        load_secrets(path)
    except UserError as exc:
        if env:
            raise UserError(f"{exc} (named by ${SECRETS_ENV})") from None
        raise w.fail("secrets_file", str(exc)) from None
    return path


def _worker(t: TomlTable, source: str, base: Path) -> WorkerConfig:
    w = t.sub("worker")
    cfg = WorkerConfig(
        source=source,
        partitions=w.integer("partitions", 4, 1, 256),
        tick_s=w.number("tick_s", 1.0, 0.05, 60.0),
        kpi_s=w.number("kpi_s", 10.0, 0.5, 3600.0),
        cycle_s=w.number("cycle_s", 60.0, 0.1, 86400.0),
        http_host=w.string("http_host", "127.0.0.1"),
        http_port=w.integer("http_port", 8080, 0, 65535),
        operator_tokens_env=w.string("operator_tokens_env", "METERSTREAM_OPERATOR_TOKENS"),
        metrics_port=w.integer("metrics_port", 0, 0, 65535),
        producer_max_batch_size=(w.integer("producer_max_batch_size", 1, 1, 64 << 20)
                                 if w.has("producer_max_batch_size") else None),
        # relative to the config file's directory, like the other file keys
        audit_path=(base / w.string("audit_path", "") if w.has("audit_path") else None),
        events_kept=w.integer("events_kept", 2000, 10, 1_000_000),
        history_meters=w.integer("history_meters", 1024, 1, 10_000_000),
        history_entries=w.integer("history_entries", 32, 1, 100_000),
        secrets_file=_secrets_file(w, base))
    w.finish()
    c = t.sub("commands")
    d = CommandPolicy()
    try:
        policy = CommandPolicy(
            max_attempts=c.integer("max_attempts", d.max_attempts, 1, 100),
            backoff_base_s=c.number("backoff_base_s", d.backoff_base_s, 0.01, 86400.0),
            backoff_cap_s=c.number("backoff_cap_s", d.backoff_cap_s, 0.01, 86400.0),
            result_timeout_s=c.number("result_timeout_s", d.result_timeout_s, 0.1, 86400.0),
            timeliness_target_s=c.number("timeliness_target_s", d.timeliness_target_s, 1.0,
                                         86400.0),
            reconnect_action=c.string("reconnect_action", d.reconnect_action,
                                      ("close", "allow-close")))
    except ValueError as exc:
        raise c.fail("backoff_base_s", str(exc)) from None
    c.finish()
    rules = _dropouts(t.sub("dropouts"))
    influx = None
    if t.has("influx"):
        from meterstream.pipeline.influx import load_influx_config

        influx = load_influx_config(t.sub("influx"), base)
    else:
        t.raw("influx")
    return WorkerConfig(**{**cfg.__dict__, "policy": policy, "influx": influx, "rules": rules})


def _dropouts(t: TomlTable) -> CollectionRules:
    """The `[dropouts]` table: when a terminal counts as offline, when its own alarm goes out,
    and when an area's dropouts become one area alarm (docs/collection-kernels.md)."""
    d = CollectionRules()
    s = 1_000_000_000
    kw = {
        "k": t.integer("k", d.k, 1, 1000),
        "grace_ns": int(t.number("grace_s", d.grace_ns / s, 0.0, 86400.0) * s),
        "hold_ns": int(t.number("hold_s", d.hold_ns / s, 0.0, 7 * 86400.0) * s),
        "window_ns": int(t.number("window_s", d.window_ns / s, 0.0, 7 * 86400.0) * s),
        "raise_share_bp": round(t.share("raise_share", d.raise_share_bp / 10_000) * 10_000),
        "clear_share_bp": round(t.share("clear_share", d.clear_share_bp / 10_000) * 10_000),
        "min_terminals": t.integer("min_terminals", d.min_terminals, 1, 1_000_000),
        "meter_silent_k": t.integer("meter_silent_k", d.meter_silent_k, 1, 1000),
    }
    t.finish()
    try:
        return CollectionRules(**kw)
    except UserError as exc:  # the one rule across keys: clear below raise
        raise t.fail("clear_share", str(exc).removeprefix("collection rules: ")) from None


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str, Path]:
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"configuration not found: {p}") from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"not valid TOML: {exc}", where=str(p)) from None
    return doc, str(p), p.resolve().parent


def load_worker_config(path: str | os.PathLike[str] | None) -> WorkerConfig:
    if path is None:
        return WorkerConfig()
    doc, source, base = _read(path)
    top = TomlTable(doc, source, "", DOCS)
    cfg = _worker(top, source, base)
    top.finish()
    return cfg


def load_demo_config(path: str | os.PathLike[str]) -> DemoConfig:
    doc, source, base = _read(path)
    top = TomlTable(doc, source, "", DOCS)
    d = top.sub("demo")

    def file(key: str, default: str) -> Path:
        p = base / d.string(key, default)
        if not p.is_file():
            raise d.fail(key, f"{p} is not a file")
        return p

    field_path = file("field", "field-demo.toml")
    tariffs = file("tariffs", "tariffs-example.toml")
    collector = file("collector", "collector.toml")
    speed = d.number("speed", 1.0, 0.0, 1.0)
    data_dir = Path(d.string("data_dir", "var/demo"))
    if not data_dir.is_absolute():
        data_dir = Path.cwd() / data_dir
    d.finish()
    p = top.sub("payments")
    lo_hi = p.span("amount_yuan", (20.0, 200.0), 1.0, 100000.0)
    payments = PaymentStream(
        every_s=p.number("every_s", 5.0, 0.05, 3600.0), seed=p.integer("seed", 7),
        duplicate_share=p.share("duplicate_share", 0.1),
        pending_share=p.share("pending_share", 0.1),
        failing_withholding=p.boolean("failing_withholding", True),
        amount_yuan=(int(lo_hi[0]), int(lo_hi[1])))
    p.finish()
    worker = _worker(top, source, base)
    top.finish()
    return DemoConfig(source, field_path, tariffs, collector, speed, data_dir, worker, payments)



# --- the environment (docker-compose.yml, docs/operations.md "Environment variables") --------

@dataclass(frozen=True)
class EnvVar:
    """One environment variable a process reads: the configuration key (TOML `table.key`, or
    the command-line option) it stands for, and how its value is checked."""

    name: str
    key: str
    kind: str  # "string", "integer", "url", "broker", "choice", "secret"
    processes: tuple[str, ...]
    help: str
    lo: int = 0
    hi: int = 0
    choices: tuple[str, ...] = ()


_W, _C, _WC = ("worker",), ("collector",), ("worker", "collector")
_LONG = ("worker", "collector", "sim", "demo")

#: Every METERSTREAM_* variable, one table (docs/operations.md prints it). A variable overrides
#: its key; a bad value stops the start naming the variable and the reason.
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("METERSTREAM_BROKER", "--broker", "broker", _WC, "kafka://HOST:PORT[,HOST:PORT]"),
    EnvVar("METERSTREAM_LOG_FORMAT", "--log-format", "choice", _LONG,
           "log lines: text or json (one object per line)", choices=("text", "json")),
    EnvVar("METERSTREAM_LOG_LEVEL", "--log-level", "choice", _LONG, "DEBUG, INFO, WARNING, ERROR",
           choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    EnvVar("METERSTREAM_METRICS_PORT", "worker.metrics_port / --metrics-port", "integer",
           ("worker", "collector", "demo"),
           "Prometheus /metrics port (0: off)", 0, 65535),
    EnvVar("METERSTREAM_METRICS_HOST", "--metrics-host", "string", _C,
           "address of the collector's /metrics (the worker's is worker.http_host)"),
    EnvVar("METERSTREAM_HTTP_HOST", "worker.http_host", "string", _W,
           "address of the JSON API and /metrics"),
    EnvVar("METERSTREAM_HTTP_PORT", "worker.http_port", "integer", _W, "JSON API port", 0, 65535),
    EnvVar("METERSTREAM_PARTITIONS", "worker.partitions", "integer", _W,
           "partitions of every topic (must match the topics)", 1, 256),
    EnvVar("METERSTREAM_DATA_DIR", "--data-dir", "string", _W, "the worker's local files"),
    EnvVar("METERSTREAM_OPERATOR_TOKENS", "worker.operator_tokens_env", "secret", _W,
           "operators of the API: name:token,name:token (tokens of 16+ characters)"),
    EnvVar("METERSTREAM_INFLUX_URL", "influx.url", "url", _W,
           "InfluxDB 2 base URL (turns the sink on without an [influx] table)"),
    EnvVar("METERSTREAM_INFLUX_ORG", "influx.org", "string", _W, "InfluxDB organization"),
    EnvVar("METERSTREAM_INFLUX_BUCKET", "influx.bucket", "string", _W, "InfluxDB bucket"),
    EnvVar("METERSTREAM_INFLUX_TOKEN", "influx.token_env", "secret", _W,
           "the InfluxDB API token (the variable influx.token_env names)"),
    EnvVar("METERSTREAM_INFLUX_SPOOL_DIR", "influx.spool_dir", "string", _W,
           "where points wait while InfluxDB is down"),
    EnvVar("METERSTREAM_COLLECTOR_GROUP", "--group", "string", _C,
           "the collectors' consumer group"),
    EnvVar("METERSTREAM_COLLECTOR_SPOOL", "--spool", "string", _C,
           "where records wait while Kafka is unreachable (one directory per process)"),
    EnvVar("METERSTREAM_DIALIN_HOST", "dialin.host", "string", _C,
           "address the DTUs dial (0.0.0.0 in a container)"),
    EnvVar("METERSTREAM_DIALIN_PORT", "dialin.port", "integer", _C, "dial-in port", 1, 65535),
    EnvVar("METERSTREAM_METER_PASSWORD", "control.password_env", "secret", _C,
           "the meters' remote-control password"),
    EnvVar("METERSTREAM_OPERATOR_CODE", "control.operator_env", "secret", _C,
           "the operator code sent with remote-control commands"),
    EnvVar("METERSTREAM_SECRETS_FILE", "control.secrets_file / worker.secrets_file", "string",
           _WC, "the secrets file (mode 600, outside any repository): meter password, "
           "operator code, [operator_tokens]"),
)
ENV_BY_NAME = {v.name: v for v in ENV_VARS}


def env_value(name: str, env: Mapping[str, str] | None = None) -> Any:
    """The checked value of variable `name` (None when unset or empty); UserError naming the
    variable and the reason when it is wrong."""
    var = ENV_BY_NAME[name]
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return None
    where = f"environment variable {name}"
    if var.kind == "integer":
        try:
            n = int(raw)
        except ValueError:
            raise UserError(f"{raw!r} is not an integer", where=where) from None
        if not var.lo <= n <= var.hi:
            raise UserError(f"{n} is out of range: give {var.lo}..{var.hi}", where=where)
        return n
    if var.kind == "choice":
        got = raw.upper() if var.choices[0].isupper() else raw.lower()
        if got not in var.choices:
            raise UserError(f"{raw!r}: give one of {', '.join(var.choices)}", where=where)
        return got
    if var.kind == "url" and not raw.startswith(("http://", "https://")):
        raise UserError(f"{raw!r}: give the server's base URL, e.g. http://influxdb:8086",
                        where=where)
    if var.kind == "broker" and not raw.startswith("kafka://"):
        raise UserError(f"expected kafka://HOST:PORT, found {raw!r}", where=where)
    return raw


def worker_env(cfg: WorkerConfig, env: Mapping[str, str] | None = None) -> WorkerConfig:
    """`cfg` with the worker's variables of ENV_VARS applied over its TOML keys. InfluxDB is
    turned on by METERSTREAM_INFLUX_URL when the file has no [influx] table (org and bucket
    are then required)."""
    from meterstream.pipeline.influx import InfluxConfig

    env = os.environ if env is None else env
    top: dict[str, Any] = {}
    for name, key in (("METERSTREAM_HTTP_HOST", "http_host"), ("METERSTREAM_HTTP_PORT",
                      "http_port"), ("METERSTREAM_PARTITIONS", "partitions"),
                      ("METERSTREAM_METRICS_PORT", "metrics_port")):
        v = env_value(name, env)
        if v is not None:
            top[key] = v
    influx = cfg.influx
    got = {k: env_value(f"METERSTREAM_INFLUX_{k.upper()}", env)
           for k in ("url", "org", "bucket", "spool_dir")}
    if influx is None and got["url"] is not None:
        for k in ("org", "bucket"):
            if got[k] is None:
                raise UserError("required when METERSTREAM_INFLUX_URL is set",
                                where=f"environment variable METERSTREAM_INFLUX_{k.upper()}")
        influx = InfluxConfig(url=got["url"], org=got["org"], bucket=got["bucket"],
                              spool_dir=Path(got["spool_dir"] or "var/influx-spool"))
    elif influx is not None:
        influx = replace(influx, **{k: (Path(v) if k == "spool_dir" else v)
                                    for k, v in got.items() if v is not None})
    return replace(cfg, **top, influx=influx)


def broker_of(flag: str | None, env: Mapping[str, str] | None = None) -> str:
    """aiokafka's bootstrap servers from --broker, else from METERSTREAM_BROKER."""
    from meterstream.pipeline.cli._kafka import bootstrap_of

    if flag:
        return bootstrap_of(flag)
    url = env_value("METERSTREAM_BROKER", env)
    if url is None:
        raise UserError("give --broker kafka://HOST:PORT or set METERSTREAM_BROKER",
                        where="--broker")
    try:
        return bootstrap_of(url)
    except UserError:
        raise UserError(f"expected kafka://HOST:PORT[,HOST:PORT], found {url!r}",
                        where="environment variable METERSTREAM_BROKER") from None


def port_of(flag: int | None, name: str, default: int,
            env: Mapping[str, str] | None = None) -> int:
    """A port option (e.g. --metrics-port) given on the command line, else its variable."""
    if flag is not None:
        if not 0 <= flag <= 65535:
            raise UserError(f"{flag}: give 0..65535", where=f"--{name}")
        return flag
    got = env_value(f"METERSTREAM_{name.upper().replace('-', '_')}", env)
    return default if got is None else int(got)
