"""Typed messages: dataclasses declared with ``@message``, carried as msgpack.

A message travels as ``{"t": type name, "v": version, "f": {field: value}}``.
Every message type has a *schema*: plain data describing its fields, so the
kernel (which never imports agent code) can validate payloads of types that
exist only in agent programs. Field types are a small closed set that maps
one-to-one onto msgpack: None, bool, int, float, str, bytes, ``list[T]``,
``tuple[T, ...]``, ``dict[str, T]``, ``Optional[T]``, ``Literal[...]``, nested
``@message`` classes and ``Any`` (any plain msgpack value).

Type descriptors in a schema are ``"none" | "bool" | "int" | "float" | "str" |
"bytes" | "any"`` or one-key dicts: ``{"list": D}``, ``{"tuple": D}``,
``{"dict": D}``, ``{"optional": D}``, ``{"literal": [values]}``,
``{"message": name}`` (a name defined in the schema's ``"defs"``, or the
schema's own name for recursive types).

Every failure of untrusted input (bytes, wire forms, schemas) is a
MessageError whose text names the field path, e.g. ``Order.items[2].qty:
expected int, got str``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import os
import sys
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from llmos_kernel.errors import AlreadyExists, InvalidArgument, MessageError

MAX_MESSAGE_BYTES = 1 << 20
MAX_DEPTH = 32
UNTYPED = "dict"

_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_SCALARS = {"none": type(None), "bool": bool, "int": int, "float": float, "str": str,
            "bytes": bytes}
_PY_SCALARS = {v: k for k, v in _SCALARS.items()}
_CONTAINERS = ("list", "tuple", "dict", "optional")
_LITERAL_TYPES = (type(None), bool, int, float, str, bytes)


@dataclass(frozen=True)
class _MessageInfo:
    name: str
    version: int
    fields: dict[str, Any]
    refs: dict[str, type]
    qualified: str


@functools.lru_cache(maxsize=4096)
def _typemap(cls: type) -> dict[str, tuple[dict[str, Any], type | None]]:
    """Every message type reachable from ``cls``, by name: (field descriptors, class)."""
    info = _info(cls)
    found: dict[str, tuple[dict[str, Any], type | None]] = {info.name: (info.fields, cls)}
    todo = list(info.refs.values())
    while todo:
        ref = todo.pop()
        ref_info = _info(ref)
        if ref_info.name not in found:
            found[ref_info.name] = (ref_info.fields, ref)
            todo.extend(ref_info.refs.values())
    return found


@dataclass(frozen=True)
class RawMessage:
    """A decoded message whose type the registry knows only by schema (the kernel's view)."""

    type: str
    version: int
    fields: dict[str, Any]


class MessageRegistry:
    """Message types by name: classes (agent side) or schemas alone (kernel side).

    One name holds one type. Re-decorating the same ``module.qualname`` replaces
    it (a re-imported module, a re-run notebook cell); a different class or
    schema claiming a taken name raises AlreadyExists.
    """

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}
        self._schemas: dict[str, dict] = {}
        self._walks: dict[tuple[str, str], _Walk] = {}  # for types known by schema alone

    def register(self, cls: type) -> None:
        info = _info(cls)
        old = self._classes.get(info.name)
        if old is not None and _info(old).qualified != info.qualified:
            raise AlreadyExists(
                f"message type name {info.name!r} is taken by {_info(old).qualified}; "
                f"give {info.qualified} an explicit @message(name=...)"
            )
        if old is None and info.name in self._schemas:
            self._check_same_schema(schema_of(cls))
        self._classes[info.name] = cls
        self._schemas.pop(info.name, None)
        self._walks = {k: w for k, w in self._walks.items() if k[0] != info.name}

    def register_schema(self, schema: dict) -> None:
        """Know a type by its schema alone; a name already known must have the same schema."""
        _check_schema(schema)
        schema = {**schema, "defs": schema.get("defs", {})}
        if schema["name"] in self:
            self._check_same_schema(schema)
        else:
            self._schemas[schema["name"]] = schema

    def _check_same_schema(self, schema: dict) -> None:
        known = self.schema(schema["name"])
        if known != schema:
            raise AlreadyExists(
                f"message type {schema['name']!r} is already registered with a different "
                f"schema (version {known['version']}); give one of them another name"
            )

    def _walk(self, name: str, mode: str) -> _Walk:
        """A cached pass over a type known by schema alone."""
        walk = self._walks.get((name, mode))
        if walk is None:
            walk = self._walks[name, mode] = _Walk(
                mode, _schema_typemap(self._schemas[name]), MAX_DEPTH)
        return walk

    def lookup(self, name: str) -> type | None:
        """The class registered under ``name``, or None (unknown, or known by schema only)."""
        return self._classes.get(name)

    def schema(self, name: str) -> dict:
        if name in self._classes:
            return schema_of(self._classes[name])
        if name in self._schemas:
            return self._schemas[name]
        raise MessageError(f"unknown message type {name!r}{_known_hint(self.names())}")

    def names(self) -> list[str]:
        return sorted({*self._classes, *self._schemas})

    def __contains__(self, name: object) -> bool:
        return name in self._classes or name in self._schemas


