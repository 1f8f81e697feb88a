"""Safe arithmetic for the calculator tool: an ``ast`` walk over an allowlist, never eval.

Every operation is bounded before it runs (expression length, nesting depth, integer size,
exponent size), so no input can hang the evaluator or exhaust memory; every refusal is an
InvalidArgument that quotes the offending part of the expression.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from llmos_kernel.errors import InvalidArgument

MAX_LENGTH = 1_000
MAX_DEPTH = 64
MAX_INT_BITS = 4_096
MAX_ROUND_DIGITS = 1_000

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_SYMBOLS: dict[type[ast.AST], str] = {
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.MatMult: "@",
    ast.Invert: "~",
    ast.Not: "not",
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS:
        raise ValueError(f"round() takes a whole number of digits within ±{MAX_ROUND_DIGITS}")
    return round(x, ndigits)


def _min(*args: Number) -> Number:
    return min(args)


def _max(*args: Number) -> Number:
    return max(args)


# name -> (function, fewest arguments, most arguments or None for any number)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int | None]] = {
    "sqrt": (math.sqrt, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "exp": (math.exp, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "min": (_min, 1, None),
    "max": (_max, 1, None),
}

_FORBIDDEN: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Lambda: "lambda",
    ast.NamedExpr: "assignment (:=)",
    ast.Compare: "comparisons",
    ast.BoolOp: "and/or",
    ast.IfExp: "conditional expressions",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.Starred: "star arguments",
    ast.JoinedStr: "strings",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slices",
}


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression such as ``"2 * (3 + 4) ** 2 / sqrt(16)"``.

    Supports numbers, ``+ - * / // % **``, unary ``+``/``-``, parentheses, the functions
    sqrt, sin, cos, tan, log, log10, exp, abs, round, floor, ceil, min, max and the
    constants pi and e. Anything else raises InvalidArgument.
    """
    if not isinstance(expression, str):
        raise InvalidArgument(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise InvalidArgument(
            f"expression is {len(expression)} characters long; the limit is {MAX_LENGTH}"
        )
    for position, char in enumerate(expression):
        if not (char.isascii() and (char.isprintable() or char in " \t\n")):
            raise InvalidArgument(
                f"character {char!r} at position {position} is not allowed; "
                "write numbers, operators and names in printable ASCII"
            )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise InvalidArgument(f"not a valid expression: {exc.msg} (column {exc.offset})") from None
    except (RecursionError, MemoryError):
        raise InvalidArgument("expression is too deeply nested to parse") from None
    return _Evaluator(expression.strip()).eval(tree.body, depth=0)


class _Evaluator:
    """Walks one parsed expression; ``source`` is kept to quote the offending part."""

    def __init__(self, source: str) -> None:
        self.source = source

    def quote(self, node: ast.AST) -> str:
        return repr(ast.get_source_segment(self.source, node) or ast.unparse(node))

    def eval(self, node: ast.AST, depth: int) -> Number:
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"expression is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.UnaryOp):
            function = _UNARY.get(type(node.op))
            if function is None:
                raise InvalidArgument(f"operator {_SYMBOLS[type(node.op)]!r} is not allowed")
            return self.checked(node, function, self.eval(node.operand, depth + 1))
        if isinstance(node, ast.BinOp):
            function = self.power if isinstance(node.op, ast.Pow) else _BINARY.get(type(node.op))
            if function is None:
                raise InvalidArgument(f"operator {_SYMBOLS[type(node.op)]!r} is not allowed")
            left = self.eval(node.left, depth + 1)
            return self.checked(node, function, left, self.eval(node.right, depth + 1))
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        what = _FORBIDDEN.get(type(node), type(node).__name__)
        raise InvalidArgument(f"not allowed: {what} ({self.quote(node)})")

    def constant(self, node: ast.Constant) -> Number:
        value = node.value
        if isinstance(value, str | bytes):
            raise InvalidArgument(f"strings are not allowed: {self.quote(node)}")
        if isinstance(value, complex):
            raise InvalidArgument(f"complex numbers are not allowed: {self.quote(node)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"{self.quote(node)} is not a number")
        return self.bounded(node, value)

    def name(self, node: ast.Name) -> Number:
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if node.id in _FUNCTIONS:
            raise InvalidArgument(f"{node.id} is a function; call it, e.g. {node.id}(2)")
        raise InvalidArgument(
            f"name {node.id!r} is not allowed; the known names are "
            f"{', '.join([*_CONSTANTS, *_FUNCTIONS])}"
        )

    def call(self, node: ast.Call, depth: int) -> Number:
        if not isinstance(node.func, ast.Name):
            self.eval(node.func, depth + 1)
            raise InvalidArgument(f"only named functions can be called: {self.quote(node)}")
        name = node.func.id
        if name not in _FUNCTIONS:
            raise InvalidArgument(
                f"function {name!r} is not allowed; the functions are {', '.join(_FUNCTIONS)}"
            )
        if node.keywords:
            raise InvalidArgument(f"keyword arguments are not allowed: {self.quote(node)}")
        function, fewest, most = _FUNCTIONS[name]
        if len(node.args) < fewest or most is not None and len(node.args) > most:
            expected = (
                f"at least {fewest}"
                if most is None
                else f"exactly {fewest}"
                if fewest == most
                else f"{fewest} or {most}"
            )
            raise InvalidArgument(
                f"{name}() takes {expected} argument(s), got {len(node.args)}: {self.quote(node)}"
            )
        args = [self.eval(arg, depth + 1) for arg in node.args]
        return self.checked(node, function, *args)

    def power(self, base: Number, exponent: Number) -> Number:
        """``base ** exponent``, refused before computing when the integer result would be huge."""
        huge = (
            isinstance(base, int)
            and isinstance(exponent, int)
            and exponent > 0
            and abs(base) > 1
            and (exponent.bit_length() > 32 or exponent * math.log2(abs(base)) > MAX_INT_BITS)
        )
        if huge:
            raise OverflowError(f"the result would have more than {MAX_INT_BITS} bits")
        return base**exponent

    def checked(self, node: ast.AST, function: Callable[..., Number], *args: Number) -> Number:
        """Apply ``function``, turning arithmetic failures into InvalidArgument for ``node``."""
        try:
            value = function(*args)
        except ZeroDivisionError:
            raise InvalidArgument(f"division by zero in {self.quote(node)}") from None
        except OverflowError as exc:
            raise InvalidArgument(f"{self.quote(node)} is too large: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"{exc} in {self.quote(node)}") from None
        return self.bounded(node, value)

    def bounded(self, node: ast.AST, value: Number | complex) -> Number:
        if isinstance(value, complex):
            raise InvalidArgument(f"{self.quote(node)} is a complex number")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{self.quote(node)} is too large for a float")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise InvalidArgument(
                f"{self.quote(node)} is an integer of more than {MAX_INT_BITS} bits"
            )
        return value
