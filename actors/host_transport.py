"""A host's two channels to the kernel: numbered batches of calls out, chunks of items in.

- ``host_batch``: every syscall the host's agents made since the last batch (sends,
  acks, LLM requests, file operations...), answered per call; calls that take long (an
  LLM generation, a wait) are answered later by a ``Reply`` item. Two numbered batches
  may be in flight; the kernel runs them in order.
- ``host_poll``: a long-poll for whatever the kernel has for this host.

What the kernel has for a host comes back on whichever channel answers first, in
numbered chunks applied in order. If the kernel dies mid-batch, the host of a driver
script (which outlives it) sends the batch's idempotent calls (sends and acks, which
carry their message ids) again once the kernel is back, in their order, and fails the
others with Unavailable. Everything crossing is a declared ``llmos_kernel.wire`` struct,
encoded once per batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument, LlmosError, Unavailable

if TYPE_CHECKING:
    from actors.runtime import AgentRuntime

log = logging.getLogger("llmos.host")

POLL_TIMEOUT_S = 5.0
KERNEL_RESTART_WAIT_S = 60.0  # how long a driver's host retries a kernel that went away
RETRY_DELAY_S = 0.5
BATCHES_IN_FLIGHT = 2
EXPECT_HOLD_S = 0.001  # longest a batch waits for a call expected to come (see expect)
RETRYABLE = frozenset({"ipc.send", "ipc.publish", "ipc.ack", "ipc.subscribe", "ipc.unsubscribe",
                       "ipc.adopt"})


@dataclass
class _Batch:
    """One host_batch call's cargo: syscalls, exit reports, output by pid."""

    ops: list[wire.Syscall]
    exits: list[wire.ExitReport]
    logs: dict[int, str]
    error: Exception | None = None  # why it failed in flight (None: refused, not run)


