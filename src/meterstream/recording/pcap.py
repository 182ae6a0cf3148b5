"""Export a capture as classic libpcap (LINKTYPE_ETHERNET) that Wireshark and tshark open.

Each terminal becomes one TCP port pair between a synthetic collector address (10.0.0.1) and a
synthetic terminal address (10.1.x.y); listening terminals are the TCP server (the collector
connects), DTUs the client (they dial). Every connection of the capture gets a handshake
(SYN, SYN-ACK, ACK) at its OPEN record (or before its first bytes), its bytes as segments of at
most 1460 bytes with correct sequence and acknowledgement numbers, and FIN/ACK both ways at its
CLOSE record, so each terminal's stream reassembles ("Follow TCP stream"). IPv4 and TCP
checksums are real. Pure bytes: no capture library, no sockets.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import BinaryIO

from meterstream.capture import CLOSE, OPEN, TO_COLLECTOR, TO_FIELD, Capture
from meterstream.errors import UserError

LINKTYPE_ETHERNET = 1
MSS = 1460
COLLECTOR_IP = bytes((10, 0, 0, 1))
COLLECTOR_MAC = bytes.fromhex("020000000001")
TERMINAL_MAC = bytes.fromhex("020000000002")
TERMINAL_PORT = 6450  # a DL/T 645 channel port is vendor-chosen; this one marks the terminal side
DTU_PORT = 9700  # the collector's dial-in port, for DTUs
SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08


def terminal_ip(t: int) -> bytes:
    n = t + 1
    return bytes((10, 1 + (n >> 16), (n >> 8) & 0xFF, n & 0xFF))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    words = array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    s = sum(words)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass
class PcapStats:
    packets: int = 0
    data_packets: int = 0
    payload_bytes: int = 0
    connections: int = 0


class _Flow:
    """One terminal's port pair and the state of its current TCP connection."""

    def __init__(self, t: int, dial: bool) -> None:
        self.t = t
        self.dial = dial
        self.term_ip = terminal_ip(t)
        self.coll_port = DTU_PORT if dial else 20000 + t % 40000
        self.term_port = 30000 + t % 30000 if dial else TERMINAL_PORT
        self.open = False
        self.n = 0  # connections so far (new initial sequence numbers each)
        self.seq_c = 0  # next sequence number the collector sends
        self.seq_t = 0


class PcapWriter:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.stats = PcapStats()
        self._ip_id = 0
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET))

    def packet(self, ts_ns: int, flow: _Flow, from_collector: bool, flags: int,
               payload: bytes = b"") -> None:
        if from_collector:
            src, dst, sport, dport = COLLECTOR_IP, flow.term_ip, flow.coll_port, flow.term_port
            seq, ack = flow.seq_c, flow.seq_t
            smac, dmac = COLLECTOR_MAC, TERMINAL_MAC
        else:
            src, dst, sport, dport = flow.term_ip, COLLECTOR_IP, flow.term_port, flow.coll_port
            seq, ack = flow.seq_t, flow.seq_c
            smac, dmac = TERMINAL_MAC, COLLECTOR_MAC
        tcp = struct.pack(">HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF,
                          ack & 0xFFFFFFFF if flags & ACK else 0, 5 << 4, flags, 65535, 0, 0)
        pseudo = src + dst + struct.pack(">BBH", 0, 6, len(tcp) + len(payload))
        c = _csum(pseudo + tcp + payload)
        tcp = tcp[:16] + struct.pack(">H", c) + tcp[18:]
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), self._ip_id,
                         0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack(">H", _csum(ip)) + ip[12:]
        frame = dmac + smac + b"\x08\x00" + ip + tcp + payload
        sec, ns = divmod(ts_ns, 1_000_000_000)
        self.fh.write(struct.pack("<IIII", sec & 0xFFFFFFFF, ns // 1000, len(frame), len(frame)))
        self.fh.write(frame)
        self.stats.packets += 1
        if payload:
            self.stats.data_packets += 1
            self.stats.payload_bytes += len(payload)

    def handshake(self, ts_ns: int, f: _Flow) -> None:
        f.n += 1
        f.seq_c = (0x10000000 * f.n + 7919 * f.t) & 0xFFFFFFFF
        f.seq_t = (0x80000000 + 0x01000000 * f.n + 104729 * f.t) & 0xFFFFFFFF
        client_is_collector = not f.dial
        self.packet(ts_ns, f, client_is_collector, SYN)
        if client_is_collector:
            f.seq_c += 1
        else:
            f.seq_t += 1
        self.packet(ts_ns, f, not client_is_collector, SYN | ACK)
        if client_is_collector:
            f.seq_t += 1
        else:
            f.seq_c += 1
        self.packet(ts_ns, f, client_is_collector, ACK)
        f.open = True
        self.stats.connections += 1

    def data(self, ts_ns: int, f: _Flow, from_collector: bool, payload: bytes) -> None:
        if not f.open:
            self.handshake(ts_ns, f)
        for i in range(0, len(payload), MSS):
            seg = payload[i:i + MSS]
            self.packet(ts_ns, f, from_collector, PSH | ACK, seg)
            if from_collector:
                f.seq_c += len(seg)
            else:
                f.seq_t += len(seg)

    def close(self, ts_ns: int, f: _Flow) -> None:
        if not f.open:
            return
        self.packet(ts_ns, f, True, FIN | ACK)
        f.seq_c += 1
        self.packet(ts_ns, f, False, FIN | ACK)
        f.seq_t += 1
        self.packet(ts_ns, f, True, ACK)
        f.open = False


def export_pcap(cap: Capture, path: str | os.PathLike[str]) -> PcapStats:
    """Write `cap` as a pcap file at `path`."""
    flows = [_Flow(t, info.get("mode") == "dial") for t, info in enumerate(cap.terminals)]
    try:
        fh = open(path, "wb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise UserError(f"cannot write the pcap: {exc.strerror}", where=str(path)) from None
    with fh:
        w = PcapWriter(fh)
        for i in range(len(cap)):
            kind = int(cap.kind[i])
            ts = int(cap.ts[i])
            f = flows[int(cap.terminal[i])] if kind != 1 else None
            if f is None:
                continue
            if kind == OPEN:
                if f.open:
                    w.close(ts, f)
                w.handshake(ts, f)
            elif kind == CLOSE:
                w.close(ts, f)
            elif kind in (TO_FIELD, TO_COLLECTOR):
                w.data(ts, f, kind == TO_FIELD, cap.payload(i))
        end = int(cap.ts.max()) if len(cap) else 0
        for f in flows:
            w.close(end, f)
    return w.stats

