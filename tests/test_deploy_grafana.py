"""The Grafana provisioning (deploy/grafana): every panel's Flux query names only measurements,
fields and tags that the InfluxDB sink writes, so a schema change cannot silently empty a panel.

The schema is the sink's own (`influx.SCHEMA`); the first tests hold it to the line protocol the
builders really produce and to the KPI names the worker really writes, the last ones hold every
query to it. Grafana and InfluxDB 2 cannot run here (DESIGN.md): the queries are parsed, not run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_influx import MS, make_batch
from test_pipeline_worker import ARCHIVE, T0, TARIFFS, batch

from meterstream.collectors.batch import OUTCOME_OK, CollectorEvent
from meterstream.collectors.commands import Command, CommandResult
from meterstream.pipeline.influx import (
    KPI_FIELDS,
    SCHEMA,
    BatchMeta,
    balance_lines,
    command_line,
    kpi_line,
    link_line,
    reading_lines,
)
from meterstream.pipeline.worker import WorkerCore

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DS_UID = "meterstream-influx"
#: columns every Flux table has (not the sink's names)
FLUX_COLUMNS = {"_time", "_value", "_field", "_measurement", "_start", "_stop"}


# --- line protocol, parsed back -------------------------------------------------------------

def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside quotes and backslash escapes."""
    out, cur, quoted, i = [], "", False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur += text[i:i + 2]
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    out.append(cur)
    return out


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """measurement, tags, fields -> "int" | "string" of one line of line protocol."""
    series, fields, _ts = _split(line, " ")
    measurement, *tags = _split(series, ",")
    tag = dict(t.split("=", 1) for t in tags)
    kinds = {}
    for f in _split(fields, ","):
        k, v = f.split("=", 1)
        assert v.startswith('"') or re.fullmatch(r"-?\d+i", v), f"{line}: {f} is not int/string"
        kinds[k] = "string" if v.startswith('"') else "int"
    return measurement, tag, kinds


