"""The recording proxy (`meterstream record`): a TCP relay between collectors and terminals that
writes every byte, both ways, to a capture file.

Listening terminals: the proxy listens on a port of its own per terminal and relays each
connection to the terminal's real address; the collector is pointed at the proxy by the
archive the proxy writes (same meters, the proxy's ports). Dial-in terminals (DTUs): the proxy
listens where the DTUs dial and relays each connection to the collector's dial-in port,
naming the connection after the terminal id of its `$REG` line. The relay never changes,
delays or reorders a byte: the collector and the field see each other as without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from meterstream.capture import CLOSE, OPEN, TO_COLLECTOR, TO_FIELD, CaptureWriter
from meterstream.collectors.archive import Archive, sibling_paths

MAX_REG_WAIT = 256  # bytes of a dial-in connection held back while looking for its $REG line


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0  # the far side could not be reached: the near side was closed
    to_field: int = 0
    to_collector: int = 0


class _Half(asyncio.Protocol):
    """One side of a relayed connection."""

    def __init__(self, relay: _Relay, side: str, *, near: bool) -> None:
        self.relay = relay
        self.side = side  # who is on the other end of this socket: "collector" | "terminal"
        self.is_near = near  # accepted by the proxy (the far side is the one it connects to)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.is_near:
            self.relay.near_made(self)

    def data_received(self, data: bytes) -> None:
        self.relay.data(self.side, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.relay.lost(self.side, exc)


class _Relay:
    """A collector-side connection and its terminal-side twin.

    For a listening terminal the collector connects to the proxy (near = collector side) and the
    proxy connects out to the terminal. For a DTU the terminal connects to the proxy (near =
    terminal side) and the proxy connects out to the collector's dial-in port.
    """

    def __init__(self, proxy: RecordingProxy, terminal: str | None, far: tuple[str, int],
                 dial: bool) -> None:
        self.proxy = proxy
        self.terminal = terminal
        self.t = -1 if terminal is None else proxy.writer.terminal(terminal, **proxy.info(terminal))
        self.far_addr = far
        self.dial = dial
        self.near: _Half | None = None
        self.far: _Half | None = None
        self.held: list[tuple[int, str, bytes]] = []  # dial-in bytes before the $REG line
        self._pending: list[tuple[str, bytes]] = []  # bytes that came before the far side
        self.closed = False

    def near_made(self, half: _Half) -> None:
        self.near = half
        self.proxy.relays.add(self)
        self.proxy.stats.connections += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, far = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Half(self, "collector" if self.dial else "terminal", near=False),
                    *self.far_addr), 5.0)
        except (OSError, TimeoutError) as exc:
            self.proxy.stats.refused += 1
            self._record(CLOSE, f"cannot reach {self.far_addr[0]}:{self.far_addr[1]}: "
                         f"{getattr(exc, 'strerror', None) or exc or 'timeout'}".encode())
            self.close()
            return
        far_half = cast(_Half, far)
        if self.closed:
            if far_half.transport is not None:
                far_half.transport.close()
            return
        self.far = far_half
        peer = self.near.transport.get_extra_info("peername") if self.near and self.near.transport else None
        self._record(OPEN, f"{peer[0]}:{peer[1]}".encode() if peer else b"")
        for side, data in self._pending:
            self._forward(side, data)
        self._pending.clear()

    def _record(self, kind: int, payload: bytes) -> None:
        if self.t >= 0:
            self.proxy.writer.write(self.t, kind, payload)
        else:
            self.held.append((time.time_ns(), str(kind), payload))

    def data(self, side: str, data: bytes) -> None:
        if self.far is None:  # the far side is still connecting: keep order
            self._pending.append((side, data))
            return
        self._forward(side, data)

    def _forward(self, side: str, data: bytes) -> None:
        # side is who sent it; collector-side bytes go to the terminal
        to_field = side == "collector"
        if self.t < 0 and not to_field:
            self._identify(data)
        kind = TO_FIELD if to_field else TO_COLLECTOR
        if self.t >= 0:
            self.proxy.writer.write(self.t, kind, data)
        else:
            self.held.append((time.time_ns(), str(kind), data))
        if to_field:
            self.proxy.stats.to_field += len(data)
        else:
            self.proxy.stats.to_collector += len(data)
        if self.dial:  # near = terminal, far = collector
            dest = self.far if side == "terminal" else self.near
        else:  # near = collector, far = terminal
            dest = self.far if side == "collector" else self.near
        if dest is not None and dest.transport is not None:
            dest.transport.write(data)

    def _identify(self, data: bytes) -> None:
        """A DTU's first line names it: $REG,<terminal>,<firmware>."""
        seen = b"".join(p for _, k, p in self.held if k == str(TO_COLLECTOR)) + data
        end = seen.find(b"\n")
        tid = None
        if end >= 0 and seen.startswith(b"$REG,"):
            parts = seen[:end].rstrip(b"\r").decode("ascii", "replace").split(",")
            tid = parts[1] if len(parts) > 1 and parts[1] else None
        if tid is None and (end >= 0 or len(seen) > MAX_REG_WAIT):
            peer = self.near.transport.get_extra_info("peername") if self.near and self.near.transport else None
            tid = f"unregistered-{peer[0]}:{peer[1]}" if peer else "unregistered"
        if tid is None:
            return
        self.terminal = tid
        self.t = self.proxy.writer.terminal(tid, **self.proxy.info(tid))
        for ts, k, p in self.held:
            self.proxy.writer.write(self.t, int(k), p, ts_ns=ts)
        self.held.clear()

    def lost(self, side: str, exc: Exception | None) -> None:
        if self.closed:
            return
        self._record(CLOSE, f"closed by the {side}{': ' + str(exc) if exc else ''}".encode())
        self.close()

    def close(self) -> None:
        self.closed = True
        self.proxy.relays.discard(self)
        for h in (self.near, self.far):
            if h is not None and h.transport is not None:
                h.transport.close()


