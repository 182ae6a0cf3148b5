"""`meterstream bench`: the suite writes its JSON, markdown and PNG plots, and they agree.

Runs the real command (a subprocess, as an operator runs it) with --quick on the two cheap
parts (codec in-process, kernels through bench/bench_billing.py subprocesses) into a temp dir,
then checks the documents against each other: every figure in the markdown is the JSON's
median of its runs, formatted; every ratio is the median of ratios computed within each run;
the PNGs are real PNG images. Nothing here looks at how fast anything was.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from meterstream.benchsuite.report import fmt
from meterstream.pipeline.cli import main

EXE = Path(sys.executable).with_name("meterstream")
PNG = b"\x89PNG\r\n\x1a\n"


def table_rows(md: str, title: str) -> dict[str, tuple[str, str]]:
    """label -> (median cell, runs cell) of the table under the heading `title`."""
    section = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("figure", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


@pytest.mark.slow
def test_quick_suite_writes_consistent_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    p = subprocess.run([str(EXE), "bench", "--quick", "--part", "codec", "kernels", "--runs",
                        "2", "--out", str(out), "--no-progress"],
                       check=False, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    (json_path,) = out.glob("*.json")
    date = json_path.stem
    md = (out / f"{date}.md").read_text()
    doc = json.loads(json_path.read_text())
    assert set(doc["parts"]) == {"codec", "kernels"}
    m = doc["machine"]
    assert m["cores"] >= 1 and m["memory_gib"] > 0 and m["cpu"]
    assert f"{m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}" in md

    titles = {"codec": "1. DL/T 645 codec", "kernels": "2. Billing kernel against fleet size"}
    for name, part in doc["parts"].items():
        assert "error" not in part, part.get("error")
        assert len(part["runs"]) == 2  # --runs 2 wins over --quick's 1
        rows = table_rows(md, titles[name])
        assert len(rows) == len(part["table"]) >= 3
        for row in part["table"]:
            values = [r[row["key"]] for r in part["runs"]]
            assert row["median"] == statistics.median(values)
            assert rows[row["label"]] == (fmt(row["median"], row["kind"]),
                                          " / ".join(fmt(v, row["kind"]) for v in values))

    codec = doc["parts"]["codec"]
    for r in codec["runs"]:  # the ratio is the run's own subject over its own baseline
        assert r["decode_to_slice"] == r["decode_frames_per_s"] / r["slice_baseline_frames_per_s"]
        assert 0 < r["decode_to_slice"] < 1
    kernels = doc["parts"]["kernels"]
    sizes = kernels["params"]["sizes"]
    assert sizes == [10_000, 100_000]
    for r in kernels["runs"]:
        for n in sizes:
            assert r[f"{n}_kernel_to_baseline"] == (r[f"{n}_kernel_readings_per_s"]
                                                    / r[f"{n}_baseline_readings_per_s"])
            assert r[f"{n}_kernel_readings_per_s"] > r[f"{n}_reference_readings_per_s"] > 0

    assert set(doc["plots"]) == {"kernels", "ratios"}
    for name in doc["plots"].values():
        assert f"]({name})" in md
        assert (out / name).read_bytes()[:8] == PNG
    assert "Needs the pipeline and collectors parts" in md  # no scale without them

    # a part run again replaces its own figures and keeps the others of the day
    p = subprocess.run([str(EXE), "bench", "--quick", "--part", "codec", "--out", str(out),
                        "--no-progress"], check=False, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    again = json.loads(json_path.read_text())
    assert len(again["parts"]["codec"]["runs"]) == 1
    assert again["parts"]["kernels"] == kernels


@pytest.mark.parametrize(("argv", "needle"), [
    (["--runs", "0"], "--runs: 0: give at least 1"),
    (["--part", "nonsense"], "--part: 'nonsense' is not a part"),
    (["--data", "/nonexistent/lcl.csv.gz"], "--data /nonexistent/lcl.csv.gz: file not found"),
    (["--payments", "0"], "--payments: 0: give at least 1"),
])
def test_a_bad_argument_is_one_line_and_status_2(argv: list[str], needle: str,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.json"))


def test_the_markdown_shows_what_the_json_holds() -> None:
    from meterstream.benchsuite.report import markdown, scale, summarise

    part = {"runs": [{"reads_per_s": 90_000.0, "reads_per_cpu_s": 100_000.0,
                      "baseline_reads_per_s": 120_000.0, "collector_to_baseline_wall": 0.75,
                      "terminals_held": 10_000, "meters_held": 1_000_000,
                      "rss_mib": 640.0, "rss_floor_mib": 45.0, "rss_kib_per_meter": 0.6},
                     {"reads_per_s": 94_000.0, "reads_per_cpu_s": 96_000.0,
                      "baseline_reads_per_s": 125_000.0, "collector_to_baseline_wall": 0.752,
                      "terminals_held": 10_000, "meters_held": 1_000_000,
                      "rss_mib": 636.0, "rss_floor_mib": 45.0, "rss_kib_per_meter": 0.6}],
            "when": "now", "seconds": 1.0, "notes": "n"}
    summarise("collectors", part)
    assert part["median"]["reads_per_s"] == 92_000.0
    assert part["median"]["collector_to_baseline_wall"] == pytest.approx(0.751)
    pipe = {"runs": [{"worker_readings_per_s": 800_000.0, "naive_readings_per_s": 5_000.0,
                      "worker_to_naive": 160.0}], "when": "now", "seconds": 1.0, "notes": "n"}
    summarise("pipeline", pipe)
    s = scale({"collectors": part, "pipeline": pipe})
    assert s is not None
    # 800,000 readings/s x 900 s x 0.5 = 360 M meters; 30 M of them: 1 worker (+1 spare)
    assert s["worker_meters"] == 360_000_000 and s["workers_with_spare"] == 2
    # collector: CPU 98,000 x 900 / 2 x 0.5 = 22.05 M; held 10,000 x 40 = 400,000 -> 75 (+1)
    assert s["collector_cpu_meters"] == pytest.approx(22_050_000)
    assert s["collector_meters"] == 400_000 and s["collectors_with_spare"] == 76
    doc = {"date": "2026-12-01", "command": "meterstream bench", "load_before": "0",
           "machine": {"cores": 2, "memory_gib": 23.5, "cpu": "X", "python": "3.11"},
           "parts": {"collectors": part, "pipeline": pipe}, "scale": s}
    md = markdown(doc, {})
    assert "| reads per second, one collector process | 92,000 | 90,000 / 94,000 |" in md
    assert "ceil(30,000,000 / 400,000) = 75, plus one spare: **76**" in md
