"""The system tools every process may call: a calculator and a clock.

Both are plain ``@tool`` functions with no side effects; the kernel registers them in the
system scope beside the file and memory tools (``system_tools``). The calculator refuses
what it cannot return as JSON rather than losing precision silently.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from llmos_kernel.errors import InvalidArgument
from llmos_kernel.services.calculator import evaluate
from llmos_kernel.tool_schema import INT64
from llmos_kernel.tool_specs import tool


@tool
def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: Arithmetic such as "2 * (3 + 4) ** 2 / sqrt(16)". Supports + - * / // %
            **, parentheses, sqrt, sin, cos, tan, log, log10, exp, abs, round, floor, ceil,
            min, max, pi and e. Integers beyond 64 bits come back as floats.
    """
    value = evaluate(expression)
    if isinstance(value, float) or value in INT64:
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
