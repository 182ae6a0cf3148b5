"""Collectors on Kafka: publish what the collectors hand on, and take the commands they execute.

`KafkaSink` is the collectors' Sink on Kafka: reading batches to `readings` (binary), events to
`links` and command results to `results` (JSON), keyed by terminal, without blocking the event
loop; while the broker is unreachable it spools to disk and publishes when it returns.
`KafkaCollector` runs a `Collector` inside a consumer group on `commands`: it holds exactly the
terminals whose partition it is assigned, so several collector processes share the archive
with no manual sharding, and a command reaches the process that holds its terminal.
It never decodes protocol bytes and never holds money. docs/collectors-kafka.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import ConsumerRebalanceListener
from aiokafka.partitioner import DefaultPartitioner

from meterstream.collectors.archive import Archive
from meterstream.collectors.batch import CollectorEvent, ReadingBatch
from meterstream.collectors.collector import Collector
from meterstream.collectors.commands import ACTIONS, REFUSED, UNCONFIRMED, Command, CommandResult
from meterstream.collectors.config import CollectorConfig
from meterstream.errors import UserError
from meterstream.pipeline import metrics, topics
from meterstream.spool import SpoolDir

log = logging.getLogger(__name__)

DEFAULT_GROUP = "meterstream-collectors"
#: topics a collector writes or reads; they must exist (the demo and the deployment create them)
NEEDED = (topics.READINGS, topics.LINKS, topics.RESULTS, topics.COMMANDS, topics.DEAD_LETTER)
_PARTITIONER = DefaultPartitioner()


def partition_of(terminal: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a message keyed by `terminal` (murmur2 of
    the UTF-8 id, aiokafka's own function): the partition that owns the terminal."""
    every = list(range(partitions))
    return int(_PARTITIONER(terminal.encode(), every, every))


# --- records and the spool ---------------------------------------------------------------------

@dataclass(slots=True)
class Record:
    """One message to publish; `seq` orders everything the sink was handed."""

    seq: int
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
_BODY = struct.Struct("<QHHIH")  # seq, len(topic), len(key), len(value), number of headers
_HEADER = struct.Struct("<HH")  # len(header key), len(header value)
SPOOL_PREFIX, SPOOL_SUFFIX = "spool-", ".rec"


def encode_record(r: Record) -> bytes:
    t = r.topic.encode()
    parts = [_BODY.pack(r.seq, len(t), len(r.key), len(r.value), len(r.headers)), t, r.key,
             r.value]
    for k, v in r.headers:
        kb = k.encode()
        parts += [_HEADER.pack(len(kb), len(v)), kb, v]
    body = b"".join(parts)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def decode_records(data: bytes) -> tuple[list[Record], int]:
    """The complete records at the start of `data`, and how many bytes they take (a torn or
    corrupt tail, from a crash in the middle of an append, is where decoding stops)."""
    out: list[Record] = []
    pos = 0
    while pos + _FRAME.size <= len(data):
        n, crc = _FRAME.unpack_from(data, pos)
        body = data[pos + _FRAME.size:pos + _FRAME.size + n]
        if len(body) < n or zlib.crc32(body) != crc or n < _BODY.size:
            break
        seq, tl, kl, vl, hn = _BODY.unpack_from(body)
        p = _BODY.size
        topic = body[p:p + tl].decode()
        p += tl
        key = body[p:p + kl]
        p += kl
        value = body[p:p + vl]
        p += vl
        headers = []
        for _ in range(hn):
            hk, hv = _HEADER.unpack_from(body, p)
            p += _HEADER.size
            headers.append((body[p:p + hk].decode(), body[p + hk:p + hk + hv]))
            p += hk + hv
        out.append(Record(seq, topic, key, value, tuple(headers)))
        pos += _FRAME.size + n
    return out, pos


