"""The recorded year's final balances against the replay rules' plain-Python reference.

`meterstream replay` wrote DIR/out/balances.csv from DIR's archive, readings and payments; the
reference (tests/reference_billing.py: the rules written from docs/billing.md, one event at a
time) computes the same file from the same texts. Equal means every meter's balance, charged,
paid and relay state are equal to the micro-yuan. Slow (the reference is plain Python) and
memory-hungry (the texts are held whole), hence its own process:

    python -m meterstream.benchsuite.replaycheck --repo R --dir DIR --tariffs T --out check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def check(inputs: Path, tariffs: Path) -> dict[str, object]:
    import reference_billing as ref

    from meterstream.pipeline.tariffs import load_tariffs

    t = time.perf_counter()
    spec = load_tariffs(tariffs)
    texts = [(inputs / f"{k}.csv").read_text() for k in ("archive", "readings", "payments")]
    names = tuple(str(inputs / f"{k}.csv") for k in ("archive", "readings", "payments"))
    want = ref.replay_files(spec, *texts, names)["balances.csv"].splitlines()  # type: ignore[arg-type]
    del texts
    got = (inputs / "out" / "balances.csv").read_text().splitlines()
    mismatched = [w for w, g in zip(want[1:], got[1:], strict=False) if w != g]
    return {
        "meters": len(want) - 1,
        "meters_in_replay": len(got) - 1,
        "balances_equal": want == got,
        "mismatched_meters": len(mismatched) + abs(len(want) - len(got)),
        "first_mismatch": mismatched[0] if mismatched else "",
        "reference_seconds": time.perf_counter() - t,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--tariffs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.repo / "tests"))
    args.out.write_text(json.dumps(check(args.dir, args.tariffs), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
