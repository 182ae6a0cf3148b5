"""`meterstream frame`: decode a DL/T 645 frame given as hex, or build one, for field work.

`decode` prints one JSON object; `build` prints the frame as hex. Passwords and operator codes
come from the environment (METERSTREAM_METER_PASSWORD, METERSTREAM_OPERATOR_CODE), never from a
flag (flags land in shell history), and are never printed.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

from meterstream.errors import UserError

if TYPE_CHECKING:
    from meterstream.collectors.dlt645 import Frame, Reply, Request

PASSWORD_ENV = "METERSTREAM_METER_PASSWORD"
OPERATOR_ENV = "METERSTREAM_OPERATOR_CODE"

ACTIONS = {
    "trip": "TRIP",
    "close-allowed": "CLOSE_ALLOWED",
    "close": "CLOSE_DIRECT",
    "alarm": "ALARM",
    "alarm-release": "ALARM_RELEASE",
    "keep-power": "KEEP_POWER",
    "keep-power-release": "KEEP_POWER_RELEASE",
}

#: Request functions whose DATA holds a password or operator code: never printed.
CREDENTIAL_FUNCTIONS = frozenset({0x03, 0x04, 0x0F, 0x14, 0x18, 0x1C})


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "frame",
        help="decode or build DL/T 645 frames",
        description="Decode a DL/T 645 frame given as hex, or build one and print it as hex.",
    )
    actions = parser.add_subparsers(dest="frame_action", metavar="ACTION")
    actions.required = True

    decode = actions.add_parser(
        "decode",
        help="decode one frame given as hex; prints JSON",
        description="Decode one frame (hex, spaces allowed) and print it as one JSON object.",
    )
    decode.add_argument("hex", nargs="+", metavar="HEX", help="the frame, e.g. 'FE FE 68 12 ...'")
    decode.set_defaults(func=_decode)

    build = actions.add_parser("build", help="build a request frame; prints hex")
    kinds = build.add_subparsers(dest="frame_kind", metavar="KIND")
    kinds.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preamble", type=int, default=4, help="FE wake-up bytes (default 4)")

    read = kinds.add_parser("read", parents=[common], help="read one data item (11H / 01H)")
    read.add_argument("--meter", required=True, help="meter address, 12 digits")
    read.add_argument("--di", required=True, help="data identifier: 8 hex digits (2007), 4 (1997)")
    read.add_argument("--protocol", type=int, choices=(2007, 1997), default=2007)
    read.set_defaults(func=_build_read)

    read_address = kinds.add_parser(
        "read-address", parents=[common], help="ask the one meter on a bus for its address (13H)"
    )
    read_address.set_defaults(func=_build_read_address)

    time_set = kinds.add_parser("time-set", parents=[common], help="broadcast time set (08H)")
    time_set.add_argument(
        "--meter", default="broadcast", help="meter address or 'broadcast' (default)"
    )
    time_set.add_argument("--at", help="meter local time, ISO 8601 (default: now, local time)")
    time_set.set_defaults(func=_build_time_set)

    control = kinds.add_parser(
        "control",
        parents=[common],
        allow_abbrev=False,  # "--password 000000" must not become --password-level
        help="remote control (1CH), plaintext",
        description=f"Remote control (1CH), plaintext payload. The password and operator code "
        f"come from {PASSWORD_ENV} and {OPERATOR_ENV} (defaults 000000 and 00000000).",
    )
    control.add_argument("--meter", required=True, help="meter address, 12 digits")
    control.add_argument("--action", required=True, choices=tuple(ACTIONS))
    control.add_argument(
        "--deadline", required=True, help="command validity deadline, meter local time, ISO 8601"
    )
    control.add_argument("--password-level", type=int, default=2, help="PA (default 2)")
    control.set_defaults(func=_build_control)


# --- decode -----------------------------------------------------------------------------------


def _parse_hex(parts: list[str]) -> bytes:
    text = "".join("".join(parts).split())
    if text[:2].lower() == "0x":
        text = text[2:]
    if not text:
        raise UserError("no hex given", where="HEX")
    if len(text) % 2:
        raise UserError(f"odd number of hex digits ({len(text)}); each byte is two", where="HEX")
    try:
        return bytes.fromhex(text)
    except ValueError:
        bad = next(c for c in text if c not in "0123456789abcdefABCDEF")
        raise UserError(f"not hex: {bad!r}", where="HEX") from None


def _decode(args: argparse.Namespace) -> int:
    from meterstream.collectors.dlt645 import FrameError, FrameReader

    raw = _parse_hex(args.hex)
    reader = FrameReader()
    found = reader.feed(raw) + reader.eof()
    frames = []
    for item in found:
        if isinstance(item, FrameError):
            kind = item.kind.replace("_", " ")
            raise UserError(
                f"{kind} in the frame starting at byte {item.offset}: {item.detail}; "
                f"{_ERROR_HINTS[item.kind]}"
            )
        frames.append(item)
    if not frames:
        raise UserError(f"no frame found in {len(raw)} bytes (a frame starts with 68)")
    if len(frames) > 1:
        raise UserError(f"{len(frames)} frames found; decode them one at a time")
    print(json.dumps(describe_frame(frames[0]), ensure_ascii=False, indent=2))
    return 0


_ERROR_HINTS = {
    "bad_checksum": "a byte of the capture is missing or changed",
    "bad_end": "a byte of the capture is missing or changed (a frame ends with 16)",
    "bad_length": "L is larger than any frame can carry",
    "truncated": "the hex ends before the frame does; copy the whole frame",
}


def describe_frame(frame: Frame) -> dict[str, Any]:
    """A frame as a JSON-ready dict: header flags, then the decoded message."""
    from meterstream.collectors.dlt645 import FUNCTION_NAMES, decode_reply, decode_request

    function = frame.function
    out: dict[str, Any] = {
        "address": frame.address,
        "control": f"{frame.control:02X}",
        "function": {"code": f"{function:02X}", "name": FUNCTION_NAMES.get(function, "unknown")},
        "reply": frame.is_reply,
        "abnormal": frame.is_abnormal,
        "follow_up": frame.has_more,
        "length": len(frame.data),
        "data": (
            "(withheld: carries a password)"
            if not frame.is_reply and function in CREDENTIAL_FUNCTIONS
            else frame.data.hex(" ").upper()
        ),
        "checksum_ok": frame.checksum_ok,
    }
    message = decode_reply(frame) if frame.is_reply else decode_request(frame)
    out["message"] = type(message).__name__
    out.update(_message_fields(message, len(frame.data)))
    return out


def _di_text(di: int, protocol: int) -> str:
    return f"{di:08X}" if protocol == 2007 else f"{di:04X}"


def _message_fields(message: Request | Reply, data_length: int) -> dict[str, Any]:
    from meterstream.collectors.dlt645 import (
        AbnormalReply,
        AddressReply,
        ControlAction,
        ControlRequest,
        FollowupRequest,
        ReadReply,
        ReadRequest,
        StatusWord3,
        TimeSetRequest,
        UnknownReply,
        UnknownRequest,
        WriteRequest,
        format_value,
        lookup,
    )

    if isinstance(message, ReadReply):
        item = message.item
        out: dict[str, Any] = {
            "protocol": message.protocol,
            "di": _di_text(message.di, message.protocol),
            "item": item.name if item else None,
            "raw": message.raw.hex(" ").upper(),
        }
        if message.seq is not None:
            out["seq"] = message.seq
        if item is not None and message.values is None:
            out["value_error"] = f"value is not a valid {item.length}-byte {item.fmt}"
        if item is not None and message.values is not None:
            out["values"] = [
                {"name": label, "value": format_value(item, v), "unit": item.unit}
                for label, v in zip(item.labels, message.values, strict=True)
            ]
            if item.di == 0x04000503:
                status = StatusWord3.from_word(message.values[0])
                out["status"] = {
                    "relay_open": status.relay_open,
                    "relay_command_open": status.relay_command_open,
                    "pretrip_alarm": status.pretrip_alarm,
                    "meter_type": status.meter_type_name,
                    "keep_power": status.keep_power,
                }
        return out
    if isinstance(message, AbnormalReply):
        width = 2 * data_length  # an error byte, or the 2-byte word of 1CH
        return {"error": f"0x{message.error:0{width}X}", "errors": list(message.errors)}
    if isinstance(message, AddressReply):
        return {"meter": message.address}
    if isinstance(message, ReadRequest):
        item = lookup(message.di, message.protocol)
        return {
            "protocol": message.protocol,
            "di": _di_text(message.di, message.protocol),
            "item": item.name if item else None,
        }
    if isinstance(message, FollowupRequest):
        return {"protocol": 2007, "di": _di_text(message.di, 2007), "seq": message.seq}
    if isinstance(message, WriteRequest):
        item = lookup(message.di)
        return {
            "di": _di_text(message.di, 2007),
            "item": item.name if item else None,
            "password_level": message.credentials.password_level,
            "value": message.value.hex(" ").upper(),
        }
    if isinstance(message, TimeSetRequest):
        return {"time": message.when.isoformat() if message.when else None}
    if isinstance(message, ControlRequest):
        try:
            action = ControlAction(message.action).name.lower()
        except ValueError:
            action = f"unknown 0x{message.action:02X}"
        return {
            "action": action,
            "password_level": message.credentials.password_level,
            "reserved": message.reserved,
            "deadline": message.deadline.isoformat() if message.deadline else None,
        }
    if isinstance(message, UnknownReply | UnknownRequest):
        return {}
    return {}  # pragma: no cover - every message type is handled above


# --- build ------------------------------------------------------------------------------------


def _print_frame(frame: bytes) -> int:
    print(frame.hex(" ").upper())
    return 0


def parse_address(text: str, where: str = "--meter") -> str:
    from meterstream.collectors.dlt645 import BROADCAST, CodecError, address_to_wire

    if text.lower() == "broadcast":
        return BROADCAST
    try:
        address_to_wire(text)
    except CodecError as exc:
        raise UserError(f"{exc}; give 12 digits, e.g. 123456789012", where=where) from None
    return text


def _datetime(text: str, where: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(
            f"not an ISO 8601 time: {text!r}; e.g. 2099-12-31T23:59:59", where=where
        ) from None
    if not 2000 <= when.year <= 2099:
        raise UserError(f"year {when.year} does not fit a DL/T 645 date (2000..2099)", where=where)
    return when.replace(tzinfo=None)  # meters keep local wall-clock time


def _preamble(args: argparse.Namespace) -> int:
    if not 0 <= args.preamble <= 64:
        raise UserError(f"{args.preamble} FE bytes; give 0..64", where="--preamble")
    return int(args.preamble)


def parse_di(text: str, protocol: int, where: str = "--di") -> int:
    """A DI as hex: 8 digits for 2007, 4 for 1997 (an 0x prefix is fine)."""
    digits = 8 if protocol == 2007 else 4
    hexd = text[2:] if text[:2].lower() == "0x" else text
    try:
        if len(hexd) != digits:
            raise ValueError
        return int(hexd, 16)
    except ValueError:
        raise UserError(
            f"a {protocol} DI is {digits} hex digits (e.g. "
            f"{'0001FF00' if digits == 8 else '9010'}), got {text!r}",
            where=where,
        ) from None


def _build_read(args: argparse.Namespace) -> int:
    from meterstream.collectors.dlt645 import encode_read

    di = parse_di(args.di, args.protocol)
    address = parse_address(args.meter)
    if address == "999999999999":
        raise UserError(
            "meters never answer the broadcast address; give one meter", where="--meter"
        )
    return _print_frame(encode_read(address, di, protocol=args.protocol, preamble=_preamble(args)))


def _build_read_address(args: argparse.Namespace) -> int:
    from meterstream.collectors.dlt645 import encode_read_address

    return _print_frame(encode_read_address(preamble=_preamble(args)))


def _build_time_set(args: argparse.Namespace) -> int:
    from meterstream.collectors.dlt645 import encode_time_set

    when = _datetime(args.at, "--at") if args.at else datetime.now().replace(microsecond=0)
    return _print_frame(encode_time_set(parse_address(args.meter), when, preamble=_preamble(args)))


def _build_control(args: argparse.Namespace) -> int:
    from meterstream.collectors.dlt645 import (
        BROADCAST,
        WILDCARD,
        CodecError,
        ControlAction,
        Credentials,
        encode_control,
    )

    address = parse_address(args.meter)
    if address in (BROADCAST, WILDCARD) or address.upper() == WILDCARD:
        raise UserError("a control command goes to one meter, not to all", where="--meter")
    if not 0 <= args.password_level <= 0xFF:
        raise UserError(f"{args.password_level}; give 0..255", where="--password-level")
    password = os.environ.get(PASSWORD_ENV, "000000")
    operator = os.environ.get(OPERATOR_ENV, "00000000")
    try:
        credentials = Credentials(args.password_level, password, operator)
    except CodecError as exc:  # the message names the field, never the value
        where = PASSWORD_ENV if "password" in str(exc) else OPERATOR_ENV
        raise UserError(str(exc), where=where) from None
    deadline = _datetime(args.deadline, "--deadline")
    action = ControlAction[ACTIONS[args.action]]
    return _print_frame(
        encode_control(address, action, deadline, credentials, preamble=_preamble(args))
    )
