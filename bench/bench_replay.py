"""`meterstream replay` of the whole recorded year: wall time of the command, parsing included.

Target: under 30 s for 5.39 M readings of 325 meters with a payment stream. The inputs are made
once by bench/make_replay_inputs.py (into --dir, default bench/results/tmp/replay-inputs) and the
command runs as a real subprocess, as an operator would run it. Baselines in the same run: the
command's start-up (`meterstream --version`) and reading the input files' bytes. Figures, not
asserts.

Run: .venv/bin/python bench/bench_replay.py [--dir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import report
from bench.make_replay_inputs import TARIFFS, make_inputs

EXE = Path(sys.executable).with_name("meterstream")


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir", type=Path, default=REPO / "bench" / "results" / "tmp" / "replay-inputs"
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    inputs = {k: args.dir / f"{k}.csv" for k in ("archive", "readings", "payments")}
    if not all(p.exists() for p in inputs.values()):
        t = time.perf_counter()
        inputs = make_inputs(args.dir)
        print(f"made the inputs in {time.perf_counter() - t:.1f} s: {args.dir}")
    out = args.dir / "out"
    cmd = [
        str(EXE),
        "replay",
        "--archive",
        str(inputs["archive"]),
        "--readings",
        str(inputs["readings"]),
        "--payments",
        str(inputs["payments"]),
        "--tariffs",
        str(TARIFFS),
        "--out",
        str(out),
    ]
    wall(cmd)  # warm the numba cache and the page cache once
    times = [wall(cmd) for _ in range(args.repeats)]
    startup = statistics.median(wall([str(EXE), "--version"]) for _ in range(3))
    t = time.perf_counter()
    size = sum(len(p.read_bytes()) for p in inputs.values())
    read = time.perf_counter() - t
    readings = lines(inputs["readings"]) - 1
    payments = lines(inputs["payments"]) - 1
    summary = {
        name: lines(out.joinpath(name)) - 1
        for name in ("commands.csv", "events.csv", "rejected.csv")
    }
    figures = {
        "readings": readings,
        "payments": payments,
        "input bytes": size,
        "replay wall s (median)": round(statistics.median(times), 2),
        "replay wall s (best)": round(min(times), 2),
        "readings/s": readings / statistics.median(times),
        "baseline: start-up s": round(startup, 2),
        "baseline: read input bytes s": round(read, 2),
        **{f"rows in {k}": v for k, v in summary.items()},
    }
    report("replay", figures, notes=f"{' '.join(cmd)} (as a subprocess, progress bar on)")


if __name__ == "__main__":
    main()
