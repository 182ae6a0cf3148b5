"""What a worker does with each message, without Faust: the kernels' state of its terminals.

`WorkerCore` holds the billing fleet (every meter of the archive, one block per terminal), the
collection state (dropouts, KPIs) and one command book per terminal. Each `on_*` method takes
one message's payload, runs the kernels on arrays, and returns the messages to publish
(`Out`: topic, key, value). The Faust app (pipeline/app.py) is a thin shell around it: it keeps
each terminal's `state_of()` in a changelog table and loads it back with `load_state()` when a
partition moves, so a restarted or rebalanced worker recovers every balance exactly.

Updates are idempotent by construction, so at-least-once delivery changes nothing when a
message comes twice: a batch not newer than the terminal's last one is skipped, registers
already billed charge nothing, payment ids are the ledger's keys, command results are matched
by command id and attempt. No float touches money; no I/O here.
"""

from __future__ import annotations

import csv
import json
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from meterstream.collectors.batch import OUTCOME_OK, CollectorEvent, ReadingBatch
from meterstream.collectors.commands import ACTIONS as WIRE_ACTIONS
from meterstream.collectors.commands import Command as WireCommand
from meterstream.collectors.commands import CommandResult
from meterstream.errors import UserError
from meterstream.kernels import billing as K
from meterstream.kernels import collection as C
from meterstream.kernels.billing import Billing
from meterstream.kernels.layout import (
    BLOCK_MAGIC,
    BLOCK_VERSION,
    COLD_DTYPE,
    FIRST_DTYPE,
    HOT_DTYPE,
    PaymentIdConflict,
    from_bytes,
    to_bytes,
)
from meterstream.kernels.tariffs import P_CUTOFF
from meterstream.pipeline import topics
from meterstream.pipeline.commands import (
    CANCELLED,
    CUTOFF,
    ESCALATED,
    MANUAL_ACTIONS,
    QUEUED,
    RECONNECT,
    CommandBook,
    CommandPolicy,
)
from meterstream.pipeline.tariffs import compile_spec, load_tariffs

#: command states the pipeline writes to InfluxDB itself (the collectors' outcomes come with
#: their results): a queued command waits for its terminal, the other two are final.
PIPELINE_OUTCOMES = frozenset({QUEUED, ESCALATED, CANCELLED})

STATE_MAGIC = b"MSW1"
_STATE_HEAD = struct.Struct("<4sqII")  # magic, last batch started_ns, len(block), len(book)
# layout.to_bytes's block header (magic, version, hot size, cold size, 0, meters, payments):
# state_of writes a block without payments itself, byte for byte what to_bytes writes
_BLOCK_HEAD = struct.Struct("<4sHHHHII")


