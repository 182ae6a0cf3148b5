"""meterfield: the simulated field of meterstream (meters, buses, concentrators, DTUs, gateways).

It speaks the real protocols (DL/T 645-2007/-1997 over TCP, Modbus TCP) on loopback with
realistic timing and faults, as the other side of the wire for tests, benchmarks and the demo.
It imports only the DL/T 645 codec and UserError from meterstream, and the head-end never
imports it. Importing this package is cheap; the names below load their modules on first use.

    from meterfield import Field, load_config
    field = Field(load_config("config/field-test.toml"))
    async with field: ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Field",
    "FieldConfig",
    "SimClock",
    "heartbeat_packet",
    "load_config",
    "parse_config",
    "registration_packet",
]

_WHERE = {
    "Field": "meterfield.field",
    "FieldConfig": "meterfield.config",
    "load_config": "meterfield.config",
    "parse_config": "meterfield.config",
    "SimClock": "meterfield.clock",
    "registration_packet": "meterfield.terminals",
    "heartbeat_packet": "meterfield.terminals",
}

if TYPE_CHECKING:
    from meterfield.clock import SimClock
    from meterfield.config import FieldConfig, load_config, parse_config
    from meterfield.field import Field
    from meterfield.terminals import heartbeat_packet, registration_packet


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'meterfield' has no attribute {name!r}")