class Spool(SpoolDir):
    """A spool of length-prefixed records (meterstream.spool), one process per directory.

    `append` takes whole records up to the bound; a file is deleted only after every record in
    it was acknowledged by the broker; a torn last record is cut off."""

    prefix, suffix, what = SPOOL_PREFIX, SPOOL_SUFFIX, "collector spool"

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int = 256 << 20,
                 file_bytes: int = 4 << 20) -> None:
        super().__init__(directory, max_bytes, file_bytes, exclusive=True)

    @staticmethod
    def complete(data: bytes) -> int:
        return decode_records(data)[1]

    def max_seq(self) -> int:
        """The highest record seq in the spool (0 if empty): a restarted sink numbers after it."""
        top = 0
        for p in self.files():
            recs, _n = decode_records(p.read_bytes())
            top = max([top, *(r.seq for r in recs)])
        return top

    def append(self, records: list[Record]) -> int:
        """Append records durably, in order; how many were taken (the rest: the bound)."""
        with self.lock:
            blobs = []
            size = self.bytes
            for r in records:
                b = encode_record(r)
                if size + len(b) > self.max_bytes:
                    break
                blobs.append(b)
                size += len(b)
            if blobs:
                self._append_locked(b"".join(blobs))
            return len(blobs)

    def oldest(self) -> tuple[Path, list[Record]] | None:
        """The oldest file and its records."""
        got = self.oldest_bytes()
        if got is None:
            return None
        p, data = got
        return p, decode_records(data)[0]


# --- the sink ----------------------------------------------------------------------------------

@dataclass
class SinkStats:
    """Counters since start; every record handed to the sink ends in exactly one of published,
    failed or refused (or is still pending / spooled)."""

    handed: int = 0  # records the collectors handed to the sink
    published: int = 0  # acknowledged by the broker (directly or from the spool)
    spooled: int = 0  # written to the spool (the broker was unreachable)
    replayed: int = 0  # of published: sent from the spool
    errors: int = 0  # delivery errors seen (each attempt), retriable or not
    failed: int = 0  # refused by the broker for good (e.g. too large): dropped, logged
    refused: int = 0  # the spool was at its bound: dropped, logged
    last_error: str = ""


def _retriable(exc: BaseException) -> bool:
    """Worth retrying later: the broker is down, slow, or moving leaders."""
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

    if isinstance(exc, (KafkaConnectionError, KafkaTimeoutError, asyncio.CancelledError,
                        ConnectionError, TimeoutError)):
        return True
    return bool(getattr(exc, "retriable", False))


