"""Meter passwords and operator codes: from the environment or a secrets file (mode 600, outside
any repository), never from the shipped configuration, never into logs, events or JSON output.

The end-to-end test runs a collector against the simulated field over real TCP with DEBUG
logging everywhere (asyncio's debug mode too), trips a meter whose password is known only to
the secrets file, and greps everything that came out for the secrets, in every form they take
on the wire."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from collect_helpers import PortHold, field_archive, make_field, run, wait_until

from meterstream.collectors.collector import Collector
from meterstream.collectors.commands import CONFIRMED, Command
from meterstream.collectors.config import load_collector_config, load_secrets
from meterstream.collectors.sink import JsonLinesSink
from meterstream.errors import UserError
from meterstream.pipeline.config import load_worker_config

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "314159"
OPERATOR = "27182818"
ENVS = ("METERSTREAM_METER_PASSWORD", "METERSTREAM_OPERATOR_CODE", "METERSTREAM_SECRETS_FILE",
        "METERSTREAM_OPERATOR_TOKENS")


@pytest.fixture(autouse=True)
def no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ENVS:
        monkeypatch.delenv(k, raising=False)


def secrets_file(tmp: Path, text: str | None = None, mode: int = 0o600) -> Path:
    p = tmp / "secrets.toml"
    p.write_text(text if text is not None else
                 f'meter_password = "{PASSWORD}"\noperator_code = "{OPERATOR}"\n')
    os.chmod(p, mode)
    return p


def collector_toml(tmp: Path, control: str, dialin_port: int = 0) -> Path:
    p = tmp / "collector.toml"
    p.write_text(f"""
