"""The worker's JSON HTTP API (aiohttp): what the dashboard and the operators read and do.

GET  /api/summary                fleet figures, KPIs, counters, commands by state
GET  /api/terminals              every terminal this worker holds, one line each
GET  /api/terminals/{id}         a terminal: its meters (balance, relay, registers), commands
GET  /api/meters/{address}       a meter: balance, charged, paid, relay, its commands
GET  /api/commands               open commands and the latest closed ones, escalations first
GET  /api/events?limit=N         the latest events (alerts, dropouts, audit records)
POST /api/payments               a payment as a channel sends it -> meterstream.payments-in
POST /api/commands               an operator's command (token required) -> the command book

The live dashboard (docs/dashboard.md) is served here too, with the figures it shows:
GET  /  and /dashboard/           the dashboard page (assets in pipeline/web/, no CDN)
GET  /api/overview[?seq=N]        the live figures (a new seq each second; the last 60 kept)
GET  /api/areas[?seq=N]           one row per area, and the KPI ring for the charts
GET  /api/queue                   commands by state and age, escalations first
GET  /api/meters/{address}/history  balance history, payments, commands with transitions
GET  /api/whoami                  the operator a bearer token names (or the viewer role)
GET  /api/stream                  Server-Sent Events: each new overview, and new events

A reader needs nothing; a command needs `Authorization: Bearer <operator token>` (the tokens
come from the environment or the secrets file, never from a file in the repo). Errors are JSON
`{"error": "..."}` with a 4xx status; nothing here raises past the handler.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from aiohttp import web

from meterstream.pipeline import topics

WEB = Path(str(files("meterstream.pipeline") / "web"))
#: live overview docs kept for ?seq= (a page and a test read the same figures)
LIVE_KEPT = 60
#: the command queue's age buckets, seconds (the last is "older")
AGE_BUCKETS_S = (60, 300, 900, 3600)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status,
                             dumps=lambda d: json.dumps(d, ensure_ascii=False))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class MeterHistory:
    """What the dashboard shows of one customer over time, bounded whatever the fleet size.

    Only meters something happened to are kept (an event, a payment, a command transition, or
    a page asking for them), in LRU order, at most `meters` of them; each keeps a ring of its
    last `points` balance points and `entries` events. Memory is therefore
    O(meters x (points + entries)), never O(fleet): an event is a parsed JSON document of
    about 1.3 KB, so the default 1,024 x 32 events is at most about 43 MB (plus 64 small
    tuples each), whether the worker holds 10 thousand meters or 1 million. A balance point is
    taken at each event that changes or reports a balance, and once a second while the
    meter is watched (its page was read within `watch_s`).
    """

    def __init__(self, meters: int = 1024, points: int = 64, entries: int = 32,
                 watch_s: float = 600.0) -> None:
        self.meters, self.points, self.entries, self.watch_s = meters, points, entries, watch_s
        self._kept: OrderedDict[str, tuple[deque[tuple[str, str, str]],
                                           deque[dict[str, Any]]]] = OrderedDict()
        self._watched: dict[str, float] = {}

    def _of(self, meter: str) -> tuple[deque[tuple[str, str, str]], deque[dict[str, Any]]]:
        rec = self._kept.get(meter)
        if rec is None:
            rec = self._kept[meter] = (deque(maxlen=self.points), deque(maxlen=self.entries))
            while len(self._kept) > self.meters:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(meter)
        return rec

    def balance(self, meter: str, ts: str, balance: str, why: str) -> None:
        points = self._of(meter)[0]
        if not points or points[-1][1] != balance:
            points.append((ts, balance, why))

    def event(self, meter: str, doc: dict[str, Any]) -> None:
        self._of(meter)[1].append(doc)

    def watch(self, meter: str) -> None:
        self._watched[meter] = time.monotonic()

    def watched(self) -> list[str]:
        cut = time.monotonic() - self.watch_s
        for m in [m for m, t in self._watched.items() if t < cut]:
            del self._watched[m]
        return list(self._watched)

    def points_of(self, meter: str) -> list[tuple[str, str, str]]:
        rec = self._kept.get(meter)
        return list(rec[0]) if rec else []

    def events_of(self, meter: str) -> list[dict[str, Any]]:
        rec = self._kept.get(meter)
        return list(rec[1]) if rec else []

    def __len__(self) -> int:
        return len(self._kept)


class Api:
    """Routes over a WorkerApp (its core, its events) and a producer for payments."""

    def __init__(self, worker: Any, *, operator_tokens: dict[str, str] | None = None,
                 live_s: float = 1.0, history: MeterHistory | None = None) -> None:
        self.worker = worker
        self.core = worker.core
        self.tokens = operator_tokens or {}  # token -> operator name
        self.live_s = live_s
        self.history = history if history is not None else MeterHistory()
        self.live: deque[dict[str, Any]] = deque(maxlen=LIVE_KEPT)
        self._series: dict[int, list[dict[str, Any]]] = {}
        self._books: dict[str, tuple[dict[str, int], int, int]] = {}  # open_figures per terminal
        self._seq = 0
        self._live_at = 0.0
        # one queue per stream client: ("overview", doc), ("event", doc) or ("close", None)
        self._clients: set[asyncio.Queue[tuple[str, Any]]] = set()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        listeners = getattr(worker, "event_listeners", None)
        if listeners is not None:
            listeners.append(self._on_event)

    def routes(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.on_startup.append(self._start_live)
        app.on_shutdown.append(self._stop_live)
        app.add_routes([
            web.get("/", self.index_redirect),
            web.get("/dashboard/", self.index),
            web.static("/dashboard/static", WEB),
            web.get("/api/overview", self.overview),
            web.get("/api/areas", self.areas),
            web.get("/api/queue", self.queue),
            web.get("/api/meters/{address}/history", self.meter_history),
            web.get("/api/whoami", self.whoami),
            web.get("/api/stream", self.stream),
            web.get("/api/summary", self.summary),
            web.get("/api/terminals", self.terminals),
            web.get("/api/terminals/{id}", self.terminal),
            web.get("/api/meters/{address}", self.meter),
            web.get("/api/commands", self.commands),
            web.get("/api/events", self.events),
            web.post("/api/payments", self.pay),
            web.post("/api/commands", self.command),
        ])
        return app

    # --- the dashboard: live figures, pushed ------------------------------------------------

    async def index_redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard/")

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    def _on_event(self, doc: dict[str, Any]) -> None:
        """Each event the worker publishes: the meter's history, and every stream client.
        Called inside the worker's publish loop: it never raises into it."""
        try:
            self._note(doc)
        except Exception:
            import logging

            logging.getLogger("meterstream.api").exception("dashboard: event not noted")

    def _note(self, doc: dict[str, Any]) -> None:
        meter = doc.get("meter")
        if isinstance(meter, str):
            self.history.event(meter, doc)
            balance = self._balance(meter)
            if balance is not None:
                why = doc.get("kind") or doc.get("to_state") or doc.get("type", "")
                self.history.balance(meter, doc.get("ts", ""), balance, str(why))
        self._push("event", doc)

    def _push(self, kind: str, doc: Any) -> None:
        """To every stream client at once; a slow page loses items, never the worker's time."""
        for q in self._clients:
            if not q.full():
                q.put_nowait((kind, doc))

    def _balance(self, meter: str) -> str | None:
        """A meter's balance as the API writes it (exact yuan string), None if unknown."""
        from meterstream.pipeline.worker import _yuan

        s = self.core.slot(int(meter)) if meter.isdigit() else -1
        return None if s < 0 else _yuan(int(self.core.fleet.hot["balance"][s]))

    def _snapshot(self) -> dict[str, Any]:
        """One live overview: every figure of the overview and areas pages."""
        core, worker = self.core, self.worker
        k = core.kpi_view()
        held = worker.owned()
        by_state: dict[str, int] = {}
        awaiting = escalations = 0
        for t in core.take_changed_books() | (core.books.keys() - self._books.keys()):
            self._books[t] = core.books[t].open_figures()
        for t in self._books.keys() - core.books.keys():
            del self._books[t]
        for states, waiting, escalated in self._books.values():
            for state, n in states.items():
                by_state[state] = by_state.get(state, 0) + n
            awaiting += waiting
            escalations += escalated
        alarms = core.open_alarms()
        alarmed_areas = {a["area"] for a in alarms if a["kind"] == "area_dropout"}
        areas = []
        for name, a in k["areas"].items():
            areas.append({"area": name, "terminals": a["terminals"], "online": a["online"],
                          "online_bp": (a["online"] * 10_000 // a["terminals"]
                                        if a["terminals"] else None),
                          "success_bp": a["success_bp"], "line_loss_bp": a["line_loss_bp"],
                          "customers": a["customers"], "in_arrears": a["in_arrears"],
                          "cut_off": a["cut_off"], "dropout_alarm": name in alarmed_areas})
        self._seq += 1
        c = core.counters
        return {
            "seq": self._seq, "ts": k["ts"],
            "meters": core.fleet.n_meters, "terminals": core.fleet.n_terminals,
            "terminals_held": len(held),
            "terminals_online": _online(core, held),
            "success_bp_by_class": k["success_bp_by_class"],
            "reads_by_class": k["reads_by_class"],
            "customers": k["customers"], "in_arrears": k["in_arrears"], "cut_off": k["cut_off"],
            "awaiting_reconnection": awaiting,
            "reconnection": core.reconnection_stats(),
            "open_alarms": len(alarms) + escalations, "alarms": alarms[:50],
            "escalations": escalations,
            "commands_by_state": by_state,
            "counters": {key: c[key] for key in ("readings", "batches", "payments",
                                                  "duplicate_payments", "commands_sent")},
            "areas": areas,
        }

    def _refresh(self, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if force or not self.live or now - self._live_at >= self.live_s:
            self.live.append(self._snapshot())
            # the KPI ring as of this seq (references, not copies), for /api/areas?seq=
            self._series[self.live[-1]["seq"]] = list(getattr(self.worker, "kpi_ring", ()))
            while len(self._series) > LIVE_KEPT:
                del self._series[next(iter(self._series))]
            self._live_at = now
            for meter in self.history.watched():
                balance = self._balance(meter)
                if balance is not None:
                    self.history.balance(meter, self.live[-1]["ts"], balance, "reading")
        return self.live[-1]

    async def _start_live(self, app: web.Application) -> None:
        self._task = asyncio.get_running_loop().create_task(self._live_loop())

    async def _stop_live(self, app: web.Application) -> None:
        self._closing.set()
        self._push("close", None)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _live_loop(self) -> None:
        """A new overview each live_s while a page listens (none is computed for nobody)."""
        while not self._closing.is_set():
            if self._clients:
                try:
                    self._refresh(force=True)
                except Exception:  # a figure that cannot be computed must not end the push
                    import logging

                    logging.getLogger("meterstream.api").exception("dashboard snapshot")
                if self.live:
                    self._push("overview", self.live[-1])
            await asyncio.sleep(self.live_s)

    def _at_seq(self, request: web.Request) -> dict[str, Any] | web.Response:
        seq = request.query.get("seq")
        if seq is None:
            return self._refresh()
        for doc in self.live:
            if str(doc["seq"]) == seq:
                return doc
        return _error(404, f"seq {seq}: not among the last {LIVE_KEPT} overviews")

    async def overview(self, request: web.Request) -> web.Response:
        doc = self._at_seq(request)
        return doc if isinstance(doc, web.Response) else _json(doc)

    async def areas(self, request: web.Request) -> web.Response:
        doc = self._at_seq(request)
        if isinstance(doc, web.Response):
            return doc
        return _json({"seq": doc["seq"], "ts": doc["ts"], "areas": doc["areas"],
                      "series": self._series.get(doc["seq"], []),
                      "ring_size": self.worker.kpi_ring.maxlen})

    async def queue(self, request: web.Request) -> web.Response:
        """Open commands by state and age; escalated (work order out) before everything."""
        from meterstream.pipeline.commands import ESCALATED

        now = self.core.now()
        by_state: dict[str, dict[str, Any]] = {}
        open_, escalated = [], []
        for book in self.core.books.values():
            for c in book.open_commands():
                age_s = max(0, (now - c.issued_ns) // 1_000_000_000)
                row = by_state.setdefault(c.state, {"count": 0, "oldest_s": 0,
                                                    "ages": [0] * (len(AGE_BUCKETS_S) + 1)})
                row["count"] += 1
                row["oldest_s"] = max(row["oldest_s"], age_s)
                row["ages"][sum(1 for b in AGE_BUCKETS_S if age_s > b)] += 1
                open_.append({**c.to_dict(), "age_s": age_s})
            escalated += [{**c.to_dict(), "age_s": max(0, (now - c.issued_ns) // 1_000_000_000)}
                          for c in book.history() if c.state == ESCALATED and c.work_order]
        open_.sort(key=lambda c: -c["age_s"])
        escalated.sort(key=lambda c: -c["age_s"])
        return _json({"age_buckets_s": list(AGE_BUCKETS_S), "by_state": by_state,
                      "escalations": escalated, "open": open_[:500],
                      "open_total": len(open_)})

    async def meter_history(self, request: web.Request) -> web.Response:
        address = request.match_info["address"]
        core = self.core
        view = core.meter_view(address)
        if view is None:
            return _error(404, f"meter {address} is not in the archive")
        s = core.slot(int(address))
        self.history.watch(address)
        self.history.balance(address, self.live[-1]["ts"] if self.live else "",
                             view["balance"], "viewed")
        events = self.history.events_of(address)
        audits: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            if e.get("type") == "command_audit":
                audits.setdefault(e["command_id"], []).append(
                    {k: e.get(k) for k in ("ts", "from_state", "to_state", "who", "cause",
                                           "attempt")})
        book = core.book(view["terminal"])
        cmds = [c for c in book.history() + book.open_commands() if c.meter == address]
        cmds.sort(key=lambda c: -c.seq)
        # the relay as the collector last read it back (status word 3 of the latest command
        # result); view["relay"] is the billing kernel's decision, which a manual command does
        # not move
        read = max((c for c in cmds if c.status is not None),
                   key=lambda c: c.done_ns or c.sent_ns or 0, default=None)
        relay_read = None
        if read is not None and read.status is not None:
            from meterstream.collectors.dlt645.registry import StatusWord3

            word = StatusWord3.from_word(read.status)
            relay_read = {"relay": "open" if word.relay_open else "closed",
                          "keep_power": bool(word.keep_power), "command": read.id,
                          "at": _iso_ns(read.done_ns or read.sent_ns or 0)}
        fleet = core.fleet
        from meterstream.kernels import layout as L

        names = {L.LEDGER_SETTLED: "settled", L.LEDGER_PENDING: "pending",
                 L.LEDGER_FAILED: "failed", L.LEDGER_UNSEEN: "unseen"}
        ledger = [{"payment_id": fleet.payment_names[k],
                   "state": names.get(int(fleet.ledger[k, L.L_STATE]), "?")}
                  for k in fleet.meter_payments(s)]
        pay_kinds = ("payment_applied", "duplicate_payment", "withholding_pending",
                     "payment_failed", "payment_repeated")
        return _json({
            "meter": address, "view": {**view, **core.meter_collection(s)},
            "relay_read": relay_read,
            "balance_history": [{"ts": t, "balance": b, "why": w}
                                for t, b, w in self.history.points_of(address)],
            "payments": [e for e in events if e.get("kind") in pay_kinds][::-1],
            "ledger": ledger,
            "commands": [{"id": c.id, "action": c.action, "state": c.state, "who": c.who,
                          "cause": c.cause, "attempts": c.attempts,
                          "transitions": audits.get(c.id, [])} for c in cmds],
            "kept": {"meters": self.history.meters, "points": self.history.points,
                     "entries": self.history.entries}})

    async def whoami(self, request: web.Request) -> web.Response:
        who = self._operator(request)
        if who is None and request.headers.get("Authorization"):
            return _error(401, "this token is not an operator's")
        return _json({"operator": who, "role": "operator" if who else "viewer"})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: `overview` (the doc of /api/overview?seq=N) each live_s, and
        `events` (a list: what the worker published) as soon as they are published."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=512)
        self._clients.add(q)
        last = 0
        try:
            items = [("overview", self._refresh())]
            while not self._closing.is_set():
                overview, news = None, []
                for kind, doc in items:
                    if kind == "overview":
                        overview = doc  # the newest of those waiting
                    elif kind == "event":
                        news.append(doc)
                if overview is not None and overview["seq"] != last:
                    last = overview["seq"]
                    await resp.write(_sse("overview", overview))
                if news:
                    await resp.write(_sse("events", news))
                if any(kind == "close" for kind, _doc in items):
                    break
                try:
                    items = [await asyncio.wait_for(q.get(), 15.0)]
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    items = []
                    continue
                while not q.empty():  # whatever else is waiting goes in the same write
                    items.append(q.get_nowait())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(q)
        return resp

    def _operator(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        return next((name for t, name in self.tokens.items()
                     if token and hmac.compare_digest(t, token)), None)

    # --- reads --------------------------------------------------------------------------------

    async def summary(self, request: web.Request) -> web.Response:
        core = self.core
        hot = core.fleet.hot
        by_state: dict[str, int] = {}
        for book in core.books.values():
            for c in book.open_commands():
                by_state[c.state] = by_state.get(c.state, 0) + 1
        held = self.worker.owned()
        return _json({
            "meters": core.fleet.n_meters, "terminals": core.fleet.n_terminals,
            "terminals_held": len(held),
            "terminals_online": _online(core, held),
            "relays_open": int(hot["relay_open"].sum()),
            "open_commands": by_state, "counters": dict(core.counters),
            "worker_errors": self.worker.errors, "kpis": self.worker.kpis,
        })

    async def terminals(self, request: web.Request) -> web.Response:
        core = self.core
        rows = []
        for t in sorted(self.worker.owned()):
            i = core.terminal_index[t]
            sl = core.fleet.block(i)
            rows.append({"terminal": t, "area": core.terminal_area[i],
                         "meters": sl.stop - sl.start,
                         "online": bool(core.fleet.terminal_online[i]),
                         "open_commands": len(core.book(t).open_commands()) if t in core.books
                         else 0})
        return _json(rows)

    async def terminal(self, request: web.Request) -> web.Response:
        core = self.core
        tid = request.match_info["id"]
        i = core.terminal_index.get(tid)
        if i is None:
            return _error(404, f"terminal {tid} is not in the archive")
        sl = core.fleet.block(i)
        meters = [{**core.meter_view(core.addresses[s]), **core.meter_collection(s)}
                  for s in range(sl.start, sl.stop)]
        book = core.book(tid)
        st = core.collection
        return _json({"terminal": tid, "area": core.terminal_area[i],
                      "online": bool(core.fleet.terminal_online[i]),
                      "missed_cycles": int(st.term_missed[i]),
                      "last_seen": _iso_ns(int(st.term_last_seen_ns[i])),
                      "held_here": tid in self.worker.owned(), "meters": meters,
                      "commands": [c.to_dict() for c in book.open_commands()],
                      "history": [c.to_dict() for c in book.history()[-50:]]})

    async def meter(self, request: web.Request) -> web.Response:
        view = self.core.meter_view(request.match_info["address"])
        if view is None:
            return _error(404, f"meter {request.match_info['address']} is not in the archive")
        return _json(view)

    async def commands(self, request: web.Request) -> web.Response:
        open_, closed = [], []
        for book in self.core.books.values():
            open_ += [c.to_dict() for c in book.open_commands()]
            closed += [c.to_dict() for c in book.history()[-20:]]
        rank = {"escalated": 0, "refused": 1}
        closed.sort(key=lambda c: (rank.get(c["state"], 2), -(c["done_ns"] or 0)))
        open_.sort(key=lambda c: c["issued_ns"])
        return _json({"open": open_, "closed": closed[:200]})

    async def events(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(2000, int(request.query.get("limit", "100"))))
        except ValueError:
            return _error(400, "limit: give a number of events (1..2000)")
        return _json(list(self.worker.events)[-limit:])

    # --- writes -------------------------------------------------------------------------------

    async def pay(self, request: web.Request) -> web.Response:
        """A payment channel's message, checked here so the caller hears what is wrong at once;
        the intake checks it again (the topic has other writers)."""
        from meterstream.pipeline.payments import Payment, parse_payment

        raw = await request.read()
        parsed = parse_payment(raw, zone=self.core.tariff.zone)
        if not isinstance(parsed, Payment):
            return _error(400, parsed.reason)
        await self.worker.topic[topics.PAYMENTS_IN.name].send(
            key=parsed.payment_id.encode(), value=raw)
        return _json({"accepted": parsed.payment_id, "meter": parsed.address}, 202)

    async def command(self, request: web.Request) -> web.Response:
        who = self._operator(request)
        if who is None:
            return _error(401, "an operator token is required for commands (viewers are "
                          "read-only)")
        try:
            doc = json.loads(await request.read())
            meter, action, why = str(doc["meter"]), str(doc["action"]), str(doc["reason"])
        except (ValueError, KeyError, TypeError):
            return _error(400, 'expected JSON {"meter": ..., "action": ..., "reason": ...}')
        if not why.strip():
            return _error(400, "reason: say why (it goes into the audit trail)")
        view = self.core.meter_view(meter)
        if view is None:
            return _error(404, f"meter {meter} is not in the archive")
        terminal = view["terminal"]
        if terminal not in self.worker.owned():
            return _error(409, f"terminal {terminal} is held by another worker")
        try:
            await self.worker.manual(terminal, meter, action, who, why)
        except ValueError as exc:
            return _error(400, str(exc))
        return _json({"issued": action, "meter": meter, "by": who}, 202)


def _online(core: Any, terminals: list[str]) -> int:
    """Online terminals among `terminals` (an int64 sum: the int8 flags would wrap)."""
    import numpy as np

    idx = np.fromiter((core.terminal_index[t] for t in terminals), np.int64, len(terminals))
    return int(core.fleet.terminal_online[idx].sum(dtype=np.int64))


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _iso_ns(ns: int) -> str | None:
    from datetime import UTC, datetime

    if ns <= 0:
        return None
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


async def serve(api: Api, host: str, port: int) -> web.AppRunner:
    """Start the API on host:port; returns the runner (await runner.cleanup() to stop)."""
    runner = web.AppRunner(api.routes(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
