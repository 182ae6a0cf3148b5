"""Errors a person reads: what was wrong, where, and what to do.

The CLI prints a UserError as one line and exits with status 2; it never shows a traceback for
a user's mistake. Code that detects bad input raises UserError (or a subclass) with the place.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a person: a file, an argument, a configuration value."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
