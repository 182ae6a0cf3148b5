"""Capture replay: serve the terminals of a capture over TCP, answering from the recording.

Each terminal of the capture takes its recorded role: a listening terminal (concentrator,
serial server) listens and accepts collectors; a DTU dials the collector's dial-in port,
registers with `$REG,<terminal>,<firmware>` and sends heartbeats. A collector's request is
answered with the recorded reply to the *current read* of that meter and data item: the latest
recorded request with the same function, address and DI at or before the simulated time, or,
in a capture without requests for it, the latest recorded reply. A current read that got no
reply stays silent (a missed read), as does a request the capture never saw. Simulated time
runs from the capture's first record (or `start_ns`) at `speed` simulated seconds per real
second; the collector's own poll decides when it asks. No money, no billing; bytes only.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import csv
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, cast

import numpy as np
import numpy.typing as npt
from numba import njit

from meterstream.capture import TO_COLLECTOR, TO_FIELD, Capture
from meterstream.collectors.dlt645 import Frame, FrameReader, encode_frame
from meterstream.collectors.dlt645.frame import SUB_33

Key = tuple[bytes, int, bytes]  # (address wire, function, DI wire)


def _key(frame: Frame) -> Key:
    func = frame.control & 0x1F
    di = frame.data[:4] if func == 0x11 else frame.data[:2] if func == 0x01 else b""
    return frame.address_wire, func, di


@dataclass
class ReadBook:
    """Per (address, function, DI): recorded request times and the reply each got (or None),
    plus replies that matched no request (a replies-only capture)."""

    req_ts: dict[Key, list[int]] = field(default_factory=dict)
    req_reply: dict[Key, list[bytes | None]] = field(default_factory=dict)
    rep_ts: dict[Key, list[int]] = field(default_factory=dict)
    rep: dict[Key, list[bytes]] = field(default_factory=dict)

    def answer(self, key: Key, now_ns: int) -> bytes | None:
        times = self.req_ts.get(key)
        if times:
            i = bisect.bisect_right(times, now_ns) - 1
            return self.req_reply[key][i] if i >= 0 else None
        times = self.rep_ts.get(key)
        if times:
            i = bisect.bisect_right(times, now_ns) - 1
            return self.rep[key][i] if i >= 0 else None
        return None


class ArrayBook:
    """ReadBook's answers from arrays over the capture's buffer (the vectorised index): per key,
    request times and the record index of each one's reply (-1: none), and reply-only times."""

    def __init__(self, cap: Capture, at: npt.NDArray[np.int64], preamble: int) -> None:
        self.cap = cap
        self.at = at  # per record: where its one frame starts (FE bytes before it)
        self.fe = b"\xfe" * preamble
        self.preamble = preamble
        self.req_ts: dict[Key, npt.NDArray[np.int64]] = {}
        self.req_rec: dict[Key, npt.NDArray[np.int64]] = {}
        self.rep_ts: dict[Key, npt.NDArray[np.int64]] = {}
        self.rep_rec: dict[Key, npt.NDArray[np.int64]] = {}

    def _wire(self, rec: int) -> bytes:
        p = self.cap.payload(rec)
        at = int(self.at[rec])
        return p if at == self.preamble else self.fe + p[at:]

    def answer(self, key: Key, now_ns: int) -> bytes | None:
        for times, recs in ((self.req_ts.get(key), self.req_rec.get(key)),
                            (self.rep_ts.get(key), self.rep_rec.get(key))):
            if times is not None and recs is not None and times.size:
                i = int(np.searchsorted(times, now_ns, side="right")) - 1
                if i < 0:
                    return None
                rec = int(recs[i])
                return None if rec < 0 else self._wire(rec)
        return None


