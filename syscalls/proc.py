"""proc: processes — spawn, kill, wait, ps, links and monitors.

A program is a module reference (``"pkg.mod:main"``), a ``.py`` file, or a
function / behaviour class object. A behaviour class has OTP-like hooks:
``init(**args)``, ``on_message(msg)`` (return a value to answer an
``ipc.call``) and ``terminate(reason)``; set ``self.stopped = True`` to exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from llmos_kernel.errors import InvalidArgument
from llmos_kernel.notices import ExitSignal, ProcessDown
from llmos_kernel.wire import Program, to_builtins
from syscalls import _context

__all__ = [
    "ExitSignal",
    "ProcessDown",
    "children",
    "demonitor",
    "grant",
    "kill",
    "link",
    "monitor",
    "program_spec",
    "ps",
    "self",
    "spawn",
    "unlink",
    "wait",
]


def program_spec(program: Any) -> dict:
    """How a program travels to the host that runs it."""
    if isinstance(program, dict):
        return program
    if isinstance(program, str | os.PathLike):
        text = os.fspath(program)
        path_part, _, attr = text.partition(".py:") if ".py:" in text else (text, "", "")
        if path_part.endswith(".py") or ".py:" in text:
            file = Path(path_part if path_part.endswith(".py") else path_part + ".py")
            if not file.is_file():
                raise InvalidArgument(f"program file not found: {file}")
            return to_builtins(Program("source", code=file.read_text(),
                                  filename=str(file.resolve()), attr=attr or None,
                                  label=file.name))
        if ":" not in text and "." not in text:
            raise InvalidArgument(f"program {text!r} is neither a file.py nor 'module:function'")
        return to_builtins(Program("module", ref=text, label=text))
    if callable(program):
        module = getattr(program, "__module__", None)
        qualname = getattr(program, "__qualname__", "")
        origin = getattr(sys.modules.get(module or ""), "__llmos_program__", None)
        if origin is not None and "<locals>" not in qualname:  # defined in a shipped .py file
            return {**origin, "attr": qualname, "label": qualname}
        if module and module != "__main__" and "<locals>" not in qualname:
            return to_builtins(Program("module", ref=f"{module}:{qualname}", label=qualname))
        import ray

        return to_builtins(Program("pickle", data=ray.cloudpickle.dumps(program), label=qualname))
    raise InvalidArgument(f"cannot run {program!r} as a program")


async def spawn(program: Any, args: dict | None = None, *, name: str | None = None,
                priority: int | None = None, quotas: dict | None = None,
                restart: dict | str | None = None, tools: list[str] | None = None,
                approval: str | None = None, trap_exits: bool = False, isolated: bool = False,
                resources: dict | None = None, host: str | None = None,
                node: str | None = None, sandbox: bool = False, scratch: bool = False,
                net: list[str] | None = None) -> int:
    """Start a child process; returns its pid. You become its supervisor.

    ``restart`` is a restart type ("permanent", "transient", "temporary") or a dict
    with ``restart``, and, for the children it will supervise, ``strategy``
    ("one_for_one", "one_for_all", "rest_for_one"), ``intensity`` and ``period_s``.
    ``host`` pins it to one shared agent host (``llmos kernel status`` lists them).
    ``resources`` (Ray resources: ``num_cpus``, ``num_gpus``, ``memory``, or a custom
    resource a node was started with) or ``node`` (a Ray node id, or its first 6+
    characters) give it an agent host of its own, placed on a node that has them; a
    request no node can meet is refused at once.
    ``sandbox`` runs it in a confined child process of its host that reaches nothing but
    its syscalls (no files, sockets or processes of its own; rlimits from ``quotas``:
    memory_bytes, cpu_s, open_files, file_bytes); ``scratch`` gives it a private writable
    directory there. A sandboxed process's children are sandboxed too.
    ``net`` lists the hosts its ``net.fetch`` may reach ("api.example.com",
    "localhost:8080", "*.example.org"); none by default, and never more than yours.
    """
    spec: dict[str, Any] = {"program": program_spec(program), "args": args or {}}
    for key, value in (("name", name), ("priority", priority), ("quotas", quotas),
                       ("tools", tools), ("approval", approval), ("resources", resources),
                       ("host", host), ("node", node), ("net", net)):
        if value is not None:
            spec[key] = value
    if restart is not None:
        spec["restart"] = {"restart": restart} if isinstance(restart, str) else restart
    if trap_exits:
        spec["trap_exits"] = True
    if isolated:
        spec["isolated"] = True
    for key, value in (("sandbox", sandbox), ("scratch", scratch)):
        if value:
            spec[key] = True
    return await _context.call("proc.spawn", spec=spec)


async def kill(pid: int | str, signal: str = "term") -> None:
    """End a process you started (or were granted): "term" is graceful then forced."""
    await _context.call("proc.kill", pid=pid, signal=signal)


async def wait(pid: int | str, timeout: float | None = None) -> dict:
    """Wait for a process to exit for good; returns its exit record (reason, result, error)."""
    return await _context.call("proc.wait", pid=pid, timeout=timeout)


async def ps(all: bool = False) -> list[dict]:
    return await _context.call("proc.ps", all=all)


async def self() -> dict:
    """This process: pid, name, parent, priority, quotas, tools, restart policy, args."""
    return await _context.call("proc.self")


def pid() -> int:
    return _context.runtime().pid


async def children() -> list[dict]:
    return await _context.call("proc.children")


async def link(pid: int | str) -> None:
    """If either of us dies abnormally, the other dies too (or gets ExitSignal if trapping)."""
    await _context.call("proc.link", pid=pid)


async def unlink(pid: int | str) -> None:
    await _context.call("proc.link", pid=pid, on=False)


async def monitor(pid: int | str) -> None:
    """Receive a ProcessDown message when ``pid`` exits."""
    await _context.call("proc.monitor", pid=pid)


async def demonitor(pid: int | str) -> None:
    await _context.call("proc.monitor", pid=pid, on=False)


async def grant(pid: int | str, to: int | str) -> None:
    """Let process ``to`` signal (kill) process ``pid``."""
    await _context.call("proc.grant", pid=pid, to=to)


