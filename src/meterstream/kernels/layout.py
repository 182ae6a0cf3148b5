"""The fleet state the billing kernels work on: numpy record arrays, one block per terminal.

Every meter has a slot; the meters of one terminal occupy a contiguous slot range (its block),
so one Kafka partition's state is a set of blocks, and a block can be cut out as bytes and put
back (`to_bytes` / `from_bytes`, versioned) for a Faust changelog table. Nothing here computes
money or does I/O; it must never hold a float.

Layout, chosen for the cache: what a reading touches sits in one aligned 64-byte record per
meter (`HOT_DTYPE`, one cache line), the rest in a second 64-byte record (`COLD_DTYPE`) touched
by payments, anomalies and held cut-offs. Both are arrays of records (a struct of arrays would
spread one reading over a dozen cache lines). Fields and units:

hot (per meter, `Fleet.hot`):
  base_total, base_t1..base_t4  int32  registers last billed (the baselines), 0.01 kWh; a
                                       register is 8 digits (0 .. 99,999,999), so int32 holds it
  period        int16  billing-period key of `used`: local year, year*12+month-1, or 0
  plan          uint16 index of the meter's plan in the compiled tariff
  has_baseline  uint8  1 once a first reading set the baselines
  supply        uint8  1: an area's supply (transformer) meter, read but never billed/controlled
  protected     uint8  1: keep-power customer (保电), never cut off
  relay_open    uint8  0: relay closed, 1: open by a cut-off
  armed1/armed2 uint8  alert 1 / alert 2 armed (fires when the balance falls below it)
  held          uint8  reason (HOLD_*) of the cut-off currently held, 0 if none
  last_ts       int64  epoch ns of the last accepted reading (valid with has_baseline)
  used          int64  consumption in the billing period `period`, 0.01 kWh (tier add-on)
  balance       int64  micro-yuan: initial + paid - charged
  charged       int64  micro-yuan, sum of all charges

cold (per meter, `Fleet.cold`):
  initial       int64  initial balance, micro-yuan
  paid          int64  sum of settled payments, micro-yuan
  hold_until    int64  epoch ns: a pending bank withholding holds cut-offs for events strictly
                       before this instant (max expiry over the meter's pending payments;
                       INT64_MIN when none)
  pay_head      int64  first payment key of the meter's list in the ledger, -1 if none
  last_seen     int64  epoch ns of the last reading that was NOT accepted (backwards,
                       implausible), INT64_MIN if none; the meter's last-seen time is
                       max(hot.last_ts, cold.last_seen) (`last_seen()`), so that a normal
                       reading touches only its hot record
  address       int64  the 12-digit meter address as an integer
  terminal      int32  index of the meter's terminal
  n_rollover, n_backwards, n_implausible  int32  anomaly counters (the flags are count > 0)

first (per meter, `Fleet.first`): the meter's earliest reading billed from (its first reading,
or an older one delivered late since), for a reading that arrives after newer ones
(`billing.backfill_reading`). Written only then and at the first reading, never by a normal
reading, so it stays out of the hot record:
  ts            int64  epoch ns, INT64_MIN while the meter has no reading
  total, t1..t4 int32  its registers, 0.01 kWh

payment ledger (per fleet, `Fleet.ledger`, int64 [capacity, 4], row = payment key):
  L_STATE   LEDGER_UNSEEN / PENDING / SETTLED / FAILED
  L_SLOT    the meter the payment id belongs to
  L_EXPIRY  epoch ns at which the pending hold of this id ends
  L_NEXT    next key in the same meter's list (-1: end)
Payment ids are strings from the channels; `Fleet.payment_key` maps each to a dense int64 key
in first-seen order through a Python dict, so the mapping is exact (no hashing, no collision).
The key table is part of the state: `to_bytes` writes the ids themselves, not the keys.

terminals: `terminal_start` int64 [n_terminals + 1] (block of terminal t is
terminal_start[t]:terminal_start[t+1]); `terminal_online` uint8 [n_terminals] (0: offline,
cut-offs of its meters are queued).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from meterstream.kernels.tariffs import INT64_MIN, P_ALERT1, P_ALERT2

HOT_DTYPE = np.dtype(
    [
        ("base_total", "<i4"),
        ("base_t1", "<i4"),
        ("base_t2", "<i4"),
        ("base_t3", "<i4"),
        ("base_t4", "<i4"),
        ("period", "<i2"),
        ("plan", "<u2"),
        ("has_baseline", "u1"),
        ("supply", "u1"),
        ("protected", "u1"),
        ("relay_open", "u1"),
        ("armed1", "u1"),
        ("armed2", "u1"),
        ("held", "u1"),
        ("spare", "u1"),
        ("last_ts", "<i8"),
        ("used", "<i8"),
        ("balance", "<i8"),
        ("charged", "<i8"),
    ],
    align=True,
)

COLD_DTYPE = np.dtype(
    [
        ("initial", "<i8"),
        ("paid", "<i8"),
        ("hold_until", "<i8"),
        ("pay_head", "<i8"),
        ("last_seen", "<i8"),
        ("address", "<i8"),
        ("terminal", "<i4"),
        ("n_rollover", "<i4"),
        ("n_backwards", "<i4"),
        ("n_implausible", "<i4"),
    ],
    align=True,
)

FIRST_DTYPE = np.dtype(
    [
        ("ts", "<i8"),
        ("total", "<i4"),
        ("t1", "<i4"),
        ("t2", "<i4"),
        ("t3", "<i4"),
        ("t4", "<i4"),
    ],
    align=True,
)

assert HOT_DTYPE.itemsize == 64 and COLD_DTYPE.itemsize == 64 and FIRST_DTYPE.itemsize == 32

# Ledger columns and states.
L_STATE = 0
L_SLOT = 1
L_EXPIRY = 2
L_NEXT = 3
LEDGER_UNSEEN = 0
LEDGER_PENDING = 1
LEDGER_SETTLED = 2
LEDGER_FAILED = 3

#: Registers wrap at 999999.99 kWh: values are 0 .. REGISTER_RANGE - 1 in 0.01 kWh.
REGISTER_RANGE = 100_000_000

BLOCK_MAGIC = b"MSTB"
BLOCK_VERSION = 2  # 2: the first-reading records follow the cold ones
_HEADER = struct.Struct("<4sHHHHII")  # magic, version, hot, cold, first size, meters, payments
_PAYMENT_DTYPE = np.dtype(
    [("meter", "<u4"), ("state", "u1"), ("spare", "u1"), ("id_len", "<u2"), ("expiry", "<i8")]
)


class PaymentIdConflict(ValueError):
    """A payment id already belongs to another meter."""

    def __init__(self, payment_id: str, owner: int) -> None:
        self.payment_id = payment_id
        self.owner = owner
        super().__init__(f"payment id {payment_id!r} already belongs to meter slot {owner}")


def aligned_zeros(n: int, dtype: np.dtype, align: int = 64) -> np.ndarray:
    """Zeroed array of `n` records whose first record starts on an `align`-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.zeros(n * dtype.itemsize + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + n * dtype.itemsize].view(dtype)


