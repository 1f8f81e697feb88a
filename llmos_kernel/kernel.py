"""The kernel actor: one per llmos instance, named ``<name>`` in Ray namespace ``llmos``.

It owns the scarce things — the model and its KV memory (the LLM service),
the process table, mailboxes, files, tools, memories and the state dir — and
answers every driver call with a ``wire.Result`` (a value or a typed error) and
every host call with an encoded ``wire.Answer``, so a bad request gets a typed
error while everyone else keeps being served.

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

from llmos_kernel import gc_pauses, journal, syscall_table, wire
from llmos_kernel.errors import InvalidArgument, LlmosError, PermissionDenied
from llmos_kernel.host_channel import HostChannel
from llmos_kernel.ipc import IPCService
from llmos_kernel.llm_service import LLMConfig, LLMService
from llmos_kernel.mailbox import MailboxStore
from llmos_kernel.messages import UNTYPED, encode
from llmos_kernel.notices import SCHEMAS
from llmos_kernel.outbox import Outboxes
from llmos_kernel.paths import DEFAULT_NAME, ROOT_TOKEN_FILE, publish_state_dir
from llmos_kernel.processes import ProcessManager
from llmos_kernel.proctable import Process, ProcessTable
from llmos_kernel.services.agent_tools import AgentTools
from llmos_kernel.services.approvals import ApprovalQueue
from llmos_kernel.services.fs import FileSystem
from llmos_kernel.services.memory import MemoryService
from llmos_kernel.services.net import NetService
from llmos_kernel.services.registry import Services
from llmos_kernel.services.system_tools import file_and_kv_tools
from llmos_kernel.services.tools import ToolRegistry, builtin_tools

log = logging.getLogger("llmos.kernel")


@dataclass
class KernelConfig:
    state_dir: str
    name: str = DEFAULT_NAME
    llm: LLMConfig = field(default_factory=LLMConfig)
    hosts: int = 1  # shared agent hosts
    memory_model: str = "minilm"
    driver_silent_s: float = 60.0  # a driver script's host silent this long is gone
    local_delivery: bool = True  # hosts on the kernel's node journal their own messages
    sandbox: bool = False  # every agent process runs sandboxed (actors.sandbox)


def answer(method):
    """Wrap a kernel method: its value or typed error as a ``wire.Result``; a bug is
    logged and reported, never fatal."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            await self._started()
            return wire.ok(await method(self, *args, **kwargs))
        except LlmosError as e:
            return wire.failure(e)
        except Exception as e:
            log.exception("kernel call %s failed", method.__name__)
            return wire.internal_error(method.__name__, e)

    return wrapper