[collector]
cycle_s = 3600.0
timeout_s = 0.3
retries = 1
clock_every = 0
backoff_s = [0.05, 0.2]
connect_timeout_s = 1.0
[dialin]
port = {dialin_port}
registration_timeout_s = 2.0
[control]
confirm_poll_s = 0.05
confirm_timeout_s = 10.0
{control}
""")
    return p


def wire_forms(secret: str) -> list[str]:
    """The secret as text and as the hex of its wire bytes: low byte first, plain and +33H,
    spaced and unspaced, either case."""
    raw = bytes.fromhex(secret)
    out = {secret}
    for b in (raw, raw[::-1]):
        for x in (b, bytes((v + 0x33) & 0xFF for v in b)):
            for h in (x.hex(), x.hex(" ")):
                out |= {h, h.upper()}
    return sorted(out)


# --- the secrets file -------------------------------------------------------------------------


def test_the_secrets_file_gives_the_credentials(tmp_path: Path) -> None:
    s = secrets_file(tmp_path)
    cfg = load_collector_config(collector_toml(tmp_path, f'secrets_file = "{s}"'))
    assert cfg.credentials.password == PASSWORD and cfg.credentials.operator == OPERATOR
    assert PASSWORD not in repr(cfg) and OPERATOR not in repr(cfg)
    # relative to the configuration file's directory
    cfg = load_collector_config(collector_toml(tmp_path, 'secrets_file = "secrets.toml"'))
    assert cfg.credentials.password == PASSWORD


def test_the_environment_wins_over_the_file_and_names_a_file_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = secrets_file(tmp_path)
    conf = collector_toml(tmp_path, "")
    monkeypatch.setenv("METERSTREAM_SECRETS_FILE", str(s))
    cfg = load_collector_config(conf)
    assert cfg.credentials.password == PASSWORD
    monkeypatch.setenv("METERSTREAM_METER_PASSWORD", "271828")
    cfg = load_collector_config(conf)
    assert cfg.credentials.password == "271828" and cfg.credentials.operator == OPERATOR


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_a_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    s = secrets_file(tmp_path, mode=mode)
    with pytest.raises(UserError) as exc:
        load_secrets(s)
    msg = str(exc.value)
    assert str(s) in msg and f"{mode:04o}" in msg and "chmod 600" in msg
    assert PASSWORD not in msg


def test_a_secrets_file_in_a_repository_is_refused(tmp_path: Path) -> None:
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / "config").mkdir()
    s = secrets_file(tmp_path / "repo" / "config")
    with pytest.raises(UserError, match="must not live in a repository"):
        load_secrets(s)


@pytest.mark.parametrize("text, needle", [
    (f"meter_password = {PASSWORD}\n", "meter_password: expected a quoted string, got a int"),
    (f'meter_pasword = "{PASSWORD}"\n', "meter_pasword: unknown key"),
    (f'meter_password = "{PASSWORD}\n', "not valid TOML"),
    ('meter_password = "31415"\n', "password"),  # not 6 hex digits: named by Credentials
])
def test_mistakes_in_the_secrets_file_are_named_never_shown(tmp_path: Path, text: str,
                                                             needle: str) -> None:
    s = secrets_file(tmp_path, text)
    with pytest.raises(UserError) as exc:
        load_collector_config(collector_toml(tmp_path, f'secrets_file = "{s}"'))
    msg = str(exc.value)
    assert needle in msg and "secrets.toml" in msg, msg
    assert PASSWORD not in msg and "31415" not in msg


def test_a_missing_secrets_file_is_one_line_exit_2_through_the_cli(tmp_path: Path) -> None:
    conf = collector_toml(tmp_path, f'secrets_file = "{tmp_path / "nope.toml"}"')
    r = subprocess.run([sys.executable, "-m", "meterstream", "control", "tcp://127.0.0.1:1",
                        "--meter", "330010010001", "--trip", "--config", str(conf)],
                       check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k not in ENVS})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "nope.toml" in r.stderr


TOKENS = 'alice = "tok-alice-0123456789"\nbob = "tok-bob-9876543210ab"\n'


def worker_toml(tmp: Path, extra: str) -> Path:
    p = tmp / "worker.toml"
    p.write_text(f"[worker]\npartitions = 2\n{extra}\n")
    return p


def test_the_workers_operator_tokens_come_from_the_secrets_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets_file(tmp_path, f'meter_password = "{PASSWORD}"\n[operator_tokens]\n{TOKENS}')
    cfg = load_worker_config(worker_toml(tmp_path, 'secrets_file = "secrets.toml"'))
    assert cfg.operator_tokens() == {"tok-alice-0123456789": "alice",
                                     "tok-bob-9876543210ab": "bob"}
    assert "tok-alice" not in repr(cfg)
    # $METERSTREAM_SECRETS_FILE names it too; the token variable, when set, wins over the file
    monkeypatch.setenv("METERSTREAM_SECRETS_FILE", str(tmp_path / "secrets.toml"))
    cfg = load_worker_config(worker_toml(tmp_path, ""))
    assert set(cfg.operator_tokens().values()) == {"alice", "bob"}
    monkeypatch.setenv("METERSTREAM_OPERATOR_TOKENS", "carol:tok-carol-0123456789")
    assert cfg.operator_tokens() == {"tok-carol-0123456789": "carol"}


@pytest.mark.parametrize("text, needle", [
    ('[operator_tokens]\nalice = "short-token"\n', "operator_tokens.alice: a token needs at least 16"),
    ('[operator_tokens]\nalice = 1234567890123456789\n', "operator_tokens.alice: expected a quoted"),
    ('[operator_tokens]\nalice = "tok-same-0123456789"\nbob = "tok-same-0123456789"\n',
     "operator_tokens.bob: the same token as 'alice'"),
    ('operator_tokens = "alice:tok-alice-0123456789"\n', "operator_tokens: expected a table"),
])
def test_bad_operator_tokens_stop_the_worker_at_start_naming_the_key_never_the_value(
        tmp_path: Path, text: str, needle: str) -> None:
    secrets_file(tmp_path, text)
    with pytest.raises(UserError) as exc:
        load_worker_config(worker_toml(tmp_path, 'secrets_file = "secrets.toml"'))
    msg = str(exc.value)
    assert needle in msg and "worker.secrets_file" in msg, msg
    for value in ("short-token", "1234567890123456789", "tok-same", "tok-alice"):
        assert value not in msg


def test_a_too_open_secrets_file_stops_the_worker_cli_in_one_line(tmp_path: Path) -> None:
    s = secrets_file(tmp_path, f"[operator_tokens]\n{TOKENS}", mode=0o644)
    conf = worker_toml(tmp_path, "")
    env = {k: v for k, v in os.environ.items() if k not in ENVS}
    env["METERSTREAM_SECRETS_FILE"] = str(s)
    r = subprocess.run([sys.executable, "-m", "meterstream", "worker", "--broker",
                        "kafka://127.0.0.1:9", "--archive", str(tmp_path / "a.csv"), "--tariffs",
                        str(ROOT / "config" / "tariffs-example.toml"), "--config", str(conf)],
                       check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "too open" in r.stderr
    assert "METERSTREAM_SECRETS_FILE" in r.stderr and "tok-" not in r.stderr


def test_the_shipped_configuration_holds_no_collector_secret() -> None:
    for name in ("collector.toml", "worker.toml", "demo.toml"):
        text = (ROOT / "config" / name).read_text()
        live = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in live if re.match(r"\s*(password|operator|meter_password|"
                                                  r"operator_code)\s*=", ln)], name


# --- end to end: nothing leaks ------------------------------------------------------------------


class Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))
        self.lines.append(repr(record.args))


def test_a_command_with_debug_logging_leaks_neither_secret(tmp_path: Path) -> None:
    def set_password(doc: dict[str, object]) -> None:
        doc["meters"]["password"] = PASSWORD  # type: ignore[index]

    handler = Everything()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    out = io.StringIO()
    results = []

    async def main() -> None:
        asyncio.get_running_loop().set_debug(True)
        hold = PortHold()
        field = make_field(set_password, collector_port=hold.port)
        async with field:
            s = secrets_file(tmp_path)
            cfg = load_collector_config(collector_toml(tmp_path, f'secrets_file = "{s}"',
                                                       hold.release()))
            logging.getLogger("meterstream.test").debug("collector config %r", cfg)
            col = Collector(field_archive(field, tmp_path), cfg, JsonLinesSink(out))
            await col.start()
            try:
                await wait_until(lambda: all(x.online for x in col.sessions.values()),
                                 what="all online")
                tid = "A001-C001"
                plan = col.archive.terminals[tid]
                meter = plan.address_text(0)
                await asyncio.gather(*(x.run_cycle() for x in col.sessions.values()))
                stop = asyncio.Event()

                async def advance() -> None:
                    while not stop.is_set():
                        field.advance(1.0)
                        await asyncio.sleep(0.02)

                mover = asyncio.ensure_future(advance())
                try:
                    r = await col.execute(Command(meter, "trip", reason="arrears"))
                    results.append(r)
                    r = await col.execute(Command(meter, "close", reason="paid"))
                    results.append(r)
                finally:
                    stop.set()
                    await mover
            finally:
                await col.stop()

    try:
        run(main(), timeout=90)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    # the password was right: the meter took the command (so the secret really was used)
    assert [r.outcome for r in results] == [CONFIRMED, CONFIRMED], [r.to_json() for r in results]
    text = "\n".join([*handler.lines, out.getvalue(), *(r.to_json() for r in results),
                      *(repr(r) for r in results)])
    assert len(handler.lines) > 10  # DEBUG logging really was on (asyncio's, at least)
    assert sum('"command"' in ln for ln in out.getvalue().splitlines()) == 2
    for secret in (PASSWORD, OPERATOR):
        for form in wire_forms(secret):
            assert form not in text, f"{secret} leaked as {form!r}"