class RecordingProxy:
    """Relays and records every terminal of an archive."""

    def __init__(self, archive: Archive, writer: CaptureWriter, *, host: str = "127.0.0.1",
                 port_base: int = 0, dial_listen: tuple[str, int] | None = None,
                 dial_to: tuple[str, int] | None = None) -> None:
        self.archive = archive
        self.writer = writer
        self.host = host
        self.port_base = port_base
        self.dial_listen = dial_listen
        self.dial_to = dial_to
        self.stats = ProxyStats()
        self.servers: list[asyncio.Server] = []
        self.ports: dict[str, int] = {}
        self.relays: set[_Relay] = set()
        self._flusher: asyncio.Task[None] | None = None

    def info(self, tid: str) -> dict[str, Any]:
        plan = self.archive.terminals.get(tid)
        if plan is None:
            return {"mode": "dial"}
        return {"mode": plan.mode, "area": plan.area, "kind": plan.kind, "protocol": plan.protocol,
                "host": plan.host, "port": plan.port, "firmware": plan.firmware,
                "heartbeat_s": plan.heartbeat_s,
                "meters": [plan.address_text(k) for k in range(plan.n)]}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        i = 0
        for tid, plan in self.archive.terminals.items():
            if plan.mode != "listen":
                continue
            port = self.port_base + i if self.port_base else 0
            i += 1
            srv = await loop.create_server(self._listen_factory(tid, (plan.host, plan.port)),
                                           self.host, port, reuse_address=True)
            self.servers.append(srv)
            self.ports[tid] = int(srv.sockets[0].getsockname()[1])
        if self.dial_listen is not None and self.dial_to is not None:
            dial_to = self.dial_to

            def dial_half() -> _Half:
                return _Half(_Relay(self, None, dial_to, True), "terminal", near=True)

            srv = await loop.create_server(
                dial_half,
                *self.dial_listen,
                reuse_address=True)
            self.servers.append(srv)
        self._flusher = loop.create_task(self._flush_loop())

    def _listen_factory(self, tid: str, far: tuple[str, int]) -> Callable[[], _Half]:
        return lambda: _Half(_Relay(self, tid, far, False), "collector", near=True)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.writer.flush()

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for srv in self.servers:
            srv.close()
        for r in list(self.relays):
            r.lost("proxy", None)
        self.writer.flush()

    def write_archive(self, src: Path, dest: Path) -> None:
        """DEST (+ -terminals.csv, -meters.csv): the archive at SRC with every listening
        terminal pointed at the proxy."""
        src_terms, src_meters = sibling_paths(src)
        dst_terms, dst_meters = sibling_paths(dest)
        dst_terms.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).exists() and Path(src).resolve() != Path(dest).resolve():
            shutil.copyfile(src, dest)
        shutil.copyfile(src_meters, dst_meters)
        with open(src_terms, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        with open(dst_terms, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()) if rows else ["terminal"],
                               lineterminator="\n")
            w.writeheader()
            for row in rows:
                tid = row["terminal"].strip()
                if tid in self.ports:
                    row["host"], row["port"] = self.host, str(self.ports[tid])
                w.writerow(row)

