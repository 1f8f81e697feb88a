"""The kernel actor: one per llmos instance, named ``<name>`` in Ray namespace ``llmos``.

It owns the scarce things — the model and its KV memory (the LLM service),
the process table, mailboxes, files, tools, memories and the state dir — and
answers every call with ``{"ok": value}`` or ``{"error": {"type", "message"}}``,
so a bad request gets a typed error while everyone else keeps being served.

Who is asking: agent processes present the capability the kernel issued at
spawn (their host carries it, per call); agent hosts present the secret the
kernel gave them; drivers (the CLI, scripts, benchmarks) present the root
token the kernel writes into its state dir (mode 0600, like a Jupyter token).
After a crash Ray restarts the actor, which reloads everything from the
state dir and restarts the processes that should run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from llmos_kernel import journal, syscall_table
from llmos_kernel.errors import (
    InvalidArgument,
    LlmosError,
    NotFound,
    PermissionDenied,
    ToolError,
    Unavailable,
)
from llmos_kernel.host_channel import HostChannel, internal_error
from llmos_kernel.ipc import IPCService
from llmos_kernel.llm_service import LLMConfig, LLMService
from llmos_kernel.mailbox import MailboxStore
from llmos_kernel.messages import UNTYPED, encode
from llmos_kernel.notices import SCHEMAS
from llmos_kernel.outbox import Outboxes
from llmos_kernel.processes import ProcessManager
from llmos_kernel.proctable import Process, ProcessTable
from llmos_kernel.services.approvals import ApprovalQueue
from llmos_kernel.services.fs import FileSystem
from llmos_kernel.services.memory import MemoryStore
from llmos_kernel.services.system_tools import file_and_kv_tools
from llmos_kernel.services.tools import ToolRegistry, ToolSpec, builtin_tools

log = logging.getLogger("llmos.kernel")

NAMESPACE = "llmos"
DEFAULT_NAME = "kernel"
ROOT_TOKEN_FILE = "root.token"


@dataclass
class KernelConfig:
    state_dir: str
    name: str = DEFAULT_NAME
    llm: LLMConfig = field(default_factory=LLMConfig)
    hosts: int = 1  # shared agent hosts
    memory_model: str = "minilm"
    driver_silent_s: float = 60.0  # a driver script's host silent this long is gone
    local_delivery: bool = True  # hosts on the kernel's node journal their own messages


def answer(method):
    """Wrap a kernel method: typed errors go back as data, bugs are logged, never fatal."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            await self._started()
            return {"ok": await method(self, *args, **kwargs)}
        except LlmosError as e:
            return {"error": e.to_wire()}
        except Exception as e:
            log.exception("kernel call %s failed", method.__name__)
            return {"error": internal_error(method.__name__, e)}

    return wrapper


