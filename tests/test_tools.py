"""Tools: schemas derived from type hints, argument validation, the registry and approvals.

The expected schemas below are hand-written specifications of what each hint means in JSON
Schema; generated instances are checked with jsonschema's own validator and with llguidance,
the grammar engine that will force model output to match them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import re
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypedDict
from zoneinfo import ZoneInfo

import jsonschema
import llguidance
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from llmos_kernel.services.tools import (
    Range,
    ToolRegistry,
    ToolSpec,
    builtin_tools,
    clock,
    decode_args,
    json_schema,
    spec_of,
    to_json,
    tool,
    validate_args,
)


class Color(enum.Enum):
    """A paint colour."""

    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Point:
    """A point on the plane.

    Attributes:
        x: Distance from the left edge.
        y: Distance from the top edge.
    """

    x: float
    y: float = 0.0


@dataclasses.dataclass
class Shape:
    name: str
    corners: list[Point]
    fill: Color | None = None


@dataclasses.dataclass
class Node:
    label: str
    children: list[Node]


class Filters(TypedDict, total=False):
    """Optional filters."""

    tag: str
    limit: int


class Page(TypedDict):
    number: int
    lines: list[str]


HINT_SCHEMAS = [
    (str, {"type": "string"}),
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (bool, {"type": "boolean"}),
    (type(None), {"type": "null"}),
    (Any, {}),
    (Optional[int], {"type": ["integer", "null"]}),  # noqa: UP045 - the spelling under test
    (int | float, {"type": ["integer", "number"]}),
    (list[str], {"type": "array", "items": {"type": "string"}}),
    (list, {"type": "array"}),
    (dict[str, int], {"type": "object", "additionalProperties": {"type": "integer"}}),
    (tuple[int, ...], {"type": "array", "items": {"type": "integer"}}),
    (
        tuple[int, str],
        {
            "type": "array",
            "prefixItems": [{"type": "integer"}, {"type": "string"}],
            "minItems": 2,
            "maxItems": 2,
        },
    ),
    (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}),
    (Literal[1, "one"], {"enum": [1, "one"]}),
    (Color, {"description": "A paint colour.", "type": "string", "enum": ["red", "green"]}),
    (Level, {"type": "integer", "enum": [1, 2]}),
    (Annotated[int, "how many"], {"type": "integer", "description": "how many"}),
    (
        Annotated[float, "a share", Range(0, 1)],
        {"type": "number", "description": "a share", "minimum": 0, "maximum": 1},
    ),
    (
        Point,
        {
            "description": "A point on the plane.",
            "type": "object",
            "properties": {
                "x": {"type": "number", "description": "Distance from the left edge."},
                "y": {
                    "type": "number",
                    "default": 0.0,
                    "description": "Distance from the top edge.",
                },
            },
            "required": ["x"],
            "additionalProperties": False,
        },
    ),
    (
        Filters,
        {
            "description": "Optional filters.",
            "type": "object",
            "properties": {"tag": {"type": "string"}, "limit": {"type": "integer"}},
            "required": [],
            "additionalProperties": False,
        },
    ),
    (
        Page,
        {
            "type": "object",
            "properties": {
                "number": {"type": "integer"},
                "lines": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["number", "lines"],
            "additionalProperties": False,
        },
    ),
    (
        list[Point] | None,
        {"anyOf": [{"type": "array", "items": json_schema(Point)}, {"type": "null"}]},
    ),
]


@pytest.mark.parametrize(("hint", "expected"), HINT_SCHEMAS, ids=[str(h) for h, _ in HINT_SCHEMAS])
def test_schema_for_each_supported_hint(hint: Any, expected: dict) -> None:
    schema = json_schema(hint)
    assert schema == expected
    jsonschema.Draft202012Validator.check_schema(schema)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""


@pytest.mark.parametrize(
    ("hint", "fragment"),
    [
        (set[int], "unsupported type hint"),
        (dict[int, str], "non-string keys"),
        (bytes, "bytes"),
        (Node, "Node contains itself"),
    ],
)
def test_unsupported_hints_are_refused(hint: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(fragment)):
        json_schema(hint)


# --- the decorator ---------------------------------------------------------------------------


@tool(timeout_s=2.5)
def draw(
    shape: Shape,
    scale: Annotated[float, "Zoom factor", Range(0.1, 10)] = 1.0,
    color: Color = Color.RED,
    layers: list[int] | None = None,
    origin: tuple[int, int] = (0, 0),
    mode: Literal["fill", "outline"] = "fill",
    filters: Filters | None = None,
) -> dict[str, float]:
    """Draw a shape on the canvas.

    Anything after the first paragraph stays out of the description.

    Args:
        shape: What to draw,
            with its corners in order.
        scale (float): Ignored here: the Annotated text wins.
        color: Fill colour.
        mode: Whether to fill the shape or trace its outline.

    Returns:
        The drawn area.
    """
    return {"area": float(len(shape.corners)) * scale}


def test_spec_from_signature_and_google_docstring() -> None:
    spec = spec_of(draw)
    assert spec.name == "draw"
    assert spec.description == "Draw a shape on the canvas."
    assert spec.timeout_s == 2.5 and spec.dangerous is False
    assert spec.returns == {"type": "object", "additionalProperties": {"type": "number"}}
    shape = json_schema(Shape)
    assert spec.parameters == {
        "type": "object",
        "properties": {
            "shape": {**shape, "description": "What to draw, with its corners in order."},
            "scale": {
                "type": "number",
                "description": "Zoom factor",
                "minimum": 0.1,
                "maximum": 10,
                "default": 1.0,
            },
            "color": {
                "type": "string",
                "enum": ["red", "green"],
                "description": "A paint colour.",
                "default": "red",
            },
            "layers": {
                "anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}],
                "default": None,
            },
            "origin": {
                "type": "array",
                "prefixItems": [{"type": "integer"}, {"type": "integer"}],
                "minItems": 2,
                "maxItems": 2,
                "default": [0, 0],
            },
            "mode": {
                "type": "string",
                "enum": ["fill", "outline"],
                "description": "Whether to fill the shape or trace its outline.",
                "default": "fill",
            },
            "filters": {"anyOf": [json_schema(Filters), {"type": "null"}], "default": None},
        },
        "required": ["shape"],
        "additionalProperties": False,
    }
    assert spec.to_openai() == {
        "type": "function",
        "function": {
            "name": "draw",
            "description": spec.description,
            "parameters": spec.parameters,
        },
    }


def test_rest_docstring_async_function_and_custom_name() -> None:
    @tool(name="web-search", dangerous=True)
    async def search(query: str, limit: int = 5) -> list[str]:
        """Search the web
        for pages.

        :param query: Words to look for.
        :param int limit: Most results
            to return.
        :returns: URLs.
        """
        return [query] * limit

    spec = spec_of(search)
    assert asyncio.iscoroutinefunction(search)
    assert (spec.name, spec.dangerous) == ("web-search", True)
    assert spec.description == "Search the web for pages."
    assert spec.parameters["properties"] == {
        "query": {"type": "string", "description": "Words to look for."},
        "limit": {"type": "integer", "default": 5, "description": "Most results to return."},
    }
    assert spec.parameters["required"] == ["query"]


def test_methods_are_tools_without_self() -> None:
    class Notebook:
        def __init__(self) -> None:
            self.notes: list[str] = []

        @tool
        def add(self, text: str) -> int:
            """Add a note."""
            self.notes.append(text)
            return len(self.notes)

    book = Notebook()
    assert spec_of(book.add).parameters["properties"] == {"text": {"type": "string"}}
    registry = ToolRegistry()
    registry.register(book.add)
    assert asyncio.run(registry.call(1, "add", {"text": "hi"})) == 1
    assert book.notes == ["hi"]


def no_hint(x, y: int) -> None: ...


def star_args(*items: int) -> None: ...


def star_kwargs(**options: int) -> None: ...


def positional_only(x: int, /) -> None: ...


NOT_JSON = object()


def bad_default(when: Any = NOT_JSON) -> None: ...


def set_param(tags: set[str]) -> None: ...


@pytest.mark.parametrize(
    ("fn", "fragment"),
    [
        (no_hint, "parameter 'x' has no type annotation"),
        (star_args, "*items"),
        (star_kwargs, "**options"),
        (positional_only, "'x' is positional-only"),
        (bad_default, "'when'"),
        (set_param, "'tags'"),
        (lambda: None, "'<lambda>'"),
    ],
)
def test_undeclarable_functions_are_refused_at_decoration(fn: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(fragment)):
        tool(fn)


def test_spec_of_needs_a_tool() -> None:
    with pytest.raises(InvalidArgument, match="@tool"):
        spec_of(star_args)
    assert spec_of(spec_of(draw)) is spec_of(draw)


def test_hand_written_spec_is_checked() -> None:
    with pytest.raises(InvalidArgument, match="type 'object'"):
        ToolSpec("t", "", {"type": "array"})
    with pytest.raises(InvalidArgument, match="invalid parameters schema"):
        ToolSpec("t", "", {"type": "object", "properties": {"x": {"type": "strin"}}})
    with pytest.raises(InvalidArgument, match="timeout_s"):
        ToolSpec("t", "", {"type": "object"}, timeout_s=0)


# --- validation: generated instances ---------------------------------------------------------

json_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()


def from_schema(schema: dict) -> st.SearchStrategy[Any]:
    """Instances of the schema subset tools use, built from the schema alone."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(branch) for branch in schema["anyOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kind])
    if kind is None:
        return st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3), max_leaves=5)
    if kind == "array" and "prefixItems" in schema:
        return st.tuples(*map(from_schema, schema["prefixItems"])).map(list)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=3)
    if kind == "object" and "properties" in schema:
        properties, required = schema["properties"], schema["required"]
        return st.fixed_dictionaries(
            {k: from_schema(s) for k, s in properties.items() if k in required},
            optional={k: from_schema(s) for k, s in properties.items() if k not in required},
        )
    if kind == "object":
        return st.dictionaries(st.text(max_size=5), from_schema(schema["additionalProperties"]))
    low, high = schema.get("minimum"), schema.get("maximum")
    whole = st.integers(  # within msgpack's 64 bits unless the schema bounds it
        -(2**63) if low is None else math.ceil(low), 2**63 - 1 if high is None else math.floor(high)
    )
    return {
        "string": st.text(max_size=10),
        "integer": whole,
        "number": whole | st.floats(low, high, allow_nan=False, allow_infinity=False),
        "boolean": st.booleans(),
        "null": st.none(),
    }[kind]


