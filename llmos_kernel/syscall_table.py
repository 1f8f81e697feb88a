"""The syscall table: every call a program can make, checked and served as its caller.

The caller is the process whose capability came with the call (the kernel
looked it up before dispatching here); nothing in ``args`` can change who
that is. Each handler validates its arguments and raises a typed error for
anything malformed. Handlers marked ``slow`` run as tasks and answer later
through the caller's host outbox, so one long call never holds up the batch.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmos_kernel.errors import InvalidArgument, NotFound, QuotaExceeded, Unavailable
from llmos_kernel.proctable import Process

if TYPE_CHECKING:
    from llmos_kernel.services.registry import Services

caller: contextvars.ContextVar[Process | None] = contextvars.ContextVar("llmos_caller",
                                                                       default=None)


@dataclass(frozen=True)
class Syscall:
    fn: Callable
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    slow: bool = False

    @functools.cached_property
    def accepts(self) -> frozenset[str]:
        return frozenset(self.required + self.optional)


TABLE: dict[str, Syscall] = {}


def syscall(name: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
            slow: bool = False):
    def register(fn):
        TABLE[name] = Syscall(fn, required, optional, slow)
        return fn
    return register


def check_args(name: Any, args: Any) -> dict:
    spec = TABLE.get(name) if isinstance(name, str) else None
    if spec is None:
        raise NotFound(f"no syscall {name!r:.100}")
    if not isinstance(args, dict):
        raise InvalidArgument(f"{name}: arguments must be a dict")
    if not args.keys() <= spec.accepts:
        unknown = set(args) - spec.accepts
        raise InvalidArgument(f"{name}: unknown argument(s) {', '.join(sorted(map(str, unknown)))}"
                              f"; it takes {', '.join(spec.required + spec.optional) or 'none'}")
    missing = [a for a in spec.required if a not in args]
    if missing:
        raise InvalidArgument(f"{name}: missing argument(s) {', '.join(missing)}")
    return args


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _pid_of(s: Services, who: Any) -> int | None:
    return None if who is None else s.table.find(who).pid


# -- ipc ---------------------------------------------------------------------------
@syscall("ipc.send", ("to", "type", "payload"),
         ("id", "correlation_id", "reply_to", "deadline", "schema"))
def ipc_send(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return s.ipc.send(proc, args, handling)


@syscall("ipc.publish", ("topic", "type", "payload"), ("id", "schema"))
def ipc_publish(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return s.ipc.publish(proc, args, handling)


@syscall("ipc.subscribe", ("topic",))
def ipc_subscribe(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.ipc.subscribe(proc, args["topic"], on=True)


@syscall("ipc.unsubscribe", ("topic",))
def ipc_unsubscribe(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.ipc.subscribe(proc, args["topic"], on=False)


@syscall("ipc.ack", ("id",), ("reply",))
def ipc_ack(s: Services, proc: Process, args: dict, handling: str | None) -> dict | None:
    return s.ipc.ack(proc, args["id"], args.get("reply"))


# -- proc --------------------------------------------------------------------------
@syscall("proc.spawn", ("spec",), slow=True)
async def proc_spawn(s: Services, proc: Process, args: dict, handling: str | None) -> int:
    child = await s.procs.spawn(proc, args["spec"])
    s.spawned(child)
    return child.pid


@syscall("proc.kill", ("pid",), ("signal",))
def proc_kill(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.procs.kill(proc, _pid_of(s, args["pid"]), args.get("signal", "term"))


@syscall("proc.wait", ("pid",), ("timeout",), slow=True)
async def proc_wait(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return await s.procs.wait(proc, _pid_of(s, args["pid"]), args.get("timeout"))


@syscall("proc.ps", (), ("all",))
def proc_ps(s: Services, proc: Process, args: dict, handling: str | None) -> list:
    return s.procs.ps(include_exited=bool(args.get("all", False)))


@syscall("proc.self")
def proc_self(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return {**proc.summary(), "quotas": dataclasses.asdict(proc.quotas), "tools": proc.tools,
            "restart": dataclasses.asdict(proc.restart), "args": proc.args}


@syscall("proc.children")
def proc_children(s: Services, proc: Process, args: dict, handling: str | None) -> list:
    return [c.summary() for c in s.table.children(proc.pid)]


@syscall("proc.link", ("pid",), ("on",))
def proc_link(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.procs.link(proc, args["pid"], on=bool(args.get("on", True)))


@syscall("proc.monitor", ("pid",), ("on",))
def proc_monitor(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.procs.monitor(proc, args["pid"], on=bool(args.get("on", True)))


@syscall("proc.grant", ("pid", "to"))
def proc_grant(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.procs.grant(proc, _pid_of(s, args["pid"]), args["to"])


# -- llm ---------------------------------------------------------------------------
MAX_TEXT_CHARS = 1 << 20  # per tokenize/count/prompt; longer input could stall the kernel loop
MAX_EMBED_TEXTS = 1024


@syscall("llm.generate", ("spec",))
def llm_generate(s: Services, proc: Process, args: dict, handling: str | None) -> str:
    spec = args["spec"]
    if not isinstance(spec, dict):
        raise InvalidArgument("llm.generate takes a dict spec")
    _check_size(spec.get("prompt"), spec.get("messages"))
    if proc.quotas.tokens is not None and proc.tokens_used >= proc.quotas.tokens:
        raise QuotaExceeded(f"process {proc.pid} has used its {proc.quotas.tokens}-token quota")
    return s.llm.submit(proc.host, spec, owner=proc.pid, priority=proc.priority,
                        salt=proc.tenant, kv_bytes_limit=proc.quotas.kv_bytes,
                        token_budget=None if proc.quotas.tokens is None
                        else proc.quotas.tokens - proc.tokens_used)


@syscall("llm.cancel", ("request_id",))
def llm_cancel(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.llm.cancel(proc.host, _string(args["request_id"], "request_id"), owner=proc.pid)


@syscall("llm.release", ("context_id",))
def llm_release(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.llm.release_context(_string(args["context_id"], "context_id"), owner=proc.pid)


@syscall("llm.tokenize", ("text",))
def llm_tokenize(s: Services, proc: Process, args: dict, handling: str | None) -> list[int]:
    _check_size(args["text"], None)
    return s.llm.tokenize(args["text"])


@syscall("llm.count", (), ("text", "messages"))
def llm_count(s: Services, proc: Process, args: dict, handling: str | None) -> int:
    _check_size(args.get("text"), args.get("messages"))
    return s.llm.count_tokens(text=args.get("text"), messages=args.get("messages"))


@syscall("llm.info")
def llm_info(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return s.llm.info()


@syscall("llm.embed", ("texts",), slow=True)
async def llm_embed(s: Services, proc: Process, args: dict, handling: str | None) -> list:
    texts = args["texts"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidArgument("llm.embed takes a list of strings")
    if len(texts) > MAX_EMBED_TEXTS:
        raise InvalidArgument(f"llm.embed takes at most {MAX_EMBED_TEXTS} texts per call, "
                              f"got {len(texts)}; split the list")
    _check_size(None, [{"content": t} for t in texts])
    return await s.memory.embed(texts)


def _check_size(text: Any, messages: Any) -> None:
    """Refuse input whose sheer size would stall the kernel before any other check could."""
    size = len(text) if isinstance(text, str) else 0
    if isinstance(messages, list):
        size += sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), str))
    if size > MAX_TEXT_CHARS:
        raise InvalidArgument(f"the input has {size:,} characters, over the limit of "
                              f"{MAX_TEXT_CHARS:,}; no model context holds that much")


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    return value


# -- fs ----------------------------------------------------------------------------
# File operations run on a worker thread: an fsync or a 16 MiB read must not stall the
# kernel loop that schedules everyone's LLM steps.
def _fs(op: str, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    @syscall(f"fs.{op}", required, ("owner", *optional), slow=True)
    async def handler(s: Services, proc: Process, args: dict, handling: str | None) -> Any:
        kwargs = {a: args[a] for a in optional if a in args}
        owner = _pid_of(s, args.get("owner"))
        method = getattr(s.fs, op)
        result = await asyncio.to_thread(method, proc.pid, *(args[a] for a in required),
                                         owner=owner, **kwargs)
        return _plain(result)
    return handler


for _op, _req, _opt in (("read", ("path",), ("offset", "length")), ("write", ("path", "data"), ()),
                        ("append", ("path", "data"), ()), ("list", (), ("path",)),
                        ("stat", ("path",), ()), ("exists", ("path",), ()),
                        ("mkdir", ("path",), ("parents",)), ("rename", ("src", "dst"), ()),
                        ("delete", ("path",), ("recursive",)), ("versions", ("path",), ()),
                        ("rollback", ("path", "version"), ())):
    _fs(_op, _req, _opt)


@syscall("fs.grant", ("path", "to", "mode"))
def fs_grant(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return _plain(s.fs.grant(proc.pid, args["path"], _pid_of(s, args["to"]), args["mode"]))


@syscall("fs.revoke", ("path", "to"))
def fs_revoke(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.fs.revoke(proc.pid, args["path"], _pid_of(s, args["to"]))


@syscall("fs.grants")
def fs_grants(s: Services, proc: Process, args: dict, handling: str | None) -> list:
    return _plain(s.fs.grants(proc.pid))


@syscall("fs.usage")
def fs_usage(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return _plain(s.fs.usage(proc.pid))


# -- tools -------------------------------------------------------------------------
MAX_APPROVAL_WAIT_S = 300.0  # how long a dangerous call waits for a person at most


@syscall("tools.list")
def tools_list(s: Services, proc: Process, args: dict, handling: str | None) -> list:
    return [_tool_entry(spec) for spec in s.tools.list(proc.pid, proc.tools)]


def _approval_wait(args: dict) -> float:
    wait = args.get("approval_timeout_s", MAX_APPROVAL_WAIT_S)
    if isinstance(wait, bool) or not isinstance(wait, int | float) \
            or not 0 < wait <= MAX_APPROVAL_WAIT_S:
        raise InvalidArgument(f"approval_timeout_s must be a number of seconds in "
                              f"(0, {MAX_APPROVAL_WAIT_S:g}]")
    return float(wait)


@syscall("tools.call", ("name",), ("args", "approval_timeout_s"), slow=True)
async def tools_call(s: Services, proc: Process, args: dict, handling: str | None) -> Any:
    wait = _approval_wait(args)
    token = caller.set(proc)
    try:
        return await s.tools.call(proc.pid, args["name"], _tool_args(args.get("args")),
                                  allowed=proc.tools, approval=proc.approval,
                                  approval_timeout_s=wait)
    finally:
        caller.reset(token)


@syscall("tools.ask", ("name", "args"), ("approval_timeout_s",), slow=True)
async def tools_ask(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    """A person's decision on a dangerous call of the program's own tool (see ToolRegistry.ask)."""
    await s.tools.ask(proc.pid, args["name"], _tool_args(args["args"]), approval=proc.approval,
                      approval_timeout_s=_approval_wait(args))


@syscall("tools.register", ("spec",))
def tools_register(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return s.agent_tools.register(proc, args["spec"])


@syscall("tools.grant", ("name", "to"))
def tools_grant(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.tools.grant(proc.pid, _string(args["name"], "name"), _pid_of(s, args["to"]))


@syscall("tools.revoke", ("name", "to"))
def tools_revoke(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    s.tools.revoke(proc.pid, _string(args["name"], "name"), _pid_of(s, args["to"]))


def _tool_entry(spec: Any) -> dict:
    """An OpenAI tool dict, plus whether calling it waits for a person's approval."""
    entry = spec.to_openai()
    entry["dangerous"] = spec.dangerous
    return entry


