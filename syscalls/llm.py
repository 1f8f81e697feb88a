"""llm: the Transformer core as a syscall — chat, complete, stream, embed, count.

Requests carry the calling process's priority and are charged to its token
quota; each result says what it used. ``tools=`` and ``response_format=``
switch on grammar-constrained decoding, so tool calls and JSON always parse
and validate against their schemas. ``keep_context=True`` keeps the
conversation's KV in the kernel (resident, or suspended to host memory when
memory is short — the kernel decides) so a follow-up with ``context=`` does not
recompute it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmos_kernel.deltas import fold_delta
from llmos_kernel.errors import InvalidArgument, LlmosError
from syscalls import _context


@dataclass
class Result:
    """One generation: its text, why it stopped ("stop", "length" or "abort"), what it used
    (prompt, cached and completion tokens; queue and first-token seconds) and its tool calls."""

    text: str
    finish_reason: str | None
    usage: dict
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI style: id, name, arguments
    context_id: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    prompt_logprobs: list[float] | None = None  # asked for: log p of prompt tokens 1..n-1
    messages: list[dict] | None = None  # the whole conversation, from tools.run_loop


def _tool_specs(tools: Sequence[Any] | None) -> list[dict] | None:
    if not tools:
        return None
    if not isinstance(tools, list | tuple):
        raise InvalidArgument(f"tools must be a list of @tool functions, ToolSpecs or OpenAI "
                              f"tool dicts, got {type(tools).__name__}")
    from llmos_kernel.tool_specs import ToolSpec, spec_of

    out = []
    for t in tools:
        if isinstance(t, dict):
            out.append(t)
        else:
            spec = spec_of(t) if not isinstance(t, ToolSpec) else t
            out.append(spec.to_openai())
    return out


def _without_tool_turns(messages: Any) -> Any:
    """A conversation's tool calls and results as plain prose, for a turn that offers no
    tools: a model shown calls in their tool-call syntax tends to imitate one instead of
    answering, so here they read as what happened."""
    if not isinstance(messages, list) or not any(
            isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
            for m in messages):
        return messages
    from llmos_kernel.engine.tool_calls import ToolCall

    names: dict[str, str] = {}  # tool_call_id -> tool name
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("tool_calls"):
            calls = [ToolCall.from_openai(c) for c in m["tool_calls"]]
            names.update((c.id, c.name) for c in calls)
            did = "; ".join(f"{c.name}({json.dumps(c.arguments)})" for c in calls)
            out.append({"role": "assistant",
                        "content": f"{m.get('content') or ''} I called {did}.".strip()})
        elif isinstance(m, dict) and m.get("role") == "tool":
            tool = names.get(m.get("tool_call_id"), "the tool")
            out.append({"role": "user", "content": f"{tool} returned: {m.get('content')}"})
        else:
            out.append(m)
    return out


async def _generate(spec: dict) -> AsyncIterator[Any]:
    agent = _context.runtime()
    request_id = uuid.uuid4().hex[:16]
    spec["request_id"] = request_id
    queue: asyncio.Queue = asyncio.Queue()
    agent.streams[request_id] = queue
    running = False
    try:
        await _context.call("llm.generate", spec=spec)
        running = True
        while running:
            delta = await queue.get()
            if delta.error is not None:
                running = False
                raise delta.error.exception()
            running = not delta.finished
            yield delta
    finally:
        agent.streams.pop(request_id, None)
        if running:  # the caller stopped reading (or was cancelled): free the engine's work
            with contextlib.suppress(LlmosError):  # it finished meanwhile
                await _context.call("llm.cancel", request_id=request_id)


def _spec(prompt: str | None, messages: list | None, *, tools=None, tool_choice="auto",
          response_format=None, keep_context: bool = False, context: str | None = None,
          adapter: str | None = None, prompt_logprobs: bool = False, **sampling) -> dict:
    spec: dict[str, Any] = {"params": sampling}
    if adapter is not None:
        spec["adapter"] = adapter
    if prompt_logprobs:
        spec["prompt_logprobs"] = True
    specs = _tool_specs(tools)
    if messages is not None:
        spec["messages"] = messages if specs else _without_tool_turns(messages)
    if prompt is not None:
        spec["prompt"] = prompt
    if specs:
        spec["tools"], spec["tool_choice"] = specs, tool_choice
    if response_format is not None:
        spec["response_format"] = response_format
    if keep_context:
        spec["keep_context"] = True
    if context is not None:
        spec["context"] = context
    return spec


async def _collect(spec: dict) -> Result:
    out = Result("", None, {})
    async for delta in _generate(spec):
        fold_delta(out, delta)
    if "tools" in spec:
        from llmos_kernel.engine.tool_calls import parse_tool_calls

        try:
            out.text, calls = parse_tool_calls(out.text)
        except InvalidArgument:
            if out.finish_reason != "length":
                raise
            calls = []  # max_tokens cut a call short: the text is returned as it is
        out.tool_calls = [c.to_openai() for c in calls]
    return out


async def chat(messages: list[dict], *, tools: Sequence[Any] | None = None,
               tool_choice: str = "auto", response_format: dict | None = None,
               keep_context: bool = False, context: str | None = None,
               adapter: str | None = None, prompt_logprobs: bool = False,
               **sampling) -> Result:
    """One assistant turn for ``messages`` (OpenAI-style role/content dicts).

    ``adapter``: a LoRA adapter in the model store to answer with (None: the base model);
    ``prompt_logprobs``: also return the log-probability of each prompt token after the
    first. ``sampling``: max_tokens, temperature, top_p, top_k, min_p, seed, stop, ...
    """
    return await _collect(_spec(None, messages, tools=tools, tool_choice=tool_choice,
                                response_format=response_format, keep_context=keep_context,
                                context=context, adapter=adapter,
                                prompt_logprobs=prompt_logprobs, **sampling))


async def complete(prompt: str, *, response_format: dict | None = None,
                   keep_context: bool = False, context: str | None = None,
                   adapter: str | None = None, prompt_logprobs: bool = False,
                   **sampling) -> Result:
    """Continue raw text (no chat template); ``adapter`` and ``prompt_logprobs`` as in chat."""
    return await _collect(_spec(prompt, None, response_format=response_format,
                                keep_context=keep_context, context=context, adapter=adapter,
                                prompt_logprobs=prompt_logprobs, **sampling))


async def stream(messages: list[dict] | None = None, *, prompt: str | None = None,
                 **kwargs) -> AsyncIterator[str]:
    """Text pieces as they are generated (chat ``messages`` or raw ``prompt``)."""
    async for delta in _generate(_spec(prompt, messages, **kwargs)):
        if delta.text:
            yield delta.text


async def deltas(messages: list[dict] | None = None, *, prompt: str | None = None,
                 **kwargs) -> AsyncIterator[Any]:
    """Every ``wire.TokenDelta`` of one generation as the kernel streams it (new text, token
    ids, logprobs; the last also the finish reason and usage). Leaving the loop early
    cancels the request in the kernel. Same arguments as ``chat`` / ``complete``."""
    async for delta in _generate(_spec(prompt, messages, **kwargs)):
        yield delta


async def release(context_id: str) -> None:
    """Free a context kept with ``keep_context=True``."""
    await _context.call("llm.release", context_id=context_id)


async def embed(texts: list[str]) -> list[list[float]]:
    """Unit-length sentence embeddings (the kernel's embedding model)."""
    return await _context.call("llm.embed", texts=texts)


async def tokenize(text: str) -> list[int]:
    return await _context.call("llm.tokenize", text=text)


async def count(text: str | None = None, *, messages: list[dict] | None = None) -> int:
    """Tokens in ``text``, or in ``messages`` as the chat template renders them (tool calls
    and results as ``chat`` writes them when it offers no tools)."""
    if messages is not None:
        return await _context.call("llm.count", messages=_without_tool_turns(messages))
    return await _context.call("llm.count", text=text)


async def info() -> dict:
    """The model's name, context length and vocabulary size."""
    return await _context.call("llm.info")