draw_args = from_schema(spec_of(draw).parameters)
WRONG_VALUES = ["text", 12345, 1.5, True, None, [], {}, [{"x": "?"}]]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(draw_args)
def test_instances_built_from_the_schema_validate_and_decode(args: dict) -> None:
    spec = spec_of(draw)
    jsonschema.Draft202012Validator(spec.parameters).validate(args)
    checked = validate_args(spec, args)
    decoded = decode_args(draw, checked)
    assert isinstance(decoded["shape"], Shape)
    assert all(isinstance(corner, Point) for corner in decoded["shape"].corners)
    assert isinstance(decoded.get("color", Color.RED), Color)
    assert isinstance(decoded.get("origin", ()), tuple)
    assert all(isinstance(c["x"], float) for c in checked["shape"]["corners"])  # int -> float
    encoded = to_json(decoded)  # back to JSON, now with the dataclasses' defaults filled in
    assert_includes(encoded, checked)
    assert decode_args(draw, validate_args(spec, encoded)) == decoded


def assert_includes(full: Any, given: Any) -> None:
    """Every value in ``given`` is in ``full`` at the same place."""
    if isinstance(given, dict):
        for key, value in given.items():
            assert_includes(full[key], value)
    elif isinstance(given, list):
        assert len(full) == len(given)
        for whole, part in zip(full, given, strict=True):
            assert_includes(whole, part)
    else:
        assert full == given and type(full) is type(given)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(draw_args, st.data())
