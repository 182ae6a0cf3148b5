"""The tamper-evident audit trail (meterstream.audit): the hash chain, the writer's batches and
restarts, `meterstream audit verify` as a real process, and a worker on a real broker writing
its command transitions (manual ones with who and why) and payments into the trail."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meterstream.audit import (
    GENESIS_PREV,
    AuditWriter,
    canonical,
    is_audited,
    read_records,
    verify,
)
from meterstream.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def rec(k: int) -> dict[str, object]:
    return {"type": "command_audit", "command_id": f"C{k}", "meter": "330010010001",
            "from_state": "issued", "to_state": "sent", "who": "operator:li", "cause": "arrears",
            "attempt": 1, "note": "电费 欠费"}  # non-ASCII survives canonical form


def trail(path: Path, n: int = 10) -> list[bytes]:
    with AuditWriter(path, now=lambda: 1_700_000_000_000_000_000) as w:
        for k in range(n):
            w.append(rec(k))
    return path.read_bytes().splitlines(keepends=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterstream", *args], check=False,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


# --- the chain --------------------------------------------------------------------------------


def test_a_new_trail_starts_with_genesis_and_every_record_links_to_the_one_before(
        tmp_path: Path) -> None:
    lines = trail(tmp_path / "a.jsonl", 5)
    assert len(lines) == 7  # genesis, trail_opened, 5 records
    docs = [json.loads(x) for x in lines]
    assert docs[0]["record"]["type"] == "genesis" and docs[0]["prev"] == GENESIS_PREV
    assert docs[1]["record"]["type"] == "trail_opened"
    import hashlib
    for k in range(1, len(lines)):
        assert docs[k]["prev"] == hashlib.sha256(lines[k - 1].rstrip(b"\n")).hexdigest()
        assert docs[k]["seq"] == k
        assert canonical(docs[k]) == lines[k].rstrip(b"\n")
    v = verify(tmp_path / "a.jsonl")
    assert v.ok and v.records == 7
    assert v.head == hashlib.sha256(lines[-1].rstrip(b"\n")).hexdigest()
    assert [r.get("command_id") for r in read_records(tmp_path / "a.jsonl")][2:] == [
        f"C{k}" for k in range(5)]


def test_a_restart_resumes_the_chain_from_the_last_record(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    trail(p, 3)
    with AuditWriter(p) as w:
        w.append(rec(99))
    v = verify(p)
    assert v.ok and v.records == 2 + 3 + 2
    kinds = [r["type"] for r in read_records(p)]
    assert kinds.count("genesis") == 1 and kinds.count("trail_opened") == 2


def test_records_are_written_in_batches_and_synced(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    w = AuditWriter(p, batch=4)
    size0 = p.stat().st_size
    for k in range(3):
        w.append(rec(k))
    assert p.stat().st_size == size0  # buffered
    w.append(rec(3))
    assert len(p.read_bytes().splitlines()) == 2 + 4  # the batch went out by itself
    w.append(rec(4))
    w.sync()
    assert len(p.read_bytes().splitlines()) == 2 + 5
    w.close()
    assert verify(p).ok


def test_one_writer_per_file(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    with AuditWriter(p), pytest.raises(UserError, match="another process"):
        AuditWriter(p)
    with AuditWriter(p):  # the lock goes with the first writer
        pass


def test_the_writer_refuses_a_trail_whose_last_record_is_damaged(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    lines = trail(p, 3)
    p.write_bytes(b"".join(lines)[:-7])
    with pytest.raises(UserError, match="incomplete"):
        AuditWriter(p)
    p.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b"C2", b"C9"))
    with pytest.raises(UserError, match="damaged"):
        AuditWriter(p)
    assert p.read_bytes() == b"".join(lines[:-1]) + lines[-1].replace(b"C2", b"C9")  # untouched


def _broken(p: Path, data: bytes) -> tuple[int | None, str | None]:
    p.write_bytes(data)
    v = verify(p)
    assert not v.ok
    return v.line, v.problem


@pytest.mark.parametrize("k", [0, 1, 4, 11])
def test_a_changed_byte_is_found_at_its_line(tmp_path: Path, k: int) -> None:
    lines = trail(tmp_path / "a.jsonl")
    for old, new in ((b'"C', b'"X'), (b'"seq":', b'"seq" :'), (b'"prev":"', b'"prev":"f')):
        if old not in lines[k]:
            continue
        bad = [*lines]
        bad[k] = lines[k].replace(old, new, 1)
        line, _ = _broken(tmp_path / "b.jsonl", b"".join(bad))
        assert line == k + 1, (old, new)
    # a forger who also recomputes the record's own hash still breaks the next link (or, on
    # the last line, the head noted earlier)
    doc = json.loads(lines[k])
    doc["record"]["cause"] = "forged"
    own = {x: doc[x] for x in ("seq", "prev", "record")}
    import hashlib
    doc["hash"] = hashlib.sha256(canonical(own)).hexdigest()
    bad = [*lines]
    bad[k] = canonical(doc) + b"\n"
    if k == len(lines) - 1:
        (tmp_path / "c.jsonl").write_bytes(b"".join(bad))
        assert verify(tmp_path / "c.jsonl").ok
        head = verify(tmp_path / "a.jsonl").head
        v = verify(tmp_path / "c.jsonl", head=head)
        assert not v.ok and v.line == len(lines) + 1
        return
    line, problem = _broken(tmp_path / "c.jsonl", b"".join(bad))
    assert line == k + 2 and "prev" in (problem or "")


@pytest.mark.parametrize("k", [0, 1, 5, 10])
def test_a_deleted_line_is_found_where_the_gap_is(tmp_path: Path, k: int) -> None:
    lines = trail(tmp_path / "a.jsonl")
    bad = lines[:k] + lines[k + 1:]
    line, problem = _broken(tmp_path / "b.jsonl", b"".join(bad))
    assert line == k + 1
    assert "prev" in (problem or "")


@pytest.mark.parametrize("k", [0, 3, 10])
def test_two_lines_swapped_are_found_at_the_first(tmp_path: Path, k: int) -> None:
    lines = trail(tmp_path / "a.jsonl")
    bad = [*lines]
    bad[k], bad[k + 1] = bad[k + 1], bad[k]
    line, _ = _broken(tmp_path / "b.jsonl", b"".join(bad))
    assert line == k + 1


def test_a_cut_inside_a_line_is_found_at_that_line(tmp_path: Path) -> None:
    lines = trail(tmp_path / "a.jsonl")
    data = b"".join(lines)
    for cut in (len(data) - 1, len(data) - 40, len(data) - len(lines[-1]) - 5):
        line, problem = _broken(tmp_path / "b.jsonl", data[:cut])
        expect = len(lines) if cut > len(data) - len(lines[-1]) else len(lines) - 1
        assert line == expect and "incomplete" in (problem or "")


def test_records_cut_off_at_a_line_boundary_are_found_with_a_noted_head(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    trail(p)
    head = verify(p).head
    data = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(b"".join(data[:-3]))
    assert verify(p).ok  # a chain alone cannot see it
    v = verify(p, head=head)
    assert not v.ok and v.line == len(data) - 2 and "cut off the end" in (v.problem or "")
    p.write_bytes(b"".join(data))
    assert verify(p, head=head).ok


def test_a_trail_must_begin_with_genesis_and_may_not_be_empty(tmp_path: Path) -> None:
    lines = trail(tmp_path / "a.jsonl")
    line, problem = _broken(tmp_path / "b.jsonl", b"")
    assert line == 1 and "empty" in (problem or "")
    line, _ = _broken(tmp_path / "c.jsonl", b"".join(lines[1:]))
    assert line == 1


def test_only_audit_documents_are_audited() -> None:
    assert is_audited({"type": "command_audit", "to_state": "sent"})
    assert is_audited({"type": "event", "kind": "payment_applied"})
    assert not is_audited({"type": "event", "kind": "rollover"})
    assert not is_audited({"type": "work_order"})


# --- the command ------------------------------------------------------------------------------


def test_verify_command_ok_broken_and_mistakes(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    lines = trail(p)
    r = cli("audit", "verify", str(p))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{p}: OK, 12 records, head ") and r.stderr == ""
    head = r.stdout.split()[-1]
    bad = [*lines]
    bad[6] = bad[6].replace(b"C4", b"C5")
    p.write_bytes(b"".join(bad))
    r = cli("audit", "verify", str(p))
    assert r.returncode == 1
    assert r.stdout.startswith(f"{p}:7: broken: ") and "hash does not match" in r.stdout
    p.write_bytes(b"".join(lines[:-1]))
    r = cli("audit", "verify", str(p), "--head", head)
    assert r.returncode == 1 and f"{p}:12: broken:" in r.stdout
    r = cli("audit", "verify", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing.jsonl" in r.stderr
    r = cli("audit", "verify", str(p), "--head", "xyz")
    assert r.returncode == 2 and "--head" in r.stderr


# --- a worker writes it -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_writes_commands_manual_commands_and_payments_into_the_trail(
        tmp_path: Path) -> None:
    from aiokafka import AIOKafkaProducer
    from test_pipeline_app import PARTITIONS, all_topics, until
    from test_pipeline_worker import ARCHIVE, T0, TARIFFS, H, batch

    from meterstream.collectors.batch import OUTCOME_OK
    from meterstream.pipeline import topics
    from meterstream.pipeline.app import WorkerApp
    from meterstream.pipeline.broker import EmbeddedBroker

    app_id = "w-audit"
    audit = tmp_path / "audit" / "trail.jsonl"

    def with_audit(tmp: Path, bootstrap: str) -> WorkerApp:
        from meterstream.pipeline.worker import WorkerCore

        (tmp / "a.csv").write_text(ARCHIVE)
        (tmp / "t.toml").write_text(TARIFFS)
        core = WorkerCore(tmp / "a.csv", tmp / "t.toml", now=lambda: T0 + 3 * H)
        return WorkerApp(core, bootstrap, datadir=tmp / "data", partitions=PARTITIONS,
                         app_id=app_id, producer_max_batch_size=1, audit_path=audit)

    async def scenario() -> None:
        async with EmbeddedBroker(topics=all_topics(app_id), partitions=PARTITIONS) as broker:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
            await producer.start()

            async def send(topic: str, key: str, value: bytes) -> None:
                await producer.send_and_wait(topic, key=key.encode(), value=value)

            w = with_audit(tmp_path, broker.bootstrap)
            await w.start()
            try:
                m = 330010010001
                await send(topics.LINKS.name, "T1", json.dumps({"kind": "up"}).encode())
                await send(topics.READINGS.name, "T1",
                           batch("T1", T0, [(m, T0, 100_00, OUTCOME_OK)]))
                await send(topics.READINGS.name, "T1",
                           batch("T1", T0 + H, [(m, T0 + H, 103_50, OUTCOME_OK)]))
                await until(lambda: len(w.commands_out) == 1)
                await w.manual("T1", "330010010002", "trip", "operator:wang", "meter tampering")
                await until(lambda: any(e.get("who") == "operator:wang" for e in w.events))
            finally:
                await w.stop()
            (tmp_path / "second").mkdir()
            w2 = with_audit(tmp_path / "second", broker.bootstrap)
            await w2.start()
            try:
                pay = {"payment_id": "P1", "meter": "330010010001",
                       "amount_micro_yuan": 10_000_000, "status": "settled",
                       "channel": "alipay", "ts_ns": T0 + 2 * H}
                await send(topics.PAYMENTS.name, "T1", json.dumps(pay).encode())
                await until(lambda: any(e.get("kind") == "payment_applied" for e in w2.events))
            finally:
                await w2.stop()
            await producer.stop()

    asyncio.run(asyncio.wait_for(scenario(), 180))
    r = cli("audit", "verify", str(audit))
    assert r.returncode == 0, r.stdout + r.stderr
    records = list(read_records(audit))
    kinds = [r.get("type") for r in records]
    assert kinds[0] == "genesis" and kinds.count("trail_opened") == 2
    cmds = [r for r in records if r.get("type") == "command_audit"]
    assert any(r["to_state"] == "issued" and r["action"] == "trip" for r in cmds)
    manual = [r for r in cmds if r["who"] == "operator:wang"]
    assert manual and manual[0]["cause"] == "meter tampering"
    pays = [r for r in records if r.get("kind") == "payment_applied"]
    assert len(pays) == 1 and pays[0]["payment_id"] == "P1"
    # what the trail holds is exactly what went out as audit documents, in order
    assert all(is_audited(r) for r in records if r.get("type") not in ("genesis",
                                                                         "trail_opened"))
    assert os.stat(audit).st_mode & 0o007 == 0  # created 0640: nothing for others


def test_audit_path_in_the_worker_config_is_relative_to_the_file(tmp_path: Path) -> None:
    from meterstream.pipeline.config import load_worker_config

    (tmp_path / "etc").mkdir()
    conf = tmp_path / "etc" / "worker.toml"
    conf.write_text('[worker]\naudit_path = "../var/audit.jsonl"\n')
    assert load_worker_config(conf).audit_path == tmp_path / "etc" / ".." / "var" / "audit.jsonl"
    conf.write_text('[worker]\naudit_path = "/srv/audit.jsonl"\n')
    assert load_worker_config(conf).audit_path == Path("/srv/audit.jsonl")
    conf.write_text("[worker]\n")
    assert load_worker_config(conf).audit_path is None
