"""The tamper-evident audit trail: an append-only JSON-lines file chained by SHA-256.

Every line is one record's canonical JSON (sorted keys, no spaces, UTF-8). Each record carries
`seq` (its line number - 1), `prev` (the SHA-256 of the previous line's bytes; 64 zeros for the
genesis record on line 1) and `hash` (the SHA-256 of its own canonical bytes without `hash`).
Changing a byte breaks the record's own hash; removing, inserting or moving a line breaks the
next `prev`; a cut inside a line leaves an unterminated last line. This module never repairs a
file: the writer refuses one whose last record is damaged, the verifier names the first
broken line. It never holds credentials: callers pass the audit documents the worker already
publishes (command transitions with who and why, payments applied), which carry none.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Self

from meterstream.errors import UserError

__all__ = [
    "AUDITED_EVENT_KINDS",
    "GENESIS_PREV",
    "AuditWriter",
    "Verdict",
    "canonical",
    "is_audited",
    "read_records",
    "verify",
]

GENESIS_PREV = "0" * 64
FORMAT = "meterstream-audit/1"
#: the last record is found within this many bytes of the end (records are far smaller)
TAIL_BYTES = 1 << 20
#: event kinds (on the events topic) that go into the trail besides every command_audit record
AUDITED_EVENT_KINDS = frozenset({"payment_applied", "withholding_pending", "payment_failed"})


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The one byte form of a record: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _seal(seq: int, prev: str, body: Mapping[str, Any]) -> bytes:
    doc = {"seq": seq, "prev": prev, "record": dict(body)}
    doc["hash"] = _sha(canonical(doc))
    return canonical(doc)


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def is_audited(doc: Mapping[str, Any]) -> bool:
    """Whether a document the worker publishes on the events topic belongs in the trail."""
    return doc.get("type") == "command_audit" or (
        doc.get("type") == "event" and doc.get("kind") in AUDITED_EVENT_KINDS)


class AuditWriter:
    """Appends records to one trail file; fsyncs in batches; resumes the chain after a restart.

    `append` buffers a sealed line (and syncs by itself every `batch` records); `sync` writes
    and fsyncs what is buffered. Only one process may write a trail: the file is locked
    (flock) while open. A file whose last line is damaged (a crash mid-write, or tampering) is
    refused with a UserError naming it: `meterstream audit verify` shows where; nothing here
    rewrites a byte already written.
    """

    def __init__(self, path: str | os.PathLike[str], *, batch: int = 256,
                 now: Any = time.time_ns, who: str = "worker") -> None:
        self.path = Path(path)
        self.batch = batch
        self.now = now
        self.pending: list[bytes] = []
        self.written = 0  # records appended by this writer (genesis and start included)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as exc:
            raise UserError(f"cannot open the audit trail: {exc.strerror}",
                            where=str(self.path)) from None
        self._fh: BinaryIO = os.fdopen(fd, "ab")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise UserError("the audit trail is open in another process (one writer per "
                            "file: give each worker its own audit_path)",
                            where=str(self.path)) from None
        self.seq, self.head = self._resume()
        if self.seq < 0:
            self._add({"type": "genesis", "format": FORMAT, "created": _iso(self.now())})
        self._add({"type": "trail_opened", "by": who, "ts": _iso(self.now())})
        self.sync()

    def _resume(self) -> tuple[int, str]:
        """(seq, hash) of the last record, or (-1, GENESIS_PREV) for an empty file."""
        size = os.fstat(self._fh.fileno()).st_size
        if size == 0:
            return -1, GENESIS_PREV
        with open(self.path, "rb") as fh:
            fh.seek(max(0, size - TAIL_BYTES))
            tail = fh.read()
        if not tail.endswith(b"\n"):
            self.close()
            raise UserError("the last audit record is incomplete (a crash mid-write, or the "
                            "file was cut): run `meterstream audit verify` on it, keep it as "
                            "evidence and start a new trail", where=str(self.path))
        last = tail[:-1].rsplit(b"\n", 1)[-1]
        problem = _check_line(last)
        if isinstance(problem, str):
            self.close()
            raise UserError(f"the last audit record is damaged ({problem}): run `meterstream "
                            "audit verify` on it", where=str(self.path))
        return int(problem["seq"]), _sha(last)  # prev is the hash of the whole line

    def _add(self, body: Mapping[str, Any]) -> None:
        self.seq += 1
        line = _seal(self.seq, self.head, body)
        self.head = _sha(line)
        self.pending.append(line + b"\n")
        self.written += 1

    def append(self, body: Mapping[str, Any]) -> None:
        """One record (a JSON object: an audit document the worker published)."""
        self._add(body)
        if len(self.pending) >= self.batch:
            self.sync()

    def sync(self) -> None:
        """Write what is buffered and fsync it (one write and one fsync per batch)."""
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            self.sync()
        finally:
            self._fh.close()  # closing the descriptor releases the lock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_line(line: bytes) -> dict[str, Any] | str:
    """The record on one line, or what is wrong with it on its own (not its link)."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not a JSON record (altered or cut)"
    if not isinstance(doc, dict) or set(doc) != {"seq", "prev", "record", "hash"}:
        return "not an audit record (expected exactly seq, prev, record, hash)"
    if not isinstance(doc["seq"], int) or isinstance(doc["seq"], bool) \
            or not isinstance(doc["prev"], str) or not isinstance(doc["hash"], str) \
            or not isinstance(doc["record"], dict):
        return "a field has the wrong type"
    try:
        canon = canonical(doc)
    except ValueError:
        return "not canonical JSON"
    if canon != line:
        return "not in canonical form (bytes were changed)"
    own = {k: doc[k] for k in ("seq", "prev", "record")}
    if _sha(canonical(own)) != doc["hash"]:
        return "its hash does not match its content (the record was altered)"
    return doc


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records' bodies in order (unverified: run `verify` to trust them)."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n"):
                doc = json.loads(line)
                yield dict(doc["record"])