@njit(cache=True)
def _scan_frames(buf: npt.NDArray[np.uint8], offset: npt.NDArray[np.int64],
                 length: npt.NDArray[np.int64], sel: npt.NDArray[np.int64],
                 at: npt.NDArray[np.int64], control: npt.NDArray[np.int64],
                 addr: npt.NDArray[np.int64], di: npt.NDArray[np.int64]) -> int:
    """For each selected record: the start of its one well-formed frame (else -1), control,
    the 6 address bytes as a little-endian number, the DI after 33H (-1 if none). Returns how
    many selected records are not exactly one frame."""
    bad = 0
    for j in range(sel.shape[0]):
        r = sel[j]
        o = offset[r]
        n = length[r]
        i = 0
        while i < n and i < 8 and buf[o + i] == 0xFE:
            i += 1
        at[r] = -1
        if n < i + 12 or buf[o + i] != 0x68 or buf[o + i + 7] != 0x68 or buf[o + n - 1] != 0x16 \
                or n != i + 12 + buf[o + i + 9]:
            bad += 1
            continue
        cs = 0
        for k in range(i, n - 2):
            cs += buf[o + k]
        if (cs & 0xFF) != buf[o + n - 2]:
            bad += 1
            continue
        at[r] = i
        c = buf[o + i + 8]
        control[r] = c
        a = 0
        for k in range(6):
            a |= int(buf[o + i + 1 + k]) << (8 * k)
        addr[r] = a
        f = c & 0x1F
        dl = 4 if f == 0x11 else 2 if f == 0x01 else 0
        ln = buf[o + i + 9]
        d = -1
        if dl and ln >= dl and not c & 0x40:
            d = 0
            for k in range(dl):
                d |= ((int(buf[o + i + 10 + k]) - 0x33) & 0xFF) << (8 * k)
        di[r] = d
    return bad


@njit(cache=True)
def _match(sel: npt.NDArray[np.int64], kind: npt.NDArray[np.int8], control: npt.NDArray[np.int64],
           key: npt.NDArray[np.int64], n_keys: int, reply_of: npt.NDArray[np.int64],
           orphan: npt.NDArray[np.bool_]) -> None:
    """A reply answers the latest unanswered request of its key; one that answers none is an
    orphan (a replies-only capture)."""
    pending = np.full(n_keys, -1, np.int64)
    for j in range(sel.shape[0]):
        r = sel[j]
        k = key[j]
        is_reply = (control[r] & 0x80) != 0
        if kind[r] == 2 and not is_reply:
            pending[k] = r
            reply_of[r] = -1
        elif kind[r] == 3 and is_reply:
            q = pending[k]
            if q >= 0:
                reply_of[q] = r
                pending[k] = -1
            else:
                orphan[r] = True


