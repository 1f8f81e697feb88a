"""tools: functions a model (or a program) can call, with schemas derived from type hints.

System tools (calculator, clock, files, key-value memory) live in the kernel;
a program can register its own with ``register`` (they run in the program's
process). Which tools a process may call is fixed at spawn (``tools=[...]``);
tools marked ``dangerous`` wait for a person's ``llmos approve ID``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from llmos_kernel.engine.tool_calls import ToolCall
from llmos_kernel.errors import LlmosError, NotFound, Timeout, ToolError
from llmos_kernel.tool_schema import decode_args, to_json
from llmos_kernel.tool_specs import ToolSpec, spec_of, tool, validate_args
from syscalls import _context, llm

__all__ = ["ToolSpec", "call", "grant", "list", "register", "revoke", "run_loop", "tool"]


async def register(fn: Callable) -> dict:
    """Offer one of this program's @tool functions to the model and to processes you grant.

    Calls to it run here, in this process, whoever makes them.
    """
    spec = spec_of(fn)
    _context.runtime().tools[spec.name] = fn
    fields = {"name": spec.name, "description": spec.description,
              "parameters": spec.parameters, "dangerous": spec.dangerous,
              "timeout_s": spec.timeout_s}
    return await _context.call("tools.register", spec=fields)


async def grant(name: str, to: int | str) -> None:
    """Let process ``to`` call your registered tool ``name`` (it still runs here)."""
    await _context.call("tools.grant", name=name, to=to)


async def revoke(name: str, to: int | str) -> None:
    await _context.call("tools.revoke", name=name, to=to)


async def call(name: str, /, *, approval_timeout_s: float | None = None, **args: Any) -> Any:
    """Run a tool as this process (permissions and approvals are the kernel's).

    A dangerous tool waits for a person's decision, at most ``approval_timeout_s``
    seconds (the kernel's limit by default): PermissionDenied when a person denies it,
    Timeout when no decision comes (the tool is not run either way).
    """
    request: dict[str, Any] = {"name": name, "args": args}
    if approval_timeout_s is not None:
        request["approval_timeout_s"] = approval_timeout_s
    return await _context.call("tools.call", **request)


async def list() -> list[dict]:
    """The tools this process may call, as OpenAI tool dicts (with a ``dangerous`` flag)."""
    return await _context.call("tools.list")


async def run_loop(messages: Sequence[dict], tools: Sequence[Any], *, max_steps: int = 5,
                   tool_choice: str = "auto", each_tool_once: bool = False,
                   **sampling) -> llm.Result:
    """Model ↔ tools until the model answers in text (or ``max_steps`` rounds of calls).

    ``tools``: @tool functions (run here, in this process, within their ``timeout_s``) or
    names of kernel tools (run through ``tools.call``). A tool's failure goes back to the
    model as that tool's result, so it can recover. After ``max_steps`` rounds, or once
    no tool is left to offer, the model must answer in text. ``each_tool_once`` stops
    offering a tool after its first call: small models tend to repeat a call whose
    result they already have, and a plan of distinct steps never needs a repeat. The
    whole conversation is in ``result.messages``.
    """
    local = {spec_of(t).name: t for t in tools if not isinstance(t, str)}
    offered: list[Any] = [spec_of(t) for t in local.values()]
    names = [t for t in tools if isinstance(t, str)]
    if names:
        available = {t["function"]["name"]: t for t in await list()}
        missing = [n for n in names if n not in available]
        if missing:
            raise NotFound(f"this process may not call tool(s) {', '.join(missing)}; "
                           f"it may call: {', '.join(sorted(available)) or 'none'}")
        offered += [available[n] for n in names]
    history = [dict(m) for m in messages]
    result = llm.Result("", None, {})
    for step in range(max_steps + 1):
        if step < max_steps and offered:
            result = await llm.chat(history, tools=offered, tool_choice=tool_choice, **sampling)
        else:  # time for the answer: no tools, and the calls so far read as prose
            result = await llm.chat(history, **sampling)
        if not result.tool_calls:
            break
        if each_tool_once:
            called = {ToolCall.from_openai(entry).name for entry in result.tool_calls}
            offered = [t for t in offered if _name(t) not in called]
        history.append({"role": "assistant", "content": result.text,
                        "tool_calls": result.tool_calls})
        for entry in result.tool_calls:
            c = ToolCall.from_openai(entry)
            try:
                if c.name in local:
                    value = await _run_local(local[c.name], c.arguments)
                else:
                    value = await _context.call("tools.call", name=c.name, args=c.arguments)
                content = json.dumps(value)
            except LlmosError as e:
                content = json.dumps({"error": f"{type(e).__name__}: {e}"})
            history.append({"role": "tool", "tool_call_id": c.id, "content": content})
    result.messages = history
    return result


async def _run_local(fn: Callable, arguments: dict) -> Any:
    """One of this program's own tools, as the kernel would run it: checked arguments, the
    tool's timeout, and every failure as a typed error."""
    spec = spec_of(fn)
    checked = validate_args(spec, arguments)
    if spec.dangerous:  # a person decides, as for the kernel's tools (llmos approvals)
        await _context.call("tools.ask", name=spec.name, args=checked)
    kwargs = decode_args(fn, checked)
    deadline = asyncio.timeout(spec.timeout_s)
    try:
        async with deadline:
            if inspect.iscoroutinefunction(fn):
                value = await fn(**kwargs)
            else:
                value = await asyncio.to_thread(fn, **kwargs)
    except LlmosError:
        raise
    except Exception as e:
        if deadline.expired():
            raise Timeout(f"tool {spec.name!r} did not finish within {spec.timeout_s:g}s") from None
        raise ToolError(f"tool {spec.name!r} failed: {type(e).__name__}: {e}") from e
    try:
        return to_json(value, "the result")
    except TypeError as e:
        raise ToolError(f"tool {spec.name!r} returned something that is not JSON: {e}") from None


def _name(offered: Any) -> str:
    return offered.name if isinstance(offered, ToolSpec) else offered["function"]["name"]
