"""What the central side knows of every cell: which gateways exist, which devices they carry, where
each device's readings are stored (measurement = the profile's device class) and which points it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from collector.lineprotocol import escape_tag, series_key
from edge.cell import CellConfig, load_cells

__all__ = ["DeviceInfo", "Registry"]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    cell: str
    gateway: str
    device: str
    measurement: str
    points: frozenset[str]
    units: dict[str, str]
    consumer: bool
    #: what every stored line of this device starts with, and each point's "key=", escaped once here
    line_prefix: str
    field_keys: dict[str, str]


class Registry:
    def __init__(self, cells: dict[str, CellConfig]) -> None:
        self.cells = cells
        self.devices: dict[tuple[str, str], DeviceInfo] = {}  # (cell, device)
        self.gateways: set[tuple[str, str]] = set()
        for cell_id, cfg in cells.items():
            for gw, dev in cfg.devices():
                profile = cfg.profiles[dev.id]
                points = [p for p in cfg.published_points(dev) if p.numeric]  # strings identify, not measure
                self.gateways.add((cell_id, gw.id))
                self.devices[(cell_id, dev.id)] = DeviceInfo(
                    cell_id, gw.id, dev.id, profile.device_class, frozenset(p.name for p in points),
                    {p.name: p.unit for p in points}, dev.consumer,
                    series_key(profile.device_class, (("cell", cell_id), ("device", dev.id), ("gateway", gw.id)))
                    + " ",
                    {p.name: f"{escape_tag(p.name)}=" for p in points})

    @classmethod
    def from_dir(cls, directory: Path | str) -> Registry:
        return cls(load_cells(directory))

    def cell(self, cell: str) -> CellConfig:
        """The cell's config; LookupError naming the known cells when there is none."""
        cfg = self.cells.get(cell)
        if cfg is None:
            msg = f"unknown cell {cell!r}; known cells: {', '.join(sorted(self.cells))}"
            raise LookupError(msg)
        return cfg

    def device(self, cell: str, device: str) -> DeviceInfo | None:
        return self.devices.get((cell, device))

    def cell_devices(self, cell: str) -> list[DeviceInfo]:
        return [d for (c, _), d in self.devices.items() if c == cell]

    @property
    def measurements(self) -> set[str]:
        return {d.measurement for d in self.devices.values()}