class KafkaSink:
    """The collectors' Sink on Kafka: non-blocking, ordered, spooled while the broker is away.

    `batch`, `event` and `command` only append to a queue; one task hands the queue to an
    aiokafka producer (`send` without awaiting each delivery; at most `max_in_flight` records
    unacknowledged). A retriable delivery error means the broker is unreachable: from then on
    records go to the spool (in order: the failed ones first, the queue once nothing is in
    flight) and the spool is replayed, oldest file first, until it is empty; then records go
    straight out again. A record that the broker refuses for good is counted `failed` and
    logged. `flush()` waits until everything handed so far is acknowledged or spooled.
    """

    def __init__(self, bootstrap: str, *, spool_dir: str | os.PathLike[str],
                 spool_max_bytes: int = 256 << 20, max_in_flight: int = 1000,
                 max_pending: int = 20_000, request_timeout_s: float = 10.0,
                 backoff_s: tuple[float, float] = (0.5, 30.0),
                 producer_options: dict[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.spool = Spool(spool_dir, spool_max_bytes)
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self.producer_options = dict(producer_options or {})
        self.stats = SinkStats()
        self.annotations: dict[str, dict[str, Any]] = {}  # command id -> extra result fields
        self._producer: Any = None
        self._queue: deque[Record] = deque()
        self._inflight: dict[int, Record] = {}
        self._sweep = 0
        self._sweeping = False
        self._wave: dict[tuple[str, bytes], int] = {}  # key -> the sweep its records went in
        self._wave_n: dict[tuple[str, bytes], int] = {}  # key -> its records in flight
        self._failed: list[Record] = []  # retriable failures not yet spooled
        self._seq = self.spool.max_seq()
        self._low = self._seq + 1  # lowest seq not yet settled (acknowledged, spooled, dropped)
        self._unsettled: set[int] = set()
        self._spooling = len(self.spool) > 0  # replay what an earlier run left first
        self._retry_at = 0.0
        self._backoff = backoff_s[0]
        self._replay_done: dict[Path, set[int]] = {}  # records of a spool file acknowledged
        self._wake: asyncio.Event | None = None
        self._settled: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- the Sink interface (synchronous, from the event loop) --------------------------------

    def batch(self, batch: ReadingBatch) -> None:
        self._put(topics.READINGS.name, batch.terminal, batch.to_bytes())
        metrics.count_batch(batch.outcome)

    def event(self, event: CollectorEvent) -> None:
        self._put(topics.LINKS.name, event.terminal, event.to_json().encode())
        metrics.COLLECTOR_LINK_EVENTS.labels(event.kind).inc()

    def command(self, result: CommandResult) -> None:
        extra = self.annotations.pop(result.command.id, None)
        if extra:
            value = json.dumps({**result.to_dict(), **extra}, ensure_ascii=False,
                               separators=(",", ":"))
        else:
            value = result.to_json()
        self._put(topics.RESULTS.name, result.terminal, value.encode(),
                  (("command-id", result.command.id.encode()),))
        metrics.COLLECTOR_COMMAND_RESULTS.labels(result.command.action, result.outcome).inc()

    def dead_letter(self, key: bytes | None, value: bytes | None, reason: str, source: str) -> None:
        """Input that was refused, with the reason and the original bytes (as text if UTF-8)."""
        raw = value or b""
        try:
            original: str = raw.decode()
            enc = "utf-8"
        except UnicodeDecodeError:
            original, enc = raw.hex(), "hex"
        doc = {"type": "dead-letter", "source": source, "reason": reason,
               "key": (key or b"").decode(errors="replace"), "original": original,
               "encoding": enc}
        self._put(topics.DEAD_LETTER.name, (key or b"").decode(errors="replace"),
                  json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
        metrics.COLLECTOR_DEAD_LETTERS.inc()

    def _put(self, topic: str, key: str, value: bytes,
             headers: tuple[tuple[str, bytes], ...] = ()) -> None:
        self._seq += 1
        r = Record(self._seq, topic, key.encode(), value, headers)
        self.stats.handed += 1
        self._unsettled.add(r.seq)
        self._queue.append(r)
        if len(self._queue) > self.max_pending and not self._sweeping:
            # the broker is too slow or away and the queue is at its bound: to disk now
            # (synchronously: one fsync) rather than grow without end
            self._spool_sync(list(self._queue))
            self._queue.clear()
            self._enter_spooling("the queue reached its bound")
        if self._wake is not None:
            self._wake.set()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the publishing task. An unreachable broker is not an error: records are spooled
        until it answers."""
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        if not self._spooling and not await self._connect():
            self._enter_spooling(self.stats.last_error or "cannot connect")
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish (or spool) what is queued, then close. Whatever is still unsettled after
        `timeout` is spooled (a record in flight then may reach the broker twice)."""
        self._stopping = True
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                pass
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        rest = sorted([*self._failed, *self._inflight.values()], key=lambda r: r.seq)
        rest += list(self._queue)
        self._failed.clear()
        self._inflight.clear()
        self._queue.clear()
        if rest:
            self._spool_sync(rest)
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), timeout)
        self.spool.close()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record handed so far is acknowledged, spooled or dropped; False if
        `timeout` passed first."""
        target = self._seq
        assert self._settled is not None, "the sink is not started"
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while self._low <= target:
            self._settled.clear()
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(self._settled.wait(), left)
            except TimeoutError:
                return False
        return True

    @property
    def spooling(self) -> bool:
        """True while the broker is unreachable (or the spool is still being replayed)."""
        return self._spooling

    @property
    def pending(self) -> int:
        """Records handed and not yet acknowledged, spooled or dropped."""
        return len(self._unsettled)

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {"handed": s.handed, "published": s.published, "pending": self.pending,
                "spooled": s.spooled, "replayed": s.replayed, "errors": s.errors,
                "failed": s.failed, "refused": s.refused, "spooling": self._spooling,
                "spool_bytes": self.spool.bytes, "last_error": s.last_error}

    # --- bookkeeping ------------------------------------------------------------------------

    def _settle(self, seq: int) -> None:
        self._unsettled.discard(seq)
        if seq == self._low:
            top = self._seq
            while self._low <= top and self._low not in self._unsettled:
                self._low += 1
        if self._settled is not None:
            self._settled.set()

    def _enter_spooling(self, why: str) -> None:
        if not self._spooling:
            self._spooling = True
            self._backoff = self.backoff_s[0]
            self._retry_at = time.monotonic() + self._backoff
            log.warning("kafka %s unreachable (%s): spooling to %s", self.bootstrap, why,
                        self.spool.dir)
            if self._wake is not None:
                self._wake.set()

    def _error(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]

    def _spooled(self, recs: list[Record], taken: int) -> None:
        self.stats.spooled += taken
        for r in recs[:taken]:
            self._settle(r.seq)
        if taken < len(recs):
            lost = len(recs) - taken
            self.stats.refused += lost
            log.error("collector spool %s is at its bound (%d bytes): %d records dropped",
                      self.spool.dir, self.spool.max_bytes, lost)
            for r in recs[taken:]:
                self._settle(r.seq)

    def _spool_sync(self, recs: list[Record]) -> None:
        self._spooled(recs, self.spool.append(recs))

    async def _spool_async(self, recs: list[Record]) -> None:
        if recs:
            self._spooled(recs, await asyncio.to_thread(self.spool.append, recs))

    # --- the publishing task ------------------------------------------------------------------

    async def _connect(self) -> bool:
        from aiokafka import AIOKafkaProducer

        opts: dict[str, Any] = {"acks": "all", "linger_ms": 5, "max_batch_size": 1 << 20,
                                "max_request_size": 1 << 20,
                                "request_timeout_ms": int(self.request_timeout_s * 1000)}
        opts.update(self.producer_options)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **opts)
        try:
            await producer.start()
        except Exception as exc:  # noqa: BLE001 - any failure to connect: spool and retry
            self._error(exc)
            with contextlib.suppress(Exception):
                await producer.stop()
            return False
        self._producer = producer
        return True

    def _delivered(self, r: Record, fut: asyncio.Future[Any]) -> None:
        self._inflight.pop(r.seq, None)
        k = (r.topic, r.key)
        left = self._wave_n.get(k, 1) - 1
        if left <= 0:
            self._wave_n.pop(k, None)
            self._wave.pop(k, None)
        else:
            self._wave_n[k] = left
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is None:
            self.stats.published += 1
            self._settle(r.seq)
        else:
            self._send_failed(r, exc)
        assert self._wake is not None
        self._wake.set()

    def _send_failed(self, r: Record, exc: BaseException) -> None:
        self._error(exc)
        if _retriable(exc):
            self._failed.append(r)
            self._enter_spooling(self.stats.last_error)
        else:
            self.stats.failed += 1
            log.error("kafka refused a record for %s (key %s) for good: %s", r.topic,
                      r.key.decode(errors="replace"), self.stats.last_error)
            self._settle(r.seq)

    def _idle(self) -> bool:
        return not self._queue and not self._inflight and not self._failed

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            timeout = None
            if self._spooling:
                timeout = max(0.0, self._retry_at - time.monotonic())
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._spooling:
                # failed records are older than the queue: to the spool first; then replay
                # (the queue, newer, waits in memory); the queue goes straight out if the spool
                # is empty after it, else to the spool
                failed = sorted(self._failed, key=lambda r: r.seq)
                self._failed.clear()
                await self._spool_async(failed)
                if not self._stopping and not self._inflight and (
                        time.monotonic() >= self._retry_at):
                    await self._replay()
            if self._spooling:
                await self._spool_pending()
            else:
                await self._send_queue()
            if self._stopping and self._idle():
                return

    async def _send_queue(self) -> None:
        if self._producer is None and not await self._connect():
            self._enter_spooling(self.stats.last_error)
            return
        # One wave per key: a terminal's records are handed to the producer together (one
        # producer batch of their partition, which succeeds or fails as a whole), and its next
        # records only once that wave is acknowledged; so a failure never leaves a later record
        # of the terminal delivered before an earlier one that goes to the spool.
        self._sweep += 1
        self._sweeping = True  # the queue is split between it and `later` meanwhile
        try:
            await self._sweep_queue()
        finally:
            self._sweeping = False

    async def _sweep_queue(self) -> None:
        held: set[tuple[str, bytes]] = set()
        later: deque[Record] = deque()
        while self._queue and not self._spooling:
            r = self._queue.popleft()
            k = (r.topic, r.key)
            wave = self._wave.get(k)
            if k in held or (wave is not None and wave != self._sweep) or (
                    len(self._inflight) >= self.max_in_flight):
                held.add(k)
                later.append(r)
                continue
            try:
                fut = await self._producer.send(r.topic, r.value, key=r.key,
                                                headers=list(r.headers) or None)
            except Exception as exc:  # noqa: BLE001 - sorted by _send_failed
                self._send_failed(r, exc)
                continue
            self._inflight[r.seq] = r
            self._wave[k] = self._sweep
            self._wave_n[k] = self._wave_n.get(k, 0) + 1
            fut.add_done_callback(functools.partial(self._delivered, r))
        later.extend(self._queue)
        self._queue = later

    async def _spool_pending(self) -> None:
        """Failed records first (in order), then the queue once nothing is in flight, so that
        the spool keeps the order the collectors handed things in."""
        recs = sorted(self._failed, key=lambda r: r.seq)
        self._failed.clear()
        if not self._inflight:
            recs += self._queue
            self._queue.clear()
        await self._spool_async(recs)

    async def _replay(self) -> None:
        """Send the oldest spool file; delete it once every record in it is acknowledged."""
        if self._producer is None and not await self._connect():
            self._retry_later()
            return
        item = await asyncio.to_thread(self.spool.oldest)
        if item is None:
            self._spooling = False
            self._backoff = self.backoff_s[0]
            log.warning("kafka %s reachable again: spool replayed, publishing directly",
                        self.bootstrap)
            assert self._wake is not None
            self._wake.set()
            return
        path, recs = item
        done = self._replay_done.setdefault(path, set())
        ok = True
        probed = False
        window: list[tuple[int, asyncio.Future[Any]]] = []
        for i, r in enumerate(recs):
            if i in done:
                continue
            try:
                fut = await self._producer.send(r.topic, r.value, key=r.key,
                                                headers=list(r.headers) or None)
            except Exception as exc:  # noqa: BLE001
                self._error(exc)
                ok = False
                break
            window.append((i, fut))
            # the first record alone probes the broker: a broker that is back only halfway
            # would take some records and fail others, and what it fails is sent again after
            # what it took (out of order)
            if len(window) >= (1 if not probed else self.max_in_flight):
                probed = True
                ok = await self._await_replayed(window, recs, done)
                window = []
                if not ok:
                    break
        if window:
            ok = await self._await_replayed(window, recs, done) and ok
        if ok and len(done) == len(recs):
            await asyncio.to_thread(self.spool.remove, path)
            del self._replay_done[path]
            self._backoff = self.backoff_s[0]
            self._retry_at = 0.0
            assert self._wake is not None
            self._wake.set()  # the next file, or back to direct
        else:
            self._retry_later()

    async def _await_replayed(self, window: list[tuple[int, asyncio.Future[Any]]],
                              recs: list[Record], done: set[int]) -> bool:
        got = await asyncio.gather(*(f for _i, f in window), return_exceptions=True)
        ok = True
        for (i, _f), res in zip(window, got, strict=True):
            if isinstance(res, BaseException):
                self._error(res)
                if _retriable(res):
                    ok = False
                    continue
                self.stats.failed += 1
                log.error("kafka refused a spooled record for %s for good: %s", recs[i].topic,
                          self.stats.last_error)
            else:
                self.stats.published += 1
                self.stats.replayed += 1
            done.add(i)
        return ok

    def _retry_later(self) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self.backoff_s[1], self._backoff * 2)


# --- command intake ----------------------------------------------------------------------------

class BadCommand(ValueError):
    """A command message that cannot be executed as it stands (goes to the dead letters)."""


def parse_command(value: bytes | None) -> tuple[str, Command, str]:
    """(terminal, Command, who) from a command message; BadCommand saying what is wrong."""
    try:
        doc = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadCommand(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadCommand("not a JSON object")
    for k in ("id", "terminal", "meter", "action"):
        if not isinstance(doc.get(k), str) or not doc[k]:
            raise BadCommand(f"{k!r} missing or not a non-empty string")
    if doc["action"] not in ACTIONS:
        raise BadCommand(f"unknown action {doc['action']!r}: use one of {', '.join(ACTIONS)}")
    meter = doc["meter"]
    if len(meter) != 12 or not meter.isdigit():
        raise BadCommand(f"meter {meter!r} is not a 12-digit address")
    reason = doc.get("reason") or ""
    who = doc.get("who") or ""
    if not isinstance(reason, str) or not isinstance(who, str):
        raise BadCommand("'reason' and 'who' must be strings")
    return doc["terminal"], Command(meter, doc["action"], id=doc["id"], reason=reason), who


@dataclass
class _Offsets:
    """Offsets of one held partition: commit only below the oldest command still running."""

    next: int | None = None  # one past the last offset taken in
    running: set[int] = field(default_factory=set)
    committed: int | None = None

    def committable(self) -> int | None:
        return min(self.running) if self.running else self.next


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's ConsumerRebalanceListener, handing over to the collector."""

    def __init__(self, owner: KafkaCollector) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.owner._revoke({tp.partition for tp in revoked
                                  if tp.topic == topics.COMMANDS.name})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.owner._assign({tp.partition for tp in assigned
                                  if tp.topic == topics.COMMANDS.name})


class KafkaCollector:
    """A `Collector` in a consumer group on `commands`: it holds the terminals of its partitions.

    On assignment it starts the sessions of exactly the terminals whose partition
    (`partition_of`) it was given; on revocation it lets running commands finish for
    `revoke_grace_s`, stops those sessions (a command still running is reported unconfirmed and
    its offset is not committed, so the new owner runs it again), and commits. Commands are
    executed concurrently; a command's offset is committed only after its result is
    acknowledged by the broker or spooled.
    """

    def __init__(self, archive: Archive, cfg: CollectorConfig, bootstrap: str, *,
                 group: str = DEFAULT_GROUP, sink: KafkaSink | None = None,
                 spool_dir: str | os.PathLike[str] | None = None,
                 session_timeout_s: float = 10.0, heartbeat_interval_s: float | None = None,
                 rebalance_timeout_s: float | None = None, revoke_grace_s: float = 1.0,
                 fetch_max_wait_ms: int = 100, client_id: str | None = None) -> None:
        self.archive = archive
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.group = group
        if sink is None:
            if spool_dir is None:  # a spool that does not outlive this process
                spool_dir = Path(tempfile.gettempdir()) / f"meterstream-spool-{os.getpid()}-{id(self):x}"
            sink = KafkaSink(bootstrap, spool_dir=spool_dir)
        self.sink = sink
        self.collector = Collector(archive, cfg, sink)
        self.session_timeout_s = session_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s or max(0.1, session_timeout_s / 3.5)
        self.rebalance_timeout_s = rebalance_timeout_s or session_timeout_s
        self.revoke_grace_s = revoke_grace_s
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.client_id = client_id or f"meterstream-collector-{os.getpid()}"
        self.partitions = 0  # of the commands topic
        self.terminal_partition: dict[str, int] = {}
        self.held: set[int] = set()  # partitions whose commands are taken in
        self._offsets: dict[int, _Offsets] = {}
        self._revoking: set[int] = set()
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._consumer: Any = None
        self._loop_task: asyncio.Task[None] | None = None
        self._commit_lock = asyncio.Lock()
        self.commands_taken = 0
        self.commands_skipped = 0  # arrived for a partition no longer held (left for its owner)
        self.rebalances = 0
        self._stopped = False
        metrics.watch("collector", self)  # its spool, terminals and lag at every scrape

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the topics, start the sink and the dial-in listener, join the group. Sessions
        start as partitions are assigned."""
        from aiokafka import AIOKafkaConsumer

        for plan in self.archive.terminals.values():
            # sessions start later, inside the rebalance listener, where an error would only be
            # logged by aiokafka: build each once now, so a bad configuration stops the start
            self.collector._session(plan)
        self.partitions = await check_topics(self.bootstrap)
        self.terminal_partition = {tid: partition_of(tid, self.partitions)
                                   for tid in self.archive.terminals}
        await self.sink.start()
        try:
            await self.collector.start(terminals=())
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=self.group, client_id=self.client_id,
                enable_auto_commit=False, auto_offset_reset="latest",
                session_timeout_ms=int(self.session_timeout_s * 1000),
                heartbeat_interval_ms=int(self.heartbeat_interval_s * 1000),
                rebalance_timeout_ms=int(self.rebalance_timeout_s * 1000),
                fetch_max_wait_ms=self.fetch_max_wait_ms)
            self._consumer.subscribe([topics.COMMANDS.name], listener=_Listener(self))
            await self._consumer.start()
        except BaseException:
            await self.collector.stop()
            await self.sink.stop()
            raise
        self._loop_task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        """Finish or report the running commands, release every terminal, leave the group,
        publish what is queued (or spool it). A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        metrics.unwatch("collector", self)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        await self._revoke(set(self._offsets) | self.held)
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 10.0)
        await self.collector.stop()
        await self.sink.stop()

    @property
    def terminals(self) -> set[str]:
        """The terminals this process holds now."""
        return set(self.collector.sessions)

    def commands_lag(self) -> dict[int, int]:
        """Commands behind the end of each held partition (metrics): the high watermark of the
        last fetch minus the next offset to take; partitions not fetched yet are left out."""
        from aiokafka import TopicPartition

        out: dict[int, int] = {}
        consumer = self._consumer
        for p in sorted(self.held):
            po = self._offsets.get(p)
            nxt = None if po is None else (po.next if po.next is not None else po.committed)
            hw = None
            with contextlib.suppress(Exception):  # not assigned any more, or no consumer
                hw = consumer.highwater(TopicPartition(topics.COMMANDS.name, p))
            if hw is not None and nxt is not None:
                out[p] = max(0, hw - nxt)
        return out

    def summary(self) -> dict[str, Any]:
        return {**self.collector.summary(), "partitions": sorted(self.held),
                "commands": self.commands_taken, "running": len(self._tasks),
                "rebalances": self.rebalances, "kafka": self.sink.summary()}

    # --- rebalancing ------------------------------------------------------------------------

    def _terminals_of(self, parts: Iterable[int]) -> list[str]:
        ps = set(parts)
        return [t for t, p in self.terminal_partition.items() if p in ps]

    async def _assign(self, parts: set[int]) -> None:
        self.rebalances += 1
        assert self._consumer is not None
        n = len(self._consumer.partitions_for_topic(topics.COMMANDS.name) or ())
        if n and n != self.partitions:
            log.warning("%s now has %d partitions (was %d): terminals move with them",
                        topics.COMMANDS.name, n, self.partitions)
            self.partitions = n
            self.terminal_partition = {tid: partition_of(tid, n) for tid in self.archive.terminals}
        for p in parts:
            self._offsets.setdefault(p, _Offsets())
        self.held |= parts
        tids = self._terminals_of(parts)
        for tid in tids:
            try:
                self.collector.start_terminal(tid)
            except Exception:  # checked at start; never let one terminal stop the others
                log.exception("cannot start the session of terminal %s", tid)
        log.info("collector %s holds partitions %s: %d terminals", self.client_id,
                 sorted(self.held), len(self.collector.sessions))
        asyncio.get_running_loop().create_task(self._pin_offsets(parts))

    async def _pin_offsets(self, parts: set[int]) -> None:
        """A partition the group never committed gets its current position committed, so that
        a later owner resumes there rather than at the end ('latest' applies once, when the
        group first sees a partition)."""
        from aiokafka import TopicPartition

        consumer = self._consumer
        for p in sorted(parts):
            tp = TopicPartition(topics.COMMANDS.name, p)
            try:
                if await consumer.committed(tp) is None and p in self.held:
                    pos = await consumer.position(tp)
                    po = self._offsets.get(p)
                    if po is not None and po.next is None and p in self.held:
                        await consumer.commit({tp: pos})
                        po.committed = pos
            except Exception as exc:  # noqa: BLE001 - a rebalance moved it meanwhile
                log.info("could not pin the offset of %s: %s", tp, exc)

    async def _revoke(self, parts: set[int]) -> None:
        if not parts:
            return
        self.held -= parts
        self._revoking |= parts
        try:
            running = [t for t, p in self._tasks.items() if p in parts]
            if running:
                await asyncio.wait(running, timeout=self.revoke_grace_s)
            await asyncio.gather(*(self.collector.stop_terminal(t)
                                   for t in self._terminals_of(parts)
                                   if t in self.collector.sessions), return_exceptions=True)
            running = [t for t in running if not t.done()]
            if running:  # they report unconfirmed now that their sessions stopped
                await asyncio.wait(running, timeout=5.0)
            for p in sorted(parts):
                await self._commit(p, force=True)
        finally:
            self._revoking -= parts
            for p in parts:
                if p not in self.held:
                    self._offsets.pop(p, None)

    # --- commands ---------------------------------------------------------------------------

    async def _consume(self) -> None:
        from aiokafka.errors import KafkaError

        assert self._consumer is not None
        while True:
            try:
                got = await self._consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log.warning("reading %s: %s", topics.COMMANDS.name, exc)
                await asyncio.sleep(1.0)
                continue
            for tp, msgs in got.items():
                for msg in msgs:
                    self._take(tp.partition, msg)

    def _take(self, p: int, msg: Any) -> None:
        po = self._offsets.get(p)
        if p not in self.held or po is None:
            # fetched before a revocation: not executed, not committed; the new owner reads it
            self.commands_skipped += 1
            log.info("command at %s/%d offset %d: partition no longer held, left to its owner",
                     topics.COMMANDS.name, p, msg.offset)
            return
        po.next = msg.offset + 1
        po.running.add(msg.offset)
        self.commands_taken += 1
        task = asyncio.get_running_loop().create_task(self._command(p, msg))
        self._tasks[task] = p
        task.add_done_callback(self._tasks.pop)

    async def _command(self, p: int, msg: Any) -> None:
        settled = True  # commit past this offset once its result is out
        try:
            try:
                tid, command, who = parse_command(msg.value)
            except BadCommand as why:
                log.warning("command at %s/%d offset %d refused: %s", topics.COMMANDS.name, p,
                            msg.offset, why)
                self.sink.dead_letter(msg.key, msg.value, f"command refused: {why}",
                                      topics.COMMANDS.name)
                return
            if who:
                self.sink.annotations[command.id] = {"who": who}
            owner = self.terminal_partition.get(tid)
            if owner is None:
                self.sink.command(CommandResult(
                    command, tid, REFUSED, f"terminal {tid} is not in this collector's archive: "
                    "not sent", done_ns=time.time_ns()))
                return
            if owner != p:
                self.sink.command(CommandResult(
                    command, tid, REFUSED, f"command keyed wrongly: terminal {tid} belongs to "
                    f"partition {owner} of {topics.COMMANDS.name}, it came on {p} (key a command "
                    "by its terminal id): not sent", done_ns=time.time_ns()))
                return
            session = self.collector.sessions.get(tid)
            if session is None:
                settled = False
                self.commands_skipped += 1
                self.sink.annotations.pop(command.id, None)
                log.info("command %s for %s: terminal not held now; left to its owner",
                         command.id, tid)
                return
            try:
                result = await session.execute(command)
                if result.outcome == UNCONFIRMED and self.collector.sessions.get(tid) is not session:
                    settled = False  # released meanwhile ("not sent"): the new owner runs it
            except asyncio.CancelledError:
                settled = False
                self.sink.command(CommandResult(
                    command, tid, UNCONFIRMED, f"this collector released terminal {tid} "
                    "(rebalance or stop) before the command was confirmed (the 1CH may have been "
                    "sent); the terminal's new owner runs it again", done_ns=time.time_ns()))
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        finally:
            po = self._offsets.get(p)
            # not settled: the offset stays below the commit point, redelivered to the next owner
            if po is not None and settled:
                await self.sink.flush()
                po.running.discard(msg.offset)
                await self._commit(p)

    async def _commit(self, p: int, *, force: bool = False) -> None:
        """Commit partition `p` up to its oldest running command (not while it is being
        revoked, unless `force`: the revocation's own final commit)."""
        from aiokafka import TopicPartition

        if p in self._revoking and not force:
            return
        po = self._offsets.get(p)
        consumer = self._consumer
        if po is None or consumer is None:
            return
        async with self._commit_lock:
            off = po.committable()
            if off is None or (po.committed is not None and off <= po.committed):
                return
            try:
                await consumer.commit({TopicPartition(topics.COMMANDS.name, p): off})
                po.committed = off
            except Exception as exc:  # noqa: BLE001 - commit again with the next command
                log.warning("commit of %s/%d at %d failed: %s", topics.COMMANDS.name, p, off,
                            exc)


async def check_topics(bootstrap: str) -> int:
    """Every topic a collector uses exists; the number of partitions of `commands`. UserError
    for an unreachable broker or a missing topic."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        try:
            await probe.start()
            names = await probe.topics()
        except (KafkaError, OSError) as exc:
            raise UserError(f"cannot reach the Kafka broker at {bootstrap}: {exc}",
                            where="--broker") from None
        missing = [t.name for t in NEEDED if t.name not in names]
        if missing:
            raise UserError(f"topics missing on {bootstrap}: {', '.join(missing)}; create them "
                            "first (the demo and the deployment do; docs/collectors-kafka.md)",
                            where="--broker")
        return len(probe.partitions_for_topic(topics.COMMANDS.name) or ())
    finally:
        with contextlib.suppress(Exception):
            await probe.stop()
