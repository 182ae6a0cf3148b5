"""The live dashboard in a real headless browser against a running pipeline.

Embedded Tansu broker, the simulated field in real time, the Kafka collectors, one worker with
its API and dashboard on loopback; Debian's Chromium driven by Playwright (no browser
download). Checked: every page loads without console errors and its figures equal the JSON
the page names (data-src); a live update arrives by server push; a viewer cannot command; an
operator signed in with a token reconnects a cut-off customer from the page, the field's relay
closes and the page shows the command confirmed; the language switch relabels the page.
Screenshots of each page go to tests/artifacts/. The bounded per-meter history is unit-tested.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from collect_helpers import FIELD_CONFIG, PortHold
from test_pipeline_e2e import field_doc, until

from meterstream.pipeline.api import MeterHistory
from meterstream.scenario import fast_collector_config, open_window_tariffs

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "alice-token-0123456789"


# --- the page's formats, written again from docs/dashboard.md -----------------------------------

def fmt(v: Any, f: str, lang: str) -> str:
    if v is None:
        return "—"
    if f == "bool":
        return {"zh": ("是", "否"), "en": ("yes", "no")}[lang][0 if v else 1]
    if f == "bp":
        a = abs(int(v))
        return f"{'-' if v < 0 else ''}{a // 100}.{a % 100:02d}%"
    if f == "yuan":
        neg = v.startswith("-")
        whole, _, frac = v.lstrip("-").partition(".")
        micro = int(whole) * 1_000_000 + int((frac + "000000")[:6])
        cents = (micro + 5000) // 10_000
        return f"{'-' if neg and cents else ''}{cents // 100}.{cents % 100:02d}"
    return str(v)


def get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if doc is None:
            return None
        if isinstance(doc, list):
            doc = len(doc) if part == "length" else (doc[int(part)] if int(part) < len(doc)
                                                      else None)
        else:
            doc = doc.get(part)
    return doc


FIGS_JS = """() => ({src: document.querySelector('#view').dataset.src || '',
  lang: document.documentElement.lang,
  figs: [...document.querySelectorAll('#view [data-k]')].map(
    e => [e.dataset.k, e.dataset.f, e.textContent])})"""


async def figures_match(page: Any, http: Any, base: str, tries: int = 30) -> tuple[str, int]:
    """The page's figures equal the JSON of its data-src (read right after the page; a page
    of live figures without a seq may move in between, so a few tries are allowed)."""
    last: list[Any] = []
    for _ in range(tries):
        shown = await page.evaluate(FIGS_JS)
        if shown["src"]:
            async with http.get(base + shown["src"]) as r:
                doc = await r.json()
            if r.status == 200:
                last = [(k, text, fmt(get(doc, k), f, shown["lang"]))
                        for k, f, text in shown["figs"]]
                if shown["figs"] and all(text == want for _k, text, want in last):
                    return shown["src"], len(last)
        await asyncio.sleep(0.3)
    bad = [x for x in last if x[1] != x[2]][:5]
    raise AssertionError(f"page figures differ from the JSON: {bad or 'no figures'}")


async def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


# --- unit: the per-meter history stays bounded --------------------------------------------------

def test_meter_history_is_bounded_lru() -> None:
    h = MeterHistory(meters=3, points=2, entries=2)
    for m in ("a", "b", "c"):
        h.balance(m, "t0", "1.000000", "x")
    h.event("a", {"kind": "k"})  # a is used again: b is now the oldest
    h.balance("d", "t0", "2.000000", "x")
    assert len(h) == 3 and h.points_of("b") == [] and h.points_of("a")
    for i in range(5):
        h.balance("a", f"t{i}", f"{i}.000000", "x")
        h.event("a", {"i": i})
    assert [p[1] for p in h.points_of("a")] == ["3.000000", "4.000000"]
    assert [e["i"] for e in h.events_of("a")] == [3, 4]
    h.balance("a", "t9", "4.000000", "same")  # an unchanged balance adds no point
    assert len(h.points_of("a")) == 2 and h.points_of("a")[-1][0] == "t4"


# --- the browser against the pipeline ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium "
                    "(bash scripts/setup.sh --test installs it)")
def test_dashboard_in_a_browser(tmp_path: Path, monkeypatch: Any) -> None:
    pytest.importorskip("playwright")
    monkeypatch.setenv("METERSTREAM_OPERATOR_TOKENS", f"alice:{TOKEN}")
    import aiohttp
    from playwright.async_api import async_playwright

    from meterfield.config import parse_config
    from meterfield.field import Field
    from meterstream.collectors.archive import load_archive
    from meterstream.pipeline.broker import EmbeddedBroker
    from meterstream.pipeline.collector_kafka import KafkaCollector
    from meterstream.pipeline.config import WorkerConfig
    from meterstream.pipeline.runner import all_topics, start_worker

    shutil.rmtree(ARTIFACTS, ignore_errors=True)

    async def scenario() -> None:
        hold = PortHold()
        fld = Field(parse_config(field_doc(hold.port), str(FIELD_CONFIG), FIELD_CONFIG.parent))
        app_id = "dash-worker"
        async with EmbeddedBroker(topics=all_topics(app_id), partitions=2) as broker:
            await fld.start()
            collector = None
            run = None
            try:
                fld.write_archive(tmp_path / "a.csv")
                fleet = fld.fleet
                conc = fleet.terminal_by_id("A001-C001")
                plain = [int(i) for i in conc.meters
                         if not fleet.protected[int(i)] and fleet.role[int(i)] == 0]
                victim = plain[0]
                addr = fleet.address_of(victim)
                cfg = dataclasses.replace(WorkerConfig(), partitions=2, tick_s=0.2, kpi_s=1.0,
                                          cycle_s=2.0, http_port=0)
                run = await start_worker(broker.bootstrap, tmp_path / "a.csv",
                                         open_window_tariffs(tmp_path), cfg,
                                         data_dir=tmp_path, app_id=app_id)
                collector = KafkaCollector(load_archive(tmp_path / "a.csv"),
                                           fast_collector_config(hold.release()),
                                           broker.bootstrap, spool_dir=tmp_path / "spool",
                                           session_timeout_s=3.0)
                await collector.start()
                bank = fld.bank
                await until(lambda: bank.relay_open_at(victim, fld.now())
                            and bank.relay_open_at(plain[1], fld.now()),
                            "the kernel cutting two customers off in the field")
                await until(lambda: bool(run.worker.kpi_ring), "a KPI snapshot")
                base = run.url.rsplit("/api/", 1)[0]
                await browse(base, addr, lambda: bank.relay_open_at(victim, fld.now()), fld,
                             fleet.address_of(plain[1]))
            finally:
                if collector is not None:
                    await collector.stop()
                if run is not None:
                    await run.stop()
                await fld.stop()

    async def browse(base: str, meter: str, relay_open: Any, fld: Any, payer: str) -> None:
        errors: list[str] = []
        async with async_playwright() as pw, aiohttp.ClientSession() as http:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu",
                      "--disable-background-networking"])
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(base + "/")
            await page.wait_for_selector("#live[data-seq]")
            # the overview: exact figures of the seq it shows, and a live update by push
            src, n = await figures_match(page, http, base)
            assert src.startswith("/api/overview?seq=") and n > 20
            seq0 = int(await page.get_attribute("#live", "data-seq") or 0)
            readings0 = await page.inner_text('[data-k="counters.readings"]')
            await page.wait_for_function(
                f"() => +document.querySelector('#live').dataset.seq > {seq0} && "
                f"document.querySelector('[data-k=\"counters.readings\"]').textContent "
                f"!== '{readings0}'", timeout=20_000)
            # another customer pays enough: the kernel reconnects, confirmed within the target
            pay = {"payment_id": "DASH-0", "meter": payer, "amount": "50.00",
                   "status": "settled", "channel": "95598",
                   "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
            async with http.post(f"{base}/api/payments", data=json.dumps(pay)) as r:
                assert r.status == 202, await r.text()
            await page.wait_for_selector('[data-k="reconnection.confirmed"]:text-is("1")',
                                         timeout=30_000)
            assert await page.inner_text('[data-k="reconnection.timely_bp"]') == "100.00%"
            await figures_match(page, http, base)
            await shot(page, "overview")
            # area A002 loses its links: one mass-dropout alarm, on the overview and its row
            fld.outage(area="A002")
            await page.wait_for_selector('#view [data-k$=".kind"]:text-is("area_dropout")',
                                         timeout=30_000)
            await figures_match(page, http, base)
            await shot(page, "overview-alarm")
            await page.goto(f"{base}/dashboard/#/areas")
            await page.wait_for_selector("#view tr.alarm")
            assert "A002" in await page.inner_text("#view tr.alarm")
            await figures_match(page, http, base)
            fld.restore(area="A002")
            for name, hash_ in (("areas", "#/areas"), ("terminal", "#/terminal/A001-C001"),
                                ("commands", "#/commands")):
                await page.goto(f"{base}/dashboard/{hash_}")
                await page.wait_for_selector("#view[data-src]")
                src, _ = await figures_match(page, http, base)
                assert name[:4] in src or (name == "commands" and src == "/api/queue")
                await shot(page, name)
            # the customer pays 1.00 at a channel (still below the cut-off threshold)
            pay = {"payment_id": "DASH-1", "meter": meter, "amount": "1.00",
                   "status": "settled", "channel": "alipay",
                   "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
            async with http.post(f"{base}/api/payments", data=json.dumps(pay)) as r:
                assert r.status == 202, await r.text()
            # a viewer sees the customer but cannot command
            await page.goto(f"{base}/dashboard/#/meter/{meter}")
            await page.wait_for_selector("#c-send")
            await page.wait_for_selector('[data-k="payments.0.payment_id"]', timeout=20_000)
            assert await page.inner_text('[data-k="payments.0.amount"]') == "1.00"
            assert await page.inner_text('[data-k="ledger.0.state"]') == "settled"
            assert await page.inner_text('[data-k="view.paid"]') == "1.00"
            assert await page.is_hidden("#signout") and await page.is_visible("#signin")
            assert await page.is_disabled("#c-send")
            assert not errors, errors  # the page so far; the next 401 is ours, on purpose
            status = await page.evaluate(
                """(m) => fetch('/api/commands', {method: 'POST', body: JSON.stringify(
                  {meter: m, action: 'close', reason: 'viewer try'})}).then(r => r.status)""",
                meter)
            assert status == 401
            await page.wait_for_timeout(200)
            assert len(errors) <= 1 and all("401" in e for e in errors), errors
            errors.clear()
            await figures_match(page, http, base)
            await shot(page, "meter-viewer")
            # an operator signs in and reconnects the customer from the page
            await page.fill("#token", TOKEN)
            await page.click("#signin button")
            await page.wait_for_selector('#who[data-operator="alice"]')
            assert await page.is_hidden("#signin") and await page.is_visible("#signout")
            await page.wait_for_selector("#c-send:not([disabled])")
            assert relay_open()
            await page.select_option("#c-action", "close")
            await page.fill("#c-reason", "paid at the counter, receipt 42")
            await page.click("#c-send")
            await page.wait_for_selector("#c-msg.ok")
            await until(lambda: not relay_open(), "the relay closing in the field")
            await page.wait_for_function(
                """() => [...document.querySelectorAll('tr[data-command]')].some(r =>
                  r.querySelector('[data-k$=".action"]').textContent === 'close' &&
                  r.querySelector('td.state').textContent === 'confirmed')""",
                timeout=30_000)
            await page.wait_for_function(
                "() => document.querySelector('[data-k=\"relay_read.relay\"]').textContent "
                "=== 'closed'")  # as the collector read it back
            await figures_match(page, http, base)
            async with http.get(f"{base}/api/meters/{meter}/history") as r:
                doc = await r.json()
            close = next(c for c in doc["commands"] if c["action"] == "close")
            assert close["who"] == "alice" and "receipt 42" in close["cause"]
            assert [t["to_state"] for t in close["transitions"]][-1] == "confirmed"
            assert close["transitions"][0]["to_state"] == "issued"
            await shot(page, "meter-operator")
            # the language switch (Chinese first, then English)
            assert await page.inner_text('a[href="#/overview"]') == "总览"
            await page.click("#lang")
            await page.wait_for_function(
                "() => document.querySelector('a[href=\"#/overview\"]').textContent "
                "=== 'Overview'")
            await figures_match(page, http, base)
            await shot(page, "meter-english")
            await browser.close()
        assert not errors, errors

    asyncio.run(asyncio.wait_for(scenario(), 150))


# --- unit: the command queue, over real command books (the worker is a stand-in) ---------------

def test_queue_puts_escalations_first_and_buckets_ages() -> None:
    from types import SimpleNamespace

    import aiohttp
    from aiohttp import web

    from meterstream.pipeline.api import AGE_BUCKETS_S, Api
    from meterstream.pipeline.commands import CommandBook, CommandPolicy

    s = 1_000_000_000
    now = 10_000 * s
    policy = CommandPolicy(max_attempts=1, result_timeout_s=5.0)
    book = CommandBook("T1", policy)
    book.issue("000000000001", "trip", "crew asked", now - 4000 * s, "bob")  # escalates
    book.on_sent("T1:1", now - 4000 * s)
    book.on_timeout(now - 3990 * s)
    book.issue("000000000002", "close", "paid", now - 30 * s, "bob")  # sent, 30 s old
    book.on_sent("T1:2", now - 30 * s)
    book.issue("000000000003", "keep-power-on", "hospital", now - 400 * s, "bob")  # issued
    core = SimpleNamespace(books={"T1": book}, now=lambda: now)
    worker = SimpleNamespace(core=core)

    async def go() -> dict[str, Any]:
        runner = web.AppRunner(Api(worker).routes())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://127.0.0.1:{port}/api/queue") as r:
                assert r.status == 200
                return await r.json()
        finally:
            await runner.cleanup()

    doc = asyncio.run(go())
    assert [c["id"] for c in doc["escalations"]] == ["T1:1"]
    assert doc["escalations"][0]["state"] == "escalated"
    assert [c["id"] for c in doc["open"]] == ["T1:3", "T1:2"]  # oldest first
    assert doc["age_buckets_s"] == list(AGE_BUCKETS_S)
    sent, issued = doc["by_state"]["sent"], doc["by_state"]["issued"]
    assert sent["count"] == 1 and sent["oldest_s"] == 30 and sent["ages"][0] == 1
    assert issued["oldest_s"] == 400 and issued["ages"] == [0, 0, 1, 0, 0]  # 300 < 400 <= 900
