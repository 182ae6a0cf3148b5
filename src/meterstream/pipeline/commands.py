"""The command book of one terminal: every cut-off, reconnection and manual command (费控 停复电)
from decision to a final state, with an audit record for each step.

Pure: no Kafka, no asyncio, no I/O and no clock (every time is passed in, epoch ns); the Faust
worker keeps one book per terminal in a table and publishes what it drains. It never holds
credentials (the 1CH password and operator code are the collector's). Rules: docs/commands.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from meterstream.collectors.commands import ACTIONS, CommandResult
from meterstream.collectors.commands import Command as WireCommand

NS = 1_000_000_000

# --- states -----------------------------------------------------------------------------------

ISSUED = "issued"  # decided, not yet handed to the collector
QUEUED = "queued"  # held: the terminal is offline; sent when it is back, never lost
SENT = "sent"  # handed to the collector, no result yet
ACKNOWLEDGED = "acknowledged"  # the meter answered 9CH (reported with the final result)
UNCONFIRMED = "unconfirmed"  # an attempt failed; waiting for its retry (backoff)
CONFIRMED = "confirmed"  # status word 3 shows the action (final)
REFUSED = "refused"  # the meter (or the collector) refused it, with the reason (final)
ESCALATED = "escalated"  # max_attempts unconfirmed: a field work order (final)
CANCELLED = "cancelled"  # a cut-off lifted by a payment or a reconnection (final)

OPEN_STATES = (ISSUED, QUEUED, SENT, UNCONFIRMED)  # ACKNOWLEDGED is only ever passed through
FINAL_STATES = (CONFIRMED, REFUSED, ESCALATED, CANCELLED)

#: Every transition an audit record may show (None: not yet issued).
TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({ISSUED}),
    ISSUED: frozenset({QUEUED, SENT, CANCELLED}),
    QUEUED: frozenset({SENT, CANCELLED, CONFIRMED, REFUSED}),  # late result of an attempt
    SENT: frozenset({ACKNOWLEDGED, CONFIRMED, REFUSED, UNCONFIRMED, QUEUED, CANCELLED}),
    ACKNOWLEDGED: frozenset({CONFIRMED, UNCONFIRMED}),
    UNCONFIRMED: frozenset({SENT, QUEUED, ESCALATED, CANCELLED, CONFIRMED, REFUSED}),
    CONFIRMED: frozenset(), REFUSED: frozenset(), ESCALATED: frozenset(),
    CANCELLED: frozenset(),
}

# --- actions ----------------------------------------------------------------------------------

CUTOFF = "cutoff"  # the kernels' ACT_CUTOFF (停电): 1CH trip
RECONNECT = "reconnect"  # the kernels' ACT_RECONNECT (复电): 1CH close or allow-close
KERNEL_ACTIONS = (CUTOFF, RECONNECT)
MANUAL_ACTIONS = tuple(ACTIONS)  # trip, close, allow-close, keep-power-on, keep-power-off
#: Commands that give the customer power back: they supersede and hold back kernel cut-offs.
CLOSING = frozenset({RECONNECT, "close", "allow-close"})

#: The order of due(): reconnections, then manual commands, then cut-offs.
_PRIORITY = {RECONNECT: 0, CUTOFF: 2}

#: who for transitions nobody asked for by name
BY_WORKER, BY_COLLECTOR, BY_TIMEOUT, BY_BOOK = "worker", "collector", "timeout", "book"


@dataclass(frozen=True)
class CommandPolicy:
    """How commands are retried, timed out, kept and judged. Defaults: docs/commands.md."""

    max_attempts: int = 4  # 1CH attempts (each with read-back) before a work order
    backoff_base_s: float = 30.0  # wait after the first failed attempt; doubles each time
    backoff_cap_s: float = 600.0  # ... up to this
    result_timeout_s: float = 300.0  # sent with no result this long: counts as unconfirmed
    history_kept: int = 256  # closed commands kept per terminal (API, late results)
    timeliness_target_s: float = 300.0  # 复电及时率: a reconnection confirmed within this
    latency_bounds_s: tuple[float, ...] = (10, 30, 60, 120, 300, 900, 3600, 14400, 86400)
    reconnect_action: str = "close"  # the 1CH of a kernel reconnect: close, or allow-close
    reconnect_waiting_alarm_s: float = 3600.0  # a reconnect queued (offline) this long: event
    escalate_refused_reconnect: bool = True  # a refused reconnect is a work order too

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"CommandPolicy.{key}: {why}")

        if self.max_attempts < 1:
            raise bad("max_attempts", f"must be at least 1, got {self.max_attempts}")
        if not 0 < self.backoff_base_s <= self.backoff_cap_s:
            raise bad("backoff_base_s", "must be > 0 and <= backoff_cap_s, got "
                      f"{self.backoff_base_s} and {self.backoff_cap_s}")
        for key in ("result_timeout_s", "timeliness_target_s", "reconnect_waiting_alarm_s"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.history_kept < 0:
            raise bad("history_kept", f"must be >= 0, got {self.history_kept}")
        b = self.latency_bounds_s
        if not b or any(x <= 0 for x in b) or any(y <= x for x, y in pairwise(b)):
            raise bad("latency_bounds_s", f"must be positive and increasing, got {b}")
        if self.reconnect_action not in ("close", "allow-close"):
            raise bad("reconnect_action",
                      f"must be 'close' or 'allow-close', got {self.reconnect_action!r}")

    def backoff_ns(self, failed_attempts: int) -> int:
        """Wait before the next attempt after `failed_attempts` (>= 1) failed ones."""
        s = min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** max(0, failed_attempts - 1))
        return round(s * NS)


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / NS, UTC).isoformat(timespec="milliseconds")


def _json(d: dict[str, Any]) -> str:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


@dataclass(slots=True)
class Command:
    """One command of the book. Those handed out are copies: changing them changes nothing."""

    id: str  # "<terminal>:<seq>"; the collector gets "<id>/<attempt>" (to_wire)
    seq: int  # issue order within the book
    terminal: str
    meter: str  # 12-digit address
    action: str  # cutoff | reconnect | a manual action
    wire_action: str  # the 1CH the collector executes (a key of collectors.commands.ACTIONS)
    cause: str  # what decided it: the kernel's reason, or the operator's why
    who: str  # kernel, an operator's name, book (a follow-up it issued itself)
    issued_ns: int
    cause_ns: int  # the time of its cause (a reconnect: the payment's time)
    state: str = ISSUED
    attempts: int = 0  # 1CH attempts handed to the collector (a not-sent one is given back)
    sent_ns: int | None = None  # the current / last attempt
    acked_ns: int | None = None
    done_ns: int | None = None  # final state reached
    not_before_ns: int = 0  # a retry waits for this
    detail: str = ""  # the last result's detail (the meter's reason, what did not happen)
    status: int | None = None  # the last status word 3 the collector read
    alarmed: bool = False  # the reconnect-waiting event was given
    cancelled_in_flight: bool = False  # cancelled while sent: the collector may still run it
    work_order: bool = False  # an escalation work order is out and not yet void

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_wire(self) -> WireCommand:
        """The command as the collector executes it, for the attempt due() offers now."""
        return WireCommand(self.meter, self.wire_action, id=f"{self.id}/{self.attempts + 1}",
                           reason=f"{self.who}: {self.cause}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Command:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def to_json(self) -> str:
        d = self.to_dict()
        d.update(type="command", issued=_iso(self.issued_ns), done=_iso(self.done_ns))
        return _json(d)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One transition of one command: who or what moved it, and why."""

    ts_ns: int
    command_id: str
    terminal: str
    meter: str
    action: str
    from_state: str | None  # None for the issue itself
    to_state: str
    cause: str
    who: str
    attempt: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ts"] = _iso(self.ts_ns)
        return d

    def to_json(self) -> str:
        return _json({"type": "command_audit", **self.to_dict()})