DEFAULT_REGISTRY = MessageRegistry()


def message(
    cls: type | None = None,
    *,
    name: str | None = None,
    version: int = 1,
    registry: MessageRegistry | None = None,
):
    """Class decorator: make ``cls`` a dataclass and register it as a message type.

    The type name defaults to the class's ``__qualname__``, so two programs that
    both define ``Ping`` collide; pass an explicit ``name=`` (e.g.
    ``"chess.Move"``) for types shared across files. Field annotations are
    resolved at decoration time, against the module and the defining scope.
    """
    caller_locals = dict(sys._getframe(1).f_locals)

    def decorate(cls: type) -> type:
        return _declare(cls, name, version, registry or DEFAULT_REGISTRY, caller_locals)

    return decorate if cls is None else decorate(cls)


def _declare(cls: type, name: str | None, version: int, registry: MessageRegistry,
             local_ns: dict[str, Any]) -> type:
    if not isinstance(cls, type):
        raise InvalidArgument(f"@message decorates a class, got {cls!r}")
    name = cls.__qualname__ if name is None else name
    if not isinstance(name, str) or not name or len(name) > 200:
        raise InvalidArgument(f"message type name must be a non-empty str (<= 200), got {name!r}")
    if name == UNTYPED:
        raise InvalidArgument(f"message type name {UNTYPED!r} is reserved for untyped dict messages")
    if type(version) is not int or version < 1:
        raise InvalidArgument(f"message version must be an int >= 1, got {version!r}")
    if not dataclasses.is_dataclass(cls):
        cls = dataclass(cls)
    try:
        hints = typing.get_type_hints(cls, localns={**local_ns, cls.__name__: cls})
    except (NameError, TypeError) as e:
        raise InvalidArgument(
            f"cannot resolve the field annotations of {cls.__qualname__}: {e}; define nested "
            f"message types before the classes that use them"
        ) from e
    refs: dict[str, type] = {}
    descs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            raise InvalidArgument(
                f"{cls.__qualname__}.{f.name}: message fields must be constructor arguments "
                f"(init=False is not allowed)"
            )
        descs[f.name] = _descriptor(hints[f.name], cls, name, f"{cls.__qualname__}.{f.name}", refs)
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    cls.__llmos_message__ = _MessageInfo(name, version, descs, refs, qualified)
    registry.register(cls)
    return cls


def _descriptor(tp: Any, cls: type, own_name: str, where: str, refs: dict[str, type]) -> Any:
    if tp is None or tp in _PY_SCALARS:
        return _PY_SCALARS[type(None) if tp is None else tp]
    if tp is Any:
        return "any"
    if tp is cls:
        refs[own_name] = cls
        return {"message": own_name}
    info = tp.__dict__.get("__llmos_message__") if isinstance(tp, type) else None
    if info is not None:
        if refs.setdefault(info.name, tp) is not tp:
            raise InvalidArgument(f"{where}: two different message types are named {info.name!r}")
        return {"message": info.name}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and len(args) == 1:
        return {"list": _descriptor(args[0], cls, own_name, f"{where}[]", refs)}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"tuple": _descriptor(args[0], cls, own_name, f"{where}[]", refs)}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"dict": _descriptor(args[1], cls, own_name, f"{where}[]", refs)}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return {"optional": _descriptor(inner[0], cls, own_name, where, refs)}
    if origin is Literal and all(type(a) in _LITERAL_TYPES for a in args):
        return {"literal": list(args)}
    raise InvalidArgument(
        f"{where}: type {tp!r} is not allowed in a message; use None, bool, int, float, str, "
        f"bytes, list[T], tuple[T, ...], dict[str, T], Optional[T], Literal[...], Any or a "
        f"@message class"
    )


