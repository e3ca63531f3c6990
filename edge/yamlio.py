"""YAML loading that remembers where every value came from.

Configs are written by people on site; an error must point at the file, the line and the field,
so we keep a map from each value's path to its line while loading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edge.errors import KwwkError

__all__ = ["ConfigError", "LineMap", "Problems", "load_checked", "load_yaml", "validate"]

Loc = tuple[str | int, ...]
LineMap = dict[Loc, int]
M = TypeVar("M", bound=BaseModel)
#: (line, field, message) of each thing wrong in a file
Problems = list[tuple[int | None, str, str]]


class ConfigError(KwwkError, ValueError):
    """A config or profile file is wrong; the message names file, line and field."""

    def __init__(self, path: Path | str, problems: Iterable[tuple[int | None, str, str]]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        lines = [
            f"{self.path}:{line if line is not None else '?'}: {field or '<top>'}: {msg}"
            for line, field, msg in self.problems
        ]
        super().__init__("\n".join(lines))


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML silently overwrites."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _index(node: yaml.Node, loc: Loc, out: LineMap) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*loc, key)] = key_node.start_mark.line + 1
            _index(value_node, (*loc, key), out)
            out[(*loc, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*loc, i), out)


def load_yaml(path: Path | str) -> tuple[Any, LineMap]:
    """Parse a YAML file; return its data and a map from value paths to 1-based line numbers."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(path, [(None, "", f"cannot read file: {err.strerror}")]) from err
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(path, [(line, "", f"not valid YAML: {err.problem or err}")]) from err
    lines: LineMap = {}
    if node is not None:
        # yaml keys are strings in the node tree; map integer-looking keys too
        _index(node, (), lines)
    return data, lines


def line_of(lines: LineMap, loc: Loc) -> int | None:
    """The line of the deepest part of loc that the file has (a missing field points at its parent)."""
    loc = tuple(loc)
    while True:
        if loc in lines:
            return lines[loc]
        str_loc = tuple(str(p) if not isinstance(p, int) else p for p in loc)
        if str_loc in lines:
            return lines[str_loc]
        if not loc:
            return None
        loc = loc[:-1]


def _field(loc: Loc, data: Any) -> str:
    """Render a pydantic location readably, naming list items by their id/name where they have one."""
    parts: list[str] = []
    node = data
    for p in loc:
        if isinstance(p, int):
            label = f"[{p}]"
            if isinstance(node, list) and 0 <= p < len(node) and isinstance(node[p], Mapping):
                ident = node[p].get("id") or node[p].get("name")
                if ident is not None:
                    label = f"[{ident}]"
            parts.append(label)
            node = node[p] if isinstance(node, list) and 0 <= p < len(node) else None
        else:
            parts.append(("." if parts else "") + str(p))
            node = node.get(p) if isinstance(node, Mapping) else None
    return "".join(parts)


def validate(model: type[M], data: Any, path: Path | str, lines: LineMap, context: dict[str, Any] | None = None) -> M:
    """Validate data with a pydantic model; turn every error into file:line: field: message."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False):
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "missing":
                msg = "required field is missing"
            elif e["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling)"
            problems.append((line_of(lines, loc), _field(loc, data), msg))
        raise ConfigError(path, problems) from None


def load_checked(model: type[M], path: Path | str, check: Callable[[M, LineMap], Problems],
                 prepare: Callable[[Any], Any] | None = None) -> M:
    """Load a YAML file, validate it with its pydantic model, then run the checks a model cannot express
    (across fields, against other files); raise one ConfigError naming file, line and field of each problem.

    The one loader of every config-as-data file (cell configs, device profiles, SunSpec models)."""
    path = Path(path)
    data, lines = load_yaml(path)
    obj = validate(model, prepare(data) if prepare else data, path, lines)
    problems = check(obj, lines)
    if problems:
        raise ConfigError(path, problems)
    return obj
