"""Remote control commands as the collectors execute them: what was asked and how it ended.

A command goes to one meter through its terminal's session (commands go before polling on the
half-duplex bus): 1CH is sent (retried on timeout), then status word 3 is read back until the
bit that proves the action matches or the confirmation timeout passes. The outcome is
`confirmed`, `refused` (the meter's reason, or why the collector would not send it) or
`unconfirmed` (no acknowledgement, or the relay never moved). Credentials never appear here.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meterstream.collectors.dlt645 import ControlAction, StatusWord3

#: CLI / API names of the actions, the 1CH code, and what status word 3 must show to confirm.
ACTIONS: dict[str, ControlAction] = {
    "trip": ControlAction.TRIP,
    "close": ControlAction.CLOSE_DIRECT,
    "allow-close": ControlAction.CLOSE_ALLOWED,
    "keep-power-on": ControlAction.KEEP_POWER,
    "keep-power-off": ControlAction.KEEP_POWER_RELEASE,
}

CONFIRMED = "confirmed"
REFUSED = "refused"
UNCONFIRMED = "unconfirmed"


def confirms(action: str, word: int) -> bool:
    """Does status word 3 show that `action` took effect?

    trip: relay open (bit4); close: relay closed (bit4 = 0); allow-close: relay command state
    closed (bit6 = 0; the relay itself closes when the customer presses the button);
    keep-power on/off: bit12 set / clear.
    """
    s = StatusWord3.from_word(word)
    if action == "trip":
        return s.relay_open
    if action == "close":
        return not s.relay_open
    if action == "allow-close":
        return not s.relay_command_open
    if action == "keep-power-on":
        return s.keep_power
    if action == "keep-power-off":
        return not s.keep_power
    raise ValueError(f"unknown action {action!r}")


@dataclass(frozen=True)
class Command:
    meter: str  # 12-digit address
    action: str  # a key of ACTIONS
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reason: str = ""  # who or what asked, for the audit

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}: use one of {', '.join(ACTIONS)}")


def _ts(ns: int | None) -> str | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


@dataclass
class CommandResult:
    command: Command
    terminal: str
    outcome: str = UNCONFIRMED  # confirmed | refused | unconfirmed
    detail: str = ""  # the meter's reason, or what did not happen
    sent_ns: int | None = None  # first 1CH written
    acked_ns: int | None = None  # 9CH received
    done_ns: int | None = None  # outcome known
    status: int | None = None  # the last status word 3 read back
    attempts: int = 0  # 1CH frames sent
    readbacks: int = 0  # status word reads after the command
    error_word: int | None = None  # of a DCH reply

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "command", "id": self.command.id, "terminal": self.terminal,
            "meter": self.command.meter, "action": self.command.action, "outcome": self.outcome,
            "detail": self.detail, "sent": _ts(self.sent_ns), "acknowledged": _ts(self.acked_ns),
            "done": _ts(self.done_ns), "attempts": self.attempts, "readbacks": self.readbacks,
        }
        if self.status is not None:
            s = StatusWord3.from_word(self.status)
            d["status"] = {"word": f"{self.status:04X}", "relay_open": s.relay_open,
                           "relay_command_open": s.relay_command_open,
                           "keep_power": s.keep_power}
        if self.error_word is not None:
            d["error_word"] = f"{self.error_word:04X}"
        if self.command.reason:
            d["reason"] = self.command.reason
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))
