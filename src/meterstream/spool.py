"""A durable spool on disk: a directory of numbered append-only files, oldest first.

What a process could not hand on (the broker or the InfluxDB server is down) is appended here,
flushed and fsync'd before `append` returns, and read back oldest file first; a file is
deleted only after everything in it was accepted downstream. Files left by an earlier run are
picked up at start, and a torn tail (a crash in the middle of an append) is cut at the last
complete unit, which each user defines (`complete`). The total size is bounded. Thread-safe;
optionally one process per directory (an flock). Knows nothing of what the bytes mean.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import IO

from meterstream.errors import UserError

log = logging.getLogger("meterstream.spool")

LOCK_NAME = "lock"


class SpoolLocked(UserError):
    """Another process uses the spool directory."""


class SpoolDir:
    """The files of one spool. Subclasses say what a complete unit is and encode their data."""

    prefix = "spool-"
    suffix = ".bin"
    what = "spool"  # for messages: "collector spool", "influx spool"

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int,
                 file_bytes: int = 4 << 20, *, exclusive: bool = False) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.file_bytes = file_bytes
        self.lock = threading.Lock()
        self._lockfile: IO[bytes] | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if exclusive:
                self._lockfile = open(self.dir / LOCK_NAME, "ab")  # noqa: SIM115 (held open)
        except OSError as exc:
            raise UserError(f"cannot use the {self.what} directory: {exc.strerror}",
                            where=str(self.dir)) from None
        if self._lockfile is not None:
            try:
                fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lockfile.close()
                self._lockfile = None
                raise SpoolLocked(f"another process uses this {self.what} directory: give each "
                                  "process its own", where=str(self.dir)) from None
        self._files: deque[Path] = deque(sorted(self.dir.glob(f"{self.prefix}*{self.suffix}")))
        self._sizes = {p: p.stat().st_size for p in self._files}
        self.bytes = sum(self._sizes.values())
        self._seq = max((self._seq_of(p) for p in self._files), default=0)
        self._active: IO[bytes] | None = None  # the newest file, open for appends
        self._active_path: Path | None = None

    def _seq_of(self, p: Path) -> int:
        try:
            return int(p.name[len(self.prefix):-len(self.suffix)])
        except ValueError:
            return 0

    def __len__(self) -> int:
        """Files in the spool."""
        return len(self._files)

    def files(self) -> list[Path]:
        with self.lock:
            return list(self._files)

    @staticmethod
    def complete(data: bytes) -> int:
        """How many leading bytes of a file's content are whole units (the rest is torn)."""
        return len(data)

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append_locked(self, data: bytes) -> None:
        """Append durably (the caller holds the lock and checked the bound)."""
        if self._active is None or self._sizes[self._active_path] >= self.file_bytes:  # type: ignore[index]
            self._close_active()
            self._seq += 1
            self._active_path = self.dir / f"{self.prefix}{self._seq:012d}{self.suffix}"
            self._active = open(self._active_path, "ab")  # noqa: SIM115 (kept open)
            self._files.append(self._active_path)
            self._sizes[self._active_path] = 0
            self._sync_dir()
        self._active.write(data)
        self._active.flush()
        os.fsync(self._active.fileno())
        self._sizes[self._active_path] += len(data)  # type: ignore[index]
        self.bytes += len(data)

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None
            self._active_path = None

    def oldest_bytes(self) -> tuple[Path, bytes] | None:
        """The oldest file and its complete units (closed to appends if it was the active one);
        empty files are removed on the way."""
        with self.lock:
            while self._files:
                p = self._files[0]
                if p == self._active_path:
                    self._close_active()
                data = p.read_bytes()
                used = self.complete(data)
                if used < len(data):
                    log.warning("%s %s: dropping a torn tail of %d bytes (the process stopped "
                                "in the middle of an append)", self.what, p, len(data) - used)
                    data = data[:used]
                if data:
                    return p, data
                self._remove_locked(p)
            return None

    def remove(self, p: Path) -> None:
        """Everything in file `p` was accepted downstream: delete it."""
        with self.lock:
            self._remove_locked(p)

    def _remove_locked(self, p: Path) -> None:
        if p == self._active_path:
            self._close_active()
        p.unlink(missing_ok=True)
        if p in self._files:
            self._files.remove(p)
        self.bytes -= self._sizes.pop(p, 0)
        self._sync_dir()

    def adopt(self, other: SpoolDir) -> int:
        """Take over every file of `other` (a spool whose process is gone: the caller holds its
        lock) by renaming it into this directory as the newest files; returns the files taken.
        A rename is atomic, so a file is in one spool or the other, never lost and never in
        both, whenever either process stops."""
        n = 0
        with self.lock, other.lock:
            other._close_active()
            while other._files:
                src = other._files.popleft()
                size = other._sizes.pop(src, 0)
                other.bytes -= size
                self._seq += 1
                dst = self.dir / f"{self.prefix}{self._seq:012d}{self.suffix}"
                try:
                    os.rename(src, dst)
                except FileNotFoundError:
                    continue
                self._files.append(dst)
                self._sizes[dst] = size
                self.bytes += size
                n += 1
            if n:
                self._sync_dir()
                other._sync_dir()
        return n

    def close(self) -> None:
        with self.lock:
            self._close_active()
            if self._lockfile is not None:
                self._lockfile.close()
                self._lockfile = None
