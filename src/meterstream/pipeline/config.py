"""The worker's and the demo's configuration: TOML, checked at start (file, key, reason).

`config/worker.toml` is the production worker's; `config/demo.toml` the one-command demo's,
which names the field, tariffs and collector files it runs (relative to itself) and adds a
seeded payment stream. Every key is described in docs/pipeline.md.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterstream.errors import UserError
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
    # Tansu 0.6.0 reports short end offsets after batched produces, which cuts a changelog
    # recovery short (DESIGN.md): 1 there; Kafka takes the 1 MiB default
    producer_max_batch_size: int | None = None
    policy: CommandPolicy = field(default_factory=CommandPolicy)
    influx: Any = None  # an InfluxConfig, or None: no InfluxDB

    def operator_tokens(self) -> dict[str, str]:
        """token -> operator name, from the environment (never from a file in the repo)."""
        out: dict[str, str] = {}
        for part in os.environ.get(self.operator_tokens_env, "").split(","):
            name, sep, token = part.strip().partition(":")
            if sep and name and len(token) >= 16:
                out[token] = name
        return out


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
        producer_max_batch_size=(w.integer("producer_max_batch_size", 1, 1, 64 << 20)
                                 if w.has("producer_max_batch_size") else None))
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
    influx = None
    if t.has("influx"):
        from meterstream.pipeline.influx import load_influx_config

        influx = load_influx_config(t.sub("influx"), base)
    else:
        t.raw("influx")
    return WorkerConfig(**{**cfg.__dict__, "policy": policy, "influx": influx})


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