def _array_books(cap: Capture, preamble: int) -> list[ArrayBook] | None:
    """The vectorised index, when every data record is one well-formed frame and no reply is
    abnormal (a converted capture); None otherwise (build_books then reads frame by frame)."""
    n = len(cap)
    sel = np.flatnonzero((cap.kind == TO_FIELD) | (cap.kind == TO_COLLECTOR)).astype(np.int64)
    at = np.full(n, -1, np.int64)
    control = np.zeros(n, np.int64)
    addr = np.zeros(n, np.int64)
    di = np.full(n, -1, np.int64)
    buf = np.frombuffer(cap.buf, np.uint8)
    if _scan_frames(buf, cap.offset, cap.length, sel, at, control, addr, di):
        return None
    if np.any(control[sel] & 0x40):
        return None
    term = cap.terminal[sel].astype(np.int64)
    _, a_id = np.unique(addr[sel], return_inverse=True)
    d_vals, d_id = np.unique(di[sel], return_inverse=True)
    func = control[sel] & 0x1F
    combined = ((term * (int(a_id.max()) + 1 if sel.size else 1) + a_id.ravel()) * 32 + func) \
        * d_vals.size + d_id.ravel()
    keys, key = np.unique(combined, return_inverse=True)
    key = key.ravel().astype(np.int64)
    reply_of = np.full(n, -1, np.int64)
    orphan = np.zeros(n, np.bool_)
    _match(sel, cap.kind, control, key, int(keys.size), reply_of, orphan)
    books = [ArrayBook(cap, at, preamble) for _ in cap.terminals]
    is_req = (cap.kind[sel] == TO_FIELD) & ((control[sel] & 0x80) == 0)
    is_orphan = orphan[sel]
    for wanted, ts_d, rec_d, recs_of in ((is_req, "req_ts", "req_rec", True),
                                         (is_orphan, "rep_ts", "rep_rec", False)):
        rows = sel[wanted]
        if not rows.size:
            continue
        kk = key[wanted]
        order = np.lexsort((cap.ts[rows], kk))
        rows, kk = rows[order], kk[order]
        bounds = np.flatnonzero(np.diff(kk)) + 1
        for part in np.split(np.arange(rows.size), bounds):
            r0 = int(rows[part[0]])
            f = int(control[r0]) & 0x1F
            d = int(di[r0])
            dl = 4 if f == 0x11 else 2 if f == 0x01 else 0
            k: Key = (int(addr[r0]).to_bytes(6, "little"), f,
                      d.to_bytes(dl, "little") if d >= 0 and dl else b"")
            book = books[int(cap.terminal[r0])]
            getattr(book, ts_d)[k] = cap.ts[rows[part]].copy()
            getattr(book, rec_d)[k] = reply_of[rows[part]] if recs_of else rows[part].copy()
    return books


def _single_frame(p: bytes) -> int:
    """Where the one whole, well-formed frame that is all of `p` starts (after FE bytes), or -1."""
    i = 0
    n = len(p)
    while i < n and i < 8 and p[i] == 0xFE:
        i += 1
    if n < i + 12 or p[i] != 0x68 or p[i + 7] != 0x68 or p[-1] != 0x16:
        return -1
    if n != i + 12 + p[i + 9] or sum(p[i:-2]) & 0xFF != p[-2]:
        return -1
    return i


def build_books(cap: Capture, *, preamble: int = 2) -> list[ReadBook] | list[ArrayBook]:
    """One ReadBook per terminal of the capture. Replies are matched to the latest unanswered
    request with the same function, address and DI on the same terminal; each is served with
    `preamble` FE bytes (the recorded FE run of a reply is not kept).

    A record that is exactly one well-formed frame (every record of a converted capture, most of
    a live one) is taken apart by slicing; anything else goes through the codec's FrameReader,
    one per terminal and direction, so frames split over records are found too."""
    fast = _array_books(cap, preamble)
    if fast is not None:
        return fast
    books = [ReadBook() for _ in cap.terminals]
    readers: dict[tuple[int, int], FrameReader] = {}
    pending: list[dict[Key, int]] = [{} for _ in cap.terminals]
    fe = b"\xfe" * preamble
    data = (cap.kind == TO_FIELD) | (cap.kind == TO_COLLECTOR)
    for i in data.nonzero()[0].tolist():
        t, kind = int(cap.terminal[i]), int(cap.kind[i])
        ts = int(cap.ts[i])
        payload = cap.payload(i)
        rd = readers.get((t, kind))
        at = _single_frame(payload) if rd is None or rd.buffered == 0 else -1
        found: list[tuple[Key, int, bytes | None]]  # key, control, reply bytes to serve
        if at >= 0:
            control = payload[at + 8]
            func = control & 0x1F
            dlen = 4 if func == 0x11 else 2 if func == 0x01 else 0
            di = payload[at + 10:at + 10 + min(dlen, payload[at + 9])].translate(SUB_33)
            key = (payload[at + 1:at + 7], func, di)
            found = [(key, control, payload if at == preamble else fe + payload[at:])]
        else:
            if rd is None:
                rd = readers[(t, kind)] = FrameReader()
            found = []
            for item in rd.feed(payload):
                if item.__class__ is Frame:
                    fr = cast(Frame, item)
                    found.append((_key(fr), fr.control,
                                  encode_frame(fr.address, fr.control, fr.data, preamble=preamble)
                                  if fr.checksum_ok else None))
        book = books[t]
        for key, control, wire in found:
            is_reply = bool(control & 0x80)
            if kind == TO_FIELD and not is_reply:
                lst = book.req_ts.setdefault(key, [])
                lst.append(ts)
                book.req_reply.setdefault(key, []).append(None)
                pending[t][key] = len(lst) - 1
            elif kind == TO_COLLECTOR and is_reply and wire is not None:
                if control & 0x40:  # an abnormal reply answers a request of any DI
                    match = [k for k in pending[t] if k[0] == key[0] and k[1] == key[1]]
                    key = match[-1] if match else key
                j = pending[t].pop(key, None)
                if j is not None:
                    book.req_reply[key][j] = wire
                else:
                    book.rep_ts.setdefault(key, []).append(ts)
                    book.rep.setdefault(key, []).append(wire)
    for book in books:  # times are in record order; keep lookups right if a writer's clock stepped
        for d_ts, d_val in ((book.req_ts, book.req_reply), (book.rep_ts, book.rep)):
            values = cast(dict[Key, list[Any]], d_val)
            for k, times in d_ts.items():
                if any(b < a for a, b in itertools.pairwise(times)):
                    order = sorted(range(len(times)), key=times.__getitem__)
                    d_ts[k] = [times[j] for j in order]
                    values[k] = [values[k][j] for j in order]
    return books


