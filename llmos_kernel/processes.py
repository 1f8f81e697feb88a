"""The process manager: spawn, kill, wait, links and monitors, hosts, supervision.

It decides; agent hosts execute. Orders (spawn, kill) travel to hosts through
their long-poll outbox; exits come back in host batches and go through the
supervisor's plan (``llmos_kernel.supervisor``). A host that dies takes its
agents with it; they exit with reason ``host_died`` and are restarted on
another host according to their restart type.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmos_kernel import journal, net_allowlist, spawn_actors, wire
from llmos_kernel.cluster import check_placement, cluster_nodes
from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    NoSuchProcess,
    PermissionDenied,
    SandboxUnavailable,
    Timeout,
    Unavailable,
)
from llmos_kernel.ipc import IPCService
from llmos_kernel.notices import notice
from llmos_kernel.outbox import Outboxes
from llmos_kernel.proctable import KERNEL_PID, Process, ProcessTable, Quotas, RestartSpec
from llmos_kernel.supervisor import KILLED, SHUTDOWN, plan_exit

log = logging.getLogger("llmos.proc")

APPROVAL_POLICIES = ("ask", "auto", "deny")
PROGRAM_KINDS = ("module", "source", "pickle")
MAX_NAME = 128


@dataclass
class HostInfo:
    host_id: str
    handle: Any  # ray actor handle; None for a driver's in-process host
    secret: str
    isolated: bool = False
    sandbox: bool = False  # it can run sandboxed processes (its start() said so)
    pids: set[int] = field(default_factory=set)
    seen: float = field(default_factory=time.monotonic)  # its last call
    polling: int = 0  # its long-polls waiting in the kernel (a host that waits is not silent)
    node: str | None = None  # the Ray node it runs on (its start() said so)


class ProcessManager:
    def __init__(self, kernel_name: str, table: ProcessTable, ipc: IPCService, outboxes: Outboxes,
                 *, shared_hosts: int = 1, kernel_spec: RestartSpec | None = None,
                 on_final_exit=None, journal_dir: Path | None = None, sandbox: bool = False):
        self.kernel_name, self.table, self.ipc, self.outboxes = kernel_name, table, ipc, outboxes
        self.shared_hosts = shared_hosts
        self.sandbox = sandbox  # every spawned process is sandboxed (llmos kernel start --sandbox)
        self.kernel_spec = kernel_spec or RestartSpec(strategy="one_for_one", intensity=5,
                                                      period_s=10.0)
        self.hosts: dict[str, HostInfo] = {}
        self.waiters: dict[int, list[asyncio.Future]] = {}
        self.on_final_exit = on_final_exit or (lambda proc: None)
        self.started = time.monotonic()
        self._host_seq = 0
        self.journal_dir = journal_dir  # None: messages between agents of a host go through us
        self._orphans: set[Path] = set()  # journals of dead hosts not yet taken over

    # -- hosts ----------------------------------------------------------------
    async def start(self) -> None:
        if self.journal_dir is not None:  # hosts of the kernel before us: stop, take over
            self._orphans.update(self.journal_dir.glob("*.db"))
            for path in self._orphans:
                try:
                    ray.kill(ray.get_actor(path.stem, namespace="llmos"), no_restart=True)
                except ValueError:
                    pass  # gone already
            await self._take_over_journals_soon(tries=40)
        for _ in range(self.shared_hosts):
            await self._new_host()
        await self._recover()
        self.started = time.monotonic()  # drivers' silence counts from here

    async def _new_host(self, *, isolated: bool = False, resources: dict | None = None,
                        node: str | None = None) -> HostInfo:
        """A new agent host actor. Shared hosts go round the cluster's alive nodes, one
        each in turn (Ray's SPREAD strategy is best effort and may stack them); an isolated
        one goes where its ``resources`` are, or onto ``node``."""
        self._host_seq += 1
        host_id = f"{self.kernel_name}-host-{self._host_seq}-{secrets.token_hex(3)}"
        secret = secrets.token_hex(16)
        options: dict[str, Any] = {"name": host_id, "namespace": "llmos", "num_cpus": 0,
                                   "max_concurrency": 100_000}
        custom = {}
        for key, amount in (resources or {}).items():
            if key in ("num_cpus", "num_gpus", "memory"):
                options[key] = amount
            else:
                custom[key] = amount
        if custom:
            options["resources"] = custom
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        elif not isolated:
            nodes = sorted(n.node_id for n in cluster_nodes())
            if len(nodes) > 1:  # the node with fewest shared hosts (hard: Ray's soft
                # affinity falls back to any node when the chosen one looks busy)
                load = {n: 0 for n in nodes}
                for h in self.shared_host_ids():
                    if self.hosts[h].node in load:
                        load[self.hosts[h].node] += 1
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    min(nodes, key=lambda n: (load[n], n)), soft=False)
        handle = spawn_actors.agent_host(options, self.kernel_name, host_id, secret)
        info = HostInfo(host_id, handle, secret, isolated)
        self.hosts[host_id] = info
        path = None if self.journal_dir is None else \
            str(journal.journal_path(self.journal_dir, host_id))
        started = await handle.start.remote(secret, path,
                                            ray.get_runtime_context().get_node_id())
        info.sandbox = bool(started.get("sandbox"))
        info.node = started.get("node")
        asyncio.get_running_loop().create_task(self._watch(info))
        return info

    async def _watch(self, info: HostInfo) -> None:
        try:
            await info.handle.lifetime.remote(info.secret)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            if self.hosts.get(info.host_id) is info:
                log.warning("agent host %s died: %s", info.host_id, e)
                await self.host_died(info)

    def register_driver_host(self, host_id: str, secret: str) -> None:
        """A driver script's in-process host; after a kernel restart, it finds its processes
        again on its first call."""
        if host_id in self.hosts:
            return
        info = self.hosts[host_id] = HostInfo(host_id, None, secret)
        for proc in self.table.live():
            if proc.host == host_id:
                info.pids.add(proc.pid)
                self.ipc.pump(proc.pid)

    def check_host(self, host_id: Any, secret: Any) -> HostInfo:
        info = self.hosts.get(host_id) if isinstance(host_id, str) else None
        if info is None or not isinstance(secret, str) or \
                not secrets.compare_digest(info.secret, secret):
            raise PermissionDenied(f"unknown host {host_id!r} or bad host secret")
        info.seen = time.monotonic()
        return info

    def reap_drivers(self, silent_s: float) -> None:
        """Driver scripts whose host has not called for ``silent_s`` are gone (exited or
        crashed without a word): their processes exit with reason "gone"."""
        now = time.monotonic()
        for proc in self.table.live():
            if not proc.attached:
                continue
            host = self.hosts.get(proc.host)
            if host is not None and host.polling:
                continue
            if now - (host.seen if host is not None else self.started) > silent_s:
                log.warning("driver process %d went silent; it exits", proc.pid)
                self.exited(proc.pid, {"reason": "gone"})
                if host is not None and not host.pids:
                    self.hosts.pop(host.host_id, None)
                    self.outboxes.drop(host.host_id)

    async def host_died(self, info: HostInfo) -> None:
        self.hosts.pop(info.host_id, None)
        self.outboxes.drop(info.host_id)
        for pid in info.pids:
            self.ipc.forget_deliveries(pid)
        if self.journal_dir is not None and info.handle is not None:
            self._orphans.add(journal.journal_path(self.journal_dir, info.host_id))
            await self._take_over_journals_soon(tries=20)
        for pid in sorted(info.pids):
            proc = self.table.procs.get(pid)
            if proc is not None and proc.alive:
                self.exited(pid, {"reason": "host_died", "error": {
                    "type": "HostDied", "message": f"host {info.host_id} died"}})
        if len(self.shared_host_ids()) < self.shared_hosts:
            await self._new_host()

    async def _take_over_journals_soon(self, tries: int) -> None:
        """Take over the orphaned journals, waiting a little for dead hosts' processes to let
        go of theirs (what is still locked after that waits for housekeeping)."""
        for _ in range(tries):
            if self.take_over_journals():
                return
            await asyncio.sleep(0.25)

    def take_over_journals(self) -> bool:
        """Move the messages of dead hosts' journals into the kernel's mailboxes; True when
        none is left (one still locked is retried on the next call)."""
        for path in sorted(self._orphans):
            try:
                envs = journal.take_over(path)
            except Unavailable as e:
                log.info("%s; will retry", e)
                continue
            if envs:
                log.warning("taking over %d unhandled messages from %s", len(envs), path.name)
            self.ipc.take_over(envs)
            journal.remove(path)
            self._orphans.discard(path)
        return not self._orphans

    def shared_host_ids(self) -> list[str]:
        return [h.host_id for h in self.hosts.values() if not h.isolated and h.handle is not None]

    def _place(self, proc: Process) -> HostInfo:
        """The host the process asked for while it lives, else the least loaded shared one."""
        if proc.placement in self.hosts:
            return self.hosts[proc.placement]
        hosts = [self.hosts[h] for h in self.shared_host_ids()]
        if proc.sandbox:  # where none can (any more), its host says why as its exit
            hosts = [h for h in hosts if h.sandbox] or hosts
        return min(hosts, key=lambda h: len(h.pids))

    async def _host_for(self, proc: Process) -> HostInfo:
        if proc.isolated:
            return await self._new_host(isolated=True, resources=proc.resources,
                                        node=proc.node)
        return self._place(proc)

    # -- spawn ----------------------------------------------------------------
    def validate_spawn(self, parent: Process | None, spec: Any,
                       program: wire.Program | None = None) -> dict:
        """Turn a spawn request into Process fields, refusing anything malformed or greedy;
        ``program``, when given, is what runs (a driver attaching itself), not ``spec``'s."""
        if not isinstance(spec, dict):
            raise InvalidArgument("spawn takes a dict of options")
        known = {"program", "args", "name", "priority", "quotas", "restart", "tools", "approval",
                 "trap_exits", "isolated", "resources", "host", "node", "sandbox", "scratch",
                 "net"}
        unknown = set(spec) - known
        if unknown:
            raise InvalidArgument(f"unknown spawn option(s): {', '.join(sorted(unknown))}")
        if program is None:
            try:
                program = wire.convert(spec.get("program"), wire.Program)
            except InvalidArgument:
                program = None
            if program is None or program.kind not in PROGRAM_KINDS:
                raise InvalidArgument("program must be a module reference ('pkg.mod:main'), a "
                                      ".py file, a function or a class")
        program = wire.to_builtins(program)
        args = spec.get("args") or {}
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise InvalidArgument("args must be a dict with string keys")
        name = spec.get("name")
        if name is not None:
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name.isdigit():
                raise InvalidArgument(f"name must be a non-numeric string of 1..{MAX_NAME} "
                                      "characters")
            if any(p.name == name and p.alive for p in self.table.procs.values()):
                raise AlreadyExists(f"a live process is already named {name!r}")
        ceiling = parent.priority if parent is not None else 100
        priority = spec.get("priority", parent.priority if parent is not None else 0)
        if not isinstance(priority, int) or isinstance(priority, bool) or \
                not -100 <= priority <= ceiling:
            raise InvalidArgument(f"priority must be an int in [-100, {ceiling}] (a child cannot "
                                  "outrank its parent)")
        quotas = _record(Quotas, spec.get("quotas"), "quotas").validate()
        if parent is not None:
            quotas = _cap_quotas(quotas, parent.quotas)
        restart = _record(RestartSpec, spec.get("restart"), "restart").validate()
        tools = spec.get("tools")
        if tools is not None and (not isinstance(tools, list)
                                  or not all(isinstance(t, str) for t in tools)):
            raise InvalidArgument("tools must be a list of tool names (or None for all)")
        if parent is not None and parent.tools is not None:
            tools = [t for t in (tools if tools is not None else parent.tools)
                     if t in parent.tools]
        net_hosts = net_allowlist.check_allowlist(spec.get("net"))
        if parent is not None and not parent.attached:  # a driver speaks for its user
            net_hosts = net_allowlist.narrow(net_hosts, parent.net)
        approval = spec.get("approval", "ask")
        if approval not in APPROVAL_POLICIES:
            raise InvalidArgument(f"approval must be one of {', '.join(APPROVAL_POLICIES)}")
        if approval == "auto" and parent is not None and parent.approval != "auto":
            raise PermissionDenied("only a process with approval='auto' can give it to a child")
        resources = spec.get("resources") or {}
        node = spec.get("node")
        nodes = cluster_nodes() if resources or node is not None else []
        placed, node = check_placement(resources, node, nodes)
        placement = spec.get("host")
        if placement is not None and placement not in self.shared_host_ids():
            raise InvalidArgument(f"host must name a shared agent host "
                                  f"({', '.join(self.shared_host_ids())}), got {placement!r}")
        sandbox = program.get("kind") != "attached" and self._sandboxed(parent, spec, placement)
        return {"program": program, "args": args, "name": name, "priority": priority,
                "quotas": quotas, "restart": restart, "tools": tools, "approval": approval,
                "trap_exits": bool(spec.get("trap_exits", False)),
                "isolated": bool(spec.get("isolated", False)) or placed,
                "resources": resources, "node": node, "placement": placement,
                "sandbox": sandbox, "scratch": sandbox and bool(spec.get("scratch", False)),
                "net": net_hosts,
                "parent": parent.pid if parent is not None else KERNEL_PID,
                "tenant": parent.tenant if parent is not None else secrets.token_hex(4)}

    def _sandboxed(self, parent: Process | None, spec: dict, placement: str | None) -> bool:
        """Whether a spawn runs sandboxed: when it asks, when the kernel sandboxes every
        process, and always under a sandboxed parent; refused where no host can."""
        for key in ("sandbox", "scratch"):
            if not isinstance(spec.get(key, False), bool):
                raise InvalidArgument(f"{key} must be True or False")
        sandbox = spec.get("sandbox", False) or self.sandbox or (
            parent is not None and parent.sandbox)
        if not sandbox:
            return False
        hosts = [placement] if placement is not None else self.shared_host_ids()
        if not any(self.hosts[h].sandbox for h in hosts):
            raise SandboxUnavailable("no agent host of this kernel can run a sandboxed process: "
                                     "it needs Landlock (Linux 5.13+) and libseccomp")
        return True

    async def spawn(self, parent: Process | None, spec: Any) -> Process:
        fields_ = self.validate_spawn(parent, spec)
        proc, capability = self.table.create(fields_)
        await self._launch(proc, capability)
        return proc

    async def _launch(self, proc: Process, capability: str) -> None:
        host = await self._host_for(proc)
        host.pids.add(proc.pid)
        proc.host, proc.status = host.host_id, "running"
        self.table.save(proc)
        self.outboxes.put(host.host_id, wire.Spawn(
            proc.pid, capability, proc.name, wire.convert(proc.program, wire.Program),
            proc.args, proc.quotas.mailbox, self.ipc.backlog(proc.pid), proc.sandbox,
            proc.scratch, proc.quotas.limits() if proc.sandbox else None))
        self.ipc.pump(proc.pid)

    def attach(self, name: str | None, priority: int, host_id: str,
               quotas: dict | None = None) -> tuple[Process, str]:
        """A driver script becomes a process (it runs its own code; nothing is spawned)."""
        fields_ = self.validate_spawn(None, {"name": name, "priority": priority,
                                             "quotas": quotas},
                                      wire.Program("attached", label=name or "driver"))
        proc, capability = self.table.create(fields_)
        proc.host, proc.status = host_id, "running"
        self.hosts[host_id].pids.add(proc.pid)
        self.table.save(proc)
        return proc, capability

    async def _recover(self) -> None:
        """After a kernel restart: every agent that was alive died with its host; drivers'
        processes live on in their scripts, which call again."""
        for proc in sorted(self.table.live(), key=lambda p: p.pid):
            if not proc.attached:
                self.exited(proc.pid, {"reason": "kernel_restart"})

    # -- signals --------------------------------------------------------------
    def may_signal(self, caller: Process | None, target: Process) -> bool:
        if caller is None or caller.pid in target.grants:
            return True
        ancestor = target.parent
        while ancestor != KERNEL_PID:
            if ancestor == caller.pid:
                return True
            parent = self.table.procs.get(ancestor)
            if parent is None:
                break
            ancestor = parent.parent
        return False

    def kill(self, caller: Process | None, pid: Any, signal: str = "term") -> None:
        target = self.table.get(pid)
        if signal not in ("term", "kill"):
            raise InvalidArgument("signal must be 'term' (graceful, then forced) or 'kill'")
        if not self.may_signal(caller, target):
            raise PermissionDenied(f"process {caller.pid if caller else 0} may not signal "
                                   f"process {target.pid}: only its ancestors, or processes it "
                                   "granted, can")
        if not target.alive:
            raise NoSuchProcess(f"process {target.pid} has already exited")
        self._stop(target, "stopping-killed", grace_s=5.0 if signal == "term" else 0.0)

    def _stop(self, proc: Process, status: str, grace_s: float = 5.0) -> None:
        """Ask its host to end a process; its exit report finishes the job."""
        proc.status = status
        if proc.host is not None and not proc.attached:
            self.outboxes.put(proc.host, wire.Kill(proc.pid, grace_s))
        else:
            self.exited(proc.pid, {"reason": KILLED})

    def grant(self, caller: Process, target_pid: Any, grantee: Any) -> None:
        target = self.table.get(target_pid)
        if not self.may_signal(caller, target) and caller.pid != target.pid:
            raise PermissionDenied(f"process {caller.pid} cannot grant signals to "
                                   f"process {target.pid}")
        grantee_proc = self.table.find(grantee)
        if grantee_proc.pid not in target.grants:
            target.grants.append(grantee_proc.pid)
            self.table.save(target)

    def link(self, caller: Process, other: Any, on: bool = True) -> None:
        peer = self.table.find(other)
        for a, b in ((caller, peer), (peer, caller)):
            if on and b.pid not in a.links:
                a.links.append(b.pid)
            elif not on and b.pid in a.links:
                a.links.remove(b.pid)
        self.table.save_many([caller, peer])
        if on and not peer.alive:
            self.exited_notice(caller, peer)

    def monitor(self, caller: Process, other: Any, on: bool = True) -> None:
        peer = self.table.find(other)
        if on and caller.pid not in peer.monitors:
            peer.monitors.append(caller.pid)
        elif not on and caller.pid in peer.monitors:
            peer.monitors.remove(caller.pid)
        self.table.save(peer)
        if on and not peer.alive:
            self.exited_notice(caller, peer)

    def exited_notice(self, watcher: Process, peer: Process) -> None:
        reason = (peer.exit or {}).get("reason", "noproc")
        self._notify(watcher.pid, "ProcessDown", {"pid": peer.pid, "reason": reason})

    def _notify(self, to: int, kind: str, fields_: dict) -> None:
        receiver = self.table.procs.get(to)
        if receiver is not None and receiver.alive:
            env = notice(kind, fields_, to)
            self.ipc.batch.sends.append(env)

    # -- exits ----------------------------------------------------------------
    def exited(self, pid: int, report: dict) -> None:
        """A process ended (its host said so, or its host died): supervise."""
        proc = self.table.procs.get(pid)
        if proc is None:
            return
        host = self.hosts.get(proc.host) if proc.host else None
        if host is not None:
            host.pids.discard(pid)
        self.ipc.forget_deliveries(pid)
        intent = proc.status
        reason = _STOP_REASONS.get(intent, report.get("reason", "error"))
        proc.exit = {**report, "reason": reason, "at": time.time()}
        if intent == "restarting":  # stopped by its supervisor to be started again
            for child in self.table.children(proc.pid):
                if child.alive:
                    self._stop(child, "stopping")
            proc.status = "starting"
            asyncio.get_running_loop().create_task(self.restart(proc))
            return
        plan = plan_exit(self.table, proc, reason, time.time(), self.kernel_spec)
        proc.status = "exited"
        for to, kind, fields_ in plan.notices:
            self._notify(to, kind, fields_)
        for other in plan.kill_linked:
            target = self.table.procs.get(other)
            if target is not None and target.alive:
                self._stop(target, "stopping-linked", grace_s=0.0)
        for child in plan.terminate:
            target = self.table.procs.get(child)
            if target is not None and target.alive:
                self._stop(target, "restarting" if child in plan.restart else "stopping")
        for again in plan.restart:
            target = self.table.procs[again]
            if not target.alive:
                target.status = "starting"
                asyncio.get_running_loop().create_task(self.restart(target))
        if plan.escalate is not None:
            supervisor = self.table.procs.get(plan.escalate)
            if supervisor is not None and supervisor.alive:
                log.warning("process %d exceeded its restart intensity; escalating",
                            plan.escalate)
                if not supervisor.attached:
                    self._stop(supervisor, "stopping-escalated")
        if proc.status == "exited" and pid not in plan.restart:
            self._finalize(proc)
        self.table.save(proc)

    def _finalize(self, proc: Process) -> None:
        self.ipc.bury(proc.pid, f"process {proc.pid} exited ({proc.exit.get('reason')})")
        for future in self.waiters.pop(proc.pid, []):
            if not future.done():
                future.set_result(proc.exit)
        self.on_final_exit(proc)

    async def restart(self, proc: Process) -> None:
        if proc.status != "starting":  # told to stop while waiting to start again
            self.exited(proc.pid, {"reason": KILLED})
            return
        proc.restarts.append(time.time())
        proc.child_restarts = []  # a restarted supervisor starts with a fresh history, as in OTP
        proc.exit = None
        capability = self.table.reissue(proc)
        await self._launch(proc, capability)

    async def wait(self, caller: Process | None, pid: Any, timeout: Any) -> dict:
        target = self.table.get(pid)
        if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
            raise InvalidArgument("timeout must be a number of seconds >= 0, or None")
        if not target.alive:
            return target.exit or {"reason": "unknown"}
        future = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(target.pid, []).append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise Timeout(f"process {target.pid} is still running after {timeout} s") from None

    def ps(self, include_exited: bool = True) -> list[dict]:
        """Every process's summary, with ``mailbox``: its messages the kernel holds that
        its handlers have not finished (delivered or waiting)."""
        pending = self.ipc.store.receivers_with_pending()
        return [{**p.summary(), "mailbox": pending.get(p.pid, 0)}
                for p in sorted(self.table.procs.values(), key=lambda p: p.pid)
                if include_exited or p.alive]


_STOP_REASONS = {"stopping-killed": KILLED, "stopping": SHUTDOWN, "restarting": SHUTDOWN,
                 "stopping-linked": "linked", "stopping-escalated": "escalated"}


def _record(cls, value: Any, what: str):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a dict")
    try:
        return cls(**value)
    except TypeError as e:
        raise InvalidArgument(f"bad {what}: {e}") from None


def _cap_quotas(child: Quotas, parent: Quotas) -> Quotas:
    """A child gets at most what its parent has."""
    def cap(mine, theirs):
        if theirs is None:
            return mine
        return theirs if mine is None else min(mine, theirs)

    return Quotas(tokens=cap(child.tokens, parent.tokens),
                  kv_bytes=cap(child.kv_bytes, parent.kv_bytes),
                  fs_bytes=min(child.fs_bytes, parent.fs_bytes),
                  mailbox=child.mailbox, memory_items=min(child.memory_items, parent.memory_items),
                  memory_bytes=cap(child.memory_bytes, parent.memory_bytes),
                  cpu_s=cap(child.cpu_s, parent.cpu_s),
                  open_files=min(child.open_files, parent.open_files),
                  file_bytes=min(child.file_bytes, parent.file_bytes))

