"""InfluxDB line protocol for readings: one line per (measurement, tags, timestamp), one field per point.

Every field is a float, so a field never changes type (InfluxDB rejects a type change for the
whole shard). A redelivered reading produces the identical line and overwrites itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["Row", "encode", "escape_measurement", "escape_tag", "series_key"]

Row = tuple[str, tuple[tuple[str, str], ...], int, dict[str, float]]  # measurement, tags, ts ms, fields

# InfluxDB unescapes only "\," "\=" "\ " in names and tags; a backslash is otherwise taken literally
_MEAS = str.maketrans({",": r"\,", " ": r"\ "})
_TAG = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})


#: a backslash InfluxDB would read as an escape (before a separator or quote) or as escaping the separator after it
_AMBIGUOUS = re.compile(r'\\(?=[ ,="\\]|$)')


def _check(value: str) -> None:
    if "\n" in value or "\r" in value:
        msg = f"line protocol cannot carry a line break in a tag or key: {value!r}"
        raise ValueError(msg)
    if _AMBIGUOUS.search(value):
        msg = f"line protocol cannot carry a backslash before a space, comma, '=', '\"' or at the end: {value!r}"
        raise ValueError(msg)


def escape_measurement(name: str) -> str:
    _check(name)
    return name.translate(_MEAS)


def escape_tag(value: str) -> str:
    """Escape a tag key, tag value or field key; refuse what InfluxDB could not read back as written."""
    _check(value)
    return value.translate(_TAG)


def _float(v: float) -> str:
    r = repr(float(v))
    return r if r not in ("nan", "inf", "-inf") else "0"


def series_key(measurement: str, tags: Iterable[tuple[str, str]]) -> str:
    """The start of every line of one series: measurement and tags, escaped, tags sorted, empty ones left out."""
    return escape_measurement(measurement) + "".join(
        f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags) if v != "")


def encode(rows: Iterable[Row]) -> str:
    lines = []
    for measurement, tags, ts, fields in rows:
        field_part = ",".join(f"{escape_tag(k)}={_float(v)}" for k, v in sorted(fields.items()))
        lines.append(f"{series_key(measurement, tags)} {field_part} {ts}")
    return "\n".join(lines) + ("\n" if lines else "")
