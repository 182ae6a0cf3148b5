"""The command book (pipeline/commands.py): every transition and rule, one test each, then a
hypothesis property test over random interleavings of decisions, sends, results (duplicated,
out of order, of earlier attempts), timeouts, payments, outages and restores from bytes."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterstream.collectors.commands import Command as WireCommand
from meterstream.collectors.commands import CommandResult
from meterstream.pipeline.commands import (
    ACKNOWLEDGED,
    CANCELLED,
    CONFIRMED,
    ESCALATED,
    FINAL_STATES,
    ISSUED,
    QUEUED,
    REFUSED,
    SENT,
    TRANSITIONS,
    UNCONFIRMED,
    WO_ESCALATED,
    WO_RECONNECT_REFUSED,
    WO_RECONNECT_WAITING,
    WO_VOID,
    AuditRecord,
    Command,
    CommandBook,
    CommandPolicy,
)

S = 1_000_000_000
T0 = 1_767_225_600 * S  # 2026-01-01 00:00 UTC
M1, M2 = "330010010001", "330010010002"


def book(**policy: Any) -> CommandBook:
    return CommandBook("C0001", CommandPolicy(**policy))


def path(records: list[AuditRecord], cid: str) -> list[str | None]:
    """from_state of the first record, then every to_state, for one command."""
    mine = [r for r in records if r.command_id == cid]
    return [mine[0].from_state, *(r.to_state for r in mine)] if mine else []


def send_all(b: CommandBook, now: int) -> list[Command]:
    out = b.due(now, True)
    for c in out:
        assert b.on_sent(c.id, now)
    return out


# --- issue ------------------------------------------------------------------------------------

def test_issue_makes_an_issued_command_with_its_audit_record() -> None:
    b = book()
    c = b.issue(M1, "cutoff", "balance below cut-off", T0)
    assert c is not None and c.state == ISSUED and c.id == "C0001:1"
    assert c.wire_action == "trip" and c.who == "kernel" and c.cause_ns == T0
    [r] = b.drain_audit()
    assert (r.from_state, r.to_state, r.meter, r.action, r.cause, r.who, r.ts_ns) == (
        None, ISSUED, M1, "cutoff", "balance below cut-off", "kernel", T0)
    assert b.drain_audit() == []


def test_a_second_identical_open_command_is_none_and_leaves_no_audit() -> None:
    b = book()
    assert b.issue(M1, "cutoff", "low", T0) is not None
    b.drain_audit()
    assert b.issue(M1, "cutoff", "low again", T0 + S) is None
    assert b.drain_audit() == []
    assert b.issue(M2, "cutoff", "low", T0) is not None  # another meter is another command
    assert b.issue(M1, "trip", "tamper", T0, "op.li") is not None  # another action too


def test_a_closed_command_does_not_block_a_new_identical_one() -> None:
    b = book()
    c = b.issue(M1, "trip", "tamper", T0, "op.li")
    assert c is not None
    send_all(b, T0)
    assert b.on_result(c.id, CONFIRMED, "ok", T0 + S, T0 + 2 * S, 0x0010)
    assert b.issue(M1, "trip", "tamper again", T0 + 3 * S, "op.li") is not None


def test_manual_commands_need_who_and_why_and_actions_are_checked() -> None:
    b = book()
    with pytest.raises(ValueError, match="who and why"):
        b.issue(M1, "trip", "", T0, "op.li")
    with pytest.raises(ValueError, match="who and why"):
        b.issue(M1, "keep-power-on", "hospital", T0, " ")
    with pytest.raises(ValueError, match="unknown action 'open'"):
        b.issue(M1, "open", "x", T0)
    for a in ("trip", "close", "allow-close", "keep-power-on", "keep-power-off"):
        c = b.issue(M2, a, "asked by the customer", T0, "op.wang")
        assert c is not None and c.wire_action == a and c.who == "op.wang"


def test_reconnect_wire_action_follows_the_policy() -> None:
    c = book(reconnect_action="allow-close").issue(M1, "reconnect", "paid", T0)
    assert c is not None and c.wire_action == "allow-close"
    with pytest.raises(ValueError, match="reconnect_action"):
        CommandPolicy(reconnect_action="trip")


@pytest.mark.parametrize("how", ["issued", "queued", "sent", "unconfirmed"])
def test_a_reconnect_cancels_the_open_cutoff_of_its_meter(how: str) -> None:
    b = book()
    cut = b.issue(M1, "cutoff", "low", T0)
    other = b.issue(M2, "cutoff", "low", T0)
    assert cut is not None and other is not None
    if how == "queued":
        b.due(T0, False)
    elif how in ("sent", "unconfirmed"):
        send_all(b, T0)
        if how == "unconfirmed":
            b.on_result(cut.id + "/1", UNCONFIRMED, "no ack", None, T0 + S, None)
            b.on_result(other.id + "/1", UNCONFIRMED, "no ack", None, T0 + S, None)
    b.drain_audit()
    rec = b.issue(M1, "reconnect", "paid", T0 + 5 * S, cause_ns=T0 + 4 * S)
    assert rec is not None
    got = b.get(cut.id)
    assert got is not None and got.state == CANCELLED
    assert got.cancelled_in_flight is (how == "sent")
    first, second = b.drain_audit()
    assert (first.command_id, first.to_state) == (cut.id, CANCELLED)
    assert first.cause.startswith("superseded by reconnect")
    assert (second.command_id, second.to_state) == (rec.id, ISSUED)
    assert b.get(other.id).state != CANCELLED  # type: ignore[union-attr]
    assert next(c.id for c in b.due(T0 + 10**6 * S, True)) == rec.id


def test_a_manual_close_supersedes_a_cutoff_too_but_a_reconnect_never_cancels_a_trip() -> None:
    b = book()
    cut = b.issue(M1, "cutoff", "low", T0)
    trip = b.issue(M2, "trip", "tamper", T0, "op.li")
    assert cut is not None and trip is not None
    b.issue(M1, "close", "customer called", T0, "op.wang")
    b.issue(M2, "reconnect", "paid", T0)
    assert b.get(cut.id).state == CANCELLED  # type: ignore[union-attr]
    assert b.get(trip.id).state == ISSUED  # type: ignore[union-attr]


def test_a_cutoff_while_a_reconnect_is_open_is_held_back_until_the_reconnect_ends() -> None:
    b = book()
    rec = b.issue(M1, "reconnect", "paid", T0)
    assert rec is not None
    b.drain_audit()
    cut = b.issue(M1, "cutoff", "balance fell again", T0 + S)
    assert cut is not None and cut.state == ISSUED
    [r] = b.drain_audit()
    assert "held back: reconnect C0001:1 open" in r.cause
    assert [c.id for c in b.due(T0 + S, True)] == [rec.id]
    assert not b.on_sent(cut.id, T0 + S)  # not even when asked
    assert b.on_sent(rec.id, T0 + S)
    assert b.due(T0 + 2 * S, True) == []
    assert b.on_result(rec.id, CONFIRMED, "ok", T0 + 2 * S, T0 + 3 * S, 0)
    assert [c.id for c in b.due(T0 + 3 * S, True)] == [cut.id]
    assert b.get(rec.id).state == CONFIRMED  # type: ignore[union-attr]


def test_a_held_back_cutoff_is_cancelled_by_a_newer_reconnect_decision() -> None:
    b = book()
    rec = b.issue(M1, "reconnect", "paid", T0)
    cut = b.issue(M1, "cutoff", "balance fell again", T0 + S)
    assert rec is not None and cut is not None
    assert b.issue(M1, "reconnect", "paid again", T0 + 2 * S) is None  # still the same one
    got = b.get(cut.id)
    assert got is not None and got.state == CANCELLED
    assert path(b.drain_audit(), cut.id) == [None, ISSUED, CANCELLED]


def test_a_reconnect_is_never_cancelled_by_a_cutoff_or_a_payment() -> None:
    b = book()
    rec = b.issue(M1, "reconnect", "paid", T0)
    assert rec is not None
    b.issue(M1, "cutoff", "low", T0 + S)
    assert b.cancel_cutoffs(M1, "payment lifted the balance", T0 + 2 * S)
    assert b.get(rec.id).state == ISSUED  # type: ignore[union-attr]


# --- due --------------------------------------------------------------------------------------

def test_due_sends_reconnects_then_manual_then_cutoffs_in_issue_order() -> None:
    b = book()
    b.issue(M1, "cutoff", "low", T0)
    b.issue("330010010003", "keep-power-on", "hospital", T0, "op.li")
    b.issue(M2, "reconnect", "paid", T0)
    b.issue("330010010004", "cutoff", "low", T0)
    b.issue("330010010005", "reconnect", "paid", T0)
    got = [(c.action, c.meter[-1]) for c in b.due(T0, True)]
    assert got == [("reconnect", "2"), ("reconnect", "5"), ("keep-power-on", "3"),
                   ("cutoff", "1"), ("cutoff", "4")]


def test_nothing_is_due_for_an_offline_terminal_and_queued_is_audited_once() -> None:
    b = book()
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    b.drain_audit()
    assert b.due(T0, False) == []
    assert b.due(T0 + S, False) == []
    [r] = b.drain_audit()
    assert (r.from_state, r.to_state, r.cause, r.who) == (ISSUED, QUEUED,
                                                          "queued: terminal offline", "book")
    assert b.get(c.id).state == QUEUED  # type: ignore[union-attr]
    assert [x.id for x in b.due(T0 + 99 * S, True)] == [c.id]  # back online, never lost
    assert b.on_sent(c.id, T0 + 99 * S)
    assert [r.from_state for r in b.drain_audit()] == [QUEUED]


def test_a_reconnect_queued_too_long_raises_one_event_and_stays_queued() -> None:
    b = book(reconnect_waiting_alarm_s=600)
    c = b.issue(M1, "reconnect", "paid", T0)
    assert c is not None
    b.due(T0 + 599 * S, False)
    assert b.drain_events() == []
    b.due(T0 + 600 * S, False)
    b.due(T0 + 900 * S, False)
    [e] = b.drain_events()
    assert (e.kind, e.command_id) == (WO_RECONNECT_WAITING, c.id)
    assert b.get(c.id).state == QUEUED  # type: ignore[union-attr]


def test_to_wire_is_the_collectors_command_with_the_attempt_in_its_id() -> None:
    b = book()
    b.issue(M1, "cutoff", "low", T0)
    [c] = b.due(T0, True)
    w = c.to_wire()
    assert isinstance(w, WireCommand)
    assert (w.meter, w.action, w.id, w.reason) == (M1, "trip", "C0001:1/1", "kernel: low")


# --- sent and results -------------------------------------------------------------------------

def test_on_sent_moves_to_sent_once_and_refuses_unknown_or_closed_commands() -> None:
    b = book()
    c = b.issue(M1, "trip", "tamper", T0, "op.li")
    assert c is not None
    b.drain_audit()
    assert b.on_sent(c.id, T0)
    assert not b.on_sent(c.id, T0)  # already sent
    assert not b.on_sent("C0001:99", T0)
    [r] = b.drain_audit()
    assert (r.from_state, r.to_state, r.attempt, r.who) == (ISSUED, SENT, 1, "worker")
    got = b.get(c.id)
    assert got is not None and (got.state, got.attempts, got.sent_ns) == (SENT, 1, T0)


def test_confirmed_passes_through_acknowledged_and_is_final() -> None:
    b = book()
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    send_all(b, T0)
    b.drain_audit()
    assert b.on_result(f"{c.id}/1", CONFIRMED, "status word 3 confirms it", T0 + S, T0 + 3 * S,
                       0x0010)
    a, f = b.drain_audit()
    assert (a.from_state, a.to_state, a.ts_ns, a.who) == (SENT, ACKNOWLEDGED, T0 + S,
                                                          "collector")
    assert (f.from_state, f.to_state, f.ts_ns) == (ACKNOWLEDGED, CONFIRMED, T0 + 3 * S)
    got = b.get(c.id)
    assert got is not None and got.final and got.status == 0x0010 and got.done_ns == T0 + 3 * S
    assert b.open_commands() == [] and [h.id for h in b.history()] == [c.id]
    # replays change nothing
    assert not b.on_result(f"{c.id}/1", CONFIRMED, "again", T0 + S, T0 + 3 * S, 0x0010)
    assert not b.on_result(f"{c.id}/1", UNCONFIRMED, "late", None, T0 + 9 * S, None)
    assert not b.on_result("C0001:77/1", CONFIRMED, "who?", None, T0, None)
    assert b.drain_audit() == []


def test_refused_is_final_with_the_meters_reason_and_a_refused_reconnect_is_a_work_order() -> None:
    b = book()
    cut = b.issue(M1, "cutoff", "low", T0)
    rec = b.issue(M2, "reconnect", "paid", T0)
    assert cut is not None and rec is not None
    send_all(b, T0)
    b.drain_audit()
    assert b.on_result(cut.id, REFUSED, "refused by the meter: keep-power in force", None,
                       T0 + S, None)
    assert b.on_result(rec.id, REFUSED, "refused by the meter: password error", None, T0 + S,
                       None)
    recs = b.drain_audit()
    assert [(r.from_state, r.to_state) for r in recs] == [(SENT, REFUSED)] * 2
    assert recs[0].cause == "refused by the meter: keep-power in force"
    [e] = b.drain_events()
    assert (e.kind, e.command_id, e.detail) == (WO_RECONNECT_REFUSED, rec.id,
                                                "refused by the meter: password error")
    assert b.timeliness().failed == 1


def test_unconfirmed_retries_with_capped_backoff_then_escalates() -> None:
    b = book(max_attempts=5, backoff_base_s=30, backoff_cap_s=100)
    c = b.issue(M1, "reconnect", "paid", T0)
    assert c is not None
    now = T0
    waits = []
    for attempt in range(1, 6):
        [d] = b.due(now, True)
        assert b.on_sent(d.id, now)
        now += 10 * S
        assert b.on_result(d.to_wire().id, UNCONFIRMED, "relay did not move", now - 5 * S, now,
                           0x0010)
        got = b.get(c.id)
        assert got is not None
        if attempt < 5:
            assert got.state == UNCONFIRMED
            assert b.due(got.not_before_ns - 1, True) == []
            waits.append((got.not_before_ns - now) // S)
            now = got.not_before_ns
    assert waits == [30, 60, 100, 100]
    got = b.get(c.id)
    assert got is not None and got.state == ESCALATED and got.attempts == 5
    p = path(b.drain_audit(), c.id)
    assert p == [None, ISSUED] + [SENT, ACKNOWLEDGED, UNCONFIRMED] * 5 + [ESCALATED]
    [e] = b.drain_events()
    assert (e.kind, e.attempts, e.detail) == (WO_ESCALATED, 5, "relay did not move")
    assert b.open_figures() == ({}, 0, 1)  # what the overview sums: its work order is out
    r = b.issue(M2, "reconnect", "payment P9", now)
    assert r is not None
    assert b.open_figures() == ({ISSUED: 1}, 1, 1)
    assert b.timeliness().failed == 1


def test_a_result_not_sent_by_the_collector_queues_the_command_and_gives_the_attempt_back() -> None:
    b = book(max_attempts=1)
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    send_all(b, T0)
    assert b.on_result(c.id + "/1", UNCONFIRMED, "terminal offline: not sent", None, T0 + S,
                       None, sent=False)
    got = b.get(c.id)
    assert got is not None and (got.state, got.attempts) == (QUEUED, 0)  # not escalated
    assert b.due(T0 + 30 * S, True) == []  # waits the first backoff step before trying again
    assert [x.id for x in b.due(T0 + 31 * S, True)] == [c.id]
    r = CommandResult(WireCommand(M1, "trip", id=c.id + "/1"), "C0001",
                      outcome=UNCONFIRMED, detail="terminal offline: not sent", done_ns=T0 + S)
    assert not b.on_collector_result(r)  # a replay of it: nothing to do


def test_a_command_not_sent_goes_as_soon_as_its_terminal_is_back_up() -> None:
    b = book()
    c = b.issue(M1, "reconnect", "payment P1", T0)
    assert c is not None
    send_all(b, T0)
    assert b.on_result(c.id + "/1", UNCONFIRMED, "terminal offline: not sent", None, T0 + S,
                       None, sent=False)
    assert b.due(T0 + 2 * S, False) == []  # the worker sees the link down
    assert b.due(T0 + 3 * S, True) == []  # a lagging view: still the backoff step
    assert b.on_link_up(T0 + 4 * S)  # the link is back: due at once
    assert [x.id for x in b.due(T0 + 4 * S, True)] == [c.id]
    assert not b.on_link_up(T0 + 5 * S)  # nothing more to release


def test_an_unconfirmed_result_of_an_earlier_attempt_is_ignored_but_a_final_one_counts() -> None:
    b = book()
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    send_all(b, T0)
    assert b.on_timeout(T0 + 300 * S) == [c.id]
    send_all(b, T0 + 330 * S)  # attempt 2
    assert not b.on_result(c.id + "/1", UNCONFIRMED, "late and failed", None, T0 + 331 * S,
                           None)
    assert not b.on_result(c.id + "/3", CONFIRMED, "from the future", None, T0, None)
    assert b.get(c.id).state == SENT  # type: ignore[union-attr]
    assert b.on_result(c.id + "/1", CONFIRMED, "late, but the relay is open", None,
                       T0 + 332 * S, 0x0010)
    assert b.get(c.id).state == CONFIRMED  # type: ignore[union-attr]


def test_a_late_confirmation_after_a_timeout_is_accepted() -> None:
    b = book()
    c = b.issue(M1, "reconnect", "paid", T0)
    assert c is not None
    send_all(b, T0)
    b.on_timeout(T0 + 300 * S)
    assert b.get(c.id).state == UNCONFIRMED  # type: ignore[union-attr]
    assert b.on_result(c.id, CONFIRMED, "ok", T0 + 2 * S, T0 + 301 * S, 0)
    p = path(b.drain_audit(), c.id)
    assert p == [None, ISSUED, SENT, UNCONFIRMED, CONFIRMED]


def test_on_timeout_counts_a_silent_collector_as_unconfirmed() -> None:
    b = book(result_timeout_s=120, max_attempts=2)
    c = b.issue(M1, "trip", "tamper", T0, "op.li")
    assert c is not None
    send_all(b, T0)
    assert b.on_timeout(T0 + 119 * S) == []
    assert b.on_timeout(T0 + 120 * S) == [c.id]
    assert b.on_timeout(T0 + 500 * S) == []  # once
    r = next(x for x in b.drain_audit() if x.to_state == UNCONFIRMED)
    assert (r.who, r.cause) == ("timeout", "no result within 120 s")
    send_all(b, T0 + 150 * S)
    b.on_timeout(T0 + 300 * S)
    assert b.get(c.id).state == ESCALATED  # type: ignore[union-attr]


# --- payments ---------------------------------------------------------------------------------

def test_cancel_cutoffs_cancels_every_cutoff_not_yet_done_but_no_trip() -> None:
    b = book()
    issued = b.issue(M1, "cutoff", "low", T0)
    trip = b.issue(M1, "trip", "tamper", T0, "op.li")
    assert issued is not None and trip is not None
    got = b.cancel_cutoffs(M1, "payment P1 lifted the balance", T0 + S)
    assert [c.id for c in got] == [issued.id] and got[0].state == CANCELLED
    assert b.get(trip.id).state == ISSUED  # type: ignore[union-attr]
    r = next(x for x in b.drain_audit() if x.to_state == CANCELLED)
    assert (r.cause, r.who) == ("payment P1 lifted the balance", "payment")
    assert b.cancel_cutoffs(M1, "again", T0 + 2 * S) == []
    assert b.cancel_cutoffs(M2, "another meter", T0 + 2 * S) == []


def test_a_cancelled_cutoff_is_never_sent_afterwards() -> None:
    b = book()
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    b.due(T0, False)
    b.cancel_cutoffs(M1, "paid", T0 + S)
    assert b.due(T0 + 10**5 * S, True) == []
    assert not b.on_sent(c.id, T0 + 2 * S)


def test_a_cutoff_cancelled_in_flight_that_ran_anyway_gets_a_reconnect() -> None:
    b = book()
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    send_all(b, T0)
    b.cancel_cutoffs(M1, "paid", T0 + S)
    b.drain_audit()
    assert not b.on_result(c.id + "/1", CONFIRMED, "relay open", T0 + S, T0 + 2 * S, 0x0010)
    [rec] = b.open_commands()
    assert (rec.action, rec.who, rec.cause_ns) == ("reconnect", "book", T0 + S)
    assert "ran after it was cancelled" in rec.cause
    assert not b.on_result(c.id + "/1", CONFIRMED, "replayed", T0 + S, T0 + 2 * S, 0x0010)
    assert len(b.open_commands()) == 1


def test_a_cutoff_cancelled_in_flight_that_the_collector_never_sent_needs_nothing() -> None:
    b = book()
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    send_all(b, T0)
    b.cancel_cutoffs(M1, "paid", T0 + S)
    assert not b.on_result(c.id + "/1", UNCONFIRMED, "terminal offline: not sent", None,
                           T0 + 2 * S, None, sent=False)
    assert b.open_commands() == []


def test_no_extra_reconnect_when_the_cutoff_was_superseded_by_one() -> None:
    b = book()
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    send_all(b, T0)
    rec = b.issue(M1, "reconnect", "paid", T0 + S)
    assert rec is not None
    send_all(b, T0 + S)
    b.on_result(rec.id, CONFIRMED, "closed", None, T0 + 3 * S, 0)
    assert not b.on_result(c.id, CONFIRMED, "late: relay was open", None, T0 + 2 * S, 0x0010)
    assert b.open_commands() == []


def test_work_orders_of_a_meter_are_voided_by_a_payment_or_a_remote_reconnection() -> None:
    b = book(max_attempts=1)
    cut = b.issue(M1, "cutoff", "low", T0)
    assert cut is not None
    send_all(b, T0)
    b.on_result(cut.id, UNCONFIRMED, "no ack", None, T0 + S, None)
    [e] = b.drain_events()
    assert e.kind == WO_ESCALATED
    b.cancel_cutoffs(M1, "payment P7", T0 + 2 * S)
    [v] = b.drain_events()
    assert (v.kind, v.command_id, v.detail) == (WO_VOID, cut.id, "payment P7")
    b.cancel_cutoffs(M1, "payment P8", T0 + 3 * S)
    assert b.drain_events() == []  # voided once
    rec = b.issue(M1, "reconnect", "paid", T0 + 4 * S)
    assert rec is not None
    send_all(b, T0 + 4 * S)
    b.on_result(rec.id, UNCONFIRMED, "no ack", None, T0 + 5 * S, None)
    assert [x.kind for x in b.drain_events()] == [WO_ESCALATED]
    rec2 = b.issue(M1, "reconnect", "paid again", T0 + 6 * S)
    assert rec2 is not None
    send_all(b, T0 + 6 * S)
    b.on_result(rec2.id, CONFIRMED, "closed", None, T0 + 7 * S, 0)
    [v] = b.drain_events()
    assert (v.kind, v.command_id) == (WO_VOID, rec.id)


# --- timeliness -------------------------------------------------------------------------------

def test_reconnect_latency_is_from_the_payment_to_the_confirmation() -> None:
    b = book(timeliness_target_s=60, latency_bounds_s=(30, 60, 300))
    for i, (paid_s, done_s) in enumerate([(0, 20), (0, 45), (0, 200), (0, 1000)]):
        m = f"33001001{i:04d}"
        c = b.issue(m, "reconnect", "paid", T0 + 5 * S, cause_ns=T0 + paid_s * S)
        assert c is not None
        b.on_sent(c.id, T0 + 6 * S)
        b.on_result(c.id, CONFIRMED, "ok", None, T0 + done_s * S, 0)
    m = "330010019999"
    c = b.issue(m, "reconnect", "paid", T0)
    assert c is not None
    b.on_sent(c.id, T0)
    b.on_result(c.id, REFUSED, "password error", None, T0 + S, None)
    t = b.timeliness()
    assert (t.confirmed, t.within_target, t.failed, t.counts) == (4, 2, 1, (1, 1, 1, 1))
    assert t.share == pytest.approx(2 / 5)
    assert sorted(lat // S for _, _, lat in b.reconnect_latencies()) == [20, 45, 200, 1000]
    manual = b.issue(M1, "close", "customer called", T0, "op.li")  # not a kernel reconnect
    assert manual is not None
    b.on_sent(manual.id, T0)
    b.on_result(manual.id, CONFIRMED, "ok", None, T0 + S, 0)
    assert b.timeliness().confirmed == 4
    assert book().timeliness().share is None


# --- history, bytes, policy -------------------------------------------------------------------

def test_history_is_bounded() -> None:
    b = book(history_kept=3)
    ids = []
    for i in range(5):
        c = b.issue(M1, "trip", f"test {i}", T0 + i * S, "op.li")
        assert c is not None
        ids.append(c.id)
        b.on_sent(c.id, T0 + i * S)
        b.on_result(c.id, CONFIRMED, "ok", None, T0 + i * S + 1, 0x10)
    assert [c.id for c in b.history()] == ids[2:]
    assert b.get(ids[0]) is None
    assert not b.on_result(ids[0], CONFIRMED, "ok", None, T0, 0x10)


def test_bytes_round_trip_and_version_checks() -> None:
    b = book()
    b.issue(M1, "cutoff", "low", T0)
    r = b.issue(M2, "reconnect", "paid", T0, cause_ns=T0 - S)
    assert r is not None
    b.on_sent(r.id, T0)
    b.on_result(r.id, CONFIRMED, "ok", None, T0 + 4 * S, 0)
    b.drain_audit()
    data = b.to_bytes()
    b2 = CommandBook.from_bytes(data, b.policy)
    assert b2.to_bytes() == data
    assert b2.timeliness() == b.timeliness() and b2.history() == b.history()
    assert [c.id for c in b2.due(T0, True)] == [c.id for c in b.due(T0, True)]
    assert b2.issue(M2, "trip", "x", T0, "op").id == "C0001:3"  # type: ignore[union-attr]
    d = json.loads(data)
    with pytest.raises(ValueError, match="version 2"):
        CommandBook.from_bytes(json.dumps({**d, "v": 2}).encode())
    with pytest.raises(ValueError, match="not a meterstream command book"):
        CommandBook.from_bytes(b'{"a": 1}')
    with pytest.raises(ValueError, match="not JSON"):
        CommandBook.from_bytes(b"\x00\x01")
    assert len(data) < 1000  # compact: a few hundred bytes for two commands


def test_policy_defaults_and_checks() -> None:
    p = CommandPolicy()
    assert (p.max_attempts, p.backoff_base_s, p.backoff_cap_s, p.result_timeout_s,
            p.history_kept, p.timeliness_target_s) == (4, 30.0, 600.0, 300.0, 256, 300.0)
    assert [p.backoff_ns(n) // S for n in (1, 2, 3, 4, 5, 6, 9)] == [30, 60, 120, 240, 480,
                                                                     600, 600]
    for bad in ({"max_attempts": 0}, {"backoff_base_s": 0}, {"backoff_base_s": 700},
                {"result_timeout_s": 0}, {"history_kept": -1}, {"latency_bounds_s": (5, 5)},
                {"latency_bounds_s": ()}):
        with pytest.raises(ValueError, match="CommandPolicy"):
            CommandPolicy(**bad)


def test_audit_and_events_are_json_without_credentials() -> None:
    b = book(max_attempts=1)
    c = b.issue(M1, "cutoff", "low", T0)
    assert c is not None
    send_all(b, T0)
    b.on_result(c.id, UNCONFIRMED, "no ack", None, T0 + S, None)
    lines = [x.to_json() for x in b.drain_audit()] + [x.to_json() for x in b.drain_events()]
    assert len(lines) == 5  # issued, sent, unconfirmed, escalated; the work order
    for line in lines:
        d = json.loads(line)
        assert d["ts"].startswith("2026-01-01T00:00:0")
        assert not {k for k in d if "pass" in k or "operator" in k}
    assert json.loads(b.get(c.id).to_json())["state"] == ESCALATED  # type: ignore[union-attr]


# --- the property test ------------------------------------------------------------------------

PROP_METERS = (M1, M2)
PROP_POLICY = CommandPolicy(max_attempts=2, backoff_base_s=30, backoff_cap_s=120,
                            result_timeout_s=300, reconnect_waiting_alarm_s=600)
OUTCOMES = (CONFIRMED, REFUSED, UNCONFIRMED, UNCONFIRMED, UNCONFIRMED, "not sent")

_issue = st.tuples(st.just("issue"), st.integers(0, 1),
                   st.sampled_from(("cutoff", "reconnect", "trip", "close", "keep-power-on")))
_send = st.tuples(st.just("send"), st.integers(0, 15))
_result = st.tuples(st.just("result"), st.one_of(st.integers(0, 1), st.integers(0, 63)),
                    st.sampled_from(OUTCOMES),
                    st.booleans(), st.booleans())
ops = st.lists(st.tuples(  # (seconds that pass first, what happens)
    st.sampled_from((0, 0, 1, 29, 31, 61, 121, 301, 700)),
    st.one_of(  # sends and results weighted up: they are where the states move
        _issue, _issue, _send, _send, _result, _result, _result,
        st.tuples(st.just("online"), st.booleans()),
        st.tuples(st.just("timeout")),
        st.tuples(st.just("cancel"), st.integers(0, 1)),
        st.tuples(st.just("roundtrip")),
    )), min_size=40, max_size=120)


def _view(x: Any) -> Any:
    if isinstance(x, list):
        return [_view(v) for v in x]
    return x.to_dict() if hasattr(x, "to_dict") else x


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_interleavings_keep_the_invariants(
        script: list[tuple[int, tuple[Any, ...]]]) -> None:
    a = CommandBook("C0001", PROP_POLICY)  # restored from bytes at every "roundtrip"
    b = CommandBook("C0001", PROP_POLICY)  # never restored: a must behave exactly like it
    now, online = T0, True
    sent_log: list[str] = []  # wire ids as the collector got them
    audit: list[AuditRecord] = []
    cancelled: set[str] = set()

    def both(name: str, *args: Any, **kw: Any) -> Any:
        ra, rb = getattr(a, name)(*args, **kw), getattr(b, name)(*args, **kw)
        assert _view(ra) == _view(rb)
        return ra

    for dt, op in script:
        now += dt * S
        kind = op[0]
        if kind == "issue":
            meter, action = PROP_METERS[op[1]], op[2]
            who = "kernel" if action in ("cutoff", "reconnect") else "op.li"
            both("issue", meter, action, "test", now, who, cause_ns=now - S)
        elif kind == "online":
            online = op[1]
        elif kind == "send":
            due = both("due", now, online)
            if not online:
                assert due == []  # nothing is ever sent to an offline terminal
            ranks = [{"reconnect": 0, "cutoff": 2}.get(c.action, 1) for c in due]
            assert ranks == sorted(ranks)  # reconnects first, cut-offs last
            assert not {c.id for c in due} & cancelled
            assert all(c.state not in FINAL_STATES for c in due)
            for i, c in enumerate(due):
                if op[1] >> (i % 4) & 1:
                    wire = c.to_wire().id
                    assert both("on_sent", c.id, now)
                    sent_log.append(wire)
        elif kind == "result" and sent_log:
            wire = sent_log[-1 - op[1] % len(sent_log)]  # mostly the latest sends
            outcome, acked, bare = op[2], op[3], op[4]
            cid = wire.rpartition("/")[0] if bare else wire
            if outcome == "not sent":
                both("on_result", cid, UNCONFIRMED, "terminal offline: not sent", None, now,
                     None, sent=False)
            else:
                both("on_result", cid, outcome, outcome, now - S if acked else None, now,
                     0x0010)
        elif kind == "timeout":
            both("on_timeout", now)
        elif kind == "cancel":
            both("cancel_cutoffs", PROP_METERS[op[1]], "payment", now)
        elif kind == "roundtrip":
            a = CommandBook.from_bytes(a.to_bytes(), PROP_POLICY)
        new = both("drain_audit")
        both("drain_events")
        audit.extend(new)
        cancelled |= {r.command_id for r in new if r.to_state == CANCELLED}
        assert a.to_bytes() == b.to_bytes()

    # audit records form a valid path through the state graph, ending where the command is
    by_id: dict[str, list[AuditRecord]] = defaultdict(list)
    for r in audit:
        by_id[r.command_id].append(r)
    assert sum(1 for r in audit if r.from_state is None) == len(by_id)
    for cid, recs in by_id.items():
        p = path(recs, cid)
        assert p[:2] == [None, ISSUED]
        for x, y in itertools.pairwise(recs):
            assert y.from_state == x.to_state
        for frm, to in itertools.pairwise(p):
            assert to in TRANSITIONS[frm], (cid, p)
        finals = [s for s in p if s in FINAL_STATES]
        assert len(finals) <= 1 and (not finals or p[-1] == finals[0])  # one final, last
        c = b.get(cid)
        assert c is not None and c.state == p[-1]  # history_kept (256) > commands issued
        assert c.final == bool(finals)
        assert c.attempts <= PROP_POLICY.max_attempts
        if c.state == SENT:
            ts = [r.ts_ns for r in recs if r.to_state == SENT]
            assert ts[-1] == c.sent_ns
    open_ids = {c.id for c in b.open_commands()}
    assert open_ids == {cid for cid in by_id if b.get(cid).state not in FINAL_STATES}  # type: ignore[union-attr]