def test_mutated_instances_are_rejected_naming_the_field(args: dict, data: st.DataObject) -> None:
    spec = spec_of(draw)
    properties = spec.parameters["properties"]
    mutation = data.draw(st.sampled_from(["drop required", "add unknown", "wrong value"]))
    if mutation == "drop required":
        del args["shape"]
        field = "shape"
    elif mutation == "add unknown":
        names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
        field = data.draw(names.filter(lambda k: k not in properties))
        args[field] = data.draw(json_leaves)
    else:
        field = data.draw(st.sampled_from(sorted(properties)))
        reference = jsonschema.Draft202012Validator(properties[field])
        args[field] = data.draw(
            st.sampled_from(WRONG_VALUES).filter(lambda v: not reference.is_valid(v))
        )
    assert not jsonschema.Draft202012Validator(spec.parameters).is_valid(args)
    with pytest.raises(InvalidArgument) as refused:
        validate_args(spec, args)
    assert re.search(rf"'{re.escape(field)}[.\[']", str(refused.value)), str(refused.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"shape": {"name": "sq", "corners": [{"x": "1"}]}}, "'shape.corners[0].x' must be number"),
        ({"shape": {"name": "sq", "corners": []}, "origin": [1]}, "'origin'"),
        ({"shape": {"name": "sq", "corners": []}, "scale": 11}, "maximum of 10"),
        ({"shape": {"name": "sq", "corners": []}, "mode": "dots"}, "one of ['fill', 'outline']"),
        ({"shape": {"name": "sq", "corners": [], "sides": 4}}, "unexpected argument 'shape.sides'"),
        ({"shape": {"corners": []}}, "missing required argument 'shape.name'"),
        ({"shape": {"name": "sq", "corners": []}, "layers": [1.0]}, "must be integer, got number"),
        ([1, 2], "JSON object of named arguments"),
    ],
)
def test_validation_messages_say_what_to_fix(args: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        validate_args(spec_of(draw), args)


# --- the registry ----------------------------------------------------------------------------


@tool
def echo(text: str) -> str:
    """Return the text."""
    return text


@tool
def shout(text: str) -> str:
    """Return the text in capitals."""
    return text.upper()


def test_scopes_grants_and_allowlists() -> None:
    registry = ToolRegistry()
    registry.register(echo)
    registry.register(shout, owner=10)
    with pytest.raises(AlreadyExists):
        registry.register(echo)
    registry.register(echo, owner=10)  # another scope: its own echo shadows the system one

    assert [s.name for s in registry.list(10, None)] == ["echo", "shout"]
    assert [s.name for s in registry.list(11, None)] == ["echo"]
    assert [s.name for s in registry.list(10, {"shout"})] == ["shout"]

    with pytest.raises(NotFound, match="did you mean 'shout'"):
        registry.get(10, "shoot", None)
    with pytest.raises(NotFound, match="no tool named 'shout'"):
        registry.get(11, "shout", None)
    with pytest.raises(PermissionDenied, match="may not use tool 'echo'"):
        registry.get(10, "echo", {"shout"})

    registry.grant(10, "shout", 11)
    assert asyncio.run(registry.call(11, "shout", {"text": "hey"})) == "HEY"
    with pytest.raises(AlreadyExists):
        registry.grant(10, "echo", 11)  # 11 already sees the system echo by that name
    registry.revoke(10, "shout", 11)
    assert [s.name for s in registry.list(11, None)] == ["echo"]

    registry.grant(10, "shout", 11)
    registry.unregister_owner(10)
    assert [s.name for s in registry.list(10, None)] == ["echo"]
    assert [s.name for s in registry.list(11, None)] == ["echo"]
    with pytest.raises(NotFound):
        registry.grant(10, "shout", 11)


def test_executor_runs_a_registered_spec() -> None:
    seen = []

    async def in_host(args: dict) -> dict:
        seen.append(args)
        return {"echoed": args["text"]}

    registry = ToolRegistry()
    registry.register(spec_of(echo), owner=4, executor=in_host)
    assert asyncio.run(registry.call(4, "echo", {"text": "x"})) == {"echoed": "x"}
    assert seen == [{"text": "x"}]
    with pytest.raises(InvalidArgument, match="executor"):
        registry.register(spec_of(shout))


def test_a_failing_tool_is_a_tool_error_and_the_registry_goes_on() -> None:
    @tool
    def divide(a: int, b: int) -> float:
        """Divide a by b."""
        return a / b

    @tool
    async def broken(flag: bool) -> None:
        """Always fail."""
        raise ValueError(f"bad flag {flag}")

    @tool
    def leave() -> None:
        """Try to stop the whole process."""
        sys.exit(3)

    registry = ToolRegistry()
    for fn in (divide, broken, leave):
        registry.register(fn)

    async def scenario() -> None:
        with pytest.raises(ToolError, match="tool 'leave' failed: SystemExit: 3"):
            await registry.call(1, "leave", {})
        with pytest.raises(ToolError, match="tool 'divide' failed: ZeroDivisionError"):
            await registry.call(1, "divide", {"a": 1, "b": 0})
        with pytest.raises(ToolError, match="tool 'broken' failed: ValueError: bad flag True"):
            await registry.call(1, "broken", {"flag": True})
        assert await registry.call(1, "divide", {"a": 1, "b": 4}) == 0.25

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("result", "fragment"),
    [({1, 2}, "set"), (object(), "object"), ({1: "a"}, "non-string key"), (2**70, "64 bits")],
)
def test_a_result_that_cannot_cross_the_wire_is_a_tool_error(result: Any, fragment: str) -> None:
    @tool
    def weird() -> Any:
        """Return something."""
        return result

    registry = ToolRegistry()
    registry.register(weird)
    with pytest.raises(ToolError, match=fragment):
        asyncio.run(registry.call(1, "weird", {}))


