"""One agent program in a sandboxed child process: launch, limits, relay, exit report.

A ``Sandbox`` is the host's side of one sandboxed process. ``start`` runs
``actors.sandbox_child`` with one end of a socketpair and relays between that socket and
a ``SandboxHost`` (at integration, the agent host: its kernel link, with the process's
capability added; the child never holds it). ``push`` hands the child what the kernel
sends the process; ``kill`` stops it; ``wait`` says how it ended, as one
``wire.ExitReport``. What ``actors.sandbox_policy`` confines, and why, is said there;
what this side guarantees:

- a fresh interpreter (``subprocess`` with ``pass_fds``, ``close_fds``; ``launch``), or a
  fork of one (``actors.sandbox_zygote``, started the same way), never a fork of the
  host: it inherits no memory (no capability, no Ray connection), no descriptor but the
  socket, /dev/null and a stderr pipe; ``python -I -B`` ignores ``PYTHON*`` variables
  and the user's site dir; its environment is ``LC_ALL``, ``HOME``, ``TMPDIR`` and one
  BLAS thread, nothing of the host's (no ``RAY_*``, no secrets);
- its cwd and ``HOME`` are a fresh 0700 directory, writable only with ``scratch=True`` and
  removed when it exits; it runs in its own session, and dies with its host (a fork dies
  with its zygote, which dies with the host);
- nothing it sends can crash the host: each frame is decoded against the declared
  messages (``actors.sandbox_protocol``); a frame too long, malformed or out of protocol
  (a second Ready, a result for a tool call it was never given) kills the child and is
  reported as its crash; calls beyond ``MAX_CALLS`` in flight are answered QuotaExceeded;
  a child that leaves ``MAX_UNREAD`` bytes unread is killed;
- it always ends in one ``ExitReport``: the program's own (normal, error, killed), or,
  when the child died without one, an error naming the cause: the quota it hit (SIGXCPU:
  its CPU seconds), the signal, or its exit status, with the end of its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from actors import sandbox_protocol as protocol
from actors.sandbox_policy import Limits, SandboxUnavailable, check_available, policy
from llmos_kernel import wire
from llmos_kernel.errors import LlmosError, QuotaExceeded, Unavailable

log = logging.getLogger("llmos.sandbox")

MAX_CALLS = 1024  # syscalls of one child in flight at once
MAX_UNREAD = 64 << 20  # bytes sent to a child and not yet read by it
PRELOAD = ("actors.program_runner", "syscalls")  # what a child imports before its Start
START_TIMEOUT_S = 60.0  # from exec to Ready (a loaded machine imports slowly)
STDERR_TAIL = 8192  # bytes of a child's stderr kept for its crash report
# ``python -I`` finds llmos where it is installed; this runs the child from the code its host
# imported (a checkout on PYTHONPATH, a Ray working_dir), which its policy lets it read
BOOTSTRAP = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
             "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SandboxHost(Protocol):
    """What a sandbox needs of the host that runs it, for its one process."""

    def call(self, name: str, args: dict, handling: str | None) -> Awaitable[wire.Result]:
        """One syscall as the process (the host adds its capability)."""

    def ack(self, msg_id: str, reply: dict | None) -> None:
        """The process handled a message (``reply``: its answer to an ipc.call)."""

    def output(self, text: str) -> None:
        """What the program printed."""

    def tool_result(self, call: str, result: wire.Result) -> None:
        """The answer to a ``wire.ToolCall`` pushed to the process."""


@dataclass
class Spare:
    """A child started ahead of need: its interpreter up and the runtime imported, waiting
    for its Start. Nothing of a program is in it yet, so it needs no confinement yet."""

    process: subprocess.Popen
    sock: socket.socket  # the host's end of its channel
    dir: str  # its cwd and HOME; its scratch dir if the program gets one

    def close(self) -> None:
        """Discard a spare that will not be used."""
        self.process.kill()
        self.process.wait()
        self.process.stderr.close()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def launch(preload: Sequence[str] = PRELOAD, module: str = "actors.sandbox_child",
           kind: int = socket.SOCK_STREAM) -> Spare:
    """Start a child for ``Sandbox.start``: a fresh interpreter, no descriptor but its end of
    the channel, and an environment of its own: nothing of the host's. It imports
    ``preload`` at once, under one BLAS thread: numpy must not start threads before the
    child confines itself. (``actors.sandbox_zygote`` starts its fork server the same way:
    ``module`` and the socket's ``kind`` are its.)"""
    check_available()
    where = tempfile.mkdtemp(prefix="llmos-sandbox-")
    env = {"LC_ALL": "C.UTF-8", "HOME": where, "TMPDIR": where, "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", BOOTSTRAP, CODE_ROOT, module,
             str(theirs.fileno()), *preload],
            pass_fds=(theirs.fileno(),), env=env, cwd=where, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    except BaseException:
        ours.close()
        shutil.rmtree(where, ignore_errors=True)
        raise
    finally:
        theirs.close()
    return Spare(process, ours, where)


class Sandbox:
    """The host's side of one sandboxed process."""

    def __init__(self, host: SandboxHost, pid: int, program: wire.Program,
                 args: dict | None = None, *, name: str | None = None, mailbox: int = 10_000,
                 limits: Limits | None = None, scratch: bool = False,
                 import_paths: Sequence[str] = (), host_id: str = "sandbox",
                 expect: Callable[[bool], None] | None = None):
        self.host, self.pid, self.program, self.args = host, pid, program, args or {}
        self.name, self.mailbox, self.host_id = name, mailbox, host_id
        self.limits = limits or Limits()
        self.scratch, self.import_paths = scratch, tuple(import_paths)
        self.dir: str | None = None  # its cwd and HOME (and scratch dir)
        self.process: subprocess.Popen | None = None
        self.spawn_s: float | None = None  # start() to Ready
        self.cpu_s: float | None = None  # CPU seconds it used, once it has exited
        self.stderr = bytearray()  # its last STDERR_TAIL bytes
        self._writer: asyncio.StreamWriter | None = None
        self._ready: asyncio.Future | None = None
        self._relay: asyncio.Task | None = None
        self._reaped = asyncio.Event()
        self._calls: set[asyncio.Task] = set()
        self._tool_calls: set[str] = set()
        self._report: wire.ExitReport | None = None  # the one the child sent
        self._violation: str | None = None
        self._killing = False
        self._pidfd = -1
        # told True when an answer goes down (its next call is likely on its way), False
        # when the child is heard from or gone: the host's batching waits for it briefly
        self._expect = expect
        self._expected = False

    @property
    def alive(self) -> bool:
        return self.process is not None and not self._reaped.is_set()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, spare: Spare | None = None) -> None:
        """Start the child (or take ``spare``, one started ahead) and wait until it is
        confined; SandboxUnavailable if it cannot be (no Landlock or libseccomp here, or the
        child failed to apply them)."""
        check_available()
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        spare = spare or launch()
        self.process, self.dir = spare.process, spare.dir
        rules = policy(self.program, self.limits, scratch=self.dir if self.scratch else None,
                       import_paths=self.import_paths)
        try:
            self._pidfd = os.pidfd_open(self.process.pid)
        except ProcessLookupError:  # a fork its zygote has reaped already: it says how it ended
            self.process.when_reaped(self._reaped_by_zygote)
        else:
            loop.add_reader(self._pidfd, self._on_exit)
        os.set_blocking(self.process.stderr.fileno(), False)
        loop.add_reader(self.process.stderr.fileno(), self._on_stderr)
        reader, self._writer = await asyncio.open_unix_connection(sock=spare.sock)
        self._ready = loop.create_future()
        self._relay = loop.create_task(self._read(reader))
        self._send(protocol.Start(self.pid, self.name, self.program, self.args, self.mailbox,
                                  self.host_id, rules))
        ended = loop.create_task(self._reaped.wait())
        try:
            await asyncio.wait({self._ready, ended}, timeout=START_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if not self._ready.done():
            why = "it exited before it was confined" if self._reaped.is_set() \
                else f"it was not confined within {START_TIMEOUT_S:.0f} s"
            self._kill_now()
            await self._reaped.wait()
            if self.process.returncode == protocol.EXIT_UNCONFINED:
                why = "it could not confine itself"
            if self._violation is not None:
                why = self._violation
            raise SandboxUnavailable(f"the sandboxed process for pid {self.pid} did not start: "
                                     f"{why}: {self.stderr_text() or 'no output'}")
        self.spawn_s = time.perf_counter() - began

    def push(self, item: wire.Deliver | wire.TokenDelta | wire.ToolCall | wire.Kill) -> None:
        """Hand the process something the kernel sent it."""
        if isinstance(item, wire.ToolCall):
            if not self.alive:
                self.host.tool_result(item.call, wire.failure(Unavailable(
                    f"process {self.pid} exited before it could run the tool")))
                return
            self._tool_calls.add(item.call)
        self._send(item)
        if isinstance(item, wire.Deliver):  # its handler's ack (and what it sends) follows
            self._expecting()

    async def kill(self, grace_s: float = 5.0) -> wire.ExitReport:
        """Ask the program to stop (a behaviour's ``terminate`` gets ``grace_s``), then
        SIGKILL it; returns its exit report."""
        self._killing = True
        if self.alive:
            self._send(wire.Kill(self.pid, grace_s))
            try:
                await asyncio.wait_for(self._reaped.wait(), grace_s + 1.0)
            except TimeoutError:
                self._kill_now()
        return await self.wait()

    async def wait(self) -> wire.ExitReport:
        """How the process ended, once it has (and everything it sent was relayed)."""
        await self._reaped.wait()
        if self._relay is not None:
            await self._relay
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        return self._exit_report()

    async def close(self) -> None:
        """Kill the child now if it still runs, and release what it held."""
        if self.alive:
            self._killing = True
            self._kill_now()
        if self.process is not None:
            await self.wait()

    def _kill_now(self) -> None:
        if self.alive:
            if self._pidfd >= 0:  # this process, even if its zygote has reaped it
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                self.process.kill()

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        when_reaped = getattr(self.process, "when_reaped", None)
        if when_reaped is not None:  # a fork: its zygote reaps it and says how it ended
            when_reaped(self._reaped_by_zygote)
            return
        _, status, usage = os.wait4(self.process.pid, 0)  # Popen.wait, with its CPU time
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self._finish()

    def _reaped_by_zygote(self) -> None:
        self.cpu_s = self.process.cpu_s
        self._finish()

    def _finish(self) -> None:
        loop = asyncio.get_running_loop()
        self._on_stderr()
        loop.remove_reader(self.process.stderr.fileno())
        self.process.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._reaped.set()

    def _on_stderr(self) -> None:
        fd = self.process.stderr.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:  # nothing more for now (BlockingIOError)
                return
            if not data:
                asyncio.get_running_loop().remove_reader(fd)
                return
            self.stderr += data
            del self.stderr[:-STDERR_TAIL]

    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()

    # -- the relay --------------------------------------------------------------------------
    def _send(self, msg: Any) -> None:
        writer = self._writer
        if writer is None or writer.is_closing() or self._violation is not None:
            return
        writer.write(protocol.frame(msg))
        if writer.transport.get_write_buffer_size() > MAX_UNREAD:
            self._violate(f"it left over {MAX_UNREAD} bytes of its channel unread")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Act on each frame the child sends, until it closes the channel or breaks it."""
        try:
            while True:
                header = await reader.readexactly(protocol.HEADER.size)
                msg = protocol.decode_to_parent(
                    await reader.readexactly(protocol.length(header)))
                try:
                    self._on_frame(msg)
                except protocol.ProtocolError:
                    raise
                except Exception:
                    log.exception("sandbox of pid %s: the host failed on a %s", self.pid,
                                  type(msg).__name__)
                self._heard()  # after a call's op is queued: the batch can take it
        except protocol.ProtocolError as e:
            self._violate(str(e))
        except (asyncio.IncompleteReadError, OSError):
            pass  # the child exited (or was killed)
        finally:
            self._heard()
            if self._writer is not None:
                self._writer.close()
            for call in self._tool_calls:  # no answer can come now
                self.host.tool_result(call, wire.failure(Unavailable(
                    f"process {self.pid} exited before it answered the tool call")))
            self._tool_calls.clear()

    def _on_frame(self, msg: protocol.ToParent) -> None:
        if not self._ready.done():
            if not isinstance(msg, protocol.Ready):
                raise protocol.ProtocolError(f"{type(msg).__name__} before Ready")
            self._ready.set_result(None)
            return
        match msg:
            case protocol.Ready():
                raise protocol.ProtocolError("Ready twice")
            case protocol.Call():
                if len(self._calls) >= MAX_CALLS:
                    self._answer(msg.call, wire.failure(QuotaExceeded(
                        f"a sandboxed process may have {MAX_CALLS} syscalls in flight")))
                    return
                task = asyncio.get_running_loop().create_task(self._call(msg))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
            case protocol.Ack():
                self.host.ack(msg.id, msg.reply)
            case protocol.Output():
                self.host.output(msg.text)
            case protocol.ToolResult():
                if msg.call not in self._tool_calls:
                    raise protocol.ProtocolError(f"a result for tool call {msg.call!r}, which "
                                                 "it was never given")
                self._tool_calls.discard(msg.call)
                self.host.tool_result(msg.call, wire.decode_result(msg.result))
            case protocol.Exit():
                if self._report is not None:
                    raise protocol.ProtocolError("a second exit report")
                self._report = msg.report

    async def _call(self, msg: protocol.Call) -> None:
        try:
            result = await self.host.call(msg.name, wire.decode_args(msg.args), msg.handling)
        except LlmosError as e:
            result = wire.failure(e)
        except Exception as e:
            log.exception("sandbox of pid %s: syscall %r failed", self.pid, msg.name)
            result = wire.internal_error("the sandbox relay", e)
        self._answer(msg.call, result)

    def _answer(self, call: int, result: wire.Result) -> None:
        self._send(protocol.Answer(call, wire.encode_result(result)))
        self._expecting()

    def _expecting(self) -> None:
        """The child was just given something it acts on: its next frame comes soon."""
        if self._expect is not None and not self._expected and self.alive:
            self._expected = True
            self._expect(True)

    def _heard(self) -> None:
        if self._expected:
            self._expected = False
            self._expect(False)

    def _violate(self, reason: str) -> None:
        if self._violation is None:
            self._violation = reason
            log.warning("sandbox of pid %s broke its channel's protocol: %s", self.pid, reason)
            self._kill_now()

    # -- how it ended ---------------------------------------------------------------------------
    def _exit_report(self) -> wire.ExitReport:
        code = self.process.returncode
        if self._violation is not None:
            return self._crash("ProtocolViolation", "it broke its channel's protocol and was "
                               f"killed: {self._violation}")
        if self._report is not None and code == 0:
            report = self._report
            error = report.error
            if error and error.get("type") == "MemoryError" and self.limits.memory_bytes:
                error = {**error, "message": f"{error.get('message') or 'out of memory'} "
                         f"(its memory_bytes quota: {self.limits.memory_bytes} bytes of "
                         "address space)"}
            return wire.ExitReport(self.pid, report.reason, result=report.result, error=error,
                                   handling=report.handling)
        if self._killing:
            return wire.ExitReport(self.pid, "killed")
        if code < 0:
            return self._signalled(signal.Signals(-code))
        return self._crash("ProcessCrashed", f"it exited with status {code} without an exit "
                           "report (sys.exit or os._exit in the program?)")

    def _signalled(self, sig: signal.Signals) -> wire.ExitReport:
        cpu, memory = self.limits.cpu_s, self.limits.memory_bytes
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None
                                     and self.cpu_s is not None and self.cpu_s >= cpu):
            return self._crash("QuotaExceeded", f"killed by {sig.name}: it used {self.cpu_s:.1f}"
                               f" s of CPU time, over its cpu_s quota of {cpu} s")
        if sig == signal.SIGSYS:
            return self._crash("ProcessCrashed", "killed by SIGSYS: it made a system call of "
                               "another architecture, which the sandbox forbids")
        hint = f" (near its memory_bytes quota of {memory} bytes?)" \
            if memory and sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT) else ""
        return self._crash("ProcessCrashed", f"killed by {sig.name}{hint}")

    def _crash(self, kind: str, message: str) -> wire.ExitReport:
        return wire.ExitReport(self.pid, "error", error={
            "type": kind, "message": f"sandboxed process {self.pid}: {message}",
            "traceback": self.stderr_text()})