class Kernel:
    def __init__(self, cfg: KernelConfig):
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self.started_at = time.time()
        self.root_token = self._root_token()
        self.outboxes = Outboxes()
        self.table = ProcessTable(self.state_dir / "processes.db")
        self.store = MailboxStore(self.state_dir / "mailbox.db")
        self.ipc = IPCService(self.store, self.table, self.outboxes)
        for schema in SCHEMAS:
            if schema["name"] not in self.ipc.schemas:
                self.ipc.schemas.register_schema(schema)
        self.fs = FileSystem(self.state_dir / "files")
        self.approval_queue = ApprovalQueue(self.state_dir / "approvals.db")
        self.tools = ToolRegistry(self.approval_queue)
        for fn in builtin_tools() + file_and_kv_tools(self.fs, syscall_table.caller.get):
            self.tools.register(fn)
        self.llm = LLMService(cfg.llm, cfg.name, self.outboxes, on_usage=self._charge_tokens)
        self.procs = ProcessManager(cfg.name, self.table, self.ipc, self.outboxes,
                                    shared_hosts=cfg.hosts, on_final_exit=self._reap,
                                    journal_dir=(self.state_dir / journal.JOURNAL_DIR
                                                 if cfg.local_delivery else None))
        self.channel = HostChannel(self)
        self._memory: asyncio.Future[MemoryStore] | None = None
        self._embedder = None  # the memory store's sentence embedder, once loaded
        self._tool_calls: dict[str, tuple[str, asyncio.Future]] = {}
        self._tool_owners: dict[int, str] = {}  # pid -> capability hash that registered
        self._ready: asyncio.Future | None = None
        # Start serving by ourselves, also after Ray restarts this actor from scratch.
        ray.get_runtime_context().current_actor.ready.remote()

    def _root_token(self) -> str:
        """A new token; after Ray restarts the actor, the one its drivers already hold."""
        path = self.state_dir / ROOT_TOKEN_FILE
        if ray.get_runtime_context().was_current_actor_reconstructed and path.exists():
            return path.read_text().strip()
        token = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token

    async def _started(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                await self.llm.start()
                await self.procs.start()
                self.ipc.commit()
                asyncio.get_running_loop().create_task(self._housekeeping())
                self._ready.set_result(True)
            except BaseException as e:
                self._ready.set_exception(e)
                raise
        await asyncio.shield(self._ready)

    async def ready(self) -> dict:
        """Load the model, start hosts and recovered processes; returns status."""
        try:
            await self._started()
        except LlmosError as e:
            return {"error": e.to_wire()}
        return {"ok": self._status()}

    async def _housekeeping(self) -> None:
        """Every second: expire messages past their deadline, re-pump mailboxes, and let
        the processes of driver scripts that went silent exit."""
        while True:
            await asyncio.sleep(1.0)
            try:
                expired = self.store.expire()
                if expired:
                    log.info("%d messages expired", len(expired))
                self.procs.reap_drivers(self.cfg.driver_silent_s)
                self.procs.take_over_journals()
                self.ipc.commit()
                self.ipc.pump_all()
            except Exception:
                log.exception("housekeeping failed")

    # -- identity ---------------------------------------------------------------
    def _check_root(self, token: Any) -> None:
        if not isinstance(token, str) or not hmac.compare_digest(token, self.root_token):
            raise PermissionDenied("bad or missing root token (read it from the kernel's "
                                   f"state dir: {self.state_dir / ROOT_TOKEN_FILE})")

    # -- the host channel (llmos_kernel.host_channel) -----------------------------
    async def host_batch(self, host_id: str, epoch: str, seq: int, ops: list, exits: list,
                         logs: dict, secret: str) -> dict:
        """A host's syscalls since its previous batch, answered per call."""
        try:
            await self._started()
        except LlmosError as e:
            return {"error": e.to_wire()}
        return await self.channel.batch(host_id, epoch, seq, ops, exits, logs, secret)

    async def host_poll(self, host_id: str, timeout: float, secret: str) -> dict:
        """Wait (up to ``timeout`` s) until the kernel has something for this host."""
        try:
            await self._started()
        except LlmosError as e:
            return {"error": e.to_wire()}
        return await self.channel.poll(host_id, timeout, secret)

    # -- services the syscall table uses -------------------------------------------
    async def memory_service(self) -> MemoryStore:
        """The long-term memory store; its embedding model loads on first use, off the loop."""
        if self._memory is None or (self._memory.done() and self._memory.exception()):
            self._memory = asyncio.ensure_future(asyncio.to_thread(self._open_memory))
        return await asyncio.shield(self._memory)

    def _open_memory(self) -> MemoryStore:
        from llmos_kernel.core.embedder import Embedder

        self._embedder = Embedder.load(self.cfg.memory_model)
        return MemoryStore(self.state_dir / "memory.db", self._embedder.embed)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Unit sentence embeddings from the memory store's model, computed off the loop."""
        await self.memory_service()
        return (await asyncio.to_thread(self._embedder.embed, texts)).tolist()

    def _charge_tokens(self, pid: int, usage: dict) -> None:
        proc = self.table.procs.get(pid)
        if proc is not None:
            proc.tokens_used += usage["prompt_tokens"] + usage["completion_tokens"]
            self.table.save(proc)

    def on_spawned(self, proc: Process) -> None:
        self.fs.set_quota(proc.pid, proc.quotas.fs_bytes)

    def _reap(self, proc: Process) -> None:
        self.tools.unregister_owner(proc.pid)
        self._tool_owners.pop(proc.pid, None)

    def register_agent_tool(self, proc: Process, spec: Any) -> dict:
        """Add a tool that runs in ``proc``'s own host, as ``proc``, when anyone calls it."""
        tool_spec = _agent_tool_spec(spec)
        if self._tool_owners.get(proc.pid, proc.cap_hash) != proc.cap_hash:
            self.tools.unregister_owner(proc.pid)  # restarted: it offers its tools anew
        self._tool_owners[proc.pid] = proc.cap_hash

        async def run_on_host(args: dict, owner: int = proc.pid, name: str = tool_spec.name):
            host = self.table.get(owner).host
            if host is None:
                raise Unavailable(f"process {owner}, which runs tool {name!r}, is not running")
            call = secrets.token_hex(8)
            future = asyncio.get_running_loop().create_future()
            self._tool_calls[call] = (host, future)
            try:
                self.outboxes.put(host, {"kind": "tool", "call": call, "pid": owner,
                                         "name": name, "args": args})
                reply = await future
            finally:
                self._tool_calls.pop(call, None)
            if "error" in reply:
                raise ToolError(f"tool {name!r} failed in process {owner}: "
                                f"{reply['error'].get('message', 'no message')}")
            return reply.get("ok")

        self.tools.register(tool_spec, owner=proc.pid, executor=run_on_host)
        return tool_spec.to_openai()

    def _tool_result(self, host_id: str, args: Any) -> dict:
        call = args.get("call") if isinstance(args, dict) else None
        pending = self._tool_calls.get(call) if isinstance(call, str) else None
        if pending is None or pending[0] != host_id:
            raise NotFound(f"no tool call {call!r} is waiting on this host")
        reply = args.get("reply")
        if not isinstance(reply, dict) or not ("ok" in reply or isinstance(reply.get("error"),
                                                                          dict)):
            reply = {"error": {"message": f"the host sent a malformed tool reply: {reply!r:.200}"}}
        if not pending[1].done():
            pending[1].set_result(reply)
        return {"ok": None}

    # -- driver API (root token) -----------------------------------------------------
    @answer
    async def attach(self, token: str, host_id: str, name: str | None = None,
                     priority: int = 0) -> dict:
        """Make a driver script a process; returns its pid and capability."""
        self._check_root(token)
        self.procs.register_driver_host(host_id, token)
        proc, capability = self.procs.attach(name, priority, host_id)
        self.on_spawned(proc)
        return {"pid": proc.pid, "capability": capability}

    @answer
    async def spawn(self, token: str, spec: dict) -> int:
        self._check_root(token)
        proc = await self.procs.spawn(None, spec)
        self.on_spawned(proc)
        self.ipc.commit()
        return proc.pid

    @answer
    async def kill(self, token: str, pid: Any, signal: str = "term") -> None:
        self._check_root(token)
        self.procs.kill(None, self.table.find(pid).pid, signal)
        self.ipc.commit()

    @answer
    async def wait(self, token: str, pid: Any, timeout: float | None = None) -> dict:
        self._check_root(token)
        return await self.procs.wait(None, self.table.find(pid).pid, timeout)

    @answer
    async def ps(self, token: str, include_exited: bool = True) -> list:
        self._check_root(token)
        return self.procs.ps(include_exited)

    @answer
    async def send(self, token: str, to: Any, type_: str, fields: Any) -> dict:
        """Send a message as the user (sender pid 0), e.g. from ``llmos send``."""
        self._check_root(token)
        if not isinstance(type_, str) or not type_:
            raise InvalidArgument("message type must be a non-empty string")
        if type_ != UNTYPED and type_ not in self.ipc.schemas:
            raise InvalidArgument(f"unknown message type {type_!r}; it becomes known when a "
                                  "program that declares it sends one, or use type "
                                  f"{UNTYPED!r} for a plain dict")
        payload = encode(fields) if type_ == UNTYPED else _typed_payload(
            type_, self.ipc.schemas.schema(type_)["version"], fields)
        user = Process(pid=0, program={"kind": "attached"}, status="running")
        try:
            return self.ipc.send(user, {"to": to, "type": type_, "payload": payload}, None)
        finally:
            self.ipc.commit()  # the message, or its dead letter

    @answer
    async def logs(self, token: str, pid: int, offset: int = 0) -> dict:
        self._check_root(token)
        self.table.get(pid)
        if not isinstance(offset, int) or offset < 0:
            raise InvalidArgument("offset must be an int >= 0")
        data = await asyncio.to_thread(_read_from, self.channel.log_path(pid), offset)
        return {"text": data.decode("utf-8", errors="replace"), "offset": offset + len(data),
                "alive": self.table.get(pid).alive}

    @answer
    async def dead_letters(self, token: str, pid: int | None = None, limit: int = 100) -> list:
        """Messages that will never be delivered (malformed, expired, receiver gone), and why."""
        self._check_root(token)
        return [{"id": d.envelope.id, "sender": d.envelope.sender,
                 "receiver": d.envelope.receiver, "type": d.envelope.type, "reason": d.reason,
                 "died_at": d.died_at}
                for d in self.store.dead_letters(receiver=pid, limit=limit)]

    @answer
    async def approvals(self, token: str) -> list:
        self._check_root(token)
        return [dataclasses.asdict(a) for a in self.approval_queue.pending()]

    @answer
    async def decide(self, token: str, approval_id: str, approve: bool) -> dict:
        self._check_root(token)
        return dataclasses.asdict(self.approval_queue.decide(approval_id, bool(approve)))

    @answer
    async def submit(self, token: str, client: str, spec: dict, priority: int = 0,
                     owner: int = 0, cache_salt: str = "") -> str:
        self._check_root(token)
        _check_client(client)
        return self.llm.submit(client, spec, owner=owner, priority=priority,
                               salt=cache_salt or f"client:{client}")

    @answer
    async def cancel(self, token: str, client: str, request_id: str) -> None:
        self._check_root(token)
        self.llm.cancel(client, request_id)

    @answer
    async def poll(self, token: str, client: str, timeout: float = 10.0) -> list:
        self._check_root(token)
        _check_client(client)
        return await self.outboxes.take(client, min(max(float(timeout), 0.0), 60.0))

    @answer
    async def release_context(self, token: str, context_id: str) -> None:
        self._check_root(token)
        self.llm.release_context(context_id)

    @answer
    async def configure(self, token: str, options: dict) -> dict:
        """Change scheduling knobs at run time (prefix_caching, max_batch_tokens, max_seqs)."""
        self._check_root(token)
        return self.llm.configure(options)

    @answer
    async def status(self, token: str) -> dict:
        self._check_root(token)
        return self._status()

    def _status(self) -> dict:
        live = self.table.live()
        return {"name": self.cfg.name, "state_dir": str(self.state_dir), "pid": os.getpid(),
                "uptime_s": time.time() - self.started_at,
                "config": dataclasses.asdict(self.cfg),
                "processes": {"live": len(live), "total": len(self.table.procs),
                              "hosts": {h: len(i.pids) for h, i in self.procs.hosts.items()},
                              "shared_hosts": self.procs.shared_host_ids()},
                "ipc": {**self.ipc.stats, "pending": sum(
                    self.store.receivers_with_pending().values())},
                "host_channel": self.channel.stats,
                **self.llm.status()}

    async def shutdown(self) -> None:
        for info in list(self.procs.hosts.values()):
            if info.handle is not None:
                with contextlib.suppress(Exception):
                    ray.kill(info.handle)
        await self.llm.stop()


def _typed_payload(type_: str, version: int, fields: Any) -> bytes:
    """The wire form of a typed message built from plain fields (the kernel validates it)."""
    import msgpack

    return msgpack.packb({"t": type_, "v": version, "f": fields}, use_bin_type=True)


MAX_TOOL_TIMEOUT_S = 3600.0


def _agent_tool_spec(spec: Any) -> ToolSpec:
    """A ToolSpec from the plain fields a program sent with ``tools.register``."""
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise InvalidArgument("tools.register takes a tool spec dict (name, description, "
                              "parameters, dangerous, timeout_s)")
    if not isinstance(spec.get("description", ""), str):
        raise InvalidArgument("a tool's description must be a string")
    if not isinstance(spec.get("dangerous", False), bool):
        raise InvalidArgument("a tool's dangerous flag must be true or false")
    timeout = spec.get("timeout_s", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
            or not 0 < timeout <= MAX_TOOL_TIMEOUT_S:
        raise InvalidArgument(f"a tool's timeout_s must be a number in (0, {MAX_TOOL_TIMEOUT_S:g}]")
    try:
        return ToolSpec(**spec)
    except LlmosError:
        raise
    except Exception as e:  # noqa: BLE001 - TypeError for fields, jsonschema for odd schemas
        raise InvalidArgument(f"bad tool spec: {type(e).__name__}: {e}") from None


def _check_client(client: Any) -> None:
    if not isinstance(client, str) or not 0 < len(client) <= 128:
        raise InvalidArgument("client id must be a non-empty string of at most 128 characters")


def _read_from(path: Path, offset: int, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


RemoteKernel = ray.remote(Kernel)
