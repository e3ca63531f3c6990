"""Find a device's SunSpec register map: the 'SunS' marker, then the chain of models.

Discovery works against an abstract reader ``(address, count) -> holding registers`` so the same
code runs over a ModbusLine (line_reader) or over an in-memory register image (image_reader).

The walk follows the SunSpec Information Model Specification: the marker 0x5375 0x6E53 ('SunS')
sits at one of the well-known base addresses (40000, 0, 50000: PDU addresses, read with FC03);
the first model header (ID, L) follows at base + 2; a model occupies its two header registers and
L registers of data, so the next header is at address + L + 2; ID 0xFFFF ends the chain. Some
devices leave out the L register of the end model, so ID and L are read separately whenever a
combined read is refused. A model 1 after the first starts another logical device behind the same
unit id (SolarEdge shows its meter this way).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from edge.modbus import LineDown, ModbusExceptionReply, ModbusLine

__all__ = [
    "BASE_ADDRESSES", "END_MODEL_ID", "MAX_READ", "SUNS_MARKER", "ModelRef", "Reader", "SunSpecNotFound",
    "discover", "find_base", "image_reader", "line_reader", "logical_devices", "read_model", "read_registers",
    "walk_models",
]

#: holding-register reader: (PDU address, count) -> words
Reader = Callable[[int, int], Awaitable[list[int]]]

SUNS_MARKER = (0x5375, 0x6E53)  # 'SunS'
BASE_ADDRESSES = (40000, 0, 50000)
END_MODEL_ID = 0xFFFF
MAX_READ = 125  # registers in one FC03 request
MAX_MODELS = 512  # a chain longer than this is a broken device, not a SunSpec map


class ModelRef(NamedTuple):
    """One model in the chain: its id, the address of its ID register and its length L."""

    model_id: int
    address: int
    length: int

    @property
    def end(self) -> int:
        """First address after the model."""
        return self.address + self.length + 2


class SunSpecNotFound(LookupError):
    """No 'SunS' marker at any base address; the message says what each base answered."""


def line_reader(line: ModbusLine, unit_id: int) -> Reader:
    """A reader over one unit on a Modbus line (holding registers, FC03)."""

    async def read(address: int, count: int) -> list[int]:
        return await line.read(unit_id, "holding", address, count)

    return read


def image_reader(image: Mapping[int, int]) -> Reader:
    """A reader over an in-memory image {address: word}; like a device, it refuses unmapped ranges."""

    async def read(address: int, count: int) -> list[int]:
        if not 1 <= count <= MAX_READ:
            msg = f"image {address}+{count}: a request reads 1..{MAX_READ} registers"
            raise ModbusExceptionReply(msg, 3)
        try:
            return [image[a] for a in range(address, address + count)]
        except KeyError as err:
            msg = f"image {address}+{count}: register {err.args[0]} is not mapped (Modbus exception 2)"
            raise ModbusExceptionReply(msg, 2) from None

    return read


async def read_registers(read: Reader, address: int, count: int, *, max_count: int = MAX_READ) -> list[int]:
    """Read count registers, split into requests of at most max_count registers."""
    if count < 0 or address < 0 or address + count > 0x10000:
        msg = f"registers {address}+{count} are outside 0..65535"
        raise ValueError(msg)
    words: list[int] = []
    while len(words) < count:
        n = min(max_count, count - len(words))
        got = await read(address + len(words), n)
        if len(got) != n:
            msg = f"asked for {n} registers at {address + len(words)}, got {len(got)}"
            raise ValueError(msg)
        words += got
    return words


async def find_base(read: Reader, bases: Iterable[int] = BASE_ADDRESSES) -> int:
    """The base address holding the 'SunS' marker; SunSpecNotFound when none does.

    A base that answers with a Modbus exception, times out or holds other words is skipped; a line
    that is down ends the search at once (LineDown propagates).
    """
    reasons: list[str] = []
    for base in bases:
        try:
            words = await read(base, 2)
        except LineDown:
            raise
        except Exception as err:  # noqa: BLE001 - any refusal at a base means "not here"
            reasons.append(f"{base}: {err}")
            continue
        if tuple(words) == SUNS_MARKER:
            return base
        got = " ".join(f"0x{w:04X}" for w in words)
        reasons.append(f"{base}: {got} is not the 'SunS' marker 0x5375 0x6E53")
    msg = "no SunSpec map: " + "; ".join(reasons)
    raise SunSpecNotFound(msg)


async def _header(read: Reader, address: int) -> tuple[int, int | None]:
    """(ID, L) at address; L is None at the end model when the device does not supply it."""
    try:
        model_id, length = await read(address, 2)
        return model_id, length
    except ModbusExceptionReply:
        # the device may stop right after an end marker without L: read the ID alone
        (model_id,) = await read(address, 1)
        if model_id == END_MODEL_ID:
            return model_id, None
        (length,) = await read(address + 1, 1)
        return model_id, length


async def walk_models(read: Reader, base: int) -> list[ModelRef]:
    """Walk the model chain that starts at base + 2, up to the end model 0xFFFF.

    A chain that runs off the device (a Modbus exception where a header should be) ends there: some
    devices omit the end model. Other read errors propagate.
    """
    models: list[ModelRef] = []
    address = base + 2
    while True:
        if address + 1 > 0xFFFF:
            break
        try:
            model_id, length = await _header(read, address)
        except ModbusExceptionReply:
            if not models:
                raise
            break
        if model_id == END_MODEL_ID:
            break
        assert length is not None
        ref = ModelRef(model_id, address, length)
        if ref.end > 0x10000:
            msg = f"model {model_id} at {address} with L = {length} runs past register 65535"
            raise ValueError(msg)
        models.append(ref)
        if len(models) > MAX_MODELS:
            msg = f"more than {MAX_MODELS} models after base {base}: not a SunSpec chain"
            raise ValueError(msg)
        address = ref.end
    return models


async def discover(read: Reader, bases: Iterable[int] = BASE_ADDRESSES) -> list[ModelRef]:
    """Find the marker and walk the chain: [(model id, address, length), ...] in device order."""
    base = await find_base(read, bases)
    return await walk_models(read, base)


def logical_devices(models: Sequence[ModelRef]) -> list[list[ModelRef]]:
    """Split a chain into logical devices: each model 1 starts a new one.

    Models before the first model 1 (not allowed by the specification, but seen) form a device of
    their own.
    """
    devices: list[list[ModelRef]] = []
    for ref in models:
        if ref.model_id == 1 or not devices:
            devices.append([])
        devices[-1].append(ref)
    return devices


async def read_model(read: Reader, ref: ModelRef, *, max_count: int = MAX_READ) -> list[int]:
    """All registers of one model, ID and L included, split into requests of at most max_count."""
    return await read_registers(read, ref.address, ref.length + 2, max_count=max_count)