class Fleet:
    """The state of a set of terminals and their meters (see the module docstring)."""

    def __init__(
        self,
        hot: np.ndarray,
        cold: np.ndarray,
        terminal_start: np.ndarray,
        terminal_ids: Sequence[str],
        first: np.ndarray | None = None,
    ) -> None:
        self.hot = hot
        self.cold = cold
        if first is None:
            first = aligned_zeros(hot.shape[0], FIRST_DTYPE)
            first["ts"] = INT64_MIN
        self.first = first
        self.terminal_start = terminal_start
        self.terminal_online = np.ones(len(terminal_ids), np.uint8)
        self.terminal_ids = list(terminal_ids)
        self.ledger = _new_ledger(64)
        self.payment_ids: dict[str, int] = {}
        self.payment_names: list[str] = []

    @classmethod
    def build(
        cls,
        terminal_ids: Sequence[str],
        terminal_of: np.ndarray,
        address: np.ndarray,
        plan: np.ndarray,
        supply: np.ndarray,
        protected: np.ndarray,
        initial: np.ndarray,
        plans: np.ndarray,
    ) -> Fleet:
        """A fresh fleet: per-meter arrays in slot order, `terminal_of` non-decreasing.

        `plans` is the compiled tariff's plan array (alerts start armed when the initial
        balance is at or above their threshold). Every relay starts closed.
        """
        n = int(terminal_of.shape[0])
        terminal_of = np.asarray(terminal_of, np.int64)
        if n and (
            np.any(np.diff(terminal_of) < 0)
            or terminal_of[0] < 0
            or terminal_of[-1] >= len(terminal_ids)
        ):
            raise ValueError(
                "terminal_of must be non-decreasing terminal indices (one block per terminal)"
            )
        hot = aligned_zeros(n, HOT_DTYPE)
        cold = aligned_zeros(n, COLD_DTYPE)
        initial = np.asarray(initial, np.int64)
        plan = np.asarray(plan, np.int64)
        hot["plan"] = plan
        hot["supply"] = np.asarray(supply, np.uint8)
        hot["protected"] = np.asarray(protected, np.uint8)
        hot["armed1"] = initial >= plans[plan, P_ALERT1] if n else 0
        hot["armed2"] = initial >= plans[plan, P_ALERT2] if n else 0
        hot["balance"] = initial
        hot["last_ts"] = INT64_MIN
        cold["initial"] = initial
        cold["hold_until"] = INT64_MIN
        cold["pay_head"] = -1
        cold["last_seen"] = INT64_MIN
        cold["address"] = np.asarray(address, np.int64)
        cold["terminal"] = terminal_of
        starts = np.searchsorted(terminal_of, np.arange(len(terminal_ids) + 1)).astype(np.int64)
        return cls(hot, cold, starts, terminal_ids)

    @property
    def n_meters(self) -> int:
        return int(self.hot.shape[0])

    @property
    def n_terminals(self) -> int:
        return len(self.terminal_ids)

    def block(self, terminal: int) -> slice:
        """The slot range of a terminal's meters."""
        return slice(int(self.terminal_start[terminal]), int(self.terminal_start[terminal + 1]))

    def payment_key(self, payment_id: str, slot: int) -> int:
        """The ledger key of a payment id (assigned on first sight); raises PaymentIdConflict
        when the id already belongs to another meter."""
        key = self.payment_ids.get(payment_id)
        if key is not None:
            owner = int(self.ledger[key, L_SLOT])
            if owner != slot:
                raise PaymentIdConflict(payment_id, owner)
            return key
        key = len(self.payment_names)
        if key >= self.ledger.shape[0]:
            grown = _new_ledger(2 * self.ledger.shape[0])
            grown[: self.ledger.shape[0]] = self.ledger
            self.ledger = grown
        self.ledger[key, L_SLOT] = slot
        self.payment_ids[payment_id] = key
        self.payment_names.append(payment_id)
        return key

    def meter_payments(self, slot: int) -> list[int]:
        """The ledger keys of a meter's payments, newest first."""
        keys = []
        k = int(self.cold["pay_head"][slot])
        while k >= 0:
            keys.append(k)
            k = int(self.ledger[k, L_NEXT])
        return keys


