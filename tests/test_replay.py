"""`meterstream replay` end to end: exact outputs, bad rows, broken inputs, a real process, and
random files held equal to the plain-Python reference (parsing, ordering, rules, formats)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import reference_billing as ref
from billing_harness import Scenario, scenarios, tariff_toml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterfield.lcl import load_consumption
from meterstream.pipeline.cli import main
from meterstream.pipeline.tariffs import load_tariffs, parse_tariffs

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "tariffs-example.toml"
SLICE = REPO / "tests" / "data" / "lcl_slice.csv"
OUTPUTS = ("balances.csv", "commands.csv", "events.csv", "rejected.csv")


def replay(
    tmp: Path, archive: str, readings: str, payments: str, tariffs: str | Path = EXAMPLE
) -> tuple[int, dict[str, str]]:
    """Write the inputs, run `meterstream replay` in process; (exit status, output texts)."""
    paths = {}
    for name, text in (("archive", archive), ("readings", readings), ("payments", payments)):
        paths[name] = tmp / f"{name}.csv"
        paths[name].write_bytes(text.encode())
    if isinstance(tariffs, str):
        (tmp / "tariffs.toml").write_text(tariffs)
        tariffs = tmp / "tariffs.toml"
    out = tmp / "out"
    code = main(
        [
            "replay",
            "--archive",
            str(paths["archive"]),
            "--readings",
            str(paths["readings"]),
            "--payments",
            str(paths["payments"]),
            "--tariffs",
            str(tariffs),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    texts = {k: (out / k).read_text() for k in OUTPUTS if (out / k).exists()}
    return code, texts


def expected(
    tmp: Path, archive: str, readings: str, payments: str, tariffs: str | Path = EXAMPLE
) -> dict[str, str]:
    spec = load_tariffs(tariffs) if isinstance(tariffs, Path) else parse_tariffs(tariffs)
    names = (str(tmp / "archive.csv"), str(tmp / "readings.csv"), str(tmp / "payments.csv"))
    return ref.replay_files(spec, archive, readings, payments, names)


ARCHIVE = """meter,terminal,area,class,plan,protected,initial_balance,role
440100000001,TRM1,AREA1,lowvoltage,residential_tou,0,60.00,customer
440100000002,TRM1,AREA1,lowvoltage,residential_flat,1,1.00,customer
440100000009,TRM2,AREA1,public,transformer,0,0,supply
"""

# Friday 2013-01-04 (a working day after the New Year holidays) and the weekend after it.
READINGS = """ts,meter,total,t1,t2,t3,t4
2013-01-04T07:30:00,440100000001,1000.00,100.00,200.00,300.00,400.00
2013-01-04T07:30:00,440100000002,500.00,100,100,100,200
2013-01-04T07:30:00,440100000009,90000.00,0,0,0,0
2013-01-04T08:00:00,440100000001,1010.00,102.00,204.00,302.00,402.00
2013-01-04T08:00:00,440100000002,502.50,100,100,100,202.5
2013-01-04T08:00:00,440100000009,90012.00,0,0,0,0
2013-01-04T08:30:00,440100000001,1009.00,102.00,204.00,302.00,401.00
2013-01-04 09:00:00+08:00,440100000001,1210.00,102.00,404.00,302.00,402.00
2013-01-05T10:00:00,440100000001,1100.00,102.00,214.00,382.00,402.00
"""

PAYMENTS = """ts,payment_id,meter,amount,status,channel
2013-01-04T08:00:00,AP1,440100000001,10.00,settled,alipay
2013-01-04T08:00:00,AP1,440100000001,10.00,settled,alipay
2013-01-04T08:10:00,BW7,440100000002,50.00,pending,bank
2013-01-05T11:00:00,AP2,440100000001,100.00,settled,alipay
"""


def test_a_worked_example_gives_exact_outputs(tmp_path: Path) -> None:
    code, got = replay(tmp_path, ARCHIVE, READINGS, PAYMENTS)
    assert code == 0
    # 440100000001 (TOU, 60 yuan): AP1 pays 10 (its copy is a duplicate). 08:00: +2, +4, +2, +2
    #   kWh on t1..t4 = 200*8283 + 400*6283 + 200*5283 + 200*2883 = 5,803,000 micro-yuan (20 kW
    #   exactly: plausible; first tier block: no add-on). 08:30: total and t4 went back. 09:00:
    #   200 kWh in the hour since 08:00 (max 20 kW) is implausible. Saturday 10:00: +10 kWh t2,
    #   +80 kWh t3 = 1000*6283 + 8000*5283 = 48,547,000; 70 - 5.803 - 48.547 = 15.65 yuan, below
    #   both alerts. Then AP2 pays 100.
    # 440100000002 (flat 0.4883, protected, 1 yuan): +2.50 kWh = 250*4883 = 1,220,750 micro-yuan:
    #   -0.220750 is below the cut-off, but the meter is protected (its alerts were never armed).
    # 440100000009 is a supply meter: read, never billed.
    assert got["balances.csv"] == (
        "meter,balance,charged,paid,relay\n"
        "440100000001,115.650000,54.350000,110.000000,closed\n"
        "440100000002,-0.220750,1.220750,0.000000,closed\n"
        "440100000009,0.000000,0.000000,0.000000,closed\n"
    )
    assert got["events.csv"] == (
        "ts,meter,kind,detail\n"
        "2013-01-04T08:00:00+08:00,440100000001,duplicate_payment,AP1\n"
        "2013-01-04T08:00:00+08:00,440100000002,cutoff_held,protected\n"
        "2013-01-04T08:30:00+08:00,440100000001,backwards,total t4\n"
        "2013-01-04T09:00:00+08:00,440100000001,implausible,200.00 kWh in 3600 s\n"
        "2013-01-05T10:00:00+08:00,440100000001,alert1,15.650000\n"
        "2013-01-05T10:00:00+08:00,440100000001,alert2,15.650000\n"
    )
    assert got["commands.csv"] == "ts,meter,action,balance\n"
    assert got["rejected.csv"] == "file,line,reason\n"
    assert got == expected(tmp_path, ARCHIVE, READINGS, PAYMENTS)


def test_cutoff_and_reconnect_commands(tmp_path: Path) -> None:
    archive = "meter,terminal,area,class,plan,protected,initial_balance,role\n440100000001,T,A,lowvoltage,residential_flat,0,0.50,customer\n"
    readings = (
        "ts,meter,total,t1,t2,t3,t4\n"
        "2013-01-05T09:00:00,440100000001,0,0,0,0,0\n"  # Saturday: baseline
        "2013-01-05T09:30:00,440100000001,2,0,0,0,0\n"  # -0.4766 yuan on a Saturday: held
        "2013-01-07T08:30:00,440100000001,2,0,0,0,0\n"
    )  # Monday 08:30: cut off
    payments = (
        "ts,payment_id,meter,amount,status,channel\n"
        "2013-01-07T22:00:00,P1,440100000001,10.48,settled,wechat\n"
    )  # reconnect at night
    code, got = replay(tmp_path, archive, readings, payments)
    assert code == 0
    assert got["commands.csv"] == (
        "ts,meter,action,balance\n"
        "2013-01-07T08:30:00+08:00,440100000001,cutoff,-0.476600\n"
        "2013-01-07T22:00:00+08:00,440100000001,reconnect,10.003400\n"
    )
    assert "cutoff_held,outside_window" in got["events.csv"]
    assert got == expected(tmp_path, archive, readings, payments)


BAD_ARCHIVE = """meter,terminal,area,class,plan,protected,initial_balance,role,notes
440100000001,T1,A1,lowvoltage,residential_flat,0,10,customer,ok
4401000000012,T1,A1,lowvoltage,residential_flat,0,10,customer,13 digits
440100000001,T1,A1,lowvoltage,residential_flat,0,10,customer,again
440100000003,T1,A1,household,residential_flat,0,10,customer,class
440100000004,T1,A1,lowvoltage,gold,0,10,customer,plan
440100000005,T1,A1,lowvoltage,residential_flat,yes,10,customer,protected
440100000006,T1,A1,lowvoltage,residential_flat,0,ten,customer,initial
440100000007,T1,A1,lowvoltage,residential_flat,0,10,owner,role
440100000008,T1
"""

BAD_READINGS = """meter,ts,total,t1,t2,t3,t4
440100000001,2013-01-07T09:00:00,1.00,0,0,0,0
440100000001,2013-02-30T09:00:00,1.00,0,0,0,0
440100000001,yesterday,1.00,0,0,0,0
44010000001,2013-01-07T09:30:00,1.00,0,0,0,0
440100000099,2013-01-07T09:30:00,1.00,0,0,0,0
440100000001,2013-01-07T09:30:00,1.5e3,0,0,0,0
440100000001,2013-01-07T09:30:00,1.005,0,0,0,0
440100000001,2013-01-07T09:30:00,1000000.00,0,0,0,0
440100000001,2013-01-07T09:30:00,1.00,0,0

