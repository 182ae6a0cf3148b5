"""The suite's seven parts: each runs the measuring code of a bench/ script, `runs` times.

A part returns {"params": ..., "runs": [one flat dict of figures per run], "notes": ...} and
may add "samples" (raw distributions, for the plots). Every ratio is computed inside its run
(subject and baseline measured side by side), so the suite reports the median of per-run
ratios, never a ratio of medians. Scripts that take sizes as options run as subprocesses with
their results redirected to a scratch directory ($METERSTREAM_BENCH_RESULTS); the others are
imported and called. Nothing here asserts on a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterstream.errors import UserError

#: Loss levels of the reconnection part: the share of 1CH commands lost in the field.
LOSS_LEVELS = (0.0, 0.05, 0.20)


@dataclass
class Context:
    """What every part needs: the checkout, the sizes, where to log, how to report progress."""

    repo: Path
    runs: int
    quick: bool
    data: Path | None
    work: Path  # scratch directory (removed afterwards)
    log: Path  # every subprocess's output is appended here
    payments: int
    step: Callable[[str], None] = field(default=lambda what: None)

    def env(self, results: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["METERSTREAM_BENCH_RESULTS"] = str(results)
        env["PYTHONPATH"] = os.pathsep.join([str(self.repo), env.get("PYTHONPATH", "")])
        if self.data is not None:
            env["METERSTREAM_LCL_DATA"] = str(self.data)
        return env

    def script(self, name: str, args: list[str], result: str) -> dict[str, Any]:
        """Run bench/NAME.py with `args`; the figures of the RESULT.json it writes."""
        out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        cmd = [sys.executable, str(self.repo / "bench" / f"{name}.py"), *args]
        return self.subprocess(cmd, out, result)["figures"]  # type: ignore[no-any-return]

    def subprocess(self, cmd: list[str], out: Path, result: str) -> dict[str, Any]:
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            p = subprocess.run(cmd, cwd=self.repo, env=self.env(out), stdout=log,
                               stderr=subprocess.STDOUT, check=False)
        path = out / f"{result}.json"
        if p.returncode != 0 or not path.exists():
            raise PartFailed(f"{' '.join(cmd[1:3])} exited with status {p.returncode}: "
                             f"see {self.log}")
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc


class PartFailed(Exception):
    """A part's measurement failed (not a user's mistake): the suite records it and goes on."""


def _import_bench(repo: Path) -> None:
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))


# --- 1. codec ------------------------------------------------------------------------------------

def codec(ctx: Context) -> dict[str, Any]:
    _import_bench(ctx.repo)
    from bench.bench_codec import measure

    frames, requests, rounds = (20_000, 50_000, 1) if ctx.quick else (200_000, 500_000, 3)
    runs = []
    for k in range(ctx.runs):
        ctx.step(f"codec run {k + 1}/{ctx.runs}")
        f, _notes = measure(frames, requests, rounds)
        dec = f["reader + decode_energy_blocks: median, frames/s"]
        enc = f["encode_read, cached header: median, requests/s"]
        runs.append({
            "decode_frames_per_s": dec,
            "slice_baseline_frames_per_s": f["baseline: slice each frame, frames/s"],
            "decode_to_slice": dec / f["baseline: slice each frame, frames/s"],
            "decode_reply_frames_per_s": f["reader + decode_reply per frame, frames/s"],
            "encode_requests_per_s": enc,
            "call_baseline_per_s": f["baseline: call returning a constant, calls/s"],
            "encode_to_call": enc / f["baseline: call returning a constant, calls/s"],
            "encode_new_address_per_s": f["encode_read, new address each, requests/s"],
        })
    return {"params": {"frames": frames, "requests": requests, "rounds_per_run": rounds},
            "runs": runs,
            "notes": "bench/bench_codec.py measure(): FrameReader.feed + decode_energy_blocks on "
                     "a stream of energy-block replies against slicing the same frames at known "
                     "offsets; encode_read (cached header) against a call returning a constant. "
                     "Each run is the median of its interleaved rounds."}


# --- 2. kernels ----------------------------------------------------------------------------------

def kernel_sizes(quick: bool) -> list[int]:
    return [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000, 10_000_000]


def kernels(ctx: Context) -> dict[str, Any]:
    """bench/bench_billing.py per fleet size (a subprocess each: 10^7 meters need ~5 GB)."""
    sizes = kernel_sizes(ctx.quick)
    repeats, ref_n = (2, 5_000) if ctx.quick else (5, 100_000)
    runs = []
    cycles = {n: 1 + max(1, min(8, 4_000_000 // n)) for n in sizes}
    for k in range(ctx.runs):
        run: dict[str, Any] = {}
        for n in sizes:
            ctx.step(f"kernels {n:,} meters, run {k + 1}/{ctx.runs}")
            f = ctx.script("bench_billing", ["--meters", str(n), "--cycles", str(cycles[n]),
                                             "--repeats", str(repeats),
                                             "--reference-readings", str(ref_n)], "billing")
            run[f"{n}_kernel_readings_per_s"] = f["kernel readings/s"]
            run[f"{n}_terminal_batches_readings_per_s"] = f["kernel, terminal batches, readings/s"]
            run[f"{n}_baseline_readings_per_s"] = f["baseline readings/s"]
            run[f"{n}_reference_readings_per_s"] = f["reference readings/s"]
            run[f"{n}_kernel_to_baseline"] = f["kernel readings/s"] / f["baseline readings/s"]
            run[f"{n}_kernel_to_reference"] = f["kernel / reference (x)"]
            run[f"{n}_readings_timed"] = f["readings timed"]
        runs.append(run)
    return {"params": {"sizes": sizes, "cycles": cycles, "repeats": repeats,
                       "reference_readings": ref_n},
            "runs": runs,
            "notes": "bench/bench_billing.py --meters N: apply_readings over the whole fleet in "
                     "random order (and grouped per terminal, as the pipeline delivers them), "
                     "the memory-bound baseline (a numba loop adding d_total per reading into a "
                     "16-byte-per-meter array), the plain-Python reference "
                     "(tests/reference_billing.py) on a subset; each figure of a run is the "
                     "script's median of its repeats."}


# --- 3. collectors -------------------------------------------------------------------------------

def collectors(ctx: Context) -> dict[str, Any]:
    _import_bench(ctx.repo)
    from bench import bench_collectors as bc

    if ctx.quick:
        tp = {"terminals": 8, "meters": 50, "warmup_s": 1.0, "window_s": 1.0, "windows": 2}
        mem = {"areas": 1, "per_area": 10, "meters": 20}
    else:
        tp = {"terminals": 64, "meters": 250, "warmup_s": 3.0, "window_s": 3.0, "windows": 3}
        mem = {"areas": 50, "per_area": 100, "meters": 100}  # 10,000 terminals, 1 M meters
    runs = []
    for k in range(ctx.runs):
        with tempfile.TemporaryDirectory(prefix="collectors-", dir=ctx.work) as d:
            ctx.step(f"collectors throughput, run {k + 1}/{ctx.runs}")
            t = bc.throughput(Path(d), **tp)  # type: ignore[arg-type]
            ctx.step(f"collectors memory, run {k + 1}/{ctx.runs}")
            m = bc.memory(Path(d), **mem)  # type: ignore[arg-type]
        held = m["million_terminals_delivered_a_cycle"]
        runs.append({
            "reads_per_s": t["collector_reads_per_s"],
            "reads_per_cpu_s": t["collector_reads_per_cpu_s"],
            "baseline_reads_per_s": t["baseline_reads_per_s"],
            "baseline_reads_per_cpu_s": t["baseline_reads_per_cpu_s"],
            "collector_to_baseline_wall": t["collector_to_baseline_wall"],
            "collector_to_baseline_cpu": t["collector_to_baseline_cpu"],
            "success_rate": t["collector_success"],
            "terminals_held": held,
            "meters_held": m["million_meters"],
            "rows_ok_first_cycle": m["million_rows_ok"],
            "first_cycle_s": m["million_cycle_wall_s"],
            "rss_mib": m["million_collector_rss_mib"],
            "rss_floor_mib": m["million_rss_python_floor_mib"],
            "rss_archive_loaded_mib": m["million_rss_archive_loaded_mib"],
            "rss_kib_per_meter": 1024 * (m["million_collector_rss_mib"]
                                         - m["million_rss_python_floor_mib"])
                                 / max(1, m["million_meters"]),
        })
    return {"params": {"throughput": tp, "memory": {**mem, "fields": 2}},
            "runs": runs,
            "notes": "bench/bench_collectors.py throughput() and memory(): the collector and a "
                     "trivial asyncio client (precomputed frames, parses nothing) against the "
                     "same zero-latency field process, energy block + status word 3 of every "
                     "meter; memory: two field processes, one collector holding every terminal "
                     "until each delivered a cycle (RSS then)."}


# --- 4. pipeline ---------------------------------------------------------------------------------

def pipeline(ctx: Context) -> dict[str, Any]:
    """bench/bench_pipeline.py --part throughput: its rounds are the suite's runs (interleaved
    worker, naive, worker, ... on one broker, each round a fresh consumer group)."""
    p = ({"terminals": 40, "meters": 50, "cycles": 3, "naive_terminals": 4} if ctx.quick else
         {"terminals": 1000, "meters": 250, "cycles": 10, "naive_terminals": 10})
    ctx.step(f"pipeline: {ctx.runs} round(s) of worker and naive design")
    f = ctx.script("bench_pipeline", [
        "--part", "throughput", "--terminals", str(p["terminals"]), "--meters", str(p["meters"]),
        "--cycles", str(p["cycles"]), "--naive-terminals", str(p["naive_terminals"]),
        "--rounds", str(ctx.runs), "--name", "pipeline"], "pipeline")
    runs = []
    for k in range(ctx.runs):
        w = f["worker_rounds_readings_per_s"][k]
        n = f["naive_rounds_readings_per_s"][k]
        runs.append({"worker_readings_per_s": w, "naive_readings_per_s": n,
                     "worker_to_naive": w / n,
                     "worker_batches_applied": f["worker_batches_applied"][k],
                     "worker_commands_sent": f["worker_commands_sent"][k],
                     "changelog_records": f["changelog_records"][k]})
    extra = {k: f[k] for k in ("readings", "batches", "naive_readings", "worker_us_cpu_per_batch",
                               "naive_us_cpu_per_reading", "worker_errors",
                               "dead_letters_on_topic") if k in f}
    return {"params": p, "runs": runs, "script": extra,
            "notes": "bench/bench_pipeline.py --part throughput: ONE WorkerApp on pre-produced "
                     "ReadingBatch messages against the naive design (a JSON message per "
                     "reading, a Faust table keyed by meter), same embedded Tansu broker, same "
                     "readings; the naive design reads the first terminals' readings only."}


# --- 5. influx -----------------------------------------------------------------------------------

def influx(ctx: Context) -> dict[str, Any]:
    _import_bench(ctx.repo)
    from bench.bench_influx import measure

    points = 5_000 if ctx.quick else 200_000
    ctx.step(f"influx: {ctx.runs} round(s) of sink and raw HTTP")
    try:
        f = measure(points, 5000, ctx.runs, workdir=ctx.work)
    except RuntimeError as e:
        raise PartFailed(str(e)) from None
    runs = [{"sink_points_per_s": s, "raw_http_points_per_s": r, "sink_to_raw": s / r}
            for s, r in zip(f["sink_rounds_points_per_s"], f["raw_http_rounds_points_per_s"],
                            strict=True)]
    return {"params": {"points_per_run": points, "batch_size": 5000}, "runs": runs,
            "script": {"sink_us_cpu_per_point": f["sink_us_cpu_per_point"]},
            "notes": "bench/bench_influx.py: InfluxSink.write_batch of 250-meter reading "
                     "batches until flush() is True, against the same line protocol POSTed raw "
                     "with http.client, same VictoriaMetrics server on loopback."}


# --- 6. reconnection latency ---------------------------------------------------------------------

def latency(ctx: Context) -> dict[str, Any]:
    payments = ctx.payments
    runs = []
    samples: dict[str, list[float]] = {f"{lvl:g}": [] for lvl in LOSS_LEVELS}
    for k in range(ctx.runs):
        run: dict[str, Any] = {}
        for lvl in LOSS_LEVELS:
            ctx.step(f"latency, {lvl:.0%} of commands lost, run {k + 1}/{ctx.runs} (~3 min)")
            out = Path(tempfile.mkdtemp(prefix="latency-", dir=ctx.work))
            doc = ctx.subprocess(
                [sys.executable, "-m", "meterstream.benchsuite.latency", "--repo",
                 str(ctx.repo), "--loss", str(lvl), "--payments", str(payments),
                 "--out", str(out / "latency.json")], out, "latency")
            tag = f"loss{round(lvl * 100)}"
            conf = doc["samples"].get("confirmed", [])
            samples[f"{lvl:g}"].extend(conf)
            run[f"{tag}_payments"] = doc["latency_payments"]
            run[f"{tag}_confirmed"] = doc["latency_confirmed_seen"]
            run[f"{tag}_commands_lost"] = doc["commands_lost_in_field"]
            for name in ("command", "confirmed", "relay_closed"):
                for q in ("p50", "p99", "max"):
                    key = f"latency_pay_to_{name}_{q}_s"
                    if key in doc:
                        run[f"{tag}_{name}_{q}_s"] = doc[key]
        runs.append(run)
    return {"params": {"loss_levels": list(LOSS_LEVELS), "payments_per_run_and_level": payments,
                       "payment_gap_s": 1.0},
            "runs": runs, "samples": samples,
            "notes": "bench/bench_pipeline.py's latency part (config/field-demo.toml in real "
                     "time, a KafkaCollector, start_worker, one embedded broker; customers cut "
                     "off first, then N of them pay 50.00 yuan about a second apart), with 1CH "
                     "requests dropped in the field at the given rate on top of the demo's own "
                     "bus faults. Latency: payment produced -> confirmed close (status word 3 "
                     "read back) on meterstream.results."}


# --- 7. replay -----------------------------------------------------------------------------------

def replay(ctx: Context) -> dict[str, Any]:
    _import_bench(ctx.repo)
    from bench.make_replay_inputs import TARIFFS, make_inputs

    meters = 5 if ctx.quick else None
    cached = ctx.repo / "bench" / "results" / "tmp" / "replay-inputs"
    inputs = (ctx.work / "replay-inputs") if (ctx.quick or ctx.data) else cached
    made = [inputs / f"{k}.csv" for k in ("archive", "readings", "payments")]
    source = ctx.repo / "bench" / "make_replay_inputs.py"
    if not all(p.exists() and p.stat().st_mtime >= source.stat().st_mtime for p in made):
        ctx.step("replay: making the recorded year's inputs")
        try:
            make_inputs(inputs, data_path=ctx.data, meters=meters)
        except FileNotFoundError as e:
            raise UserError(f"{e.filename}: the recorded year is not there (give --data PATH "
                            "or set METERSTREAM_LCL_DATA)", where="--data") from None
    runs = []
    for k in range(ctx.runs):
        ctx.step(f"replay run {k + 1}/{ctx.runs}")
        f = ctx.script("bench_replay", ["--dir", str(inputs), "--repeats", "1"], "replay")
        runs.append({"readings_per_s": f["readings/s"], "wall_s": f["replay wall s (median)"],
                     "startup_baseline_s": f["baseline: start-up s"],
                     "read_bytes_baseline_s": f["baseline: read input bytes s"],
                     "readings": f["readings"], "payments": f["payments"]})
    ctx.step("replay: final balances against the reference (plain Python, a few minutes)")
    out = Path(tempfile.mkdtemp(prefix="replaycheck-", dir=ctx.work))
    t = time.perf_counter()
    check = ctx.subprocess([sys.executable, "-m", "meterstream.benchsuite.replaycheck", "--repo",
                            str(ctx.repo), "--dir", str(inputs), "--tariffs", str(TARIFFS),
                            "--out", str(out / "check.json")], out, "check")
    check["seconds"] = time.perf_counter() - t
    return {"params": {"inputs": str(inputs), "meters": meters or "all"}, "runs": runs,
            "check": check,
            "notes": "bench/bench_replay.py: `meterstream replay` as a subprocess on the "
                     "recorded year (bench/make_replay_inputs.py: registers from the real "
                     "half-hourly consumption, a seeded payment stream), parsing and output "
                     "included; baselines: the command's start-up and reading the input bytes. "
                     "Check: balances.csv equal, line for line, to the plain-Python reference "
                     "(tests/reference_billing.py) run on the same files."}


PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "codec": codec, "kernels": kernels, "collectors": collectors, "pipeline": pipeline,
    "influx": influx, "latency": latency, "replay": replay,
}