def last_seen(fleet: Fleet) -> np.ndarray:
    """Epoch ns of each meter's last reading of any outcome (INT64_MIN: never read)."""
    return np.maximum(fleet.hot["last_ts"], fleet.cold["last_seen"])


def _new_ledger(capacity: int) -> np.ndarray:
    ledger = np.zeros((capacity, 4), np.int64)
    ledger[:, L_NEXT] = -1
    return ledger


def to_bytes(fleet: Fleet, terminal: int) -> bytes:
    """One terminal's block (its meters' hot and cold records and payment ledger) as bytes.

    Layout (little-endian): header (magic b"MSTB", version, record sizes, meter and payment
    counts), the hot records, the cold records, the first-reading records, one 16-byte row
    per payment (meter offset in
    the block, ledger state, id length, expiry) newest first per meter, then the payment ids as
    UTF-8. Ledger keys and the terminal index are fleet-local and are not relied on.
    """
    sl = fleet.block(terminal)
    rows: list[tuple[int, int, int, int]] = []
    ids: list[bytes] = []
    for off, slot in enumerate(range(sl.start, sl.stop)):
        for k in fleet.meter_payments(slot):
            pid = fleet.payment_names[k].encode()
            rows.append(
                (off, int(fleet.ledger[k, L_STATE]), len(pid), int(fleet.ledger[k, L_EXPIRY]))
            )
            ids.append(pid)
    pay = np.zeros(len(rows), _PAYMENT_DTYPE)
    for i, (off, state, n, expiry) in enumerate(rows):
        pay[i] = (off, state, 0, n, expiry)
    header = _HEADER.pack(
        BLOCK_MAGIC,
        BLOCK_VERSION,
        HOT_DTYPE.itemsize,
        COLD_DTYPE.itemsize,
        FIRST_DTYPE.itemsize,
        sl.stop - sl.start,
        len(rows),
    )
    cold = fleet.cold[sl].copy()
    cold["pay_head"] = -1  # fleet-local: rebuilt from the payment rows
    cold["terminal"] = 0  # fleet-local: set by from_bytes
    return b"".join([header, fleet.hot[sl].tobytes(), cold.tobytes(), fleet.first[sl].tobytes(),
                     pay.tobytes(), *ids])


