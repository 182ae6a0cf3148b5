"""Simulated meters: exact register advance, time of use by the meter's clock, rollover, relay,
keep-power, close-allowed, money, clock drift and settlement freezes (no network here)."""

from __future__ import annotations

import copy
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meterfield.config import parse_config
from meterfield.field import Field
from meterfield.fleet import P1997, P2007
from meterfield.lcl import load_consumption
from meterfield.meters import (
    CLOSE_ALLOWED,
    CLOSE_DIRECT,
    ERR_KEEP_POWER,
    KEEP_POWER,
    KEEP_POWER_RELEASE,
    NS,
    ROLL,
    SW3_KEEP_POWER,
    SW3_RELAY_COMMAND_OPEN,
    SW3_RELAY_OPEN,
    TRIP,
    UNIT_MJ,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "field-test.toml"
SLICE = ROOT / "tests" / "data" / "lcl_slice.csv"
MIN = 60


def field_doc(**sections: dict[str, Any]) -> dict[str, Any]:
    """The test field's TOML as a dict, with some sections' keys replaced."""
    doc = tomllib.loads(CONFIG.read_text())
    for name, keys in sections.items():
        doc.setdefault(name, {}).update(copy.deepcopy(keys))
    return doc


def make_field(**sections: dict[str, Any]) -> Field:
    return Field(parse_config(field_doc(**sections), str(CONFIG), CONFIG.parent))


def customers_2007(f: Field) -> list[int]:
    fl = f.fleet
    return [i for i in range(fl.n) if fl.protocol[i] == P2007 and fl.role[i] == 0]


def test_register_advance_is_exact_synthetic() -> None:
    f = make_field()
    bank, prof = f.bank, f.profile
    i = customers_2007(f)[0]
    e0, r0 = bank.energy_mj(i), bank.registers(i)
    t0 = f.now()
    for dt in (7, 1234, 1, 2358, 5400, 14399, 1, 5400):  # uneven chunks, 8 h in all
        f.advance(dt)
    assert f.now() - t0 == 8 * 3600 * NS
    # the profile is constant per half hour of local time: the energy it delivers over 8 h
    local0 = (t0 // NS) + f.clock.utc_offset_s(t0)
    expected = sum(int(prof.power_w(local0 + k * 1800)[i]) * 1800 * 1000 for k in range(16))
    assert expected > 0
    assert bank.energy_mj(i) - e0 == expected
    r1 = bank.registers(i)
    reg_delta = sum(r1[1:]) - sum(r0[1:])
    # registers show whole 0.01 kWh; the rest waits in each tariff's remainder (< 1 unit each)
    rem0 = e0 - sum(r0[1:]) * UNIT_MJ
    rem1 = bank.energy_mj(i) - sum(r1[1:]) * UNIT_MJ
    assert 0 <= rem0 < 4 * UNIT_MJ and 0 <= rem1 < 4 * UNIT_MJ
    assert expected == reg_delta * UNIT_MJ + rem1 - rem0
    assert (r1[0] - r0[0]) % ROLL == reg_delta  # the total is the sum of T1..T4
    assert r1[0] == sum(r1[1:]) % ROLL


def test_register_advance_replays_the_recorded_year_exactly() -> None:
    f = make_field(field={"start": "2024-01-01T00:00:00"},
                   profile={"kind": "recorded", "path": str(SLICE)})
    bank = f.bank
    rec = load_consumption(SLICE)
    meters = customers_2007(f)[:4]
    e0 = {i: bank.energy_mj(i) for i in meters}
    units0 = {i: bank.acc[i] // UNIT_MJ for i in meters}
    rem0 = {i: bank.acc[i] % UNIT_MJ for i in meters}
    f.advance(6 * 3600 + 17)
    f.advance(6 * 3600 - 17)  # 12 h: 24 recorded half hours of 2013-01-01
    for i in meters:
        ts, wh = rec.rows(i % rec.n_meters)  # meter i plays household i mod H
        want_wh = int(wh[:24].sum())
        assert int(ts[0]) == 1356998400 and int(ts[23]) == 1356998400 + 23 * 1800
        got = bank.energy_mj(i) - e0[i]
        assert got == want_wh * 3_600_000  # Wh -> mJ, exactly
        d_units = int((bank.acc[i] // UNIT_MJ - units0[i]).sum())
        d_rem = int((bank.acc[i] % UNIT_MJ - rem0[i]).sum())
        assert d_units * UNIT_MJ + d_rem == got
        assert abs(d_units * 10 - want_wh) < 4 * 10 + 1  # within 4 tariff remainders of 10 Wh


def test_time_of_use_follows_the_meters_own_clock() -> None:
    # T4 until 08:00, T2 from 08:00 (default table); true time starts 07:30
    f = make_field(field={"start": "2024-06-01T07:30:00"})
    bank = f.bank
    i = customers_2007(f)[0]
    bank.clock_ppm[i] = 0.0
    now = f.now()
    bank.set_meter_time([i], datetime(2024, 6, 1, 7, 40, 0), now)  # this meter runs 10 min fast
    assert bank.meter_time(i, now) == datetime(2024, 6, 1, 7, 40, 0)
    acc0 = bank.acc[i].copy()
    for _ in range(30):
        f.advance(MIN)
    d = bank.acc[i] - acc0
    p = int(bank.power_w[i])
    assert p > 0
    # its clock passes 08:00 at 07:50 true time: 20 min of T4, then 10 min of T2
    assert int(d[3]) == p * 20 * MIN * 1000
    assert int(d[1]) == p * 10 * MIN * 1000
    assert int(d[0]) == int(d[2]) == 0


def test_registers_roll_over_after_999999_99() -> None:
    f = make_field(field={"start": "2024-06-01T02:00:00"})  # valley (T4) all along
    bank = f.bank
    i = customers_2007(f)[0]
    bank.clock_ppm[i] = 0.0
    bank.set_meter_time([i], datetime(2024, 6, 1, 2, 0, 0), f.now())
    bank.set_registers(i, [5, 6, 7, ROLL - 1])
    assert bank.registers(i) == ((5 + 6 + 7 + ROLL - 1) % ROLL, 5, 6, 7, ROLL - 1)
    f.advance(3600)
    total, t1, t2, t3, t4 = bank.registers(i)
    used = int(bank.acc[i][3] // UNIT_MJ) - (ROLL - 1)
    assert used > 0
    assert t4 == used - 1  # wrapped: 999999.99 + used -> used - 0.01
    assert total == (t1 + t2 + t3 + t4) % ROLL


def test_relay_moves_after_its_delay_and_an_open_relay_draws_nothing() -> None:
    f = make_field()  # relay_delay_s = 5
    bank = f.bank
    i = customers_2007(f)[1]
    now = f.now()
    assert bank.control(i, TRIP, now) == 0
    sw = bank.status_word3(i, now)
    assert sw & SW3_RELAY_COMMAND_OPEN and not sw & SW3_RELAY_OPEN  # bit6 at once, bit4 later
    f.advance(4.9)
    assert not bank.relay_open_at(i, f.now())
    f.advance(0.1)
    assert bank.status_word3(i, f.now()) & SW3_RELAY_OPEN
    e = bank.energy_mj(i)
    f.advance(3600)
    assert bank.energy_mj(i) == e  # no consumption while open
    assert bank.relays_open(f.now()) == 1
    assert bank.control(i, CLOSE_DIRECT, f.now()) == 0
    assert not bank.status_word3(i, f.now()) & SW3_RELAY_COMMAND_OPEN
    assert bank.relay_open_at(i, f.now())
    f.advance(5)
    assert not bank.relay_open_at(i, f.now())
    f.advance(600)
    assert bank.energy_mj(i) > e


def test_trip_is_refused_while_keep_power_is_in_force() -> None:
    f = make_field()
    bank = f.bank
    i = customers_2007(f)[0]
    now = f.now()
    assert bank.control(i, KEEP_POWER, now) == 0
    assert bank.status_word3(i, now) & SW3_KEEP_POWER
    assert bank.control(i, TRIP, now) == ERR_KEEP_POWER
    f.advance(60)
    assert not bank.relay_open_at(i, f.now())
    assert not bank.status_word3(i, f.now()) & SW3_RELAY_COMMAND_OPEN
    assert bank.control(i, KEEP_POWER_RELEASE, f.now()) == 0
    assert bank.control(i, TRIP, f.now()) == 0


def test_protected_customers_start_with_keep_power() -> None:
    f = make_field(meters={"keep_power_if_protected": True})
    fl = f.fleet
    assert np.array_equal(f.bank.keep_power, fl.protected)


def test_close_allowed_waits_for_the_customer_to_press() -> None:
    f = make_field()  # press_delay_s = "never": only press_button() closes
    bank = f.bank
    i = customers_2007(f)[2]
    bank.control(i, TRIP, f.now())
    f.advance(5)
    assert bank.relay_open_at(i, f.now())
    assert bank.control(i, CLOSE_ALLOWED, f.now()) == 0
    assert not bank.status_word3(i, f.now()) & SW3_RELAY_COMMAND_OPEN  # bit6 cleared at once
    f.advance(3600)
    assert bank.relay_open_at(i, f.now())  # nobody pressed
    assert f.press_button(f.address(i))
    f.advance(4)
    assert bank.relay_open_at(i, f.now())  # the relay delay runs from the press
    f.advance(1)
    assert not bank.relay_open_at(i, f.now())
    assert not f.press_button(f.address(i))  # nothing to press for any more


def test_close_allowed_with_a_simulated_press_delay() -> None:
    f = make_field(meters={"press_delay_s": [30.0, 30.0]})
    bank = f.bank
    i = customers_2007(f)[2]
    bank.control(i, TRIP, f.now())
    f.advance(5)
    bank.control(i, CLOSE_ALLOWED, f.now())
    f.advance(34)
    assert bank.relay_open_at(i, f.now())
    f.advance(1)  # 30 s until the press + 5 s relay delay
    assert not bank.relay_open_at(i, f.now())


def test_money_registers_decrease_by_price_times_register_increments() -> None:
    f = make_field()
    bank = f.bank
    money = [i for i in customers_2007(f) if bank.prepaid[i] == 2]
    assert money
    i = money[0]
    rem0, units0, uy0 = bank.remaining_cents(i), bank.acc[i] // UNIT_MJ, int(bank.money_uy[i])
    f.advance(6 * 3600)
    d_units = bank.acc[i] // UNIT_MJ - units0
    prices = np.asarray(f.config.meters.prices_e4, np.int64)  # 0.0001 yuan/kWh
    charge_uy = int(d_units @ prices)  # 0.01 kWh x 0.0001 yuan/kWh = 1e-6 yuan
    assert charge_uy > 0
    assert int(bank.money_uy[i]) == uy0 - charge_uy
    assert bank.remaining_cents(i) < rem0
    assert bank.status_word3(i, f.now()) >> 8 & 3 == 2  # money prepaid


def test_overdraft_and_pretrip_alarm() -> None:
    f = make_field()
    bank = f.bank
    i = next(i for i in customers_2007(f) if bank.prepaid[i] == 2)
    bank.money_uy[i] = 5 * 10_000  # 0.05 yuan left
    f.advance(12 * 3600)
    assert bank.remaining_cents(i) == 0
    assert bank.overdraft_cents(i) > 0
    assert bank.status_word3(i, f.now()) & (1 << 7)  # below the alarm threshold


def test_local_cutoff_trips_a_money_meter_past_its_overdraft_limit() -> None:
    f = make_field(meters={"local_cutoff": True, "overdraft_limit_yuan": "0.50"})
    bank = f.bank
    i = next(i for i in customers_2007(f) if bank.prepaid[i] == 2)
    bank.money_uy[i] = 0
    for _ in range(48):
        f.advance(1800)
    assert bank.relay_open_at(i, f.now())
    assert bank.overdraft_cents(i) >= 50


def test_meter_clock_drifts_and_a_time_set_corrects_it() -> None:
    f = make_field()
    bank = f.bank
    i = customers_2007(f)[0]
    bank.clock_ppm[i] = 50.0
    e0 = bank.clock_error_s(i, f.now())
    f.advance(10 * 86_400)
    drift = bank.clock_error_s(i, f.now()) - e0
    assert drift == pytest.approx(50e-6 * 10 * 86_400, abs=0.01)
    true_local = f.clock.local(f.now())
    bank.set_meter_time([i], true_local, f.now())
    assert abs(bank.clock_error_s(i, f.now())) < 0.001


def test_month_end_freezes_the_settlement_registers() -> None:
    f = make_field(field={"start": "2024-06-30T23:00:00"},
                   meters={"clock_offset_s": [0.0, 0.0], "clock_ppm": [0.0, 0.0]})
    bank = f.bank
    i = customers_2007(f)[0]
    before = bank.settlement(i, 1)  # back-filled history before the field started
    assert before[0] <= bank.registers(i)[0]
    f.advance(3600)  # crosses 1 July 00:00 on every meter's clock
    assert bank.freezes >= f.fleet.n
    assert bank.settlement(i, 2) == before  # the history moved down one period
    frozen = bank.settlement(i, 1)
    assert frozen == bank.registers(i)


def test_supply_meter_is_the_sum_of_its_customers_plus_line_loss() -> None:
    f = make_field()
    bank, fl = f.bank, f.fleet
    f.advance(60)
    for s in np.flatnonzero(fl.role == 1):
        cust = np.flatnonzero((fl.role == 0) & (fl.area == fl.area[s]))
        total = int(bank.power_w[cust].sum())
        loss = int(bank.loss_ppm[fl.area[s]])
        assert int(bank.power_w[s]) == total * (1_000_000 + loss) // 1_000_000
        assert int(bank.power_w[s]) > total


def test_fleet_is_deterministic_in_its_seed() -> None:
    a, b = make_field().fleet, make_field().fleet
    assert np.array_equal(a.address, b.address) and np.array_equal(a.prepaid, b.prepaid)
    assert np.array_equal(a.balance_cents, b.balance_cents)
    c = make_field(field={"seed": 7}).fleet
    assert not np.array_equal(a.balance_cents, c.balance_cents)
    assert (a.protocol == P1997).any() and (a.protocol == P2007).any()


def test_meter_time_and_start_are_local_time() -> None:
    f = make_field(meters={"clock_offset_s": [0.0, 0.0], "clock_ppm": [0.0, 0.0]})
    i = customers_2007(f)[0]
    assert f.bank.meter_time(i, f.now()) == datetime(2024, 6, 1, 8, 0, 0)
    f.advance(90)
    assert f.bank.meter_time(i, f.now()) == datetime(2024, 6, 1, 8, 0, 0) + timedelta(seconds=90)


def test_a_relay_opening_inside_a_tick_stops_the_energy_at_that_instant() -> None:
    f = make_field()  # relay_delay_s = 5, start 08:00 (a half-hour boundary)
    bank = f.bank
    i = customers_2007(f)[0]
    e0 = bank.energy_mj(i)
    bank.control(i, TRIP, f.now())
    f.advance(3600)  # one tick across the relay's move
    p = int(f.profile.power_w(f.now() // NS + f.clock.utc_offset_s() - 3600)[i])
    assert bank.energy_mj(i) - e0 == p * 5 * 1000  # exactly the 5 s before it opened
