"""Prometheus metrics (meterstream.pipeline.metrics), scraped over HTTP.

End to end: the simulated field over real TCP, `meterstream collector` as a process of its own
(with --metrics-port and --log-format json), a worker started in this process by the runner with
worker.metrics_port, both on the embedded Tansu broker; /metrics of each is scraped and its
counters move with the traffic, a garbage batch shows as a dead letter, and every line the
collector logged is one JSON object. The InfluxDB sink's metrics are read off a real sink
whose server is not there (it spools).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from meterstream.pipeline import metrics, topics
from meterstream.pipeline.broker import EmbeddedBroker, free_port
from meterstream.pipeline.config import WorkerConfig
from meterstream.pipeline.influx import InfluxSink
from meterstream.pipeline.runner import all_topics, start_worker

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
APP_ID = "metrics-worker"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_a_live_sink_in_one_scrape(tmp_path: Path) -> None:
    """Without a broker: the counters the hooks call, and an InfluxSink with no server (its
    points go to the spool) as the registry reports them over HTTP."""
    port = free_port()
    server = metrics.serve(port, "127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        before = scrape(url)
        metrics.count_batch(np.array([0, 0, 1, 2, 3, 0], np.int8))
        metrics.count_worker_out("events", {"type": "event", "kind": "area_dropout"})
        metrics.count_worker_out("events", {"type": "command_audit", "to_state": "escalated"})
        metrics.count_worker_out("events", {"type": "work_order", "kind": "escalated"})
        metrics.count_worker_out("dead-letter", {"source": "payments"})
        sink = InfluxSink(f"http://127.0.0.1:{free_port()}", "t", "o", "b", tmp_path / "spool",
                          flush_s=0.05, timeout_s=0.5, backoff_s=(30.0, 60.0))
        try:
            sink.write_points(["kpi online=1i 1", "kpi online=2i 2"])
            sink.flush(10.0)
            after = scrape(url)
        finally:
            sink.close(5.0)
        gone = scrape(url)
    finally:
        metrics.stop(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("meterstream_collector_reads_total", outcome="ok") == 3
    for o in ("timeout", "error", "bad_frame"):
        assert moved("meterstream_collector_reads_total", outcome=o) == 1
    assert moved("meterstream_collector_batches_total") == 1
    assert moved("meterstream_worker_events_total", kind="area_dropout") == 1
    assert moved("meterstream_worker_events_total", kind="work_order_escalated") == 1
    assert moved("meterstream_worker_command_transitions_total", state="escalated") == 1
    assert moved("meterstream_worker_dead_letters_total", source="payments") == 1
    assert value(after, "meterstream_influx_points_total", result="spooled") == 2
    assert value(after, "meterstream_influx_server_up") == 0
    assert value(after, "meterstream_influx_spool_bytes") > 0
    assert value(after, "meterstream_influx_spool_files") == 1
    assert ("meterstream_influx_spool_bytes", ()) not in gone  # a closed sink drops out
    assert value(after, "process_resident_memory_bytes") > 0


def _collector_toml(tmp: Path) -> Path:
    maps = (ROOT / "config" / "collector.toml").read_text().split("\n[modbus_maps.", 1)[1]
    cfg = tmp / "c.toml"
    cfg.write_text("[collector]\ncycle_s = 1.0\ntimeout_s = 0.5\n[dialin]\nenabled = false\n"
                   "[modbus]\ntimeout_s = 0.5\n[modbus_maps." + maps)
    return cfg


@pytest.mark.slow
def test_worker_and_collector_metrics_move_with_the_traffic(tmp_path: Path) -> None:
    from test_cli_collect import FieldThread

    async def main() -> None:
        with EmbeddedBroker(topics=all_topics(APP_ID), partitions=PARTITIONS) as broker, \
                FieldThread() as ft:
            ft.field.write_archive(tmp_path / "a.csv")
            c_port = free_port()
            proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waited in a thread
                [sys.executable, "-m", "meterstream", "collector", "--broker", broker.url,
                 "--archive", str(tmp_path / "a.csv"), "--config", str(_collector_toml(tmp_path)),
                 "--spool", str(tmp_path / "spool"), "--session-timeout", "3",
                 "--status-every", "0.5", "--metrics-port", str(c_port), "--log-format",
                 "json"], stderr=subprocess.PIPE, text=True)
            lines: list[str] = []
            assert proc.stderr is not None
            reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()),
                                      daemon=True)
            reader.start()
            cfg = WorkerConfig(partitions=PARTITIONS, tick_s=0.2, kpi_s=0.5, cycle_s=1.0,
                               http_port=0, metrics_port=free_port(), producer_max_batch_size=1)
            run = await start_worker(broker.bootstrap, tmp_path / "a.csv",
                                     ROOT / "config" / "tariffs-example.toml", cfg,
                                     data_dir=tmp_path / "w", app_id=APP_ID)
            try:
                w_url = run.metrics_url
                c_url = f"http://127.0.0.1:{c_port}/metrics"

                async def until(url: str, cond: object, what: str) -> Samples:
                    end = time.monotonic() + 60.0
                    while True:
                        try:
                            s = await asyncio.to_thread(scrape, url)
                            if cond(s):  # type: ignore[operator]
                                return s
                        except OSError:
                            s = {}
                        assert time.monotonic() < end, f"timed out: {what}: {s}"
                        await asyncio.sleep(0.3)

                c1 = await until(c_url, lambda s: value(s, "meterstream_collector_reads_total",
                                                        outcome="ok") > 0, "collector reads")
                assert value(c1, "meterstream_collector_partitions_held") == PARTITIONS
                assert value(c1, "meterstream_collector_terminals_held") == 8
                ok1 = value(c1, "meterstream_collector_reads_total", outcome="ok")
                c2 = await until(c_url, lambda s: value(s, "meterstream_collector_reads_total",
                                                        outcome="ok") > ok1, "more reads")
                assert value(c2, "meterstream_collector_batches_total") > 0
                assert value(c2, "meterstream_collector_records_total", result="published") > 0
                assert value(c2, "meterstream_collector_spooling") == 0
                assert ("meterstream_collector_spool_bytes", ()) in c2
                assert value(c2, "meterstream_collector_link_events_total", kind="up") >= 6
                # no commands were sent: every held partition of the commands topic is at its end
                c3 = await until(c_url, lambda s: sum(
                    1 for k in s if k[0] == "meterstream_collector_commands_lag") == PARTITIONS,
                    "commands lag of every partition")
                assert all(v == 0 for k, v in c3.items()
                           if k[0] == "meterstream_collector_commands_lag")

                w1 = await until(w_url, lambda s: value(s, "meterstream_worker_readings_total")
                                 > 0, "worker readings")
                b1 = value(w1, "meterstream_worker_batches_total")
                assert b1 > 0
                assert value(w1, "meterstream_worker_terminals_owned") == 8
                # a garbage batch: refused to the dead-letter topic, counted
                producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
                await producer.start()
                try:
                    await producer.send_and_wait(topics.READINGS.name, b"not a batch",
                                                 key=b"A001-C001")
                finally:
                    await producer.stop()
                w2 = await until(w_url, lambda s: value(
                    s, "meterstream_worker_dead_letters_total", source="readings") == 1
                    and value(s, "meterstream_worker_batches_total") > b1
                    and value(s, "meterstream_worker_kpi", kpi="terminals") == 8, "dead letter")
                lag = {k: v for k, v in w2.items() if k[0] == "meterstream_worker_consumer_lag"}
                assert any(dict(k[1])["topic"] == topics.READINGS.name for k in lag), lag
                assert all(v >= 0 for v in lag.values())
                assert ("meterstream_worker_open_commands", (("state", "queued"),)) in w2
            finally:
                await run.stop()
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 30)
                reader.join(5)
            assert proc.returncode == 0, "".join(lines)
            docs = [json.loads(x) for x in lines if x.strip()]  # every line one JSON object
            assert docs and all({"ts", "level", "logger", "message"} <= set(d) for d in docs)
            assert any(d["message"].startswith("meterstream collector: stopped") for d in docs)
            assert any("online" in d for d in docs)  # a status line, with its fields

    asyncio.run(asyncio.wait_for(main(), 180))
