"""Type hints to JSON Schema and back: how a tool's Python signature becomes data.

``json_schema`` maps a closed set of hints (scalars, unions, containers, Literal, Enum,
dataclasses, TypedDict, ``Annotated`` with a description and a ``Range``) onto JSON Schema
and refuses anything else by name, so every schema a model is forced to follow is one the
kernel can check. ``decode_args`` turns checked JSON back into the hinted Python values and
``to_json`` turns results into plain data. Descriptions come from docstrings
(``parse_docstring``: Google-style ``Args:`` sections or reST ``:param:`` fields).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import (
    Annotated,
    Any,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

import jsonschema

from llmos_kernel.errors import InvalidArgument

_PRIMITIVES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
INT64 = range(-(2**63), 2**64)
"""The integers a tool may return: what msgpack carries in 64 bits, signed or not."""

# JSON Schema says 1.0 is an integer; a Python tool declared ``n: int`` must not receive 1.0.
SchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


@dataclass(frozen=True)
class Range:
    """Bounds for a number, given in a hint: ``Annotated[int, "how many", Range(1, 10)]``."""

    minimum: float | None = None
    maximum: float | None = None


# --- type hints -> JSON Schema ---------------------------------------------------------------


def json_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema for values of a type hint; InvalidArgument for an unsupported hint.

    Supported: str, int, float, bool, None, Any, unions and Optional, list[T], dict[str, T],
    tuple[A, B] and tuple[T, ...], Literal[...], Enum, dataclasses, TypedDict, and
    Annotated[T, "description", Range(min, max)].
    """
    return _schema(hint, ())


