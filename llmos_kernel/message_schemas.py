"""Message schemas as plain data, and the one walker that checks values against them.

A schema is ``{"name", "version", "fields", "defs"}``: plain data, so the kernel (which
never imports agent code) can validate payloads of types that exist only in agent
programs. Field types are a small closed set that maps one-to-one onto msgpack: None,
bool, int, float, str, bytes, ``list[T]``, ``tuple[T, ...]``, ``dict[str, T]``,
``Optional[T]``, ``Literal[...]``, nested ``@message`` classes and ``Any`` (any plain
msgpack value).

Type descriptors in a schema are ``"none" | "bool" | "int" | "float" | "str" |
"bytes" | "any"`` or one-key dicts: ``{"list": D}``, ``{"tuple": D}``,
``{"dict": D}``, ``{"optional": D}``, ``{"literal": [values]}``,
``{"message": name}`` (a name defined in the schema's ``"defs"``, or the
schema's own name for recursive types).

``descriptor_of`` builds descriptors from type hints; ``check_schema`` refuses a malformed
schema; ``Walk`` encodes, decodes, validates or checks values against descriptors. Every
failure of untrusted input is a MessageError whose text names the field path, e.g.
``Order.items[2].qty: expected int, got str``.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from llmos_kernel.errors import InvalidArgument, MessageError

MAX_DEPTH = 32

_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_SCALARS = {"none": type(None), "bool": bool, "int": int, "float": float, "str": str,
            "bytes": bytes}
_PY_SCALARS = {v: k for k, v in _SCALARS.items()}
_CONTAINERS = ("list", "tuple", "dict", "optional")
_LITERAL_TYPES = (type(None), bool, int, float, str, bytes)


def descriptor_of(tp: Any, cls: type, own_name: str, where: str, refs: dict[str, type]) -> Any:
    """The descriptor of field type ``tp`` in message class ``cls`` (named ``own_name``);
    nested message classes are collected in ``refs``. InvalidArgument names ``where``."""
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
        return {"list": descriptor_of(args[0], cls, own_name, f"{where}[]", refs)}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"tuple": descriptor_of(args[0], cls, own_name, f"{where}[]", refs)}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"dict": descriptor_of(args[1], cls, own_name, f"{where}[]", refs)}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return {"optional": descriptor_of(inner[0], cls, own_name, where, refs)}
    if origin is Literal and all(type(a) in _LITERAL_TYPES for a in args):
        return {"literal": list(args)}
    raise InvalidArgument(
        f"{where}: type {tp!r} is not allowed in a message; use None, bool, int, float, str, "
        f"bytes, list[T], tuple[T, ...], dict[str, T], Optional[T], Literal[...], Any or a "
        f"@message class"
    )


def check_schema(schema: Any) -> None:
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


class Walk:
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
                raise MessageError(f"{path}: expected {type_name}, got {describe(value)}")
            return {f: self.value(d, getattr(value, f), _sub(path, ".", f), depth + 1)
                    for f, d in descs.items()}
        if not isinstance(value, dict):
            raise MessageError(f"{path}: expected {type_name} fields (a map), got "
                               f"{describe(value)}")
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
                return check_plain(value, path, depth, self.max_depth)
            if expected is float and type(value) is int:
                return float(value)
            if expected is bytes and self.mode == "encode" and type(value) is bytearray:
                return bytes(value)
            raise MessageError(f"{path}: expected {_type_name(desc)}, got {describe(value)}")
        if depth > self.max_depth:
            raise MessageError(f"{path}: nested deeper than {self.max_depth} levels")
        ((kind, arg),) = desc.items()
        if kind == "optional":
            return None if value is None else self.value(arg, value, path, depth)
        if kind in ("list", "tuple"):
            ok = (list, tuple) if self.mode == "encode" else (list,)
            if type(value) not in ok:
                raise MessageError(f"{path}: expected {_type_name(desc)}, got {describe(value)}")
            items = [self.value(arg, v, _sub(path, "[]", i), depth + 1)
                     for i, v in enumerate(value)]
            return tuple(items) if kind == "tuple" and self.mode == "decode" else items
        if kind == "dict":
            if type(value) is not dict or not all(type(k) is str for k in value):
                raise MessageError(f"{path}: expected {_type_name(desc)}, got {describe(value)}")
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


def check_plain(value: Any, path: str | None, depth: int, max_depth: int) -> Any:
    """An ``Any`` field: plain msgpack values only (maps keyed by str or bytes)."""
    if depth > max_depth:
        raise MessageError(f"{path}: nested deeper than {max_depth} levels")
    kind = type(value)
    if kind is int and not _INT_MIN <= value <= _INT_MAX:
        raise MessageError(f"{path}: int {value} does not fit in 64 bits")
    if kind in _LITERAL_TYPES:
        return value
    if kind in (list, tuple):
        return [check_plain(v, _sub(path, "[]", i), depth + 1, max_depth)
                for i, v in enumerate(value)]
    if kind is dict:
        for k in value:
            if type(k) not in (str, bytes):
                raise MessageError(f"{path}: map keys must be str or bytes, got {describe(k)}")
        return {k: check_plain(v, _sub(path, "[k]", k), depth + 1, max_depth)
                for k, v in value.items()}
    raise MessageError(f"{path}: {describe(value)} is not a plain msgpack value")


def describe(value: Any) -> str:
    """A value's type name, as error messages show it."""
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


def schema_typemap(schema: dict) -> dict[str, tuple[dict, None]]:
    typemap = {n: (d["fields"], None) for n, d in schema.get("defs", {}).items()}
    typemap[schema["name"]] = (schema["fields"], None)
    return typemap


def validate(schema: dict, fields: Any, *, max_depth: int = MAX_DEPTH) -> dict:
    """Check a message's field map against a schema; return the fields (ints coerced to float
    where the schema says float). Raises MessageError naming the field path."""
    check_schema(schema)
    return _validate_checked(schema, fields, max_depth)


def _validate_checked(schema: dict, fields: Any, max_depth: int = MAX_DEPTH) -> dict:
    return Walk("validate", schema_typemap(schema), max_depth).run(schema["name"], fields)


