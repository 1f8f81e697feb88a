"""The kernel side of the host channel, served from fake services (no Ray, no model).

The channel is given its ``Services`` explicitly, so these tests hand it small fakes for
the process manager, IPC and LLM and drive it with real encoded batches.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from llmos_kernel import wire
from llmos_kernel.host_channel import HostChannel
from llmos_kernel.outbox import Outboxes
from llmos_kernel.proctable import Process
from llmos_kernel.services.registry import Services

ROOT = "root-token"


@dataclass
class HostInfo:  # the fields of processes.HostInfo the channel uses
    host_id: str
    handle: object
    secret: str
    seen: float = 0.0
    polling: int = 0


class FakeTable:
    def __init__(self, procs: list[tuple[Process, str]]):
        self.procs = {p.pid: p for p, _ in procs}
        self.caps = {cap: p for p, cap in procs}

    def by_capability(self, capability):
        return self.caps.get(capability) if isinstance(capability, str) else None


class FakeProcs:
    def __init__(self, hosts: dict[str, str]):
        self.hosts = {h: HostInfo(h, None, secret) for h, secret in hosts.items()}
        self.exits: list[tuple[int, dict]] = []

    def register_driver_host(self, host_id, secret):
        self.hosts.setdefault(host_id, HostInfo(host_id, None, secret))

    def check_host(self, host_id, secret):
        from llmos_kernel.errors import PermissionDenied

        info = self.hosts.get(host_id)
        if info is None or info.secret != secret:
            raise PermissionDenied(f"unknown host {host_id!r} or bad host secret")
        return info

    def exited(self, pid, report):
        self.exits.append((pid, report))


class FakeIPC:
    def __init__(self):
        self.commits, self.fail_commit = 0, False

    def commit(self):
        if self.fail_commit:
            raise OSError("disk full")
        self.commits += 1

    def ack(self, proc, msg_id, reply):
        return None

    def reject(self, pid, handling, why):
        pass


class FakeMemory:
    def __init__(self):
        self.release = asyncio.Event()

    async def embed(self, texts):
        await self.release.wait()
        return [[float(len(t))] for t in texts]


class FakeLLM:
    def tokenize(self, text):
        return [ord(c) for c in text]


@pytest.fixture
def world(tmp_path: Path):
    a = Process(pid=1, program={"kind": "module"}, host="host-a", status="running")
    b = Process(pid=2, program={"kind": "module"}, host="host-b", status="running")
    services = Services(table=FakeTable([(a, "cap-a"), (b, "cap-b")]), outboxes=Outboxes(),
                        procs=FakeProcs({"host-a": "secret-a", "host-b": "secret-b"}),
                        ipc=FakeIPC(), fs=None, tools=None, agent_tools=None, llm=FakeLLM(),
                        memory=FakeMemory(), approvals=None, log_dir=tmp_path)
    return services, HostChannel(services, ROOT)


def op(call, cap, name, args, handling=None):
    return msgspec.msgpack.encode([call, cap, name, args, handling])


async def send(channel, ops, host="host-a", secret="secret-a", seq=0, exits=(), logs=None):
    data = msgspec.msgpack.encode([channel.epoch, seq, [msgspec.Raw(o) for o in ops],
                                   list(exits), logs or {}])
    return wire.decode_answer(await channel.batch(host, data, secret))


def results(answer):
    return {call: wire.decode_result(raw) for call, raw in answer.results.items()}


def test_a_call_is_served_as_the_holder_of_its_capability(world):
    _, channel = world
    answer = asyncio.run(send(channel, [op("c1", "cap-a", "proc.self", {}),
                                        op("c2", "forged", "proc.self", {}),
                                        op("c3", "cap-b", "proc.self", {})]))
    got = results(answer)
    assert got["c1"].ok["pid"] == 1
    assert got["c2"].error.type == "PermissionDenied" and "not valid" in got["c2"].error.message
    assert got["c3"].error.type == "PermissionDenied" and "does not run on host" in \
        got["c3"].error.message


def test_a_bad_secret_or_a_malformed_batch_is_refused_whole(world):
    _, channel = world
    refused = asyncio.run(send(channel, [op("c1", "cap-a", "proc.self", {})], secret="guess"))
    assert refused.error.type == "PermissionDenied" and refused.results == {}
    malformed = wire.decode_answer(asyncio.run(channel.batch("host-a", b"\x93\x01", "secret-a")))
    assert malformed.error.type == "InvalidArgument"


def test_a_malformed_call_gets_its_own_error_and_the_rest_are_served(world):
    _, channel = world
    got = results(asyncio.run(send(channel, [op("c1", "cap-a", 7, {}),
                                             op("c2", "cap-a", "llm.tokenize", {"text": "hi"}),
                                             op("c3", "cap-a", "llm.tokenize", ["not", "a dict"]),
                                             op("c4", "cap-a", "no.such", {})])))
    assert got["c1"].error.type == "InvalidArgument"
    assert got["c2"].ok == [104, 105]
    assert got["c3"].error.type == "InvalidArgument"
    assert got["c4"].error.type == "NotFound"


def test_a_slow_call_answers_pending_then_arrives_as_a_reply_item(world):
    services, channel = world

    async def scenario():
        first = results(await send(channel, [op("c1", "cap-a", "llm.embed",
                                                {"texts": ["abc"]})]))
        services.memory.release.set()
        chunk = wire.decode_answer(await channel.poll("host-a", 5.0, "secret-a")).out
        return first, chunk

    first, chunk = asyncio.run(scenario())
    assert first["c1"].pending
    (reply,) = chunk.items
    assert isinstance(reply, wire.Reply) and reply.call == "c1"
    assert wire.unwrap(wire.decode_result(reply.result)) == [[3.0]]


def test_batches_run_in_the_order_of_their_numbers(world):
    _, channel = world

    async def scenario():
        later = asyncio.ensure_future(send(channel, [op("c2", "cap-a", "ipc.ack", {"id": "m"})],
                                           seq=1))
        await asyncio.sleep(0.05)
        assert not later.done()  # batch 1 waits for batch 0
        await send(channel, [op("c1", "cap-a", "ipc.ack", {"id": "n"})], seq=0)
        return await later

    assert "c2" in asyncio.run(scenario()).results


def test_a_batch_for_another_kernel_instance_is_told_to_resync(world):
    _, channel = world
    data = msgspec.msgpack.encode(["old-epoch", 0, [], [], {}])
    answer = wire.decode_answer(asyncio.run(channel.batch("host-a", data, "secret-a")))
    assert answer.resync == channel.epoch and answer.results == {}


def test_when_the_commit_fails_the_staged_calls_hear_unavailable(world):
    services, channel = world
    services.ipc.fail_commit = True
    got = results(asyncio.run(send(channel, [op("c1", "cap-a", "ipc.ack", {"id": "m"}),
                                             op("c2", "cap-a", "proc.self", {})])))
    assert got["c1"].error.type == "Unavailable" and "disk full" in got["c1"].error.message
    assert got["c2"].ok["pid"] == 1  # not staged: its answer stands


def test_a_host_reports_exits_and_output_only_for_its_own_agents(world, tmp_path):
    services, channel = world
    exits = [[1, "normal", 42, None, None], [2, "normal", 0, None, None]]
    asyncio.run(send(channel, [], exits=exits, logs={1: "mine\n", 2: "not mine\n"}))
    assert services.procs.exits == [(1, {"reason": "normal", "result": 42, "error": None})]
    assert (tmp_path / "1.log").read_text() == "mine\n"
    assert not (tmp_path / "2.log").exists()


def test_the_root_token_makes_a_driver_host(world):
    services, channel = world
    asyncio.run(send(channel, [], host="driver-x", secret=ROOT))
    assert "driver-x" in services.procs.hosts