def _tool_args(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"a tool's args must be a dict, got {type(value).__name__}")
    return value


# -- memory ------------------------------------------------------------------------
@syscall("memory.add", ("text",), ("metadata",), slow=True)
async def memory_add(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    store = await s.memory.store()
    _check_memory_quota(store, proc)
    item = await asyncio.to_thread(store.add, proc.pid, args["text"], args.get("metadata"))
    return _plain(item)


@syscall("memory.add_many", ("items",), slow=True)
async def memory_add_many(s: Services, proc: Process, args: dict, handling: str | None) -> list:
    items = args["items"]
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and set(i) <= {"text", "metadata"} for i in items):
        raise InvalidArgument("memory.add_many takes a list of {'text', 'metadata'} dicts")
    if len(items) > MAX_EMBED_TEXTS:
        raise InvalidArgument(f"memory.add_many takes at most {MAX_EMBED_TEXTS} items per call")
    store = await s.memory.store()
    _check_memory_quota(store, proc, len(items))
    added = await asyncio.to_thread(store.add_many, proc.pid,
                                    [(i.get("text"), i.get("metadata")) for i in items])
    return _plain(added)


@syscall("memory.search", ("query",), ("k", "where"), slow=True)
async def memory_search(s: Services, proc: Process, args: dict, handling: str | None) -> list:
    store = await s.memory.store()
    items = await asyncio.to_thread(store.search, proc.pid, args["query"], args.get("k", 5),
                                    where=args.get("where"))
    return _plain(items)


@syscall("memory.get", ("id",), slow=True)
async def memory_get(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    return _plain((await s.memory.store()).get(proc.pid, args["id"]))


@syscall("memory.delete", ("id",), slow=True)
async def memory_delete(s: Services, proc: Process, args: dict, handling: str | None) -> None:
    (await s.memory.store()).delete(proc.pid, args["id"])


@syscall("memory.count", slow=True)
async def memory_count(s: Services, proc: Process, args: dict, handling: str | None) -> int:
    return (await s.memory.store()).count(proc.pid)


def _check_memory_quota(store, proc: Process, adding: int = 1) -> None:
    held = store.count(proc.pid)
    if held + adding > proc.quotas.memory_items:
        raise QuotaExceeded(f"process {proc.pid} holds {held} memories and its quota is "
                            f"{proc.quotas.memory_items}; delete some first")


# -- net ---------------------------------------------------------------------------
@syscall("net.fetch", ("url",), ("method", "headers", "body", "timeout", "max_bytes"),
         slow=True)
async def net_fetch(s: Services, proc: Process, args: dict, handling: str | None) -> dict:
    if s.net is None:
        raise Unavailable("this kernel has no network service")
    return await s.net.fetch(proc.pid, proc.net, args)
