"""Remote control (1CH) commands: the actions, the credentials, and pluggable payload encoders.

The payload encoder is a seam: `PlaintextEncoder` is the reference (export and retrofit prepaid
meters); an ESAM encoder (State Grid meters, PA = 98H ciphertext) plugs in as another
`CommandEncoder` without touching the rest. Pure: no I/O. Credentials never reach a repr, a log
line or an error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import Protocol, runtime_checkable

from meterstream.collectors.dlt645.frame import CodecError
from meterstream.collectors.dlt645.registry import datetime_to_bcd

__all__ = ["CommandEncoder", "ControlAction", "Credentials", "PlaintextEncoder"]


class ControlAction(IntEnum):
    """N1 of a 1CH command."""

    TRIP = 0x1A  # 跳闸
    CLOSE_ALLOWED = 0x1B  # 合闸允许: the customer presses the meter's button
    CLOSE_DIRECT = 0x1C  # 直接合闸
    ALARM = 0x2A
    ALARM_RELEASE = 0x2B
    KEEP_POWER = 0x3A  # 保电
    KEEP_POWER_RELEASE = 0x3B  # 保电解除


def _hex_field(value: str, digits: int, what: str) -> str:
    # The message names the field, never its value: these are secrets.
    if not isinstance(value, str) or len(value) != digits:
        raise CodecError(f"{what} must be {digits} hex digits")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise CodecError(f"{what} must be {digits} hex digits") from None
    return value.upper()


@dataclass(frozen=True)
class Credentials:
    """Password level PA, password P0..P2 and operator code C0..C3 (written high digit first).

    repr/str show only the password level: the password and operator code must never reach a
    log.
    """

    password_level: int = 2
    password: str = field(default="000000", repr=False)
    operator: str = field(default="00000000", repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.password_level <= 0xFF:
            raise CodecError("password level must be 0..255")
        object.__setattr__(self, "password", _hex_field(self.password, 6, "password"))
        object.__setattr__(self, "operator", _hex_field(self.operator, 8, "operator code"))

    def to_wire(self) -> bytes:
        """PA P0 P1 P2 C0 C1 C2 C3 (password and operator code low byte first), before +33H."""
        return (
            bytes((self.password_level,))
            + bytes.fromhex(self.password)[::-1]
            + bytes.fromhex(self.operator)[::-1]
        )

    @classmethod
    def from_wire(cls, data: bytes) -> Credentials:
        """Inverse of `to_wire` (8 bytes)."""
        if len(data) != 8:
            raise CodecError(f"credentials are 8 bytes, got {len(data)}")
        return cls(data[0], data[1:4][::-1].hex().upper(), data[4:8][::-1].hex().upper())


@runtime_checkable
class CommandEncoder(Protocol):
    """Builds the 1CH DATA (before +33H) for one command."""

    def encode(
        self, action: ControlAction, deadline: datetime, credentials: Credentials
    ) -> bytes: ...


class PlaintextEncoder:
    """PA P0 P1 P2 C0..C3 N1 N2 N3..N8: 16 bytes; deadline BCD ss mm hh DD MM YY (meter time)."""

    def encode(self, action: ControlAction, deadline: datetime, credentials: Credentials) -> bytes:
        if not 0 <= int(action) <= 0xFF:
            raise CodecError(f"control action must be one byte, got {action!r}")
        return credentials.to_wire() + bytes((int(action), 0)) + datetime_to_bcd(deadline)
