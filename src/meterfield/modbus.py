"""Modbus TCP gateways: pymodbus's own server, one unit id per meter, registers live.

Each meter is a pymodbus `SimDevice` whose register block is refreshed from the meter bank by
the device's `action` hook at every request, so a read always shows the live registers, scaled
and laid out as the meter's map (modbus_maps.py) says: float32 big-endian, high word first.
Writes are refused (read-only registers). An outage shuts the server down and restarts it on
the same port. It never imports collector code and never keeps its own copy of a register.
"""

from __future__ import annotations

import functools
import logging
import struct
from typing import Any

from meterfield.config import ModbusMap
from meterfield.fleet import TerminalSpec
from meterfield.meters import MeterBank
from meterfield.terminals import FieldStats

# pymodbus logs every connection and shutdown at INFO/WARNING; the field reports its own.
logging.getLogger("pymodbus").setLevel(logging.ERROR)


def quantities(bank: MeterBank, i: int, now_ns: int) -> dict[str, float]:
    """Live values of meter i in engineering units (V, A, W, Hz, kWh)."""
    total = bank.total_register(i) / 100.0
    out: dict[str, float] = {
        "power_total": float(bank.power_w_phase(i, None)),
        "frequency": bank.frequency_chz(i, now_ns) / 100.0,
        "import_kwh": total,
        "export_kwh": 0.0,
        "total_kwh": total,
    }
    for k, ph in enumerate("abc"):
        out[f"voltage_{ph}"] = bank.voltage_dv(i, k, now_ns) / 10.0
        out[f"current_{ph}"] = bank.current_ma(i, k, now_ns) / 1000.0
        out[f"power_{ph}"] = float(bank.power_w_phase(i, k))
    return out


def float_registers(value: float) -> tuple[int, int]:
    """float32 big-endian, high word first."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return hi, lo


class ModbusGateway:
    """A Modbus TCP gateway (listening) holding several meters as unit ids."""

    def __init__(self, spec: TerminalSpec, bank: MeterBank, maps: dict[str, ModbusMap],
                 stats: FieldStats, now_ns: Any, *, host: str) -> None:
        self.spec = spec
        self.bank = bank
        self.stats = stats
        self.now_ns = now_ns
        self.host = host
        self.bound_port = spec.port
        self.link_enabled = True
        self.running = False
        self._server: Any = None
        fleet = bank.fleet
        self.units: dict[int, tuple[int, ModbusMap]] = {}
        for i in spec.meters:
            i = int(i)
            m = int(fleet.modbus_map[i])
            self.units[int(fleet.unit[i])] = (i, maps[fleet.map_names[max(m, 0)]])
        self._devices: list[Any] | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def up(self) -> bool:
        return self._server is not None

    def endpoint(self) -> tuple[str, str, int]:
        return ("listen", self.host, self.bound_port)

    def _build_devices(self) -> list[Any]:
        from pymodbus.simulator import DataType, SimData, SimDevice

        devices = []
        for unit, (i, mp) in sorted(self.units.items()):
            lo = mp.entries[0].address
            hi = mp.entries[-1].address + 2
            regs = [SimData(lo, count=hi - lo, values=0, datatype=DataType.REGISTERS, readonly=True)]
            bits = [SimData(0, count=1, values=False, datatype=DataType.BITS)]
            other = [SimData(0, count=1, datatype=DataType.INVALID)]  # the other table: none
            if mp.function == 4:
                simdata = (bits, list(bits), other, regs)
            else:
                simdata = (bits, list(bits), regs, other)
            devices.append(SimDevice(unit, simdata=simdata,
                                     action=functools.partial(self._action, i, mp)))
        return devices

    async def _action(self, i: int, mp: ModbusMap, function_code: int, start_address: int,
                      address: int, count: int, registers: list[int],
                      set_values: list[int] | list[bool] | None) -> Any:
        """pymodbus calls this before answering: write the live values into the block."""
        from pymodbus.constants import ExcCodes

        self.stats.modbus_requests += 1
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION
        if function_code != mp.function:
            return None
        end = address + count
        values: dict[str, float] | None = None
        for e in mp.entries:
            if e.address + 2 <= address or e.address >= end:
                continue
            if values is None:
                values = quantities(self.bank, i, self.now_ns())
            hi, lo = float_registers(values[e.quantity] * e.scale)
            k = e.address - start_address
            registers[k] = hi
            registers[k + 1] = lo
        return None

    async def start(self) -> None:
        self.running = True
        if self.link_enabled:
            await self._listen()

    async def stop(self) -> None:
        self.running = False
        await self._unlisten()

    async def set_link(self, enabled: bool) -> None:
        if enabled == self.link_enabled:
            return
        self.link_enabled = enabled
        if not self.running:
            return
        if enabled:
            await self._listen()
        else:
            await self._unlisten()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        from pymodbus.server import ModbusTcpServer

        if self._devices is None:
            self._devices = self._build_devices()
        server = ModbusTcpServer(self._devices, address=(self.host, self.bound_port))
        await server.serve_forever(background=True)
        listener: Any = server.transport  # an asyncio.Server once listening
        self.bound_port = listener.sockets[0].getsockname()[1]
        self._server = server

    async def _unlisten(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()
