"""The InfluxDB sink against a real server of the InfluxDB v2 write API (VictoriaMetrics from
Debian, on loopback): points read back exactly, an outage spooled to disk and written once when
the server returns, the spool bound; plus a stub for the answers VictoriaMetrics never gives
(a 4xx for bad data: it logs and skips bad lines, answering 204)."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import tomllib
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meterstream.collectors.batch import NO_DRIFT, CollectorEvent, ReadingBatch
from meterstream.collectors.commands import Command, CommandResult
from meterstream.errors import UserError
from meterstream.pipeline.influx import (
    BatchMeta,
    InfluxConfig,
    InfluxSink,
    Spool,
    balance_lines,
    kpi_line,
    link_line,
    load_influx_config,
    reading_lines,
    unique_ts,
)
from meterstream.spool import SpoolLocked
from meterstream.tomlcheck import TomlTable

VM_BIN = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
needs_vm = pytest.mark.skipif(
    not os.access(VM_BIN, os.X_OK),
    reason="victoria-metrics is not installed (bash scripts/setup.sh --test installs it: "
           "apt-get install victoria-metrics)")

WAIT_S = 30.0  # a deadline for things to happen, never a timing assert
FAST_BACKOFF = (0.05, 0.3)
MS = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Any, what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class VictoriaMetrics:
    """One victoria-metrics process on a loopback port and a data directory (restartable)."""

    def __init__(self, data: Path, port: int | None = None) -> None:
        self.data = data
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> VictoriaMetrics:
        log = open(self.data.parent / f"vm-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [VM_BIN, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.data}",
             "-search.latencyOffset=0s", "-loggerLevel=ERROR"],
            stdout=log, stderr=log)
        log.close()
        wait_for(self._healthy, "victoria-metrics to answer /health")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"victoria-metrics exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server (SIGTERM: it flushes what it acknowledged, as a real server does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(WAIT_S)
        self.proc = None

    def export(self, match: str) -> list[dict[str, Any]]:
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=5).close()
        q = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{q}", timeout=10) as r:
            return [json.loads(line) for line in r.read().splitlines() if line.strip()]

    def samples(self, match: str) -> Counter[tuple[Any, ...]]:
        """(metric name, labels, timestamp ms, value) -> how many times the server holds it."""
        c: Counter[tuple[Any, ...]] = Counter()
        for s in self.export(match):
            m = dict(s["metric"])
            name = m.pop("__name__")
            labels = tuple(sorted(m.items()))
            for v, t in zip(s["values"], s["timestamps"]):
                c[(name, labels, t, v)] += 1
        return c


@pytest.fixture
def vm(tmp_path: Path) -> Any:
    if not os.access(VM_BIN, os.X_OK):
        pytest.skip("victoria-metrics is not installed")
    server = VictoriaMetrics(tmp_path / "vm").start()
    yield server
    server.stop()


def expected(lines: list[str]) -> Counter[tuple[Any, ...]]:
    """What VictoriaMetrics should hold for our lines: one sample per integer field (a string
    field that reads as a number, the meter address, becomes that number)."""
    c: Counter[tuple[Any, ...]] = Counter()
    for line in lines:  # our tags have no escapes; string fields may hold spaces and commas
        series, rest = line.split(" ", 1)
        fields, ts = rest.rsplit(" ", 1)
        meas, *tags = series.split(",")
        labels = tuple(sorted(tuple(t.split("=", 1)) for t in tags))
        for k, v in re.findall(r'([^=,]+)=("(?:[^"\\]|\\.)*"|[^,]+)', fields):
            if v.endswith("i"):
                value = int(v[:-1])
            elif v.strip('"').isdigit():
                value = int(v.strip('"'))
            else:
                continue  # free text: not a number to VictoriaMetrics
            c[(f"{meas}_{k}", labels, int(ts) // MS, value)] += 1
    return c


def read_back(samples: Any, want: Counter[tuple[Any, ...]], what: str) -> Any:
    """The server's samples once it holds as many as we wrote (it makes them searchable in
    the background)."""
    n = sum(want.values())

    def enough() -> Any:
        c = samples()
        return c if sum(c.values()) >= n else None

    return wait_for(enough, what)


def numeric(c: Counter[tuple[Any, ...]]) -> Counter[tuple[Any, ...]]:
    """Leave out VictoriaMetrics' zeros for free-text fields (kind, detail, id)."""
    return Counter({k: v for k, v in c.items()
                    if not k[0].endswith(("_kind", "_detail", "_id"))})