def _schema(hint: Any, outer: tuple[type, ...]) -> dict[str, Any]:
    """``json_schema``; ``outer`` holds the dataclasses and TypedDicts being expanded."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        schema = _schema(args[0], outer)
        for meta in args[1:]:
            if isinstance(meta, str):
                schema["description"] = meta
            elif isinstance(meta, Range):
                bounds = {"minimum": meta.minimum, "maximum": meta.maximum}
                schema.update({k: v for k, v in bounds.items() if v is not None})
        return schema
    if hint is Any:
        return {}
    if hint in _PRIMITIVES:
        return {"type": _PRIMITIVES[hint]}
    if origin in (Union, types.UnionType):
        return _union([_schema(arg, outer) for arg in args])
    if origin is Literal:
        return _enum(list(args))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _described(_enum([member.value for member in hint]), hint)
    if hint is list or origin is list:
        return {"type": "array", "items": _schema(args[0], outer)} if args else {"type": "array"}
    if hint is tuple or origin is tuple:
        return _tuple(args, outer)
    if hint is dict or origin is dict:
        if args and args[0] is not str:
            raise InvalidArgument(f"{_name(hint)} has non-string keys; JSON objects key by str")
        values = {"additionalProperties": _schema(args[1], outer)} if args else {}
        return {"type": "object", **values}
    if hint in outer:
        raise InvalidArgument(
            f"{hint.__name__} contains itself; a recursive type has no self-contained schema"
        )
    if is_typeddict(hint):
        hints = get_type_hints(hint, include_extras=True)
        descriptions = parse_docstring(hint)[1]
        schema = object_schema(hints, hint.__required_keys__, descriptions, {}, (*outer, hint))
        return _described(schema, hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        fields = [f for f in dataclasses.fields(hint) if f.init]
        hints = get_type_hints(hint, include_extras=True)
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        optional = {f.name for f in fields if f.default_factory is not dataclasses.MISSING}
        required = [f.name for f in fields if f.name not in defaults and f.name not in optional]
        hints = {f.name: hints[f.name] for f in fields}
        schema = object_schema(hints, required, parse_docstring(hint)[1], defaults, (*outer, hint))
        return _described(schema, hint)
    raise InvalidArgument(
        f"unsupported type hint {_name(hint)}; use str, int, float, bool, None, list[T], "
        "dict[str, T], tuple, Literal, an Enum, a dataclass or a TypedDict"
    )


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else repr(hint)


def _union(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    if all(schema.keys() == {"type"} and isinstance(schema["type"], str) for schema in schemas):
        return {"type": list(dict.fromkeys(schema["type"] for schema in schemas))}
    return {"anyOf": schemas}


def _enum(values: list[Any]) -> dict[str, Any]:
    kinds = []
    for value in values:
        if type(value) not in _PRIMITIVES:
            raise InvalidArgument(f"enum value {value!r} is not a JSON string, number or bool")
        kinds.append(_PRIMITIVES[type(value)])
    unique = list(dict.fromkeys(kinds))
    return {"type": unique[0], "enum": values} if len(unique) == 1 else {"enum": values}


def _tuple(args: tuple[Any, ...], outer: tuple[type, ...]) -> dict[str, Any]:
    if not args:
        return {"type": "array"}
    if len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": _schema(args[0], outer)}
    if args == ((),):
        return {"type": "array", "maxItems": 0}
    return {
        "type": "array",
        "prefixItems": [_schema(arg, outer) for arg in args],
        "minItems": len(args),
        "maxItems": len(args),
    }


def object_schema(
    hints: Mapping[str, Any],
    required: Collection[str],
    descriptions: Mapping[str, str],
    defaults: Mapping[str, Any],
    outer: tuple[type, ...] = (),
) -> dict[str, Any]:
    properties = {}
    for name, hint in hints.items():
        try:
            prop = _schema(hint, outer)
            if name in defaults:
                prop["default"] = to_json(defaults[name])
        except (InvalidArgument, TypeError) as exc:
            raise InvalidArgument(f"{name!r}: {exc}") from None
        if name in descriptions and "description" not in prop:
            prop["description"] = descriptions[name]
        properties[name] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in hints if name in required],
        "additionalProperties": False,
    }


def _described(schema: dict[str, Any], cls: type) -> dict[str, Any]:
    summary = parse_docstring(cls)[0]
    return {"description": summary, **schema} if summary else schema


# --- docstrings ------------------------------------------------------------------------------

_SECTION = re.compile(r"^([A-Za-z][A-Za-z ]*):$")
_ARG_SECTIONS = {"args", "arguments", "parameters", "params", "attributes", "fields"}
_GOOGLE_ITEM = re.compile(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_REST_ITEM = re.compile(r"^:(?:param|parameter|arg|argument|ivar|var)\s+(?:[^:]*\s)?(\w+):\s*(.*)$")


def parse_docstring(obj: Any) -> tuple[str, dict[str, str]]:
    """The summary paragraph and the per-parameter descriptions of ``obj``'s docstring.

    Parameter descriptions come from a Google-style ``Args:`` (or ``Attributes:``) section
    or from reST ``:param name:`` fields. Auto-generated dataclass docstrings are ignored.
    """
    doc = inspect.cleandoc(getattr(obj, "__doc__", None) or "")
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        doc = ""
    lines = doc.splitlines()
    summary = []
    for line in lines:
        if not line.strip() or _SECTION.match(line) or line.startswith(":"):
            break
        summary.append(line.strip())
    params: dict[str, list[str]] = {}
    current: str | None = None
    in_args = False
    item_indent: int | None = None
    for line in lines:
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        if not text:
            continue
        if indent == 0:
            rest, header = _REST_ITEM.match(text), _SECTION.match(text)
            current = rest[1] if rest else None
            if rest:
                params[current] = [rest[2]]
            in_args = bool(header) and header[1].lower() in _ARG_SECTIONS
            item_indent = None
            continue
        google = _GOOGLE_ITEM.match(text) if in_args else None
        if google and (item_indent is None or indent <= item_indent):
            current, item_indent = google[1], indent
            params[current] = [google[2]]
        elif current is not None:
            params[current].append(text)
    return " ".join(summary), {name: " ".join(words).strip() for name, words in params.items()}


# --- JSON values <-> Python values -----------------------------------------------------------


def decode_args(fn: Callable[..., Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """Validated JSON arguments turned into the Python values ``fn``'s hints declare.

    Enums from their values, dataclasses from objects, tuples from arrays; the host that runs
    an agent's own tool calls this before calling the function.
    """
    hints = get_type_hints(fn, include_extras=True)
    return {name: _from_json(hints[name], value) for name, value in args.items()}


def _from_json(hint: Any, value: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _from_json(args[0], value)
    if origin in (Union, types.UnionType):
        member = next((m for m in args if SchemaValidator(json_schema(m)).is_valid(value)), Any)
        return _from_json(member, value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if is_typeddict(hint) or dataclasses.is_dataclass(hint) and isinstance(hint, type):
        fields = get_type_hints(hint, include_extras=True)
        decoded = {key: _from_json(fields[key], item) for key, item in value.items()}
        return decoded if is_typeddict(hint) else hint(**decoded)
    if origin is list and args:
        return [_from_json(args[0], item) for item in value]
    if origin is dict and args:
        return {key: _from_json(args[1], item) for key, item in value.items()}
    if hint is tuple or origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], item) for item in value)
        if args and args != ((),):
            return tuple(_from_json(kind, item) for kind, item in zip(args, value, strict=True))
        return tuple(value)
    return value


def to_json(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON/msgpack data (enums by value, dataclasses as dicts, tuples as
    lists); TypeError naming the first part that has no such form."""
    if isinstance(value, enum.Enum):
        return to_json(value.value, where)
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        if value not in INT64:
            raise TypeError(f"{where} is an integer too large for 64 bits")
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    if isinstance(value, list | tuple):
        return [to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
        return {key: to_json(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(f"{where} is a {type(value).__name__}")

