"""Field configuration (validated at load, errors name file, key and reason), the generated
fleet's archive files, and the `meterstream sim` command run as a real process."""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meterfield.config import load_config, parse_config
from meterfield.field import Field
from meterstream.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "field-test.toml"
DEMO = ROOT / "config" / "field-demo.toml"


def doc() -> dict[str, Any]:
    return copy.deepcopy(tomllib.loads(CONFIG.read_text()))


def test_both_shipped_configs_load() -> None:
    demo = load_config(DEMO)
    test = load_config(CONFIG)
    assert demo.speed > 0 and test.speed == 0
    assert {g.kind for g in demo.groups} == {"concentrator", "dtu", "serial-server", "gateway"}
    assert any(g.share_1997 > 0 for g in demo.groups) and any(g.share_money > 0 for g in demo.groups)
    assert demo.outages and demo.random_outages.per_day > 0
    f = Field(demo)
    assert f.fleet.n == 4 * (80 + 16 + 1 + 4) + 4


def bad(mutate: Any) -> str:
    d = doc()
    mutate(d)
    with pytest.raises(UserError) as exc:
        parse_config(d, "field.toml")
    msg = str(exc.value)
    assert msg.startswith("field.toml: ")
    return msg


@pytest.mark.parametrize(("mutate", "key", "reason"), [
    (lambda d: d["meters"].update(relay_delay_s=-1), "meters.relay_delay_s", "below the minimum"),
    (lambda d: d["meters"].update(relay_dealy_s=1), "meters.relay_dealy_s", "unknown key"),
    (lambda d: d["field"].update(speed="fast"), "field.speed", "expected a number"),
    (lambda d: d["field"].update(step_s=7), "field.step_s", "divide 1800"),
    (lambda d: d["field"].update(timezone="Mars/Olympus"), "field.timezone", "unknown time zone"),
    (lambda d: d["field"].update(start="yesterday"), "field.start", "ISO date-time"),
    (lambda d: d["meters"].update(prices=[0.5, 0.4, 0.3, 0.2]), "meters.prices[0]", "decimal string"),
    (lambda d: d["meters"].update(prices=["0.12345"] * 4), "meters.prices[0]", "4 decimal places"),
    (lambda d: d["meters"].update(password="12345"), "meters.password", "6 hex digits"),
    (lambda d: d["meters"].update(tou={"25:00": 1}), "meters.tou.25:00", "hh:mm"),
    (lambda d: d["meters"].update(tou={"08:00": 5}), "meters.tou.08:00", "1..4"),
    (lambda d: d["bus"].update(preamble=5), "bus.preamble", "above the maximum 4"),
    (lambda d: d["bus"].update(p_no_reply=0.6, p_corrupt=0.6), "bus.p_no_reply", "must not exceed 1"),
    (lambda d: d["bus"].update(turnaround_ms=[50, 10]), "bus.turnaround_ms", "above max"),
    (lambda d: d["terminals"][0].update(kind="router"), "terminals[0].kind", "not one of"),
    (lambda d: d["terminals"][0].update(meter=3), "terminals[0].meter", "unknown key"),
    (lambda d: d["terminals"][3].update(modbus_map="acrel"), "terminals[3].modbus_map", "unknown map"),
    (lambda d: d["terminals"][3].update(meters=300), "terminals[3].meters", "above the maximum"),
    (lambda d: d["terminals"][2].update(firmware="dtu v1"), "terminals[2].firmware", "upper case"),
    (lambda d: d["terminals"][0].update(balance_yuan=["1.005", "2"]), "terminals[0].balance_yuan[0]",
     "2 decimal places"),
    (lambda d: d.update(outages=[{"area": "Z9", "at_s": 1}]), "outages[0].area", "unknown area"),
    (lambda d: d.update(outages=[{"at_s": 1}]), "outages[0].area", "exactly one"),
    (lambda d: d.update(profile={"kind": "replay"}), "profile.kind", "not one of"),
    (lambda d: d.update(modbus_maps={"mine": {"function": 5, "registers": []}}),
     "modbus_maps.mine.function", "3 (holding"),
    (lambda d: d.update(terminals=[]), "terminals", "at least one"),
])
def test_a_bad_value_names_the_file_the_key_and_the_reason(mutate: Any, key: str, reason: str) -> None:
    msg = bad(mutate)
    assert key in msg and reason in msg


