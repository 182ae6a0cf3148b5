"""The suite's report: medians of the runs, the markdown tables, the PNG plots, the scale section.

Everything shown is computed from the JSON document (`summarise` fills its "median" and "table"
entries), so the markdown and the JSON cannot disagree: a table cell is `fmt(median)` of the
key it names. Plots use matplotlib's Agg backend (no display) and are written next to the
report. The scale section is arithmetic on the measured medians with the headroom stated.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

#: Planning assumptions of the scale section (said in the report).
INTERVAL_S = 900  # a reading every 15 minutes
UTILISATION = 0.5  # run at half the measured capacity: catch-up after an outage, rebalances
READS_PER_METER = 2  # energy block + status word 3 per meter per cycle (what was measured)
COLLECTOR_MEMORY_MIB = 4096  # memory given to one collector process
PROVINCE_METERS = 30_000_000
METERS_PER_TERMINAL = 40  # the county of DESIGN.md: 73,735 meters behind 1,850 terminals


def fmt(value: Any, kind: str) -> str:
    """How a figure of kind `kind` is shown (the one formatting both report and test use)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    v = float(value)
    if kind == "rate":
        return f"{v:,.0f}" if v < 10_000_000 else f"{v / 1e6:,.1f} M"
    if kind == "x":
        return f"{v:,.1f}x" if v >= 10 else f"{v:.2f}x"
    if kind == "pct":
        return f"{100 * v:.1f} %"
    if kind == "s":
        return f"{v:.2f} s"
    if kind == "mib":
        return f"{v:,.0f} MiB"
    if kind == "kib":
        return f"{v:.2f} KiB"
    return f"{v:,.0f}"


def _median(xs: list[Any]) -> Any:
    nums = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return statistics.median(nums) if nums and len(nums) == len(xs) else None


def table_spec(name: str, doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, kind) of the rows of a part's table."""
    if name == "codec":
        return [("decode_frames_per_s", ("frames read and decoded per second "
                 "(FrameReader + decode_energy_blocks)"), "rate"),
                ("slice_baseline_frames_per_s", "baseline: slicing the same frames", "rate"),
                ("decode_to_slice", "decode / baseline", "pct"),
                ("decode_reply_frames_per_s", "frames per second, general decode_reply",
                 "rate"),
                ("encode_requests_per_s", "read requests encoded per second (cached header)",
                 "rate"),
                ("call_baseline_per_s", "baseline: a call returning a constant", "rate"),
                ("encode_to_call", "encode / baseline", "pct"),
                ("encode_new_address_per_s", "requests per second, new address each", "rate")]
    if name == "kernels":
        rows = []
        for n in doc["params"]["sizes"]:
            rows += [(f"{n}_kernel_readings_per_s", f"{n:,} meters: kernel readings/s", "rate"),
                     (f"{n}_terminal_batches_readings_per_s",
                      f"{n:,} meters: kernel, batches per terminal", "rate"),
                     (f"{n}_baseline_readings_per_s", f"{n:,} meters: memory-bound baseline",
                      "rate"),
                     (f"{n}_reference_readings_per_s", f"{n:,} meters: plain-Python reference",
                      "rate"),
                     (f"{n}_kernel_to_baseline", f"{n:,} meters: kernel / baseline", "pct"),
                     (f"{n}_kernel_to_reference", f"{n:,} meters: kernel / reference", "x")]
        return rows
    if name == "collectors":
        return [("reads_per_s", "reads per second, one collector process", "rate"),
                ("reads_per_cpu_s", "reads per CPU second of the collector", "rate"),
                ("baseline_reads_per_s", "baseline client: reads per second", "rate"),
                ("collector_to_baseline_wall", "collector / baseline (wall)", "pct"),
                ("collector_to_baseline_cpu", "collector / baseline (per CPU second)", "pct"),
                ("terminals_held", "terminals held, each delivered a cycle", "int"),
                ("meters_held", "meters behind them", "int"),
                ("first_cycle_s", "first full cycle of every terminal", "s"),
                ("rss_mib", "collector RSS holding them", "mib"),
                ("rss_floor_mib", "RSS of the bare interpreter (numpy loaded)", "mib"),
                ("rss_kib_per_meter", "RSS above the floor per meter", "kib")]
    if name == "pipeline":
        return [("worker_readings_per_s", "worker: readings per second end to end", "rate"),
                ("naive_readings_per_s", "naive design (a message per reading)", "rate"),
                ("worker_to_naive", "worker / naive", "x")]
    if name == "influx":
        return [("sink_points_per_s", "InfluxSink: points per second into VictoriaMetrics",
                 "rate"),
                ("raw_http_points_per_s", "baseline: raw HTTP write of the same lines", "rate"),
                ("sink_to_raw", "sink / baseline", "pct")]
    if name == "latency":
        rows = []
        for lvl in doc["params"]["loss_levels"]:
            t = f"loss{round(lvl * 100)}"
            p = f"{lvl:.0%} lost"
            rows += [(f"{t}_confirmed", f"{p}: payments confirmed closed", "int"),
                     (f"{t}_commands_lost", f"{p}: 1CH requests dropped (whole run, cut-offs included)",
                      "int"),
                     (f"{t}_command_p50_s", f"{p}: payment -> reconnect command, p50", "s"),
                     (f"{t}_command_p99_s", f"{p}: payment -> reconnect command, p99", "s"),
                     (f"{t}_confirmed_p50_s", f"{p}: payment -> confirmed close, p50", "s"),
                     (f"{t}_confirmed_p99_s", f"{p}: payment -> confirmed close, p99", "s"),
                     (f"{t}_confirmed_max_s", f"{p}: payment -> confirmed close, max", "s")]
        return rows
    if name == "replay":
        return [("readings_per_s", "readings per second, whole command", "rate"),
                ("wall_s", "wall time, parsing and output included", "s"),
                ("startup_baseline_s", "baseline: the command's start-up", "s"),
                ("read_bytes_baseline_s", "baseline: reading the input bytes", "s"),
                ("readings", "readings replayed", "int")]
    return []


