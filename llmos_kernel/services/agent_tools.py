"""Tools that agents offer each other: registered by a process, run in that process's host.

A process registers a tool with ``tools.register``; anyone allowed to call it then gets
its result as from a built-in tool. The call travels to the owner's host as a
``ToolCall`` item and its answer comes back as the host's own ``tools.result`` call,
accepted only from the host the call went to. A restarted process offers its tools anew
(its old registrations die with its old capability); an exited one takes them along.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument, LlmosError, NotFound, ToolError, Unavailable
from llmos_kernel.outbox import Outboxes
from llmos_kernel.proctable import Process, ProcessTable
from llmos_kernel.services.tools import ToolRegistry, ToolSpec

MAX_TOOL_TIMEOUT_S = 3600.0


class AgentTools:
    def __init__(self, registry: ToolRegistry, table: ProcessTable, outboxes: Outboxes):
        self.registry, self.table, self.outboxes = registry, table, outboxes
        self._calls: dict[str, tuple[str, asyncio.Future]] = {}  # call id -> (host, answer)
        self._owners: dict[int, str] = {}  # pid -> capability hash that registered

    def register(self, proc: Process, spec: Any) -> dict:
        """Add a tool that runs in ``proc``'s own host, as ``proc``, when anyone calls it."""
        tool_spec = agent_tool_spec(spec)
        if self._owners.get(proc.pid, proc.cap_hash) != proc.cap_hash:
            self.registry.unregister_owner(proc.pid)  # restarted: it offers its tools anew
        self._owners[proc.pid] = proc.cap_hash

        async def run_on_host(args: dict, owner: int = proc.pid, name: str = tool_spec.name):
            host = self.table.get(owner).host
            if host is None:
                raise Unavailable(f"process {owner}, which runs tool {name!r}, is not running")
            call = secrets.token_hex(8)
            future = asyncio.get_running_loop().create_future()
            self._calls[call] = (host, future)
            try:
                self.outboxes.put(host, wire.ToolCall(call, owner, name, args))
                result: wire.Result = await future
            finally:
                self._calls.pop(call, None)
            if result.error is not None:
                raise ToolError(f"tool {name!r} failed in process {owner}: "
                                f"{result.error.message or 'no message'}")
            return result.ok

        self.registry.register(tool_spec, owner=proc.pid, executor=run_on_host)
        return tool_spec.to_openai()

    def result(self, host_id: str, args: dict) -> None:
        """A host's answer to a ToolCall it was sent."""
        call = args.get("call")
        pending = self._calls.get(call) if isinstance(call, str) else None
        if pending is None or pending[0] != host_id:
            raise NotFound(f"no tool call {call!r} is waiting on this host")
        try:
            result = wire.convert(args.get("result"), wire.Result)
        except InvalidArgument as e:
            result = wire.failure(ToolError(f"the host sent a malformed tool result: {e}"))
        if not pending[1].done():
            pending[1].set_result(result)

    def forget(self, pid: int) -> None:
        """``pid`` exited for good: its tools go with it."""
        self.registry.unregister_owner(pid)
        self._owners.pop(pid, None)


def agent_tool_spec(spec: Any) -> ToolSpec:
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