def test_dataclass_and_enum_results_become_plain_data() -> None:
    @tool
    def corner() -> Shape:
        """A one-corner shape."""
        return Shape("dot", [Point(1.0, 2.0)], Color.GREEN)

    registry = ToolRegistry()
    registry.register(corner)
    assert asyncio.run(registry.call(1, "corner", {})) == {
        "name": "dot",
        "corners": [{"x": 1.0, "y": 2.0}],
        "fill": "green",
    }


def test_timeouts_for_sync_and_async_tools_and_the_stuck_thread_cap() -> None:
    release = threading.Event()

    @tool(timeout_s=0.1)
    def hang() -> str:
        """Block until released."""
        release.wait(10)
        return "done"

    @tool(timeout_s=0.1)
    async def nap() -> str:
        """Sleep too long."""
        await asyncio.sleep(10)
        return "done"

    registry = ToolRegistry(max_stuck_threads=1)
    for fn in (hang, nap, echo):
        registry.register(fn)

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(Timeout, match="'nap' did not finish within 0.1s"):
            await registry.call(1, "nap", {})
        with pytest.raises(Timeout, match="'hang' did not finish within 0.1s"):
            await registry.call(1, "hang", {})
        assert time.monotonic() - started < 1.0
        with pytest.raises(QuotaExceeded, match="still running"):
            await registry.call(1, "echo", {"text": "x"})  # the hung thread holds the only slot
        release.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            try:
                assert await registry.call(1, "echo", {"text": "x"}) == "x"
                return
            except QuotaExceeded:
                continue
        raise AssertionError("the stuck thread was never released")

    asyncio.run(scenario())


