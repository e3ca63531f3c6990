"""SunSpec: discovery of the model chain, model definitions as data, decoding, shared quantities.

    models = await discover(line_reader(line, unit_id))      # [(model id, address, length), ...]
    values = decode_model(103, await read_model(read, ref))  # {"W": 2415.0, "WH": 123456.0, ...}
    readings = to_quantities(103, values)                    # {"power": 2415.0, "energy_export": 123.456}
    devices = await read_devices(read)                       # all of it, per logical device

Model definitions live in edge/sunspec/models/model_<id>.yaml, written from the SunSpec
Information Model Specification. Fixed-layout profiles for the common layout are in
edge/profiles/sunspec_inverter_103.yaml and sunspec_meter_203.yaml.
"""

from edge.sunspec.decode import (
    SF_RANGE, UNIMPLEMENTED, Value, decode_model, decode_point, encode_model, scale,
)
from edge.sunspec.discovery import (
    BASE_ADDRESSES, END_MODEL_ID, MAX_READ, SUNS_MARKER, ModelRef, Reader, SunSpecNotFound, discover,
    find_base, image_reader, line_reader, logical_devices, read_model, read_registers, walk_models,
)
from edge.sunspec.mapping import QUANTITY_MAP, SunSpecDevice, read_devices, to_quantities
from edge.sunspec.modeldefs import (
    MODEL_DIR, ModelDef, PointDef, RepeatingDef, get_model, load_model, model_ids,
)

__all__ = [
    "BASE_ADDRESSES", "END_MODEL_ID", "MAX_READ", "MODEL_DIR", "QUANTITY_MAP", "SF_RANGE", "SUNS_MARKER",
    "UNIMPLEMENTED", "ModelDef", "ModelRef", "PointDef", "Reader", "RepeatingDef", "SunSpecDevice",
    "SunSpecNotFound", "Value", "build_image", "decode_model", "decode_point", "discover", "encode_model",
    "find_base", "get_model", "image_reader", "line_reader", "load_model", "logical_devices", "model_ids",
    "read_devices", "read_model", "read_registers", "scale", "to_quantities", "walk_models",
]


def build_image(models: list[list[int]], base: int = 40000, *, end_length: int | None = 0) -> dict[int, int]:
    """A register image {address: word}: 'SunS' at base, the models' words in order, the end model.

    end_length is the L the end model reports; None leaves the L register out (seen on devices).
    """
    image: dict[int, int] = {base: SUNS_MARKER[0], base + 1: SUNS_MARKER[1]}
    address = base + 2
    for words in models:
        for w in words:
            image[address] = w
            address += 1
    image[address] = END_MODEL_ID
    if end_length is not None:
        image[address + 1] = end_length
    return image
