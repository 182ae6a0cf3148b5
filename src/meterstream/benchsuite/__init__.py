"""The benchmark suite behind `meterstream bench`: the bench/ scripts' measurements, run several
times, written as one JSON document and one markdown report with PNG plots.

The measuring code stays in bench/ (each script runnable on its own); this package calls it
(import, or a subprocess with the script's own size options) and never re-implements a
measurement. bench/ is not installed, so the suite runs from a checkout: the one this package
was installed from in editable mode (`pip install -e .`, as scripts/setup.sh does), or the one
$METERSTREAM_REPO names. It never asserts on a time; a part that fails is recorded as failed.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meterstream.errors import UserError

from .parts import PARTS, Context, PartFailed
from .report import markdown, plot_kernels, plot_latency, plot_ratios, scale, summarise

__all__ = ["PARTS", "repo_root", "run_suite"]


def repo_root() -> Path:
    """The checkout holding bench/: $METERSTREAM_REPO, else the one this package lives in."""
    env = os.environ.get("METERSTREAM_REPO")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3])  # src/meterstream/benchsuite
    for repo in candidates:
        if (repo / "bench" / "common.py").is_file():
            return repo
    where = "METERSTREAM_REPO" if env else str(candidates[-1])
    raise UserError("no bench/common.py there: meterstream bench runs from a checkout of the "
                    "project (install it with pip install -e, or set METERSTREAM_REPO to the "
                    "checkout)", where=where)


def _machine(repo: Path) -> dict[str, Any]:
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    import faust  # noqa: F401  (imported so that machine() reports its version)
    import numba  # noqa: F401
    import numpy  # noqa: F401

    from bench.common import machine

    return machine()


def run_suite(parts: list[str], *, runs: int, quick: bool, data: Path | None, out: Path | None,
              payments: int, progress: bool = True, command: str = "") -> tuple[Path, Path]:
    """Run `parts` (names of PARTS, in the suite's order) and write OUT/<date>.json and .md.

    A report of the same date already in OUT keeps the parts not run this time (so that one
    part can be measured again, or run on its own, into the day's report). Returns the paths.
    """
    repo = repo_root()
    out = out if out is not None else repo / "bench" / "results"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tmp").mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write there: {e.strerror}", where=f"--out {out}") from None
    date = datetime.now(UTC).date().isoformat()
    json_path, md_path = out / f"{date}.json", out / f"{date}.md"
    doc: dict[str, Any] = {"parts": {}}
    if json_path.exists():
        try:
            old = json.loads(json_path.read_text())
            if isinstance(old, dict) and isinstance(old.get("parts"), dict):
                doc["parts"] = old["parts"]
        except ValueError:
            pass  # not a suite report: written afresh
    doc.update(date=date, command=command or "meterstream bench", machine=_machine(repo),
               load_before=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    order = [p for p in PARTS if p in parts]

    from tqdm import tqdm

    bar = tqdm(total=len(order), desc="bench", unit="part", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    t_suite = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meterstream-bench-") as work:

        def step(what: str) -> None:
            bar.set_postfix_str(f"{what} [{time.monotonic() - t_suite:.0f} s]", refresh=True)

        ctx = Context(repo=repo, runs=runs, quick=quick, data=data, work=Path(work),
                      log=out / "tmp" / f"{date}.log", payments=payments, step=step)
        for name in order:
            step(name)
            t0 = time.monotonic()
            when = datetime.now(UTC).isoformat(timespec="seconds")
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            try:
                part = PARTS[name](ctx)
            except PartFailed as e:
                part = {"error": str(e), "runs": []}
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a measurement that broke: kept, and go on
                with open(ctx.log, "a") as log:
                    log.write(f"\n{name} failed:\n{traceback.format_exc()}")
                part = {"error": f"{type(e).__name__}: {e} (traceback in {ctx.log})", "runs": []}
            part.update(when=when, seconds=time.monotonic() - t0, quick=quick, load_before=load,
                        command=doc["command"])
            if "error" not in part:
                summarise(name, part)
            doc["parts"][name] = part
            bar.update(1)
            _write(doc, json_path, md_path, out, date)  # a part done is a part kept
    bar.close()
    return json_path, md_path


def _write(doc: dict[str, Any], json_path: Path, md_path: Path, out: Path, date: str) -> None:
    plots: dict[str, str] = {}
    parts = doc["parts"]
    if parts.get("kernels", {}).get("median"):
        plots["kernels"] = plot_kernels(parts["kernels"], out / f"{date}-kernels.png").name
    if any(parts.get("latency", {}).get("samples", {}).values()):
        plots["latency"] = plot_latency(parts["latency"], out / f"{date}-latency.png").name
    ratios = plot_ratios(parts, out / f"{date}-ratios.png")
    if ratios is not None:
        plots["ratios"] = ratios.name
    doc["scale"] = scale(parts)
    doc["plots"] = plots
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md_path.write_text(markdown(doc, plots))


def command_line(argv: list[str]) -> str:
    return "meterstream bench " + " ".join(shlex.quote(a) for a in argv)
