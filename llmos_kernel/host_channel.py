"""The host channel, kernel side: how agent hosts and the kernel talk.

A host makes two kinds of calls (see actors.agent_host for the other side):

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

This is a plain object the kernel actor owns: Ray wraps every method of an
actor class (for tracing), which would tax each message several times over.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos_kernel import syscall_table
from llmos_kernel.errors import InvalidArgument, LlmosError, PermissionDenied, Unavailable
from llmos_kernel.processes import HostInfo
from llmos_kernel.proctable import Process

if TYPE_CHECKING:
    from llmos_kernel.kernel import Kernel

log = logging.getLogger("llmos.kernel")

MAX_LOG_BYTES = 8 << 20  # per process; later output is dropped with a note
BATCH_ORDER_WAIT_S = 10.0  # how long a host's batch waits for the one numbered before it
POLL_MAX_S = 60.0
_STAGING = ("ipc.send", "ipc.publish", "ipc.ack", "ipc.adopt")  # effects the commit persists
_HOST_CALLS = ("tools.result", "ipc.adopt")  # a host's own calls, never a program's


def internal_error(where: str, e: Exception) -> dict:
    """A bug, reported to the caller as data (it is logged with its traceback)."""
    return {"type": "LlmosError", "message": f"internal error in {where}: {type(e).__name__}: {e}"}


class HostChannel:
    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.epoch = secrets.token_hex(8)
        self.stats = {"batches": 0, "ops": 0, "chunks": 0, "items": 0}
        self._order: dict[str, _BatchOrder] = {}
        self._handed_out: dict[str, int] = {}  # host id -> items sent to it so far
        self._log_bytes: dict[int, int] = {}

    async def batch(self, host_id: str, epoch: str, seq: int, ops: Any, exits: Any, logs: Any,
                    secret: str) -> dict:
        try:
            host = self._host(host_id, secret)
        except LlmosError as e:
            return {"error": e.to_wire()}
        order = self._order.setdefault(host_id, _BatchOrder())
        if epoch != self.epoch or not await order.turn(seq):
            order.reset()
            return {"ok": {"resync": self.epoch}}
        try:
            results = self._run(host, ops, exits, logs)
        finally:
            order.done()
        self.stats["batches"] += 1
        self.stats["ops"] += len(ops) if isinstance(ops, list) else 0
        return {"ok": {"results": results, "out": await self._chunk(host_id, 0.0)}}

    async def poll(self, host_id: str, timeout: Any, secret: str) -> dict:
        try:
            host = self._host(host_id, secret)
            wait = min(max(float(timeout), 0.0), POLL_MAX_S)
        except (LlmosError, TypeError, ValueError) as e:
            error = e if isinstance(e, LlmosError) else InvalidArgument(f"bad timeout: {e}")
            return {"error": error.to_wire()}
        host.polling += 1
        try:
            return {"ok": await self._chunk(host_id, wait)}
        finally:
            host.polling -= 1
            host.seen = time.monotonic()

    def log_path(self, pid: int) -> Path:
        return self.kernel.state_dir / "logs" / f"{pid}.log"

    def _host(self, host_id: Any, secret: Any) -> HostInfo:
        procs = self.kernel.procs
        if isinstance(secret, str) and hmac.compare_digest(secret, self.kernel.root_token):
            procs.register_driver_host(host_id, secret)
        return procs.check_host(host_id, secret)

    def _run(self, host: HostInfo, ops: Any, exits: Any, logs: Any) -> dict[str, dict]:
        """Serve each call in order, then commit what they staged in one transaction."""
        self._write_logs(host.host_id, logs)
        results: dict[str, dict] = {}
        staged: list[str] = []
        for op in ops if isinstance(ops, list) else []:
            call_id = op[0] if isinstance(op, list) and op else None
            if not isinstance(call_id, str):
                continue
            result = self._op(host.host_id, op)
            if call_id:  # "" marks a call nobody waits for (a plain ack)
                results[call_id] = result
                if len(op) > 2 and op[2] in _STAGING:
                    staged.append(call_id)
        for report in exits if isinstance(exits, list) else []:
            self._exit_report(host, report)
        try:
            self.kernel.ipc.commit()
        except Exception as e:
            log.exception("mailbox commit failed")
            for call_id in staged:
                results[call_id] = {"error": Unavailable(f"could not persist: {e}").to_wire()}
        return results

    def _op(self, host_id: str, op: list) -> dict:
        try:
            if len(op) != 5:
                raise InvalidArgument("a syscall is [call id, capability, name, args, handling]")
            call_id, capability, name, args, handling = op
            if name in _HOST_CALLS:  # the host's own calls, never an agent's
                if capability != "":
                    raise PermissionDenied(f"{name} is for agent hosts, not programs")
                if name == "tools.result":
                    return self.kernel._tool_result(host_id, args)
                return {"ok": self.kernel.ipc.adopt(host_id, args.get("envelopes")
                                                    if isinstance(args, dict) else None)}
            proc = self._caller(host_id, capability)
            args = syscall_table.check_args(name, args)
            spec = syscall_table.TABLE[name]
            if handling is not None and not isinstance(handling, str):
                raise InvalidArgument("handling must be a message id or None")
            if spec.slow:
                asyncio.get_running_loop().create_task(
                    self._slow(host_id, call_id, spec.fn(self.kernel, proc, args, handling)))
                return {"pending": True}
            return {"ok": spec.fn(self.kernel, proc, args, handling)}
        except LlmosError as e:
            return {"error": e.to_wire()}
        except Exception as e:
            log.exception("syscall %r failed", op[2] if len(op) > 2 else op)
            return {"error": internal_error("syscall", e)}

    def _caller(self, host_id: str, capability: Any) -> Process:
        proc = self.kernel.table.by_capability(capability)
        if proc is None or not proc.alive:
            raise PermissionDenied("this capability is not valid (its process exited or was "
                                   "restarted with a new one)")
        if proc.host != host_id:
            raise PermissionDenied(f"process {proc.pid} does not run on host {host_id}")
        return proc

    async def _slow(self, host_id: str, call_id: str, coro) -> None:
        try:
            reply = {"ok": await coro}
        except LlmosError as e:
            reply = {"error": e.to_wire()}
        except Exception as e:
            log.exception("slow syscall failed")
            reply = {"error": internal_error("syscall", e)}
        self.kernel.ipc.commit()
        self.kernel.outboxes.put(host_id, {"kind": "reply", "call": call_id, "reply": reply})

    def _exit_report(self, host: HostInfo, report: Any) -> None:
        if not isinstance(report, dict) or not isinstance(report.get("pid"), int):
            return
        proc = self.kernel.table.procs.get(report["pid"])
        if proc is None or proc.host != host.host_id:
            return  # a host may only report its own agents
        if report.get("reason") == "error":
            self.kernel.ipc.commit()  # what the host handed over with this report, first
            error = report.get("error") if isinstance(report.get("error"), dict) else {}
            self.kernel.ipc.reject(proc.pid, report.get("handling"),
                                   f"the handler of process {proc.pid} raised "
                                   f"{error.get('type')}: {error.get('message')}")
        self.kernel.procs.exited(proc.pid,
                                 {k: report.get(k) for k in ("reason", "result", "error")})

    async def _chunk(self, host_id: str, timeout: float) -> list:
        """``[epoch, start, items]``: the host's next items, numbered so that a host applies
        the chunks it gets from its two channels in order, whichever answers first."""
        outboxes = self.kernel.outboxes
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
        return [self.epoch, start, items]

    def _write_logs(self, host_id: str, logs: Any) -> None:
        if not isinstance(logs, dict):
            return
        for pid, text in logs.items():
            proc = self.kernel.table.procs.get(pid) if isinstance(pid, int) else None
            if proc is None or proc.host != host_id or not isinstance(text, str):
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

    async def turn(self, seq: Any) -> bool:
        """Wait until batch ``seq`` may run; False if it never may (its predecessor is lost)."""
        if seq == self.next:
            return True
        if not isinstance(seq, int) or seq < self.next or seq in self.waiting:
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
