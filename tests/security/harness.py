"""The red-team harness: run a program sandboxed against a fake host, or run the same
program as a plain child process (no sandbox) to show that the attack works without it.

Model-free and Ray-free: a sandboxed child is a fork of a zygote of its own (as an agent
host starts them; a freshly launched interpreter with ``forked=False``) talking to
``FakeHost`` over its socket; each run takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

from actors.sandbox import Sandbox
from actors.sandbox_zygote import Zygote
from llmos_kernel import wire
from llmos_kernel.errors import NotFound


@dataclass
class FakeHost:
    """A SandboxHost answering syscalls from ``answers`` (name -> fn(args) -> value; a raised
    LlmosError is the answer), recording everything else the process does."""

    answers: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[str, dict, str | None]] = field(default_factory=list)
    acks: list[tuple[str, dict | None]] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    tool_results: dict[str, wire.Result] = field(default_factory=dict)

    async def call(self, name: str, args: dict, handling: str | None) -> wire.Result:
        self.calls.append((name, args, handling))
        answer = self.answers.get(name)
        if answer is None:
            raise NotFound(f"the fake host has no syscall {name!r}")
        value = answer(args)
        return wire.ok(await value if inspect.isawaitable(value) else value)

    def ack(self, msg_id: str, reply: dict | None) -> None:
        self.acks.append((msg_id, reply))

    def output(self, text: str) -> None:
        self.out.append(text)

    def tool_result(self, call: str, result: wire.Result) -> None:
        self.tool_results[call] = result

    @property
    def text(self) -> str:
        return "".join(self.out)


@dataclass
class Outcome:
    """How a program ended, sandboxed or plain: its result, or its error's type and text."""

    result: Any = None
    error: str | None = None  # the exception's type name (or the sandbox's crash kind)
    message: str = ""
    report: wire.ExitReport | None = None
    host: FakeHost | None = None
    sandbox: Sandbox | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def program(source: str) -> wire.Program:
    return wire.Program("source", code=textwrap.dedent(source), filename="attack.py")


async def sandboxed(source: str, args: dict | None = None, host: FakeHost | None = None,
                    forked: bool = True, **options: Any) -> Outcome:
    """Run ``source`` (defining ``main``) in a sandbox until it ends: in a fork of a zygote,
    as an agent host starts them, or (``forked=False``) in a freshly launched child."""
    host = host or FakeHost()
    box = Sandbox(host, 7, program(source), args, **options)
    zygote = Zygote() if forked else None
    try:
        if zygote is not None:
            assert await zygote.started(60), "the zygote did not start"
        await box.start(zygote.fork() if zygote is not None else None)
        try:
            report = await asyncio.wait_for(box.wait(), 120)
        finally:
            await box.close()
    finally:
        if zygote is not None:
            zygote.close()
    return outcome(report, host, box)


def outcome(report: wire.ExitReport, host: FakeHost | None = None,
            box: Sandbox | None = None) -> Outcome:
    error = report.error or {}
    return Outcome(report.result, error.get("type") if report.reason != "normal" else None,
                   error.get("message", ""), report, host, box)


PLAIN = """
import asyncio, inspect, json, sys
spec = json.loads(sys.stdin.read())
ns = {"__name__": "attack"}
exec(compile(spec["source"], "attack.py", "exec"), ns)
try:
    result = ns["main"](**spec["args"])
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    print(json.dumps({"result": result}, default=repr))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def plain(source: str, args: dict | None = None, cwd: Any = None) -> Outcome:
    """Run ``source`` as an ordinary child process of the test: what an agent can do today."""
    done = subprocess.run([sys.executable, "-c", PLAIN], capture_output=True, text=True,
                          timeout=60, check=False, cwd=cwd,
                          input=json.dumps({"source": textwrap.dedent(source),
                                            "args": args or {}}))
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return Outcome(got.get("result"), got.get("error"), got.get("message", ""))


async def until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Wait until ``condition()`` holds (the child runs concurrently)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def run(source: str, args: dict | None = None, **options: Any) -> Outcome:
    """The Outcome of one sandboxed run of ``source`` (``forked=False``: not a fork)."""
    return asyncio.run(sandboxed(source, args, **options))
