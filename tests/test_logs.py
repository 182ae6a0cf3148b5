"""Structured logs (meterstream.logs): one JSON object per line with ts, level, logger, message
and the extra fields; text lines otherwise; --log-format / METERSTREAM_LOG_FORMAT checked.
A real collector logging JSON end to end is in tests/test_metrics.py."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from meterstream import logs
from meterstream.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Leave the root logger as it was (setup() changes it)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logs._format = "text"


def record(msg: str, *args: object, level: int = logging.WARNING,
           **extra: object) -> logging.LogRecord:
    log = logging.getLogger("meterstream.test")
    rec = log.makeRecord(log.name, level, "f.py", 1, msg, args, None, extra=extra)
    return rec


def test_json_line_has_the_fields_and_the_extras() -> None:
    rec = record("terminal %s offline", "T1", terminal="T1", missed=np.int64(3),
                 rate=np.float64(0.5), where={"area": "A1", "n": [1, 2]}, obj=object())
    line = logs.JsonFormatter().format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "WARNING" and doc["logger"] == "meterstream.test"
    assert doc["message"] == "terminal T1 offline"
    assert (doc["terminal"], doc["missed"], doc["rate"]) == ("T1", 3, 0.5)
    assert doc["where"] == {"area": "A1", "n": [1, 2]}
    assert doc["obj"].startswith("<object object")
    ts = datetime.fromisoformat(doc["ts"])
    assert ts.utcoffset() is not None and abs(ts.timestamp() - rec.created) < 0.001
    assert not {"args", "msg", "levelno", "pathname"} & set(doc)  # no LogRecord internals


def test_json_keeps_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("bad frame\nsecond line")
    except ValueError:
        rec = logging.getLogger("x").makeRecord("x", logging.ERROR, "f", 1, "failed", (),
                                                sys.exc_info())
    line = logs.JsonFormatter().format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert "ValueError: bad frame" in doc["exc"] and doc["message"] == "failed"


def test_text_line() -> None:
    line = logs.TextFormatter().format(record("spool %s", "full", level=logging.ERROR, n=3))
    assert " ERROR meterstream.test: spool full  n=3" in line
    assert line[:4].isdigit() and "Z " in line


def test_setup_takes_the_flag_then_the_environment(root_logging: None) -> None:
    out = io.StringIO()
    assert logs.setup(None, {"METERSTREAM_LOG_FORMAT": "JSON"}, out) == "json"
    logging.getLogger("meterstream.influx").warning("server down", extra={"spool_files": 2})
    logs.say("status line", logger="meterstream.collector", online=5)
    docs = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(d["message"], d["logger"]) for d in docs] == [
        ("server down", "meterstream.influx"), ("status line", "meterstream.collector")]
    assert docs[0]["spool_files"] == 2 and docs[1]["online"] == 5
    # setup again: one handler of ours, not two; a flag wins over the environment
    out2 = io.StringIO()
    ns = type("A", (), {"log_format": "text", "log_level": "debug"})()
    assert logs.setup(ns, {"METERSTREAM_LOG_FORMAT": "json"}, out2) == "text"
    logging.getLogger("meterstream.x").debug("hello")
    assert out.getvalue().count("\n") == 2  # the first handler is gone
    assert out2.getvalue().rstrip().endswith("DEBUG meterstream.x: hello")


def test_bad_values_name_where_they_came_from() -> None:
    with pytest.raises(UserError, match=r"^--log-format: 'xml': give one of text, json$"):
        logs.setup(type("A", (), {"log_format": "xml", "log_level": None})(), {})
    with pytest.raises(UserError, match=r"^environment variable METERSTREAM_LOG_LEVEL: 'loud'"):
        logs.setup(None, {"METERSTREAM_LOG_LEVEL": "loud"})


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "meterstream", *args], capture_output=True,
                          text=True, cwd=ROOT, env=full, timeout=120, check=False)


@pytest.mark.parametrize("command", [
    ["sim", "--config", "config/field-test.toml"],
    ["demo"],
    ["worker", "--broker", "kafka://127.0.0.1:9", "--archive", "a", "--tariffs", "t"],
    ["collector", "--broker", "kafka://127.0.0.1:9", "--archive", "a", "--config", "c"],
])
def test_every_long_running_command_checks_the_format(command: list[str]) -> None:
    p = _cli(*command, "--log-format", "yaml")
    assert p.returncode == 2
    assert p.stderr.strip() == f"meterstream {command[0]}: error: --log-format: 'yaml': give " \
        "one of text, json"
    p = _cli(*command, env={"METERSTREAM_LOG_FORMAT": "xml"})
    assert p.returncode == 2
    assert p.stderr.strip() == (f"meterstream {command[0]}: error: environment variable "
                                "METERSTREAM_LOG_FORMAT: 'xml': give one of text, json")
