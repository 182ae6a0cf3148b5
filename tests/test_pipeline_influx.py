"""The worker writes to a real server of the InfluxDB v2 write API (VictoriaMetrics): every
reading arrives once, and while the server is down the points wait in the spool and are all
written when it is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from test_influx import VictoriaMetrics, needs_vm
from test_pipeline_crash import ROOT, traffic, write_archive

from meterstream.collectors.batch import ReadingBatch
from meterstream.pipeline import topics
from meterstream.pipeline.app import WorkerApp
from meterstream.pipeline.broker import EmbeddedBroker
from meterstream.pipeline.influx import InfluxSink
from meterstream.pipeline.runner import all_topics
from meterstream.pipeline.worker import WorkerCore

WAIT = 90.0


@pytest.mark.slow
@needs_vm
def test_readings_reach_victoria_metrics_across_an_outage(tmp_path: Path) -> None:
    write_archive(tmp_path / "a.csv")
    # recent times: the server keeps a month by default and drops older samples
    batches, _payments = traffic(t0=(time.time_ns() // 10**9 - 86_400) * 10**9)
    batches = batches[:60]  # 10 cycles of 6 terminals
    n_readings = sum(len(ReadingBatch.from_bytes(raw)) for _t, raw in batches)
    vm = VictoriaMetrics(tmp_path / "vm").start()

    async def scenario() -> None:
        app_id = "influx-worker"
        async with EmbeddedBroker(topics=all_topics(app_id), partitions=2) as broker:
            sink = InfluxSink(vm.url, "token", "org", "bucket", tmp_path / "spool",
                              batch_size=50, flush_s=0.1, backoff_s=(0.05, 0.5))
            core = WorkerCore(tmp_path / "a.csv", ROOT / "config" / "tariffs-example.toml",
                              influx=sink)
            worker = WorkerApp(core, broker.bootstrap, datadir=tmp_path / "w", partitions=2,
                               app_id=app_id)
            await worker.start()
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
            await producer.start()
            try:
                for k, (tid, raw) in enumerate(batches):
                    if k == 20:
                        vm.stop()  # the server goes away for a while
                    await producer.send_and_wait(topics.READINGS.name, key=tid.encode(),
                                                 value=raw)
                    await asyncio.sleep(0.01)
                end = time.monotonic() + WAIT
                while core.counters["batches"] < len(batches):
                    assert time.monotonic() < end, "the worker did not take every batch"
                    await asyncio.sleep(0.1)
                await sink.aflush(5.0)
                assert sink.stats.spooled > 0  # points did wait on disk
                vm.start()  # back, same port and data
                end = time.monotonic() + WAIT
                while True:
                    got = sum(vm.samples('{__name__="reading_total_centikwh"}').values())
                    if got >= n_readings or time.monotonic() > end:
                        break
                    await asyncio.sleep(0.5)
                assert got == n_readings  # every reading once: none lost, none twice
                # and the balances after each batch: a point per billed reading
                billed = core.counters["readings"]
                assert billed > 0
                end = time.monotonic() + WAIT
                while True:
                    bal = vm.samples('{__name__="balance_balance_microyuan"}')
                    if sum(bal.values()) >= billed or time.monotonic() > end:
                        break
                    await asyncio.sleep(0.5)
                assert sum(bal.values()) == billed
            finally:
                await producer.stop()
                await worker.stop()
                await sink.aclose()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 240))
    finally:
        vm.stop()
