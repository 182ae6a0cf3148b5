"""Kernels: numba kernels and the struct-of-arrays layouts they run on.

Charges, balances, thresholds, control decisions, dropout detection, KPIs. Never any I/O,
asyncio or Faust; money only as int64 micro-yuan.
"""