class Recorder:
    """Stands in for the InfluxSink in the worker: formats with the sink's own builders."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_batch(self, b: Any, meta: BatchMeta) -> int:
        self.lines += reading_lines(b, meta)
        return len(b)

    def write_kpi(self, ts_ns: int, values: Any, **kw: Any) -> int:
        line = kpi_line(ts_ns, values, **kw)
        if line:
            self.lines.append(line)
        return int(line is not None)

    def write_balances(self, *args: Any) -> int:
        lines = balance_lines(*args)
        self.lines += lines
        return len(lines)

    def write_command(self, result: CommandResult, **kw: Any) -> int:
        self.lines.append(command_line(result, **kw))
        return 1

    def write_link(self, event: CollectorEvent, area: str) -> int:
        line = link_line(event, area)
        if line:
            self.lines.append(line)
        return int(line is not None)


def sink_lines() -> list[str]:
    """Lines of every builder, with every optional field present somewhere."""
    t0 = 1_700_000_000 * 10**9
    b = make_batch("T-1", t0, 14)
    lines = reading_lines(b, BatchMeta("AREA-1", np.array([0, 1] + [2] * 12, np.int8)))
    lines += balance_lines("T-1", "AREA-1", np.array([330010010000, 330010010001]),
                           np.array([-5, 7], np.int64), np.array([1, 0], np.int8), t0, 1)
    lines.append(command_line(CommandResult(
        Command("330010010001", "trip", reason="arrears"), "T-1", outcome="refused",
        sent_ns=t0, done_ns=t0 + 2_000 * MS, status=0x10, attempts=1, readbacks=1,
        detail="keep-power in force")))
    lines.append(link_line(CollectorEvent("down", "T-1", t0, "closed"), "AREA-1") or "")
    lines.append(kpi_line(t0, {k: 1 for k in KPI_FIELDS}, area="AREA-1") or "")
    lines.append(kpi_line(t0, {"success_rate_bp": 9900}, meter_class=0) or "")
    lines.append(kpi_line(t0, {"success_rate_bp": 9900}) or "")
    return lines


def test_the_schema_is_what_the_builders_write() -> None:
    seen: dict[str, tuple[set[str], dict[str, str]]] = {}
    for line in sink_lines():
        m, tags, fields = parse_line(line)
        assert m in SCHEMA, line
        assert set(tags) <= set(SCHEMA[m].tags), line
        for k, kind in fields.items():
            assert SCHEMA[m].fields.get(k) == kind, f"{line}: field {k} ({kind})"
        got = seen.setdefault(m, (set(), {}))
        got[0].update(tags)
        got[1].update(fields)
    for m, spec in SCHEMA.items():  # nothing in the schema that no builder writes
        assert seen[m][0] == set(spec.tags), m
        assert seen[m][1] == dict(spec.fields), m


def test_the_sink_refuses_names_outside_the_schema() -> None:
    with pytest.raises(ValueError, match="not in the kpi schema"):
        kpi_line(1, {"success_rate": 9900})
    with pytest.raises(ValueError, match="not in the link schema"):
        from meterstream.pipeline.influx import _series

        _series("link", {"terminal": "T", "meter": "330010010001"})


def worker_kpi_fields() -> set[str]:
    """The KPI names in the worker's write_kpi calls (its source, read with ast: every name it
    can write, whether or not a short scenario produces it)."""
    import ast

    import meterstream.pipeline.worker as w

    names: set[str] = set()
    for fn in ast.walk(ast.parse(Path(w.__file__).read_text())):
        if not isinstance(fn, ast.FunctionDef):
            continue
        assigned = {t.id: node.value for node in ast.walk(fn) if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "write_kpi"):
                for arg in node.args:  # a dict literal, or a name bound to one
                    arg = assigned.get(arg.id, arg) if isinstance(arg, ast.Name) else arg
                    if isinstance(arg, ast.Dict):
                        names |= {k.value for k in arg.keys if isinstance(k, ast.Constant)}
    return names


def test_what_the_worker_writes_is_in_the_schema(tmp_path: Path) -> None:
    """A link event, batches, a command result and a KPI snapshot of a real WorkerCore,
    formatted by the sink's builders."""
    (tmp_path / "a.csv").write_text(ARCHIVE)
    (tmp_path / "t.toml").write_text(TARIFFS)
    rec = Recorder()
    clock = [T0]
    core = WorkerCore(tmp_path / "a.csv", tmp_path / "t.toml", now=lambda: clock[0],
                      cycle_s=60.0, influx=rec)
    t = clock[0] = T0 + 60 * 10**9
    core.on_link("T1", {"kind": "up"})
    core.on_batch(batch("T1", t, [(330010010001, t, 100_00, OUTCOME_OK)]))
    t = clock[0] = T0 + 3600 * 10**9
    out = core.on_batch(batch("T1", t, [(330010010001, t, 103_50, OUTCOME_OK)]))  # in arrears
    (trip,) = [json.loads(o.value) for o in out if o.topic.endswith(".commands")]
    core.on_result("T1", {"id": trip["id"], "meter": trip["meter"], "action": trip["action"],
                          "outcome": "confirmed", "detail": "ok", "attempts": 1, "readbacks": 1,
                          "sent": "2024-06-01T01:00:01+00:00", "done": "2024-06-01T01:00:03+00:00",
                          "status": {"word": "0050"}})
    core.kpi_snapshot()
    written: dict[str, set[str]] = {}
    for line in rec.lines:
        m, tags, fields = parse_line(line)
        assert set(tags) <= set(SCHEMA[m].tags) and set(fields) <= set(SCHEMA[m].fields), line
        written.setdefault(m, set()).update(fields)
    assert set(written) == set(SCHEMA)  # every measurement of the schema has a writer
    assert {"success_rate_bp", "online", "in_arrears"} <= written["kpi"] <= worker_kpi_fields()
    assert worker_kpi_fields() <= set(KPI_FIELDS)


# --- the queries ------------------------------------------------------------------------------

def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in doc.get("panels", []):
        out.append(p)
        out += p.get("panels", [])  # collapsed rows
    return out


def queries() -> list[tuple[str, str]]:
    """(where, Flux) of every panel target and every query variable."""
    got = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        for p in panels(doc):
            for t in p.get("targets", []):
                got.append((f"{path.name}: panel {p['title']!r}", t["query"]))
        for v in doc.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                got.append((f"{path.name}: variable {v['name']}", v["query"]))
    return got


