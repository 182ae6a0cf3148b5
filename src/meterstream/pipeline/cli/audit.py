"""`meterstream audit verify FILE`: check a worker's tamper-evident audit trail.

Exit 0 with the record count and the head hash when every link holds; exit 1 with the first
broken line (FILE:LINE: what is wrong); exit 2 for a file that cannot be read. The chain rules
are in src/meterstream/audit.py and docs/reliability.md.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "audit", help="verify the tamper-evident audit trail (hash chain) a worker writes",
        description="Work with the audit trail a worker appends to (worker config key "
        "audit_path). See docs/reliability.md.")
    sub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    sub.required = True
    v = sub.add_parser("verify", help="check every link of a trail, report the first broken one",
                       description="Check the hash chain from the genesis record to the end. "
                       "Prints OK with the record count and the head hash, or the first broken "
                       "line with exit status 1.")
    v.add_argument("file", metavar="FILE", help="the trail (JSON lines)")
    v.add_argument("--head", metavar="SHA256",
                   help="a head hash noted earlier: also check that record is still in the file "
                   "(finds records cut off the end at a line boundary)")
    v.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    import re

    from meterstream.audit import verify
    from meterstream.errors import UserError

    if args.head is not None and not re.fullmatch(r"[0-9a-f]{64}", args.head):
        raise UserError(f"--head {args.head!r}: expected 64 lowercase hex digits (a SHA-256)")
    verdict = verify(args.file, head=args.head)
    if verdict.ok:
        print(f"{args.file}: OK, {verdict.records} records, head {verdict.head}")
        return 0
    print(f"{args.file}:{verdict.line}: broken: {verdict.problem} ({verdict.records} records "
          "before it are good)")
    return 1
