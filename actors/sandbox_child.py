"""The sandboxed side: restrict this process, then run one agent program whose host is the
socket it inherited.

``actors.sandbox`` starts this module as a fresh interpreter (``python -I -B -m
actors.sandbox_child FD MODULE...``, clean environment, cwd in a private directory) with
one end of a socketpair as FD. In order:

1. import the modules its host names after FD (the runtime and the syscall layer, as
   multiprocessing's forkserver preloads), so that a child started ahead of need is ready
   at once; its environment holds numpy to one BLAS thread, so no thread exists yet
   (``apply`` checks, and refuses otherwise). A fork of ``actors.sandbox_zygote`` has
   them from the zygote and starts at step 2 (``run``);
2. read the ``Start`` frame: what to run, under which ``Policy``;
3. ``sandbox_policy.apply``: rlimits, capabilities, Landlock, seccomp. If any of it fails,
   say why on stderr and exit with ``protocol.EXIT_UNCONFINED``: no program code has run;
4. say ``Ready``, then run the program exactly as an in-process host does
   (``actors.program_runner``: the same loading, behaviours, tools and exit reports),
   with an ``AgentRuntime`` whose host is ``ChildHost``: each syscall is a ``Call`` frame
   answered by an ``Answer``; deliveries, token deltas, tool calls and kill orders
   arrive as the kernel's own ``wire`` items.

The child holds no capability and no Ray: ``ray`` is a bare package here (see
``_without_ray``), and even the real one could reach nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import importlib
import importlib.abc
import importlib.util
import itertools
import os
import signal
import socket
import sys
import types
from typing import TYPE_CHECKING, Any

from actors import sandbox_policy
from actors import sandbox_protocol as protocol
from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.messages import new_message_id

if TYPE_CHECKING:
    from actors.runtime import AgentRuntime

OUTPUT_PIECE = 1 << 20  # program output is sent in frames of at most this many characters


def main(argv: list[str]) -> None:
    sock = socket.socket(fileno=int(argv[1]))
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the host
    _without_ray()
    for name in argv[2:]:
        importlib.import_module(name)
    run(sock)


def run(sock: socket.socket) -> None:
    """Steps 2 to 4 on the host's channel ``sock`` (a launched child after its imports; a
    fork of ``actors.sandbox_zygote``, which has made them): never returns."""
    start = _read_start(sock)
    try:
        sandbox_policy.apply(start.policy)
    except Exception as e:  # noqa: BLE001 - any failure means: do not run the program
        sys.stderr.write(f"llmos sandbox: cannot confine this process: {type(e).__name__}: "
                         f"{e}\n")
        sys.stderr.flush()
        os._exit(protocol.EXIT_UNCONFINED)
    sock.sendall(protocol.frame(protocol.Ready()))
    _find_program_code(start.policy)
    asyncio.run(_serve(sock, start))


def _read_start(sock: socket.socket) -> protocol.Start:
    def exactly(n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            piece = sock.recv(n - len(data))
            if not piece:
                raise SystemExit("llmos sandbox: the host closed the channel before Start")
            data += piece
        return bytes(data)

    msg = protocol.decode_to_child(exactly(protocol.length(exactly(protocol.HEADER.size))))
    if not isinstance(msg, protocol.Start):
        raise SystemExit(f"llmos sandbox: expected Start, got {type(msg).__name__}")
    return msg


class _ProgramFinder(importlib.abc.MetaPathFinder):
    """Finds the program's own top-level modules where the host found them, without
    the child reading (or listing) the directories around them."""

    def __init__(self, modules: dict[str, str]):
        self.modules = modules

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        where = self.modules.get(name)
        if where is None:
            return None
        if os.path.isdir(where):
            return importlib.util.spec_from_file_location(
                name, os.path.join(where, "__init__.py"), submodule_search_locations=[where])
        return importlib.util.spec_from_file_location(name, where)


def _find_program_code(policy: protocol.Policy) -> None:
    sys.path.extend(policy.import_paths)
    if policy.modules:
        sys.meta_path.insert(0, _ProgramFinder(policy.modules))


def _without_ray() -> None:
    """A pickled program needs ``ray.cloudpickle`` (``actors.program_runner`` imports it
    then), and a program's module may ``import ray`` at its top. Here ``ray`` is a bare
    package: its submodules load from Ray's own files (the vendored cloudpickle needs
    nothing else), and anything else says why it is missing."""
    spec = importlib.util.find_spec("ray")
    ray = types.ModuleType("ray", "Ray is not available in a sandboxed process.")
    ray.__path__ = list(spec.submodule_search_locations or []) if spec else []

    def __getattr__(name: str) -> Any:
        if name == "cloudpickle":
            return importlib.import_module("ray.cloudpickle")
        raise AttributeError(f"ray.{name} is not available in a sandboxed process: it reaches "
                             "the world only through its syscalls")

    ray.__getattr__ = __getattr__
    sys.modules["ray"] = ray


class ChildHost:
    """The host as a sandboxed program sees it (an ``actors.runtime.Host``): each syscall,
    acknowledgement and piece of output is a frame to the real host."""

    def __init__(self, host_id: str, writer: asyncio.StreamWriter):
        self.host_id, self.writer = host_id, writer
        self.calls: dict[int, asyncio.Future] = {}
        self.sent_schemas: set[str] = set()
        self._ids = itertools.count(1)
        self._flushing = False

    def send(self, msg: Any) -> None:
        self.writer.write(protocol.frame(msg))

    async def syscall(self, agent: AgentRuntime, name: str, args: dict) -> Any:
        awaited = None
        if name == "ipc.send" and args.get("reply_to") == "call":
            # Name the request here and mark it awaited before it leaves, as a host does
            # for its own agents: its reply may arrive ahead of the send's answer, and the
            # behaviour's receive loop must leave that reply to the waiting call.
            args.setdefault("id", new_message_id())
            awaited = f"{agent.pid}:{args['id']}"
            agent.awaiting.add(awaited)
        call = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self.calls[call] = future
        try:
            try:
                self.send(protocol.Call(call, name, wire.encode_args(args), agent.handling))
            except protocol.ProtocolError as e:
                raise InvalidArgument(str(e)) from None
            return wire.unwrap(await future)
        except BaseException:
            if awaited is not None:
                agent.awaiting.discard(awaited)
            if args.get("schema") is not None:  # the kernel may not have learned it: the
                self.sent_schemas.discard(args.get("type"))  # next send declares it again
            raise
        finally:
            self.calls.pop(call, None)

    def answer(self, msg: protocol.Answer) -> None:
        future = self.calls.get(msg.call)
        if future is not None and not future.done():
            future.set_result(wire.decode_result(msg.result))

    def queue_ack(self, agent: AgentRuntime, msg_id: str, reply: dict | None = None) -> None:
        self.send(protocol.Ack(msg_id, reply))

    def logged(self, agent: AgentRuntime) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self.flush, agent)

    def flush(self, agent: AgentRuntime) -> None:
        self._flushing = False
        text = _safe("".join(agent.log_buffer))
        agent.log_buffer.clear()
        for i in range(0, len(text), OUTPUT_PIECE):
            self.send(protocol.Output(text[i:i + OUTPUT_PIECE]))

    def encode_message(self, msg: Any) -> dict:
        """A message's type and payload; its schema the first time this process sends its
        type, so the kernel can validate types only the program defines."""
        from llmos_kernel.messages import UNTYPED, encode, message_type, schema_of

        payload = encode(msg)
        if isinstance(msg, dict):
            return {"type": UNTYPED, "payload": payload}
        name = message_type(msg)
        if name in self.sent_schemas:
            return {"type": name, "payload": payload}
        self.sent_schemas.add(name)
        return {"type": name, "payload": payload, "schema": schema_of(type(msg))}


    def exited(self, agent: AgentRuntime, report: wire.ExitReport) -> None:
        """The program ended: its last output, then its exit report (made encodable, as
        the host's kernel link does, so that it can never be lost)."""
        if agent.log_buffer:
            self.flush(agent)
        try:
            self.send(protocol.Exit(report))
        except (TypeError, ValueError, OverflowError, protocol.ProtocolError):
            result = report.result if isinstance(report.result, str) else repr(report.result)
            self.send(protocol.Exit(wire.ExitReport(
                report.pid, report.reason, result=_safe(result[:OUTPUT_PIECE]),
                error=None if report.error is None else
                {k: _safe(str(v)[:OUTPUT_PIECE]) for k, v in report.error.items()},
                handling=report.handling)))


def _safe(text: str) -> str:
    """Text msgpack can carry: a lone surrogate becomes "?"."""
    return text.encode("utf-8", "replace").decode("utf-8")


async def _serve(sock: socket.socket, start: protocol.Start) -> None:
    # imported here, not at the top: only after _without_ray
    from actors import program_runner
    from actors.runtime import AgentRuntime, current

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    host = ChildHost(start.host_id, writer)
    agent = AgentRuntime(host, start.pid, "", start.name, mailbox_quota=start.mailbox)
    program_runner.Capture.install()
    ctx = contextvars.copy_context()
    ctx.run(current.set, agent)
    agent.task = loop.create_task(
        program_runner.run(agent, start.program, start.args, host.exited), context=ctx)
    reading = loop.create_task(_read(reader, host, agent, ctx))
    await asyncio.wait({agent.task, reading}, return_when=asyncio.FIRST_COMPLETED)
    if agent.task.done():
        await writer.drain()
    os._exit(0)  # not the interpreter's teardown: a thread the program left must not hold it


async def _read(reader: asyncio.StreamReader, host: ChildHost, agent: AgentRuntime,
                ctx: contextvars.Context) -> None:
    """Apply what the host sends until it closes the channel; a kill runs as the program
    (its terminate hook's output is its own)."""
    from actors import program_runner
    from actors.runtime import Message

    loop = asyncio.get_running_loop()
    while True:
        try:
            header = await reader.readexactly(protocol.HEADER.size)
            msg = protocol.decode_to_child(await reader.readexactly(protocol.length(header)))
        except asyncio.IncompleteReadError:
            return
        match msg:
            case protocol.Answer():
                host.answer(msg)
            case wire.Deliver(envelope=envelope):
                agent.deliver(Message.arrived(envelope))
            case wire.TokenDelta():
                queue = agent.streams.get(msg.request_id)
                if queue is not None:
                    queue.put_nowait(msg)
            case wire.ToolCall():
                loop.create_task(_run_tool(host, agent, msg))
            case wire.Kill(grace_s=grace_s):
                loop.create_task(program_runner.kill(agent, grace_s), context=ctx)


async def _run_tool(host: ChildHost, agent: AgentRuntime, order: wire.ToolCall) -> None:
    from actors import program_runner

    result = await program_runner.run_tool(agent, order)
    host.send(protocol.ToolResult(order.call, wire.encode_result(result)))


if __name__ == "__main__":
    main(sys.argv)