class KernelLink:
    """``kernel``: its actor handle (``host_batch`` / ``host_poll``); ``lost``: the exception
    types that mean the kernel could not be reached (Ray's, from the host that makes the
    link), as opposed to a refusal."""

    def __init__(self, kernel: Any, host_id: str, token: str | None,
                 dispatch: Callable[[wire.Item], None], before_flush: Callable[[], None],
                 lost: tuple[type[BaseException], ...] = (ConnectionError,)):
        self.kernel, self.host_id, self.token, self.lost = kernel, host_id, token, lost
        self.dispatch, self.before_flush = dispatch, before_flush
        self.ops: list[wire.Syscall] = []
        self.futures: dict[str, asyncio.Future] = {}
        self.exits: list[wire.ExitReport] = []
        self.logging: set[AgentRuntime] = set()  # agents with output to send
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._inbound: tuple[str, int] = ("", 0)  # kernel epoch, next chunk start expected
        self._early: dict[int, list] = {}  # chunks that arrived before their predecessors
        self._epoch = ""  # the kernel instance our batches are numbered for
        self._seq = 0  # the next batch's number
        self._in_flight: set[int] = set()
        self._setback: dict[int, _Batch] = {}  # batches to send again, by number
        self._unsent_logs: dict[int, str] = {}  # output of batches that must go again
        self._down_since: float | None = None
        self._expected: dict[Any, float] = {}  # who is expected to call soon, since when
        self._hold_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._flush_loop()),
                           loop.create_task(self._poll_loop())]

    def stop(self) -> list[asyncio.Task]:
        """Cancel both loops; returns their tasks, for a caller that can wait for them."""
        for task in self._tasks:
            task.cancel()
        return self._tasks

    def wake(self) -> None:
        self._wake.set()

    def expect(self, who: Any, soon: bool) -> None:
        """``who`` (a sandboxed process's child, just answered or handed a message) is
        expected to make its next call (or acknowledgement) soon, or no longer is. A batch
        waits for expected calls, at most EXPECT_HOLD_S: agents in this process resume
        together and their calls leave in one batch, but children woken together call back
        a little apart, and without the wait each would take a batch (a Ray call) of its
        own."""
        if soon:
            self._expected.setdefault(who, time.monotonic())
        elif self._expected.pop(who, None) is not None and not self._expected:
            self._wake.set()

    # -- calls --------------------------------------------------------------------
    def call(self, capability: str, name: str, args: dict,
             handling: str | None = None) -> asyncio.Future:
        """Queue one call; its ``wire.Result`` arrives on the returned future. Raises
        InvalidArgument at once for arguments that cannot cross."""
        call = f"{self.host_id}:{next(self._ids)}"
        op = wire.Syscall(call, capability, name, wire.encode_args(args), handling)
        future = asyncio.get_running_loop().create_future()
        self.futures[call] = future
        self.ops.append(op)
        self._wake.set()
        return future

    def cast(self, capability: str, name: str, args: dict) -> None:
        """Queue a call nobody waits for (a plain acknowledgement)."""
        self.ops.append(wire.Syscall("", capability, name, wire.encode_args(args), None))
        self._wake.set()

    def report_exit(self, report: wire.ExitReport) -> None:
        """Queue an exit report; one whose result or error text cannot be encoded (a lone
        surrogate) is sent with that text made safe, so it can never be lost."""
        try:
            wire.encode(report)
        except (TypeError, ValueError, OverflowError):
            result = report.result if isinstance(report.result, str) else repr(report.result)
            report = wire.ExitReport(report.pid, report.reason, result=_safe(result),
                                     error=None if report.error is None else
                                     {k: _safe(str(v)) for k, v in report.error.items()},
                                     handling=report.handling, unanswered=report.unanswered)
        self.exits.append(report)
        self._wake.set()

    def resolve(self, call: str, result: wire.Result) -> None:
        future = self.futures.pop(call, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _fail(self, ops: list[wire.Syscall], error: LlmosError) -> None:
        result = wire.failure(error)
        for op in ops:
            self.resolve(op.call, result)

    # -- out ------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        """Send what agents asked for, up to BATCHES_IN_FLIGHT numbered batches at a time (the
        kernel runs a host's batches in their order), so the kernel works on one batch while
        this host works on the answers to the one before."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(0)  # calls made in the tick that woke us join this batch
            self._wake.clear()
            self.before_flush()
            if self._setback or len(self._in_flight) >= BATCHES_IN_FLIGHT or not (
                    self.ops or self.exits or self.logging or self._unsent_logs):
                continue
            if self._hold():
                continue
            batch = _Batch(self.ops, self.exits, self._unsent_logs)
            self.ops, self.exits, self._unsent_logs = [], [], {}
            for agent in self.logging:
                batch.logs[agent.pid] = batch.logs.get(agent.pid, "") + \
                    _safe("".join(agent.log_buffer))
                agent.log_buffer.clear()
            self.logging.clear()
            seq, self._seq = self._seq, self._seq + 1
            self._in_flight.add(seq)
            asyncio.get_running_loop().create_task(self._send(seq, batch))

    def _hold(self) -> bool:
        """Whether to wait a little longer for expected calls (and wake when it is over)."""
        if not self._expected:
            return False
        now = time.monotonic()
        for who, since in list(self._expected.items()):
            if now - since >= EXPECT_HOLD_S:
                del self._expected[who]
        if not self._expected:
            return False
        if self._hold_timer is None or self._hold_timer.cancelled() or \
                self._hold_timer.when() <= asyncio.get_running_loop().time():
            self._hold_timer = asyncio.get_running_loop().call_later(
                EXPECT_HOLD_S - (now - min(self._expected.values())), self._wake.set)
        return True

    async def _send(self, seq: int, batch: _Batch) -> None:
        try:
            data = wire.encode(wire.HostBatch(self._epoch, seq, batch.ops, batch.exits,
                                              batch.logs))  # a Syscall encodes as its Raw
            reply = wire.decode_answer(await self.kernel.host_batch.remote(
                self.host_id, data, self.token))
        except self.lost as e:
            batch.error = e
            self._setback[seq] = batch
        except Exception as e:
            log.exception("host %s could not send a batch", self.host_id)
            self._fail(batch.ops, InvalidArgument(f"cannot send these calls: {e}"))
            self.exits[:0] = batch.exits
        else:
            if reply.error is not None:
                self._fail(batch.ops, reply.error.exception())
            elif reply.resync is not None:  # a new kernel, or a batch went missing: renumber
                self._epoch = reply.resync
                self._setback[seq] = batch
            else:
                self._down_since = None
                self._receive(reply.out)
                for call, raw in reply.results.items():
                    result = wire.decode_result(raw)
                    if not result.pending:  # else its Reply item comes later
                        self.resolve(call, result)
        finally:
            self._in_flight.discard(seq)
            if self._setback and not self._in_flight:
                await self._send_again()
            self._wake.set()

    async def _send_again(self) -> None:
        """Queue what batches that failed or were refused carried, in their order, ahead of
        anything newer; a batch lost with the kernel keeps only its idempotent calls."""
        batches = [self._setback[seq] for seq in sorted(self._setback)]
        errors = [b.error for b in batches if b.error is not None]
        again: list[wire.Syscall] = []
        self.exits[:0] = [report for b in batches for report in b.exits]
        for b in reversed(batches):
            for pid, text in b.logs.items():
                self._unsent_logs[pid] = text + self._unsent_logs.get(pid, "")
        for b in batches:
            if b.error is None:
                again += b.ops
                continue
            again += [op for op in b.ops if op.name in RETRYABLE]
            self._fail([op for op in b.ops if op.name not in RETRYABLE], Unavailable(
                f"the kernel went away during this call (it may or may not have happened): "
                f"{b.error}"))
        if errors:
            now = time.monotonic()
            self._down_since = self._down_since or now
            if now - self._down_since > KERNEL_RESTART_WAIT_S:
                self._fail(again, Unavailable(f"kernel unreachable for "
                                              f"{KERNEL_RESTART_WAIT_S:.0f} s: {errors[-1]}"))
                again = []
            await asyncio.sleep(RETRY_DELAY_S)
        self.ops[:0] = again
        self._epoch, self._seq = ("" if errors else self._epoch), 0
        self._setback.clear()

    # -- in -------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            try:
                reply = wire.decode_answer(await self.kernel.host_poll.remote(
                    self.host_id, POLL_TIMEOUT_S, self.token))
            except self.lost as e:
                log.warning("host %s lost the kernel: %s", self.host_id, e)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            except InvalidArgument:  # a bug on one side: say so, keep polling
                log.exception("host %s got an answer it cannot read", self.host_id)
                continue
            if reply.error is not None:
                log.error("host %s poll refused: %s", self.host_id, reply.error.message)
                await asyncio.sleep(1.0)
                continue
            self._receive(reply.out)

    def _receive(self, chunk: wire.Chunk | None) -> None:
        """Apply a numbered chunk of kernel items, in order across both channels."""
        if chunk is None:
            return
        if chunk.epoch != self._inbound[0]:  # a new kernel (restarted): it numbers from zero
            self._inbound, self._early = (chunk.epoch, 0), {}
        if not chunk.items:
            return
        self._early[chunk.start] = chunk.items
        while self._inbound[1] in self._early:
            items = self._early.pop(self._inbound[1])
            self._inbound = (chunk.epoch, self._inbound[1] + len(items))
            for item in items:
                try:
                    self.dispatch(item)
                except Exception:
                    log.exception("host %s could not handle %s", self.host_id,
                                  type(item).__name__)


def _safe(text: str) -> str:
    """Text msgpack can carry: a lone surrogate (an undecodable file name, say) becomes
    the replacement character instead of spoiling the batch it travels in."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # bytes a file name carried (surrogateescape): each becomes U+FFFD
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
