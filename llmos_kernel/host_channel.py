"""The host channel, kernel side: how agent hosts and the kernel talk.

A host makes two kinds of calls (actors.host_transport is the other side; every
message is a declared ``llmos_kernel.wire`` struct):

- ``batch``: the syscalls its agents made since its previous batch, plus exit
  reports and output, answered per call. A host may have two batches in flight;
  they are numbered per kernel instance (``epoch``) and run in their order. A
  batch numbered for another kernel (the one before a restart), or whose
  predecessor never comes, is refused with ``resync`` without running anything.
- ``poll``: a long-poll for whatever the kernel has for the host.

What the kernel has for a host (orders, delivered messages, tokens, late
results) leaves in numbered chunks on whichever call answers first, so the host
applies them in order. Who calls is settled per call: a host by its secret (a
driver script's host by the root token), an agent by the capability it was
issued, checked against the host it runs on.

This is a plain object the kernel actor owns and hands its ``Services`` (never the
actor itself): Ray wraps every method of an actor class (for tracing), which would tax
each message several times over.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos_kernel import syscall_table, wire
from llmos_kernel.errors import InvalidArgument, LlmosError, PermissionDenied, Unavailable
from llmos_kernel.proctable import Process
from llmos_kernel.services.registry import Services

if TYPE_CHECKING:
    from llmos_kernel.processes import HostInfo

log = logging.getLogger("llmos.kernel")

MAX_LOG_BYTES = 8 << 20  # per process; later output is dropped with a note
BATCH_ORDER_WAIT_S = 10.0  # how long a host's batch waits for the one numbered before it
POLL_MAX_S = 60.0
_STAGING = frozenset({"ipc.send", "ipc.publish", "ipc.ack", "ipc.adopt"})  # the commit persists
_HOST_CALLS = frozenset({"tools.result", "ipc.adopt"})  # a host's own calls, never a program's


class HostChannel:
    def __init__(self, services: Services, root_token: str):
        self.services = services
        self.root_token = root_token
        self.epoch = secrets.token_hex(8)
        self.stats = {"batches": 0, "ops": 0, "chunks": 0, "items": 0}
        self._order: dict[str, _BatchOrder] = {}
        self._handed_out: dict[str, int] = {}  # host id -> items sent to it so far
        self._log_bytes: dict[int, int] = {}

    async def batch(self, host_id: str, data: Any, secret: str) -> bytes:
        """Serve an encoded ``wire.HostBatch``; returns an encoded ``wire.Answer``."""
        try:
            host = self._host(host_id, secret)
            batch = wire.decode_batch(data)
        except LlmosError as e:
            return wire.encode(wire.Answer(error=wire.failure(e).error))
        order = self._order.setdefault(host_id, _BatchOrder())
        if batch.epoch != self.epoch or not await order.turn(batch.seq):
            order.reset()
            return wire.encode(wire.Answer(resync=self.epoch))
        try:
            results = self._run(host, batch)
        finally:
            order.done()
        self.stats["batches"] += 1
        self.stats["ops"] += len(batch.ops)
        return wire.encode(wire.Answer(results, await self._chunk(host_id, 0.0)))

    async def poll(self, host_id: str, timeout: Any, secret: str) -> bytes:
        """Wait up to ``timeout`` s for items for this host; an encoded ``wire.Answer``."""
        try:
            host = self._host(host_id, secret)
            wait = min(max(float(timeout), 0.0), POLL_MAX_S)
        except (LlmosError, TypeError, ValueError) as e:
            error = e if isinstance(e, LlmosError) else InvalidArgument(f"bad timeout: {e}")
            return wire.encode(wire.Answer(error=wire.failure(error).error))
        host.polling += 1
        try:
            return wire.encode(wire.Answer(out=await self._chunk(host_id, wait)))
        finally:
            host.polling -= 1
            host.seen = time.monotonic()

    def log_path(self, pid: int) -> Path:
        return self.services.log_dir / f"{pid}.log"

    def _host(self, host_id: Any, secret: Any) -> HostInfo:
        procs = self.services.procs
        if isinstance(secret, str) and hmac.compare_digest(secret, self.root_token):
            procs.register_driver_host(host_id, secret)
        return procs.check_host(host_id, secret)

    def _run(self, host: HostInfo, batch: wire.HostBatch) -> dict[str, Any]:
        """Serve each call in order, then commit what they staged in one transaction."""
        self._write_logs(host.host_id, batch.logs)
        results: dict[str, wire.Result] = {}
        staged: list[str] = []
        for raw in batch.ops:
            try:
                op = wire.decode_syscall(raw)
            except InvalidArgument as e:
                call = wire.call_id_of(raw)
                if call:
                    results[call] = wire.failure(e)
                continue
            result = self._op(host.host_id, op)
            if op.call:  # "" marks a call nobody waits for (a plain ack)
                results[op.call] = result
                if op.name in _STAGING:
                    staged.append(op.call)
        for report in batch.exits:
            self._exit_report(host, report)
        try:
            self.services.ipc.commit()
        except Exception as e:
            log.exception("mailbox commit failed")
            for call in staged:
                results[call] = wire.failure(Unavailable(f"could not persist: {e}"))
        return {call: wire.encode_result(r) for call, r in results.items()}

    def _op(self, host_id: str, op: wire.Syscall) -> wire.Result:
        try:
            args = wire.decode_args(op.args)
            if op.name in _HOST_CALLS:  # the host's own calls, never an agent's
                if op.capability != "":
                    raise PermissionDenied(f"{op.name} is for agent hosts, not programs")
                if op.name == "tools.result":
                    return wire.ok(self.services.agent_tools.result(host_id, args))
                return wire.ok(self.services.ipc.adopt(host_id, args.get("envelopes")))
            proc = self._caller(host_id, op.capability)
            args = syscall_table.check_args(op.name, args)
            spec = syscall_table.TABLE[op.name]
            if spec.slow:
                asyncio.get_running_loop().create_task(
                    self._slow(host_id, op.call, spec.fn(self.services, proc, args, op.handling)))
                return wire.PENDING
            return wire.ok(spec.fn(self.services, proc, args, op.handling))
        except LlmosError as e:
            return wire.failure(e)
        except Exception as e:
            log.exception("syscall %r failed", op.name)
            return wire.internal_error("syscall", e)

    def _caller(self, host_id: str, capability: str) -> Process:
        proc = self.services.table.by_capability(capability)
        if proc is None or not proc.alive:
            raise PermissionDenied("this capability is not valid (its process exited or was "
                                   "restarted with a new one)")
        if proc.host != host_id:
            raise PermissionDenied(f"process {proc.pid} does not run on host {host_id}")
        return proc

    async def _slow(self, host_id: str, call: str, coro) -> None:
        try:
            result = wire.ok(await coro)
        except LlmosError as e:
            result = wire.failure(e)
        except Exception as e:
            log.exception("slow syscall failed")
            result = wire.internal_error("syscall", e)
        self.services.ipc.commit()
        if call:
            self.services.outboxes.put(host_id, wire.Reply(call, wire.encode_result(result)))

    def _exit_report(self, host: HostInfo, report: wire.ExitReport) -> None:
        proc = self.services.table.procs.get(report.pid)
        if proc is None or proc.host != host.host_id:
            return  # a host may only report its own agents
        if report.reason == "error":
            self.services.ipc.commit()  # what the host handed over with this report, first
            error = report.error or {}
            self.services.ipc.reject(proc.pid, report.handling,
                                     f"the handler of process {proc.pid} raised "
                                     f"{error.get('type')}: {error.get('message')}")
        if report.unanswered:
            self.services.ipc.unanswered(proc.pid, report.unanswered,
                                         f"process {proc.pid} ended ({report.reason}) without "
                                         "answering this call")
        self.services.procs.exited(proc.pid, {"reason": report.reason, "result": report.result,
                                              "error": report.error})

    async def _chunk(self, host_id: str, timeout: float) -> wire.Chunk:
        """The host's next items, numbered so that a host applies the chunks it gets from
        its two channels in order, whichever answers first."""
        outboxes = self.services.outboxes
        deadline = time.monotonic() + timeout
        items: list = []
        while outboxes.items.get(host_id) or timeout > 0:
            items = await outboxes.take(host_id, max(deadline - time.monotonic(), 0.0))
            if items or time.monotonic() >= deadline:
                break  # else woken by items another channel took first: keep waiting
        start = self._handed_out.get(host_id, 0)
        self._handed_out[host_id] = start + len(items)
        self.stats["chunks"] += 1
        self.stats["items"] += len(items)
        return wire.Chunk(self.epoch, start, items)

    def _write_logs(self, host_id: str, logs: dict[int, str]) -> None:
        for pid, text in logs.items():
            proc = self.services.table.procs.get(pid)
            if proc is None or proc.host != host_id:
                continue
            used = self._log_bytes.get(pid) or _size(self.log_path(pid))
            if used >= MAX_LOG_BYTES:
                continue
            data = text.encode("utf-8", errors="replace")[:MAX_LOG_BYTES - used]
            if used + len(data) >= MAX_LOG_BYTES:
                data += b"\n[llmos: log limit reached; further output dropped]\n"
            with open(self.log_path(pid), "ab") as f:
                f.write(data)
            self._log_bytes[pid] = used + len(data)


class _BatchOrder:
    """Runs one host's batches in the order of their numbers."""

    def __init__(self) -> None:
        self.next = 0
        self.waiting: dict[int, asyncio.Future] = {}

    async def turn(self, seq: int) -> bool:
        """Wait until batch ``seq`` may run; False if it never may (its predecessor is lost)."""
        if seq == self.next:
            return True
        if seq < self.next or seq in self.waiting:
            return False
        future = self.waiting[seq] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(future, BATCH_ORDER_WAIT_S)
        except TimeoutError:
            return False

    def done(self) -> None:
        self.next += 1
        future = self.waiting.pop(self.next, None)
        if future is not None and not future.done():
            future.set_result(True)

    def reset(self) -> None:
        """The host numbers its batches from zero again; those still waiting are refused."""
        self.next = 0
        for future in self.waiting.values():
            if not future.done():
                future.set_result(False)
        self.waiting.clear()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
