"""Broken configuration and archive files, through the real CLI in a subprocess: each is refused
at start with one line on stderr that names the file and the line or key and the reason, exit
status 2, no traceback. One table: which command, which file is broken and how, what the line
must say. The base files are valid (checked in process first), so each row breaks one thing.
(Per-key checks of each loader are in tests/test_field_config.py, test_tariffs.py,
test_cli_collect.py, test_replay.py; this is the end-to-end table.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meterstream.collectors.archive import load_archive
from meterstream.collectors.config import load_collector_config
from meterstream.pipeline.config import load_demo_config, load_worker_config
from meterstream.pipeline.tariffs import load_tariffs

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"

BILLING = """meter,terminal,area,class,plan,protected,initial_balance,role
330010010001,T1,A1,lowvoltage,residential_flat,0,30.00,customer
330010010002,T1,A1,lowvoltage,residential_flat,0,30.00,customer
330010020001,T2,A1,lowvoltage,residential_flat,0,30.00,customer
"""
TERMINALS = """terminal,area,kind,mode,host,port,protocol,meters,firmware,heartbeat_s
T1,A1,concentrator,listen,127.0.0.1,1,dlt645,2,X-1,0
T2,A1,dtu,dial,,0,dlt645,1,X-1,60
"""
METERS = """meter,terminal,protocol,unit,map,prepaid
330010010001,T1,dlt645-2007,0,,1
330010010002,T1,dlt645-2007,0,,1
330010020001,T2,dlt645-1997,0,,1
"""


def files(tmp: Path) -> dict[str, Path]:
    """Valid inputs for every command in `tmp`: archive (three files), configs, tariffs."""
    p = {"archive": tmp / "a.csv", "terminals": tmp / "a-terminals.csv",
         "meters": tmp / "a-meters.csv", "collector": tmp / "collector.toml",
         "worker": tmp / "worker.toml", "tariffs": tmp / "tariffs.toml",
         "field": tmp / "field.toml", "demo": tmp / "demo.toml"}
    p["archive"].write_text(BILLING)
    p["terminals"].write_text(TERMINALS)
    p["meters"].write_text(METERS)
    p["collector"].write_text((CONFIG / "collector.toml").read_text())
    p["worker"].write_text((CONFIG / "worker.toml").read_text().split("[influx]")[0])
    p["tariffs"].write_text((CONFIG / "tariffs-example.toml").read_text())
    p["field"].write_text((CONFIG / "field-test.toml").read_text())
    p["demo"].write_text((CONFIG / "demo.toml").read_text().replace(
        'field = "field-demo.toml"', 'field = "field.toml"').replace(
        'tariffs = "tariffs-example.toml"', 'tariffs = "tariffs.toml"'))
    return p


def test_the_base_files_are_valid(tmp_path: Path) -> None:
    p = files(tmp_path)
    load_archive(p["archive"])
    load_collector_config(p["collector"])
    load_worker_config(p["worker"])
    load_tariffs(p["tariffs"])
    load_demo_config(p["demo"])
    from meterstream.pipeline.worker import WorkerCore

    WorkerCore(p["archive"], p["tariffs"])


def replace_line(key: str, lineno: int, new: str) -> Callable[[dict[str, Path]], None]:
    def edit(p: dict[str, Path]) -> None:
        lines = p[key].read_text().splitlines()
        lines[lineno - 1] = new
        p[key].write_text("\n".join(lines) + "\n")
    return edit


def sub(key: str, old: str, new: str) -> Callable[[dict[str, Path]], None]:
    def edit(p: dict[str, Path]) -> None:
        text = p[key].read_text()
        assert old in text, (key, old)
        p[key].write_text(text.replace(old, new, 1))
    return edit


def append(key: str, text: str) -> Callable[[dict[str, Path]], None]:
    def edit(p: dict[str, Path]) -> None:
        p[key].write_text(p[key].read_text() + text)
    return edit


COLLECT = ["collect", "--archive", "{archive}", "--config", "{collector}"]
WORKER = ["worker", "--broker", "kafka://127.0.0.1:1", "--archive", "{archive}", "--tariffs",
          "{tariffs}", "--config", "{worker}", "--data-dir", "{tmp}/w"]
REPLAY = ["replay", "--archive", "{archive}", "--readings", "{tmp}/r.csv", "--payments",
          "{tmp}/p.csv", "--tariffs", "{tariffs}", "--out", "{tmp}/out"]
SIM = ["sim", "--config", "{field}"]
DEMO = ["demo", "--config", "{demo}"]

# (id, command, edit, the file named, what else the line must say)
CASES = [
    ("collector-value", COLLECT, sub("collector", "timeout_s = 2.0", 'timeout_s = "2"'),
     "collector.toml", "collector.timeout_s: expected a number"),
    ("collector-unknown-key", COLLECT, sub("collector", "enabled = true\n",
                                                     "enabled = true\nrate_limt = 1\n"),
     "collector.toml", "dialin.rate_limt: unknown key"),
    ("collector-range", COLLECT, sub("collector", "per_ip_burst = 20", "per_ip_burst = 0"),
     "collector.toml", "dialin.per_ip_burst: 0 is below the minimum"),
    ("collector-toml", COLLECT, append("collector", "\n[control\n"), "collector.toml",
     "not valid TOML"),
    ("collector-secrets-file", COLLECT, sub("collector", "[control]", '[control]\nsecrets_file '
                                            '= "missing-secrets.toml"'),
     "collector.toml: control.secrets_file: ", "missing-secrets.toml: secrets file not found"),
    ("terminals-port", COLLECT, replace_line("terminals", 2,
                                             "T1,A1,concentrator,listen,127.0.0.1,99999,dlt645,2,X-1,0"),
     "a-terminals.csv:2", "port"),
    ("terminals-mode", COLLECT, replace_line("terminals", 3, "T2,A1,dtu,sideways,,0,dlt645,1,X-1,60"),
     "a-terminals.csv:3", "mode"),
    ("meters-protocol", COLLECT, replace_line("meters", 3, "330010010002,T1,dlt645-2099,0,,1"),
     "a-meters.csv:3", "protocol"),
    ("meters-terminal", COLLECT, replace_line("meters", 4, "330010020001,T9,dlt645-1997,0,,1"),
     "a-meters.csv:4", "T9"),
    ("meters-missing", COLLECT, lambda p: p["meters"].unlink(), "a-meters.csv", ""),
    ("worker-value", WORKER, sub("worker", "tick_s = 1.0", "tick_s = -1"), "worker.toml",
     "worker.tick_s: -1 is below the minimum"),
    ("worker-audit-path", WORKER, sub("worker", "[worker]\n", "[worker]\naudit_path = 5\n"),
     "worker.toml", "worker.audit_path: expected a string"),
    ("worker-commands-key", WORKER, sub("worker", "max_attempts = 4", "max_attempts = 4\nretry = 1"),
     "worker.toml", "commands.retry: unknown key"),
    ("worker-dropouts-range", WORKER, sub("worker", "hold_s = 900.0", "hold_s = -5"),
     "worker.toml", "dropouts.hold_s: -5"),
    ("worker-dropouts-shares", WORKER, sub("worker", "hold_s = 900.0", "hold_s = 900.0\n"
                                           "raise_share = 0.1\nclear_share = 0.2"),
     "worker.toml", "dropouts.clear_share: need 0 <= clear_share_bp < raise_share_bp"),
    ("worker-billing-archive", WORKER, replace_line(
        "archive", 3, "330010010002,T1,A1,lowvoltage,residential_flat,0,thirty,customer"),
     "a.csv:3", "initial_balance"),
    ("worker-archive-plan", WORKER, replace_line(
        "archive", 4, "330010020001,T2,A1,lowvoltage,no_such_plan,0,30.00,customer"),
     "a.csv:4", "no_such_plan"),
    ("worker-tariffs", WORKER, sub("tariffs", "[plans.residential_flat]",
                                   "[plans.residential_flat]\nbogus = 1"),
     "tariffs.toml", "plans.residential_flat.bogus: unknown key"),
    ("replay-tariffs-toml", REPLAY, append("tariffs", "\nx = [1,\n"), "tariffs.toml",
     "not valid TOML"),
    ("field-value", SIM, sub("field", 'password = "000000"', 'password = "xyz"'), "field.toml",
     "meters.password: expected 6 hex digits"),
    ("field-unknown-key", SIM, sub("field", "[bus]\n", "[bus]\nspeed = 9600\n"), "field.toml",
     "bus.speed: unknown key"),
    ("demo-value", DEMO, sub("demo", "speed = 1.0", "speed = 7.0"), "demo.toml",
     "demo.speed"),
    ("demo-missing-file", DEMO, sub("demo", 'tariffs = "tariffs.toml"', 'tariffs = "nope.toml"'),
     "demo.toml", "demo.tariffs"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_broken_file_is_refused_in_one_line_naming_file_and_place(
        tmp_path: Path, case: tuple[str, list[str], Callable[[dict[str, Path]], None], str, str]
) -> None:
    _id, argv, edit, named, reason = case
    p = files(tmp_path)
    (tmp_path / "r.csv").write_text("ts,meter,total,t1,t2,t3,t4\n")
    (tmp_path / "p.csv").write_text("ts,meter,payment_id,amount,status\n")
    edit(p)
    args = [a.format(tmp=tmp_path, **p) for a in argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    r = subprocess.run([sys.executable, "-m", "meterstream", *args], check=False, capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, env=env)
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], err[-2000:])
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith(f"meterstream {argv[0]}: error: "), err
    assert named in err and reason in err, err
