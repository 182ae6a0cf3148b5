"""A TCP proxy in front of the Kafka broker that can cut the link of some clients.

The broker advertises the proxy's port (`EmbeddedBroker(advertised_port=...)`), so every Kafka
client, in any process, connects through it. Each connection's first request names its client
(the Kafka request header carries `client_id` in clear), so `cut(prefix)` drops the open
connections of the clients whose id starts with `prefix` and refuses their new ones until
`restore()`; every other client (the workers, the payment channels) keeps its link. Real
sockets on loopback; it never parses anything past the first request header.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass

_HEAD = struct.Struct(">ihhih")  # size, api key, api version, correlation id, len(client id)


def client_id_of(head: bytes) -> str | None:
    """The client id of a Kafka request that starts `head`, None if `head` is too short to tell
    (or the id is null)."""
    if len(head) < _HEAD.size:
        return None
    _size, _key, _ver, _corr, n = _HEAD.unpack_from(head)
    if n < 0:
        return ""
    if len(head) < _HEAD.size + n:
        return None
    return head[_HEAD.size:_HEAD.size + n].decode("utf-8", "replace")


@dataclass
class ProxyStats:
    connections: int = 0  # accepted and forwarded
    dropped: int = 0  # open connections closed by a cut
    refused: int = 0  # new connections refused while cut
    cuts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class LinkProxy:
    """Forward 127.0.0.1:port to the broker; cut and restore the link of some clients."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host, self.want_port = host, port
        self.port = 0
        self.stats = ProxyStats()
        self._cut: str | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], tuple[str, list[asyncio.StreamWriter]]] = {}

    async def start(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.want_port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    @property
    def cut_prefix(self) -> str | None:
        return self._cut

    def cut(self, prefix: str) -> int:
        """Drop every open connection of a client whose id starts with `prefix`, and refuse new
        ones until `restore`; how many were dropped."""
        self._cut = prefix
        self.stats.cuts += 1
        n = 0
        for _task, (cid, writers) in list(self._conns.items()):
            if cid.startswith(prefix):
                for w in writers:
                    w.transport.abort()
                n += 1
        self.stats.dropped += n
        return n

    def restore(self) -> None:
        self._cut = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        head = b""
        try:
            while True:
                cid = client_id_of(head)
                if cid is not None:
                    break
                chunk = await reader.read(65536)
                if not chunk:
                    return
                head += chunk
            if self._cut is not None and cid.startswith(self._cut):
                self.stats.refused += 1
                return
            up_r, up_w = await asyncio.open_connection(*self.target)
            self.stats.connections += 1
            self._conns[task] = (cid, [writer, up_w])
            up_w.write(head)
            self.stats.bytes_up += len(head)
            await asyncio.gather(self._pipe(reader, up_w, True), self._pipe(up_r, writer, False))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            entry = self._conns.pop(task, None)
            for w in (entry[1] if entry else [writer]):
                w.transport.abort()
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        try:
            while True:
                data = await src.read(1 << 16)
                if not data:
                    break
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()
