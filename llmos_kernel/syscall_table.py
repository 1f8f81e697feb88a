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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmos_kernel.errors import InvalidArgument, NotFound, QuotaExceeded
from llmos_kernel.proctable import Process

if TYPE_CHECKING:
    from llmos_kernel.kernel import Kernel

caller: contextvars.ContextVar[Process | None] = contextvars.ContextVar("llmos_caller",
                                                                       default=None)


@dataclass(frozen=True)
class Syscall:
    fn: Callable
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    slow: bool = False


TABLE: dict[str, Syscall] = {}


def syscall(name: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
            slow: bool = False):
    def register(fn):
        TABLE[name] = Syscall(fn, required, optional, slow)
        return fn
    return register


def check_args(name: str, args: Any) -> dict:
    spec = TABLE.get(name)
    if spec is None:
        raise NotFound(f"no syscall {name!r}")
    if not isinstance(args, dict):
        raise InvalidArgument(f"{name}: arguments must be a dict")
    unknown = set(args) - set(spec.required) - set(spec.optional)
    if unknown:
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


def _pid_of(k: Kernel, who: Any) -> int | None:
    return None if who is None else k.table.find(who).pid


# -- ipc ---------------------------------------------------------------------------
@syscall("ipc.send", ("to", "type", "payload"),
         ("id", "correlation_id", "reply_to", "deadline", "schema"))