def from_bytes(fleet: Fleet, terminal: int, data: bytes) -> None:
    """Put a block written by `to_bytes` back as the state of `terminal` of `fleet`.

    The block must hold the same meters (same addresses, same order). Payment ids are
    re-registered in this fleet's key table. Raises ValueError on a foreign or damaged block.
    """
    if len(data) < _HEADER.size:
        raise ValueError("state block too short for its header")
    magic, version, hot_size, cold_size, first_size, n, n_pay = _HEADER.unpack_from(data, 0)
    if magic != BLOCK_MAGIC:
        raise ValueError("not a meterstream state block (bad magic)")
    if (
        version != BLOCK_VERSION
        or hot_size != HOT_DTYPE.itemsize
        or cold_size != COLD_DTYPE.itemsize
        or first_size != FIRST_DTYPE.itemsize
    ):
        raise ValueError(
            f"state block version {version} is not readable by this version ({BLOCK_VERSION})"
        )
    sl = fleet.block(terminal)
    if n != sl.stop - sl.start:
        raise ValueError(
            f"state block holds {n} meters, terminal {terminal} has {sl.stop - sl.start}"
        )
    pos = _HEADER.size
    hot = np.frombuffer(data, HOT_DTYPE, n, pos)
    pos += n * HOT_DTYPE.itemsize
    cold = np.frombuffer(data, COLD_DTYPE, n, pos)
    pos += n * COLD_DTYPE.itemsize
    first = np.frombuffer(data, FIRST_DTYPE, n, pos)
    pos += n * FIRST_DTYPE.itemsize
    pay = np.frombuffer(data, _PAYMENT_DTYPE, n_pay, pos)
    pos += n_pay * _PAYMENT_DTYPE.itemsize
    if not np.array_equal(cold["address"], fleet.cold["address"][sl]):
        raise ValueError(f"state block is for other meters than terminal {terminal}'s")
    names = []
    for row in pay:
        m = int(row["id_len"])
        names.append(data[pos : pos + m].decode())
        pos += m
    if pos != len(data):
        raise ValueError("state block has trailing bytes")
    # Forget the payments the block's meters hold now, then register the block's.
    for slot in range(sl.start, sl.stop):
        for k in fleet.meter_payments(slot):
            fleet.ledger[k, L_STATE] = LEDGER_UNSEEN
            fleet.ledger[k, L_NEXT] = -1
    fleet.hot[sl] = hot
    fleet.cold[sl] = cold
    fleet.first[sl] = first
    fleet.cold["terminal"][sl] = terminal
    fleet.cold["pay_head"][sl] = -1
    for i in range(n_pay - 1, -1, -1):  # push oldest first so the list keeps its order
        row = pay[i]
        slot = sl.start + int(row["meter"])
        key = fleet.payment_key(names[i], slot)
        fleet.ledger[key, L_STATE] = int(row["state"])
        fleet.ledger[key, L_EXPIRY] = int(row["expiry"])
        fleet.ledger[key, L_NEXT] = fleet.cold["pay_head"][slot]
        fleet.cold["pay_head"][slot] = key
