"""The `meterstream` command: one subcommand per module in this package.

Each subcommand module defines `register(subparsers)` and keeps its heavy imports inside the
handler, so that `meterstream --help` and a user's mistake answer fast. A UserError becomes one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from meterstream import __version__
from meterstream.errors import UserError


def subcommand_modules() -> list[str]:
    """Every module of this package is a subcommand; `--help` lists them alphabetically."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterstream",
        description="Smart-meter collection and prepaid cost control head-end.",
    )
    parser.add_argument("--version", action="version", version=f"meterstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in subcommand_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"meterstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