def make_batch(terminal: str, t0: int, n: int, cycle: int = 1) -> ReadingBatch:
    """n meters read 50 ms apart: ok 2007 rows, a 1997 total-only row, a timeout, an error."""
    rows = []
    for k in range(n):
        ts = t0 + k * 50 * MS
        meter = 330010010000 + k
        total = 99_999_999 - k * 1_234_567 - cycle  # near the 8-digit register's top
        if k % 7 == 3:  # timed out: no values
            rows.append((meter, ts, -1, -1, -1, -1, -1, -1, 1, 0, NO_DRIFT))
        elif k % 7 == 5:  # a DL/T 645-1997 meter: the total only
            rows.append((meter, ts, total, -1, -1, -1, -1, -1, 0, 0, NO_DRIFT))
        elif k % 7 == 6:  # abnormal reply
            rows.append((meter, ts, -1, -1, -1, -1, -1, -1, 2, 0x02, NO_DRIFT))
        else:
            t1, t2, t3 = total // 4, total // 3, total // 5
            rows.append((meter, ts, total, t1, t2, t3, total - t1 - t2 - t3, 0x0010 * (k % 2),
                         0, 0, k - 2))
    return ReadingBatch.from_rows(terminal, cycle, t0, t0 + n * 50 * MS, rows)


def sink_for(url: str, spool: Path, **kw: Any) -> InfluxSink:
    kw.setdefault("backoff_s", FAST_BACKOFF)
    kw.setdefault("flush_s", 0.05)
    return InfluxSink(url, "test-token", "meterstream", "readings", spool, **kw)


# --- against VictoriaMetrics --------------------------------------------------------------------

