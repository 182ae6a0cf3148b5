"""Payment-to-reconnection latency with a share of remote-control commands lost in the field.

Runs bench/bench_pipeline.py's latency part (field, KafkaCollector and worker, each in its own
process, on one embedded broker) as it is, with two additions made from outside, because that
script is not ours to change: the field process drops each 1CH (remote-control) request with
probability `loss` before a meter hears it (no reply, the relay does not move: the collector's
timeout and retries, then the worker's command book, must recover), and the latencies of every
payment are kept (the script reports only their percentiles). One process per loss level:

    python -m meterstream.benchsuite.latency --loss 0.05 --payments 20 --out result.json

Never imported by the package at large; the suite runs it as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The field process's count of dropped commands goes here (one line per drop).
LOST_FILE_ENV = "METERSTREAM_BENCH_LOST_FILE"
_LOSS_KEY = "_bench_command_loss"


def lossy_field_main(doc: dict[str, Any], archive: str, pipe: Any) -> None:
    """bench_pipeline.field_main, in a field whose 1CH requests are lost at doc's rate."""
    import bench.bench_pipeline as bp
    from meterfield.serving import Dlt645Port

    loss = float(doc.pop(_LOSS_KEY, 0.0))
    rng = random.Random(0x1C)
    lost_file = os.environ.get(LOST_FILE_ENV)
    handle = Dlt645Port.handle

    def lossy(self: Any, frame: Any) -> bytes | None:
        if frame.control == 0x1C and rng.random() < loss:  # lost on its way to the meter
            if lost_file:
                with open(lost_file, "a") as fh:
                    fh.write(f"{getattr(frame, 'address', '?')}\n")
            return None
        return handle(self, frame)

    Dlt645Port.handle = lossy  # type: ignore[method-assign]
    bp.field_main(doc, archive, pipe)


def run(loss: float, payments: int, gap_s: float, workdir: Path) -> dict[str, Any]:
    import bench.bench_pipeline as bp

    lost_file = workdir / "lost-commands.txt"
    lost_file.write_text("")
    os.environ[LOST_FILE_ENV] = str(lost_file)
    make_doc = bp.latency_field_doc

    def doc_with_loss(port: int, relay_delay_s: float) -> dict[str, Any]:
        return {**make_doc(port, relay_delay_s), _LOSS_KEY: loss}

    recorded: list[list[float]] = []
    pct = bp._pct

    def keeping(xs: list[float], q: float) -> float:
        recorded.append(list(xs))
        return pct(xs, q)

    bp.latency_field_doc = doc_with_loss  # type: ignore[assignment]
    bp.field_main = lossy_field_main
    bp._pct = keeping
    # the field's relay delay and the collector's read-back interval as the demo ships them
    import tomllib

    config = Path(bp.__file__).resolve().parents[1] / "config"
    relay_delay_s = tomllib.loads((config / "field-demo.toml").read_text())["meters"][
        "relay_delay_s"]
    confirm_poll_s = tomllib.loads((config / "collector.toml").read_text())["control"][
        "confirm_poll_s"]
    out = bp.latency(workdir, payments, gap_s, relay_delay_s, confirm_poll_s)
    # the lists behind the script's percentiles: the one whose median, p99 and max they are
    samples: dict[str, list[float]] = {}
    for name in ("command", "confirmed", "relay_closed"):
        key = f"latency_pay_to_{name}"
        if f"{key}_p50_s" not in out:
            samples[name] = []
            continue
        for xs in recorded:
            if (xs and statistics.median(xs) == out[f"{key}_p50_s"]
                    and pct(xs, 0.99) == out[f"{key}_p99_s"] and max(xs) == out[f"{key}_max_s"]):
                samples[name] = sorted(xs)
                break
    out["loss"] = loss
    out["commands_lost_in_field"] = sum(1 for _ in lost_file.read_text().splitlines())
    out["samples"] = samples
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="the checkout (holds bench/)")
    ap.add_argument("--loss", type=float, required=True, help="share of 1CH requests lost")
    ap.add_argument("--payments", type=int, default=20)
    ap.add_argument("--payment-gap-s", type=float, default=1.0)
    ap.add_argument("--out", type=Path, required=True, help="the result JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.repo))
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as d:
        out = run(args.loss, args.payments, args.payment_gap_s, Path(d))
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
