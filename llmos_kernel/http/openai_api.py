"""The OpenAI-compatible routes: models, chat completions, completions, embeddings.

Each request runs as its API key's kernel process through the syscall layer (``llm``),
so it is scheduled, constrained and charged as an agent's would be: ``tools`` and
``response_format`` are grammar-constrained in the kernel, so a returned tool call or
JSON answer always parses and validates. A streamed request whose client goes away is
cancelled in the kernel (its KV is freed) when the stream is closed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmos_kernel import adapters
from llmos_kernel.errors import InvalidArgument, LlmosError, NotFound
from llmos_kernel.http import errors
from llmos_kernel.http.gateway import KeyState
from llmos_kernel.http.keys import ApiKey
from syscalls import llm

router = APIRouter(prefix="/v1")


def _key(request: Request) -> ApiKey:
    return request.state.api_key  # set by the app's authentication middleware


Caller = Annotated[ApiKey, Depends(_key)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """What chat and completion requests share: the model and how to sample."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens


class ChatRequest(_Generation):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)  # the completions API's: top-n per token
    echo: bool = False


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


@dataclass
class Choice:
    """One generation as it accumulates from the kernel's deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Any = None


def _server(request: Request):
    return request.app.state.llmos


def _check_model(server, model: str, embedding: bool = False) -> str | None:
    """The LoRA adapter ``model`` names (vLLM's convention: an adapter is served under its
    own name), or None for the base model; NotFound for anything else."""
    wanted = server.embedding_model if embedding else server.model_id
    aliases = {wanted} | (set() if embedding else set(server.model_aliases))
    if model in aliases:
        return None
    if not embedding and model in adapters.names():
        return model
    raise NotFound(f"the model {model!r} does not exist here; this server serves "
                   f"{wanted!r} and its LoRA adapters (GET /v1/models lists them)")


def _sampling(body: ChatRequest | CompletionRequest, max_tokens: int | None,
              limit: int) -> dict[str, Any]:
    if max_tokens is not None and max_tokens > limit:
        raise InvalidArgument(f"max_tokens is {max_tokens}, over this server's limit of "
                              f"{limit}; ask for fewer")
    params: dict[str, Any] = {"max_tokens": max_tokens or limit}
    if body.ignore_eos:
        params["ignore_eos"] = True
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None:
            params[name] = value
    if body.stop is not None:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    return params


def _tool_choice(choice: str | dict | None) -> str:
    if choice is None:
        return "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise InvalidArgument("tool_choice must be 'auto', 'none', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}")
        return name
    return choice


async def _run(kwargs: dict, choice: Choice) -> AsyncIterator[tuple[Choice, Any]]:
    """The deltas of one generation, folded into ``choice`` as they come."""
    async for delta in llm.deltas(**kwargs):
        choice.text += delta.text
        choice.token_ids += delta.token_ids
        if delta.logprobs:
            choice.logprobs += delta.logprobs
        if delta.top_logprobs:
            choice.top += delta.top_logprobs
        if delta.finished:
            choice.finish_reason, choice.usage = delta.finish_reason, delta.usage
        yield choice, delta


def _usage(choices: list[Choice]) -> dict:
    """OpenAI's usage, plus ``llmos``: the kernel's account of the first choice's wait
    (seconds queued and to its first token, and engine steps that began before its first)."""
    prompt = choices[0].usage.prompt_tokens if choices and choices[0].usage else 0
    completion = sum(c.usage.completion_tokens for c in choices if c.usage)
    cached = sum(c.usage.cached_tokens for c in choices if c.usage)
    first = choices[0].usage if choices else None
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "llmos": None if first is None else {
                "queue_s": first.queue_s, "ttft_s": first.ttft_s,
                "steps_waited": first.steps_waited, "preemptions": first.preemptions}}


def _finish(choice: Choice, message: dict | None = None) -> str:
    """OpenAI's finish reason: ``tool_calls`` when ``message`` (the parsed answer of a
    request with tools) holds calls, else the engine's ("abort" reads as "stop")."""
    if message is not None and message.get("tool_calls"):
        return "tool_calls"
    return "stop" if choice.finish_reason in ("stop", "abort") else choice.finish_reason or "stop"