class PlayClock:
    """Simulated epoch ns = start + real elapsed x speed (speed 0: only `set` moves it)."""

    def __init__(self, start_ns: int, speed: float) -> None:
        self.start_ns = start_ns
        self.speed = speed
        self._t0 = time.monotonic()

    def now_ns(self) -> int:
        return self.start_ns + int((time.monotonic() - self._t0) * self.speed * 1e9)

    def set(self, ns: int) -> None:
        self.start_ns = ns
        self._t0 = time.monotonic()


@dataclass
class PlayStats:
    requests: int = 0
    answered: int = 0
    silent: int = 0
    connections: int = 0


class _Conn(asyncio.Protocol):
    def __init__(self, player: Player, t: int, *, dial: bool = False) -> None:
        self.player = player
        self.t = t
        self.dial = dial
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.player.stats.connections += 1
        self.player.conns.add(self)
        if self.dial:
            info = self.player.cap.terminals[self.t]
            fw = info.get("firmware") or "REPLAY"
            self.transport.write(f"$REG,{info['id']},{fw}\r\n".encode())

    def data_received(self, data: bytes) -> None:
        p = self.player
        book = p.books[self.t]
        now = p.clock.now_ns()
        for item in self.reader.feed(data):
            if item.__class__ is not Frame:
                continue
            fr = cast(Frame, item)
            if fr.control & 0x80:
                continue
            p.stats.requests += 1
            reply = book.answer(_key(fr), now)
            if reply is None:
                p.stats.silent += 1
            else:
                p.stats.answered += 1
                assert self.transport is not None
                self.transport.write(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.player.conns.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)