"440100000001","2013-01-07T10:00:00",1.010,0,0,0,0
"""

BAD_PAYMENTS = """ts,payment_id,meter,amount,status,channel
2013-01-07T09:00,P1,440100000001,5.00,settled,alipay
2013-01-07 09:00:00.5,P2,440100000001,-5.00,settled,alipay
2013-01-07T09:00,P3,440100000001,0.00,settled,alipay
2013-01-07T09:00,P4,440100000001,5.001,settled,alipay
2013-01-07T09:00,P5,440100000001,5.00,refunded,alipay
2013-01-07T09:00,,440100000001,5.00,settled,alipay
2013-01-07T09:00,P6,440100000002,5.00,settled,alipay
2013-01-07T25:00,P7,440100000001,5.00,settled,alipay
2013-01-07T09:00,P8,440100000001
"""


def test_each_kind_of_bad_row_is_rejected_with_file_line_and_reason(tmp_path: Path) -> None:
    code, got = replay(tmp_path, BAD_ARCHIVE, BAD_READINGS.replace("\n", "\r\n"), BAD_PAYMENTS)
    assert code == 0
    a, r, p = (str(tmp_path / f"{n}.csv") for n in ("archive", "readings", "payments"))
    rows = got["rejected.csv"].splitlines()
    assert rows[0] == "file,line,reason"
    reasons = {
        (line.split(",")[0], int(line.split(",")[1])): line.split(",", 2)[2] for line in rows[1:]
    }
    assert sorted(reasons) == sorted(
        [(a, k) for k in range(3, 11)]
        + [(r, k) for k in range(3, 11)]
        + [(p, k) for k in range(3, 11)]
    )
    assert "is not a 12-digit meter address" in reasons[(a, 3)]
    assert "already in the archive (line 2)" in reasons[(a, 4)]
    assert (
        "class" in reasons[(a, 5)]
        and "plan: 'gold'" in reasons[(a, 6)]
        and "protected" in reasons[(a, 7)]
    )
    assert (
        "initial_balance" in reasons[(a, 8)]
        and "role" in reasons[(a, 9)]
        and "fields" in reasons[(a, 10)]
    )
    assert reasons[(r, 3)].startswith("\"ts: '2013-02-30T09:00:00' is not an ISO 8601")
    assert "ts: 'yesterday'" in reasons[(r, 4)]
    assert "meter: '44010000001' is not a 12-digit" in reasons[(r, 5)]
    assert reasons[(r, 6)] == "meter: 440100000099 is not in the archive"
    assert "total: '1.5e3' is not a register value" in reasons[(r, 7)]
    assert reasons[(r, 8)] == "total: '1.005' has more than 2 decimals"
    assert reasons[(r, 9)] == "total: 1000000.00 is beyond the register range 0..999999.99 kWh"
    assert "row has 5 fields, needs 7" in reasons[(r, 10)]
    assert "amount: '-5.00' is not positive" in reasons[(p, 3)]
    assert "amount: '0.00' is not positive" in reasons[(p, 4)]
    assert "more than 2 decimals" in reasons[(p, 5)] and "status: 'refunded'" in reasons[(p, 6)]
    assert (
        reasons[(p, 7)] == "payment_id: empty"
        and "440100000002 is not in the archive" in reasons[(p, 8)]
    )
    assert "ts: '2013-01-07T25:00'" in reasons[(p, 9)] and "fields" in reasons[(p, 10)]
    # The good rows ran: one payment of 5 yuan and 0.01 kWh at 0.4883 (the quoted, CRLF row).
    assert got["balances.csv"].splitlines()[1] == "440100000001,14.995117,0.004883,5.000000,closed"
    assert got == expected(tmp_path, BAD_ARCHIVE, BAD_READINGS.replace("\n", "\r\n"), BAD_PAYMENTS)


def test_a_payment_id_belongs_to_one_meter(tmp_path: Path) -> None:
    archive = ARCHIVE
    payments = (
        "ts,payment_id,meter,amount,status,channel\n"
        "2013-01-04T08:00:00,X,440100000001,1.00,settled,a\n"
        "2013-01-04T08:00:00,X,440100000002,1.00,settled,a\n"
    )
    code, got = replay(tmp_path, archive, "ts,meter,total,t1,t2,t3,t4\n", payments)
    assert code == 0
    assert "payment_id: 'X' already belongs to meter 440100000001" in got["rejected.csv"]


@pytest.mark.parametrize(
    ("which", "text", "message"),
    [
        ("readings", "ts,meter,total,t1,t2,t3\n", "the header lacks the column 't4'"),
        ("payments", "", "empty file"),
        ("archive", "meter,terminal\n", "lacks the column 'area'"),
    ],
)
def test_unusable_file_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str, text: str, message: str
) -> None:
    files = {"archive": ARCHIVE, "readings": READINGS, "payments": PAYMENTS}
    files[which] = text
    code, _ = replay(tmp_path, files["archive"], files["readings"], files["payments"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and f"{which}.csv" in err


def test_missing_input_file_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "replay",
            "--archive",
            str(tmp_path / "nope.csv"),
            "--readings",
            "r",
            "--payments",
            "p",
            "--tariffs",
            str(EXAMPLE),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nope.csv: archive file not found" in err and err.count("\n") == 1


def _slice_inputs(tmp: Path) -> dict[str, Path]:
    sys.path.insert(0, str(REPO))
    from bench.make_replay_inputs import make_inputs

    return make_inputs(tmp / "inputs", consumption=load_consumption(SLICE), seed=7)


def test_recorded_slice_replays_as_the_reference_says(tmp_path: Path) -> None:
    paths = _slice_inputs(tmp_path)
    texts = {k: p.read_text() for k, p in paths.items()}
    code, got = replay(tmp_path, texts["archive"], texts["readings"], texts["payments"])
    assert code == 0
    assert got == expected(tmp_path, texts["archive"], texts["readings"], texts["payments"])
    assert (
        len(got["balances.csv"].splitlines()) == 4 and got["rejected.csv"] == "file,line,reason\n"
    )


def test_real_process_with_progress_bar(tmp_path: Path) -> None:
    paths = _slice_inputs(tmp_path)
    exe = Path(sys.executable).with_name("meterstream")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            str(exe),
            "replay",
            "--archive",
            str(paths["archive"]),
            "--readings",
            str(paths["readings"]),
            "--payments",
            str(paths["payments"]),
            "--tariffs",
            str(EXAMPLE),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("replayed 432 readings and ")
    assert "replay" in proc.stderr and "100%" in proc.stderr  # tqdm on stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    bad = tmp_path / "bad.toml"
    bad.write_text('timezone = "Asia/Shanghai"\n')
    proc = subprocess.run(
        [
            str(exe),
            "replay",
            "--archive",
            str(paths["archive"]),
            "--readings",
            str(paths["readings"]),
            "--payments",
            str(paths["payments"]),
            "--tariffs",
            str(bad),
            "--out",
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "withholding_grace_hours: missing" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Random files: the whole replay equals the reference.


def _kwh(centi: int, style: int) -> str:
    whole, frac = divmod(centi, 100)
    if style == 1 and frac % 10 == 0:
        return f"{whole}.{frac // 10}"
    if style == 2 and frac == 0:
        return f"{whole}"
    if style == 3:
        return f" {whole}.{frac:02d}0 "
    return f"{whole}.{frac:02d}"


def _ts_text(ts: int, zone: str, style: int, offset_min: int) -> str:
    secs, ns = divmod(ts, 10**9)
    frac = f".{ns:09d}".rstrip("0") if ns else ""
    if style == 0:  # UTC
        return (
            (datetime(1970, 1, 1) + timedelta(seconds=secs)).strftime("%Y-%m-%dT%H:%M:%S")
            + frac
            + "Z"
        )
    if style == 1:  # an explicit offset
        local = datetime(1970, 1, 1) + timedelta(seconds=secs + offset_min * 60)
        sign = "+" if offset_min >= 0 else "-"
        h, m = divmod(abs(offset_min), 60)
        return local.strftime("%Y-%m-%d %H:%M:%S") + frac + f"{sign}{h:02d}:{m:02d}"
    local = datetime.fromtimestamp(secs, ZoneInfo(zone)).replace(tzinfo=None)  # naive local
    if style == 2 and not frac and local.second == 0:
        return local.strftime("%Y-%m-%dT%H:%M")
    return local.strftime("%Y-%m-%dT%H:%M:%S") + frac


GARBAGE = [
    "not,a,row",
    "2013-01-07T09:00:00,440100000000",
    ",,,,,,",
    "2013-13-01T00:00:00,440100000000,1,1,1,1,1",
    "2013-01-07T09:00:00,440100009999,1,1,1,1,1",
    "2013-01-07T09:00:00,440100000000,-1,1,1,1,1",
    "2013-01-07T09:00:00,440100000000,1.234,1,1,1,1",
    "   ",
]


@st.composite
def files(draw: st.DrawFn) -> tuple[Scenario, str, str, str, str]:
    scn = draw(scenarios(max_events=40))
    plans = tuple(
        dataclasses.replace(
            p,
            alert1=p.alert1 // 10_000 * 10_000,
            alert2=p.alert2 // 10_000 * 10_000,
            cutoff=p.cutoff // 10_000 * 10_000,
            reconnect=-(-p.reconnect // 10_000) * 10_000,
        )
        for p in scn.tariff.plans
    )
    tariff = dataclasses.replace(scn.tariff, plans=plans)
    names = {p.name: p for p in plans}
    archive = ["meter,terminal,area,class,plan,protected,initial_balance,role"]
    for k, m in enumerate(scn.meters):
        archive.append(
            ",".join(
                [
                    m.address,
                    f"T{k % 2}",
                    "A",
                    draw(st.sampled_from(["dedicated", "public", "lowvoltage"])),
                    names[m.plan.name].name,
                    "1" if m.protected else "0",
                    _money(m.initial),
                    "supply" if m.supply else "customer",
                ]
            )
        )
    readings: list[str] = []
    payments: list[str] = []
    for e in scn.events:
        if e.status == "tick":
            continue
        when = _ts_text(
            e.ts,
            tariff.timezone,
            draw(st.integers(0, 3)),
            draw(st.sampled_from([0, 480, -300, 345])),
        )
        if e.regs is not None:
            style = draw(st.integers(0, 3))
            readings.append(
                ",".join([when, scn.meters[e.meter].address, *(_kwh(v, style) for v in e.regs)])
            )
        else:
            cents = max(e.amount // 10_000, 1)
            payments.append(
                ",".join(
                    [
                        when,
                        e.pid,
                        scn.meters[e.meter].address,
                        f"{cents // 100}.{cents % 100:02d}",
                        e.status,
                        "alipay",
                    ]
                )
            )
    for bucket in (readings, payments):
        for _ in range(draw(st.integers(0, 3))):
            bucket.insert(draw(st.integers(0, len(bucket))), draw(st.sampled_from(GARBAGE)))
        if draw(st.booleans()):
            order = draw(st.permutations(range(len(bucket))))
            bucket[:] = [bucket[i] for i in order]
    return (
        scn,
        "\n".join(archive) + "\n",
        "\n".join(["ts,meter,total,t1,t2,t3,t4", *readings]) + "\n",
        "\n".join(["ts,payment_id,meter,amount,status,channel", *payments]) + "\n",
        tariff_toml(tariff),
    )


def _money(micro: int) -> str:
    q, r = divmod(abs(micro), 10**6)
    return f"{'-' if micro < 0 else ''}{q}.{r:06d}"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(files())
def test_random_files_replay_as_the_reference_says(
    tmp_path: Path, case: tuple[Scenario, str, str, str, str]
) -> None:
    _, archive, readings, payments, tariffs = case
    code, got = replay(tmp_path, archive, readings, payments, tariffs)
    assert code == 0
    assert got == expected(tmp_path, archive, readings, payments, tariffs)


def test_output_times_carry_the_zone_offset(tmp_path: Path) -> None:
    when = datetime(2013, 7, 1, 12, 0, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    ts = when // timedelta(seconds=1) * 10**9
    assert ref.local_iso(ref.Clock(load_tariffs(EXAMPLE)), ts) == "2013-07-01T20:00:00+08:00"
