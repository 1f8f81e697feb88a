"""Typed messages: dataclasses declared with ``@message``, carried as msgpack.

A message travels as ``{"t": type name, "v": version, "f": {field: value}}``.
Every message type has a *schema*: plain data describing its fields, so the
kernel (which never imports agent code) can validate payloads of types that
exist only in agent programs. Schemas, their type descriptors and the walker
that checks values against them live in ``llmos_kernel.message_schemas``; this
module declares message types, knows them by name (``MessageRegistry``),
encodes and decodes them, and wraps them in an ``Envelope`` for transit.

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
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from llmos_kernel.errors import AlreadyExists, InvalidArgument, MessageError
from llmos_kernel.message_schemas import (
    MAX_DEPTH,
    Walk,
    check_plain,
    check_schema,
    describe,
    descriptor_of,
    schema_typemap,
    validate,
)

__all__ = [
    "DEFAULT_REGISTRY",
    "MAX_DEPTH",
    "MAX_MESSAGE_BYTES",
    "UNTYPED",
    "Envelope",
    "MessageRegistry",
    "RawMessage",
    "check",
    "decode",
    "encode",
    "message",
    "message_type",
    "new_message_id",
    "schema_of",
    "validate",
]

MAX_MESSAGE_BYTES = 1 << 20
UNTYPED = "dict"


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
    it (a re-imported module, a re-run notebook cell), and so does a class of the
    same name and schema from another module (one program run both as a file and
    as a module); a different schema claiming a taken name raises AlreadyExists.
    """

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}
        self._schemas: dict[str, dict] = {}
        self._walks: dict[tuple[str, str], Walk] = {}  # for types known by schema alone

    def register(self, cls: type) -> None:
        info = _info(cls)
        old = self._classes.get(info.name)
        if old is not None and _info(old).qualified != info.qualified and \
                schema_of(old) != schema_of(cls):
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
        check_schema(schema)
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

    def _walk(self, name: str, mode: str) -> Walk:
        """A cached pass over a type known by schema alone."""
        walk = self._walks.get((name, mode))
        if walk is None:
            walk = self._walks[name, mode] = Walk(
                mode, schema_typemap(self._schemas[name]), MAX_DEPTH)
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
        where = f"{cls.__qualname__}.{f.name}"
        descs[f.name] = descriptor_of(hints[f.name], cls, name, where, refs)
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    cls.__llmos_message__ = _MessageInfo(name, version, descs, refs, qualified)
    registry.register(cls)
    return cls


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


def _plain(value: Any) -> Any:
    """A whole untyped message (or other ``Any`` value) checked: plain msgpack values only."""
    try:
        return check_plain(value, None, 0, MAX_DEPTH)
    except MessageError:
        check_plain(value, UNTYPED, 0, MAX_DEPTH)
        raise


def encode(msg: Any, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """msgpack bytes of a @message instance, or of a plain dict as an untyped message."""
    if type(msg) is dict:
        for k in msg:
            if type(k) is not str:
                raise MessageError(f"{UNTYPED}: field names must be str, got {describe(k)}")
        name, version = UNTYPED, 1
        fields = _plain(msg)
    else:
        try:
            info = _info(type(msg))
        except InvalidArgument:
            raise MessageError(
                f"cannot encode {describe(msg)}: send a @message instance or a dict"
            ) from None
        name, version = info.name, info.version
        fields = Walk("encode", _typemap(type(msg)), MAX_DEPTH).run(name, msg)
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
    walk = registry._walk(name, "check") if cls is None else Walk("check", _typemap(cls),
                                                                     MAX_DEPTH)
    walk.run(name, fields)
    return name


def _unpack(data: Any, max_bytes: int) -> tuple[str, int, dict]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"a message is bytes, got {describe(data)}")
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
    return Walk("decode", _typemap(cls), MAX_DEPTH).run(name, fields)


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
            raise MessageError(f"an envelope is a 10-item list, got {describe(w)}")
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
            raise MessageError(f"envelope.payload: expected bytes, got {describe(env.payload)}")
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
