"""The calculator against Python's own arithmetic, and against inputs meant to break it."""

from __future__ import annotations

import ast
import math
import operator
import time

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from llmos_kernel.errors import InvalidArgument
from llmos_kernel.services.calculator import MAX_INT_BITS, evaluate

OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
FUNCTIONS = {
    "sqrt": math.sqrt,
    "sin": math.sin,
    "cos": math.cos,
    "log": math.log,
    "floor": math.floor,
    "ceil": math.ceil,
    "abs": abs,
    "round": round,
    "min": lambda *args: min(args),
    "max": lambda *args: max(args),
}
CONSTANTS = {"pi": math.pi, "e": math.e}


class Unrepresentable(Exception):
    """The reference met a value the calculator must refuse (non-finite, complex, too big)."""


def reference(node: ast.expr) -> int | float:
    """The tree's value by Python's own operators, refusing what the calculator refuses."""
    if isinstance(node, ast.Constant):
        value = node.value
    elif isinstance(node, ast.Name):
        value = CONSTANTS[node.id]
    elif isinstance(node, ast.UnaryOp):
        value = -reference(node.operand)
    elif isinstance(node, ast.BinOp):
        value = OPERATORS[type(node.op)](reference(node.left), reference(node.right))
    else:
        value = FUNCTIONS[node.func.id](*[reference(arg) for arg in node.args])
    if isinstance(value, complex) or isinstance(value, float) and not math.isfinite(value):
        raise Unrepresentable(value)
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise Unrepresentable(value)
    return value


leaves = st.one_of(
    st.integers(0, 1000).map(ast.Constant),
    st.floats(1e-3, 1e3).map(ast.Constant),
    st.sampled_from(["pi", "e"]).map(lambda name: ast.Name(name, ast.Load())),
)
UNARY_FUNCTIONS = ["sqrt", "sin", "cos", "log", "floor", "ceil", "abs", "round"]


@st.composite
def trees(draw: st.DrawFn, depth: int = 4) -> ast.expr:
    """Expression trees at most ``depth`` deep, so no intermediate float can overflow, and
    with small exponents, so the reference stays quick."""
    kind = (
        "leaf"
        if depth == 0
        else draw(st.sampled_from(["leaf", "binary", "power", "negation", "call", "min/max"]))
    )
    if kind == "leaf":
        return draw(leaves)
    if kind == "binary":
        op = draw(st.sampled_from([op for op in OPERATORS if op is not ast.Pow]))
        return ast.BinOp(draw(trees(depth - 1)), op(), draw(trees(depth - 1)))
    if kind == "power":
        exponent = draw(st.sampled_from([0, 1, 2, 3, 0.5]))
        return ast.BinOp(draw(trees(depth - 1)), ast.Pow(), ast.Constant(exponent))
    if kind == "negation":
        return ast.UnaryOp(ast.USub(), draw(trees(depth - 1)))
    if kind == "call":
        name, args = draw(st.sampled_from(UNARY_FUNCTIONS)), [draw(trees(depth - 1))]
    else:
        name = draw(st.sampled_from(["min", "max"]))
        args = draw(st.lists(trees(depth - 1), min_size=1, max_size=3))
    return ast.Call(ast.Name(name, ast.Load()), args, [])


@settings(max_examples=300, deadline=None)
@given(trees())
def test_matches_python_arithmetic(tree: ast.expr) -> None:
    source = ast.unparse(tree)  # Python's own renderer: minimal parentheses, real precedence
    note(source)
    try:
        expected = reference(tree)
    except (ArithmeticError, ValueError, Unrepresentable):
        with pytest.raises(InvalidArgument):
            evaluate(source)
        return
    value = evaluate(source)
    assert type(value) is type(expected), source
    assert value == expected, source


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("-2 ** 2", -4),
        ("(-2) ** 2", 4),
        ("2 ** 3 ** 2", 512),
        ("7 // 2 * 2 + 7 % 2", 7),
        ("10 / 4", 2.5),
        ("2 ** -1", 0.5),
        ("log(8, 2)", 3.0),
        ("round(2.675, 2)", round(2.675, 2)),
        ("max(1, 2.5, 2)", 2.5),
        ("1e3 + 0x10", 1016.0),
        ("  1 +\t2  ", 3),
    ],
)
def test_precedence_and_literals_follow_python(source: str, expected: float) -> None:
    assert evaluate(source) == expected
    assert type(evaluate(source)) is type(expected)


HOSTILE = {
    "import": ("__import__('os')", "'__import__'"),
    "attribute": ("().__class__", "attribute access"),
    "dunder chain": ("(1).__class__.__bases__[0].__subclasses__()", "attribute access"),
    "name": ("os", "name 'os' is not allowed"),
    "tower": ("9**9**9", "4096 bits"),
    "string repeat": ("'a'*10**9", "strings"),
    "bytes": ("b'x'", "strings"),
    "lambda": ("(lambda: 1)()", "lambda"),
    "walrus": ("(x := 5)", ":="),
    "f-string": ("f'{1+1}'", "strings"),
    "huge int literal power": ("10**5000", "4096 bits"),
    "huge int product": ("(9**999) * (9**999) * (9**999) * (9**999) * (9**999)", "4096 bits"),
    "deep parentheses": ("(" * 300 + "1" + ")" * 300, "not a valid expression"),
    "deep unary chain": ("-" * 500 + "1", "nested"),
    "unicode digits": ("\u0661\u0662 + 1", "ASCII"),
    "fullwidth digits": ("\uff11 + 1", "ASCII"),
    "float overflow literal": ("1e309", "too large"),
    "float overflow product": ("1e308 * 10", "too large"),
    "division by zero": ("1 / 0", "division by zero"),
    "modulo by zero": ("5 % 0", "division by zero"),
    "zero to negative power": ("0 ** -1", "division by zero"),
    "math domain": ("sqrt(-1)", "math domain error"),
    "complex result": ("(-8) ** 0.5", "complex"),
    "complex literal": ("2j", "complex"),
    "comprehension": ("[x for x in (1, 2)]", "comprehensions"),
    "generator": ("sum(x for x in (1, 2))", "'sum'"),
    "comparison": ("1 < 2", "comparisons"),
    "boolean": ("True + 1", "not a number"),
    "bit shift": ("1 << 10000", "'<<'"),
    "subscript": ("(1, 2)[0]", "indexing"),
    "keyword argument": ("round(2.5, ndigits=1)", "keyword"),
    "too many arguments": ("sqrt(1, 2)", "exactly 1"),
    "function not called": ("sqrt + 1", "call it"),
    "huge round digits": ("round(1, -10**9)", "digits"),
    "exp overflow": ("exp(1000)", "too large"),
    "too long": ("1+" * 600 + "1", "characters long"),
    "statement": ("import os", "not a valid expression"),
    "two expressions": ("1; 2", "not a valid expression"),
    "empty": ("", "not a valid expression"),
    "null byte": ("1\x00", "ASCII"),
}


@pytest.mark.parametrize(("source", "fragment"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_is_refused_promptly(source: str, fragment: str) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as refused:
        evaluate(source)
    assert time.monotonic() - started < 1.0
    assert fragment in str(refused.value)


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="must be a string"):
        evaluate(12)  # type: ignore[arg-type]
