"""Running agent programs inside a host: load, run, kill, serve their tools, capture output.

A program is a function (``main(**args)``) or an OTP-like behaviour class (``init``,
``on_message``, ``terminate``). Whatever it does, its end is one ``wire.ExitReport``:
``normal`` with its result, ``error`` with the exception (its supervisor decides what
follows), ``killed`` or ``shutdown``. Its output goes to its log under its pid.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import importlib
import inspect
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

from actors.runtime import AgentRuntime, current
from llmos_kernel import wire
from llmos_kernel.tool_schema import decode_args, to_json


class Capture:
    """sys.stdout/sys.stderr stand-in that files each agent's output under its pid."""

    def __init__(self, real, stream: str):
        self._real, self.stream = real, stream

    @property
    def real(self):
        """The stream it stood in for; the process's own once that one is closed (a test
        runner's or a CLI runner's capture, say, installed when this host started)."""
        if getattr(self._real, "closed", False):
            return sys.__stdout__ if self.stream == "stdout" else sys.__stderr__
        return self._real

    def write(self, text: str) -> int:
        agent = current.get()
        if agent is None:
            return self.real.write(text)
        agent.log(text if self.stream == "stdout" else f"[stderr] {text}")
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @staticmethod
    def install() -> None:
        if not isinstance(sys.stdout, Capture):
            sys.stdout, sys.stderr = Capture(sys.stdout, "stdout"), Capture(sys.stderr, "stderr")


async def run(agent: AgentRuntime, program: wire.Program, args: dict,
              exited: Callable[[AgentRuntime, wire.ExitReport], None]) -> None:
    """Run a program to its end, as ``agent``; then tell ``exited`` how it ended."""
    exited(agent, await _run(agent, program, args))


async def _run(agent: AgentRuntime, program: wire.Program, args: dict) -> wire.ExitReport:
    try:
        entry = load_program(program)
        if inspect.isclass(entry):
            result = await _run_behaviour(agent, entry, args)
        else:
            result = entry(**args)
            if inspect.isawaitable(result):
                result = await result
        agent.finish_message()
        return wire.ExitReport(agent.pid, "normal", result=plain(result))
    except asyncio.CancelledError:
        return wire.ExitReport(agent.pid, "killed" if agent.killing else "shutdown")
    except Exception as e:  # noqa: BLE001 - the program crashed: its supervisor decides
        agent.log(f"[exit] {type(e).__name__}: {e}\n")
        return wire.ExitReport(agent.pid, "error", handling=agent.handling, error={
            "type": type(e).__name__, "message": str(e),
            "traceback": traceback.format_exc(limit=20)})


async def kill(agent: AgentRuntime, grace_s: float) -> None:
    """Give a behaviour's ``terminate`` hook ``grace_s`` seconds, then cancel the agent."""
    agent.killing = True
    hook = getattr(agent.behaviour, "terminate", None)
    if hook is not None:
        try:
            result = hook("killed")
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, grace_s)
        except Exception as e:  # noqa: BLE001 - a failing terminate hook still ends in a kill
            agent.log(f"[terminate failed] {type(e).__name__}: {e}\n")
    if agent.task is not None:
        agent.task.cancel()


async def run_tool(agent: AgentRuntime | None, order: wire.ToolCall) -> wire.Result:
    """Run a tool ``agent`` registered, as ``agent``; its result or a ToolError."""
    try:
        if agent is None or order.name not in agent.tools:
            raise LookupError(f"tool {order.name!r} is not registered by pid {order.pid}")
        fn = agent.tools[order.name]
        ctx = contextvars.copy_context()
        ctx.run(current.set, agent)
        kwargs = decode_args(fn, order.args)
        if inspect.iscoroutinefunction(fn):
            result = await asyncio.get_running_loop().create_task(fn(**kwargs), context=ctx)
        else:  # a plain function may block: keep the host's loop (other agents) moving
            result = await asyncio.to_thread(ctx.run, fn, **kwargs)
            if inspect.isawaitable(result):
                result = await asyncio.get_running_loop().create_task(result, context=ctx)
        return wire.ok(plain(result))
    except Exception as e:  # noqa: BLE001 - reported to the caller as a ToolError
        return wire.Result(error=wire.ErrorInfo("ToolError", f"{type(e).__name__}: {e}"))


async def _run_behaviour(agent: AgentRuntime, cls: type, args: dict) -> Any:
    """Run an OTP-like behaviour: ``init(**args)``, then ``on_message(msg)`` per message."""
    behaviour = cls()
    agent.behaviour = behaviour
    init = getattr(behaviour, "init", None)
    if init is not None:
        result = init(**args)
        if inspect.isawaitable(result):
            await result
    on_message = getattr(behaviour, "on_message", None)
    if on_message is None:
        return None
    host = agent.host
    while True:
        msg = await agent.next_message()
        reply = on_message(msg)
        if inspect.isawaitable(reply):
            reply = await reply
        agent.finish_message(
            {"to": msg.sender, "correlation_id": msg.id, **host.encode_message(reply)}
            if reply is not None and msg.expects_reply else None)
        if getattr(behaviour, "stopped", False):
            return getattr(behaviour, "result", None)


def load_program(program: wire.Program) -> Any:
    """The entry point (function or behaviour class) a program names."""
    if program.kind == "module":
        module_name, _, attr = (program.ref or "").partition(":")
        module = importlib.import_module(module_name)
    elif program.kind == "source":
        # One module per program file (per source text where there is no file): a second
        # spawn of the same text reuses it, so its @message classes are declared once per
        # host; an edited file replaces it under the same name, so its @message classes
        # replace the old ones (same module.qualname) instead of clashing with them.
        code = program.code or ""
        name = "llmos_program_" + hashlib.sha1(
            (program.filename or code).encode()).hexdigest()[:16]
        module = sys.modules.get(name)
        if module is None or module.__llmos_program__.get("code") != code:
            module = types.ModuleType(name)
            module.__file__ = program.filename or "<program>"
            # lets the program spawn its own classes (syscalls.proc reads it)
            module.__llmos_program__ = wire.to_builtins(
                wire.Program("source", code=code, filename=program.filename))
            sys.modules[name] = module
            try:
                exec(compile(code, module.__file__, "exec"), module.__dict__)  # noqa: S102 - running the user's program is the point
            except BaseException:
                del sys.modules[name]
                raise
        attr = program.attr or ""
    elif program.kind == "pickle":
        import ray.cloudpickle  # here only: a sandboxed child's ray is a bare package

        return ray.cloudpickle.loads(program.data)
    else:
        raise ValueError(f"a host cannot run a program of kind {program.kind!r}")
    if attr:
        return getattr(module, attr)
    for default in ("main", "Agent"):
        if hasattr(module, default):
            return getattr(module, default)
    raise ValueError(f"program {program.name()!r} defines neither main() nor class Agent")


def plain(value: Any) -> Any:
    """Make a program's result msgpack-friendly (dataclasses to dicts, others to repr)."""
    try:
        return to_json(value)
    except TypeError:
        return repr(value)
