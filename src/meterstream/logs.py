"""Logging for the long-running commands (worker, collector, sim, demo): text or JSON lines.

`--log-format json` (or METERSTREAM_LOG_FORMAT=json) writes one JSON object per line on standard
error, with `ts`, `level`, `logger`, `message` and every `extra=` field of the call, for a log
shipper to index; `text` is one readable line per record. It must never raise on a record it
cannot serialise (such a value is written as its repr). docs/operations.md, "Logs".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from meterstream.errors import UserError

FORMATS = ("text", "json")
ENV = "METERSTREAM_LOG_FORMAT"
LEVEL_ENV = "METERSTREAM_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# the attributes every LogRecord has: what is left on a record besides them came from `extra=`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


def _plain(v: Any) -> Any:
    """A JSON value for `v`: itself when JSON takes it, numpy scalars as numbers, else repr."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x) for x in v]
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _plain(item())
        except (TypeError, ValueError):
            pass
    return repr(v)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601, ms), level, logger, message, the `extra`
    fields, and `exc` (the traceback) when the record carries an exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and k not in doc and not k.startswith("_"):
                doc[k] = _plain(v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`2026-12-01T11:00:00.123Z WARNING meterstream.influx: message key=value ...`"""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        line = (f"{ts}.{int(record.msecs):03d}Z {record.levelname} {record.name}: "
                f"{record.getMessage()}")
        extra = [f"{k}={_plain(v)}" for k, v in vars(record).items()
                 if k not in _STANDARD and not k.startswith("_")]
        if extra:
            line += "  " + " ".join(extra)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--log-format` and `--log-level` for a long-running subcommand (defaults from the
    environment, checked by `setup`)."""
    parser.add_argument("--log-format", metavar="json|text", default=None,
                        help=f"log lines on standard error as text or one JSON object per line "
                        f"(default ${ENV}, else text)")
    parser.add_argument("--log-level", metavar="LEVEL", default=None,
                        help=f"DEBUG, INFO, WARNING or ERROR (default ${LEVEL_ENV}, else INFO "
                        "for json and WARNING for text)")


def choose(flag: str | None, env: Mapping[str, str], *, name: str, var: str,
           allowed: tuple[str, ...], default: str) -> str:
    """The flag's value, else the variable's, else the default; UserError naming which was
    wrong and what is allowed."""
    if flag is not None:
        value, where = flag, f"--{name}"
    elif env.get(var):
        value, where = env[var], f"environment variable {var}"
    else:
        return default
    got = value.strip().upper() if allowed is LEVELS else value.strip().lower()
    if got not in allowed:
        raise UserError(f"{value!r}: give one of {', '.join(allowed)}", where=where)
    return got


_format = "text"  # what setup() chose


def say(message: str, *, logger: str = "meterstream", **fields: Any) -> None:
    """A status line for the operator: printed on standard error in text mode, one INFO record
    (with `fields` as its extra fields) in JSON mode, so that stderr stays one object a line."""
    if _format == "json":
        logging.getLogger(logger).info(message, extra=fields)
    else:
        print(message, file=sys.stderr, flush=True)


def setup(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
          stream: TextIO | None = None) -> str:
    """Configure the root logger from `--log-format` / `--log-level` (or the environment):
    one handler on standard error. Returns the format chosen."""
    env = os.environ if env is None else env
    fmt = choose(getattr(args, "log_format", None), env, name="log-format", var=ENV,
                 allowed=FORMATS, default="text")
    # text is for a person at a terminal, who has the commands' own status lines: warnings and
    # worse by default (as before logging was configured); json is for a log shipper: INFO
    level = choose(getattr(args, "log_level", None), env, name="log-level", var=LEVEL_ENV,
                   allowed=LEVELS, default="INFO" if fmt == "json" else "WARNING")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_meterstream", False):
            root.removeHandler(h)
    handler._meterstream = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("aiokafka", "faust", "mode"):  # their INFO is per-rebalance chatter
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    global _format
    _format = fmt
    return fmt