def check_flux(query: str) -> list[str]:
    """What in `query` the schema does not have (empty: every name is the sink's)."""
    problems = []
    measurements = re.findall(r'r\._measurement\s*==\s*"([^"]*)"', query)
    if not measurements:
        problems.append("no r._measurement filter")
    unknown = [m for m in measurements if m not in SCHEMA]
    problems += [f"measurement {m!r} is not written by the sink" for m in unknown]
    specs = [SCHEMA[m] for m in measurements if m in SCHEMA]
    tags = {t for s in specs for t in s.tags}
    fields = {f for s in specs for f in s.fields}
    if re.search(r"_field\s*(=~|!=)", query):
        problems.append("select fields with == only (so they can be checked)")
    for f in re.findall(r'r\._field\s*==\s*"([^"]*)"', query):
        if f not in fields:
            problems.append(f"field {f!r} is not in {measurements}")
    derived = set(re.findall(r"\{\s*r\s+with\s+(\w+)\s*:", query))
    names = set(re.findall(r"\br\.(\w+)", query)) | set(re.findall(r'\br\["(\w+)"\]', query))
    for lst in re.findall(r"(?:columns|rowKey|columnKey)\s*:\s*\[([^\]]*)\]", query):
        names |= set(re.findall(r'"([^"]*)"', lst))
    names |= set(re.findall(r'(?:column|valueColumn|tag)\s*:\s*"([^"]*)"', query))
    for n in sorted(names - FLUX_COLUMNS - derived):
        if n not in tags and n not in fields:
            problems.append(f"column {n!r} is neither a tag nor a field of {measurements}")
    for n in re.findall(r'\btag\s*:\s*"([^"]*)"', query):
        if n not in tags:
            problems.append(f"tag {n!r} is not a tag of {measurements}")
    if "v.defaultBucket" not in query:
        problems.append("read the bucket as v.defaultBucket (the data source's)")
    return problems


def test_the_checker_catches_a_wrong_name() -> None:
    ok = ('from(bucket: v.defaultBucket) |> range(start: -1h) |> filter(fn: (r) => '
          'r._measurement == "kpi" and r._field == "success_rate_bp" and exists r.class)')
    assert check_flux(ok) == []
    assert check_flux(ok.replace("success_rate_bp", "success_bp"))
    assert check_flux(ok.replace('"kpi"', '"kpis"'))
    assert check_flux(ok.replace("r.class", "r.meter_class"))
    assert check_flux(ok + ' |> group(columns: ["meter_class"])')
    assert check_flux(ok.replace('r._field == "success_rate_bp"', 'r._field =~ /rate/'))


def test_there_are_the_three_dashboards() -> None:
    uids = {json.loads(p.read_text())["uid"] for p in DASHBOARDS}
    assert uids == {"meterstream-collection", "meterstream-cost-control", "meterstream-terminals"}


@pytest.mark.parametrize("where,query", queries(), ids=lambda v: v if len(v) < 60 else None)
def test_every_query_names_only_what_the_sink_writes(where: str, query: str) -> None:
    assert check_flux(query) == [], where


def test_kpi_panels_read_fields_the_worker_writes() -> None:
    """A KPI field in the schema that the worker never writes would also leave a panel empty."""
    written = worker_kpi_fields()
    for where, query in queries():
        if re.search(r'r\._measurement\s*==\s*"kpi"', query):
            for f in re.findall(r'r\._field\s*==\s*"([^"]*)"', query):
                assert f in written, f"{where}: kpi field {f!r} is never written by the worker"


def test_panels_use_the_provisioned_data_source() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "influxdb.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == DS_UID and source["type"] == "influxdb"
    assert source["jsonData"]["version"] == "Flux"
    for key in ("organization", "defaultBucket"):
        assert source["jsonData"][key].startswith("$"), key  # from the environment
    assert source["secureJsonData"]["token"].startswith("$")
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        ids = [p["id"] for p in panels(doc)]
        assert len(ids) == len(set(ids)), path.name
        for p in panels(doc):
            if p.get("type") == "row":
                continue
            assert p["datasource"]["uid"] == DS_UID, (path.name, p["title"])
            assert p["targets"], (path.name, p["title"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == DS_UID
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "meterstream.yml")
                          .read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
