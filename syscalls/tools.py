"""tools: functions a model (or a program) can call, with schemas derived from type hints.

System tools (calculator, clock, files, key-value memory) live in the kernel;
a program can register its own with ``register`` (they run in the program's
process). Which tools a process may call is fixed at spawn (``tools=[...]``);
tools marked ``dangerous`` wait for a person's ``llmos approve ID``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from llmos_kernel.engine.tool_calls import ToolCall
from llmos_kernel.errors import LlmosError
from llmos_kernel.services.tools import ToolSpec, spec_of, tool
from syscalls import _context, llm

__all__ = ["ToolSpec", "call", "list", "register", "run_loop", "tool"]


async def register(fn: Callable) -> dict:
    """Offer one of this program's @tool functions to the model and to processes you grant."""
    spec = spec_of(fn)
    _context.runtime().tools[spec.name] = fn
    fields = {"name": spec.name, "description": spec.description,
              "parameters": spec.parameters, "dangerous": spec.dangerous,
              "timeout_s": spec.timeout_s}
    return await _context.call("tools.register", spec=fields)


async def call(name: str, **args: Any) -> Any:
    """Run a tool as this process (permissions and approvals are the kernel's)."""
    return await _context.call("tools.call", name=name, args=args)


async def list() -> list[dict]:
    """The tools this process may call, as OpenAI tool dicts."""
    return await _context.call("tools.list")


async def run_loop(messages: Sequence[dict], tools: Sequence[Any], *, max_steps: int = 5,
                   tool_choice: str = "auto", **sampling) -> llm.Result:
    """Model ↔ tools until the model answers in text (or ``max_steps`` rounds of calls).

    ``tools``: @tool functions (run here, in this process) or names of kernel tools
    (run through ``tools.call``). Tool errors go back to the model as the tool's result,
    so it can recover; the conversation is in ``result.messages``.
    """
    local = {spec_of(t).name: t for t in tools if not isinstance(t, str)}
    kernel_tools = [t for t in await list() if t["function"]["name"] in tools]
    offered = [spec_of(t) for t in local.values()] + kernel_tools
    history = [dict(m) for m in messages]
    result = llm.Result("", None, {})
    for step in range(max_steps + 1):
        choice = tool_choice if step < max_steps else "none"
        result = await llm.chat(history, tools=offered, tool_choice=choice, **sampling)
        if not result.tool_calls:
            break
        history.append({"role": "assistant", "content": result.text,
                        "tool_calls": result.tool_calls})
        for entry in result.tool_calls:
            c = ToolCall.from_openai(entry)
            try:
                if c.name in local:
                    from llmos_kernel.services.tools import decode_args, validate_args

                    fn = local[c.name]
                    value = fn(**decode_args(fn, validate_args(spec_of(fn), c.arguments)))
                    if hasattr(value, "__await__"):
                        value = await value
                else:
                    value = await call(c.name, **c.arguments)
                content = json.dumps(value, default=str)
            except LlmosError as e:
                content = json.dumps({"error": f"{type(e).__name__}: {e}"})
            history.append({"role": "tool", "tool_call_id": c.id, "content": content})
    result.messages = history
    return result
