"""Shared by the commands that talk to Kafka (`worker`, `collector`, `pay`): the --broker URL."""

from __future__ import annotations

from meterstream.errors import UserError


def bootstrap_of(url: str) -> str:
    """aiokafka's bootstrap_servers of `kafka://host:port[,host:port...]`; UserError if not."""
    hint = f"expected kafka://HOST:PORT, found {url!r}"
    if not url.startswith("kafka://"):
        raise UserError(hint, where="--broker")
    hosts = []
    for part in url.removeprefix("kafka://").rstrip("/").split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(hint, where="--broker")
        hosts.append(f"{host}:{int(port)}")
    return ",".join(hosts)
