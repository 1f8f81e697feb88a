"""``llmos bench ipc``: processes and messages, beside raw Ray actor calls in the same run.

Measured, in one run on one kernel with two shared agent hosts:

- spawn rate: ``agents`` idle agents spawned at once, until their hosts run them all;
  memory per idle agent is the hosts' RSS growth divided by the agents;
- ping-pong: ``pairs`` pinger/ponger pairs at once, ``messages`` round trips each,
  both agents on one host (local) or on different hosts (cross); a message is one
  ping or one pong, each durably committed before its sender hears ok (local: in
  the host's journal, without a kernel round trip; cross: in the kernel's store);
- the baseline: the same ping-pong between two plain Ray async actors, where each
  message is one actor call its sender awaits (``ray_calls_per_s`` = calls/s).

Latencies are ping-pong round trips (two messages) under that load.

With ``sandbox``, the same measures for sandboxed agents beside unsandboxed ones, at a size
a machine runs as child processes (``sandbox_agents`` agents, ``sandbox_pairs`` pairs):
spawn rate to running (each agent says so in a message), one syscall's round trip
(``proc.self``, kernel and back), and the ping-pong's round trip across hosts. The round
trips are taken in ``sandbox_rounds`` rounds, plain and sandboxed in turn, the first of
the two alternating (ABBA...), each measure once the machine has settled (what the one
before left running, its processes exiting and their reports, otherwise slows whichever
comes second); quantiles are over every round's round trips, and each round's p50 ratio
is reported too.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray

from llmos_kernel.messages import message
from syscalls import ipc, proc

SETTLE_S = 5.0  # longest a sandbox measure waits for the machine to settle
SETTLED_CORES = 0.25  # CPU use (in cores) below which it has


@message(name="bench.Ping")
class Ping:
    n: int


async def idle() -> None:
    """An agent that waits for a message that never comes."""
    await ipc.recv()


class Ponger:
    """Answers every Ping with the next number (its answer leaves with the handler's ack)."""

    def on_message(self, msg: ipc.Message) -> Ping:
        return Ping(msg.body.n + 1)


async def ready(driver: int) -> None:
    """Tells ``driver`` it runs, then waits."""
    await ipc.send(driver, {"ready": proc.pid()})
    await ipc.recv()


async def syscaller(count: int, start_at: float = 0.0) -> list[float]:
    """From ``start_at`` (epoch s), ``count`` syscalls one after another; each one's time."""
    await asyncio.sleep(max(start_at - time.time(), 0.0))
    rtts = []
    for _ in range(count):
        sent = time.perf_counter()
        await proc.self()
        rtts.append(time.perf_counter() - sent)
    return rtts


async def pinger(peer: int, count: int, start_at: float = 0.0) -> dict:
    """From ``start_at`` (epoch s), ``count`` round trips with ``peer``: each round trip
    is one ``ipc.call``; returns the wall-clock span, each round trip's time, and how many
    answers were not the one their ping asked for (the next number)."""
    await asyncio.sleep(max(start_at - time.time(), 0.0))
    rtts, wrong = [], 0
    start = time.time()
    for i in range(count):
        sent = time.perf_counter()
        answer = await ipc.call(peer, Ping(i))
        rtts.append(time.perf_counter() - sent)
        wrong += answer.body.n != i + 1
    return {"start": start, "end": time.time(), "rtts": rtts, "wrong": wrong}


class RayPeer:
    """One side of the baseline: every message is an awaited call on the other actor."""

    def __init__(self) -> None:
        self.peer = None
        self.waiting: dict[int, asyncio.Future] = {}

    def connect(self, peer) -> None:
        self.peer = peer

    async def ping(self, pair: int, n: int) -> None:
        await self.peer.pong.remote(pair, n + 1)

    async def pong(self, pair: int, n: int) -> None:
        self.waiting.pop(pair).set_result(n)

    async def run(self, pairs: int, count: int) -> dict:
        async def one(pair: int) -> list[float]:
            rtts = []
            for i in range(count):
                sent = time.perf_counter()
                answered = self.waiting[pair] = asyncio.get_running_loop().create_future()
                await self.peer.ping.remote(pair, i)
                await answered
                rtts.append(time.perf_counter() - sent)
            return rtts

        start = time.perf_counter()
        rtts = await asyncio.gather(*(one(p) for p in range(pairs)))
        return {"elapsed": time.perf_counter() - start, "rtts": [r for rs in rtts for r in rs]}


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def ray_baseline(pairs: int, count: int) -> dict:
    """Calls per second and round trips of the Ray ping-pong."""
    actor = ray.remote(RayPeer).options(num_cpus=0, max_concurrency=10_000)
    a, b = actor.remote(), actor.remote()
    ray.get([a.connect.remote(b), b.connect.remote(a)])
    ray.get(a.run.remote(2, 20))  # warm up both processes
    out = ray.get(a.run.remote(pairs, count))
    for handle in (a, b):
        ray.kill(handle)
    return {"ray_calls_per_s": 2 * pairs * count / out["elapsed"],
            "ray_lat_p50_s": _quantile(out["rtts"], 0.5),
            "ray_lat_p99_s": _quantile(out["rtts"], 0.99)}


async def _hosts(client) -> list[str]:
    status = await client.call("status")
    return status["processes"]["shared_hosts"]


async def _host_info(client, host_ids: list[str]) -> list[dict]:
    hosts = (await client.call("actors"))["hosts"]
    return [hosts[h] for h in host_ids]


async def spawn_idle(client, agents: int) -> dict:
    """Spawn ``agents`` idle agents at once; time until their hosts run them all."""
    hosts = await _hosts(client)
    before = await _host_info(client, hosts)
    start = time.perf_counter()
    pids = await asyncio.gather(*(proc.spawn(idle) for _ in range(agents)))
    while sum(i["agents"] for i in await _host_info(client, hosts)) < sum(
            i["agents"] for i in before) + agents:
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - start
    after = await _host_info(client, hosts)
    alive = sum(1 for p in await proc.ps() if p["pid"] in set(pids) and p["status"] == "running")
    rss = sum(i["rss_bytes"] for i in after) - sum(i["rss_bytes"] for i in before)
    return {"pids": pids, "spawn_s": elapsed, "spawn_per_s": agents / elapsed,
            "agents_alive": alive, "bytes_per_idle_agent": rss / agents}


async def ping_pong(pairs: int, count: int, hosts: tuple[str, str],
                    sandbox: bool = False) -> dict:
    """``pairs`` pinger/ponger pairs, pinger on hosts[0] and ponger on hosts[1], all
    starting together once every one of them is spawned."""
    pongers = await asyncio.gather(*(proc.spawn(Ponger, host=hosts[1], sandbox=sandbox)
                                     for _ in range(pairs)))
    start_at = time.time() + 1.0 + pairs / 500 + (pairs / 4 if sandbox else 0)
    pingers = await asyncio.gather(*(
        proc.spawn(pinger, {"peer": p, "count": count, "start_at": start_at}, host=hosts[0],
                   sandbox=sandbox)
        for p in pongers))
    results = [(await proc.wait(p))["result"] for p in pingers]
    await asyncio.gather(*(proc.kill(p) for p in pongers))
    rtts = [r for res in results for r in res["rtts"]]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"msgs_per_s": 2 * pairs * count / span, "lat_p50_s": _quantile(rtts, 0.5),
            "lat_p99_s": _quantile(rtts, 0.99), "span_s": span, "round_trips": len(rtts),
            "wrong_replies": sum(r["wrong"] for r in results), "rtts": rtts}


