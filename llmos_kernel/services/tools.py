"""The tool registry: which process may call which tool, with approvals, timeouts and typed errors.

A process sees the system tools, its own and those granted to it, narrowed by the
allowlist its spawner gave it. A dangerous tool waits for a person's approval; sync tools
run on bounded threads and async ones in the loop, under their timeout; every failure
comes back as a typed error. Declaring a tool (``@tool``, ToolSpec, argument
checks) lives in ``tool_specs``, the type-hint/JSON mapping in ``tool_schema`` and the
calculator and clock in ``builtin_tools``; their names are re-exported here, where callers
have always imported them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import inspect
import threading
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Timeout,
    ToolError,
)
from llmos_kernel.services.approvals import ApprovalQueue
from llmos_kernel.services.builtin_tools import builtin_tools, calculator, clock
from llmos_kernel.tool_schema import Range, decode_args, json_schema, to_json
from llmos_kernel.tool_specs import ToolSpec, spec_of, tool, validate_args

__all__ = [
    "Executor",
    "Range",
    "ToolRegistry",
    "ToolSpec",
    "builtin_tools",
    "calculator",
    "clock",
    "decode_args",
    "json_schema",
    "spec_of",
    "to_json",
    "tool",
    "validate_args",
]

Executor = Callable[[dict[str, Any]], Awaitable[Any]]
_APPROVAL_POLICIES = ("ask", "auto", "deny")


# --- running tools ---------------------------------------------------------------------------


class _ThreadRunner:
    """Runs sync tools on daemon threads, bounding the threads that outlive their timeout.

    A Python thread cannot be killed: a sync tool that runs past its timeout keeps its thread
    until the function returns by itself (the caller gets Timeout at once). At most
    ``max_stuck`` such threads may exist; while that many do, sync tools are refused with
    QuotaExceeded rather than piling up more.
    """

    def __init__(self, max_stuck: int) -> None:
        self.max_stuck = max_stuck
        self.stuck = 0
        self._lock = threading.Lock()

    def admit(self, tool_name: str) -> None:
        if self.stuck >= self.max_stuck:
            raise QuotaExceeded(
                f"{self.stuck} threads are still running sync tools that timed out; tool "
                f"{tool_name!r} cannot start until one of them returns"
            )

    async def run(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        worker = threading.Thread(
            target=_work, args=(done, fn, kwargs), name=f"llmos-tool-{fn.__name__}", daemon=True
        )
        worker.start()
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            with self._lock:
                self.stuck += 1
            done.add_done_callback(self._release)  # runs at once if the thread just finished
            raise

    def _release(self, _: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self.stuck -= 1


def _work(done: concurrent.futures.Future[Any], fn: Callable[..., Any], kwargs: dict) -> None:
    if not done.set_running_or_notify_cancel():
        return
    try:
        done.set_result(fn(**kwargs))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
        done.set_exception(exc)


@dataclass
class _Entry:
    spec: ToolSpec
    fn: Callable[..., Any] | None
    executor: Executor | None


class ToolRegistry:
    """Which tools exist, who may call them, and how a call runs.

    System tools (owner None) are visible to every process; a process's own tools are visible
    to it and to the processes it grants them to. ``allowed`` is the allowlist the spawner
    gave a process (None: no restriction).
    """

    def __init__(
        self, approvals: ApprovalQueue | None = None, *, max_stuck_threads: int = 8
    ) -> None:
        self._approvals = approvals
        self._scopes: dict[int | None, dict[str, _Entry]] = {None: {}}
        self._grants: dict[int, dict[str, int]] = {}  # grantee pid -> {tool name: owner pid}
        self._threads = _ThreadRunner(max_stuck_threads)

    def register(
        self, fn_or_spec: Any, *, owner: int | None = None, executor: Executor | None = None
    ) -> ToolSpec:
        """Add a tool to the system scope (owner None) or to process ``owner``'s scope.

        ``executor`` runs the call instead of the function (the kernel uses it to run an
        agent's tool inside the agent's host); a bare ToolSpec needs one.
        """
        spec = spec_of(fn_or_spec)
        if executor is None and isinstance(fn_or_spec, ToolSpec):
            raise InvalidArgument(f"tool {spec.name!r}: a bare ToolSpec needs an executor")
        scope = self._scopes.setdefault(owner, {})
        if spec.name in scope:
            whose = "a system tool" if owner is None else f"a tool of process {owner}"
            raise AlreadyExists(f"{spec.name!r} is already {whose}; pick another name")
        fn = None if isinstance(fn_or_spec, ToolSpec) else fn_or_spec
        scope[spec.name] = _Entry(spec, fn, executor)
        return spec

    def unregister_owner(self, owner: int) -> None:
        """Forget every tool of process ``owner`` and every grant to or from it."""
        self._scopes.pop(owner, None)
        self._grants.pop(owner, None)
        for grants in self._grants.values():
            for name in [name for name, giver in grants.items() if giver == owner]:
                del grants[name]

    def grant(self, owner: int, name: str, pid: int) -> None:
        """Let process ``pid`` see and call process ``owner``'s tool ``name``."""
        if name not in self._scopes.get(owner, {}):
            raise NotFound(f"process {owner} has no tool {name!r} to grant")
        if self._grants.get(pid, {}).get(name) == owner:
            return
        if name in self._visible(pid):
            raise AlreadyExists(f"process {pid} already sees a tool named {name!r}")
        self._grants.setdefault(pid, {})[name] = owner

    def revoke(self, owner: int, name: str, pid: int) -> None:
        if self._grants.get(pid, {}).get(name) != owner:
            raise NotFound(f"process {pid} holds no grant of {name!r} from process {owner}")
        del self._grants[pid][name]

    def list(self, pid: int, allowed: Collection[str] | None) -> list[ToolSpec]:
        """The tools ``pid`` may call, by name."""
        view = self._visible(pid)
        return [view[name].spec for name in sorted(view) if allowed is None or name in allowed]

    def get(self, pid: int, name: str, allowed: Collection[str] | None) -> ToolSpec:
        return self._entry(pid, name, allowed).spec

    async def call(
        self,
        pid: int,
        name: str,
        args: Any,
        *,
        allowed: Collection[str] | None = None,
        approval: str = "ask",
        approval_timeout_s: float = 300.0,
    ) -> Any:
        """Run tool ``name`` for process ``pid`` and return its JSON-ready result.

        ``approval`` is the spawner's policy for dangerous tools: "ask" queues a request and
        waits for a person, "auto" runs them, "deny" refuses them. Failures inside the tool
        come back as ToolError (one the tool raises itself passes through as it is); a tool
        past its timeout as Timeout.
        """
        if approval not in _APPROVAL_POLICIES:
            raise InvalidArgument(f"approval must be one of {_APPROVAL_POLICIES}, got {approval!r}")
        entry = self._entry(pid, name, allowed)
        args = validate_args(entry.spec, args)
        if entry.spec.dangerous:
            await self._approve(pid, entry.spec.name, args, approval, approval_timeout_s)
        return await self._run(entry, args)

    def _visible(self, pid: int) -> dict[str, _Entry]:
        view = dict(self._scopes[None])
        for name, owner in self._grants.get(pid, {}).items():
            view[name] = self._scopes[owner][name]
        view.update(self._scopes.get(pid, {}))
        return view

    def _entry(self, pid: int, name: str, allowed: Collection[str] | None) -> _Entry:
        if not isinstance(name, str):
            raise InvalidArgument(f"a tool name is a string, got {type(name).__name__}")
        view = self._visible(pid)
        usable = [n for n in sorted(view) if allowed is None or n in allowed]
        if name not in view:
            close = difflib.get_close_matches(name, usable, n=3)
            hint = (
                f"did you mean {', '.join(map(repr, close))}?"
                if close
                else (f"available: {', '.join(usable[:10]) or 'none'}")
            )
            raise NotFound(f"no tool named {name!r}; {hint}")
        if allowed is not None and name not in allowed:
            raise PermissionDenied(
                f"process {pid} may not use tool {name!r}; its allowlist is {sorted(allowed)}"
            )
        return view[name]

    async def ask(self, pid: int, name: str, args: Any, *, approval: str = "ask",
                  approval_timeout_s: float = 300.0) -> None:
        """A person's decision on a dangerous call of a program's *own* tool (one the kernel
        does not run: ``tools.run_loop`` asks before it runs it), through the same queue,
        policy and errors as ``call``. It guards a program from its model, not from itself:
        the program's own code could skip the question (sandboxing is what confines that)."""
        if approval not in _APPROVAL_POLICIES:
            raise InvalidArgument(f"approval must be one of {_APPROVAL_POLICIES}, got {approval!r}")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("a tool name is a non-empty string")
        if not isinstance(args, dict):
            raise InvalidArgument(f"a tool's arguments are a dict, got {type(args).__name__}")
        await self._approve(pid, name, args, approval, approval_timeout_s)

    async def _approve(
        self, pid: int, name: str, args: dict[str, Any], policy: str, timeout_s: float
    ) -> None:
        if policy == "auto":
            return
        if policy == "deny":
            raise PermissionDenied(
                f"tool {name!r} is dangerous and process {pid} runs with approval='deny'"
            )
        if self._approvals is None:
            raise PermissionDenied(
                f"tool {name!r} needs a person's approval but no approval queue is set up"
            )
        request = self._approvals.submit(pid, name, args)
        decided = await self._approvals.wait(request.id, timeout_s)
        if decided.state == "approved":
            return
        if decided.state == "expired":
            raise Timeout(
                f"approval {request.id} for tool {name!r} timed out after {timeout_s:g}s "
                f"without a decision; answer sooner with `llmos approve {request.id}`"
            )
        why = f": {decided.reason}" if decided.reason else ""
        raise PermissionDenied(
            f"tool {name!r} was denied by {decided.decided_by} (approval {request.id}){why}"
        )

    async def _run(self, entry: _Entry, args: dict[str, Any]) -> Any:
        spec, fn = entry.spec, entry.fn
        sync = entry.executor is None and not inspect.iscoroutinefunction(fn)
        if sync:
            self._threads.admit(spec.name)
        deadline = asyncio.timeout(spec.timeout_s)
        try:
            async with deadline:
                if entry.executor is not None:
                    result = await entry.executor(args)
                elif sync:
                    result = await self._threads.run(fn, decode_args(fn, args))
                else:
                    result = await fn(**decode_args(fn, args))
        except ToolError:
            raise
        except (Exception, SystemExit) as exc:  # a tool's sys.exit() must not stop the kernel
            if deadline.expired():
                raise Timeout(f"tool {spec.name!r} did not finish within {spec.timeout_s:g}s")
            raise ToolError(f"tool {spec.name!r} failed: {type(exc).__name__}: {exc}") from exc
        try:
            return to_json(result, "the result")
        except (TypeError, RecursionError) as exc:
            raise ToolError(
                f"tool {spec.name!r} returned something that cannot be sent back: {exc}; return "
                "None, bool, int, float, str, lists, dicts with str keys, enums or dataclasses"
            ) from None

