"""The worker's JSON HTTP API (aiohttp): what the dashboard and the operators read and do.

GET  /api/summary                fleet figures, KPIs, counters, commands by state
GET  /api/terminals              every terminal this worker holds, one line each
GET  /api/terminals/{id}         a terminal: its meters (balance, relay, registers), commands
GET  /api/meters/{address}       a meter: balance, charged, paid, relay, its commands
GET  /api/commands               open commands and the latest closed ones, escalations first
GET  /api/events?limit=N         the latest events (alerts, dropouts, audit records)
POST /api/payments               a payment as a channel sends it -> meterstream.payments-in
POST /api/commands               an operator's command (token required) -> the command book

A reader needs nothing; a command needs `Authorization: Bearer <operator token>` (the tokens
come from the environment, never from a file in the repo). Errors are JSON
`{"error": "..."}` with a 4xx status; nothing here raises past the handler.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from meterstream.pipeline import topics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status,
                             dumps=lambda d: json.dumps(d, ensure_ascii=False))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class Api:
    """Routes over a WorkerApp (its core, its events) and a producer for payments."""

    def __init__(self, worker: Any, *, operator_tokens: dict[str, str] | None = None) -> None:
        self.worker = worker
        self.core = worker.core
        self.tokens = operator_tokens or {}  # token -> operator name

    def routes(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.add_routes([
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
            "terminals_online": int(sum(core.fleet.terminal_online[core.terminal_index[t]]
                                        for t in held)),
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
        meters = [core.meter_view(core.addresses[s]) for s in range(sl.start, sl.stop)]
        book = core.book(tid)
        return _json({"terminal": tid, "area": core.terminal_area[i],
                      "online": bool(core.fleet.terminal_online[i]),
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
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        who = next((name for t, name in self.tokens.items()
                    if token and hmac.compare_digest(t, token)), None)
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


async def serve(api: Api, host: str, port: int) -> web.AppRunner:
    """Start the API on host:port; returns the runner (await runner.cleanup() to stop)."""
    runner = web.AppRunner(api.routes(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
