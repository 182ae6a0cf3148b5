"""The capture file: round trip, torn and damaged tails (a crash), gzip, append, bad files."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from meterstream.capture import (
    MAGIC,
    OPEN,
    REC_HEADER,
    TO_COLLECTOR,
    TO_FIELD,
    CaptureWriter,
    read_capture,
)
from meterstream.errors import UserError


def write_sample(path: Path) -> list[tuple[int, str, int, bytes]]:
    rows = [(1_000, "A001-C001", OPEN, b"127.0.0.1:5000"),
            (2_000, "A001-C001", TO_FIELD, b"\xfe\xfe\x68request"),
            (3_000, "A001-D003", TO_COLLECTOR, b"$REG,A001-D003,FW\r\n"),
            (4_000, "A001-C001", TO_COLLECTOR, bytes(range(256)) * 3),
            (5_000, "A001-D003", TO_FIELD, b"")]
    with CaptureWriter(path, meta={"note": "sample"}) as w:
        for ts, tid, kind, payload in rows:
            w.write(w.terminal(tid, ts_ns=ts, mode="listen"), kind, payload, ts_ns=ts)
    return rows


def data_rows(path: Path) -> list[tuple[int, str, int, bytes]]:
    cap = read_capture(path)
    return [(r.ts_ns, cap.terminals[r.terminal]["id"], r.kind, r.payload)
            for r in cap.records() if r.kind != 1]


def test_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "a.cap"
    rows = write_sample(p)
    cap = read_capture(p)
    assert cap.meta["note"] == "sample" and "created_ns" in cap.meta
    assert [t["id"] for t in cap.terminals] == ["A001-C001", "A001-D003"]
    assert data_rows(p) == rows
    assert cap.damage == "" and cap.valid_bytes == p.stat().st_size
    assert cap.stream(0, TO_COLLECTOR) == bytes(range(256)) * 3


@pytest.mark.parametrize("cut", [1, 5, REC_HEADER, REC_HEADER + 100])
def test_torn_tail_reads_up_to_last_complete_record(tmp_path: Path, cut: int) -> None:
    p = tmp_path / "a.cap"
    rows = write_sample(p)
    whole = p.read_bytes()
    last = REC_HEADER + 0  # the last record has an empty payload
    p.write_bytes(whole[:-last] + whole[-last:][:0])  # drop the last record entirely
    assert data_rows(p) == rows[:-1]
    # a crash in the middle of the 768-byte record: everything before it survives
    big_end = len(whole) - last
    big_start = big_end - (REC_HEADER + 768)
    p.write_bytes(whole[:big_start + min(cut, REC_HEADER + 767)])
    cap = read_capture(p)
    assert [r[3] for r in data_rows(p)] == [r[3] for r in rows[:3]]
    assert cap.damage.startswith("incomplete record") and cap.valid_bytes == big_start


def test_zero_filled_tail_is_not_a_record(tmp_path: Path) -> None:
    p = tmp_path / "a.cap"
    rows = write_sample(p)
    with open(p, "ab") as fh:
        fh.write(bytes(4096))  # what a file system may show after a power cut
    cap = read_capture(p)
    assert data_rows(p) == rows
    assert cap.damage.startswith("damaged record header") and cap.tail_bytes == 4096


def test_append_continues_after_a_crash(tmp_path: Path) -> None:
    p = tmp_path / "a.cap"
    rows = write_sample(p)
    with open(p, "ab") as fh:
        fh.write(b"\x01\x02\x03")  # torn record
    with CaptureWriter(p, append=True) as w:
        t = w.terminal("A001-D003")
        assert t == 1  # the terminal table goes on
        w.write(w.terminal("A002-C001"), TO_FIELD, b"new", ts_ns=6_000)
    got = data_rows(p)
    assert got[:len(rows)] == rows and got[-1] == (6_000, "A002-C001", TO_FIELD, b"new")
    assert read_capture(p).damage == ""


def test_gzip_capture_and_cut_gzip(tmp_path: Path) -> None:
    p = tmp_path / "a.cap"
    rows = write_sample(p)
    gz = tmp_path / "a.cap.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert data_rows(gz) == rows
    gz.write_bytes(gzip.compress(p.read_bytes())[:-12])  # cut: no trailer
    assert data_rows(gz)[:3] == rows[:3]


def test_not_a_capture(tmp_path: Path) -> None:
    p = tmp_path / "x.cap"
    p.write_bytes(b"meter,ts,kwh\n")
    with pytest.raises(UserError, match="not a meterstream capture"):
        read_capture(p)
    p.write_bytes(MAGIC + b"\x09\x00" + bytes(4))
    with pytest.raises(UserError, match="version 9"):
        read_capture(p)
    with pytest.raises(UserError, match="not found"):
        read_capture(tmp_path / "missing.cap")


def test_cli_reports_bad_capture_in_one_line(tmp_path: Path) -> None:
    p = tmp_path / "x.cap"
    p.write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "meterstream", "record", "export", "--capture",
                        str(p), "--pcap", str(tmp_path / "x.pcap")], capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and str(p) in r.stderr and "Traceback" not in r.stderr


def test_bad_terminal_record_stops_reading(tmp_path: Path) -> None:
    from meterstream.capture import TERMINAL, pack_record

    p = tmp_path / "a.cap"
    rows = write_sample(p)
    with open(p, "ab") as fh:
        fh.write(pack_record(9_000, 2, TERMINAL, b"{not json"))
        fh.write(pack_record(9_001, 0, TO_FIELD, b"after"))
    cap = read_capture(p)
    assert data_rows(p) == rows and "not JSON" in cap.damage
    with open(p, "ab") as fh:  # a record naming a terminal never defined
        fh.write(pack_record(9_002, 7, TO_FIELD, b"x"))
    p2 = tmp_path / "b.cap"
    write_sample(p2)
    with open(p2, "ab") as fh:
        fh.write(pack_record(9_002, 7, TO_FIELD, b"x"))
    assert "not defined" in read_capture(p2).damage
