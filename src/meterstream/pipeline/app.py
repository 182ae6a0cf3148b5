"""The Faust worker: topics in, the kernels' state in a changelog table, commands and events out.

Reads as a list of declarations (STYLE.md, "Streams"): the app, its topics (all keyed by
terminal: pipeline/topics.py), the state table (one value per terminal: `WorkerCore.state_of`),
then one short agent per input topic that hands the payload to `WorkerCore` and publishes what
comes back. No agent reaches into another's state: they share the core, whose per-terminal
state is loaded from the table the first time this worker sees a terminal after it got the
partition, and written back after every event (one changelog write per event, not per reading).

Readings are taken up to `READINGS_TAKE` batches at a time (`stream.take_events`: Faust's
per-event cost is paid by the stream, not by the agent, for each batch), each applied and its
terminal's state written under its own event's partition, then what they produced is
published; the events are acknowledged after that, so at-least-once holds as before.

Timers: command timeouts and retries (every `tick_s`). Exactly-once is not used (the local
broker does not support it): every update is idempotent (pipeline/worker.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import faust

from meterstream.audit import AuditWriter, is_audited
from meterstream.pipeline import metrics, topics
from meterstream.pipeline.broker import faust_settings
from meterstream.pipeline.worker import Out, WorkerCore

log = logging.getLogger("meterstream.worker")

STATE_TABLE = "terminal-state"
#: reading batches handled per take, and how long a take waits for more (seconds)
READINGS_TAKE = 64
READINGS_WITHIN_S = 0.005
#: KPI snapshots kept in memory for the dashboard's charts (compact: fleet-wide figures only,
#: never per meter or per area): 2,160 x kpi_s = 6 h at the production 10 s (docs/dashboard.md)
KPI_RING = 2160


def _json_in(fn: Callable[[str, Any], list[Out]], terminal: str, value: bytes) -> list[Out]:
    return fn(terminal, json.loads(value))


def _key(k: Any) -> str:
    return k.decode() if isinstance(k, (bytes, bytearray)) else str(k)


def kpi_point(snap: dict[str, Any], counters: dict[str, int]) -> dict[str, Any]:
    """One entry of the KPI ring: a few integers of a kpi_snapshot (the dashboard's charts)."""
    return {"ts": snap["ts"], "terminals": snap["terminals"], "online": snap["online"],
            "readings": counters["readings"], "batches": counters["batches"],
            "reads_ok": sum(v[0] for v in snap["reads_by_class"].values()),
            "reads_attempted": sum(v[1] for v in snap["reads_by_class"].values()),
            "cut_off": snap["cut_off"], "in_arrears": snap["in_arrears"]}


class WorkerApp:
    """One worker process: a Faust app around a WorkerCore."""

    def __init__(self, core: WorkerCore, bootstrap: str, *, datadir: str | Path,
                 partitions: int = 4, app_id: str = "meterstream-worker", tick_s: float = 1.0,
                 kpi_s: float = 10.0, events_kept: int = 2000,
                 audit_path: str | Path | None = None, **overrides: Any) -> None:
        from aiokafka.partitioner import DefaultPartitioner

        self.core = core
        # the tamper-evident trail of every audit record published (meterstream.audit)
        self.audit = AuditWriter(audit_path, who=app_id) if audit_path is not None else None
        self.loaded: set[str] = set()
        self.errors = 0
        self.kpis: dict[str, Any] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=events_kept)  # for the API
        self.commands_out: deque[dict[str, Any]] = deque(maxlen=events_kept)
        # the dashboard's: a bounded ring of compact KPI snapshots (kpi_point), and callbacks
        # that see each event published (read-only observers; they must not raise or block)
        self.kpi_ring: deque[dict[str, Any]] = deque(maxlen=KPI_RING)
        self.event_listeners: list[Callable[[dict[str, Any]], None]] = []
        # the partition of each terminal, as Kafka's default partitioner puts its key
        every = list(range(partitions))
        part = DefaultPartitioner()
        self.partition_of = {t: part(t.encode(), every, every) for t in core.terminal_index}
        settings = {**faust_settings(bootstrap, datadir=datadir, partitions=partitions),
                    **overrides}
        app = self.app = faust.App(app_id, **settings)
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
                               "value_serializer": "raw", "partitions": partitions}
        self.topic = {t.name: app.topic(t.name, **raw) for t in topics.ALL}
        # bytes values are stored raw (faust picks the serializer from value_type)
        self.state = app.Table(STATE_TABLE, key_type=str, value_type=bytes,
                               partitions=partitions)

        @app.agent(self.topic[topics.READINGS.name])
        async def readings(stream: faust.StreamT[bytes]) -> None:
            # take_events is Stream's (the class every agent gets), not in StreamT's interface
            takes = stream.take_events(READINGS_TAKE, READINGS_WITHIN_S)  # type: ignore[attr-defined]
            async for events in takes:
                out: list[Out] = []
                for event in events:
                    terminal = self._terminal(event.key)
                    out.extend(self._apply(terminal, partial(core.on_batch, event.value),
                                           event.message.partition))
                await self._publish(out)

        @app.agent(self.topic[topics.PAYMENTS.name])
        async def payments(stream: faust.StreamT[bytes]) -> None:
            async for key, value in stream.items():
                terminal = self._terminal(key)
                await self._handle(terminal, partial(core.on_payment, terminal, value))

        @app.agent(self.topic[topics.LINKS.name])
        async def links(stream: faust.StreamT[bytes]) -> None:
            async for key, value in stream.items():
                terminal = self._terminal(key)
                await self._handle(terminal, partial(_json_in, core.on_link, terminal, value))

        @app.agent(self.topic[topics.RESULTS.name])
        async def results(stream: faust.StreamT[bytes]) -> None:
            async for key, value in stream.items():
                terminal = self._terminal(key)
                await self._handle(terminal, partial(_json_in, core.on_result, terminal, value))

        @app.agent(self.topic[topics.OPERATOR.name])
        async def operator(stream: faust.StreamT[bytes]) -> None:
            async for key, value in stream.items():
                terminal = self._terminal(key)
                await self._handle(terminal, partial(_json_in, self._manual, terminal, value))

        @app.timer(interval=tick_s)
        async def tick() -> None:
            # Changes a tick makes (timeouts, retries sent) are written to the table with the
            # terminal's next event; after a crash the restarted worker re-derives them from
            # the book's times, at worst sending a retry once more (commands are idempotent).
            if self.app.rebalancing:
                # From a revocation to the end of table recovery the partitions just assigned
                # are not in the table yet: loading their terminals now would keep the
                # archive's initial state (or an old one) as loaded, and the next event would
                # bill on it and write it to the changelog (issue 8 scenario, seed 12).
                return
            owned = self.owned()
            for t in owned:
                self._terminal(t.encode())
            await self._publish(core.tick(sorted(self.loaded)))
            await self._publish(core.detect_dropouts(owned))

        @app.timer(interval=kpi_s)
        async def kpis() -> None:
            self.kpis = core.kpi_snapshot()
            self.kpi_ring.append(kpi_point(self.kpis, core.counters))

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
            # the terminals may move: load them again from the table when seen next
            self.loaded.clear()

        self._agents = (readings, payments, links, results, operator, tick, kpis, revoked)
        metrics.watch("worker", self)  # counters, command states, lag at every scrape

    def _manual(self, terminal: str, doc: dict[str, Any]) -> list[Out]:
        return self.core.manual(terminal, doc["meter"], doc["action"], doc["who"], doc["why"])

    async def manual(self, terminal: str, meter: str, action: str, who: str, why: str) -> None:
        """An operator's command: published to the operator topic, applied by its agent (so
        the command book changes inside an event, like every other change)."""
        from meterstream.pipeline.commands import MANUAL_ACTIONS

        if action not in MANUAL_ACTIONS:
            raise ValueError(f"action: {action!r} is not one of {', '.join(MANUAL_ACTIONS)}")
        doc = {"meter": meter, "action": action, "who": who, "why": why}
        await self.topic[topics.OPERATOR.name].send(key=terminal.encode(),
                                                    value=json.dumps(doc).encode())

    def owned(self) -> list[str]:
        """The terminals of the partitions this worker holds now."""
        parts = {tp.partition for tp in self.app.assignor.assigned_actives()
                 if tp.topic == topics.READINGS.name}
        return [t for t, p in self.partition_of.items() if p in parts]

    def _terminal(self, key: Any) -> str:
        terminal = _key(key)
        if terminal not in self.loaded and terminal in self.core.terminal_index:
            data = self.state.get(terminal)
            if data:
                self.core.load_state(terminal, bytes(data))
            self.loaded.add(terminal)
        return terminal

    async def _handle(self, terminal: str, work: Callable[[], list[Out]]) -> None:
        """Run one message through the core, save the terminal's state, publish."""
        await self._publish(self._apply(terminal, work))

    def _apply(self, terminal: str, work: Callable[[], list[Out]],
               partition: int | None = None) -> list[Out]:
        """Run one message through the core and save the terminal's state: in the current
        event's partition, or in `partition` (the message's own, when several are handled
        together: Faust's current event is then not this message's)."""
        try:
            out = work()
        except Exception as exc:  # a message the core cannot take must not stop the worker
            self.errors += 1
            log.exception("worker: message for %s failed", terminal)
            out = [self.core._dead("worker", repr(exc).encode(), f"{type(exc).__name__}: {exc}")]
        if terminal in self.core.terminal_index:
            value = self.core.state_of(terminal)
            if partition is None:
                self.state[terminal] = value
            else:
                # what Table.__setitem__ does (no key TTLs on this table; sensors aside), with
                # the partition given instead of taken from the current event; the memory store
                # (faust_settings) keeps the value itself, a RocksDB store would need the event
                self.state.send_changelog(partition, terminal, value)
                self.state.data[terminal] = value
        return out

    async def _publish(self, out: list[Out]) -> None:
        for o in out:
            await self.topic[o.topic].send(key=o.key.encode(), value=o.value)
            if o.topic == topics.EVENTS.name:
                self.events.append(json.loads(o.value))
                if self.audit is not None and is_audited(self.events[-1]):
                    self.audit.append(self.events[-1])
                for listen in self.event_listeners:
                    listen(self.events[-1])
                metrics.count_worker_out("events", self.events[-1])
            elif o.topic == topics.COMMANDS.name:
                self.commands_out.append(json.loads(o.value))
                metrics.count_worker_out("commands", self.commands_out[-1])
            elif o.topic == topics.DEAD_LETTER.name:
                metrics.count_worker_out("dead-letter", json.loads(o.value))
        if self.audit is not None:
            self.audit.sync()  # before the events are acknowledged (one fsync per publish)

    async def start(self) -> None:
        if self.core.influx is not None:
            self._durable_before_commit(self.core.influx)
        await self.app.start()

    def _durable_before_commit(self, sink: Any) -> None:
        """Kafka offsets are committed only once the InfluxDB points of the messages before
        them are on the server or in the sink's spool, so that a worker killed after a commit
        has lost none of them. Every commit of Faust's consumer (its timer, a rebalance, the
        stop) goes through `Consumer.commit`."""
        consumer = self.app.consumer
        commit = consumer.commit

        async def commit_when_durable(*args: Any, **kwargs: Any) -> bool:
            await sink.amake_durable()
            return bool(await commit(*args, **kwargs))

        consumer.commit = commit_when_durable  # type: ignore[method-assign]

    async def stop(self) -> None:
        metrics.unwatch("worker", self)
        await self.app.stop()
        if self.audit is not None:
            self.audit.close()

    async def wait_recovered(self, timeout: float = 60.0) -> None:
        await asyncio.wait_for(self.app.tables.wait_until_recovery_completed(), timeout)
