"""What the sandbox costs: a syscall's round trip through the relay against the same call
made in-process, and the time to start a sandboxed child.

    .venv/bin/python tests/security/bench_sandbox.py [--calls 3000] [--spawns 10]

Both syscall paths end at the same fake host (``FakeHost.call``), so the difference is the
relay alone: encode a frame in the child, the socket, decode and dispatch in the host,
and the answer back. In a real host each call then crosses Ray to the kernel and back
(about 4 ms blocking, DESIGN.md), which both paths pay alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from actors.runtime import AgentRuntime, current
from actors.sandbox import Sandbox, launch
from llmos_kernel import wire
from security.harness import FakeHost, program

WORKLOAD = """
import asyncio, time
from syscalls import _context

async def main(calls, pipelined):
    await _context.call("bench.echo", n=0)  # warm
    began = time.perf_counter()
    for i in range(calls):
        await _context.call("bench.echo", n=i)
    sequential = (time.perf_counter() - began) / calls
    began = time.perf_counter()
    await asyncio.gather(*(_context.call("bench.echo", n=i) for i in range(pipelined)))
    return {"sequential_s": sequential, "pipelined_per_s": pipelined / (time.perf_counter() - began)}
"""


class InProcessHost:
    """An in-process host that hands each syscall to the same fake host, as AgentHost hands
    it to its kernel link (arguments encoded for the wire, the result unwrapped)."""

    host_id = "bench"

    def __init__(self, fake: FakeHost):
        self.fake = fake

    async def syscall(self, agent: AgentRuntime, name: str, args: dict):
        wire.encode_args(args)
        return wire.unwrap(await self.fake.call(name, args, agent.handling))


async def in_process(calls: int, pipelined: int) -> dict:
    namespace: dict = {}
    exec(compile(WORKLOAD, "workload", "exec"), namespace)  # noqa: S102 - the benchmark's own code
    agent = AgentRuntime(InProcessHost(bench_host()), 7, "cap")
    ctx = contextvars.copy_context()
    ctx.run(current.set, agent)
    return await asyncio.get_running_loop().create_task(
        namespace["main"](calls, pipelined), context=ctx)


async def sandboxed(calls: int, pipelined: int) -> tuple[dict, int]:
    box = Sandbox(bench_host(), 7, program(WORKLOAD), {"calls": calls, "pipelined": pipelined})
    await box.start()
    rss = _rss_kb(box.process.pid)
    report = await box.wait()
    assert report.reason == "normal", report.error
    return report.result, rss


def bench_host() -> FakeHost:
    host = FakeHost({"bench.echo": lambda args: args})
    host.calls = _Discard()  # keep no record of thousands of calls
    return host


class _Discard(list):
    def append(self, item) -> None:
        pass


async def spawn_times(spawns: int, spare: bool) -> dict:
    """Median seconds from ``start`` to confined and to the program's first syscall, for a
    cold child or a ``launch``-ed spare that had time to import the runtime."""
    ready, first_call = [], []
    for _ in range(spawns):
        called = asyncio.Event()
        host = FakeHost({"bench.hello": lambda args, called=called: called.set()})
        box = Sandbox(host, 7, program("""
            from syscalls import _context
            async def main():
                await _context.call("bench.hello")
        """))
        waiting = None
        if spare:
            waiting = launch()
            await asyncio.sleep(2.0)
        began = time.perf_counter()
        await box.start(waiting)
        ready.append(time.perf_counter() - began)
        await called.wait()
        first_call.append(time.perf_counter() - began)
        await box.wait()
    return {"ready": sorted(ready)[len(ready) // 2],
            "first_call": sorted(first_call)[len(first_call) // 2]}


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def bare_python_s(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-B", "-c", "pass"], check=True)
        times.append(time.perf_counter() - began)
    return sorted(times)[runs // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--pipelined", type=int, default=1000)
    parser.add_argument("--spawns", type=int, default=10)
    opts = parser.parse_args()
    base = asyncio.run(in_process(opts.calls, opts.pipelined))
    boxed, rss = asyncio.run(sandboxed(opts.calls, opts.pipelined))
    cold = asyncio.run(spawn_times(opts.spawns, spare=False))
    warm = asyncio.run(spawn_times(opts.spawns, spare=True))
    print(f"machine: {os.cpu_count()} cores; {opts.calls} sequential calls, "
          f"{opts.pipelined} pipelined")
    print(f"{'':28}{'in-process':>14}{'sandboxed':>14}{'ratio':>8}")
    a, b = base["sequential_s"] * 1e6, boxed["sequential_s"] * 1e6
    print(f"{'round trip (us)':28}{a:14.1f}{b:14.1f}{b / a:8.1f}")
    a, b = base["pipelined_per_s"], boxed["pipelined_per_s"]
    print(f"{'pipelined calls/s':28}{a:14.0f}{b:14.0f}{a / b:8.1f}")
    print(f"relay cost per call: {(boxed['sequential_s'] - base['sequential_s']) * 1e6:.0f} us; "
          f"against a 4 ms kernel round trip: x{1 + (boxed['sequential_s'] - base['sequential_s']) / 4e-3:.3f}")
    print(f"spawn (median of {opts.spawns}){'':9}{'confined':>14}{'1st syscall':>14}")
    for label, t in (("cold: exec, imports, confine", cold), ("from a launched spare", warm)):
        print(f"{label:28}{t['ready'] * 1e3:11.0f} ms{t['first_call'] * 1e3:11.0f} ms")
    print(f"for scale, a bare `python -I -c pass`: {bare_python_s() * 1e3:.0f} ms")
    print(f"child RSS while running: {rss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