# --- dangerous tools and approvals -----------------------------------------------------------


@tool(dangerous=True)
def delete(path: str) -> str:
    """Delete a file."""
    return f"deleted {path}"


def test_dangerous_tool_policies(tmp_path: Path) -> None:
    queue = ApprovalQueue(tmp_path / "approvals.db")
    registry = ToolRegistry(queue)
    registry.register(delete)

    async def scenario() -> None:
        assert await registry.call(2, "delete", {"path": "a"}, approval="auto") == "deleted a"
        with pytest.raises(PermissionDenied, match="approval='deny'"):
            await registry.call(2, "delete", {"path": "a"}, approval="deny")
        with pytest.raises(Timeout, match="timed out after 0.1s"):
            await registry.call(2, "delete", {"path": "a"}, approval_timeout_s=0.1)
        with pytest.raises(InvalidArgument, match="approval must be one of"):
            await registry.call(2, "delete", {"path": "a"}, approval="maybe")

    asyncio.run(scenario())
    assert queue.pending() == []
    queue.close()

    without_queue = ToolRegistry()
    without_queue.register(delete)
    with pytest.raises(PermissionDenied, match="no approval queue"):
        asyncio.run(without_queue.call(2, "delete", {"path": "a"}))


@pytest.mark.parametrize("approve", [True, False])
def test_approval_from_another_process_wakes_the_caller(tmp_path: Path, approve: bool) -> None:
    kernel_queue = ApprovalQueue(tmp_path / "approvals.db", poll_interval_s=0.05)
    human_queue = ApprovalQueue(tmp_path / "approvals.db")  # as `llmos approve` opens it
    registry = ToolRegistry(kernel_queue)
    registry.register(delete)

    async def human() -> None:
        while not (waiting := human_queue.pending()):
            await asyncio.sleep(0.02)
        assert (waiting[0].pid, waiting[0].tool, waiting[0].args) == (5, "delete", {"path": "x"})
        human_queue.decide(waiting[0].id, approve, by="erin", reason="checked")

    async def scenario() -> Any:
        answer = asyncio.create_task(human())
        try:
            return await registry.call(5, "delete", {"path": "x"}, approval_timeout_s=5)
        finally:
            await answer

    if approve:
        assert asyncio.run(scenario()) == "deleted x"
    else:
        with pytest.raises(PermissionDenied, match="denied by erin .*: checked"):
            asyncio.run(scenario())
    kernel_queue.close()
    human_queue.close()


