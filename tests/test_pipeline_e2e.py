"""End to end on Tansu: field -> collectors -> Kafka -> worker -> commands -> field.

The field runs in real time (speed 1) with fast relays; every customer of the concentrators
starts below the cut-off threshold. Checked: an unprotected customer is cut off (the field's
relay opens) and, after paying, reconnected and confirmed (it closes); a protected customer is
never cut off; a pending bank withholding holds the cut-off; a payment sent twice credits once.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from collect_helpers import FIELD_CONFIG, PortHold

from meterfield.config import parse_config
from meterfield.field import Field
from meterstream.collectors.archive import load_archive
from meterstream.pipeline import topics
from meterstream.pipeline.broker import EmbeddedBroker
from meterstream.pipeline.config import WorkerConfig
from meterstream.pipeline.runner import all_topics, start_worker
from meterstream.scenario import fast_collector_config, open_window_tariffs

ROOT = Path(__file__).resolve().parents[1]
WAIT = 60.0


def field_doc(collector_port: int) -> dict[str, Any]:
    doc = copy.deepcopy(tomllib.loads(FIELD_CONFIG.read_text()))
    doc["field"]["speed"] = 1.0
    doc["field"]["start"] = "now"
    doc["collector"]["port"] = collector_port
    doc["meters"]["relay_delay_s"] = 0.3
    conc = next(g for g in doc["terminals"] if g["kind"] == "concentrator")
    conc["balance_yuan"] = ["-5.00", "-5.00"]  # every one of them below the cut-off threshold
    conc["share_protected"] = 0.34
    conc["share_1997"] = 0.0
    return doc


async def until(cond: Any, what: str, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def api_checks(base: str, worker: Any, fld: Field, victim: str, other: str,
                     other_i: int) -> None:
    """The JSON API reads what the core holds; payments and commands go in through it."""
    import aiohttp

    core = worker.core
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/meters/{victim}") as r:
            assert r.status == 200 and (await r.json()) == json.loads(json.dumps(
                core.meter_view(victim)))
        async with http.get(f"{base}/api/summary") as r:
            summary = await r.json()
            assert summary["meters"] == core.fleet.n_meters and summary["terminals_held"] > 0
        async with http.get(f"{base}/api/terminals/A001-C001") as r:
            assert victim in {m["meter"] for m in (await r.json())["meters"]}
        async with http.get(f"{base}/api/terminals/NOPE") as r:
            assert r.status == 404 and "NOPE" in (await r.json())["error"]
        async with http.get(f"{base}/api/events?limit=5") as r:
            assert len(await r.json()) == 5
        bad = {"payment_id": "B-1", "meter": victim, "amount": 10.5, "status": "settled",
               "channel": "web", "ts": "2024-06-01T08:00:00+08:00"}
        async with http.post(f"{base}/api/payments", data=json.dumps(bad)) as r:
            assert r.status == 400 and "amount" in (await r.json())["error"]
        good = {**bad, "payment_id": "B-2", "amount": "1.00"}
        async with http.post(f"{base}/api/payments", data=json.dumps(good)) as r:
            assert r.status == 202
        await until(lambda: core.meter_view(victim)["paid"] == "51.000000", "the API payment")
        cmd = {"meter": other, "action": "keep-power-on", "reason": "hospital on this feeder"}
        async with http.post(f"{base}/api/commands", data=json.dumps(cmd)) as r:
            assert r.status == 401  # no token: viewers cannot command
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(f"{base}/api/commands", data=json.dumps(cmd), headers=headers) as r:
            assert r.status == 202, await r.text()
        await until(lambda: bool(fld.bank.keep_power[other_i]), "keep-power in the field")
        await until(lambda: any(e.get("meter") == other and e.get("action") == "keep-power-on"
                                and e.get("to_state") == "confirmed" for e in worker.events),
                    "the operator's command confirmed")
    issued = [e for e in worker.events if e.get("meter") == other and e.get("to_state") == "issued"
              and e.get("action") == "keep-power-on"]
    assert issued and issued[0]["who"] == "alice" and "hospital" in issued[0]["cause"]


TOKEN = "alice-token-0123456789"


@pytest.mark.slow
def test_cut_off_pay_reconnect_protected_withholding_duplicate(tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    monkeypatch.setenv("METERSTREAM_OPERATOR_TOKENS", f"alice:{TOKEN}")
    from meterstream.pipeline.collector_kafka import KafkaCollector

    async def scenario() -> None:
        hold = PortHold()
        fdoc = field_doc(hold.port)
        fld = Field(parse_config(fdoc, str(FIELD_CONFIG), FIELD_CONFIG.parent))
        app_id = "e2e-worker"
        async with EmbeddedBroker(topics=all_topics(app_id), partitions=2) as broker:
            await fld.start()
            try:
                fld.write_archive(tmp_path / "a.csv")
                fleet = fld.fleet
                conc = fleet.terminal_by_id("A001-C001")
                meters = [int(i) for i in conc.meters]
                protected = [i for i in meters if fleet.protected[i]]
                plain = [i for i in meters if not fleet.protected[i] and fleet.role[i] == 0]
                assert protected and len(plain) >= 2
                victim, withheld = plain[0], plain[1]
                addr = fleet.address_of
                cfg = dataclasses.replace(WorkerConfig(), partitions=2, tick_s=0.2, kpi_s=1.0,
                                          cycle_s=2.0, http_port=0)
                run = await start_worker(broker.bootstrap, tmp_path / "a.csv",
                                         open_window_tariffs(tmp_path), cfg,
                                         data_dir=tmp_path, app_id=app_id)
                producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
                await producer.start()
                collector = None
                try:
                    core = run.worker.core

                    async def pay(pid: str, meter: int, amount: str, status: str) -> None:
                        doc = {"payment_id": pid, "meter": addr(meter), "amount": amount,
                               "status": status, "channel": "bank",
                               "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
                        await producer.send_and_wait(topics.PAYMENTS_IN.name, key=pid.encode(),
                                                     value=json.dumps(doc).encode())

                    # a withholding in flight before the first reading: it holds the cut-off
                    await pay("W-1", withheld, "30.00", "pending")
                    await until(lambda: core.counters["payments"] >= 1, "the pending payment")
                    collector = KafkaCollector(load_archive(tmp_path / "a.csv"),
                                               fast_collector_config(hold.release()),
                                               broker.bootstrap, spool_dir=tmp_path / "spool",
                                               session_timeout_s=3.0)
                    await collector.start()
                    bank = fld.bank
                    await until(lambda: bank.relay_open_at(victim, fld.now()),
                                "the victim's relay opening in the field")
                    # protected and withheld customers: never cut off
                    await until(lambda: core.counters["batches"] >= 6, "a few cycles")
                    assert not any(bank.relay_open_at(i, fld.now()) for i in protected)
                    assert not bank.relay_open_at(withheld, fld.now())
                    held = {(e.get("meter"), e.get("reason")) for e in run.worker.events
                            if e.get("kind") == "cutoff_held"}
                    assert (addr(withheld), "withholding_pending") in held
                    assert any((addr(i), "protected") in held for i in protected)
                    # the victim pays (the channel sends it twice): reconnected, credited once
                    assert core.meter_view(addr(victim))["paid"] == "0.000000"
                    await pay("P-1", victim, "50.00", "settled")
                    await pay("P-1", victim, "50.00", "settled")
                    await until(lambda: not bank.relay_open_at(victim, fld.now()),
                                "the victim's relay closing in the field")
                    await until(lambda: core.counters["duplicate_payments"] >= 1, "the duplicate")
                    assert core.meter_view(addr(victim))["paid"] == "50.000000"  # once
                    await until(lambda: len([e for e in run.worker.events
                                             if e.get("type") == "command_audit"
                                             and e.get("meter") == addr(victim)
                                             and e.get("to_state") == "confirmed"]) >= 2,
                                "the reconnect confirmed")
                    await api_checks(run.url.rsplit("/api/", 1)[0], run.worker, fld, addr(victim),
                                     addr(plain[2]), plain[2])
                finally:
                    if collector is not None:
                        await collector.stop()
                    await producer.stop()
                    await run.stop()
            finally:
                await fld.stop()

    asyncio.run(asyncio.wait_for(scenario(), 240))
