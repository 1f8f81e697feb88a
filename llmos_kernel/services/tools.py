"""Tools: JSON Schema from type hints, a registry with scopes and allowlists, approvals.

``@tool`` turns a typed Python function into a ToolSpec whose ``parameters`` schema is what
the grammar engine forces the model's tool-call arguments to match and what ``validate_args``
checks before anything runs. The ToolRegistry decides which process may call which tool,
asks a person before a dangerous tool runs, and turns every failure into a typed error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import difflib
import enum
import inspect
import math
import re
import threading
import types
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
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
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema
from jsonschema.exceptions import SchemaError, ValidationError, best_match

from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Timeout,
    ToolError,
)
from llmos_kernel.services.approvals import ApprovalQueue
from llmos_kernel.services.calculator import evaluate

Executor = Callable[[dict[str, Any]], Awaitable[Any]]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PRIMITIVES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
_APPROVAL_POLICIES = ("ask", "auto", "deny")
_INT64 = range(-(2**63), 2**64)

# JSON Schema says 1.0 is an integer; a Python tool declared ``n: int`` must not receive 1.0.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


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
            _Validator.check_schema(self.parameters)
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
        descriptions = _docstring(hint)[1]
        schema = _object(hints, hint.__required_keys__, descriptions, {}, (*outer, hint))
        return _described(schema, hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        fields = [f for f in dataclasses.fields(hint) if f.init]
        hints = get_type_hints(hint, include_extras=True)
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        optional = {f.name for f in fields if f.default_factory is not dataclasses.MISSING}
        required = [f.name for f in fields if f.name not in defaults and f.name not in optional]
        hints = {f.name: hints[f.name] for f in fields}
        schema = _object(hints, required, _docstring(hint)[1], defaults, (*outer, hint))
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


def _object(
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
    summary = _docstring(cls)[0]
    return {"description": summary, **schema} if summary else schema


# --- docstrings ------------------------------------------------------------------------------

_SECTION = re.compile(r"^([A-Za-z][A-Za-z ]*):$")
_ARG_SECTIONS = {"args", "arguments", "parameters", "params", "attributes", "fields"}
_GOOGLE_ITEM = re.compile(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_REST_ITEM = re.compile(r"^:(?:param|parameter|arg|argument|ivar|var)\s+(?:[^:]*\s)?(\w+):\s*(.*)$")


def _docstring(obj: Any) -> tuple[str, dict[str, str]]:
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
    summary, descriptions = _docstring(fn)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    required = [p.name for p in params if p.default is p.empty]
    try:
        parameters = _object(
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


# --- arguments and results -------------------------------------------------------------------


def validate_args(spec: ToolSpec, args: Any) -> dict[str, Any]:
    """``args`` checked against the tool's schema, with ints made float where it says number.

    InvalidArgument names the offending field and what was expected.
    """
    if not isinstance(args, Mapping):
        raise InvalidArgument(
            f"tool {spec.name!r} takes a JSON object of named arguments, got {type(args).__name__}"
        )
    error = best_match(_Validator(spec.parameters).iter_errors(args))
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
        if _Validator(branch).is_valid(value):
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
        member = next((m for m in args if _Validator(json_schema(m)).is_valid(value)), Any)
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
        if value not in _INT64:
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


# --- running tools ---------------------------------------------------------------------------


class _ThreadRunner:
    """Runs sync tools on daemon threads, bounding the threads that outlive their timeout.

    A Python thread cannot be killed: a sync tool that runs past its timeout keeps its thread
    until the function returns by itself (the caller gets Timeout at once). At most
    ``max_stuck`` such threads may exist; while that many do, sync tools are refused with
    QuotaExceeded rather than piling up more.
    """

    def __init__(self, max_stuck: int) -> None:
        self.max_stuck = max_stuck
        self.stuck = 0
        self._lock = threading.Lock()

    def admit(self, tool_name: str) -> None:
        if self.stuck >= self.max_stuck:
            raise QuotaExceeded(
                f"{self.stuck} threads are still running sync tools that timed out; tool "
                f"{tool_name!r} cannot start until one of them returns"
            )

    async def run(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        worker = threading.Thread(
            target=_work, args=(done, fn, kwargs), name=f"llmos-tool-{fn.__name__}", daemon=True
        )
        worker.start()
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            with self._lock:
                self.stuck += 1
            done.add_done_callback(self._release)  # runs at once if the thread just finished
            raise

    def _release(self, _: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self.stuck -= 1


def _work(done: concurrent.futures.Future[Any], fn: Callable[..., Any], kwargs: dict) -> None:
    if not done.set_running_or_notify_cancel():
        return
    try:
        done.set_result(fn(**kwargs))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
        done.set_exception(exc)


@dataclass
class _Entry:
    spec: ToolSpec
    fn: Callable[..., Any] | None
    executor: Executor | None


class ToolRegistry:
    """Which tools exist, who may call them, and how a call runs.

    System tools (owner None) are visible to every process; a process's own tools are visible
    to it and to the processes it grants them to. ``allowed`` is the allowlist the spawner
    gave a process (None: no restriction).
    """

    def __init__(
        self, approvals: ApprovalQueue | None = None, *, max_stuck_threads: int = 8
    ) -> None:
        self._approvals = approvals
        self._scopes: dict[int | None, dict[str, _Entry]] = {None: {}}
        self._grants: dict[int, dict[str, int]] = {}  # grantee pid -> {tool name: owner pid}
        self._threads = _ThreadRunner(max_stuck_threads)

    def register(
        self, fn_or_spec: Any, *, owner: int | None = None, executor: Executor | None = None
    ) -> ToolSpec:
        """Add a tool to the system scope (owner None) or to process ``owner``'s scope.

        ``executor`` runs the call instead of the function (the kernel uses it to run an
        agent's tool inside the agent's host); a bare ToolSpec needs one.
        """
        spec = spec_of(fn_or_spec)
        if executor is None and isinstance(fn_or_spec, ToolSpec):
            raise InvalidArgument(f"tool {spec.name!r}: a bare ToolSpec needs an executor")
        scope = self._scopes.setdefault(owner, {})
        if spec.name in scope:
            whose = "a system tool" if owner is None else f"a tool of process {owner}"
            raise AlreadyExists(f"{spec.name!r} is already {whose}; pick another name")
        fn = None if isinstance(fn_or_spec, ToolSpec) else fn_or_spec
        scope[spec.name] = _Entry(spec, fn, executor)
        return spec

    def unregister_owner(self, owner: int) -> None:
        """Forget every tool of process ``owner`` and every grant to or from it."""
        self._scopes.pop(owner, None)
        self._grants.pop(owner, None)
        for grants in self._grants.values():
            for name in [name for name, giver in grants.items() if giver == owner]:
                del grants[name]

    def grant(self, owner: int, name: str, pid: int) -> None:
        """Let process ``pid`` see and call process ``owner``'s tool ``name``."""
        if name not in self._scopes.get(owner, {}):
            raise NotFound(f"process {owner} has no tool {name!r} to grant")
        if self._grants.get(pid, {}).get(name) == owner:
            return
        if name in self._visible(pid):
            raise AlreadyExists(f"process {pid} already sees a tool named {name!r}")
        self._grants.setdefault(pid, {})[name] = owner

    def revoke(self, owner: int, name: str, pid: int) -> None:
        if self._grants.get(pid, {}).get(name) != owner:
            raise NotFound(f"process {pid} holds no grant of {name!r} from process {owner}")
        del self._grants[pid][name]

    def list(self, pid: int, allowed: Collection[str] | None) -> list[ToolSpec]:
        """The tools ``pid`` may call, by name."""
        view = self._visible(pid)
        return [view[name].spec for name in sorted(view) if allowed is None or name in allowed]

    def get(self, pid: int, name: str, allowed: Collection[str] | None) -> ToolSpec:
        return self._entry(pid, name, allowed).spec

    async def call(
        self,
        pid: int,
        name: str,
        args: Any,
        *,
        allowed: Collection[str] | None = None,
        approval: str = "ask",
        approval_timeout_s: float = 300.0,
    ) -> Any:
        """Run tool ``name`` for process ``pid`` and return its JSON-ready result.

        ``approval`` is the spawner's policy for dangerous tools: "ask" queues a request and
        waits for a person, "auto" runs them, "deny" refuses them. Failures inside the tool
        come back as ToolError (one the tool raises itself passes through as it is); a tool
        past its timeout as Timeout.
        """
        if approval not in _APPROVAL_POLICIES:
            raise InvalidArgument(f"approval must be one of {_APPROVAL_POLICIES}, got {approval!r}")
        entry = self._entry(pid, name, allowed)
        args = validate_args(entry.spec, args)
        if entry.spec.dangerous:
            await self._approve(pid, entry.spec, args, approval, approval_timeout_s)
        return await self._run(entry, args)

    def _visible(self, pid: int) -> dict[str, _Entry]:
        view = dict(self._scopes[None])
        for name, owner in self._grants.get(pid, {}).items():
            view[name] = self._scopes[owner][name]
        view.update(self._scopes.get(pid, {}))
        return view

    def _entry(self, pid: int, name: str, allowed: Collection[str] | None) -> _Entry:
        if not isinstance(name, str):
            raise InvalidArgument(f"a tool name is a string, got {type(name).__name__}")
        view = self._visible(pid)
        usable = [n for n in sorted(view) if allowed is None or n in allowed]
        if name not in view:
            close = difflib.get_close_matches(name, usable, n=3)
            hint = (
                f"did you mean {', '.join(map(repr, close))}?"
                if close
                else (f"available: {', '.join(usable[:10]) or 'none'}")
            )
            raise NotFound(f"no tool named {name!r}; {hint}")
        if allowed is not None and name not in allowed:
            raise PermissionDenied(
                f"process {pid} may not use tool {name!r}; its allowlist is {sorted(allowed)}"
            )
        return view[name]

    async def _approve(
        self, pid: int, spec: ToolSpec, args: dict[str, Any], policy: str, timeout_s: float
    ) -> None:
        if policy == "auto":
            return
        if policy == "deny":
            raise PermissionDenied(
                f"tool {spec.name!r} is dangerous and process {pid} runs with approval='deny'"
            )
        if self._approvals is None:
            raise PermissionDenied(
                f"tool {spec.name!r} needs a person's approval but no approval queue is set up"
            )
        request = self._approvals.submit(pid, spec.name, args)
        decided = await self._approvals.wait(request.id, timeout_s)
        if decided.state == "approved":
            return
        if decided.state == "expired":
            raise PermissionDenied(
                f"approval {request.id} for tool {spec.name!r} timed out after {timeout_s:g}s "
                f"without a decision; answer sooner with `llmos approve {request.id}`"
            )
        why = f": {decided.reason}" if decided.reason else ""
        raise PermissionDenied(
            f"tool {spec.name!r} was denied by {decided.decided_by} (approval {request.id}){why}"
        )

    async def _run(self, entry: _Entry, args: dict[str, Any]) -> Any:
        spec, fn = entry.spec, entry.fn
        sync = entry.executor is None and not inspect.iscoroutinefunction(fn)
        if sync:
            self._threads.admit(spec.name)
        deadline = asyncio.timeout(spec.timeout_s)
        try:
            async with deadline:
                if entry.executor is not None:
                    result = await entry.executor(args)
                elif sync:
                    result = await self._threads.run(fn, decode_args(fn, args))
                else:
                    result = await fn(**decode_args(fn, args))
        except ToolError:
            raise
        except (Exception, SystemExit) as exc:  # a tool's sys.exit() must not stop the kernel
            if deadline.expired():
                raise Timeout(f"tool {spec.name!r} did not finish within {spec.timeout_s:g}s")
            raise ToolError(f"tool {spec.name!r} failed: {type(exc).__name__}: {exc}") from exc
        try:
            return to_json(result, "the result")
        except (TypeError, RecursionError) as exc:
            raise ToolError(
                f"tool {spec.name!r} returned something that cannot be sent back: {exc}; return "
                "None, bool, int, float, str, lists, dicts with str keys, enums or dataclasses"
            ) from None


# --- built-in tools --------------------------------------------------------------------------


@tool
def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: Arithmetic such as "2 * (3 + 4) ** 2 / sqrt(16)". Supports + - * / // %
            **, parentheses, sqrt, sin, cos, tan, log, log10, exp, abs, round, floor, ceil,
            min, max, pi and e. Integers beyond 64 bits come back as floats.
    """
    value = evaluate(expression)
    if isinstance(value, float) or value in _INT64:
        return value
    try:
        return float(value)
    except OverflowError:
        raise InvalidArgument(
            f"the result is an integer of {value.bit_length()} bits, too large to return"
        ) from None


@tool
def clock(timezone: str = "UTC") -> str:
    """The current date and time in ISO 8601 form.

    Args:
        timezone: An IANA time zone name such as "UTC", "Europe/Paris" or "America/New_York".
    """
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(
            f"unknown time zone {timezone!r}; use an IANA name such as 'UTC' or 'Europe/Paris'"
        ) from None
    return datetime.now(zone).isoformat(timespec="seconds")


def builtin_tools() -> list[Callable[..., Any]]:
    """The system tools defined here; the kernel adds the fs and memory ones."""
    return [calculator, clock]
