"""Shared benchmark harness: the machine's description, medians of repeated runs, reports.

Every benchmark measures its subject and a baseline in the same run and reports the ratio: a
ratio survives a noisy machine, an absolute time does not. Nothing here asserts; benchmarks
report figures, tests never time anything.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: Where report() writes NAME.json: bench/results, or $METERSTREAM_BENCH_RESULTS when set (the
#: suite, `meterstream bench`, runs the scripts with it pointing at a scratch directory).
RESULTS = Path(
    os.environ.get("METERSTREAM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model, Python and key library versions."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for mod in ("numpy", "numba", "faust", "pymodbus"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", "?")
    return {
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "cpu": cpu,
        "python": platform.python_version(),
        **versions,
    }


def median_rate(fn: Callable[[], Any], items: int, *, repeats: int = 5, warmup: int = 1) -> float:
    """Items per second of `fn()` (which processes `items` items), median of `repeats` runs."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        rates.append(items / dt)
    return statistics.median(rates)


def report(name: str, figures: dict[str, Any], *, notes: str = "") -> Path:
    """Print `figures` as a table and write them with the machine to bench/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": figures,
        "notes": notes,
    }
    width = max((len(k) for k in figures), default=10)
    print(f"== {name} ==")
    for k, v in figures.items():
        shown = f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
        print(f"  {k:<{width}}  {shown}")
    m = doc["machine"]
    print(f"  machine: {m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}, Python {m['python']}")
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
