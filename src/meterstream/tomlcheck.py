"""A checked reader of TOML tables: typed getters that name the file, the key and the reason.

Shared by every configuration loader (the collectors', the simulated field's) so that a bad
value reads the same everywhere: `FILE: KEY: reason`, and an unknown key is a mistake. Pure:
it never opens a file; callers parse the TOML and hand the table in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from meterstream.errors import UserError

#: Upper-case identifiers: area, terminal and firmware names.
NAME_RE = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,15}$")


class TomlTable:
    """One TOML table with the file and its dotted path: typed getters that raise UserError."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str = "",
                 docs: str = "the docs") -> None:
        if not isinstance(data, Mapping):
            raise UserError(f"{prefix or 'top level'}: expected a table", where=source)
        self.data = data
        self.source = source
        self.prefix = prefix
        self.docs = docs  # where the keys are listed, for the unknown-key message
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def fail(self, k: str, reason: str) -> UserError:
        return UserError(f"{self.key(k)}: {reason}", where=self.source)

    def has(self, k: str) -> bool:
        return k in self.data

    def raw(self, k: str, default: Any = None) -> Any:
        self.used.add(k)
        return self.data.get(k, default)

    def sub(self, k: str) -> TomlTable:
        v = self.raw(k, {})
        if not isinstance(v, Mapping):
            raise self.fail(k, "expected a table")
        return TomlTable(v, self.source, self.key(k), self.docs)

    def subs(self, k: str) -> list[TomlTable]:
        v = self.raw(k, [])
        if not isinstance(v, list) or not all(isinstance(x, Mapping) for x in v):
            raise self.fail(k, f"expected an array of tables ([[{self.key(k)}]])")
        return [TomlTable(x, self.source, f"{self.key(k)}[{i}]", self.docs)
                for i, x in enumerate(v)]

    def boolean(self, k: str, default: bool) -> bool:
        v = self.raw(k, default)
        if not isinstance(v, bool):
            raise self.fail(k, f"expected true or false, got {v!r}")
        return v

    def integer(self, k: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        v = self.raw(k, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(k, f"expected an integer, got {v!r}")
        return self._bounded(k, v, lo, hi)

    def number(self, k: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        v = self.raw(k, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(k, f"expected a number, got {v!r}")
        return float(self._bounded(k, v, lo, hi))

    def _bounded(self, k: str, v: Any, lo: Any, hi: Any) -> Any:
        if lo is not None and v < lo:
            raise self.fail(k, f"{v} is below the minimum {lo}")
        if hi is not None and v > hi:
            raise self.fail(k, f"{v} is above the maximum {hi}")
        return v

    def string(self, k: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        v = self.raw(k, default)
        if not isinstance(v, str):
            raise self.fail(k, f"expected a string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.fail(k, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def name(self, k: str, default: str) -> str:
        v = self.string(k, default)
        if not NAME_RE.match(v):
            raise self.fail(k, f"{v!r}: use 1-16 of A-Z 0-9 . _ - (upper case, starting alphanumeric)")
        return v

    def span(self, k: str, default: tuple[float, float], lo: float | None = None,
             hi: float | None = None) -> tuple[float, float]:
        """A [min, max] pair (a single number means min = max)."""
        v = self.raw(k, list(default))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v, v]
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise self.fail(k, f"expected [min, max] numbers, got {v!r}")
        a, b = float(v[0]), float(v[1])
        if not (math.isfinite(a) and math.isfinite(b)):
            raise self.fail(k, "expected finite numbers")
        if a > b:
            raise self.fail(k, f"min {a} is above max {b}")
        self._bounded(k, a, lo, hi)
        self._bounded(k, b, lo, hi)
        return a, b

    def share(self, k: str, default: float) -> float:
        return self.number(k, default, 0.0, 1.0)

    def decimal(self, k: str, default: str, places: int, lo: Decimal | None = None) -> int:
        """A decimal string such as "12.34" -> an exact integer in units of 10^-places."""
        v = self.raw(k, default)
        return self._decimal(k, v, places, lo)

    def _decimal(self, k: str, v: Any, places: int, lo: Decimal | None = None) -> int:
        if not isinstance(v, str):
            raise self.fail(k, f"expected a decimal string such as \"12.34\", got {v!r} "
                               "(quote it: floats are not exact)")
        try:
            d = Decimal(v.strip())
        except InvalidOperation:
            raise self.fail(k, f"{v!r} is not a decimal number") from None
        if not d.is_finite():
            raise self.fail(k, f"{v!r} is not a finite number")
        scaled = d.scaleb(places)
        if scaled != scaled.to_integral_value():
            raise self.fail(k, f"{v!r} has more than {places} decimal places")
        if lo is not None and d < lo:
            raise self.fail(k, f"{v!r} is below the minimum {lo}")
        return int(scaled)

    def finish(self) -> None:
        """An unknown key is a mistake (usually a typo): say which one and what is allowed."""
        for k in self.data:
            if k not in self.used:
                raise self.fail(k, f"unknown key (check the spelling; {self.docs} lists the keys)")
