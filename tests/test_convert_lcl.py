"""`meterstream convert-lcl`: the capture's replies are exactly the readings' registers, encoded
as the codec encodes them; recorded gaps are requests without replies; the payment stream of
the real file has duplicates, pending and failed withholdings; `meterstream replay` takes it."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meterstream.capture import TO_COLLECTOR, TO_FIELD, read_capture
from meterstream.collectors.archive import load_archive
from meterstream.collectors.dlt645 import (
    ENERGY_BLOCK_DI,
    Frame,
    FrameReader,
    decode_energy_blocks,
    encode_read_reply,
)
from meterstream.recording.convert import block_replies, convert_lcl

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "lcl_slice.csv"
LCL = ROOT.parent / "shared" / "data" / "lcl_2013_halfhourly.csv.gz"
BLOCK = b"\x00\xff\x01\x00"


def centi(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * 100 + int((frac + "00")[:2])


def readings(path: Path) -> dict[int, list[tuple[int, ...]]]:
    out: dict[int, list[tuple[int, ...]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(int(row["meter"]), []).append(
                tuple(centi(row[k]) for k in ("total", "t1", "t2", "t3", "t4")))
    return out


def captured(cap_path: Path) -> tuple[dict[int, list[tuple[int, ...]]], dict[int, int]]:
    """Per meter: the registers of its block replies in order, and its block requests."""
    cap = read_capture(cap_path)
    regs: dict[int, list[tuple[int, ...]]] = {}
    reqs: dict[int, int] = {}
    for t in range(len(cap.terminals)):
        for f in FrameReader().feed(cap.stream(t, TO_FIELD)):
            if isinstance(f, Frame) and f.data[:4] == BLOCK:
                reqs[int(f.address)] = reqs.get(int(f.address), 0) + 1
        reps = [f for f in FrameReader().feed(cap.stream(t, TO_COLLECTOR))
                if isinstance(f, Frame) and f.data[:4] == BLOCK]
        values, ok = decode_energy_blocks(reps)
        assert ok.all()
        for f, v in zip(reps, values):
            regs.setdefault(int(f.address), []).append(tuple(v.tolist()))
    return regs, reqs


def test_replies_are_the_readings(tmp_path: Path) -> None:
    c = convert_lcl(tmp_path / "o", data_path=SLICE)
    assert (c.meters, c.terminals, c.reads, c.replies, c.missed) == (3, 1, 432, 432, 0)
    regs, reqs = captured(c.paths["capture"])
    assert regs == readings(c.paths["readings"])
    assert reqs == {m: 144 for m in regs}
    archive = load_archive(c.paths["archive"])  # the collector's files load
    assert archive.meters == 3 and all(len(f"{a:012d}") == 12 for a in regs)
    # the bulk encoder is the codec's encoder
    addrs = np.array([440100000000, 440100000001], np.int64)
    vals = np.array([[99999999, 1, 2, 3, 99999993], [12345678, 0, 0, 0, 12345678]], np.int64)
    got = block_replies(addrs, vals, np.array([0, 1], np.int64))
    for k in range(2):
        value = b"".join(int(str(int(v)).zfill(8)[i:i + 2], 16).to_bytes(1, "little")
                         for v in vals[k] for i in (6, 4, 2, 0))
        assert got[k].tobytes() == encode_read_reply(f"{addrs[k]:012d}", ENERGY_BLOCK_DI, value,
                                                     preamble=2)


def test_gaps_are_requests_without_replies(tmp_path: Path) -> None:
    lines = SLICE.read_bytes().split(b"\n")
    drop = {5, 6, 7, 200, 432}  # data rows (1-based after the header) of meters 1, 2, 3
    kept = [ln for i, ln in enumerate(lines) if i not in drop]
    src = tmp_path / "gaps.csv"
    src.write_bytes(b"\n".join(kept))
    c = convert_lcl(tmp_path / "o", data_path=src)
    # row 432 was MAC000004's last half hour: no read is due after a meter's last one
    assert (c.reads, c.replies, c.missed) == (431, 427, 4)
    regs, reqs = captured(c.paths["capture"])
    rd = readings(c.paths["readings"])
    assert regs == rd
    for m, n in reqs.items():  # every meter: a request at every half hour from first to last
        assert n - len(rd[m]) == {440100000000: 3, 440100000001: 1, 440100000002: 0}[m]


def test_cli_mistakes_are_one_line(tmp_path: Path) -> None:
    exe = [sys.executable, "-m", "meterstream", "convert-lcl"]
    for args, where in ((["--out", str(tmp_path / "o"), "--data", str(tmp_path / "none.csv")],
                         "none.csv"),
                        (["--out", str(tmp_path / "o"), "--data", str(SLICE), "--meters", "0"],
                         "--meters"),
                        (["--out", str(tmp_path / "o"), "--data", str(SLICE), "--collector", "x"],
                         "--collector")):
        r = subprocess.run(exe + args, capture_output=True, text=True, check=False)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and where in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not LCL.exists(), reason="the recorded year is not next to the checkout")
def test_real_year_payments_and_replay(tmp_path: Path) -> None:
    out = tmp_path / "year"
    r = subprocess.run([sys.executable, "-m", "meterstream", "convert-lcl", "--data", str(LCL),
                        "--out", str(out), "--meters", "12", "--dial-every", "2"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    with open(out / "payments.csv", newline="") as fh:
        pays = list(csv.DictReader(fh))
    status = {p["status"] for p in pays}
    assert status == {"settled", "pending", "failed"}  # seed 2013, 12 meters: all three occur
    ids = [p["payment_id"] for p in pays if p["status"] == "settled"]
    assert len(ids) > len(set(ids))  # channels that send a settlement twice
    cap = read_capture(out / "traffic.cap")
    assert {t["mode"] for t in cap.terminals} <= {"listen", "dial"}
    regs, reqs = captured(out / "traffic.cap")
    rd = readings(out / "readings.csv")
    assert regs == rd
    assert sum(reqs.values()) > sum(len(v) for v in rd.values())  # the real year has gaps
    rp = subprocess.run([sys.executable, "-m", "meterstream", "replay", "--archive",
                         str(out / "archive.csv"), "--readings", str(out / "readings.csv"),
                         "--payments", str(out / "payments.csv"), "--tariffs",
                         str(ROOT / "config" / "tariffs-example.toml"), "--out", str(out / "r"),
                         "--no-progress"], capture_output=True, text=True, timeout=300, check=False)
    assert rp.returncode == 0, rp.stderr
    with open(out / "r" / "rejected.csv") as fh:
        assert len(fh.read().splitlines()) == 1  # header only: every row was usable