def _tool_message(choice: Choice) -> dict:
    from llmos_kernel.engine.tool_calls import parse_tool_calls

    try:
        content, calls = parse_tool_calls(choice.text)
    except InvalidArgument:
        if choice.finish_reason != "length":
            raise
        content, calls = choice.text, []
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
    return message


def _logprobs_content(server, choice: Choice, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, len(choice.logprobs)):
        token = choice.token_ids[i]
        entry = {"token": server.token_text(token), "logprob": choice.logprobs[i],
                 "bytes": list(server.token_text(token).encode())}
        tops = choice.top[i] if i < len(choice.top) else []
        entry["top_logprobs"] = [{"token": server.token_text(t), "logprob": lp,
                                  "bytes": list(server.token_text(t).encode())}
                                 for t, lp in tops]
        out.append(entry)
    return out


# -- routes -------------------------------------------------------------------------------

@router.get("/models")
async def models(request: Request) -> dict:
    server = _server(request)
    created = int(server.started)
    return {"object": "list", "data": [
        {"id": server.model_id, "object": "model", "created": created, "owned_by": "llmos"},
        {"id": server.embedding_model, "object": "model", "created": created,
         "owned_by": "llmos"},
        *({"id": name, "object": "model", "created": created, "owned_by": "llmos",
           "parent": server.model_id} for name in adapters.names())]}


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, key: Caller):
    server = _server(request)
    adapter = _check_model(server, body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens
    kwargs: dict[str, Any] = {"messages": body.messages,
                              **_sampling(body, max_tokens, server.max_tokens)}
    if adapter is not None:
        kwargs["adapter"] = adapter
    if body.logprobs:
        kwargs["logprobs"] = True
        if body.top_logprobs:
            kwargs["top_logprobs"] = body.top_logprobs
    if body.tools:
        kwargs["tools"], kwargs["tool_choice"] = body.tools, _tool_choice(body.tool_choice)
    if body.response_format is not None:
        kwargs["response_format"] = body.response_format
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "created": created, "model": adapter or server.model_id}
    if body.stream:
        return await _stream(server, key, body, kwargs, head, chat=True)
    async with server.gateway.as_process(key) as state:
        choices = await _all(body.n, kwargs, state)
    out = []
    for c in choices:
        message = _tool_message(c) if body.tools else {"role": "assistant", "content": c.text}
        entry: dict[str, Any] = {"index": c.index, "message": message,
                                 "finish_reason": _finish(c, message)}
        entry["logprobs"] = {"content": _logprobs_content(server, c)} if body.logprobs else None
        out.append(entry)
    return {**head, "object": "chat.completion", "choices": out, "usage": _usage(choices),
            "system_fingerprint": server.fingerprint}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, key: Caller):
    server = _server(request)
    adapter = _check_model(server, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) * body.n > 16:
        raise InvalidArgument("give 1 to 16 prompts (times n)")
    base = _sampling(body, body.max_tokens, server.max_tokens)
    if adapter is not None:
        base["adapter"] = adapter
    if body.logprobs is not None:
        base["logprobs"] = True
        if body.logprobs:
            base["top_logprobs"] = body.logprobs
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "created": created, "model": adapter or server.model_id}
    if body.stream:
        if len(prompts) != 1:
            raise InvalidArgument("stream one prompt at a time")
        return await _stream(server, key, body, {"prompt": prompts[0], **base}, head,
                             chat=False)
    async with server.gateway.as_process(key) as state:
        groups = await asyncio.gather(*(_all(body.n, {"prompt": p, **base}, state)
                                        for p in prompts))
    choices, out = [], []
    for p, group in zip(prompts, groups, strict=True):
        for c in group:
            c.index = len(out)
            choices.append(c)
            out.append({"index": c.index, "text": (p if body.echo else "") + c.text,
                        "finish_reason": _finish(c),
                        "logprobs": _completion_logprobs(server, c)
                        if body.logprobs is not None else None})
    usage = _usage(choices)
    usage["prompt_tokens"] = sum(g[0].usage.prompt_tokens for g in groups if g[0].usage)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {**head, "object": "text_completion", "choices": out, "usage": usage}


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, key: Caller):
    server = _server(request)
    _check_model(server, body.model, embedding=True)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidArgument("input must be a string or a non-empty list of strings")
    async with server.gateway.as_process(key) as state:
        vectors = await llm.embed(texts)
        tokens = sum([len(await llm.tokenize(t)) for t in texts])
        state.tokens_in += tokens
    return {"object": "list", "model": server.embedding_model,
            "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, body)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# -- helpers --------------------------------------------------------------------------------

def _encoded(vector: list[float], body: EmbeddingRequest) -> list[float] | str:
    """As asked: floats, or base64 of little-endian float32 (what the SDKs ask for)."""
    if body.encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def _all(n: int, kwargs: dict, state: KeyState) -> list[Choice]:
    async def one(i: int) -> Choice:
        choice = Choice(i)
        args = dict(kwargs)
        if n > 1 and args.get("seed") is not None:
            args["seed"] = args["seed"] + i  # distinct, yet reproducible, choices
        async for _ in _run(args, choice):
            pass
        state.tokens_out += len(choice.token_ids)
        state.tokens_in += choice.usage.prompt_tokens if choice.usage else 0
        return choice

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def _completion_logprobs(server, c: Choice) -> dict:
    tokens = [server.token_text(t) for t in c.token_ids[:len(c.logprobs)]]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": c.logprobs,
            "top_logprobs": [{server.token_text(t): lp for t, lp in top} for top in c.top]
            if c.top else None, "text_offset": offsets}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(server, key: ApiKey, body, kwargs: dict, head: dict, *, chat: bool):
    """An SSE response; errors before the first token answer as JSON with their status."""
    if body.n != 1:
        raise InvalidArgument("stream one choice at a time (n=1)")
    state = await server.gateway.enter(key)
    choice = Choice(0)
    gen = _run(kwargs, choice)
    try:
        first = await anext(gen, None)
    except BaseException:
        server.gateway.leave(state)
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    tools = chat and bool(kwargs.get("tools"))
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text: str | None, finish: str | None, extra: dict | None = None) -> dict:
        if chat:
            delta: dict[str, Any] = {} if delta_text is None else {"content": delta_text}
            if extra:
                delta.update(extra)
            entry: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            entry = {"index": 0, "text": delta_text or "", "finish_reason": finish}
        payload = {**head, "object": kind, "choices": [entry]}
        if include_usage:
            payload["usage"] = None
        return payload

    async def events() -> AsyncIterator[str]:
        from actors.runtime import current

        current.set(state.runtime)  # this task acts as the key's process too (cancel)
        try:
            if chat:
                yield _sse(chunk(None, None, {"role": "assistant", "content": ""}))
            item = first
            while item is not None:  # logprobs ride on the final chunk
                if not tools and item[1].text:
                    yield _sse(chunk(item[1].text, None))
                item = None if choice.finish_reason is not None else await anext(gen, None)
            message = None
            if tools:  # the constrained call is whole only now: it goes as one chunk
                message = _tool_message(choice)
                extra = {"tool_calls": [{**call, "index": i} for i, call in
                                        enumerate(message.get("tool_calls") or [])]}
                yield _sse(chunk(message.get("content"), None, extra))
            last = chunk(None, _finish(choice, message))
            if body.logprobs and chat:
                last["choices"][0]["logprobs"] = {"content": _logprobs_content(server, choice)}
            yield _sse(last)
            if include_usage:
                yield _sse({**head, "object": kind, "choices": [], "usage": _usage([choice])})
            yield "data: [DONE]\n\n"
        except LlmosError as e:
            yield _sse(errors.of(e)[1])
        finally:
            state.tokens_out += len(choice.token_ids)
            state.tokens_in += choice.usage.prompt_tokens if choice.usage else 0
            await gen.aclose()  # an unfinished request is cancelled in the kernel
            server.gateway.leave(state)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