def test_custom_modbus_map_from_the_config() -> None:
    d = doc()
    d["modbus_maps"] = {"acrel": {"function": 3, "registers": [
        {"address": "0x0061", "quantity": "voltage_a", "scale": 10.0},
        {"address": 0x0200, "quantity": "import_kwh"}]}}
    d["terminals"][3]["modbus_map"] = "acrel"
    cfg = parse_config(d, "f.toml")
    m = cfg.modbus_maps["acrel"]
    assert m.function == 3 and [e.address for e in m.entries] == [0x61, 0x200]


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text("[field\nseed = 1\n")
    with pytest.raises(UserError, match="broken.toml: not valid TOML"):
        load_config(p)
    with pytest.raises(UserError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_archive(tmp_path: Path) -> None:
    f = Field(CONFIG)
    paths = f.write_archive(tmp_path / "archive.csv")
    assert [p.name for p in paths] == ["archive.csv", "archive-terminals.csv", "archive-meters.csv"]
    rows = read_csv(paths[0])
    assert list(rows[0]) == ["meter", "terminal", "area", "class", "plan", "protected",
                             "initial_balance", "role"]
    assert len(rows) == f.fleet.n
    assert len({r["meter"] for r in rows}) == len(rows)
    assert all(len(r["meter"]) == 12 and r["meter"].isdigit() for r in rows)
    supply = [r for r in rows if r["role"] == "supply"]
    assert len(supply) == 2 and {r["class"] for r in supply} == {"public"}
    assert {r["role"] for r in rows} == {"customer", "supply"}
    assert {r["class"] for r in rows} <= {"dedicated", "public", "lowvoltage"}
    i = f.meter(rows[0]["meter"])
    cents = int(f.fleet.balance_cents[i])
    assert rows[0]["initial_balance"] == f"{cents // 100}.{cents % 100:02d}"
    terms = read_csv(paths[1])
    assert {t["terminal"] for t in terms} == set(f.terminals)
    dtu = next(t for t in terms if t["kind"] == "dtu")
    assert (dtu["mode"], dtu["host"], dtu["port"]) == ("dial", "127.0.0.1", "9700")
    meters = read_csv(paths[2])
    gw = [m for m in meters if m["protocol"] == "modbus"]
    assert gw and all(m["unit"] and m["map"] for m in gw)
    assert {m["protocol"] for m in meters} == {"dlt645-2007", "dlt645-1997", "modbus"}
    # the money registers of prepaid meters start at the archive's balance
    for m in meters:
        if m["prepaid"] == "money":
            k = f.meter(m["meter"])
            assert int(f.bank.money_uy[k]) == int(f.fleet.balance_cents[k]) * 10_000


def test_a_100k_meter_fleet_is_struct_of_arrays() -> None:
    d = doc()
    d["areas"] = {"count": 50}
    d["terminals"] = [{"kind": "concentrator", "per_area": 4, "meters": 500}]
    f = Field(parse_config(d, "big.toml"))
    assert f.fleet.n == 100_000 + 50
    assert f.bank.acc.shape == (f.fleet.n, 4) and f.bank.acc.dtype == np.int64
    f.advance(120)
    assert int(f.bank.power_w.sum()) > 0


def _sim(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "meterstream", "sim", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sim_command_runs_until_a_signal(tmp_path: Path, sig: int) -> None:
    p = _sim(["--config", str(CONFIG), "--speed", "120", "--write-archive", str(tmp_path / "a.csv")])
    assert p.stdout is not None
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("A002-G004"):
            break
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    text = "".join(lines) + out
    assert "24 meters behind 8 terminals" in text
    assert "A001-D003  A001  dtu" in text and "dial    127.0.0.1:9700" in text
    assert "stopping" in text
    assert (tmp_path / "a-terminals.csv").exists()


def test_sim_command_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text(CONFIG.read_text().replace("relay_delay_s = 5.0", "relay_delay_s = -5.0"))
    p = _sim(["--config", str(bad_cfg)])
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert err.strip().count("\n") == 0
    assert "bad.toml" in err and "meters.relay_delay_s" in err and "below the minimum" in err


def test_count_deals_terminals_over_the_areas() -> None:
    """`count` instead of `per_area`: that many terminals in all, dealt over the areas in turn."""
    from meterfield.fleet import generate_fleet

    doc = {"areas": {"count": 4, "supply_meter": False}, "terminals": [
        {"kind": "serial-server", "count": 6, "meters": 1, "class": "public"},
        {"kind": "concentrator", "per_area": 1, "meters": 3}]}
    fleet = generate_fleet(parse_config(doc))
    servers = [t.id for t in fleet.terminals if t.kind == "serial-server"]
    assert servers == ["A001-S001", "A001-S002", "A002-S001", "A002-S002", "A003-S001",
                       "A004-S001"]
    assert fleet.n == 6 + 4 * 3
