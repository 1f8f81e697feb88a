"""Agents for the syscall-layer tests: each acts through the syscalls and reports what it saw."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from llmos_kernel.errors import LlmosError
from syscalls import _context, fs, ipc, llm, memory, proc, tools


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


async def probe(calls: list) -> list:
    """Make raw syscalls ``[name, args]`` as this process; each gives {"ok"} or {"error"}."""
    me, out = _context.runtime(), []
    for name, args in calls:
        try:
            out.append({"ok": _plain(await me.host.syscall(me, name, args))})
        except LlmosError as e:
            out.append({"error": type(e).__name__, "message": str(e)})
    return out


async def spawn_and_wait(spec: dict) -> dict:
    """Spawn a child from a raw spawn spec, wait for it, and return its exit record."""
    try:
        child = await _context.call("proc.spawn", spec=spec)
    except LlmosError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return await proc.wait(child, timeout=120)


async def identity() -> dict:
    """Who this process is, as its host knows it (the capability is for identity tests)."""
    me = _context.runtime()
    return {"pid": me.pid, "capability": me.capability, "host": me.host.host_id,
            "os_pid": os.getpid()}


async def spend_tokens(max_calls: int = 20) -> dict:
    """Chat until the token quota refuses; report the usages and the error."""
    usages = []
    for _ in range(max_calls):
        try:
            result = await llm.chat([{"role": "user", "content": "Count to ten."}],
                                    max_tokens=16, temperature=0)
        except LlmosError as e:
            return {"usages": usages, "error": type(e).__name__, "message": str(e),
                    "self": await proc.self()}
        usages.append(result.usage)
    return {"usages": usages, "error": None, "self": await proc.self()}


async def backlog(n: int, notify: int) -> list:
    """``n`` distinct long prompts at once; tells ``notify`` once they are sent; their usages."""
    chats = [asyncio.ensure_future(llm.chat(
        [{"role": "user", "content": f"Summarise report {i}: "
                                     + " ".join(f"item{i}x{j}" for j in range(60))}],
        max_tokens=2, temperature=0)) for i in range(n)]
    await asyncio.sleep(0.5)
    await ipc.send(notify, {"submitted": n})
    return [result.usage for result in await asyncio.gather(*chats)]


async def llm_tour() -> dict:
    """Every llm syscall once, from a spawned program."""
    chat = await llm.chat([{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0)
    pieces = [p async for p in llm.stream([{"role": "user", "content": "Say hi."}],
                                          max_tokens=8, temperature=0)]
    done = await llm.complete("The capital of France is", max_tokens=4, temperature=0)
    return {"chat": chat.text, "chat_usage": chat.usage, "stream": "".join(pieces),
            "complete": done.text, "complete_ids": done.token_ids,
            "tokens": await llm.tokenize("hello world"), "count": await llm.count("hello world"),
            "embed": await llm.embed(["hello world"])}


async def rank_queries(facts: list[str], queries: list[str], k: int = 10) -> list[list[int]]:
    """Remember ``facts``; for each query, the indices of the facts found, best first."""
    await memory.add_many([(fact, {"fact": i}) for i, fact in enumerate(facts)])
    return [[hit["metadata"]["fact"] for hit in await memory.search(query, k=k)]
            for query in queries]


@tools.tool
async def where_am_i() -> dict:
    """The llmos pid and the OS process this tool runs in."""
    return {"pid": proc.pid(), "os_pid": os.getpid()}


@tools.tool
def explode(why: str) -> str:
    """Fail with ValueError.

    Args:
        why: The message of the error.
    """
    raise ValueError(why)


@tools.tool(timeout_s=1.0)
async def nap(seconds: float) -> str:
    """Sleep, past this tool's one-second timeout if asked to.

    Args:
        seconds: How long to sleep.
    """
    await asyncio.sleep(seconds)
    return "rested"


class ToolProvider:
    """Registers its tools (granting them to ``grant_to``), then answers any message with its
    own pid and OS pid, so a caller knows the tools are ready. With ``crash_first`` its first
    run crashes after registering (its home keeps a mark), so it registers again restarted."""

    async def init(self, grant_to: int | None = None, crash_first: bool = False) -> None:
        for fn in (where_am_i, explode, nap):
            await tools.register(fn)
        if grant_to is not None:
            for name in ("where_am_i", "explode", "nap"):
                await tools.grant(name, grant_to)
        if crash_first and not await fs.exists("crashed-once"):
            await fs.write("crashed-once", "yes")
            raise RuntimeError("the first run crashes on purpose")

    async def on_message(self, msg):
        return {"pid": proc.pid(), "os_pid": os.getpid()}


class FileKeeper:
    """Writes ``files`` into its home, grants ``grants`` ([path, to, mode]), then serves
    requests ``{"do": [name, args]}`` by making that syscall and answering the outcome."""

    async def init(self, files: dict[str, str] | None = None, grants: list | None = None):
        for path, text in (files or {}).items():
            await fs.write(path, text)
        for path, to, mode in grants or []:
            await fs.grant(path, to, mode)

    async def on_message(self, msg):
        return (await probe([msg.body["do"]]))[0]


class Whoami:
    """Answers every message with this process's identity (see ``identity``)."""

    async def on_message(self, msg):
        return await identity()


class CrashOnce:
    """On its first run, tells ``notify`` who it is and crashes (its home keeps a mark);
    restarted, it answers every message with its new identity."""

    async def init(self, notify: int) -> None:
        if not await fs.exists("crashed-once"):
            await fs.write("crashed-once", "yes")
            await ipc.send(notify, await identity())
            raise RuntimeError("the first run crashes on purpose")

    async def on_message(self, msg):
        return await identity()


async def os_process() -> dict:
    """The OS process this agent runs in (its host's), and the host's id."""
    return {"os_pid": os.getpid(), "host": _context.host().host_id}
