"""The InfluxDB sink's speed against a real server (VictoriaMetrics, InfluxDB v2 write API).

Subject: the project's InfluxSink (pipeline/influx.py) fed reading batches of 250 meters, as the
worker feeds it (write_batch: points formatted in the sink's thread, gzip, influxdb-client's v2
write API, batches of `batch_size`): points per second from the first write_batch call to
flush() returning True (the server acknowledged every point). Baseline in the same run, on the
same server: the same line protocol, formatted beforehand, POSTed raw with http.client over one
kept-alive connection in the same batch size (no client library, no gzip, no formatting: what
the HTTP write itself costs). Rounds interleave sink and baseline; each round writes new series
times, so no round overwrites another's points. Figures, not asserts.

Run: .venv/bin/python bench/bench_influx.py [--points N] [--batch-size B] [--rounds R]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import report
from meterstream.scenario import Victoria

METERS_PER_BATCH = 250
MS = 1_000_000
ORG, BUCKET = "meterstream", "bench"


def batches(n_points: int, t0: int, prefix: str) -> list[Any]:
    """Reading batches of 250 meters (registers, status word, clock drift), terminals
    `prefix`-0001..., the rows 300 ms apart along each bus: `n_points` rows in all."""
    from meterstream.collectors.batch import NO_DRIFT, ReadingBatch

    rng = np.random.default_rng(7)
    out = []
    m = METERS_PER_BATCH
    for k in range(-(-n_points // m)):
        n = min(m, n_points - k * m)
        total = rng.integers(50_000, 3_000_000, n)
        tou = np.stack([total // 4, total // 4, total // 4, total - 3 * (total // 4)], axis=1)
        regs = np.concatenate([total[:, None], tou], axis=1).astype(np.int64)
        ts = t0 + k * MS + np.arange(n, dtype=np.int64) * 300 * MS
        out.append(ReadingBatch(
            f"{prefix}-{k % 400 + 1:04d}", k // 400 + 1, int(ts[0]), int(ts[-1]),
            330_000_000_000 + k * m + np.arange(n, dtype=np.int64), ts, regs,
            np.zeros(n, np.int32), np.zeros(n, np.int8), np.zeros(n, np.int16),
            np.full(n, NO_DRIFT, np.int32)))
    return out


def sink_run(url: str, spool: Path, items: list[Any], batch_size: int) -> dict[str, Any]:
    """Points per second through InfluxSink.write_batch until the server holds them all."""
    from meterstream.pipeline.influx import BatchMeta, InfluxSink

    sink = InfluxSink(url, "bench-token", ORG, BUCKET, spool, batch_size=batch_size,
                      flush_s=0.05, max_pending=10 * len(items) * METERS_PER_BATCH)
    meta = BatchMeta("AREA-1", 2)
    n = sum(len(b) for b in items)
    t = time.perf_counter()
    c = time.process_time()
    for b in items:
        sink.write_batch(b, meta)
    ok = sink.flush(300.0)
    dt = time.perf_counter() - t
    cpu = time.process_time() - c
    st = sink.stats
    sink.close()
    if not ok or st.written != n or st.spooled or st.rejected or st.errors:
        raise RuntimeError(f"the sink did not write every point: {st}")
    return {"points": n, "seconds": dt, "rate": n / dt, "cpu_s": cpu}


def raw_run(port: int, items: list[Any], batch_size: int) -> dict[str, Any]:
    """The same line protocol, formatted beforehand, POSTed with http.client (no gzip)."""
    from meterstream.pipeline.influx import BatchMeta, reading_lines

    meta = BatchMeta("AREA-1", 2)
    lines = [line for b in items for line in reading_lines(b, meta)]
    bodies = [("\n".join(lines[k:k + batch_size]) + "\n").encode()
              for k in range(0, len(lines), batch_size)]
    path = f"/api/v2/write?org={ORG}&bucket={BUCKET}&precision=ns"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t = time.perf_counter()
    c = time.process_time()
    for body in bodies:
        conn.request("POST", path, body=body, headers={"Authorization": "Token bench-token",
                                                       "Content-Type": "text/plain"})
        r = conn.getresponse()
        r.read()
        if r.status != 204:
            raise RuntimeError(f"raw write answered HTTP {r.status}")
    dt = time.perf_counter() - t
    cpu = time.process_time() - c
    conn.close()
    return {"points": len(lines), "seconds": dt, "rate": len(lines) / dt, "cpu_s": cpu}


def measure(points: int = 200_000, batch_size: int = 5000, rounds: int = 3,
            workdir: Path | None = None) -> dict[str, Any]:
    """`rounds` interleaved rounds of the sink and the raw baseline on one VictoriaMetrics."""
    with tempfile.TemporaryDirectory(prefix="bench-influx-", dir=workdir) as d:
        tmp = Path(d)
        vm = Victoria(tmp / "vm")  # the scenario runner's server, on a free port
        vm.start()
        sink_runs, raw_runs = [], []
        try:
            base = (time.time_ns() // MS - 3_600_000) * MS  # an hour ago, whole ms
            for r in range(rounds + 1):  # round 0 warms up both (imports, the server's caches)
                n = min(points, 10_000) if r == 0 else points
                t0 = base + r * 10 * MS  # each round its own instants
                s = sink_run(vm.url, tmp / f"spool-{r}", batches(n, t0, f"S{r}"), batch_size)
                w = raw_run(vm.port, batches(n, t0, f"R{r}"), batch_size)
                if r:
                    sink_runs.append(s)
                    raw_runs.append(w)
        finally:
            vm.stop()
    ratios = [s["rate"] / w["rate"] for s, w in zip(sink_runs, raw_runs, strict=True)]
    return {
        "points_per_round": points,
        "batch_size": batch_size,
        "rounds": rounds,
        "sink_points_per_s": statistics.median(s["rate"] for s in sink_runs),
        "sink_rounds_points_per_s": [round(s["rate"]) for s in sink_runs],
        "sink_us_cpu_per_point": statistics.median(1e6 * s["cpu_s"] / s["points"]
                                                   for s in sink_runs),
        "raw_http_points_per_s": statistics.median(w["rate"] for w in raw_runs),
        "raw_http_rounds_points_per_s": [round(w["rate"]) for w in raw_runs],
        "sink_to_raw": statistics.median(ratios),
        "sink_to_raw_per_round": [round(x, 3) for x in ratios],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=200_000, help="reading points per round")
    ap.add_argument("--batch-size", type=int, default=5000, help="points per write request")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    figures = measure(args.points, args.batch_size, args.rounds)
    report("influx", figures, notes=(
        "InfluxSink.write_batch (250-meter reading batches, formatted in the sink's thread, "
        "gzip, influxdb-client v2 write API) until flush() is True, against the same line "
        "protocol POSTed raw with http.client (pre-formatted, no gzip), same batch size, same "
        "VictoriaMetrics server on loopback; rounds interleaved, medians"))


if __name__ == "__main__":
    main()