def summarise(name: str, doc: dict[str, Any]) -> None:
    """Fill doc["median"] (over the runs, per key) and doc["table"] (what the markdown shows)."""
    runs = doc.get("runs", [])
    keys = list(dict.fromkeys(k for r in runs for k in r))
    doc["median"] = {k: _median([r.get(k) for r in runs]) for k in keys}
    doc["table"] = []
    for key, label, kind in table_spec(name, doc):
        if key not in doc["median"]:
            continue
        m = doc["median"][key]
        doc["table"].append({"key": key, "label": label, "kind": kind, "median": m,
                             "shown": fmt(m, kind),
                             "runs": [fmt(r.get(key), kind) for r in runs]})


# --- plots ---------------------------------------------------------------------------------------

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernels(doc: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    sizes = doc["params"]["sizes"]
    med = doc["median"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("kernel_readings_per_s", "billing kernel (random order)", "o-"),
                              ("terminal_batches_readings_per_s", "kernel, batches per terminal",
                               "s--"),
                              ("baseline_readings_per_s", "memory-bound baseline", "^-"),
                              ("reference_readings_per_s", "plain-Python reference", "v-")):
        ys = [med.get(f"{n}_{key}") for n in sizes]
        if all(y is not None for y in ys):
            ax.plot(sizes, ys, style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("meters in the fleet")
    ax.set_ylabel("readings per second (one core)")
    ax.set_title(f"Billing kernel throughput against fleet size (median of {len(doc['runs'])})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_latency(doc: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lvl, xs in doc["samples"].items():
        if not xs:
            continue
        s = sorted(xs)
        ys = [(k + 1) / len(s) for k in range(len(s))]
        ax.step(s, ys, where="post", label=f"{float(lvl):.0%} of commands lost (n={len(s)})")
    ax.set_xlabel("payment -> relay confirmed closed (s)")
    ax.set_ylabel("share of payments")
    ax.set_ylim(0, 1.02)
    ax.set_title("Reconnection latency, CDF")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ratios(parts: dict[str, Any], path: Path) -> Path | None:
    """Each subject against its baseline, one bar per comparison (per-run ratios' medians)."""
    bars = []
    for name, key, label in (("codec", "decode_to_slice", "codec decode / slicing"),
                             ("codec", "encode_to_call", "codec encode / constant call"),
                             ("collectors", "collector_to_baseline_wall",
                              "collector / trivial client"),
                             ("influx", "sink_to_raw", "InfluxSink / raw HTTP")):
        v = parts.get(name, {}).get("median", {}).get(key)
        if v is not None:
            bars.append((label, v))
    if not bars:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([b[0] for b in bars], [100 * b[1] for b in bars])
    ax.set_xlabel("% of the baseline's rate, same run")
    ax.set_title("Subjects against their baselines")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- scale ---------------------------------------------------------------------------------------

def scale(parts: dict[str, Any]) -> dict[str, Any] | None:
    """Meters one worker and one collector carry at 15-minute reads, and a province's count."""
    w = parts.get("pipeline", {}).get("median", {}).get("worker_readings_per_s")
    c = parts.get("collectors", {}).get("median", {})
    if w is None or c.get("reads_per_cpu_s") is None:
        return None
    worker_meters = w * INTERVAL_S * UTILISATION
    cpu_meters = c["reads_per_cpu_s"] * INTERVAL_S / READS_PER_METER * UTILISATION
    per_meter_mib = c["rss_kib_per_meter"] / 1024
    mem_meters = (COLLECTOR_MEMORY_MIB - c["rss_floor_mib"]) / per_meter_mib
    held_meters = c["terminals_held"] * METERS_PER_TERMINAL
    collector_meters = min(cpu_meters, mem_meters, held_meters)
    workers = math.ceil(PROVINCE_METERS / worker_meters)
    collectors_n = math.ceil(PROVINCE_METERS / collector_meters)
    return {
        "interval_s": INTERVAL_S, "utilisation": UTILISATION,
        "reads_per_meter": READS_PER_METER, "collector_memory_mib": COLLECTOR_MEMORY_MIB,
        "province_meters": PROVINCE_METERS, "meters_per_terminal": METERS_PER_TERMINAL,
        "worker_readings_per_s": w, "collector_reads_per_cpu_s": c["reads_per_cpu_s"],
        "worker_meters": worker_meters, "collector_cpu_meters": cpu_meters,
        "collector_memory_meters": mem_meters, "collector_held_meters": held_meters,
        "collector_meters": collector_meters,
        "province_load_readings_per_s": PROVINCE_METERS / INTERVAL_S,
        "workers": workers, "workers_with_spare": workers + 1,
        "collectors": collectors_n, "collectors_with_spare": collectors_n + 1,
        "province_terminals": PROVINCE_METERS // METERS_PER_TERMINAL,
    }


def scale_markdown(s: dict[str, Any]) -> list[str]:
    def f(v: float) -> str:
        return f"{v:,.0f}"

    limit = min(("CPU", s["collector_cpu_meters"]), ("memory", s["collector_memory_meters"]),
                ("terminals held as measured", s["collector_held_meters"]), key=lambda x: x[1])
    return [
        "## Scale",
        "",
        (f"Assumptions: a reading of every meter every {s['interval_s'] // 60} minutes; each "
        f"process planned at {s['utilisation']:.0%} of its measured capacity (headroom to drain "
        "the backlog of an outage while live traffic continues, for rebalances and for a "
        "machine busier than this one); a collector reads "
        f"{s['reads_per_meter']} items per meter per cycle (energy block and status word 3, as "
        f"measured); a collector process gets {s['collector_memory_mib']:,} MiB; "
        f"{s['meters_per_terminal']} meters per terminal (the county of DESIGN.md); one "
        "spare of each for N+1."),
        "",
        "One worker (the measured rate is one worker process, one core, broker beside it):",
        "",
        (f"    {f(s['worker_readings_per_s'])} readings/s x {s['interval_s']} s x "
        f"{s['utilisation']} = {f(s['worker_meters'])} meters"),
        "",
        "One collector, the least of three limits:",
        "",
        (f"    CPU:       {f(s['collector_reads_per_cpu_s'])} reads/s x {s['interval_s']} s / "
        f"{s['reads_per_meter']} reads x {s['utilisation']} = "
        f"{f(s['collector_cpu_meters'])} meters"),
        (f"    memory:    ({s['collector_memory_mib']:,} MiB - interpreter floor) / RSS per "
        f"meter = {f(s['collector_memory_meters'])} meters"),
        (f"    terminals: {f(s['collector_held_meters'] / s['meters_per_terminal'])} held in the "
         f"measurement (no more planned) x {s['meters_per_terminal']} meters = "
         f"{f(s['collector_held_meters'])} meters"),
        f"    -> {f(s['collector_meters'])} meters (bound by {limit[0]})",
        "",
        (f"A province of {f(s['province_meters'])} meters ({f(s['province_terminals'])} "
        f"terminals; {f(s['province_load_readings_per_s'])} readings/s on average):"),
        "",
        (f"    workers:    ceil({f(s['province_meters'])} / {f(s['worker_meters'])}) = "
        f"{s['workers']}, plus one spare: **{s['workers_with_spare']}**"),
        (f"    collectors: ceil({f(s['province_meters'])} / {f(s['collector_meters'])}) = "
        f"{s['collectors']}, plus one spare: **{s['collectors_with_spare']}**"),
        "",
        ("Not measured here and to be checked before sizing hardware on it: the worker's "
        "memory and changelog recovery time for a province's state, Kafka (the figures use "
        "the embedded Tansu broker on the same machine), a collector's limit on open "
        "connections beyond the terminals held here, and the field itself: a bus answers at "
        "its own pace (the county's 249-meter 2400-baud buses need ~117 s of the 900 s "
        "cycle), which bounds each terminal, not the collector."),
        "",
    ]


# --- the markdown --------------------------------------------------------------------------------

TITLES = {
    "codec": "1. DL/T 645 codec",
    "kernels": "2. Billing kernel against fleet size",
    "collectors": "3. Collectors against the simulated field",
    "pipeline": "4. Pipeline end to end against the naive Faust design",
    "influx": "5. InfluxDB sink against VictoriaMetrics",
    "latency": "6. Reconnection: payment to confirmed close",
    "replay": "7. Replay of the recorded year",
}


def markdown(doc: dict[str, Any], plots: dict[str, str]) -> str:
    m = doc["machine"]
    out = [
        f"# meterstream bench, {doc['date']}",
        "",
        f"Machine: {m.get('cores')} cores, {m.get('memory_gib')} GiB, {m.get('cpu')}; Python "
        f"{m.get('python')}, " + ", ".join(f"{k} {v}" for k, v in m.items()
                                           if k not in ("cores", "memory_gib", "cpu", "python"))
        + f". Load average when the suite started: {doc.get('load_before', '?')}.",
        "",
        ("Every figure is the median of the runs shown beside it; every comparison is a ratio "
        "of a subject and its baseline measured in the same run (the median of those per-run "
        "ratios). Raw runs, medians and parameters: "
        f"`{doc['date']}.json` next to this file. Command(s) of the day's parts: "
        + "; ".join(f"`{c}`" for c in dict.fromkeys(
            p.get("command", doc["command"]) for p in doc["parts"].values())) + "."),
        "",
    ]
    for name, title in TITLES.items():
        part = doc["parts"].get(name)
        if part is None:
            continue
        out += [f"## {title}", ""]
        if "error" in part:
            out += [f"**Not measured**: {part['error']}", ""]
            continue
        n = len(part["runs"])
        quick = " **--quick: small sizes, a check of the suite, not a measurement.**" if part.get(
            "quick") else ""
        load = f", load average before {part['load_before']}" if part.get("load_before") else ""
        out += [(f"Run {part['when']}, {n} run(s), {part['seconds']:.0f} s{load}.{quick} "
                f"{part['notes']}"), ""]
        out += ["| figure | median | runs |", "| --- | --- | --- |"]
        for row in part["table"]:
            out.append(f"| {row['label']} | {row['shown']} | {' / '.join(row['runs'])} |")
        out.append("")
        if name == "latency":
            per = part["params"]["payments_per_run_and_level"]
            out += [(f"Each loss level rests on {n} run(s) of {per} payments "
                    f"({n * per} payments per level; the CDF pools them). \"0 %\" still has the "
                    "demo field's own bus faults (0.5-2 % of replies lost, 0.2-0.5 % corrupted)."
                    " A 1CH dropped in the field is retried by the collector after its timeout "
                    "(2 s, 2 retries), then by the worker's command book. (Of an even "
                    "number of runs the median is the mean of the middle two.) Pooled over the "
                    "runs:"), ""]
            for lvl, xs in part.get("samples", {}).items():
                if xs:
                    s = sorted(xs)
                    p99 = s[min(len(s) - 1, max(0, math.ceil(0.99 * len(s)) - 1))]
                    out.append(f"- {float(lvl):.0%} lost, {len(s)} payments pooled: payment -> "
                               f"confirmed close p50 {statistics.median(s):.2f} s, p99 "
                               f"{p99:.2f} s, max {s[-1]:.2f} s")
            out.append("")
        if name == "replay" and "check" in part:
            c = part["check"]
            verdict = "**equal**" if c.get("balances_equal") else "**NOT equal**"
            out += [f"Final balances of {c.get('meters')} meters against the reference: "
                    f"{verdict} ({c.get('mismatched_meters')} meters differ; the reference took "
                    f"{c.get('reference_seconds', 0):.0f} s)."
                    + (f" First difference: `{c['first_mismatch']}`." if c.get("first_mismatch")
                       else ""), ""]
        if name == "pipeline" and part.get("script"):
            s = part["script"]
            out += [(f"Readings per worker round: {s.get('readings', '?'):,}; naive design: "
                    f"{s.get('naive_readings', '?'):,}. Worker errors: "
                    f"{s.get('worker_errors', '?')}, dead letters: "
                    f"{s.get('dead_letters_on_topic', '?')}."), ""]
        if name in plots:
            out += [f"![{name}]({plots[name]})", ""]
    if "ratios" in plots:
        out += ["## Subjects against baselines", "", f"![ratios]({plots['ratios']})", ""]
    if doc.get("scale"):
        out += scale_markdown(doc["scale"])
    else:
        out += ["## Scale", "", "Needs the pipeline and collectors parts (not in this report).",
                ""]
    return "\n".join(out)