@dataclass(frozen=True)
class Out:
    """One message to publish."""

    topic: str
    key: str
    value: bytes


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _yuan(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    m = abs(micro)
    return f"{sign}{m // 1_000_000}.{m % 1_000_000:06d}"


def _event(kind: str, terminal: str, ts_ns: int, meter: str | None = None,
           **detail: Any) -> Out:
    doc: dict[str, Any] = {"type": "event", "kind": kind, "terminal": terminal, "ts": _iso(ts_ns)}
    if meter is not None:
        doc["meter"] = meter
    doc.update(detail)
    return Out(topics.EVENTS.name, terminal, json.dumps(doc, ensure_ascii=False).encode())


class WorkerCore:
    """Billing, control decisions, commands and collection KPIs of a set of terminals."""

    def __init__(self, archive_path: str | Path, tariffs_path: str | Path, *,
                 policy: CommandPolicy | None = None,
                 now: Callable[[], int] = time.time_ns, cycle_s: float = 60.0,
                 rules: C.CollectionRules | None = None, influx: Any = None) -> None:
        from meterstream.pipeline.replay import Rejected, read_archive

        spec = load_tariffs(tariffs_path)
        self.tariff = compile_spec(spec)
        rejected = Rejected()
        archive = read_archive(Path(archive_path), spec, self.tariff, rejected)
        if rejected.rows:
            file, line, reason = rejected.rows[0]
            raise UserError(f"{reason} ({len(rejected.rows)} bad row(s) in all; the worker "
                            "starts only from a clean archive)", where=f"{file}:{line}")
        self.fleet = archive.fleet
        self.billing = Billing(self.fleet, self.tariff)
        self.policy = policy or CommandPolicy()
        self.now = now
        self.addresses = [f"{int(a):012d}" for a in self.fleet.cold["address"]]
        # the same map as sorted arrays, for a batch's meters at once (np.searchsorted)
        address = self.fleet.cold["address"].astype(np.int64)
        order = np.argsort(address, kind="stable")
        self._addr_sorted = address[order]
        self._addr_slot = order.astype(np.int64)
        # each terminal's command book as state_of last wrote it: (book, bytes); a book is
        # serialised again only after it changed (every change leaves an audit record or a
        # work order to drain, see _dispatch and state_of)
        self._book_bytes: dict[str, tuple[CommandBook, bytes]] = {}
        self.terminal_index = {t: i for i, t in enumerate(self.fleet.terminal_ids)}
        self.books: dict[str, CommandBook] = {}
        # terminals whose book moved since the dashboard last looked (take_changed_books)
        self.changed_books: set[str] = set()
        self.last_batch: dict[str, int] = {}
        self.influx = influx  # an InfluxSink, or None
        self.rules = rules or C.CollectionRules()
        self._collection_state(Path(archive_path), cycle_s)
        self.counters = {"batches": 0, "readings": 0, "replayed_batches": 0, "late_readings": 0,
                         "payments": 0, "duplicate_payments": 0, "results": 0, "stale_results": 0,
                         "unknown": 0, "commands_sent": 0}

    def _collection_state(self, path: Path, cycle_s: float) -> None:
        """Areas, classes and roles per slot (the collection kernels' archive)."""
        area_of: dict[int, str] = {}
        class_of: dict[int, int] = {}
        role_of: dict[int, int] = {}
        classes = {"dedicated": C.CLASS_DEDICATED, "public": C.CLASS_PUBLIC,
                   "lowvoltage": C.CLASS_LOWVOLTAGE}
        with open(path, newline="", encoding="utf-8") as fh:  # read_archive checked it already
            for row in csv.DictReader(fh):
                a = int(row["meter"])
                area_of[a] = row["area"].strip()
                class_of[a] = classes[row["class"].strip()]
                role_of[a] = C.ROLE_SUPPLY if row["role"].strip() == "supply" else C.ROLE_CUSTOMER
        addr = self.fleet.cold["address"].tolist()
        self.areas = sorted(set(area_of.values()))
        area_index = {a: i for i, a in enumerate(self.areas)}
        self.meter_area = np.array([area_index[area_of[a]] for a in addr], np.int32)
        self.meter_class = np.array([class_of[a] for a in addr], np.int8)
        meter_role = np.array([role_of[a] for a in addr], np.int8)
        meter_terminal = self.fleet.cold["terminal"].astype(np.int32)
        starts = self.fleet.terminal_start
        term_area = np.array([self.meter_area[starts[t]] if starts[t] < starts[t + 1] else 0
                              for t in range(self.fleet.n_terminals)], np.int32)
        self.terminal_area = [self.areas[a] for a in term_area.tolist()]
        self.collection = C.new_collection_state(
            term_area, np.full(self.fleet.n_terminals, int(cycle_s * 1e9), np.int64),
            meter_terminal, self.meter_area, self.meter_class, meter_role, len(self.areas),
            start_ns=self.now())
        self.dropouts = C.DropoutRows.for_state(self.collection)
        self.kpis = C.Kpis.for_state(self.collection)

    # --- state per terminal -------------------------------------------------------------------

    def book(self, terminal: str) -> CommandBook:
        b = self.books.get(terminal)
        if b is None:
            b = self.books[terminal] = CommandBook(terminal, self.policy)
        return b

    def slot(self, address: int) -> int:
        """The slot of one meter address, -1 if it is not in the archive."""
        return int(self.slots_of(np.array([address], np.int64))[0])

    def slots_of(self, meters: np.ndarray) -> np.ndarray:
        """The slot of each meter address (int64), -1 for one not in the archive."""
        n = self._addr_sorted.shape[0]
        meters = np.asarray(meters, np.int64)
        if n == 0:
            return np.full(meters.shape[0], -1, np.int64)
        i = np.minimum(np.searchsorted(self._addr_sorted, meters), n - 1)
        return np.where(self._addr_sorted[i] == meters, self._addr_slot[i], -1)

    def _block_bytes(self, t: int) -> bytes:
        """layout.to_bytes(fleet, t), without its per-meter Python loop when no meter of the
        block has a payment (the common case); the same bytes either way."""
        fleet = self.fleet
        sl = fleet.block(t)
        cold = fleet.cold[sl]
        if np.any(cold["pay_head"] >= 0):
            return to_bytes(fleet, t)
        cold = cold.copy()
        cold["terminal"] = 0  # fleet-local (pay_head is -1 already): as to_bytes writes it
        head = _BLOCK_HEAD.pack(BLOCK_MAGIC, BLOCK_VERSION, HOT_DTYPE.itemsize,
                                COLD_DTYPE.itemsize, FIRST_DTYPE.itemsize, sl.stop - sl.start, 0)
        return b"".join([head, fleet.hot[sl].tobytes(), cold.tobytes(),
                         fleet.first[sl].tobytes()])

    def _book_state(self, terminal: str) -> bytes:
        book = self.book(terminal)
        held = self._book_bytes.get(terminal)
        # undrained records: the book changed since it was last serialised
        if held is None or held[0] is not book or book._audit or book._events:
            held = self._book_bytes[terminal] = (book, book.to_bytes())
        return held[1]

    def state_of(self, terminal: str) -> bytes:
        """The terminal's whole state: billing block (with its payment ledger), command book,
        and the last batch applied."""
        t = self.terminal_index[terminal]
        block = self._block_bytes(t)
        book = self._book_state(terminal)
        head = _STATE_HEAD.pack(STATE_MAGIC, self.last_batch.get(terminal, 0), len(block),
                                len(book))
        return b"".join([head, block, book])

    def load_state(self, terminal: str, data: bytes) -> None:
        """Put back what `state_of` wrote (ValueError for a damaged or foreign block)."""
        t = self.terminal_index.get(terminal)
        if t is None:
            raise ValueError(f"terminal {terminal} is not in this worker's archive")
        if len(data) < _STATE_HEAD.size:
            raise ValueError("worker state too short")
        magic, last, n_block, n_book = _STATE_HEAD.unpack_from(data)
        if magic != STATE_MAGIC or len(data) != _STATE_HEAD.size + n_block + n_book:
            raise ValueError("not a worker state record")
        pos = _STATE_HEAD.size
        from_bytes(self.fleet, t, data[pos:pos + n_block])
        self.books[terminal] = CommandBook.from_bytes(data[pos + n_block:], self.policy)
        self._book_bytes.pop(terminal, None)
        self.changed_books.add(terminal)
        self.last_batch[terminal] = last

    # --- messages in --------------------------------------------------------------------------

    def on_batch(self, value: bytes) -> list[Out]:
        """A reading batch from a collector: bill the ok readings, decide, send commands."""
        try:
            batch = ReadingBatch.from_bytes(value)
        except ValueError as exc:
            return [self._dead("readings", value, str(exc))]
        terminal = batch.terminal
        if terminal not in self.terminal_index:
            self.counters["unknown"] += 1
            return [self._dead("readings", value, f"terminal {terminal!r} is not in the archive")]
        # A batch older than the terminal's last is a copy (redelivery, a replayed spool) or
        # was delivered late (overtaken by a newer one). Its readings count only where they
        # are older than a meter's earliest reading (billing.backfill_reading): copies change
        # nothing. Collection figures count each cycle once, in order, so not for it.
        late = batch.started_ns <= self.last_batch.get(terminal, 0)
        t_idx = self.terminal_index[terminal]
        all_slots = self.slots_of(batch.meter)
        if late:
            self.counters["replayed_batches"] += 1
        else:
            self.last_batch[terminal] = batch.started_ns
            self.counters["batches"] += 1
            self.collection.apply_collection_batch(  # success rates, last seen, silent meters
                t_idx, batch.started_ns, all_slots.astype(np.int32), batch.ts,
                batch.outcome.astype(np.int8), batch.registers[:, 0].copy(), self.rules)
        if self.influx is not None:
            from meterstream.pipeline.influx import BatchMeta

            cls = np.where(all_slots >= 0, self.meter_class[np.maximum(all_slots, 0)],
                           C.CLASS_LOWVOLTAGE).astype(np.int8)
            self.influx.write_batch(batch, BatchMeta(self.terminal_area[t_idx], cls))
        ok = (batch.outcome == OUTCOME_OK) & (batch.registers[:, 0] >= 0)
        meters = batch.meter[ok]
        slots = all_slots[ok]
        out: list[Out] = []
        known = slots >= 0
        block = self.fleet.block(t_idx)
        mine = known & (slots >= block.start) & (slots < block.stop)
        for m in meters[~mine].tolist() if not late else ():
            out.append(_event("unknown_meter", terminal, batch.ended_ns, f"{int(m):012d}",
                              detail="not behind this terminal in the archive"))
        regs = batch.registers[ok][mine]
        slots = slots[mine]
        ts = batch.ts[ok][mine]
        if not late:
            self.counters["readings"] += int(slots.shape[0])
        if slots.shape[0]:
            tou = np.where(regs[:, 1:] < 0, 0, regs[:, 1:])  # a 1997 meter: total only
            _charge, outcome, detail, action = self.billing.apply_readings(
                slots, ts, np.ascontiguousarray(regs[:, 0]), *(np.ascontiguousarray(tou[:, k])
                                                               for k in range(4)), late=late)
            if late:
                self.counters["late_readings"] += int((outcome == K.OUT_ACCEPTED).sum())
            hit = np.flatnonzero((outcome == K.OUT_BACKWARDS) | (outcome == K.OUT_IMPLAUSIBLE)
                                 | ((outcome == K.OUT_ACCEPTED) & (detail != 0)) | (action != 0))
            for i in hit.tolist():
                out.extend(self._reading_events(terminal, int(slots[i]), int(ts[i]),
                                                int(outcome[i]), int(detail[i]),
                                                int(action[i])))
            if not late:
                self._write_balances(terminal, slots, batch.ended_ns)
            elif (moved := outcome == K.OUT_ACCEPTED).any():
                # a backfill moved these balances now: a point at the late batch's own time
                # would overwrite the history there (same series, same timestamp)
                self._write_balances(terminal, slots[moved], self.now())
        out.extend(self._dispatch(terminal))
        return out

    def _write_balances(self, terminal: str, slots: np.ndarray, ts_ns: int) -> None:
        """`balance` points of these meters as they are now (InfluxDB, when configured)."""
        if self.influx is None:
            return
        hot = self.fleet.hot
        self.influx.write_balances(terminal, self.terminal_area[self.terminal_index[terminal]],
                                   self.fleet.cold["address"][slots], hot["balance"][slots],
                                   hot["relay_open"][slots], ts_ns, self.meter_class[slots])

    def _reading_events(self, terminal: str, s: int, ts: int, outcome: int, detail: int,
                        act: int) -> list[Out]:
        meter = self.addresses[s]
        out: list[Out] = []
        if outcome == K.OUT_ACCEPTED and detail:
            out.append(_event("rollover", terminal, ts, meter, registers=detail))
        elif outcome == K.OUT_BACKWARDS:
            out.append(_event("backwards", terminal, ts, meter, registers=detail))
        elif outcome == K.OUT_IMPLAUSIBLE:
            out.append(_event("implausible", terminal, ts, meter, d_total_centikwh=detail))
        out.extend(self._decisions(terminal, s, ts, act, cause_ns=ts))
        return out

    def _decisions(self, terminal: str, s: int, ts: int, act: int, *, cause_ns: int,
                   why: str = "") -> list[Out]:
        meter = self.addresses[s]
        balance = int(self.fleet.hot["balance"][s])
        out: list[Out] = []
        for bit, kind in ((K.ACT_ALERT1, "alert1"), (K.ACT_ALERT2, "alert2")):
            if act & bit:
                out.append(_event(kind, terminal, ts, meter, balance=_yuan(balance)))
        if act & K.ACT_HELD:
            reason = K.HOLD_NAMES.get(act >> K.HELD_SHIFT & 7, "?")
            out.append(_event("cutoff_held", terminal, ts, meter, reason=reason,
                              balance=_yuan(balance)))
        book = self.book(terminal)
        now = self.now()
        if act & K.ACT_CUTOFF:
            book.issue(meter, CUTOFF, f"balance {_yuan(balance)} below the cut-off threshold",
                       now, cause_ns=cause_ns)
        if act & K.ACT_RECONNECT:
            book.issue(meter, RECONNECT, why or f"balance {_yuan(balance)} at or above the "
                       "reconnect threshold", now, cause_ns=cause_ns)
        return out

    def on_payment(self, terminal: str, value: bytes) -> list[Out]:
        """A validated payment routed to this terminal (pipeline/payments.py's routed record)."""
        from meterstream.pipeline.payments import Payment

        try:
            p = Payment.from_json(value)
        except ValueError as exc:
            return [self._dead("payments", value, str(exc))]
        s = self.slot(p.meter)
        if s < 0 or self.fleet.terminal_ids[int(self.fleet.cold["terminal"][s])] != terminal:
            return [self._dead("payments", value,
                               f"meter {p.address} is not behind terminal {terminal}")]
        try:
            result, action = self.billing.apply_payments(
                np.array([s], np.int64), np.array([p.ts], np.int64), [p.payment_id],
                np.array([p.amount], np.int64), np.array([K.STATUS_NAMES[p.status]], np.int8))
        except PaymentIdConflict as exc:
            return [self._dead("payments", value, str(exc))]
        self.counters["payments"] += 1
        res, act = int(result[0]), int(action[0])
        meter = p.address
        names = {K.PAY_APPLIED: "payment_applied", K.PAY_DUPLICATE: "duplicate_payment",
                 K.PAY_HOLD: "withholding_pending", K.PAY_FAILED: "payment_failed",
                 K.PAY_IGNORED: "payment_repeated"}
        if res == K.PAY_DUPLICATE:
            self.counters["duplicate_payments"] += 1
        balance = int(self.fleet.hot["balance"][s])
        out = [_event(names.get(res, "payment"), terminal, p.ts, meter, payment_id=p.payment_id,
                      channel=p.channel, amount=_yuan(p.amount), balance=_yuan(balance))]
        if res == K.PAY_APPLIED:
            plan = int(self.fleet.hot["plan"][s])
            if balance >= int(self.tariff.plans[plan, K.P_RECONNECT]):
                # a queued cut-off the payment makes unnecessary is cancelled, never sent
                self.book(terminal).cancel_cutoffs(meter, f"payment {p.payment_id} lifted "
                                                   "the balance", self.now())
        if res == K.PAY_APPLIED:
            self._write_balances(terminal, np.array([s], np.int64), p.ts)
        out.extend(self._decisions(terminal, s, p.ts, act, cause_ns=p.ts,
                                   why=f"payment {p.payment_id}"))
        out.extend(self._dispatch(terminal))
        return out

    def on_link(self, terminal: str, event: dict[str, Any]) -> list[Out]:
        """A collector's link event: the terminal's online flag (cut-offs wait while offline)."""
        t = self.terminal_index.get(terminal)
        if t is None:
            return []
        kind = event.get("kind")
        now = self.now()
        if self.influx is not None and isinstance(kind, str):
            self.influx.write_link(CollectorEvent(kind, terminal, now, str(event.get("detail", ""))),
                                   self.terminal_area[t])
        if kind == "up":
            self.collection.apply_link_event(t, C.LINK_UP, now)
            self.fleet.terminal_online[t] = 1
            if terminal in self.books and self.books[terminal].on_link_up(now):
                self._book_bytes.pop(terminal, None)  # changed: serialised again by state_of
            return self._dispatch(terminal)
        if kind == "down":
            self.collection.apply_link_event(t, C.LINK_DOWN, now)
            self.fleet.terminal_online[t] = 0
        elif kind in ("heartbeat_missed", "registration"):
            self.collection.apply_link_event(t, C.LINK_HEARTBEAT, now)
        return []

    def on_result(self, terminal: str, result: dict[str, Any]) -> list[Out]:
        """A collector's CommandResult (its JSON)."""
        if terminal not in self.terminal_index:
            return []
        self.counters["results"] += 1

        def ns(text: str | None) -> int | None:
            if not text:
                return None
            return int(datetime.fromisoformat(text).timestamp() * 1e9)

        changed = self.book(terminal).on_result(
            result["id"], result["outcome"], result.get("detail", ""), ns(result.get("acknowledged")),
            ns(result.get("done")),
            int(result["status"]["word"], 16) if result.get("status") else None,
            sent=result.get("sent") is not None or result["outcome"] != "unconfirmed")
        if not changed:
            self.counters["stale_results"] += 1
            return self._dispatch(terminal)
        if self.influx is not None and result.get("action") in WIRE_ACTIONS:
            self.influx.write_command(CommandResult(
                WireCommand(str(result.get("meter", "")), result["action"], id=result["id"]),
                terminal, result["outcome"], result.get("detail", ""), ns(result.get("sent")),
                ns(result.get("acknowledged")), ns(result.get("done")),
                int(result["status"]["word"], 16) if result.get("status") else None,
                int(result.get("attempts", 0)), int(result.get("readbacks", 0))))
        if result["outcome"] == "confirmed" and result.get("status"):
            c = self.book(terminal).get(result["id"])
            if c is not None and c.who != "kernel":
                # An operator's command moved the relay: billing follows the meter's status
                # word (bit4), so that it decides on the relay as it is. The kernel's own
                # commands need nothing: it set relay_open when it decided them.
                s = self.slot(int(c.meter))
                if s >= 0:
                    self.fleet.hot["relay_open"][s] = (int(result["status"]["word"], 16) >> 4) & 1
        return self._dispatch(terminal)

    def manual(self, terminal: str, meter: str, action: str, who: str, why: str) -> list[Out]:
        """An operator's command (dashboard / API): through the same book and audit trail."""
        if action not in MANUAL_ACTIONS:
            raise UserError(f"unknown action {action!r}: one of {', '.join(MANUAL_ACTIONS)}")
        self.book(terminal).issue(meter, action, why, self.now(), who)
        return self._dispatch(terminal)

    def tick(self, terminals: Iterable[str]) -> list[Out]:
        """Timers: commands without a result in time count as unconfirmed; retries fall due."""
        now = self.now()
        out: list[Out] = []
        for terminal in terminals:
            if terminal in self.books:
                self.books[terminal].on_timeout(now)
                out.extend(self._dispatch(terminal))
        return out

    def detect_dropouts(self, owned: Iterable[str]) -> list[Out]:
        """Terminals that missed k cycles or whose link is down, as alarms: one per terminal,
        or one per area when many of an area drop together (the kernels' rule). Terminals this
        worker does not hold are kept fresh, so only its own can drop."""
        now = self.now()
        mine = np.zeros(self.fleet.n_terminals, bool)
        for tid in owned:
            i = self.terminal_index.get(tid)
            if i is not None:
                mine[i] = True
        st = self.collection
        st.term_last_cycle_ns[~mine] = now
        st.term_link_up[~mine] = 1
        st.detect_dropouts(now, self.rules, self.dropouts)
        out: list[Out] = []
        for t, ev in self.dropouts.terminal_rows():
            terminal = self.fleet.terminal_ids[t]
            if ev == C.EV_OFFLINE:
                self.fleet.terminal_online[t] = 0
            elif ev in (C.EV_ONLINE, C.EV_CLEARED):
                self.fleet.terminal_online[t] = int(st.term_link_up[t])
            kind = {C.EV_ALARM: "terminal_offline", C.EV_CLEARED: "terminal_back"}.get(ev)
            if kind:
                out.append(_event(kind, terminal, now, area=self.terminal_area[t],
                                  missed_cycles=int(st.term_missed[t])))
        for a, ev in self.dropouts.area_rows():
            kind = "area_dropout" if ev == C.AREA_RAISED else "area_dropout_cleared"
            doc = _event(kind, self.areas[a], now, terminals=int(st.area_terminals[a]),
                         offline=int(st.area_offline[a]))
            out.append(doc)
        return out

    def kpi_snapshot(self) -> dict[str, Any]:
        """The live KPIs (integers: basis points, counts) of today, local time."""
        now = self.now()
        st, k = self.collection, self.kpis
        day = st.day_of(now)
        plans = self.tariff.plans
        plan = self.fleet.hot["plan"].astype(np.int64)
        C.compute_kpis(st, k, day=day, loss_first_day=day - 1, loss_last_day=day,
                       loss_max_age_ns=2 * 3600 * 10**9, balance=self.fleet.hot["balance"],
                       cutoff_threshold=plans[plan, P_CUTOFF],
                       relay=self.fleet.hot["relay_open"].astype(np.int8))
        names = ("dedicated", "public", "lowvoltage")
        snap: dict[str, Any] = {
            "ts": _iso(now), "terminals": k.terminals, "online": k.online,
            "success_bp_by_class": {names[c]: int(k.class_bp[c]) if k.class_attempted[c] else None
                                    for c in range(3)},
            "reads_by_class": {names[c]: [int(k.class_ok[c]), int(k.class_attempted[c])]
                               for c in range(3)},
            "areas": {self.areas[a]: {
                "success_bp": int(k.area_bp[a]) if k.area_attempted[a] else None,
                "terminals": int(k.area_terminals[a]), "online": int(k.area_online[a]),
                "line_loss_bp": int(k.loss_bp[a]) if k.loss_valid[a] else None,
                "customers": int(k.customers[a]), "in_arrears": int(k.in_arrears[a]),
                "cut_off": int(k.cut_off[a])} for a in range(len(self.areas))},
            "customers": int(k.customers.sum()), "in_arrears": int(k.in_arrears.sum()),
            "cut_off": int(k.cut_off.sum()),
        }
        timely = [b.timeliness() for b in self.books.values()]
        confirmed = sum(t.confirmed for t in timely)
        within = sum(t.within_target for t in timely)
        snap["reconnections_confirmed"] = confirmed
        snap["reconnection_timeliness_bp"] = (within * 10_000 // confirmed) if confirmed else None
        if self.influx is not None:
            ts = now
            self.influx.write_kpi(ts, {"terminals": k.terminals, "online": k.online,
                                       "customers": snap["customers"],
                                       "in_arrears": snap["in_arrears"],
                                       "cut_off": snap["cut_off"],
                                       "reconnection_timeliness_bp":
                                           snap["reconnection_timeliness_bp"]})
            for c in range(3):
                if k.class_attempted[c]:
                    self.influx.write_kpi(ts, {"success_rate_bp": int(k.class_bp[c])},
                                          meter_class=c)
            for a in range(len(self.areas)):
                vals = {"online": int(k.area_online[a]), "terminals": int(k.area_terminals[a]),
                        "success_rate_bp": int(k.area_bp[a]) if k.area_attempted[a] else None,
                        "line_loss_bp": int(k.loss_bp[a]) if k.loss_valid[a] else None}
                self.influx.write_kpi(ts, vals, area=self.areas[a])
        return snap

    # --- messages out -------------------------------------------------------------------------

    def _dispatch(self, terminal: str) -> list[Out]:
        """Commands due now, then the book's audit records and work orders."""
        book = self.book(terminal)
        now = self.now()
        online = bool(self.fleet.terminal_online[self.terminal_index[terminal]])
        out: list[Out] = []
        for c in book.due(now, online):
            wire = c.to_wire()
            book.on_sent(c.id, now)
            self.counters["commands_sent"] += 1
            doc = {"id": wire.id, "terminal": terminal, "meter": wire.meter,
                   "action": wire.action, "reason": wire.reason, "who": c.who}
            out.append(Out(topics.COMMANDS.name, terminal, json.dumps(doc).encode()))
        audit, work_orders = book.drain_audit(), book.drain_events()
        if audit or work_orders:  # every change of a book leaves an audit record or an event
            self._book_bytes.pop(terminal, None)  # changed: serialised again by state_of
            self.changed_books.add(terminal)
        for rec in audit:
            out.append(Out(topics.EVENTS.name, terminal, rec.to_json().encode()))
            if self.influx is not None and rec.to_state in PIPELINE_OUTCOMES:
                closed = book.get(rec.command_id)
                if closed is not None:  # the pipeline's own states; the collector's: results
                    self.influx.write_command(CommandResult(
                        WireCommand(closed.meter, closed.wire_action, id=closed.id), terminal,
                        detail=rec.cause, attempts=closed.attempts), outcome=rec.to_state,
                        ts_ns=rec.ts_ns)
        for wo in work_orders:
            out.append(Out(topics.EVENTS.name, terminal, wo.to_json().encode()))
        return out

    def _dead(self, source: str, raw: bytes, reason: str) -> Out:
        doc = {"reason": reason, "source": source, "ts": _iso(self.now()),
               "raw": raw.decode("utf-8", "replace")[:4096]}
        return Out(topics.DEAD_LETTER.name, source, json.dumps(doc).encode())

    # --- views for the API --------------------------------------------------------------------

    def meter_view(self, address: str) -> dict[str, Any] | None:
        s = self.slot(int(address)) if address.isdigit() else -1
        if s < 0:
            return None
        hot, cold = self.fleet.hot[s], self.fleet.cold[s]
        terminal = self.fleet.terminal_ids[int(cold["terminal"])]
        return {"meter": address, "terminal": terminal, "balance": _yuan(int(hot["balance"])),
                "charged": _yuan(int(hot["charged"])), "paid": _yuan(int(cold["paid"])),
                "relay": "open" if hot["relay_open"] else "closed",
                "registers_centikwh": [int(hot[k]) for k in ("base_total", "base_t1", "base_t2",
                                                              "base_t3", "base_t4")],
                "last_reading": _iso(int(hot["last_ts"])) if hot["has_baseline"] else None,
                "commands": [c.to_dict() for c in self.book(terminal).open_commands()
                             if c.meter == address]}

    # --- read-only queries for the dashboard (pipeline/api.py, docs/dashboard.md) -----------

    def take_changed_books(self) -> set[str]:
        """The terminals whose command book changed since the last call (for views that keep
        per-book figures and recompute only what moved)."""
        out, self.changed_books = self.changed_books, set()
        return out

    def kpi_view(self) -> dict[str, Any]:
        """kpi_snapshot's figures as of now, without writing them to InfluxDB (the dashboard
        asks every second; the sink gets the worker's kpi_s timer only). Synchronous: nothing
        else runs while the sink is set aside."""
        influx, self.influx = self.influx, None
        try:
            return self.kpi_snapshot()
        finally:
            self.influx = influx

    def meter_collection(self, s: int) -> dict[str, Any]:
        """Collection figures of one slot: last ok read, failed reads since, flags."""
        st = self.collection
        read_ns = int(st.meter_read_ns[s])
        return {"last_read": _iso(read_ns) if read_ns > 0 else None,
                "fail_streak": int(st.meter_fail_streak[s]), "flags": int(st.meter_flags[s]),
                "area": self.areas[int(self.meter_area[s])],
                "class": ("dedicated", "public", "lowvoltage")[int(self.meter_class[s])]}

    def reconnection_stats(self) -> dict[str, Any]:
        """复电及时率 over every book: confirmed within target of all ended, and the latency
        distribution of the confirmed ones (counts per bound of policy.latency_bounds_s)."""
        p = self.policy
        counts = [0] * (len(p.latency_bounds_s) + 1)
        confirmed = within = failed = 0
        for b in self.books.values():
            t = b.timeliness()
            confirmed, within, failed = (confirmed + t.confirmed, within + t.within_target,
                                         failed + t.failed)
            if t.bounds_s == p.latency_bounds_s:
                counts = [x + y for x, y in zip(counts, t.counts)]
        ended = confirmed + failed

        def num(x: float) -> float | int:  # 300.0 -> 300: the same text in JSON and on a page
            return int(x) if float(x).is_integer() else x

        return {"target_s": num(p.timeliness_target_s), "confirmed": confirmed,
                "within_target": within, "failed": failed,
                "timely_bp": within * 10_000 // ended if ended else None,
                "bounds_s": [num(b) for b in p.latency_bounds_s], "counts": counts}

    def open_alarms(self) -> list[dict[str, Any]]:
        """Alarms standing now: mass dropouts per area, offline terminals (the kernels'
        state), and open escalations are the API's (work orders)."""
        st = self.collection
        out: list[dict[str, Any]] = []
        for a in np.flatnonzero(st.area_alarm).tolist():
            out.append({"kind": "area_dropout", "area": self.areas[a],
                        "since": _iso(int(st.area_alarm_since_ns[a])),
                        "offline": int(st.area_offline[a]),
                        "terminals": int(st.area_terminals[a])})
        for t in np.flatnonzero(st.term_alarm == C.ALARM_RAISED).tolist():  # covered: by area
            out.append({"kind": "terminal_offline", "terminal": self.fleet.terminal_ids[t],
                        "area": self.terminal_area[t],
                        "since": _iso(int(st.term_offline_since_ns[t])),
                        "missed_cycles": int(st.term_missed[t])})
        return out

    def balances_micro(self) -> int:
        """Sum of balances, micro-yuan (the money invariant's right-hand side)."""
        return int(self.fleet.hot["balance"].sum())


__all__ = ["Out", "WorkerCore"]
