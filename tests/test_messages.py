"""Typed messages: round trips, schemas the kernel can check, and bad input rejected cleanly."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Literal

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmos_kernel.errors import AlreadyExists, InvalidArgument, MessageError
from llmos_kernel.messages import (
    DEFAULT_REGISTRY,
    Envelope,
    MessageRegistry,
    RawMessage,
    decode,
    encode,
    message,
    schema_of,
    validate,
)

INT64 = st.integers(-(2**63), 2**64 - 1)
SCALAR_VALUES = {
    type(None): st.none(),
    bool: st.booleans(),
    int: INT64,
    float: st.floats(allow_nan=False),
    str: st.text(max_size=8),
    bytes: st.binary(max_size=8),
}
PLAIN = st.recursive(
    st.one_of(*SCALAR_VALUES.values()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6,
)
_names = itertools.count()


@st.composite
def field_type(draw, registry: MessageRegistry, depth: int = 0) -> tuple[Any, st.SearchStrategy]:
    """A random allowed field type and a strategy for its values."""
    kinds = ["scalar", "any", "literal"] + (
        ["list", "tuple", "dict", "optional", "message"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "scalar":
        tp = draw(st.sampled_from(list(SCALAR_VALUES)))
        return tp, SCALAR_VALUES[tp]
    if kind == "any":
        return Any, PLAIN
    if kind == "literal":
        values = draw(st.lists(st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=2),
                               min_size=1, max_size=3, unique_by=lambda v: (type(v), v)))
        return Literal[tuple(values)], st.sampled_from(values)
    if kind == "message":
        cls, values = draw(message_class(registry, depth + 1))
        return cls, values
    inner, values = draw(field_type(registry, depth + 1))
    if kind == "list":
        return list[inner], st.lists(values, max_size=3)
    if kind == "tuple":
        return tuple[inner, ...], st.lists(values, max_size=3).map(tuple)
    if kind == "dict":
        return dict[str, inner], st.dictionaries(st.text(max_size=4), values, max_size=3)
    return inner | None, st.none() | values


@st.composite
def message_class(draw, registry: MessageRegistry, depth: int = 0
                  ) -> tuple[type, st.SearchStrategy]:
    """A freshly declared @message class with 0-4 random fields, and a strategy for instances."""
    n = draw(st.integers(0, 4))
    types_and_values = [draw(field_type(registry, depth)) for _ in range(n)]
    name = f"M{next(_names)}"
    cls = dataclasses.make_dataclass(name, [(f"f{i}", tp) for i, (tp, _) in
                                            enumerate(types_and_values)])
    message(cls, name=name, version=draw(st.integers(1, 3)), registry=registry)
    values = st.builds(cls, **{f"f{i}": v for i, (_, v) in enumerate(types_and_values)})
    return cls, values


@st.composite
def typed_messages(draw) -> tuple[MessageRegistry, Any]:
    registry = MessageRegistry()
    _, values = draw(message_class(registry))
    return registry, draw(values)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(typed_messages())
def test_every_field_type_round_trips(case):
    registry, msg = case
    data = encode(msg)
    back = decode(data, registry=registry, expected=type(msg))
    assert back == msg
    assert encode(back) == data


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(typed_messages(), st.data())
def test_kernel_schema_check_agrees_with_decoding_by_class(case, data):
    """validate(schema_of(cls)) and a schema-only registry accept exactly what the class does."""
    registry, msg = case
    cls = type(msg)
    fields = msgpack.unpackb(encode(msg))["f"]
    change = data.draw(st.sampled_from(["none", "replace", "drop", "add"]))
    if change != "none" and fields:
        key = data.draw(st.sampled_from(sorted(fields)))
        if change == "replace":
            fields[key] = data.draw(PLAIN)
        elif change == "drop":
            del fields[key]
    if change == "add":
        fields["extra"] = data.draw(PLAIN)
    schema = schema_of(cls)
    kernel_view = MessageRegistry()
    kernel_view.register_schema(msgpack.unpackb(msgpack.packb(schema)))
    payload = msgpack.packb({"t": schema["name"], "v": schema["version"], "f": fields})

    outcomes = []
    for check in (lambda: validate(schema, fields), lambda: decode(payload, registry=registry),
                  lambda: decode(payload, registry=kernel_view)):
        try:
            outcomes.append(check())
        except MessageError:
            outcomes.append(None)
    checked, by_class, by_schema = outcomes
    assert (checked is None) == (by_class is None) == (by_schema is None)
    if by_class is not None:
        assert msgpack.unpackb(encode(by_class))["f"] == checked
        assert by_schema == RawMessage(schema["name"], schema["version"], checked)


@message(name="test.Item")
class Item:
    sku: str
    qty: int


@message(name="test.Order", version=2)
class Order:
    items: list[Item]
    tags: tuple[str, ...] = ()
    note: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    parent: Order | None = None


ORDER = Order([Item("a", 1), Item("b", 2)], ("x",), "hi", {"k": [1, b"z"]},
              parent=Order([Item("c", 3)]))


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    def flip(args):
        i, byte = args
        return data[:i] + bytes([byte]) + data[i + 1:]

    positions = st.integers(0, len(data) - 1)
    return st.one_of(
        st.tuples(positions, st.integers(0, 255)).map(flip),
        positions.map(lambda i: data[:i]),
        st.tuples(positions, st.binary(min_size=1, max_size=4)).map(
            lambda a: data[:a[0]] + a[1] + data[a[0]:]),
    )


@settings(max_examples=400)
@given(st.binary(max_size=64) | _mutations(encode(ORDER)))
def test_garbage_bytes_give_message_error_or_a_valid_message(data):
    try:
        result = decode(data)
    except MessageError:
        return
    assert isinstance(result, (Order, Item, dict))
    assert decode(encode(result)) == result


def _order_payload(**changes: Any) -> bytes:
    wire = msgpack.unpackb(encode(ORDER))
    wire["f"].update(changes)
    return msgpack.packb(wire)


@pytest.mark.parametrize(
    ("payload", "expected_text"),
    [
        (_order_payload(items=[{"sku": "a", "qty": 1}, {"sku": "b", "qty": "2"}]),
         "test.Order.items[1].qty: expected int, got str"),
        (_order_payload(tags="x"), "test.Order.tags: expected tuple[str, ...], got str"),
        (_order_payload(meta={"k": 1, "n": {"deep": msgpack.ExtType(3, b"")}}), "extension"),
        (_order_payload(parent={"items": [], "tags": [], "note": None, "meta": {}}),
         "test.Order.parent: test.Order fields do not match its schema; missing parent"),
        (_order_payload(surprise=1), "unexpected surprise"),
        (msgpack.packb({"t": "test.Nope", "v": 1, "f": {}}), "unknown message type 'test.Nope'"),
        (msgpack.packb({"t": "test.Order", "v": 1, "f": {}}), "version 1, but version 2"),
        (msgpack.packb({"t": "test.Order", "f": {}}), '{"t": type name'),
        (msgpack.packb([1, 2, 3]), '{"t": type name'),
        (b"\xc1", "not valid msgpack"),
        (encode(ORDER) + b"\x00", "not valid msgpack"),
    ],
)
def test_bad_payloads_name_what_is_wrong(payload, expected_text):
    with pytest.raises(MessageError, match=re.escape(expected_text)):
        decode(payload)


def test_size_limits_hold_both_ways():
    big = Order([Item("x" * 1000, i) for i in range(50)])
    data = encode(big)
    with pytest.raises(MessageError, match=f"{len(data)} bytes, over the 1000-byte limit"):
        decode(data, max_bytes=1000)
    with pytest.raises(MessageError, match="over the 1000-byte limit"):
        encode(big, max_bytes=1000)


def test_encode_checks_field_types_before_sending():
    with pytest.raises(MessageError, match=r"test.Order.items\[0\].qty: expected int, got float"):
        encode(Order([Item("a", 1.5)]))
    with pytest.raises(MessageError, match=r"test.Order.items\[0\]: expected test.Item, got dict"):
        encode(Order([{"sku": "a", "qty": 1}]))
    with pytest.raises(MessageError, match="does not fit in 64 bits"):
        encode(Item("a", 2**64))
    with pytest.raises(MessageError, match="send a @message instance or a dict"):
        encode(object())


def test_expected_type_and_untyped_dicts():
    assert decode(encode(ORDER), expected=(Item, Order)) == ORDER
    with pytest.raises(MessageError, match="expected a Item message, got test.Order"):
        decode(encode(ORDER), expected=Item)
    untyped = {"text": "hi", "n": [1, 2.5, None], "raw": b"\x00"}
    assert decode(encode(untyped), expected=dict) == untyped
    assert decode(encode(ORDER), registry={"test.Order": Order}) == ORDER
    with pytest.raises(MessageError, match=re.escape("dict['k']: Timestamp is not a plain")):
        decode(msgpack.packb({"t": "dict", "v": 1, "f": {"k": msgpack.Timestamp(1)}}))


def test_validate_rejects_deep_nesting_and_malformed_schemas():
    schema = {"name": "Deep", "version": 1, "fields": {"x": "any"}}
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(MessageError, match="nested deeper than 32 levels"):
        validate(schema, {"x": deep})
    assert validate(schema, {"x": deep}, max_depth=64) == {"x": deep}
    for bad in ({"name": "X", "version": 1, "fields": {"x": "complex"}},
                {"name": "X", "version": 1, "fields": {"x": {"message": "Missing"}}},
                {"name": "X", "version": 0, "fields": {}},
                ["not", "a", "schema"]):
        with pytest.raises(MessageError, match="malformed schema"):
            validate(bad, {})


def test_schema_is_plain_data_and_covers_nested_types():
    schema = schema_of(Order)
    assert msgpack.unpackb(msgpack.packb(schema)) == schema
    assert schema["name"] == "test.Order" and schema["version"] == 2
    assert schema["fields"]["items"] == {"list": {"message": "test.Item"}}
    assert schema["fields"]["parent"] == {"optional": {"message": "test.Order"}}
    assert schema["defs"] == {"test.Item": {"version": 1, "fields": {"sku": "str", "qty": "int"}}}
    assert schema_of("test.Order") == schema


@pytest.mark.parametrize(
    ("annotation", "complaint"),
    [(set[int], "Bad.x: type set[int] is not allowed"),
     (tuple[int, str], "Bad.x: type tuple[int, str] is not allowed"),
     (list, "Bad.x: type <class 'list'> is not allowed"),
     (dict[int, str], "Bad.x: type dict[int, str] is not allowed"),
     (int | str, "Bad.x: type int | str is not allowed"),
     (list[complex], "Bad.x[]: type <class 'complex'> is not allowed")],
)
def test_unsupported_field_types_fail_at_declaration(annotation, complaint):
    cls = dataclasses.make_dataclass("Bad", [("x", annotation)])
    with pytest.raises(InvalidArgument, match=re.escape(complaint)):
        message(cls, registry=MessageRegistry())


def test_declaration_rules():
    registry = MessageRegistry()

    @message(registry=registry)
    class Ping:
        n: int

    assert registry.lookup("test_declaration_rules.<locals>.Ping") is Ping

    @message(name="test_declaration_rules.<locals>.Ping", registry=registry)
    class Ping:
        n: int
        m: int = 0

    assert registry.lookup("test_declaration_rules.<locals>.Ping") is Ping
    other = dataclasses.make_dataclass("Ping", [("n", int)])
    other.__qualname__ = "test_declaration_rules.<locals>.Ping"
    with pytest.raises(AlreadyExists, match="explicit @message"):
        message(other, registry=registry)
    # the same declaration from another module (a program run as a file, then as a module)
    same = dataclasses.make_dataclass("Ping", [("n", int), ("m", int, dataclasses.field(
        default=0))])
    same.__module__ = "llmos_program_0123"
    same.__qualname__ = "test_declaration_rules.<locals>.Ping"
    message(same, name="test_declaration_rules.<locals>.Ping", registry=registry)
    assert registry.lookup("test_declaration_rules.<locals>.Ping") is same
    with pytest.raises(InvalidArgument, match="init=False"):
        message(dataclasses.make_dataclass(
            "Hidden", [("x", int, dataclasses.field(init=False, default=0))]), registry=registry)
    with pytest.raises(InvalidArgument, match="reserved"):
        message(dataclasses.make_dataclass("D", []), name="dict", registry=registry)
    with pytest.raises(InvalidArgument, match="version must be an int >= 1"):
        message(dataclasses.make_dataclass("V", []), version=0, registry=registry)
    registry.register_schema({"name": "Other", "version": 1, "fields": {"a": "int"}})
    registry.register_schema({"name": "Other", "version": 1, "fields": {"a": "int"}})
    with pytest.raises(AlreadyExists, match="different schema"):
        registry.register_schema({"name": "Other", "version": 2, "fields": {"a": "int"}})
    assert "test.Order" in DEFAULT_REGISTRY


def test_a_constructor_that_rejects_its_fields_is_a_message_error():
    registry = MessageRegistry()

    @message(name="Positive", registry=registry)
    class Positive:
        n: int

        def __post_init__(self):
            if self.n <= 0:
                raise ValueError("n must be positive")

    with pytest.raises(MessageError, match="Positive rejected its fields: n must be positive"):
        decode(msgpack.packb({"t": "Positive", "v": 1, "f": {"n": -1}}), registry=registry)


ENVELOPES = st.builds(
    Envelope,
    id=st.text(min_size=1, max_size=40),
    sender=st.integers(0, 2**63 - 1),
    receiver=st.integers(0, 2**63 - 1),
    type=st.text(min_size=1, max_size=20),
    payload=st.binary(max_size=50),
    correlation_id=st.none() | st.text(min_size=1, max_size=10),
    reply_to=st.none() | st.text(min_size=1, max_size=10),
    deadline=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    timestamp=st.floats(allow_nan=False, allow_infinity=False),
    topic=st.none() | st.text(min_size=1, max_size=10),
)


@given(ENVELOPES)
def test_envelope_wire_round_trip(env):
    wire = msgpack.unpackb(msgpack.packb(env.to_wire(), use_bin_type=True), raw=False)
    assert Envelope.from_wire(wire) == env


GOOD_WIRE = Envelope("id1", 1, 2, "test.Item", encode(Item("a", 1)), deadline=5).to_wire()


@pytest.mark.parametrize(
    ("index", "value", "complaint"),
    [(0, "", "envelope.id"), (0, 7, "envelope.id"), (1, -1, "envelope.sender"),
     (2, True, "envelope.receiver"), (2, "2", "envelope.receiver"), (3, None, "envelope.type"),
     (4, "text", "envelope.payload"), (5, 3, "envelope.correlation_id"),
     (6, b"x", "envelope.reply_to"), (7, math.nan, "envelope.deadline"),
     (8, None, "envelope.timestamp"), (9, "", "envelope.topic"), (0, "x" * 300, "envelope.id")],
)
def test_bad_envelopes_are_rejected_field_by_field(index, value, complaint):
    wire = list(GOOD_WIRE)
    wire[index] = value
    with pytest.raises(MessageError, match=complaint):
        Envelope.from_wire(wire)


def test_envelope_shape_and_helpers():
    assert Envelope.from_wire(GOOD_WIRE).deadline == 5.0
    for bad in (GOOD_WIRE[:9], {"id": "x"}, None):
        with pytest.raises(MessageError, match="10-item list"):
            Envelope.from_wire(bad)
    env = Envelope.new(ORDER, sender=0, receiver=3, deadline=10.0)
    assert env.type == "test.Order" and decode(env.payload) == ORDER
    assert env.expired(now=10.0) and not env.expired(now=9.0)
    assert Envelope.new(ORDER, sender=0, receiver=3).id != env.id