async def _measure(client, agents: int, messages: int, pairs: int,
                   progress: Callable[[str], None]) -> dict:
    hosts = await _hosts(client)
    progress(f"spawning {agents} idle agents")
    spawned = await spawn_idle(client, agents)
    progress(f"{spawned['agents_alive']} alive after {spawned['spawn_s']:.2f} s; "
             f"ping-pong, {pairs} pairs x {messages} round trips, one host")
    local = await ping_pong(pairs, messages, (hosts[0], hosts[0]))
    progress("ping-pong across hosts")
    cross = await ping_pong(pairs, messages, (hosts[0], hosts[1]))
    await asyncio.gather(*(proc.kill(p) for p in spawned.pop("pids")))
    return {**spawned, "msgs_per_s_local": local["msgs_per_s"],
            "msgs_per_s_cross": cross["msgs_per_s"],
            "lat_p50_s": cross["lat_p50_s"], "lat_p99_s": cross["lat_p99_s"],
            "lat_local_p50_s": local["lat_p50_s"], "lat_local_p99_s": local["lat_p99_s"],
            "round_trips": local["round_trips"] + cross["round_trips"],
            "wrong_replies": local["wrong_replies"] + cross["wrong_replies"]}


async def spawn_ready(agents: int, sandbox: bool) -> float:
    """Seconds from spawning ``agents`` at once until each has said it runs."""
    start = time.perf_counter()
    pids = await asyncio.gather(*(proc.spawn(ready, {"driver": proc.pid()}, sandbox=sandbox)
                                  for _ in range(agents)))
    for _ in pids:
        await ipc.recv(timeout=300)
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(proc.kill(p) for p in pids))
    return elapsed