@dataclass(frozen=True)
class Verdict:
    """What `verify` found: ok, or the first broken line (1-based) and what is wrong."""

    ok: bool
    records: int  # records checked good before the first problem (all of them when ok)
    head: str  # hash of the last good record
    line: int | None = None
    problem: str | None = None


def verify(path: str | os.PathLike[str], *, head: str | None = None) -> Verdict:
    """Check the whole chain from the genesis record. With `head` (a hash noted earlier, e.g.
    from a previous verification), also check that record is still in the file: a cut at a
    line boundary is otherwise invisible to a chain."""
    p = Path(path)
    try:
        fh = open(p, "rb")  # noqa: SIM115 - closed by the with below, after the errors
    except FileNotFoundError:
        raise UserError("audit trail not found", where=str(p)) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=str(p)) from None
    prev = GENESIS_PREV
    n = 0
    seen_head = head is None
    with fh:
        for n_line, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                return Verdict(False, n, prev, n_line,
                               "the last line is incomplete (the file was cut or a write was "
                               "interrupted)")
            doc = _check_line(line[:-1])
            if isinstance(doc, str):
                return Verdict(False, n, prev, n_line, doc)
            if doc["prev"] != prev:
                where = "the genesis value" if n_line == 1 else f"line {n_line - 1}'s hash"
                return Verdict(False, n, prev, n_line,
                               f"its prev does not match {where} (a record before it was "
                               "removed, inserted or moved)")
            if doc["seq"] != n_line - 1:
                return Verdict(False, n, prev, n_line,
                               f"seq {doc['seq']}, expected {n_line - 1}")
            if n_line == 1 and doc["record"].get("type") != "genesis":
                return Verdict(False, n, prev, n_line, "the first record is not the genesis "
                               "record")
            prev = _sha(line[:-1])
            n += 1
            if not seen_head and prev == head:
                seen_head = True
    if n == 0:
        return Verdict(False, 0, prev, 1, "the file is empty (no genesis record)")
    if not seen_head:
        return Verdict(False, n, prev, n + 1,
                       f"the record with hash {head} is not in the file: it ends after "
                       f"line {n} (records were cut off the end)")
    return Verdict(True, n, prev)
