"""Coverage-guided fuzzing (atheris, libFuzzer) of the DL/T 645 frame reader and the decoders.

One input is split into a reader configuration and a sequence of chunks fed to one
`FrameReader`; every frame that comes out goes through `decode_reply` and `decode_request`.
The harness fails (libFuzzer reports a crash and writes the input) when any exception escapes,
when the reader holds more than one unfinished frame between feeds (its memory bound), or when
its byte accounting does not add up. Run by hand (docs/reliability.md):

    .venv/bin/python fuzz/fuzz_frame_reader.py fuzz/corpus -max_total_time=600
    .venv/bin/python fuzz/fuzz_frame_reader.py -atheris_runs=20000   # what tests/test_fuzz.py runs

`--seed-corpus DIR` writes a few valid frames (reads, replies, control, garbage around them) to
DIR for a run to start from, and exits.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["meterstream.collectors.dlt645"]):
    from meterstream.collectors.dlt645 import (
        Frame,
        FrameError,
        FrameReader,
        decode_reply,
        decode_request,
        encode_abnormal_reply,
        encode_control,
        encode_frame,
        encode_read,
        encode_read_reply,
    )
    from meterstream.collectors.dlt645.control import ControlAction, Credentials

OVERHEAD = 12


def check(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    strict = fdp.ConsumeBool()
    max_len = fdp.ConsumeIntInRange(0, 255)
    reader = FrameReader(strict_checksum=strict, max_data_len=max_len)
    fed = 0
    framed = 0
    while fdp.remaining_bytes():
        size = fdp.ConsumeIntInRange(0, 600)
        chunk = fdp.ConsumeBytes(size)
        fed += len(chunk)
        items = reader.feed(chunk)
        if reader.buffered >= OVERHEAD + max_len:
            raise AssertionError(f"reader holds {reader.buffered} bytes, bound {OVERHEAD + max_len}")
        for item in items:
            if isinstance(item, Frame):
                framed += OVERHEAD + len(item.data)
                if len(item.data) > max_len or (strict and not item.checksum_ok):
                    raise AssertionError(f"frame the reader should have refused: {item!r}")
                decode_reply(item)
                decode_request(item)
                item.address  # noqa: B018 - never raises, even when not BCD
            elif not isinstance(item, FrameError) or item.kind not in FrameError.KINDS:
                raise AssertionError(f"unexpected item {item!r}")
    for item in reader.eof():
        if item.kind != "truncated":
            raise AssertionError(f"eof gave {item!r}")
    if reader.buffered != 0 or framed + reader.discarded > fed:
        raise AssertionError(f"accounting: fed {fed}, framed {framed}, "
                             f"discarded {reader.discarded}, buffered {reader.buffered}")


def seed_corpus(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    creds = Credentials(2, "123456", "12345678")
    frames = [
        encode_read("330010010001", 0x0001FF00),
        encode_read("330010010001", 0x9010, protocol=1997),
        encode_read_reply("330010010001", 0x0001FF00, bytes(20)),
        encode_read_reply("330010010001", 0x04000503, b"\x50\x00"),
        encode_abnormal_reply("330010010001", 0x11, 0x02),
        encode_control("330010010001", ControlAction.TRIP, datetime(2024, 6, 1, 12), creds),
        encode_frame("330010010001", 0x9C, b""),
    ]
    for k, f in enumerate(frames):
        # config bytes first (strict, max_len), then the frame with garbage around it
        (out / f"seed-{k}").write_bytes(b"\x01\xff" + b"\x68\x00\x16" + f + b"\xfe\xfe" + f)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seed-corpus":
        seed_corpus(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
