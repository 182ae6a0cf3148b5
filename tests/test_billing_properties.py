"""Kernels == reference on random tariffs, fleets and event streams (hypothesis).

Random time zones (with and without daylight saving), windows, holidays, tiers and thresholds;
readings that roll over, step back, jump implausibly, repeat, or come out of time order;
payments duplicated, pending, failed, expired; protected, supply and offline meters.
"""

from __future__ import annotations

from billing_harness import (
    Scenario,
    kernel_replay,
    kernel_stream,
    reference_run,
    scenarios,
    state_of_kernel,
    state_of_reference,
    without_balances,
)
from hypothesis import HealthCheck, given, settings

from meterstream.kernels.layout import Fleet, from_bytes, to_bytes

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios())
def test_replay_kernel_equals_reference(scn: Scenario) -> None:
    got, fleet = kernel_replay(scn)
    want, meters = reference_run(scn)
    assert got == want
    assert state_of_kernel(fleet) == state_of_reference(meters)


@SETTINGS
@given(scenarios(backwards_time=True))
def test_replay_kernel_equals_reference_out_of_time_order(scn: Scenario) -> None:
    got, fleet = kernel_replay(scn)
    want, meters = reference_run(scn)
    assert got == want
    assert state_of_kernel(fleet) == state_of_reference(meters)


@SETTINGS
@given(scenarios(ticks=True))
def test_streaming_kernels_equal_reference(scn: Scenario) -> None:
    got, fleet = kernel_stream(scn)
    want, meters = reference_run(scn)
    assert got == without_balances(want)
    assert state_of_kernel(fleet) == state_of_reference(meters)


def _roundtrip(fleet: Fleet) -> Fleet:
    """Every terminal's block cut out as bytes and put back into a fresh copy of the fleet."""
    fresh = Fleet(
        fleet.hot.copy(), fleet.cold.copy(), fleet.terminal_start.copy(), fleet.terminal_ids
    )
    fresh.hot[:] = 0
    fresh.cold["address"] = fleet.cold["address"]
    fresh.cold["pay_head"] = -1
    for t in range(fleet.n_terminals):
        from_bytes(fresh, t, to_bytes(fleet, t))
    return fresh


@settings(max_examples=60, deadline=None)
@given(scenarios(max_events=30))
def test_state_blocks_survive_bytes(scn: Scenario) -> None:
    """Cutting the state into terminal blocks mid-stream and putting it back changes nothing."""
    half = len(scn.events) // 2
    first = Scenario(scn.tariff, scn.meters, scn.events[:half])
    _, fleet = kernel_replay(first)
    restored = _roundtrip(fleet)
    assert state_of_kernel(restored) == state_of_kernel(fleet)
    for t in range(fleet.n_terminals):
        assert to_bytes(restored, t) == to_bytes(fleet, t)