#: kinds of WorkOrder
WO_ESCALATED = "escalated"  # max_attempts without confirmation: a crew must go
WO_RECONNECT_REFUSED = "reconnect_refused"  # a paying customer the meter would not reconnect
WO_RECONNECT_WAITING = "reconnect_waiting"  # a reconnect queued for an offline terminal too long
WO_VOID = "void"  # an earlier work order is no longer needed (paid, or reconnected remotely)


@dataclass(frozen=True, slots=True)
class WorkOrder:
    """An event a person must act on (or may stop acting on, kind void)."""

    ts_ns: int
    kind: str
    command_id: str
    terminal: str
    meter: str
    action: str
    attempts: int
    detail: str
    cause: str
    who: str
    issued_ns: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ts"] = _iso(self.ts_ns)
        return d

    def to_json(self) -> str:
        return _json({"type": "work_order", **self.to_dict()})


@dataclass(frozen=True)
class Timeliness:
    """复电及时率 of the kernels' reconnections since the book was made: confirmed within the
    target out of all that ended (confirmed, refused or escalated), and the distribution of
    the confirmed ones' latency (confirmed time - cause time) over `bounds_s`."""

    target_s: float
    confirmed: int
    within_target: int
    failed: int  # refused or escalated
    bounds_s: tuple[float, ...]
    counts: tuple[int, ...]  # len(bounds_s) + 1: <= bounds_s[0], ..., > bounds_s[-1]

    @property
    def share(self) -> float | None:
        n = self.confirmed + self.failed
        return self.within_target / n if n else None