class Kernel:
    def __init__(self, cfg: KernelConfig):
        gc_pauses.watch()
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self.started_at = time.time()
        self._nodes_seen: tuple[float, list] = (-NODES_TTL_S, [])  # (when, kernel status's)
        self.root_token = self._root_token()
        outboxes = Outboxes()
        table = ProcessTable(self.state_dir / "processes.db")
        self.store = MailboxStore(self.state_dir / "mailbox.db")
        ipc = IPCService(self.store, table, outboxes)
        for schema in SCHEMAS:
            if schema["name"] not in ipc.schemas:
                ipc.schemas.register_schema(schema)
        fs = FileSystem(self.state_dir / "files")
        approvals = ApprovalQueue(self.state_dir / "approvals.db")
        tools = ToolRegistry(approvals)
        for fn in builtin_tools() + file_and_kv_tools(fs, syscall_table.caller.get):
            tools.register(fn)
        agent_tools = AgentTools(tools, table, outboxes)
        procs = ProcessManager(cfg.name, table, ipc, outboxes, shared_hosts=cfg.hosts,
                               on_final_exit=lambda proc: agent_tools.forget(proc.pid),
                               journal_dir=(self.state_dir / journal.JOURNAL_DIR
                                            if cfg.local_delivery else None),
                               sandbox=cfg.sandbox)
        self.services = Services(
            table=table, outboxes=outboxes, procs=procs, ipc=ipc, fs=fs, tools=tools,
            agent_tools=agent_tools, llm=LLMService(cfg.llm, cfg.name, outboxes),
            memory=MemoryService(self.state_dir / "memory.db", cfg.memory_model),
            approvals=approvals, log_dir=self.state_dir / "logs",
            net=NetService(self.state_dir / "logs"))
        self.services.llm.on_usage = self.services.charge_tokens
        self.channel = HostChannel(self.services, self.root_token)
        self._ready: asyncio.Future | None = None
        self._phase = "starting"  # what _started is doing: a starting kernel's progress
        publish_state_dir(cfg.name, self.state_dir)
        # Start serving by ourselves, also after Ray restarts this actor from scratch.
        ray.get_runtime_context().current_actor.ready.remote(self.root_token)

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
                self._phase = "llm"
                await self.services.llm.start()
                self._phase = (f"starting {self.cfg.hosts} agent host(s) and the processes "
                               "recovered from the state dir")
                await self.services.procs.start()
                self.services.ipc.commit()
                gc_pauses.settle()  # what exists now lives as long as the kernel
                self._phase = "ready"
                asyncio.get_running_loop().create_task(self._housekeeping())
                self._ready.set_result(True)
            except BaseException as e:
                self._ready.set_exception(e)
                raise
        await asyncio.shield(self._ready)

    async def ready(self, token: str) -> wire.Result:
        """Load the model, start hosts and recovered processes; returns status."""
        try:
            self._check_root(token)
            await self._started()
        except LlmosError as e:
            return wire.failure(e)
        return wire.ok(self._status())

    async def boot_status(self, token: str) -> dict:
        """What a starting kernel is doing now (answers while ``ready`` waits), for the
        progress ``llmos kernel start`` shows."""
        self._check_root(token)
        phase = self.services.llm.phase if self._phase == "llm" else self._phase
        return {"phase": phase, "elapsed_s": time.time() - self.started_at,
                "ready": self._phase == "ready"}

    async def _housekeeping(self) -> None:
        """Every second: expire messages past their deadline, re-pump mailboxes, and let
        the processes of driver scripts that went silent exit."""
        s = self.services
        while True:
            await asyncio.sleep(1.0)
            try:
                expired = s.ipc.expire()
                if expired:
                    log.info("%d messages expired", len(expired))
                s.procs.reap_drivers(self.cfg.driver_silent_s)
                s.procs.take_over_journals()
                s.ipc.commit()
                s.ipc.pump_all()
            except Exception:
                log.exception("housekeeping failed")

    # -- identity ---------------------------------------------------------------
    def _check_root(self, token: Any) -> None:
        if not isinstance(token, str) or not hmac.compare_digest(token, self.root_token):
            raise PermissionDenied("bad or missing root token (read it from the kernel's "
                                   f"state dir: {self.state_dir / ROOT_TOKEN_FILE})")

    # -- the host channel (llmos_kernel.host_channel) -----------------------------
    async def host_batch(self, host_id: str, batch: bytes, secret: str) -> bytes:
        """A host's encoded ``wire.HostBatch``; an encoded ``wire.Answer``."""
        try:
            await self._started()
        except LlmosError as e:
            return wire.encode(wire.Answer(error=wire.failure(e).error))
        return await self.channel.batch(host_id, batch, secret)

    async def host_poll(self, host_id: str, timeout: float, secret: str) -> bytes:
        """Wait (up to ``timeout`` s) until the kernel has something for this host."""
        try:
            await self._started()
        except LlmosError as e:
            return wire.encode(wire.Answer(error=wire.failure(e).error))
        return await self.channel.poll(host_id, timeout, secret)

    # -- driver API (root token) -----------------------------------------------------
    @answer
    async def attach(self, token: str, host_id: str, name: str | None = None,
                     priority: int = 0, quotas: dict | None = None) -> dict:
        """Make a driver script a process (``quotas`` as for spawn); returns its pid and
        capability."""
        self._check_root(token)
        self.services.procs.register_driver_host(host_id, token)
        proc, capability = self.services.procs.attach(name, priority, host_id, quotas)
        self.services.spawned(proc)
        return {"pid": proc.pid, "capability": capability}

    @answer
    async def spawn(self, token: str, spec: dict) -> int:
        self._check_root(token)
        proc = await self.services.procs.spawn(None, spec)
        self.services.spawned(proc)
        self.services.ipc.commit()
        return proc.pid

    @answer
    async def kill(self, token: str, pid: Any, signal: str = "term") -> None:
        self._check_root(token)
        self.services.procs.kill(None, self.services.table.find(pid).pid, signal)
        self.services.ipc.commit()

    @answer
    async def wait(self, token: str, pid: Any, timeout: float | None = None) -> dict:
        self._check_root(token)
        return await self.services.procs.wait(None, self.services.table.find(pid).pid, timeout)

    @answer
    async def ps(self, token: str, include_exited: bool = True) -> list:
        self._check_root(token)
        return self.services.procs.ps(include_exited)

    @answer
    async def send(self, token: str, to: Any, type_: str, fields: Any) -> dict:
        """Send a message as the user (sender pid 0), e.g. from ``llmos send``."""
        self._check_root(token)
        if not isinstance(type_, str) or not type_:
            raise InvalidArgument("message type must be a non-empty string")
        ipc = self.services.ipc
        if type_ != UNTYPED and type_ not in ipc.schemas:
            raise InvalidArgument(f"unknown message type {type_!r}; it becomes known when a "
                                  "program that declares it sends one, or use type "
                                  f"{UNTYPED!r} for a plain dict")
        payload = encode(fields) if type_ == UNTYPED else _typed_payload(
            type_, ipc.schemas.schema(type_)["version"], fields)
        user = Process(pid=0, program=wire.to_builtins(wire.Program("attached")),
                       status="running")
        try:
            return ipc.send(user, {"to": to, "type": type_, "payload": payload}, None)
        finally:
            ipc.commit()  # the message, or its dead letter

    @answer
    async def logs(self, token: str, pid: int, offset: int = 0) -> dict:
        self._check_root(token)
        table = self.services.table
        table.get(pid)
        if not isinstance(offset, int) or offset < 0:
            raise InvalidArgument("offset must be an int >= 0")
        data = await asyncio.to_thread(_read_from, self.channel.log_path(pid), offset)
        return {"text": data.decode("utf-8", errors="replace"), "offset": offset + len(data),
                "alive": table.get(pid).alive}

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
        return [dataclasses.asdict(a) for a in self.services.approvals.pending()]

    @answer
    async def decide(self, token: str, approval_id: str, approve: bool) -> dict:
        self._check_root(token)
        return dataclasses.asdict(self.services.approvals.decide(approval_id, bool(approve)))

    @answer
    async def submit(self, token: str, client: str, spec: dict, priority: int = 0,
                     owner: int = 0, cache_salt: str = "") -> str:
        self._check_root(token)
        _check_client(client)
        return self.services.llm.submit(client, spec, owner=owner, priority=priority,
                                        salt=cache_salt or f"client:{client}")

    @answer
    async def cancel(self, token: str, client: str, request_id: str) -> None:
        self._check_root(token)
        self.services.llm.cancel(client, request_id)

    @answer
    async def poll(self, token: str, client: str, timeout: float = 10.0) -> list:
        self._check_root(token)
        _check_client(client)
        return await self.services.outboxes.take(client, min(max(float(timeout), 0.0), 60.0))

    @answer
    async def release_context(self, token: str, context_id: str) -> None:
        self._check_root(token)
        self.services.llm.release_context(context_id)

    @answer
    async def configure(self, token: str, options: dict) -> dict:
        """Change scheduling knobs at run time (prefix_caching, max_batch_tokens, max_seqs)."""
        self._check_root(token)
        return self.services.llm.configure(options)

    @answer
    async def status(self, token: str) -> dict:
        self._check_root(token)
        return self._status()

    def _status(self) -> dict:
        s = self.services
        live = s.table.live()
        return {"name": self.cfg.name, "state_dir": str(self.state_dir), "pid": os.getpid(),
                "uptime_s": time.time() - self.started_at,
                "config": dataclasses.asdict(self.cfg),
                "processes": {"live": len(live), "total": len(s.table.procs),
                              "hosts": {h: len(i.pids) for h, i in s.procs.hosts.items()},
                              "shared_hosts": s.procs.shared_host_ids()},
                "placement": self._placement(),
                "ipc": {**s.ipc.stats, "pending": sum(
                    self.store.receivers_with_pending().values())},
                "host_channel": self.channel.stats, "gc": gc_pauses.snapshot(),
                **s.llm.status()}

    def _placement(self) -> dict:
        """Which Ray node each agent host and the model shard run on, and the nodes."""
        from llmos_kernel.cluster import cluster_nodes

        cached_at, nodes = self._nodes_seen
        if time.monotonic() - cached_at >= NODES_TTL_S:  # a GCS call blocks this actor's
            try:  # loop (host batches too): once in a while, not on every status poll
                nodes = [{"node": n.node_id, "address": n.address, "resources": {
                    k: v for k, v in n.resources.items()
                    if not k.startswith("node:") and k != "object_store_memory"}}
                    for n in cluster_nodes()]
            except Exception as e:  # noqa: BLE001 - status answers even when the GCS does not
                nodes = [{"error": str(e)}]
            self._nodes_seen = (time.monotonic(), nodes)
        hosts = [{"host": h, "node": i.node, "agents": len(i.pids), "isolated": i.isolated,
                  "sandbox": i.sandbox} for h, i in self.services.procs.hosts.items()
                 if i.handle is not None]
        return {"nodes": nodes, "hosts": hosts, "kernel_node":
                ray.get_runtime_context().get_node_id()}

    @answer
    async def net_log(self, token: str, pid: Any = None, limit: int = 100) -> list:
        """The last ``limit`` network requests processes made (of ``pid``), oldest first."""
        self._check_root(token)
        return self.services.net.history(
            None if pid is None else self.services.table.find(pid).pid, limit)

    @answer
    async def actors(self, token: str) -> dict:
        """What each agent host and the model shard(s) report about themselves, asked live
        with their own secrets (their methods answer no one else): ``shard`` is the first
        stage's report, ``stages`` every stage's node, device, layer range and bytes."""
        self._check_root(token)
        hosts = {h: i for h, i in self.services.procs.hosts.items() if i.handle is not None}
        infos = await asyncio.gather(*(i.handle.info.remote(i.secret) for i in hosts.values()),
                                     return_exceptions=True)
        return {"hosts": {h: (info if isinstance(info, dict) else {"error": str(info)})
                          for h, info in zip(hosts, infos)},
                "shard": await self.services.llm.shard_status(),
                "stages": await self.services.llm.stage_status()}

    async def shutdown(self, token: str) -> wire.Result:
        """Stop every agent host and the model shard (the kernel actor itself is then
        killed by whoever asked)."""
        try:
            self._check_root(token)
        except LlmosError as e:
            return wire.failure(e)
        for info in list(self.services.procs.hosts.values()):
            if info.handle is not None:
                with contextlib.suppress(Exception):
                    ray.kill(info.handle)
        await self.services.llm.stop()
        await self.services.net.close()
        return wire.ok(None)



NODES_TTL_S = 5.0  # how long kernel status reuses the cluster's node list


def _typed_payload(type_: str, version: int, fields: Any) -> bytes:
    """The wire form of a typed message built from plain fields (the kernel validates it)."""
    import msgpack

    return msgpack.packb({"t": type_, "v": version, "f": fields}, use_bin_type=True)


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