def ipc_send(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return k.ipc.send(proc, args, handling)


@syscall("ipc.publish", ("topic", "type", "payload"), ("id", "schema"))
def ipc_publish(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return k.ipc.publish(proc, args, handling)


@syscall("ipc.subscribe", ("topic",))
def ipc_subscribe(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.ipc.subscribe(proc, args["topic"], on=True)


@syscall("ipc.unsubscribe", ("topic",))
def ipc_unsubscribe(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.ipc.subscribe(proc, args["topic"], on=False)


@syscall("ipc.ack", ("id",))
def ipc_ack(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.ipc.ack(proc, args["id"])


# -- proc --------------------------------------------------------------------------
@syscall("proc.spawn", ("spec",), slow=True)
async def proc_spawn(k: Kernel, proc: Process, args: dict, handling: str | None) -> int:
    child = await k.procs.spawn(proc, args["spec"])
    k.on_spawned(child)
    return child.pid


@syscall("proc.kill", ("pid",), ("signal",))
def proc_kill(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.procs.kill(proc, _pid_of(k, args["pid"]), args.get("signal", "term"))


@syscall("proc.wait", ("pid",), ("timeout",), slow=True)
async def proc_wait(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return await k.procs.wait(proc, _pid_of(k, args["pid"]), args.get("timeout"))


@syscall("proc.ps", (), ("all",))
def proc_ps(k: Kernel, proc: Process, args: dict, handling: str | None) -> list:
    return k.procs.ps(include_exited=bool(args.get("all", False)))


@syscall("proc.self")
def proc_self(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return {**proc.summary(), "quotas": dataclasses.asdict(proc.quotas), "tools": proc.tools,
            "restart": dataclasses.asdict(proc.restart), "args": proc.args}


@syscall("proc.children")
def proc_children(k: Kernel, proc: Process, args: dict, handling: str | None) -> list:
    return [c.summary() for c in k.table.children(proc.pid)]


@syscall("proc.link", ("pid",), ("on",))
def proc_link(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.procs.link(proc, args["pid"], on=bool(args.get("on", True)))


@syscall("proc.monitor", ("pid",), ("on",))
def proc_monitor(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.procs.monitor(proc, args["pid"], on=bool(args.get("on", True)))


@syscall("proc.grant", ("pid", "to"))
def proc_grant(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.procs.grant(proc, _pid_of(k, args["pid"]), args["to"])


# -- llm ---------------------------------------------------------------------------
@syscall("llm.generate", ("spec",))
def llm_generate(k: Kernel, proc: Process, args: dict, handling: str | None) -> str:
    spec = args["spec"]
    if not isinstance(spec, dict):
        raise InvalidArgument("llm.generate takes a dict spec")
    if proc.quotas.tokens is not None and proc.tokens_used >= proc.quotas.tokens:
        raise QuotaExceeded(f"process {proc.pid} has used its {proc.quotas.tokens}-token quota")
    return k.llm.submit(proc.host, spec, owner=proc.pid, priority=proc.priority,
                        salt=proc.tenant, kv_bytes_limit=proc.quotas.kv_bytes,
                        token_budget=None if proc.quotas.tokens is None
                        else proc.quotas.tokens - proc.tokens_used)


@syscall("llm.cancel", ("request_id",))
def llm_cancel(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.llm.cancel(proc.host, args["request_id"], owner=proc.pid)


@syscall("llm.release", ("context_id",))
def llm_release(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.llm.release_context(args["context_id"], owner=proc.pid)


@syscall("llm.tokenize", ("text",))
def llm_tokenize(k: Kernel, proc: Process, args: dict, handling: str | None) -> list[int]:
    return k.llm.tokenize(args["text"])


@syscall("llm.count", (), ("text", "messages"))
def llm_count(k: Kernel, proc: Process, args: dict, handling: str | None) -> int:
    return k.llm.count_tokens(text=args.get("text"), messages=args.get("messages"))


@syscall("llm.info")
def llm_info(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return k.llm.info()


@syscall("llm.embed", ("texts",), slow=True)
async def llm_embed(k: Kernel, proc: Process, args: dict, handling: str | None) -> list:
    vectors = await k.memory_service().embed_texts(args["texts"])
    return vectors.tolist()


# -- fs ----------------------------------------------------------------------------
def _fs(op: str, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    @syscall(f"fs.{op}", required, ("owner", *optional))
    def handler(k: Kernel, proc: Process, args: dict, handling: str | None) -> Any:
        kwargs = {a: args[a] for a in optional if a in args}
        owner = _pid_of(k, args.get("owner"))
        result = getattr(k.fs, op)(proc.pid, *(args[a] for a in required), owner=owner, **kwargs)
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
def fs_grant(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return _plain(k.fs.grant(proc.pid, args["path"], _pid_of(k, args["to"]), args["mode"]))


@syscall("fs.revoke", ("path", "to"))
def fs_revoke(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.fs.revoke(proc.pid, args["path"], _pid_of(k, args["to"]))


@syscall("fs.usage")
def fs_usage(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return _plain(k.fs.usage(proc.pid))


# -- tools -------------------------------------------------------------------------
@syscall("tools.list")
def tools_list(k: Kernel, proc: Process, args: dict, handling: str | None) -> list:
    return [spec.to_openai() for spec in k.tools.list(proc.pid, proc.tools)]


@syscall("tools.call", ("name",), ("args",), slow=True)
async def tools_call(k: Kernel, proc: Process, args: dict, handling: str | None) -> Any:
    token = caller.set(proc)
    try:
        return await k.tools.call(proc.pid, args["name"], args.get("args") or {},
                                  allowed=proc.tools, approval=proc.approval)
    finally:
        caller.reset(token)


@syscall("tools.register", ("spec",))
def tools_register(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return k.register_agent_tool(proc, args["spec"])


# -- memory ------------------------------------------------------------------------
@syscall("memory.add", ("text",), ("metadata",), slow=True)
async def memory_add(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    store = k.memory_service()
    _check_memory_quota(store, proc)
    item = await asyncio.to_thread(store.add, proc.pid, args["text"], args.get("metadata"))
    return _plain(item)


@syscall("memory.search", ("query",), ("k", "where"), slow=True)
async def memory_search(k: Kernel, proc: Process, args: dict, handling: str | None) -> list:
    store = k.memory_service()
    items = await asyncio.to_thread(store.search, proc.pid, args["query"], args.get("k", 5),
                                    where=args.get("where"))
    return _plain(items)


@syscall("memory.get", ("id",))
def memory_get(k: Kernel, proc: Process, args: dict, handling: str | None) -> dict:
    return _plain(k.memory_service().get(proc.pid, args["id"]))


@syscall("memory.delete", ("id",))
def memory_delete(k: Kernel, proc: Process, args: dict, handling: str | None) -> None:
    k.memory_service().delete(proc.pid, args["id"])


@syscall("memory.count")
def memory_count(k: Kernel, proc: Process, args: dict, handling: str | None) -> int:
    return k.memory_service().count(proc.pid)


def _check_memory_quota(store, proc: Process) -> None:
    if store.count(proc.pid) >= proc.quotas.memory_items:
        raise QuotaExceeded(f"process {proc.pid} holds {proc.quotas.memory_items} memories, its "
                            "quota; delete some first")