async def syscall_rtts(agents: int, count: int, sandbox: bool) -> list[float]:
    """``agents`` agents at once, ``count`` syscalls each: every round trip."""
    start_at = time.time() + 1.0 + (agents / 4 if sandbox else 0)
    pids = await asyncio.gather(*(proc.spawn(syscaller, {"count": count, "start_at": start_at},
                                             sandbox=sandbox) for _ in range(agents)))
    return [r for p in pids for r in (await proc.wait(p))["result"]]


def _cpu_ticks() -> tuple[int, int] | None:
    """This machine's (busy, all) CPU ticks so far, or None where /proc/stat is not."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # less idle and iowait


async def settle(most_s: float, quiet_cores: float = SETTLED_CORES) -> bool:
    """Wait, up to ``most_s``, until this machine uses under ``quiet_cores`` cores over a
    fifth of a second: what the last measure left running (processes exiting, their
    reports) must not weigh on the next. False if it never did."""
    deadline = time.monotonic() + most_s
    while True:
        before = _cpu_ticks()
        await asyncio.sleep(0.2)
        after = _cpu_ticks()
        if before is None or after is None:
            return True
        busy = (after[0] - before[0]) / max(after[1] - before[1], 1) * (os.cpu_count() or 1)
        if busy < quiet_cores:
            return True
        if time.monotonic() > deadline:
            return False


async def sandboxed_vs_not(client, agents: int, messages: int, pairs: int, rounds: int,
                           progress: Callable[[str], None],
                           settle_s: float = SETTLE_S) -> tuple[dict, dict]:
    """The sandbox's measures, each beside the same without it: spawn rate once each, round
    trips in ``rounds`` rounds of both, which goes first alternating, each measure after
    the machine settles (``settle``, at most ``settle_s``); and how many ping-pong round
    trips were made and answered wrongly."""
    hosts = await _hosts(client)
    out: dict = {}
    rtts: dict = {(key, what): [] for key in ("plain", "sbx") for what in ("syscall", "pingpong")}
    ratios: dict = {"syscall": [], "pingpong": []}
    checked = {"round_trips": 0, "wrong_replies": 0}
    unsettled = 0
    for sandbox in (False, True):
        key = "sbx" if sandbox else "plain"
        progress(f"{'sandboxed' if sandbox else 'unsandboxed'}: {agents} agents to running")
        unsettled += not await settle(settle_s)  # the agents killed before, say
        out[f"{key}_spawn_per_s"] = agents / await spawn_ready(agents, sandbox)
    for r in range(rounds):
        p50: dict = {}
        for sandbox in ((False, True) if r % 2 == 0 else (True, False)):
            key = "sbx" if sandbox else "plain"
            progress(f"round {r + 1} of {rounds}, {'sandboxed' if sandbox else 'unsandboxed'}: "
                     f"{pairs} x {messages} syscalls, {pairs} ping-pong pairs")
            unsettled += not await settle(settle_s)
            syscall_times = await syscall_rtts(pairs, messages, sandbox)
            unsettled += not await settle(settle_s)
            pong = await ping_pong(pairs, messages, (hosts[0], hosts[1]), sandbox=sandbox)
            rtts[key, "syscall"] += syscall_times
            rtts[key, "pingpong"] += pong["rtts"]
            for field in checked:
                checked[field] += pong[field]
            p50[key, "syscall"] = _quantile(syscall_times, 0.5)
            p50[key, "pingpong"] = pong["lat_p50_s"]
        for what, each in ratios.items():
            each.append(p50["sbx", what] / p50["plain", what])
    for (key, what), values in rtts.items():
        out[f"{key}_{what}_p50_s"] = _quantile(values, 0.5)
        out[f"{key}_{what}_p99_s"] = _quantile(values, 0.99)
    out.update(syscall_p50_ratios=ratios["syscall"], pingpong_p50_ratios=ratios["pingpong"],
               unsettled_measures=unsettled)
    return out, checked


def run(*, agents: int = 1000, messages: int = 60, pairs: int = 300, kernel: str | None = None,
        state_dir: str | None = None, model: str | None = None, sandbox: bool = False,
        sandbox_agents: int = 16, sandbox_pairs: int = 4, sandbox_rounds: int = 4,
        progress: Callable[[str], None] = lambda m: None) -> dict:
    """Run the benchmark against kernel ``kernel``, or a kernel of its own on a local Ray."""
    import syscalls
    from llmos_kernel.client import KernelClient

    own = kernel is None
    if own:
        handle, kernel, state_dir = _own_kernel(model, progress)
    client = KernelClient.connect(kernel, state_dir=state_dir)

    async def main() -> dict:
        await syscalls.attach("bench-ipc", kernel=kernel, state_dir=state_dir)
        result = await _measure(client, agents, messages, pairs, progress)
        if sandbox:
            measured, checked = await sandboxed_vs_not(client, sandbox_agents, messages,
                                                       sandbox_pairs, sandbox_rounds, progress)
            result.update(measured)
            for field, n in checked.items():  # every ping-pong's replies are checked
                result[field] += n
        return result

    try:
        result = asyncio.run(main())
        progress("baseline: plain Ray async actors")
        result.update(ray_baseline(pairs, messages))
    finally:
        if own:
            ray.get(handle.shutdown.remote(client.token))
            ray.kill(handle)
    result.update(agents=agents, pairs=pairs, messages=messages)
    return result


def _own_kernel(model: str | None, progress: Callable[[str], None]):
    from llmos_kernel import store
    from llmos_kernel.core.options import KernelOptions
    from llmos_kernel.engine.assembly import LLMConfig
    from llmos_kernel.kernel import KernelConfig
    from llmos_kernel.launcher import start_kernel
    from llmos_kernel.paths import NAMESPACE

    progress("starting a local Ray and a kernel")
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    state = Path(tempfile.mkdtemp(prefix="llmos-bench-ipc-"))
    name = f"bench-ipc-{int(time.time())}"
    handle = start_kernel(KernelConfig(
        state_dir=str(state), name=name, hosts=2,
        llm=LLMConfig(model=model or store.DEFAULT_MODEL, kv_budget="64MiB", swap_budget=0,
                      kernels=KernelOptions.from_env())),
        detached=False)
    return handle, name, str(state)
