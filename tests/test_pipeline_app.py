"""The Faust worker on a real Kafka-protocol broker (Tansu on loopback): batches and payments in,
commands and events out, state in the changelog table, recovered after a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from test_pipeline_worker import ARCHIVE, T0, TARIFFS, H, batch

from meterstream.collectors.batch import OUTCOME_OK
from meterstream.pipeline import topics
from meterstream.pipeline.app import STATE_TABLE, WorkerApp
from meterstream.pipeline.broker import EmbeddedBroker
from meterstream.pipeline.worker import WorkerCore

PARTITIONS = 2
WAIT = 60.0


def all_topics(app_id: str) -> list[str]:
    return [*topics.NAMES, f"{app_id}-{STATE_TABLE}-changelog"]


async def until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


class Tap:
    """Collects everything published on some topics."""

    def __init__(self, bootstrap: str, names: list[str]) -> None:
        self.consumer = AIOKafkaConsumer(*names, bootstrap_servers=bootstrap,
                                         auto_offset_reset="earliest", enable_auto_commit=False)
        self.got: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async for msg in self.consumer:
            self.got[msg.topic].append(json.loads(msg.value))

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


def worker(tmp: Path, bootstrap: str, app_id: str) -> WorkerApp:
    (tmp / "a.csv").write_text(ARCHIVE)
    (tmp / "t.toml").write_text(TARIFFS)
    core = WorkerCore(tmp / "a.csv", tmp / "t.toml", now=lambda: T0 + 3 * H)
    return WorkerApp(core, bootstrap, datadir=tmp / "data", partitions=PARTITIONS, app_id=app_id,
                     producer_max_batch_size=1)  # Tansu: exact changelog recovery needs this


@pytest.mark.slow
def test_worker_cuts_off_reconnects_and_recovers_after_a_restart(tmp_path: Path) -> None:
    app_id = "w-e2e"

    async def scenario() -> None:
        async with EmbeddedBroker(topics=all_topics(app_id), partitions=PARTITIONS) as broker:
            tap = Tap(broker.bootstrap, [topics.COMMANDS.name, topics.EVENTS.name])
            await tap.start()
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
            await producer.start()
            w = worker(tmp_path, broker.bootstrap, app_id)
            await w.start()
            try:
                m = 330010010001

                async def send(topic: str, key: str, value: bytes) -> None:
                    await producer.send_and_wait(topic, key=key.encode(), value=value)

                await send(topics.LINKS.name, "T1", json.dumps({"kind": "up"}).encode())
                await send(topics.READINGS.name, "T1", batch("T1", T0, [(m, T0, 100_00, OUTCOME_OK)]))
                await send(topics.READINGS.name, "T1",
                           batch("T1", T0 + H, [(m, T0 + H, 103_50, OUTCOME_OK)]))
                await until(lambda: len(tap.got[topics.COMMANDS.name]) == 1)
                (cmd,) = tap.got[topics.COMMANDS.name]
                assert cmd["action"] == "trip" and cmd["terminal"] == "T1"
                result = {"type": "command", "id": cmd["id"], "terminal": "T1",
                          "meter": cmd["meter"], "action": "trip", "outcome": "confirmed",
                          "detail": "status word 3 confirms it",
                          "sent": "2024-06-01T03:00:00+00:00",
                          "acknowledged": "2024-06-01T03:00:00+00:00",
                          "done": "2024-06-01T03:00:02+00:00", "attempts": 1, "readbacks": 1,
                          "status": {"word": "0050"}}
                await send(topics.RESULTS.name, "T1", json.dumps(result).encode())
                await until(lambda: any(e.get("to_state") == "confirmed"
                                        for e in tap.got[topics.EVENTS.name]))
                balance = w.core.meter_view("330010010001")["balance"]
                assert balance == "-0.500000"
            finally:
                await w.stop()

            # a new worker process (same app id, same broker): the state comes from the table
            (tmp_path / "second").mkdir()
            w2 = worker(tmp_path / "second", broker.bootstrap, app_id)
            await w2.start()
            try:
                pay = {"payment_id": "P1", "meter": "330010010001", "amount_micro_yuan": 10_000_000,
                       "status": "settled", "channel": "alipay", "ts_ns": T0 + 2 * H}
                await send(topics.PAYMENTS.name, "T1", json.dumps(pay).encode())
                await send(topics.PAYMENTS.name, "T1", json.dumps(pay).encode())  # twice
                await until(lambda: len(tap.got[topics.COMMANDS.name]) == 2)
                assert tap.got[topics.COMMANDS.name][1]["action"] in ("close", "allow-close")
                await until(lambda: any(e.get("kind") == "duplicate_payment"
                                        for e in tap.got[topics.EVENTS.name]))
                # the balance carried over the restart, and the duplicate credited nothing
                assert w2.core.meter_view("330010010001")["balance"] == "9.500000"
                # the trip was confirmed before the restart: the book knows (no second trip)
                assert [c["action"] for c in tap.got[topics.COMMANDS.name]].count("trip") == 1
            finally:
                await w2.stop()
                await producer.stop()
                await tap.stop()

    asyncio.run(asyncio.wait_for(scenario(), 180))
