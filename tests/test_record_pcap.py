"""pcap export, read back by tshark (apt-get install tshark; scripts/setup.sh --test installs it):
packet count, per-terminal streams reassembled byte for byte, checksums, no TCP analysis
complaints. Where tshark is missing the same checks run on a small pcap reader in this file."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from meterstream.capture import CLOSE, OPEN, TO_COLLECTOR, TO_FIELD, CaptureWriter, read_capture
from meterstream.recording.convert import convert_lcl
from meterstream.recording.pcap import COLLECTOR_IP, export_pcap

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "lcl_slice.csv"
TSHARK = shutil.which("tshark")


def live_like_capture(path: Path) -> None:
    """Two terminals, a reconnect, a DTU, a segment longer than one MSS, empty payloads."""
    with CaptureWriter(path) as w:
        a = w.terminal("A001-C001", ts_ns=0, mode="listen")
        d = w.terminal("A001-D003", ts_ns=0, mode="dial")
        t = 1_700_000_000_000_000_000
        w.write(a, OPEN, b"peer", ts_ns=t)
        w.write(d, TO_COLLECTOR, b"$REG,A001-D003,FW\r\n", ts_ns=t + 1)
        for k in range(20):
            w.write(a, TO_FIELD, b"\xfe\xfe\x68" + bytes([k]) * 13, ts_ns=t + 1000 * k)
            w.write(a, TO_COLLECTOR, bytes([k]) * (37 + k), ts_ns=t + 1000 * k + 500)
            w.write(d, TO_FIELD, bytes([0x40 + k]) * 16, ts_ns=t + 1000 * k + 600)
        w.write(a, TO_COLLECTOR, bytes(range(256)) * 12, ts_ns=t + 30_000)  # 3072 bytes: 3 segments
        w.write(a, CLOSE, b"closed by the terminal", ts_ns=t + 40_000)
        w.write(a, OPEN, b"again", ts_ns=t + 50_000)
        w.write(a, TO_FIELD, b"after reconnect", ts_ns=t + 60_000)


def expected_streams(cap_path: Path) -> dict[tuple[int, bool], bytes]:
    cap = read_capture(cap_path)
    out = {}
    for t in range(len(cap.terminals)):
        out[(t, True)] = cap.stream(t, TO_FIELD)
        out[(t, False)] = cap.stream(t, TO_COLLECTOR)
    return out


def tshark_fields(pcap: Path, *fields: str, extra: tuple[str, ...] = ()) -> list[list[str]]:
    assert TSHARK
    cmd = [TSHARK, "-r", str(pcap), "-T", "fields", *extra]
    for f in fields:
        cmd += ["-e", f]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return [ln.split("\t") for ln in r.stdout.splitlines()]


def read_pcap(pcap: Path) -> list[tuple[bytes, bytes, bytes]]:
    """(src ip, dst ip, tcp payload) per packet: the fallback reader."""
    raw = pcap.read_bytes()
    magic, _, _, _, _, _, link = struct.unpack_from("<IHHiIII", raw, 0)
    assert magic == 0xA1B2C3D4 and link == 1
    pos, out = 24, []
    while pos < len(raw):
        _, _, incl, _ = struct.unpack_from("<IIII", raw, pos)
        frame = raw[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        tcp = ip[ihl:]
        off = (tcp[12] >> 4) * 4
        out.append((ip[12:16], ip[16:20], tcp[off:]))
    return out


def check_pcap(cap_path: Path, pcap: Path) -> None:
    cap = read_capture(cap_path)
    stats = export_pcap(cap, pcap)
    want = expected_streams(cap_path)
    got: dict[tuple[int, bool], bytes] = {k: b"" for k in want}
    if TSHARK:
        rows = tshark_fields(pcap, "ip.src", "ip.dst", "tcp.payload")
        assert len(rows) == stats.packets
        for src, dst, payload in rows:
            from_coll = src == "10.0.0.1"
            term = dst if from_coll else src
            a, b, c = (int(x) for x in term.split(".")[1:])
            t = ((a - 1) << 16 | b << 8 | c) - 1
            got[(t, from_coll)] += bytes.fromhex(payload.replace(":", ""))
        # tshark's own checks: no TCP analysis flag (lost segment, retransmission, ...) but the
        # note on a reconnect's reused port pair, and every checksum verifies
        flagged = subprocess.run([TSHARK, "-r", str(pcap), "-Y",
                                  "tcp.analysis.flags && !tcp.analysis.reused_ports"],
                                 capture_output=True, text=True, check=True).stdout
        assert flagged.strip() == ""
        good = tshark_fields(pcap, "tcp.checksum.status", "ip.checksum.status",
                             extra=("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE"))
        assert good and all(r == ["1", "1"] for r in good)
        # "Follow TCP stream" of the first terminal gives its request bytes back
        follow = subprocess.run([TSHARK, "-r", str(pcap), "-q", "-z", "follow,tcp,raw,0"],
                                capture_output=True, text=True, check=True).stdout
        client = "".join(ln for ln in follow.splitlines() if re.fullmatch(r"[0-9a-f]+", ln))
        assert bytes.fromhex(client).startswith(want[(0, True)][:64])
    else:  # pragma: no cover - only where tshark cannot be installed
        pkts = read_pcap(pcap)
        assert len(pkts) == stats.packets
        for src, dst, payload in pkts:
            from_coll = src == COLLECTOR_IP
            term = dst if from_coll else src
            t = ((term[1] - 1) << 16 | term[2] << 8 | term[3]) - 1
            got[(t, from_coll)] += payload
    assert got == want


def test_pcap_of_live_like_capture(tmp_path: Path) -> None:
    cap = tmp_path / "a.cap"
    live_like_capture(cap)
    check_pcap(cap, tmp_path / "a.pcap")
    if TSHARK:  # the reconnect is a second TCP connection on the same port pair
        rows = tshark_fields(tmp_path / "a.pcap", "tcp.stream", "tcp.flags.syn", "tcp.flags.ack")
        syns = [r for r in rows if r[1] == "1" and r[2] == "0"]
        assert len(syns) == 3  # terminal A twice, the DTU once


def test_pcap_of_converted_slice(tmp_path: Path) -> None:
    conv = convert_lcl(tmp_path / "conv", data_path=SLICE)
    check_pcap(conv.paths["capture"], tmp_path / "slice.pcap")


@pytest.mark.skipif(TSHARK is None, reason="tshark not installed")
def test_tshark_sees_one_port_pair_per_terminal(tmp_path: Path) -> None:
    cap = tmp_path / "a.cap"
    live_like_capture(cap)
    export_pcap(read_capture(cap), tmp_path / "a.pcap")
    rows = tshark_fields(tmp_path / "a.pcap", "ip.src", "tcp.srcport", "ip.dst", "tcp.dstport")
    pairs = {frozenset(((a, b), (c, d))) for a, b, c, d in rows}
    assert len(pairs) == 2  # the reconnect of terminal A reuses its pair