# --- built-ins -------------------------------------------------------------------------------


def test_builtin_calculator_and_clock() -> None:
    registry = ToolRegistry()
    for fn in builtin_tools():
        registry.register(fn)
    assert [s.name for s in registry.list(1, None)] == ["calculator", "clock"]

    async def scenario() -> None:
        assert await registry.call(1, "calculator", {"expression": "2 ** 10 / 4"}) == 2**10 / 4
        assert await registry.call(1, "calculator", {"expression": "2 ** 70"}) == float(2**70)
        with pytest.raises(ToolError, match="division by zero"):
            await registry.call(1, "calculator", {"expression": "1 / 0"})
        stamp = datetime.fromisoformat(await registry.call(1, "clock", {}))
        assert abs(stamp - datetime.now(UTC)).total_seconds() < 5
        assert stamp.utcoffset().total_seconds() == 0

    asyncio.run(scenario())
    kolkata = datetime.fromisoformat(clock("Asia/Kolkata"))
    assert kolkata.utcoffset() == ZoneInfo("Asia/Kolkata").utcoffset(kolkata.replace(tzinfo=None))
    for zone in ("Mars/Olympus", "../../etc/passwd", "/etc/localtime", "zone.tab", ""):
        with pytest.raises(InvalidArgument, match="unknown time zone"):
            clock(zone)
