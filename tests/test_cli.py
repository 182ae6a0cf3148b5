"""The `meterstream` dispatcher: every subcommand registers, and a user's mistake is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meterstream.pipeline.cli import build_parser, main, subcommand_modules


def test_every_subcommand_module_registers() -> None:
    parser = build_parser()
    help_text = parser.format_help()
    for name in subcommand_modules():
        assert name in help_text


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_version_runs_as_a_real_process() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meterstream", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("meterstream ")
