"""One ModbusLine per physical line, however many devices are configured on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Self

from edge.modbus._line import LineSpec, ModbusLine

__all__ = ["LineRegistry"]


class LineRegistry:
    """Hands out the ModbusLine of a LineSpec; specs with the same key get the same line.

    Devices on one RS-485 bus, or behind one TCP gateway, must share the arbiter so that only one
    request is ever in flight on that line. Two specs of the same serial line that disagree about
    its physical settings (baud rate, parity...) are a configuration error and raise ValueError.
    The first spec's timeouts, retries and backoff settings apply to the whole line.
    """

    def __init__(self, factory: Callable[[LineSpec], ModbusLine] = ModbusLine) -> None:
        self._factory = factory
        self._lines: dict[str, ModbusLine] = {}

    def get(self, spec: LineSpec) -> ModbusLine:
        line = self._lines.get(spec.key)
        if line is None:
            line = self._lines[spec.key] = self._factory(spec)
            return line
        problems = line.spec.conflicts(spec)
        if problems:
            msg = f"line {spec.key} is configured twice with different settings: {'; '.join(problems)}"
            raise ValueError(msg)
        return line

    __getitem__ = get

    def __contains__(self, spec: object) -> bool:
        return isinstance(spec, LineSpec) and spec.key in self._lines

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[ModbusLine]:
        return iter(list(self._lines.values()))

    async def close(self) -> None:
        """Close every line (queued reads fail with LineDown) and forget them."""
        lines, self._lines = list(self._lines.values()), {}
        for line in lines:
            await line.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