def _info(cls: type) -> _MessageInfo:
    info = cls.__dict__.get("__llmos_message__") if isinstance(cls, type) else None
    if info is None:
        raise InvalidArgument(f"{cls!r} is not a message type; decorate it with @message")
    return info


def message_type(cls_or_msg: Any) -> str:
    """The type name a @message class (or instance) travels under."""
    return _info(cls_or_msg if isinstance(cls_or_msg, type) else type(cls_or_msg)).name


def schema_of(cls_or_name: type | str, *, registry: MessageRegistry | None = None) -> dict:
    """The portable schema of a message class (or of a registered name): plain, msgpack-able."""
    if isinstance(cls_or_name, str):
        return copy.deepcopy((registry or DEFAULT_REGISTRY).schema(cls_or_name))
    info = _info(cls_or_name)
    defs = {
        name: {"version": _info(c).version, "fields": fields}
        for name, (fields, c) in _typemap(cls_or_name).items()
        if name != info.name
    }
    return copy.deepcopy(
        {"name": info.name, "version": info.version, "fields": info.fields, "defs": defs})


def _check_schema(schema: Any) -> None:
    if not isinstance(schema, dict) or not {"name", "version", "fields"} <= schema.keys():
        raise MessageError("malformed schema: expected a dict with name, version and fields")
    name, version = schema["name"], schema["version"]
    if not isinstance(name, str) or not name or type(version) is not int or version < 1:
        raise MessageError(f"malformed schema: bad name {name!r} or version {version!r}")
    defs = schema.get("defs", {})
    if not isinstance(defs, dict) or set(schema) - {"name", "version", "fields", "defs"}:
        raise MessageError(f"malformed schema {name!r}: unexpected keys or defs")
    known = {name, *defs}
    for type_name, fields in [(name, schema["fields"])] + [
        (n, d.get("fields") if isinstance(d, dict) else None) for n, d in defs.items()
    ]:
        if not isinstance(fields, dict):
            raise MessageError(f"malformed schema {name!r}: {type_name} has no fields dict")
        for fname, desc in fields.items():
            if not isinstance(fname, str):
                raise MessageError(f"malformed schema {name!r}: field name {fname!r} is not a str")
            _check_descriptor(desc, known, f"{type_name}.{fname}", 0)