class Player:
    """Serves every terminal of a capture. `async with Player(cap, speed=...) as p:`."""

    def __init__(self, cap: Capture, *, speed: float = 1.0, start_ns: int | None = None,
                 host: str | None = None, port_base: int | None = None,
                 collector: tuple[str, int] | None = None, preamble: int = 2) -> None:
        self.cap = cap
        self.books = build_books(cap, preamble=preamble)
        first = int(cap.ts[(cap.kind == TO_FIELD) | (cap.kind == TO_COLLECTOR)].min()) \
            if len(cap) else 0
        self.first_ns = first
        self.last_ns = int(cap.ts.max()) if len(cap) else 0
        self.clock = PlayClock(first if start_ns is None else start_ns, speed)
        self.host = host
        self.port_base = port_base
        self.collector = collector
        self.stats = PlayStats()
        self.servers: dict[int, asyncio.Server] = {}
        self.endpoints: dict[str, tuple[str, str, int]] = {}  # id -> (mode, host, port)
        self.conns: set[_Conn] = set()
        self._dialers: list[asyncio.Task[None]] = []
        self._hb: list[asyncio.Task[None]] = []
        self.running = False
        self.skipped: list[str] = []  # terminals of the capture not served (not DL/T 645)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.running = True
        for t, info in enumerate(self.cap.terminals):
            if info.get("protocol", "dlt645") != "dlt645":
                self.skipped.append(info["id"])  # Modbus replay is not built (docs/recording.md)
                continue
            if info.get("mode", "listen") == "dial":
                host, port = self.collector or (info.get("host", "127.0.0.1"),
                                                int(info.get("port", 9700)))
                self.endpoints[info["id"]] = ("dial", host, port)
                self._dialers.append(loop.create_task(self._dial(t, host, port)))
                continue
            host = self.host or info.get("host") or "127.0.0.1"
            port = (self.port_base + t if self.port_base else 0) if self.port_base is not None \
                else int(info.get("port") or 0)
            srv = await loop.create_server(lambda t=t: _Conn(self, t), host, port,
                                           reuse_address=True)
            self.servers[t] = srv
            self.endpoints[info["id"]] = ("listen", host,
                                          int(srv.sockets[0].getsockname()[1]))

    async def _dial(self, t: int, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        hb_s = float(self.cap.terminals[t].get("heartbeat_s") or 0)
        tid = self.cap.terminals[t]["id"]
        backoff = 0.5
        while self.running:
            try:
                _, conn = await loop.create_connection(lambda: _Conn(self, t, dial=True), host, port)
            except OSError:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            seq = 0
            while not conn.closed.done():
                done, _ = await asyncio.wait({conn.closed}, timeout=hb_s if hb_s > 0 else None)
                if done or conn.transport is None:
                    break
                seq += 1
                conn.transport.write(f"$HB,{tid},{seq}\r\n".encode())
            if self.running:
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self.running = False
        for task in self._dialers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for srv in self.servers.values():
            srv.close()
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.abort()
        for srv in self.servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2.0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def write_archive(self, path: Path) -> None:
        """PATH-terminals.csv and PATH-meters.csv with the ports actually served, for a
        collector (`meterstream collect --archive PATH`); PATH itself is not written."""
        from meterstream.collectors.archive import sibling_paths

        term_path, meter_path = sibling_paths(path)
        term_path.parent.mkdir(parents=True, exist_ok=True)
        with open(term_path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["terminal", "area", "kind", "mode", "host", "port", "protocol", "meters",
                        "firmware", "heartbeat_s"])
            for info in self.cap.terminals:
                if info["id"] not in self.endpoints:
                    continue
                mode, host, port = self.endpoints[info["id"]]
                w.writerow([info["id"], info.get("area", ""), info.get("kind", ""), mode, host,
                            port, info.get("protocol", "dlt645"), len(info.get("meters", [])),
                            info.get("firmware", ""), info.get("heartbeat_s", 0)])
        with open(meter_path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["meter", "terminal", "protocol", "unit", "map", "prepaid"])
            for info in self.cap.terminals:
                if info["id"] not in self.endpoints:
                    continue
                for a in info.get("meters", []):
                    w.writerow([a, info["id"], "dlt645-2007", "", "", "none"])

    def summary(self) -> dict[str, Any]:
        return {"sim_ns": self.clock.now_ns(), "requests": self.stats.requests,
                "answered": self.stats.answered, "silent": self.stats.silent,
                "connections": len(self.conns), "ended": self.clock.now_ns() > self.last_ns}
