"""Real failures mid-stream: an agent host SIGKILLed, then the kernel itself SIGKILLed.

Both run on a kernel of this module's own (its own name and state dir), so the
session's kernel stays healthy. This test is a process of that kernel too: it
deals 10,000 numbered messages out to 20 permanent consumers (top-level: the
kernel supervises them), each of which forwards every number back to it. A
consumer's forward is committed together with its acknowledgement of the
message it handled, so the numbers that come back are exactly the messages
whose handlers finished: all 10,000 must come back, in order per consumer,
none twice, whatever dies on the way.

The same two failures also strike a stream that never touched the kernel
before: agents of one host passing numbers among themselves, kept in their
host's journal (actors.agent_host, "Local delivery").
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid

import pytest
import ray
from checks import table, until
from workers import Num, counter, forwarder, hold_then_forward, idle, relay

from actors.driver import attach as attach_driver
from actors.runtime import AgentRuntime, current
from llmos_kernel.client import unwrap
from llmos_kernel.errors import Timeout, Unavailable
from syscalls import ipc, proc
from syscalls.proc import program_spec

MESSAGES = 10_000
CONSUMERS = 20
KILL_AFTER = 3_000  # numbers back before the kill
SILENT_S = 5.0  # this kernel's patience with a driver script that stops calling


class Driver:
    """This test as a process of the fault kernel, running coroutines on a loop of its own."""

    def __init__(self, handle, state_dir, name: str):
        self.handle, self.name, self.state_dir = handle, name, state_dir
        self.token = (state_dir / "root.token").read_text()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runtime = self.attach("fault-driver")

    def attach(self, name: str) -> AgentRuntime:
        """One more driver process, with a host of its own, on this loop."""
        async def attach() -> AgentRuntime:
            return await attach_driver(self.handle, self.token, name, default=False)
        return self._submit(attach(), 120)

    async def host_info(self, host: str) -> dict:
        """What agent host ``host`` says of itself (asked through the kernel: a host
        answers no one else)."""
        return unwrap(await self.handle.actors.remote(self.token))["hosts"][host]

    def _submit(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, coro, timeout: float = 300.0, *, runtime: AgentRuntime | None = None):
        """Run ``coro`` as this test's process (or as ``runtime``)."""
        async def as_driver():
            current.set(runtime or self.runtime)
            return await coro
        return self._submit(as_driver(), timeout)

    async def call(self, method: str, *args):
        """A driver-API call with the root token (from inside ``run``)."""
        return unwrap(await getattr(self.handle, method).remote(self.token, *args))

    def status(self) -> dict:
        return unwrap(ray.get(self.handle.status.remote(self.token), timeout=120))

    def close(self) -> None:
        async def stop_host():
            await self.runtime.host.stop()
            await asyncio.sleep(0)  # let the cancelled tasks finish
        self._submit(stop_host(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def fault_kernel(ray_session, model_path, tmp_path_factory):
    from llmos_kernel.engine.assembly import LLMConfig
    from llmos_kernel.kernel import KernelConfig
    from llmos_kernel.launcher import start_kernel

    state = tmp_path_factory.mktemp("fault-kernel")
    name = f"fault-kernel-{uuid.uuid4().hex[:6]}"
    handle = start_kernel(KernelConfig(
        state_dir=str(state), name=name, hosts=2,
        llm=LLMConfig(model=str(model_path), kv_budget="64MiB", swap_budget=0),
        driver_silent_s=SILENT_S), detached=False)
    driver = Driver(handle, state, name)
    yield driver
    driver.close()
    ray.kill(handle, no_restart=True)


async def _stream_through_consumers(driver: Driver, kill) -> tuple[list[int], dict]:
    """Send MESSAGES numbers, dealt round-robin to CONSUMERS new consumers, while collecting
    what each forwards; call ``kill(consumers)`` once KILL_AFTER numbers are back."""
    spec = {"program": program_spec(forwarder), "args": {"to": proc.pid()},
            "restart": {"restart": "permanent"}, "quotas": {"mailbox": MESSAGES}}
    consumers = [await driver.call("spawn", spec) for _ in range(CONSUMERS)]

    async def produce():
        for start in range(0, MESSAGES, 500):
            await asyncio.gather(*(ipc.send(consumers[n % CONSUMERS], Num(n))
                                   for n in range(start, start + 500)))

    producer = asyncio.create_task(produce())
    back: dict[int, list[int]] = {c: [] for c in consumers}
    for received in range(1, MESSAGES + 1):
        msg = await ipc.recv(type=Num, timeout=180)
        back[msg.sender].append(msg.body.n)
        if received == KILL_AFTER:
            await kill(consumers)
    await producer
    return consumers, back


def _check(consumers: list[int], back: dict[int, list[int]]) -> None:
    for i, consumer in enumerate(consumers):
        numbers = back[consumer]
        assert len(numbers) == len(set(numbers)), "a finished handler ran twice"
        assert numbers == sorted(numbers), "out of order"
        assert numbers == list(range(i, MESSAGES, CONSUMERS)), "messages were lost"


async def _settled(driver: Driver, consumers: list[int]) -> dict[int, dict]:
    rows = await until(lambda t: all(t[c]["status"] == "running" for c in consumers))
    for c in consumers:
        await driver.call("kill", c)
    return rows


def test_agent_host_sigkilled_mid_stream(fault_kernel):
    killed = {}

    async def kill_a_host(consumers: list[int]) -> None:
        host = (await table())[consumers[0]]["host"]
        info = await fault_kernel.host_info(host)
        killed.update(host=host, agents={c for c, p in (await table()).items()
                                         if p["host"] == host and c in consumers})
        os.kill(info["pid"], signal.SIGKILL)

    async def scenario():
        consumers, back = await _stream_through_consumers(fault_kernel, kill_a_host)
        return consumers, back, await _settled(fault_kernel, consumers)

    consumers, back, rows = fault_kernel.run(scenario())
    _check(consumers, back)
    assert {c: rows[c]["restarts"] for c in consumers} == {
        c: int(c in killed["agents"]) for c in consumers}, "the kernel restarted its agents"
    assert killed["host"] not in {rows[c]["host"] for c in consumers}
    assert killed["host"] not in fault_kernel.status()["processes"]["shared_hosts"]


def test_a_driver_script_that_goes_silent_exits_with_its_children(fault_kernel):
    """A script that stops calling (it exited or crashed without a word) is noticed: its
    process exits with reason "gone" and the children it supervised are stopped."""
    silent = fault_kernel.attach("silent-driver")
    child = fault_kernel.run(proc.spawn(idle), runtime=silent)
    fault_kernel._submit(silent.host.stop(), 30)

    async def scenario():
        return await until(lambda t: t[silent.pid]["status"] == t[child]["status"] == "exited",
                           timeout=SILENT_S + 30, what="the silent driver to be reaped")

    rows = fault_kernel.run(scenario())
    assert rows[silent.pid]["exit"]["reason"] == "gone"
    assert rows[child]["exit"]["reason"] == "shutdown"
    assert rows[fault_kernel.runtime.pid]["status"] == "running", "a driver that polls stays"


def test_kernel_sigkilled_mid_stream(fault_kernel):
    before = fault_kernel.status()

    async def kill_the_kernel(consumers: list[int]) -> None:
        os.kill(before["pid"], signal.SIGKILL)

    async def scenario():
        consumers, back = await _stream_through_consumers(fault_kernel, kill_the_kernel)
        return consumers, back, await _settled(fault_kernel, consumers)

    consumers, back, rows = fault_kernel.run(scenario())
    after = fault_kernel.status()
    _check(consumers, back)
    assert after["pid"] != before["pid"], "Ray restarted the kernel in a new process"
    assert {rows[c]["restarts"] for c in consumers} == {1}, "the kernel restarted them all"


LOCAL = 2_000  # numbers passed among the agents of one host


async def _local_stream(driver: Driver, kill) -> tuple[list[int], dict, dict]:
    """On one host: a counter sends LOCAL numbers to a slow relay, which passes each on to a
    holder that handles nothing until it is restarted. ``kill()`` strikes with the numbers
    spread over both mailboxes; then the holder, restarted, forwards all it got to this
    test."""
    start = await driver.call("status")
    host = start["processes"]["shared_hosts"][0]
    permanent = {"restart": {"restart": "permanent"}, "quotas": {"mailbox": 2 * LOCAL},
                 "host": host}
    holder = await driver.call("spawn", {"program": program_spec(hold_then_forward),
                                         "args": {"to": proc.pid()}, **permanent})
    relayer = await driver.call("spawn", {"program": program_spec(relay),
                                          "args": {"to": holder, "pause": 0.002}, **permanent})
    sender = await driver.call("spawn", {"program": program_spec(counter), "host": host,
                                         "args": {"to": relayer, "count": LOCAL}})
    assert (await proc.wait(sender, timeout=120))["result"] == LOCAL
    await asyncio.sleep(1.0)  # the relay is a few hundred numbers in
    before = (await driver.call("status"))["ipc"]
    before["sent"] -= start["ipc"]["sent"]
    await kill(host)
    for _ in range(120):  # calls made while the kernel restarts fail with Unavailable
        try:
            rows = await until(lambda t: all(t[p]["status"] == "running" and
                                             t[p]["restarts"] == 1 for p in (holder, relayer)),
                               timeout=120)
            break
        except Unavailable:
            await asyncio.sleep(1.0)
    got: list[int] = []
    try:
        while len(got) < LOCAL:
            got.append((await ipc.recv(type=Num, sender=holder, timeout=180)).body.n)
    except Timeout:
        status = await driver.call("status")
        left = sorted(p.name for p in (driver.state_dir / "journals").glob("*.db"))
        raise AssertionError(f"{len(got)} of {LOCAL} numbers came back (last {got[-3:]}); "
                             f"kernel ipc {status['ipc']}; journals left {left}; "
                             f"{ {p: rows[p] for p in (holder, relayer)} }") from None
    for p in (holder, relayer):
        await driver.call("kill", p)
    status = await driver.call("status")
    after = status["ipc"]
    if status["pid"] == start["pid"]:  # the same kernel: count from the start
        after["taken_over"] -= start["ipc"]["taken_over"]
    return got, before, {**after, "rows": rows}


def _check_local(got: list[int], before: dict, after: dict) -> None:
    assert len(got) == len(set(got)), "a finished handler ran twice"
    assert got == list(range(LOCAL)), "lost or out of order"
    assert before["sent"] < LOCAL // 2, "the numbers did not stay on their host"
    assert after["taken_over"] > 0, "the kernel took nothing over from the host's journal"


def test_agent_host_sigkilled_mid_local_stream(fault_kernel):
    async def kill_the_host(host: str) -> None:
        info = await fault_kernel.host_info(host)
        os.kill(info["pid"], signal.SIGKILL)

    got, before, after = fault_kernel.run(_local_stream(fault_kernel, kill_the_host))
    _check_local(got, before, after)


def test_kernel_sigkilled_mid_local_stream(fault_kernel):
    async def kill_the_kernel(host: str) -> None:
        os.kill((await fault_kernel.call("status"))["pid"], signal.SIGKILL)

    got, before, after = fault_kernel.run(_local_stream(fault_kernel, kill_the_kernel))
    _check_local(got, before, after)