def _check_descriptor(desc: Any, known: set[str], where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise MessageError(f"malformed schema: {where} nests deeper than {MAX_DEPTH} levels")
    if isinstance(desc, str) and (desc in _SCALARS or desc == "any"):
        return
    if isinstance(desc, dict) and len(desc) == 1:
        ((kind, arg),) = desc.items()
        if kind in _CONTAINERS:
            return _check_descriptor(arg, known, where, depth + 1)
        if kind == "literal" and isinstance(arg, list) and all(
            type(a) in _LITERAL_TYPES for a in arg
        ):
            return
        if kind == "message" and arg in known:
            return
    raise MessageError(f"malformed schema: {where} has an unknown type descriptor {desc!r}")


class _Walk:
    """One conversion pass: ``encode`` (objects -> plain), ``decode`` (plain -> objects),
    ``validate`` (plain -> checked plain) or ``check`` (plain -> nothing; it only raises).

    ``run`` walks once without tracking where it is (most input is fine); only when
    something is wrong does it walk again, naming field paths, to say exactly where.
    """

    def __init__(self, mode: str, typemap: Mapping[str, tuple[dict, type | None]],
                 max_depth: int) -> None:
        self.mode, self.typemap, self.max_depth = mode, typemap, max_depth

    def run(self, type_name: str, value: Any) -> Any:
        try:
            return self.fields(type_name, value, None, 0)
        except MessageError:
            self.fields(type_name, value, type_name, 0)
            raise

    def fields(self, type_name: str, value: Any, path: str | None, depth: int) -> Any:
        descs, cls = self.typemap[type_name]
        if self.mode == "encode":
            if type(value) is not cls:
                raise MessageError(f"{path}: expected {type_name}, got {_describe(value)}")
            return {f: self.value(d, getattr(value, f), _sub(path, ".", f), depth + 1)
                    for f, d in descs.items()}
        if not isinstance(value, dict):
            raise MessageError(f"{path}: expected {type_name} fields (a map), got "
                               f"{_describe(value)}")
        if value.keys() != descs.keys():
            missing = [f for f in descs if f not in value]
            extra = [f for f in value if f not in descs]
            raise MessageError(
                f"{path}: {type_name} fields do not match its schema"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unexpected {', '.join(map(str, extra))}" if extra else "")
            )
        if self.mode == "check":
            for f, d in descs.items():
                self.value(d, value[f], _sub(path, ".", f), depth + 1)
            return None
        out = {f: self.value(d, value[f], _sub(path, ".", f), depth + 1)
               for f, d in descs.items()}
        if self.mode == "decode" and cls is not None:
            try:
                return cls(**out)
            except Exception as e:
                raise MessageError(f"{path}: {type_name} rejected its fields: {e}") from e
        return out

    def value(self, desc: Any, value: Any, path: str | None, depth: int) -> Any:
        if type(desc) is str:
            expected = _SCALARS.get(desc)
            if type(value) is expected:
                if expected is int and not _INT_MIN <= value <= _INT_MAX:
                    raise MessageError(f"{path}: int {value} does not fit in 64 bits")
                return value
            if desc == "any":
                return _check_plain(value, path, depth, self.max_depth)
            if expected is float and type(value) is int:
                return float(value)
            if expected is bytes and self.mode == "encode" and type(value) is bytearray:
                return bytes(value)
            raise MessageError(f"{path}: expected {_type_name(desc)}, got {_describe(value)}")
        if depth > self.max_depth:
            raise MessageError(f"{path}: nested deeper than {self.max_depth} levels")
        ((kind, arg),) = desc.items()
        if kind == "optional":
            return None if value is None else self.value(arg, value, path, depth)
        if kind in ("list", "tuple"):
            ok = (list, tuple) if self.mode == "encode" else (list,)
            if type(value) not in ok:
                raise MessageError(f"{path}: expected {_type_name(desc)}, got {_describe(value)}")
            items = [self.value(arg, v, _sub(path, "[]", i), depth + 1)
                     for i, v in enumerate(value)]
            return tuple(items) if kind == "tuple" and self.mode == "decode" else items
        if kind == "dict":
            if type(value) is not dict or not all(type(k) is str for k in value):
                raise MessageError(f"{path}: expected {_type_name(desc)}, got {_describe(value)}")
            return {k: self.value(arg, v, _sub(path, "[k]", k), depth + 1)
                    for k, v in value.items()}
        if kind == "literal":
            if any(type(value) is type(a) and value == a for a in arg):
                return value
            raise MessageError(f"{path}: expected {_type_name(desc)}, got {value!r}")
        return self.fields(arg, value, path, depth)


def _sub(path: str | None, how: str, key: Any) -> str | None:
    """The path of a part (``a.b``, ``a[2]``, ``a['k']``), or None while paths are not
    tracked."""
    if path is None:
        return None
    return f"{path}.{key}" if how == "." else f"{path}[{key!r}]" if how == "[k]" else \
        f"{path}[{key}]"


def _plain(value: Any) -> Any:
    """A whole untyped message (or other ``Any`` value) checked: plain msgpack values only."""
    try:
        return _check_plain(value, None, 0, MAX_DEPTH)
    except MessageError:
        _check_plain(value, UNTYPED, 0, MAX_DEPTH)
        raise


def _check_plain(value: Any, path: str | None, depth: int, max_depth: int) -> Any:
    """An ``Any`` field: plain msgpack values only (maps keyed by str or bytes)."""
    if depth > max_depth:
        raise MessageError(f"{path}: nested deeper than {max_depth} levels")
    kind = type(value)
    if kind is int and not _INT_MIN <= value <= _INT_MAX:
        raise MessageError(f"{path}: int {value} does not fit in 64 bits")
    if kind in _LITERAL_TYPES:
        return value
    if kind in (list, tuple):
        return [_check_plain(v, _sub(path, "[]", i), depth + 1, max_depth)
                for i, v in enumerate(value)]
    if kind is dict:
        for k in value:
            if type(k) not in (str, bytes):
                raise MessageError(f"{path}: map keys must be str or bytes, got {_describe(k)}")
        return {k: _check_plain(v, _sub(path, "[k]", k), depth + 1, max_depth)
                for k, v in value.items()}
    raise MessageError(f"{path}: {_describe(value)} is not a plain msgpack value")


def _describe(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _type_name(desc: Any) -> str:
    if isinstance(desc, str):
        return {"none": "None", "any": "Any"}.get(desc, desc)
    ((kind, arg),) = desc.items()
    if kind == "literal":
        return f"Literal[{', '.join(map(repr, arg))}]"
    if kind == "message":
        return arg
    inner = _type_name(arg)
    return {"list": f"list[{inner}]", "tuple": f"tuple[{inner}, ...]",
            "dict": f"dict[str, {inner}]", "optional": f"Optional[{inner}]"}[kind]


def _schema_typemap(schema: dict) -> dict[str, tuple[dict, None]]:
    typemap = {n: (d["fields"], None) for n, d in schema.get("defs", {}).items()}
    typemap[schema["name"]] = (schema["fields"], None)
    return typemap


def validate(schema: dict, fields: Any, *, max_depth: int = MAX_DEPTH) -> dict:
    """Check a message's field map against a schema; return the fields (ints coerced to float
    where the schema says float). Raises MessageError naming the field path."""
    _check_schema(schema)
    return _validate_checked(schema, fields, max_depth)


def _validate_checked(schema: dict, fields: Any, max_depth: int = MAX_DEPTH) -> dict:
    return _Walk("validate", _schema_typemap(schema), max_depth).run(schema["name"], fields)


def encode(msg: Any, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """msgpack bytes of a @message instance, or of a plain dict as an untyped message."""
    if type(msg) is dict:
        for k in msg:
            if type(k) is not str:
                raise MessageError(f"{UNTYPED}: field names must be str, got {_describe(k)}")
        name, version = UNTYPED, 1
        fields = _plain(msg)
    else:
        try:
            info = _info(type(msg))
        except InvalidArgument:
            raise MessageError(
                f"cannot encode {_describe(msg)}: send a @message instance or a dict"
            ) from None
        name, version = info.name, info.version
        fields = _Walk("encode", _typemap(type(msg)), MAX_DEPTH).run(name, msg)
    data = msgpack.packb({"t": name, "v": version, "f": fields}, use_bin_type=True)
    if len(data) > max_bytes:
        raise MessageError(f"{name} message is {len(data)} bytes, over the {max_bytes}-byte limit")
    return data


def decode(
    data: bytes,
    *,
    registry: MessageRegistry | Mapping[str, type] | None = None,
    expected: type | tuple[type, ...] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Any:
    """Rebuild a message from msgpack bytes: a @message instance, a dict for untyped messages,
    or a RawMessage for types the registry knows only by schema. Anything wrong raises
    MessageError; nothing half-checked is returned."""
    name, version, fields = _unpack(data, max_bytes)
    if name == UNTYPED:
        result = _plain(fields)
    else:
        result = _decode_typed(name, version, fields, registry or DEFAULT_REGISTRY)
    if expected is not None and not isinstance(result, expected):
        want = expected if isinstance(expected, tuple) else (expected,)
        raise MessageError(
            f"expected a {' or '.join(t.__qualname__ for t in want)} message, got {name}"
        )
    return result


def check(data: bytes, *, registry: MessageRegistry) -> str:
    """The type name of an encoded message once it is checked against its schema, building
    nothing (what a router needs); MessageError as ``decode`` would raise it."""
    name, version, fields = _unpack(data, MAX_MESSAGE_BYTES)
    if name == UNTYPED:
        _plain(fields)
        return name
    cls = registry.lookup(name)
    known_version = _info(cls).version if cls is not None else registry.schema(name)["version"]
    if version != known_version:
        raise MessageError(
            f"{name} message has version {version}, but version {known_version} is registered"
        )
    walk = registry._walk(name, "check") if cls is None else _Walk("check", _typemap(cls),
                                                                     MAX_DEPTH)
    walk.run(name, fields)
    return name


def _unpack(data: Any, max_bytes: int) -> tuple[str, int, dict]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"a message is bytes, got {_describe(data)}")
    if len(data) > max_bytes:
        raise MessageError(f"message is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        raise MessageError(f"message is not valid msgpack: {e}") from e
    if not (type(obj) is dict and obj.keys() == {"t", "v", "f"} and type(obj["t"]) is str
            and type(obj["v"]) is int and type(obj["f"]) is dict):
        raise MessageError('message must be a map {"t": type name, "v": version, "f": fields}')
    return obj["t"], obj["v"], obj["f"]


def _decode_typed(name: str, version: int, fields: dict,
                  registry: MessageRegistry | Mapping[str, type]) -> Any:
    if isinstance(registry, MessageRegistry):
        cls = registry.lookup(name)
        schema = registry.schema(name) if cls is None else None
    else:
        cls, schema = registry.get(name), None
        if cls is None:
            raise MessageError(f"unknown message type {name!r}{_known_hint(list(registry))}")
    known_version = schema["version"] if cls is None else _info(cls).version
    if version != known_version:
        raise MessageError(
            f"{name} message has version {version}, but version {known_version} is registered"
        )
    if cls is None:
        return RawMessage(name, version, registry._walk(name, "validate").run(name, fields))
    return _Walk("decode", _typemap(cls), MAX_DEPTH).run(name, fields)


def _reject_ext(code: int, data: bytes) -> Any:
    raise MessageError(f"msgpack extension type {code} is not allowed in messages")


def _known_hint(names: list[str]) -> str:
    if not names:
        return "; no message types are registered"
    shown = ", ".join(sorted(names)[:10])
    return f"; known: {shown}{', ...' if len(names) > 10 else ''}"


_ID_PREFIX = os.urandom(6).hex()  # this process's; a counter tells its ids apart
_ID_COUNTER = itertools.count()


def _new_id_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_id_prefix)


def new_message_id() -> str:
    """A unique, time-ordered message id: nanoseconds, a random per-process prefix and a
    counter (all hex)."""
    return f"{time.time_ns():016x}{_ID_PREFIX}{next(_ID_COUNTER):x}"


_MAX_TEXT = 256
_MAX_PID = (1 << 63) - 1


@dataclass(slots=True)
class Envelope:
    """A message in transit: addressing, ids and the encoded payload."""

    id: str
    sender: int
    receiver: int
    type: str
    payload: bytes
    correlation_id: str | None = None
    reply_to: str | None = None
    deadline: float | None = None
    timestamp: float = field(default_factory=time.time)
    topic: str | None = None

    @classmethod
    def new(cls, msg: Any, *, sender: int, receiver: int, **kwargs: Any) -> Envelope:
        """Wrap a @message instance (or dict) with a fresh id."""
        name = UNTYPED if type(msg) is dict else _info(type(msg)).name
        return cls(new_message_id(), sender, receiver, name, encode(msg), **kwargs)

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and self.deadline <= (time.time() if now is None else now)

    def to_wire(self) -> list:
        return [self.id, self.sender, self.receiver, self.type, self.payload,
                self.correlation_id, self.reply_to, self.deadline, self.timestamp, self.topic]

    @classmethod
    def from_wire(cls, w: Any) -> Envelope:
        """Rebuild from ``to_wire()`` form, checking every field's type and range."""
        if type(w) not in (list, tuple) or len(w) != 10:
            raise MessageError(f"an envelope is a 10-item list, got {_describe(w)}")
        env = cls(*w)
        _check_text(env.id, "id", optional=False)
        _check_text(env.type, "type", optional=False)
        for value, name in ((env.correlation_id, "correlation_id"),
                            (env.reply_to, "reply_to"), (env.topic, "topic")):
            if value is not None:
                _check_text(value, name, optional=True)
        for pid, name in ((env.sender, "sender"), (env.receiver, "receiver")):
            if type(pid) is not int or not 0 <= pid <= _MAX_PID:
                raise MessageError(f"envelope.{name}: expected a pid (int >= 0), got {pid!r}")
        if type(env.payload) is not bytes:
            raise MessageError(f"envelope.payload: expected bytes, got {_describe(env.payload)}")
        if env.deadline is not None:
            env.deadline = _check_time(env.deadline, "deadline")
        env.timestamp = _check_time(env.timestamp, "timestamp")
        return env


def _check_time(t: Any, name: str) -> float:
    if type(t) not in (int, float) or not math.isfinite(t):
        raise MessageError(f"envelope.{name}: expected epoch seconds, got {t!r}")
    return float(t)


def _check_text(value: Any, name: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if type(value) is not str or not value or len(value) > _MAX_TEXT:
        raise MessageError(
            f"envelope.{name}: expected a non-empty str of at most {_MAX_TEXT} characters, "
            f"got {value!r:.80}"
        )