@needs_vm
def test_points_written_equal_points_read_back(vm: VictoriaMetrics, tmp_path: Path) -> None:
    t0 = (time.time_ns() // MS - 600_000) * MS  # ten minutes ago, whole ms
    batch = make_batch("T-RB-01", t0, 14)
    meta = BatchMeta("AREA-7", np.array([0, 1] + [2] * 12, np.int8))
    balances = np.array([1_234_567_890_123, -4_560_000, 0, 7], np.int64)  # up to 1.2 M yuan
    meters = np.array([330010010000, 330010010001, 330010010002, 330010010003], np.int64)
    relay = np.array([0, 1, 0, 0], np.int8)
    cmd = CommandResult(Command("330010010001", "trip", reason="arrears"), "T-RB-01",
                        outcome="confirmed", sent_ns=t0 + 10 * MS, acked_ns=t0 + 400 * MS,
                        done_ns=t0 + 2_500 * MS, status=0x0010, attempts=1, readbacks=2)
    link = CollectorEvent("down", "T-RB-01", t0 + 3_000 * MS, "closed by the terminal")
    kpi = {"success_rate_bp": 9_943, "online_rate_bp": 10_000, "line_loss_bp": -12,
           "meters": 72_175}

    events: list[tuple[str, str]] = []
    lines = (reading_lines(batch, meta)
             + balance_lines("T-RB-01", "AREA-7", meters, balances, relay, t0 + 5 * MS)
             + [line for line in [link_line(link, "AREA-7"),
                                  kpi_line(t0 + 4_000 * MS, kpi, area="AREA-7")] if line])
    sink = sink_for(vm.url, tmp_path / "spool", batch_size=8,
                    on_event=lambda k, d: events.append((k, d)))

    async def pipeline() -> None:  # the asyncio side: writes are plain calls, flush awaited
        assert sink.write_batch(batch, meta) == 14
        assert sink.write_balances("T-RB-01", "AREA-7", meters, balances, relay, t0 + 5 * MS) == 4
        assert sink.write_command(cmd) == 1
        assert sink.write_link(link, "AREA-7") == 1
        assert sink.write_kpi(t0 + 4_000 * MS, kpi, area="AREA-7") == 1
        assert await sink.aflush(WAIT_S)
        await sink.aclose()

    asyncio.run(pipeline())
    st = sink.stats
    assert (st.written, st.spooled, st.rejected, st.refused, st.errors) == (21, 0, 0, 0, 0)
    assert events == []

    want = numeric(expected(lines))
    got = read_back(lambda: numeric(vm.samples('{__name__=~"(reading|balance|link|kpi)_.*"}')),
                    want, "points back")
    assert got == want
    # a few by hand: exact integers, the units in the names, the meter as a field
    labels = (("area", "AREA-7"), ("class", "dedicated"), ("terminal", "T-RB-01"))
    assert got[("reading_total_centikwh", labels, t0 // MS, 99_999_998)] == 1
    assert got[("reading_meter", labels, t0 // MS, 330010010000)] == 1
    bal = (("area", "AREA-7"), ("class", "low_voltage"), ("terminal", "T-RB-01"))
    assert got[("balance_balance_microyuan", bal, (t0 + 5 * MS) // MS, 1_234_567_890_123)] == 1
    assert got[("balance_balance_microyuan", bal, (t0 + 5 * MS) // MS, -4_560_000)] == 1

    cmds = vm.samples('{__name__=~"command_.*"}')
    cl = (("action", "trip"), ("outcome", "confirmed"), ("terminal", "T-RB-01"))
    ts = (t0 + 2_500 * MS) // MS
    assert cmds[("command_duration_ms", cl, ts, 2_490)] == 1
    assert cmds[("command_meter", cl, ts, 330010010001)] == 1
    assert cmds[("command_status", cl, ts, 16)] == 1

    # cardinality: no series carries a meter, command or payment id
    for s in vm.export('{__name__=~"(reading|balance|command|link|kpi)_.*"}'):
        assert set(s["metric"]) <= {"__name__", "terminal", "area", "class", "action", "outcome"}


@needs_vm
def test_server_down_points_spool_and_arrive_exactly_once(tmp_path: Path) -> None:
    server = VictoriaMetrics(tmp_path / "vm").start()
    spool = tmp_path / "spool"
    events: list[str] = []
    t0 = (time.time_ns() // MS - 3 * 3_600_000) * MS  # in the past: VM drops the future
    meta = BatchMeta("AREA-1", 2)
    try:
        sink = sink_for(server.url, spool, batch_size=20, timeout_s=2.0,
                        spool_file_bytes=4096, on_event=lambda k, d: events.append(k))
        written: list[str] = []

        def put(s: InfluxSink, cycle: int) -> None:
            b = make_batch("T-DOWN", t0 + cycle * 60_000 * MS, 10, cycle)
            written.extend(reading_lines(b, meta))
            assert s.write_batch(b, meta) == 10

        for cycle in range(3):  # the server is up
            put(sink, cycle)
        assert sink.flush(WAIT_S)
        assert sink.stats.written == 30

        server.stop()  # the server goes away
        for cycle in range(3, 13):
            put(sink, cycle)
        assert not sink.flush(WAIT_S)  # in the spool, not on the server
        st = sink.stats
        assert (st.written, st.spooled, st.rejected, st.refused) == (30, 100, 0, 0)
        assert not st.server_up and st.last_error
        files = sorted(spool.glob("spool-*.lp"))
        assert len(files) > 1  # rotated at spool_file_bytes
        on_disk = b"".join(f.read_bytes() for f in files).decode().splitlines()
        assert Counter(on_disk) == Counter(written[30:])
        assert st.spool_bytes == sum(f.stat().st_size for f in files)

        sink.close(5.0)  # the pipeline stops too; the spool stays for the next run
        sink = sink_for(server.url, spool, batch_size=20, timeout_s=2.0,
                        on_event=lambda k, d: events.append(k))
        for cycle in range(13, 16):
            put(sink, cycle)
        wait_for(lambda: sink.stats.spooled == 30, "the new sink to spool too")

        server.start()  # back on the same port and data directory
        sink.retry_now()
        assert sink.wait_drained(WAIT_S)
        assert not list(spool.glob("spool-*.lp"))
        st = sink.stats
        assert (st.written, st.rejected, st.refused, st.errors) == (130, 0, 0, 0)
        sink.close()
        assert "server_down" in events and "server_up" in events

        want = expected(written)
        got = read_back(lambda: server.samples('{terminal="T-DOWN"}'), want, "every point back")
        assert got == want  # every point, each exactly once
        assert max(got.values()) == 1
    finally:
        server.stop()


@needs_vm
def test_the_spool_of_a_stopped_sink_is_adopted_by_a_live_one(tmp_path: Path) -> None:
    """Workers scaled down while the server is away leave their spool behind: a live sink on
    the same root takes it over and writes it, each point once; a live sink's spool is never
    touched by another."""
    server = VictoriaMetrics(tmp_path / "vm").start()
    root = tmp_path / "spool"
    cfg = InfluxConfig(url=server.url, org="meterstream", bucket="readings", spool_dir=root,
                       flush_s=0.05, timeout_s=2.0, backoff_s=FAST_BACKOFF)
    env = {cfg.token_env: "test-token"}
    t0 = (time.time_ns() // MS - 3 * 3_600_000) * MS
    meta = BatchMeta("AREA-1", 2)
    written: list[str] = []

    def put(s: InfluxSink, terminal: str, cycles: range) -> None:
        for cycle in cycles:
            b = make_batch(terminal, t0 + cycle * 60_000 * MS, 10, cycle)
            written.extend(reading_lines(b, meta))
            assert s.write_batch(b, meta) == 10

    events: list[tuple[str, str]] = []
    a = b = c = None
    try:
        a = InfluxSink.from_config(cfg, env, adopt_s=0.05)
        b = InfluxSink.from_config(cfg, env, adopt_s=0.05,
                                   on_event=lambda k, d: events.append((k, d)))
        assert (a.spool.dir.name, b.spool.dir.name) == ("slot-0", "slot-1")  # one slot each
        server.stop()
        put(a, "T-GONE", range(5))
        put(b, "T-LIVE", range(2))
        assert not a.flush(WAIT_S) and not b.flush(WAIT_S)
        assert a.stats.spooled == 50
        time.sleep(0.5)  # ten of b's scans while a is alive: a's spool is its own
        assert b.stats.adopted == 0 and len(list((root / "slot-0").glob("spool-*.lp"))) > 0

        a.close(5.0)  # scaled down for good, its 50 points on disk
        a = None
        wait_for(lambda: b.stats.adopted > 0, "the live sink to adopt the stopped one's spool")
        assert not list((root / "slot-0").glob("spool-*.lp"))
        assert [k for k, _ in events].count("spool_adopted") == 1
        assert "slot-0" in next(d for k, d in events if k == "spool_adopted")
        c = InfluxSink.from_config(cfg, env)  # a new process takes the free slot again
        assert c.spool.dir.name == "slot-0" and len(c.spool) == 0

        server.start()
        b.retry_now()
        assert b.wait_drained(WAIT_S)
        st = b.stats
        assert (st.written, st.rejected, st.refused, st.errors) == (70, 0, 0, 0)
        want = expected(written)
        got = read_back(lambda: server.samples('{terminal=~"T-GONE|T-LIVE"}'), want,
                        "every point back")
        assert got == want and max(got.values()) == 1  # each exactly once
    finally:
        for s in (a, b, c):
            if s is not None:
                s.close(5.0)
        server.stop()


def test_adopt_moves_files_whole_and_a_held_spool_is_locked(tmp_path: Path) -> None:
    mine = Spool(tmp_path / "mine", 1 << 20, file_bytes=16)
    other = Spool(tmp_path / "other", 1 << 20, file_bytes=16)
    assert mine.append(b"m x=1i 1\n")
    assert other.append(b"a x=1i 1\n" * 3) and other.append(b"b x=2i 2\n" * 3)
    with pytest.raises(SpoolLocked):
        Spool(tmp_path / "other", 1 << 20)  # one process per directory
    assert mine.adopt(other) == 2
    assert other.bytes == 0 and len(other) == 0 and not list(other.dir.glob("spool-*.lp"))
    assert len(mine) == 3 and mine.bytes == sum(
        f.stat().st_size for f in (tmp_path / "mine").glob("spool-*.lp"))
    other.close()
    got = []
    while (old := mine.oldest()) is not None:
        got.append(old[1])
        mine.remove(old[0])
    assert got == [b"m x=1i 1\n", b"a x=1i 1\n" * 3, b"b x=2i 2\n" * 3]  # ours first
    mine.close()


@needs_vm
def test_spool_bound_refuses_new_points_keeps_old_and_recovers(tmp_path: Path) -> None:
    port = free_port()  # nothing listens yet: connection refused
    spool = tmp_path / "spool"
    events: list[tuple[str, str]] = []
    t0 = (time.time_ns() // MS - 3 * 3_600_000) * MS
    meta = BatchMeta("AREA-2", 2)
    bound_mb = 16 / 1024  # 16 KiB
    sink = sink_for(f"http://127.0.0.1:{port}", spool, batch_size=10, spool_max_mb=bound_mb,
                    spool_file_bytes=4096, on_event=lambda k, d: events.append((k, d)))
    kept: list[str] = []
    taken = refused = 0
    cycle = 0
    while refused == 0 or cycle < 80:  # write on well past the bound
        b = make_batch("T-FULL", t0 + cycle * 60_000 * MS, 10, cycle)
        got = sink.write_batch(b, meta)
        sink.flush(WAIT_S)
        if got:
            taken += got
        else:
            refused += 10
        if sink.stats.refused == 0:
            kept.extend(reading_lines(b, meta))
        cycle += 1
        assert cycle < 1000
    st = sink.stats
    assert st.spool_bytes <= 16 * 1024
    assert st.written == 0 and st.refused > 0 and st.refused + st.spooled == cycle * 10
    assert [k for k, _ in events].count("spool_full") == 1  # one clear event, not one a batch
    assert "refusing new points" in next(d for k, d in events if k == "spool_full")
    # the oldest points are all still there: nothing spooled was dropped
    on_disk = b"".join(f.read_bytes() for f in sorted(spool.glob("spool-*.lp"))).decode()
    assert Counter(on_disk.splitlines()) == Counter(kept)

    server = VictoriaMetrics(tmp_path / "vm", port).start()
    try:
        sink.retry_now()
        assert sink.wait_drained(WAIT_S)
        assert "spool_ok" in [k for k, _ in events]
        b = make_batch("T-FULL", t0 + cycle * 60_000 * MS, 10, cycle)
        assert sink.write_batch(b, meta) == 10  # taking points again
        kept.extend(reading_lines(b, meta))
        assert sink.flush(WAIT_S)
        sink.close()
        want = expected(kept)
        got = read_back(lambda: server.samples('{terminal="T-FULL"}'), want, "the kept points")
        assert got == want
    finally:
        server.stop()


# --- answers VictoriaMetrics does not give: a stub of InfluxDB 2's write endpoint -------------

class StubInflux:
    """/api/v2/write answering `status` (a list is consumed one request at a time); keeps the
    gunzipped bodies it answered 204 to."""

    def __init__(self) -> None:
        self.status: list[int] = []
        self.default = 204
        self.accepted: list[str] = []
        self.requests = 0
        self.gzipped = 0
        self.hold = threading.Event()  # cleared: requests wait (a slow server)
        self.hold.set()
        self.held = threading.Event()  # set once a request is waiting
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                    stub.gzipped += 1
                stub.requests += 1
                if not stub.hold.is_set():
                    stub.held.set()
                    stub.hold.wait(WAIT_S)
                code = stub.status.pop(0) if stub.status else stub.default
                if code == 204:
                    stub.accepted.extend(body.decode().splitlines())
                self.send_response(code)
                msg = json.dumps({"code": "invalid",
                                  "message": "unable to parse 'reading bad': missing fields"})
                payload = b"" if code == 204 else msg.encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Any:
    s = StubInflux()
    yield s
    s.close()


def test_a_4xx_goes_to_rejected_with_the_reason_and_is_not_retried(stub: StubInflux,
                                                                    tmp_path: Path) -> None:
    stub.status = [400]
    events: list[tuple[str, str]] = []
    sink = sink_for(stub.url, tmp_path / "spool", on_event=lambda k, d: events.append((k, d)))
    assert sink.write_points(["reading,terminal=T bad 1", "reading,terminal=T x=1i 2"]) == 2
    assert sink.flush(WAIT_S)  # nothing waits: the bad request is settled
    assert sink.write_points("reading,terminal=T x=2i 3") == 1
    assert sink.flush(WAIT_S)
    sink.close()
    st = sink.stats
    assert (st.rejected, st.written, st.spooled, st.retried) == (2, 1, 0, 0)
    assert stub.requests == 2  # the rejected request was sent once, never again
    assert stub.accepted == ["reading,terminal=T x=2i 3"]
    rejected = (tmp_path / "spool" / "rejected.lp").read_text().splitlines()
    assert rejected[0].startswith("# ") and "HTTP 400" in rejected[0]
    assert "missing fields" in rejected[0]  # the server's reason
    assert rejected[1:] == ["reading,terminal=T bad 1", "reading,terminal=T x=1i 2"]
    assert [k for k, _ in events] == ["rejected"]


def test_5xx_and_auth_errors_spool_and_retry_each_point_once(stub: StubInflux,
                                                             tmp_path: Path) -> None:
    stub.status = [503, 500, 401, 429]  # down, broken, a bad token, overloaded: all retried
    sink = sink_for(stub.url, tmp_path / "spool", batch_size=5)
    lines = [f"kpi,area=A{k % 3} success_rate_bp={9000 + k}i {1_700_000_000_000_000_000 + k}"
             for k in range(40)]
    for k in range(0, 40, 5):
        sink.write_points(lines[k:k + 5])
    sink.retry_now()
    assert sink.wait_drained(WAIT_S)
    sink.close()
    st = sink.stats
    assert st.rejected == 0 and st.written == 40 and st.spooled > 0 and st.retried > 0
    assert Counter(stub.accepted) == Counter(lines)  # none lost, none twice
    assert stub.gzipped == stub.requests


# --- without a server ---------------------------------------------------------------------------

def test_money_and_kpis_are_integers_never_floats() -> None:
    with pytest.raises(TypeError, match="micro-yuan"):
        balance_lines("T", "A", [330010010001], np.array([1.5]), [0], 1)
    with pytest.raises(TypeError, match="integer"):
        kpi_line(1, {"success_rate_bp": 99.4})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="integer"):
        kpi_line(1, {"online": True})
    assert kpi_line(1, {"a": None}) is None
    assert kpi_line(5, {"success_rate_bp": np.int64(9943), "x": None}, meter_class=0) == \
        "kpi,class=dedicated success_rate_bp=9943i 5"


def test_line_protocol_escapes_and_bounded_tags() -> None:
    b = ReadingBatch.from_rows("T 1,x=y", 1, 0, 0,
                               [(1, 7, 5, 1, 1, 1, 2, -1, 0, 0, NO_DRIFT)])
    (line,) = reading_lines(b, BatchMeta('A"1', 1))
    assert line == ('reading,area=A"1,class=public,terminal=T\\ 1\\,x\\=y meter="000000000001",'
                    "total_centikwh=5i,t1_centikwh=1i,t2_centikwh=1i,t3_centikwh=1i,"
                    "t4_centikwh=2i,outcome=0i 7")
    ev = CollectorEvent("rejected", "WHOEVER-DIALLED", 1, "not in the archive")
    assert link_line(ev, "A") is None  # an unknown terminal id never becomes a tag value
    assert link_line(CollectorEvent("demoted", "T", 1, meter="1"), "A") is None
    assert link_line(CollectorEvent("down", "T", 9, 'say "bye"\n'), "A") == \
        'link,area=A,terminal=T up=0i,kind="down",detail="say \\"bye\\" " 9'
    with pytest.raises(ValueError, match="meter class"):
        BatchMeta("A", 5).class_per_row(1)
    with pytest.raises(ValueError, match="entries"):
        BatchMeta("A", np.array([0, 1], np.int8)).class_per_row(3)


def test_unique_ts_moves_only_ties_forward() -> None:
    ts = np.array([10, 10, 5, 11, 10], np.int64)
    out = unique_ts(ts)
    assert len(set(out.tolist())) == 5
    assert out[2] == 5 and (out >= ts).all()
    assert unique_ts(np.array([3, 1, 2], np.int64)).tolist() == [3, 1, 2]
    lines = balance_lines("T", "A", [1, 2, 3], [10, 20, 30], [0, 0, 1], 100)
    assert [int(x.rsplit(" ", 1)[1]) for x in lines] == [100, 101, 102]


def test_spool_picks_up_files_of_an_earlier_run_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    s = Spool(tmp_path, 1 << 20, file_bytes=16)
    assert s.append(b"a x=1i 1\nb x=2i 2\n") and s.append(b"c x=3i 3\n" * 8)
    s.close()
    files = sorted(tmp_path.glob("spool-*.lp"))
    with open(files[-1], "ab") as fh:
        fh.write(b"d x=4")  # the process died in the middle of an append
    s2 = Spool(tmp_path, 1 << 20)
    assert len(s2) == 2 and s2.bytes == sum(f.stat().st_size for f in files)
    first = s2.oldest()
    assert first is not None and first[1] == b"a x=1i 1\nb x=2i 2\n"
    s2.remove(first[0])
    second = s2.oldest()
    assert second is not None and second[1] == b"c x=3i 3\n" * 8
    assert s2.append(b"e x=5i 5\n")  # goes to a new file: the one being sent is closed
    assert len(list(tmp_path.glob("spool-*.lp"))) == 2
    assert not s2.append(b"z" * (2 << 20))  # beyond the bound: refused, nothing written


def test_influx_table_is_checked(tmp_path: Path) -> None:
    text = """[influx]
url = "http://127.0.0.1:8086"
token_env = "INFLUX_TOKEN"
org = "county"
bucket = "meterstream"
batch_size = 2000
flush_s = 0.5
spool_dir = "spool"
spool_max_mb = 64
"""
    cfg = load_influx_config(TomlTable(tomllib.loads(text)["influx"], "x.toml", "influx"),
                             tmp_path)
    assert (cfg.url, cfg.org, cfg.bucket, cfg.batch_size, cfg.spool_max_mb) == \
        ("http://127.0.0.1:8086", "county", "meterstream", 2000, 64)
    assert cfg.spool_dir == tmp_path / "spool" and cfg.token_env == "INFLUX_TOKEN"
    for bad, why in ((text.replace("http://", "tcp://"), "influx.url"),
                     (text.replace("batch_size = 2000", "batch_size = 0"), "influx.batch_size"),
                     (text + "spool_max = 3\n", "influx.spool_max: unknown key")):
        with pytest.raises(UserError, match=why):
            load_influx_config(TomlTable(tomllib.loads(bad)["influx"], "x.toml", "influx"))
    sink = InfluxSink.from_config(cfg, env={"INFLUX_TOKEN": "secret"}, sender=_NullSender())
    assert sink.batch_size == 2000
    sink.close()


class _NullSender:
    def send(self, body: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_slow_server_never_stalls_the_writer_and_memory_spills_to_disk(stub: StubInflux,
                                                                         tmp_path: Path) -> None:
    stub.hold.clear()  # the server takes the first request and sits on it
    sink = sink_for(stub.url, tmp_path / "spool", batch_size=10, max_pending=30)
    meta = BatchMeta("AREA-3", 2)
    t0 = 1_700_000_000_000_000_000
    lines: list[str] = []

    async def pipeline() -> None:
        for cycle in range(12):
            b = make_batch("T-SLOW", t0 + cycle * 60_000 * MS, 10, cycle)
            lines.extend(reading_lines(b, meta))
            assert sink.write_batch(b, meta) == 10  # returns at once: nothing waits on HTTP
            if cycle == 0:
                await asyncio.to_thread(stub.held.wait, WAIT_S)
            await asyncio.sleep(0)
        assert sink.stats.spooled > 0  # memory at its bound: the oldest went to disk
        assert sink.stats.pending <= 30 and stub.requests == 1
        stub.hold.set()  # the server answers again
        assert await sink.await_drained(WAIT_S)
        await sink.aclose()

    asyncio.run(pipeline())
    st = sink.stats
    assert (st.written, st.rejected, st.refused, st.errors) == (120, 0, 0, 0)
    assert Counter(stub.accepted) == Counter(lines)  # every point once


class _GateSender:
    """A server that answers only when the test opens the gate (a slow InfluxDB)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.bodies: list[bytes] = []

    def send(self, body: bytes) -> None:
        self.gate.wait(WAIT_S)
        self.bodies.append(body)

    def close(self) -> None:
        self.gate.set()


def test_make_durable_puts_every_point_on_the_server_or_on_disk(tmp_path: Path) -> None:
    """What the worker waits for before Kafka offsets are committed: a process killed after
    make_durable() loses no point taken before it, however slow the server."""
    sender = _GateSender()
    sink = InfluxSink("http://x", "t", "o", "b", tmp_path / "spool", batch_size=10,
                      flush_s=0.01, sender=sender, backoff_s=(60.0, 60.0))  # no retry meanwhile
    try:
        sink.write_points([f"m v={k}i {k}" for k in range(10)])  # one request, stuck in flight
        wait_for(lambda: sink.stats.pending == 0, "the request to be taken")
        sink.write_points([f"m v={k}i {k}" for k in range(10, 35)])  # queued behind it
        done = threading.Event()
        t = threading.Thread(target=lambda: (sink.make_durable(spill_after_s=0.1), done.set()))
        t.start()
        wait_for(lambda: sink.stats.spooled == 25, "the queued points spilled to disk")
        assert not done.is_set()  # it still waits for the request in flight
        sender.gate.set()
        t.join(WAIT_S)
        assert done.is_set()
        st = sink.stats
        assert (st.written, st.spooled, st.pending) == (10, 25, 0)
        on_disk = b"".join(f.read_bytes() for f in sorted((tmp_path / "spool").glob("spool-*.lp")))
        assert sorted(int(x.split()[-1]) for x in on_disk.decode().splitlines()) == list(
            range(10, 35))
    finally:
        sender.gate.set()
        sink.close(5.0)
