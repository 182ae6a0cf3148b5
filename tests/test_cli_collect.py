"""`meterstream poll`, `control` and `collect` run as a user runs them: a subprocess talking to
the simulated field over real TCP (the field runs on its own event loop in a thread here)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from collect_helpers import PortHold, make_field

from meterfield.field import Field

ROOT = Path(__file__).resolve().parents[1]


class FieldThread:
    """The test field on its own loop in a thread; `advancing` moves its clock 1 s every 20 ms
    so that relays move while a command waits for its read-back."""

    def __init__(self, *, collector_port: int | None = None, advancing: bool = False) -> None:
        self.field: Field = make_field(collector_port=collector_port)
        self.advancing = advancing
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self.stopping = asyncio.Event()
        await self.field.start()
        self.ready.set()
        while not self.stopping.is_set():
            await asyncio.sleep(0.02)
            if self.advancing:
                self.field.advance(1.0)
        await self.field.stop()

    def __enter__(self) -> Self:
        self.thread.start()
        assert self.ready.wait(20)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.stopping is not None
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(20)

    def port(self, terminal: str) -> int:
        return self.field.endpoints()[terminal][2]

    def meter_of(self, terminal: str, protocol: int = 0) -> str:
        f = self.field.fleet
        spec = f.terminal_by_id(terminal)
        return next(f.address_of(int(i)) for i in spec.meters if f.protocol[i] == protocol)


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterstream", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False)


@pytest.fixture
def field() -> Iterator[FieldThread]:
    with FieldThread() as f:
        yield f


def _registers(ft: FieldThread, address: str) -> list[str]:
    regs = ft.field.bank.registers(ft.field.meter(address))
    return [f"{int(v) // 100}.{int(v) % 100:02d}" for v in regs]


def test_poll_reads_one_meter_as_json(field: FieldThread) -> None:
    meter = field.meter_of("A001-C001")
    r = cli("poll", f"tcp://127.0.0.1:{field.port('A001-C001')}", "--meter", meter,
            "--di", "0001FF00", "--timeout", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["outcome"] == "ok" and out["meter"] == meter
    values = [v["value"] for v in out["reply"]["values"]]
    assert values == _registers(field, meter)


def test_poll_a_1997_meter_and_an_unknown_di(field: FieldThread) -> None:
    meter = field.meter_of("A001-C001", protocol=1)
    url = f"tcp://127.0.0.1:{field.port('A001-C001')}"
    r = cli("poll", url, "--meter", meter, "--di", "9010", "--protocol", "1997")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["reply"]["values"][0]["value"] == _registers(field, meter)[0]
    other = field.meter_of("A001-C001")
    r = cli("poll", url, "--meter", other, "--di", "0F000000", "--timeout", "1")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["outcome"] == "error"
    assert "no requested data" in json.dumps(out["reply"])


def test_poll_waits_for_a_dtu_to_dial_in() -> None:
    """--listen: the field's DTU dials in (redialling with backoff until the CLI listens)."""
    hold = PortHold()  # bound until the field's own listeners are up, so they cannot take it
    with FieldThread(collector_port=hold.port) as ft:
        port = hold.release()
        meter = ft.meter_of("A001-D003")
        r = cli("poll", "--listen", f"127.0.0.1:{port}", "--meter", meter, "--di", "0001FF00",
                "--wait", "30")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["outcome"] == "ok"
        assert [v["value"] for v in out["reply"]["values"]] == _registers(ft, meter)


def test_control_trips_and_confirms_by_read_back() -> None:
    with FieldThread(advancing=True) as ft:
        meter = ft.meter_of("A001-C001")
        url = f"tcp://127.0.0.1:{ft.port('A001-C001')}"
        r = cli("control", url, "--meter", meter, "--trip", "--reason", "test: arrears",
                "--confirm-timeout", "20")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["outcome"] == "confirmed" and out["status"]["relay_open"] is True
        assert out["reason"] == "test: arrears"
        assert "000000" not in r.stdout + r.stderr  # the password never shows
        r = cli("control", url, "--meter", meter, "--close", "--confirm-timeout", "20")
        assert r.returncode == 0, r.stdout
        assert json.loads(r.stdout)["status"]["relay_open"] is False


def test_control_refused_with_the_meters_reason(field: FieldThread, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[control]\npassword_env = "NO_SUCH_VAR_HERE"\npassword = "123456"\n')
    meter = field.meter_of("A001-C001")
    r = cli("control", f"tcp://127.0.0.1:{field.port('A001-C001')}", "--meter", meter, "--trip",
            "--config", str(cfg))
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["outcome"] == "refused"
    assert "password error" in out["detail"]
    assert "123456" not in r.stdout + r.stderr


def test_collect_writes_batches_and_a_live_line(field: FieldThread, tmp_path: Path) -> None:
    field.field.write_archive(tmp_path / "a.csv")
    cfg = tmp_path / "c.toml"
    maps = (ROOT / "config" / "collector.toml").read_text().split("\n[modbus_maps.", 1)[1]
    cfg.write_text("[collector]\ntimeout_s = 0.5\nclock_every = 0\n[dialin]\nenabled = false\n"
                   "[modbus]\ntimeout_s = 0.5\n[modbus_maps." + maps)
    out = tmp_path / "out.jsonl"
    r = cli("collect", "--archive", str(tmp_path / "a.csv"), "--config", str(cfg),
            "--cycle", "0.5", "--cycles", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    batches = [x for x in lines if x["type"] == "batch"]
    listening = {t.id for t in field.field.fleet.terminals if t.mode == "listen"}
    assert listening <= {b["terminal"] for b in batches}
    for b in batches:  # the test field's buses have no faults
        assert b["ok"] == b["meters"] > 0
    ups = {x["terminal"] for x in lines if x["type"] == "link" and x["kind"] == "up"}
    assert listening <= ups
    status = [x for x in r.stderr.splitlines() if x.startswith("terminals online")]
    assert len(status) == 3 and "success" in status[-1]


@pytest.mark.parametrize(("args", "needle"), [
    (["poll", "http://x:1", "--meter", "123456789012", "--di", "0001FF00"], "tcp://"),
    (["poll", "--meter", "123456789012", "--di", "0001FF00"], "either URL"),
    (["poll", "tcp://127.0.0.1:1", "--meter", "12345", "--di", "0001FF00"], "--meter"),
    (["poll", "tcp://127.0.0.1:1", "--meter", "123456789012", "--di", "XYZ"], "--di"),
    (["poll", "tcp://127.0.0.1:1", "--meter", "123456789012", "--di", "0001FF00",
      "--wait", "0.5"], "cannot connect"),
    (["control", "tcp://127.0.0.1:1", "--meter", "AAAAAAAAAAAA", "--trip"], "one meter"),
    (["collect", "--archive", "/nonexistent/a.csv", "--config", "config/collector.toml"],
     "not found"),
    (["collect", "--archive", "/nonexistent/a.csv", "--config", "/nonexistent.toml"],
     "not found"),
])
def test_mistakes_are_one_line_and_exit_2(args: list[str], needle: str) -> None:
    r = cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
