"""Modbus register maps of the simulated energy meters, as data: address, quantity, scale.

A map says which live quantity sits at which register address and how it is scaled before it
is written as float32 big-endian, high word first (two registers). Register maps vary by
firmware, so they live here as tables (and can be added in the TOML, [modbus_maps.NAME]),
never as constants scattered through the server code. Pure data: no I/O, no pymodbus import.
"""

from __future__ import annotations

from meterfield.config import ModbusEntry, ModbusMap

#: The quantities a map may name, with their unit before scaling.
QUANTITIES: dict[str, str] = {
    "voltage_a": "V",
    "voltage_b": "V",
    "voltage_c": "V",
    "current_a": "A",
    "current_b": "A",
    "current_c": "A",
    "power_a": "W",
    "power_b": "W",
    "power_c": "W",
    "power_total": "W",
    "frequency": "Hz",
    "import_kwh": "kWh",
    "export_kwh": "kWh",
    "total_kwh": "kWh",
}


def _map(name: str, function: int, rows: list[tuple[int, str, float]]) -> ModbusMap:
    return ModbusMap(name, function, tuple(ModbusEntry(a, q, s) for a, q, s in rows))


#: Eastron SDM630: input registers (FC04), float32, engineering units.
SDM630 = _map("sdm630", 4, [
    (0x0000, "voltage_a", 1.0),
    (0x0002, "voltage_b", 1.0),
    (0x0004, "voltage_c", 1.0),
    (0x0006, "current_a", 1.0),
    (0x0008, "current_b", 1.0),
    (0x000A, "current_c", 1.0),
    (0x000C, "power_a", 1.0),
    (0x000E, "power_b", 1.0),
    (0x0010, "power_c", 1.0),
    (0x0034, "power_total", 1.0),
    (0x0046, "frequency", 1.0),
    (0x0048, "import_kwh", 1.0),
    (0x004A, "export_kwh", 1.0),
    (0x0156, "total_kwh", 1.0),
])

#: Chint DTSU666: holding registers (FC03), float32 with divisors: the register holds
#: V x 10, A x 1000, W x 10, Hz x 100; energies in kWh.
DTSU666 = _map("dtsu666", 3, [
    (0x101E, "import_kwh", 1.0),
    (0x1028, "export_kwh", 1.0),
    (0x2006, "voltage_a", 10.0),
    (0x2008, "voltage_b", 10.0),
    (0x200A, "voltage_c", 10.0),
    (0x200C, "current_a", 1000.0),
    (0x200E, "current_b", 1000.0),
    (0x2010, "current_c", 1000.0),
    (0x2012, "power_total", 10.0),
    (0x2014, "power_a", 10.0),
    (0x2016, "power_b", 10.0),
    (0x2018, "power_c", 10.0),
    (0x2044, "frequency", 100.0),
])

BUILTIN_MAPS: dict[str, ModbusMap] = {m.name: m for m in (SDM630, DTSU666)}
