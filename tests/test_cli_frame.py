"""`meterstream frame`: decode prints one JSON object, build prints hex, mistakes are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meterstream.collectors.dlt645 import (
    ControlAction,
    ControlRequest,
    Credentials,
    FrameReader,
    decode_request,
    encode_abnormal_reply,
    encode_read_reply,
    encode_value,
    lookup,
)
from meterstream.pipeline.cli import main

METER = "123456789012"


def spaced(raw: bytes) -> str:
    return raw.hex(" ").upper()


def decode(capsys: pytest.CaptureFixture[str], text: str) -> dict[str, Any]:
    assert main(["frame", "decode", text]) == 0
    out = capsys.readouterr().out
    doc: dict[str, Any] = json.loads(out)
    return doc


def build(capsys: pytest.CaptureFixture[str], *args: str) -> bytes:
    assert main(["frame", "build", *args]) == 0
    return bytes.fromhex(capsys.readouterr().out.strip().replace(" ", ""))


def test_decode_a_tariff_energy_reply(capsys: pytest.CaptureFixture[str]) -> None:
    item = lookup(0x00010100)
    assert item is not None
    raw = encode_read_reply(METER, 0x00010100, encode_value(item, [12345]))
    doc = decode(capsys, spaced(raw))
    assert doc["address"] == METER
    assert doc["control"] == "91"
    assert doc["function"] == {"code": "11", "name": "read data"}
    assert (doc["reply"], doc["abnormal"], doc["follow_up"], doc["checksum_ok"]) == (
        True,
        False,
        False,
        True,
    )
    assert doc["di"] == "00010100"
    assert doc["values"] == [{"name": "forward active energy T1", "value": "123.45", "unit": "kWh"}]


def test_decode_the_energy_block_and_unspaced_hex(capsys: pytest.CaptureFixture[str]) -> None:
    item = lookup(0x0001FF00)
    assert item is not None
    raw = encode_read_reply(METER, 0x0001FF00, encode_value(item, [100, 1, 2, 3, 4]), more=True)
    doc = decode(capsys, raw.hex())
    assert doc["follow_up"] is True and doc["control"] == "B1"
    assert [v["value"] for v in doc["values"]] == ["1.00", "0.01", "0.02", "0.03", "0.04"]
    assert doc["values"][1]["name"] == "forward active energy T1"


def test_decode_status_word_3(capsys: pytest.CaptureFixture[str]) -> None:
    raw = encode_read_reply(METER, 0x04000503, bytes([0x10, 0x12]))
    doc = decode(capsys, spaced(raw))
    assert doc["values"][0]["value"] == "0x1210"
    assert doc["status"]["relay_open"] is True and doc["status"]["keep_power"] is True
    assert doc["status"]["meter_type"] == "money prepaid"


def test_decode_an_abnormal_control_reply(capsys: pytest.CaptureFixture[str]) -> None:
    doc = decode(capsys, spaced(encode_abnormal_reply(METER, 0x1C, 0x0024, word=True)))
    assert doc["abnormal"] is True and doc["control"] == "DC"
    assert doc["error"] == "0x0024"
    assert doc["errors"] == ["password error", "keep-power in force"]


def test_decode_a_1997_read(capsys: pytest.CaptureFixture[str]) -> None:
    raw = encode_read_reply(METER, 0xB611, bytes([0x20, 0x02]), protocol=1997)
    doc = decode(capsys, spaced(raw))
    assert doc["di"] == "B611" and doc["protocol"] == 1997
    assert doc["values"] == [{"name": "voltage A", "value": "220", "unit": "V"}]


def test_build_read_then_decode(capsys: pytest.CaptureFixture[str]) -> None:
    raw = build(capsys, "read", "--meter", METER, "--di", "0001FF00")
    doc = decode(capsys, spaced(raw))
    assert doc["di"] == "0001FF00" and doc["message"] == "ReadRequest"
    old = build(capsys, "read", "--meter", METER, "--di", "9010", "--protocol", "1997")
    assert decode(capsys, spaced(old))["di"] == "9010"


def test_build_read_address_and_time_set(capsys: pytest.CaptureFixture[str]) -> None:
    raw = build(capsys, "read-address")
    assert decode(capsys, spaced(raw))["message"] == "ReadAddressRequest"
    raw = build(capsys, "time-set", "--at", "2024-05-17T08:30:00")
    doc = decode(capsys, spaced(raw))
    assert doc["address"] == "999999999999" and doc["time"] == "2024-05-17T08:30:00"
    raw = build(capsys, "time-set", "--meter", METER, "--preamble", "0")
    assert raw[0] == 0x68


def test_build_control_takes_secrets_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERSTREAM_METER_PASSWORD", "654321")
    monkeypatch.setenv("METERSTREAM_OPERATOR_CODE", "11223344")
    raw = build(
        capsys,
        "control",
        "--meter",
        METER,
        "--action",
        "close-allowed",
        "--deadline",
        "2099-12-31T23:59:59",
        "--password-level",
        "4",
    )
    (frame,) = FrameReader().feed(raw)
    request = decode_request(frame)  # type: ignore[arg-type]
    assert request == ControlRequest(
        METER,
        Credentials(4, "654321", "11223344"),
        ControlAction.CLOSE_ALLOWED,
        0,
        request.deadline,  # type: ignore[union-attr]
    )
    doc = decode(capsys, spaced(raw))
    text = json.dumps(doc)
    assert "654321" not in text and "11223344" not in text
    assert doc["action"] == "close_allowed" and doc["password_level"] == 4
    assert doc["deadline"] == "2099-12-31T23:59:59"


def test_control_has_no_password_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "frame",
                "build",
                "control",
                "--meter",
                METER,
                "--action",
                "trip",
                "--deadline",
                "2099-01-01T00:00:00",
                "--password",
                "000000",
            ]
        )


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    return lines[0]


def test_decode_mistakes_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    item = lookup(0x00010000)
    assert item is not None
    good = encode_read_reply(METER, 0x00010000, encode_value(item, [1]))
    bad_cs = bytearray(good)
    bad_cs[-2] ^= 1
    cases = {
        "odd number of hex digits": good.hex()[:-1],
        "not hex": "68 ZZ",
        "no frame found": "00 01 02",
        "bad checksum": bad_cs.hex(),
        "truncated": good[:-3].hex(),
        "2 frames": (good + good).hex(),
    }
    for expected, text in cases.items():
        assert expected in one_line_error(capsys, ["frame", "decode", text]), expected


@pytest.mark.parametrize(
    "argv",
    [
        ["frame", "build", "read", "--meter", "12345", "--di", "00010000"],
        ["frame", "build", "read", "--meter", METER, "--di", "10000"],
        ["frame", "build", "read", "--meter", METER, "--di", "9010"],
        ["frame", "build", "read", "--meter", "broadcast", "--di", "00010000"],
        ["frame", "build", "time-set", "--at", "yesterday"],
        ["frame", "build", "time-set", "--at", "2100-01-01T00:00:00"],
        [
            "frame",
            "build",
            "control",
            "--meter",
            "999999999999",
            "--action",
            "trip",
            "--deadline",
            "2099-01-01T00:00:00",
        ],
        ["frame", "build", "control", "--meter", METER, "--action", "trip", "--deadline", "soon"],
        ["frame", "build", "read-address", "--preamble", "-1"],
    ],
)
def test_build_mistakes_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    one_line_error(capsys, argv)


def test_a_bad_password_in_the_environment_is_named_not_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERSTREAM_METER_PASSWORD", "SECRET")
    line = one_line_error(
        capsys,
        [
            "frame",
            "build",
            "control",
            "--meter",
            METER,
            "--action",
            "trip",
            "--deadline",
            "2099-01-01T00:00:00",
        ],
    )
    assert "METERSTREAM_METER_PASSWORD" in line and "SECRET" not in line


def test_real_process_exit_codes() -> None:
    script = Path(sys.executable).parent / "meterstream"
    ok = subprocess.run(
        [str(script), "frame", "build", "read", "--meter", METER, "--di", "00010000"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    good = subprocess.run(
        [str(script), "frame", "decode", ok.stdout.strip()],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0 and json.loads(good.stdout)["di"] == "00010000"
    bad = subprocess.run(
        [str(script), "frame", "decode", "68 12 34"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