class CommandBook:
    """The open commands of one terminal's meters and a bounded history of closed ones.

    The worker calls issue() for each decision, due() to know what to send, on_sent() once it
    is on the commands topic, on_result() for each collector result, on_timeout() on a timer,
    and publishes drain_audit() and drain_events(). Replays of sent / result calls change
    nothing (they return False). Persist with to_bytes() after draining.
    """

    FORMAT = "meterstream.commandbook"
    VERSION = 1

    def __init__(self, terminal: str, policy: CommandPolicy | None = None) -> None:
        self.terminal = terminal
        self.policy = policy or CommandPolicy()
        self._seq = 0
        self._open: dict[str, Command] = {}  # in issue order
        self._history: dict[str, Command] = {}  # closed, oldest first, bounded
        self._closing_seq: dict[str, int] = {}  # meter -> seq of its last closing command
        self._kpi = [0, 0, 0]  # confirmed, within target, failed (kernel reconnects)
        self._counts = [0] * (len(self.policy.latency_bounds_s) + 1)
        self._audit: list[AuditRecord] = []
        self._events: list[WorkOrder] = []

    # --- decisions ----------------------------------------------------------------------------

    def issue(self, meter: str, action: str, cause: str, now_ns: int, who: str = "kernel", *,
              cause_ns: int | None = None) -> Command | None:
        """A new command, or None when the same action is already open for the meter.

        A closing command (reconnect, close, allow-close) cancels the meter's open cut-offs and
        voids their work orders. A cut-off while a closing command is open is kept but held
        back until that one ends (docs/commands.md, "A cut-off while a reconnect is open").
        """
        if action not in KERNEL_ACTIONS and action not in MANUAL_ACTIONS:
            raise ValueError(f"unknown action {action!r}: use one of "
                             f"{', '.join(KERNEL_ACTIONS + MANUAL_ACTIONS)}")
        if not meter:
            raise ValueError("meter: empty address")
        if action in MANUAL_ACTIONS and not (who.strip() and cause.strip()):
            raise ValueError(f"{action} for meter {meter}: a manual command needs who and why")
        seq = self._seq + 1
        cid = f"{self.terminal}:{seq}"
        same = [c for c in self._meter_open(meter) if c.action == action]
        if action in CLOSING:
            by = same[0].id if same else cid
            for c in self._meter_open(meter):
                if c.action == CUTOFF:
                    self._cancel(c, now_ns, f"superseded by {action} {by}", who)
            self._void(meter, (CUTOFF,), now_ns, f"{action} {by} decided for the meter", who)
        if same:
            return None
        note = ""
        if action == CUTOFF:
            held = [c for c in self._meter_open(meter) if c.action in CLOSING]
            if held:
                note = f" (held back: {held[0].action} {held[0].id} open)"
        wire = (action if action in MANUAL_ACTIONS else
                "trip" if action == CUTOFF else self.policy.reconnect_action)
        c = Command(cid, seq, self.terminal, meter, action, wire, cause, who, now_ns,
                    now_ns if cause_ns is None else cause_ns)
        self._seq = seq
        self._open[cid] = c
        if action in CLOSING:
            self._closing_seq[meter] = seq
        self._record(c, None, ISSUED, now_ns, cause + note, who)
        return replace(c)

    def cancel_cutoffs(self, meter: str, cause: str, now_ns: int,
                       who: str = "payment") -> list[Command]:
        """Cancel the meter's cut-offs not yet done (a payment lifted the balance above the
        reconnect threshold): issued, queued, waiting to retry, or sent with no result yet.
        Manual trips stay. Escalated cut-offs' work orders are voided."""
        out = []
        for c in self._meter_open(meter):
            if c.action == CUTOFF:
                self._cancel(c, now_ns, cause, who)
                out.append(replace(c))
        self._void(meter, (CUTOFF,), now_ns, cause, who)
        return out

    # --- sending ------------------------------------------------------------------------------

    def due(self, now_ns: int, terminal_online: bool) -> list[Command]:
        """What must be sent now: reconnections, then manual commands, then cut-offs, each in
        issue order. Nothing for an offline terminal: its commands are queued (audited once)."""
        if not terminal_online:
            for c in self._open.values():
                if c.state in (ISSUED, UNCONFIRMED):
                    self._record(c, c.state, QUEUED, now_ns, "queued: terminal offline", BY_BOOK)
                    c.state = QUEUED
                if (c.action == RECONNECT and c.state == QUEUED and not c.alarmed
                        and now_ns - c.issued_ns >= self.policy.reconnect_waiting_alarm_s * NS):
                    c.alarmed = True
                    self._event(c, WO_RECONNECT_WAITING, now_ns,
                                "reconnection waiting for its terminal to come back online")
            return []
        closing = {c.meter for c in self._open.values() if c.action in CLOSING}
        ready = [c for c in self._open.values()
                 if c.state in (ISSUED, QUEUED, UNCONFIRMED) and c.not_before_ns <= now_ns
                 and not (c.action == CUTOFF and c.meter in closing)]
        ready.sort(key=lambda c: (_PRIORITY.get(c.action, 1), c.seq))
        return [replace(c) for c in ready]

    def on_link_up(self, now_ns: int) -> bool:
        """The terminal is back online: its queued commands are due now, whatever backoff
        they were waiting (a command the collector could not send because the link was down
        goes as soon as the link is back, not a backoff step later). True if any changed."""
        changed = False
        for c in self._open.values():
            if c.state == QUEUED and c.not_before_ns > now_ns:
                c.not_before_ns = now_ns
                changed = True
        return changed

    def on_sent(self, command_id: str, now_ns: int) -> bool:
        """The command is on its way to the collector. False (nothing changes) for an unknown,
        closed, already sent or held-back command."""
        c = self._open.get(self._split(command_id)[0])
        if c is None or c.state not in (ISSUED, QUEUED, UNCONFIRMED):
            return False
        if c.action == CUTOFF and any(o.action in CLOSING for o in self._meter_open(c.meter)):
            return False
        was = c.state
        c.attempts += 1
        c.state, c.sent_ns, c.acked_ns = SENT, now_ns, None
        self._record(c, was, SENT, now_ns, f"attempt {c.attempts} of "
                     f"{self.policy.max_attempts}", BY_WORKER)
        return True

    # --- results ------------------------------------------------------------------------------

    def on_result(self, command_id: str, outcome: str, detail: str, acked_ns: int | None,
                  done_ns: int | None, status_word: int | None, *, sent: bool = True) -> bool:
        """A collector's result (command_id as the collector got it, "<id>/<attempt>", or the
        bare id). `sent` False: the collector never wrote the command (CommandResult.sent_ns is
        None, e.g. "terminal offline: not sent"); it is queued again, the attempt given back.

        Returns False when the result changes nothing: an unknown or closed command, a
        duplicate, an unconfirmed result of an earlier attempt (at-least-once delivery)."""
        if outcome not in (CONFIRMED, REFUSED, UNCONFIRMED):
            raise ValueError(f"unknown outcome {outcome!r}: confirmed, refused or unconfirmed")
        cid, attempt = self._split(command_id)
        c = self._open.get(cid)
        if c is None:
            if sent:
                self._late_result(cid, outcome, done_ns)
            return False
        if c.attempts == 0 or (attempt is not None and not 1 <= attempt <= c.attempts):
            return False
        live = c.state == SENT and (attempt is None or attempt == c.attempts)
        if not live and outcome == UNCONFIRMED:
            return False  # a duplicate, after a timeout, or of an earlier attempt: no news
        ts = done_ns if done_ns is not None else acked_ns if acked_ns is not None else (
            c.sent_ns or c.issued_ns)
        if outcome == UNCONFIRMED and not sent:
            c.attempts -= 1
            c.state, c.not_before_ns = QUEUED, ts + self.policy.backoff_ns(1)
            self._record(c, SENT, QUEUED, ts, f"queued: not sent by the collector ({detail})",
                         BY_COLLECTOR)
            return True
        c.detail, c.status = detail, status_word
        if acked_ns is not None and c.state == SENT and outcome != REFUSED:
            c.acked_ns = acked_ns
            self._record(c, SENT, ACKNOWLEDGED, acked_ns, "9CH from the meter", BY_COLLECTOR)
            c.state = ACKNOWLEDGED
        if outcome == CONFIRMED:
            self._close(c, CONFIRMED, ts, detail or "status word 3 confirms it", BY_COLLECTOR)
            if c.action in CLOSING:
                self._void(c.meter, tuple(CLOSING), ts, f"{c.action} {c.id} confirmed",
                           BY_COLLECTOR)
        elif outcome == REFUSED:
            self._close(c, REFUSED, ts, detail or "refused", BY_COLLECTOR)
            if c.action == RECONNECT and self.policy.escalate_refused_reconnect:
                self._event(c, WO_RECONNECT_REFUSED, ts, detail or "refused")
        else:
            self._failed(c, ts, detail or "unconfirmed", BY_COLLECTOR)
        return True

    def on_collector_result(self, r: CommandResult) -> bool:
        """on_result() from the collectors' CommandResult."""
        return self.on_result(r.command.id, r.outcome, r.detail, r.acked_ns, r.done_ns,
                              r.status, sent=r.sent_ns is not None or r.outcome != UNCONFIRMED)

    def on_timeout(self, now_ns: int) -> list[str]:
        """Sent commands with no result within result_timeout_s count as unconfirmed (the
        collector may have died). Returns their ids."""
        limit = round(self.policy.result_timeout_s * NS)
        out = []
        for c in list(self._open.values()):
            if c.state == SENT and c.sent_ns is not None and now_ns - c.sent_ns >= limit:
                self._failed(c, now_ns, f"no result within {self.policy.result_timeout_s:g} s",
                             BY_TIMEOUT)
                out.append(c.id)
        return out

    # --- what the worker reads ----------------------------------------------------------------

    def drain_audit(self) -> list[AuditRecord]:
        out, self._audit = self._audit, []
        return out

    def drain_events(self) -> list[WorkOrder]:
        out, self._events = self._events, []
        return out

    def get(self, command_id: str) -> Command | None:
        cid = self._split(command_id)[0]
        c = self._open.get(cid) or self._history.get(cid)
        return replace(c) if c is not None else None

    def open_commands(self) -> list[Command]:
        return [replace(c) for c in self._open.values()]

    def open_figures(self) -> tuple[dict[str, int], int, int]:
        """(open commands by state, meters with a closing command open, escalations whose work
        order is out), read in place: what a fleet overview sums over every book."""
        states: dict[str, int] = {}
        closing: set[str] = set()
        for c in self._open.values():
            states[c.state] = states.get(c.state, 0) + 1
            if c.action in CLOSING:
                closing.add(c.meter)
        escalated = sum(1 for c in self._history.values() if c.work_order and c.state == ESCALATED)
        return states, len(closing), escalated

    def history(self) -> list[Command]:
        """Closed commands, oldest first (at most policy.history_kept)."""
        return [replace(c) for c in self._history.values()]

    def reconnect_latencies(self) -> list[tuple[str, str, int]]:
        """(command id, meter, latency ns) of the confirmed kernel reconnects still in the
        history: confirmed time - cause time."""
        return [(c.id, c.meter, self._latency(c)) for c in self._history.values()
                if c.action == RECONNECT and c.state == CONFIRMED]

    def timeliness(self) -> Timeliness:
        p = self.policy
        return Timeliness(p.timeliness_target_s, self._kpi[0], self._kpi[1], self._kpi[2],
                          p.latency_bounds_s, tuple(self._counts))

    # --- persistence --------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact, versioned JSON. Audit records and events not drained are not included."""
        return _json({
            "format": self.FORMAT, "v": self.VERSION, "terminal": self.terminal,
            "seq": self._seq, "open": [_pack(c) for c in self._open.values()],
            "history": [_pack(c) for c in self._history.values()],
            "closing": self._closing_seq, "kpi": self._kpi,
            "bounds": list(self.policy.latency_bounds_s), "counts": self._counts,
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes, policy: CommandPolicy | None = None) -> CommandBook:
        try:
            d = json.loads(data)
        except ValueError as e:
            raise ValueError(f"command book: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != cls.FORMAT:
            raise ValueError("command book: not a meterstream command book")
        if d.get("v") != cls.VERSION:
            raise ValueError(f"command book: version {d.get('v')!r}, this code reads "
                             f"{cls.VERSION}")
        b = cls(d["terminal"], policy)
        b._seq = int(d["seq"])
        b._open = {c.id: c for c in map(_unpack, d["open"])}
        hist = [_unpack(x) for x in d["history"]]
        keep = b.policy.history_kept
        b._history = {c.id: c for c in (hist[len(hist) - keep:] if keep else [])}
        b._closing_seq = {str(k): int(v) for k, v in d["closing"].items()}
        b._kpi = [int(x) for x in d["kpi"]]
        if tuple(d["bounds"]) == b.policy.latency_bounds_s:
            b._counts = [int(x) for x in d["counts"]]
        # (other bounds configured since: the distribution starts again, the shares do not)
        return b

    # --- inside -------------------------------------------------------------------------------

    def _meter_open(self, meter: str) -> list[Command]:
        return [c for c in self._open.values() if c.meter == meter]

    def _split(self, command_id: str) -> tuple[str, int | None]:
        if command_id in self._open or command_id in self._history:
            return command_id, None
        head, sep, tail = command_id.rpartition("/")
        if sep and tail.isdigit():
            return head, int(tail)
        return command_id, None

    def _record(self, c: Command, was: str | None, to: str, ts: int, cause: str,
                who: str) -> None:
        self._audit.append(AuditRecord(ts, c.id, c.terminal, c.meter, c.action, was, to, cause,
                                       who, c.attempts))

    def _event(self, c: Command, kind: str, ts: int, detail: str) -> None:
        if kind in (WO_ESCALATED, WO_RECONNECT_REFUSED):
            c.work_order = True
        self._events.append(WorkOrder(ts, kind, c.id, c.terminal, c.meter, c.action,
                                      c.attempts, detail, c.cause, c.who, c.issued_ns))

    def _void(self, meter: str, actions: Iterable[str], ts: int, why: str, who: str) -> None:
        acts = set(actions)
        for c in self._history.values():
            if c.work_order and c.meter == meter and c.action in acts:
                c.work_order = False
                self._events.append(WorkOrder(ts, WO_VOID, c.id, c.terminal, c.meter,
                                              c.action, c.attempts, why, c.cause, who,
                                              c.issued_ns))

    def _cancel(self, c: Command, ts: int, cause: str, who: str) -> None:
        c.cancelled_in_flight = c.state == SENT
        self._close(c, CANCELLED, ts, cause, who)

    def _failed(self, c: Command, ts: int, detail: str, who: str) -> None:
        """An attempt ended unconfirmed: retry after the backoff, or escalate."""
        c.detail = detail
        self._record(c, c.state, UNCONFIRMED, ts, detail, who)
        c.state = UNCONFIRMED
        if c.attempts >= self.policy.max_attempts:
            self._close(c, ESCALATED, ts, f"{c.attempts} attempts unconfirmed: work order",
                        BY_BOOK)
            self._event(c, WO_ESCALATED, ts, detail)
        else:
            c.not_before_ns = ts + self.policy.backoff_ns(c.attempts)

    def _close(self, c: Command, to: str, ts: int, cause: str, who: str) -> None:
        self._record(c, c.state, to, ts, cause, who)
        c.state, c.done_ns = to, ts
        del self._open[c.id]
        if c.action == RECONNECT and to != CANCELLED:
            if to == CONFIRMED:
                lat = self._latency(c)
                self._kpi[0] += 1
                self._kpi[1] += lat <= self.policy.timeliness_target_s * NS
                bounds = self.policy.latency_bounds_s
                self._counts[sum(1 for b in bounds if lat > b * NS)] += 1
            else:
                self._kpi[2] += 1
        if self.policy.history_kept:
            self._history[c.id] = c
            while len(self._history) > self.policy.history_kept:
                del self._history[next(iter(self._history))]

    @staticmethod
    def _latency(c: Command) -> int:
        return (c.done_ns or c.issued_ns) - c.cause_ns

    def _late_result(self, cid: str, outcome: str, done_ns: int | None) -> None:
        """A result for a closed command changes nothing, except one: a cut-off cancelled
        while the collector had it, that ran anyway (confirmed, or unconfirmed: the relay may
        have opened), with no closing command issued for the meter since. Then the customer
        may be off with a balance that says on: the book issues the reconnect itself. (Not
        for a result the collector never sent: the relay did not move.)"""
        c = self._history.get(cid)
        if (c is None or c.action != CUTOFF or not c.cancelled_in_flight
                or outcome == REFUSED or self._closing_seq.get(c.meter, -1) > c.seq):
            return
        ts = done_ns if done_ns is not None else c.done_ns or c.issued_ns
        self.issue(c.meter, RECONNECT, f"cut-off {c.id} ran after it was cancelled "
                   f"({outcome})", ts, BY_BOOK, cause_ns=c.done_ns)


_FIELDS = tuple(f.name for f in fields(Command))


def _pack(c: Command) -> list[Any]:
    return [getattr(c, n) for n in _FIELDS]


def _unpack(row: list[Any]) -> Command:
    if len(row) != len(_FIELDS):
        raise ValueError(f"command book: a command has {len(row)} fields, expected "
                         f"{len(_FIELDS)}")
    return Command(*row)


__all__ = [
    "ACKNOWLEDGED", "CANCELLED", "CLOSING", "CONFIRMED", "CUTOFF", "ESCALATED", "FINAL_STATES",
    "ISSUED", "KERNEL_ACTIONS", "MANUAL_ACTIONS", "OPEN_STATES", "QUEUED", "RECONNECT",
    "REFUSED", "SENT", "TRANSITIONS", "UNCONFIRMED", "WO_ESCALATED", "WO_RECONNECT_REFUSED",
    "WO_RECONNECT_WAITING", "WO_VOID", "AuditRecord", "Command", "CommandBook",
    "CommandPolicy", "Timeliness", "WorkOrder",
]
