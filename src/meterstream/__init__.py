"""meterstream: a streaming head-end for smart-meter collection and prepaid cost control.

Rooms (see docs/architecture.md): `collectors` speaks to the field, `kernels` keeps the money
and the decisions in numba, `pipeline` is the Faust app and the CLI.
"""

__version__ = "0.1.0"
