"""Declaring a tool: ``@tool`` makes a ToolSpec from a typed function; its arguments are checked.

A ToolSpec is plain data that crosses the wire: a name, a description and a ``parameters``
JSON Schema built from the signature (``tool_schema``). That schema is what the grammar
engine forces the model's tool-call arguments to match, and ``validate_args`` checks any
arguments against it before a tool runs, so a call that reaches a function has the shapes
its hints declare. Every refusal is an InvalidArgument that names the field and says what
was expected.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from jsonschema.exceptions import SchemaError, ValidationError, best_match

from llmos_kernel.errors import InvalidArgument
from llmos_kernel.tool_schema import (
    SchemaValidator,
    json_schema,
    object_schema,
    parse_docstring,
)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolSpec:
    """What a model and a caller need to know about a tool; plain data that crosses the wire."""

    name: str
    description: str
    parameters: dict[str, Any]
    dangerous: bool = False
    timeout_s: float = 10.0
    returns: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidArgument(
                f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'"
            )
        if not (isinstance(self.timeout_s, int | float) and 0 < self.timeout_s < math.inf):
            raise InvalidArgument(f"tool {self.name!r}: timeout_s must be a positive number")
        if not isinstance(self.parameters, dict) or self.parameters.get("type") != "object":
            raise InvalidArgument(
                f"tool {self.name!r}: parameters must be a JSON Schema with type 'object'"
            )
        try:
            SchemaValidator.check_schema(self.parameters)
        except SchemaError as exc:
            raise InvalidArgument(
                f"tool {self.name!r}: invalid parameters schema: {exc.message}"
            ) from None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tools=[...]`` entry for this tool."""
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }
        return {"type": "function", "function": function}


# --- the decorator ---------------------------------------------------------------------------


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    dangerous: bool = False,
    timeout_s: float = 10.0,
) -> Any:
    """Declare a function (sync or async, or a bound method) as a tool.

    Usable bare (``@tool``) or with arguments (``@tool(dangerous=True)``). The schema comes
    from the signature's type hints, the description and parameter texts from the docstring.
    The function is returned unchanged, with its ToolSpec as ``__llmos_tool__``; for a bound
    method the spec sits on the underlying function, so every instance shares it.
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        spec = _spec_from_function(function, name, dangerous, timeout_s)
        target = function.__func__ if inspect.ismethod(function) else function
        target.__llmos_tool__ = spec
        return function

    return decorate if fn is None else decorate(fn)


def _spec_from_function(
    fn: Callable[..., Any], name: str | None, dangerous: bool, timeout_s: float
) -> ToolSpec:
    name = name or getattr(fn, "__name__", "")
    try:
        hints = get_type_hints(fn, include_extras=True)
    except (NameError, TypeError) as exc:
        raise InvalidArgument(f"tool {name!r}: cannot resolve its type hints: {exc}") from None
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls") and params[0].name not in hints:
        params = params[1:]
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            stars = "*" if param.kind is param.VAR_POSITIONAL else "**"
            raise InvalidArgument(
                f"tool {name!r}: parameter {stars}{param.name} is not allowed; "
                "a tool takes named parameters only"
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise InvalidArgument(
                f"tool {name!r}: parameter {param.name!r} is positional-only; "
                "tools are called with named arguments"
            )
        if param.name not in hints:
            raise InvalidArgument(
                f"tool {name!r}: parameter {param.name!r} has no type annotation; "
                f"annotate it (e.g. '{param.name}: str') so the model knows what to send"
            )
    summary, descriptions = parse_docstring(fn)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    required = [p.name for p in params if p.default is p.empty]
    try:
        parameters = object_schema(
            {p.name: hints[p.name] for p in params}, required, descriptions, defaults
        )
        returns = json_schema(hints["return"]) if "return" in hints else None
    except InvalidArgument as exc:
        raise InvalidArgument(f"tool {name!r}: {exc}") from None
    return ToolSpec(name, summary, parameters, dangerous, timeout_s, returns)


def spec_of(fn_or_spec: Any) -> ToolSpec:
    """The ToolSpec of a ``@tool`` function, or the spec itself."""
    if isinstance(fn_or_spec, ToolSpec):
        return fn_or_spec
    spec = getattr(fn_or_spec, "__llmos_tool__", None)
    if not isinstance(spec, ToolSpec):
        raise InvalidArgument(f"{fn_or_spec!r} is not a tool; decorate it with @tool")
    return spec


# --- arguments -------------------------------------------------------------------------------


def validate_args(spec: ToolSpec, args: Any) -> dict[str, Any]:
    """``args`` checked against the tool's schema, with ints made float where it says number.

    InvalidArgument names the offending field and what was expected.
    """
    if not isinstance(args, Mapping):
        raise InvalidArgument(
            f"tool {spec.name!r} takes a JSON object of named arguments, got {type(args).__name__}"
        )
    error = best_match(SchemaValidator(spec.parameters).iter_errors(args))
    if error is not None:
        raise InvalidArgument(f"tool {spec.name!r}: {_explain(error)}")
    return _numbers_as_float(spec.parameters, dict(args))


def _explain(error: ValidationError) -> str:
    parent = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    where = f"argument {parent.lstrip('.')!r}"
    instance, expected = error.instance, error.validator_value
    if error.validator == "required":
        missing = next(key for key in expected if key not in instance)
        return f"missing required argument {(parent + '.' + missing).lstrip('.')!r}"
    if error.validator == "additionalProperties" and expected is False:
        known = error.schema.get("properties", {})
        extra = next(key for key in instance if key not in known)
        choices = ", ".join(known) or "none"
        return f"unexpected argument {(parent + '.' + extra).lstrip('.')!r} (accepted: {choices})"
    shown = repr(instance) if len(repr(instance)) <= 60 else repr(instance)[:57] + "..."
    if error.validator == "type":
        kinds = expected if isinstance(expected, str) else " or ".join(expected)
        return f"{where} must be {kinds}, got {_json_type(instance)} {shown}"
    if error.validator == "enum":
        return f"{where} must be one of {expected!r}, got {shown}"
    return f"{where}: {error.message}"


def _json_type(value: Any) -> str:
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (type(None), "null"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _numbers_as_float(schema: Mapping[str, Any], value: Any) -> Any:
    for branch in schema.get("anyOf", ()):
        if SchemaValidator(branch).is_valid(value):
            return _numbers_as_float(branch, value)
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value) if "number" in kinds and "integer" not in kinds else value
    if isinstance(value, dict):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        fallback = extra if isinstance(extra, dict) else {}
        return {k: _numbers_as_float(properties.get(k, fallback), v) for k, v in value.items()}
    if isinstance(value, list):
        prefix, items = schema.get("prefixItems", []), schema.get("items")
        rest = items if isinstance(items, dict) else {}
        return [
            _numbers_as_float(prefix[i] if i < len(prefix) else rest, item)
            for i, item in enumerate(value)
        ]
    return value

