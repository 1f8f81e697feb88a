"""A host's link to the kernel, against a fake kernel that answers with real wire bytes.

The fake decodes each batch as the kernel does and answers from a script, so these tests
show the host's side of the protocol: calls resolved from results, pending calls from a
later Reply, retries of idempotent calls after the kernel went away, resync, chunks
applied in order, and output that cannot be encoded never costing an exit report.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from actors.host_transport import KernelLink
from llmos_kernel import wire
from llmos_kernel.errors import NotFound


class Lost(Exception):
    """What this fake raises when 'the kernel is unreachable'."""


@dataclass
class FakeKernel:
    """Answers each batch with ``answer(batch)``; polls wait for ``items`` to be pushed."""

    answer: object = None
    batches: list[wire.HostBatch] = field(default_factory=list)
    polls: asyncio.Queue = field(default_factory=asyncio.Queue)
    handed_out: int = 0

    def __post_init__(self):
        kernel = self

        class Method:
            def __init__(self, fn):
                self.remote = fn

        async def host_batch(host_id, data, token):
            batch = wire.decode_batch(data)
            kernel.batches.append(batch)
            result = kernel.answer(batch)
            if isinstance(result, Exception):
                raise result
            return wire.encode(result)

        async def host_poll(host_id, timeout, token):
            items = await kernel.polls.get()
            chunk = wire.Chunk("epoch-1", kernel.handed_out, items)
            kernel.handed_out += len(items)
            return wire.encode(wire.Answer(out=chunk))

        self.host_batch, self.host_poll = Method(host_batch), Method(host_poll)


def ops_of(batch: wire.HostBatch) -> list[wire.Syscall]:
    return [wire.decode_syscall(raw) for raw in batch.ops]


def answer_ok(batch: wire.HostBatch) -> wire.Answer:
    results = {op.call: wire.encode_result(wire.ok(op.name)) for op in ops_of(batch)
               if op.call}
    return wire.Answer(results, wire.Chunk("epoch-1", 0, []))


async def linked(kernel: FakeKernel) -> KernelLink:
    """A started link whose items go where AgentHost sends them: a Reply to its call."""
    def dispatch(item: wire.Item) -> None:
        if isinstance(item, wire.Reply):
            link.resolve(item.call, wire.decode_result(item.result))

    link = KernelLink(kernel, "host-1", "secret", dispatch, lambda: None, lost=(Lost,))
    link.start()
    return link


def test_calls_are_batched_and_resolved_from_their_results():
    async def scenario():
        kernel = FakeKernel(answer_ok)
        link = await linked(kernel)
        futures = [link.call("cap", name, {"i": i}) for i, name in
                   enumerate(["fs.read", "proc.self", "llm.count"])]
        link.cast("cap", "ipc.ack", {"id": "m1"})
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
        link.stop()
        return kernel, results

    kernel, results = asyncio.run(scenario())
    assert [r.ok for r in results] == ["fs.read", "proc.self", "llm.count"]
    sent = [op for b in kernel.batches for op in ops_of(b)]
    assert [op.name for op in sent] == ["fs.read", "proc.self", "llm.count", "ipc.ack"]
    assert [wire.decode_args(op.args) for op in sent][:3] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert sent[-1].call == ""  # nobody waits for a plain ack


def test_a_pending_call_is_resolved_by_a_later_reply_item():
    async def scenario():
        def pending(batch):
            return wire.Answer({op.call: wire.encode_result(wire.PENDING)
                                for op in ops_of(batch)}, wire.Chunk("epoch-1", 0, []))

        kernel = FakeKernel(pending)
        link = await linked(kernel)
        future = link.call("cap", "proc.wait", {"pid": 3})
        await asyncio.sleep(0.05)
        assert not future.done()
        call = ops_of(kernel.batches[0])[0].call
        await kernel.polls.put([wire.Reply(call, wire.encode_result(wire.ok({"reason": "x"})))])
        result = await asyncio.wait_for(future, 5)
        link.stop()
        return result

    assert asyncio.run(scenario()).ok == {"reason": "x"}


def test_when_the_kernel_is_lost_idempotent_calls_go_again_in_order_and_others_fail():
    async def scenario():
        tries = iter([Lost("gone"), None])

        def flaky(batch):
            return next(tries) or answer_ok(batch)

        kernel = FakeKernel(flaky)
        link = await linked(kernel)
        first = link.call("cap", "ipc.send", {"n": 1})
        other = link.call("cap", "fs.write", {"path": "x"})
        second = link.call("cap", "ipc.send", {"n": 2})
        results = await asyncio.wait_for(asyncio.gather(first, other, second), 10)
        link.stop()
        return kernel, results

    kernel, (first, other, second) = asyncio.run(scenario())
    assert first.ok == second.ok == "ipc.send"
    assert other.error.type == "Unavailable" and "may or may not" in other.error.message
    again = ops_of(kernel.batches[1])
    assert [wire.decode_args(op.args) for op in again] == [{"n": 1}, {"n": 2}]


def test_a_resync_renumbers_and_sends_the_same_batch_again():
    async def scenario():
        def resync_once(batch):
            if batch.epoch != "epoch-2":
                return wire.Answer(resync="epoch-2")
            return answer_ok(batch)

        kernel = FakeKernel(resync_once)
        link = await linked(kernel)
        result = await asyncio.wait_for(link.call("cap", "fs.read", {}), 10)
        link.stop()
        return kernel, result

    kernel, result = asyncio.run(scenario())
    assert result.ok == "fs.read"
    assert [(b.epoch, b.seq) for b in kernel.batches] == [("", 0), ("epoch-2", 0)]


def test_a_refused_batch_fails_its_calls_with_the_kernels_error():
    async def scenario():
        kernel = FakeKernel(lambda b: wire.Answer(error=wire.failure(NotFound("no host")).error))
        link = await linked(kernel)
        result = await asyncio.wait_for(link.call("cap", "fs.read", {}), 5)
        link.stop()
        return result

    result = asyncio.run(scenario())
    assert result.error.type == "NotFound"
    with pytest.raises(NotFound, match="no host"):
        wire.unwrap(result)


def test_chunks_are_applied_in_order_whichever_channel_brings_them():
    seen: list = []
    link = KernelLink(None, "host-1", "s", seen.append, lambda: None)
    kill = [wire.Kill(p) for p in range(5)]
    link._receive(wire.Chunk("e", 2, kill[2:5]))  # early: waits for items 0 and 1
    assert seen == []
    link._receive(wire.Chunk("e", 0, kill[0:2]))
    assert [k.pid for k in seen] == [0, 1, 2, 3, 4]
    link._receive(wire.Chunk("new-epoch", 0, [wire.Kill(9)]))  # a restarted kernel
    assert seen[-1].pid == 9


def test_output_and_exits_that_cannot_be_encoded_still_reach_the_kernel():
    @dataclass(eq=False)
    class Agent:
        pid: int
        log_buffer: list

    async def scenario():
        kernel = FakeKernel(answer_ok)
        link = await linked(kernel)
        agent = Agent(7, ["name: caf\udce9\n"])  # a lone surrogate, from a file name
        link.logging.add(agent)
        link.report_exit(wire.ExitReport(7, "normal", result="r\udce9sum\u00e9"))
        future = link.call("cap", "fs.read", {})
        await asyncio.wait_for(future, 5)
        link.stop()
        return kernel

    kernel = asyncio.run(scenario())
    batch = next(b for b in kernel.batches if b.exits)
    assert batch.exits[0].pid == 7 and "\ufffd" in batch.exits[0].result
    assert batch.logs[7] == "name: caf\ufffd\n"


def test_arguments_that_cannot_cross_fail_at_the_call():
    link = KernelLink(None, "host-1", "s", lambda item: None, lambda: None)
    with pytest.raises(Exception, match="cannot send these arguments"):
        link.call("cap", "fs.write", {"data": "bad \udce9"})
    assert link.ops == [] and link.futures == {}


def test_calls_made_in_the_tick_that_wakes_the_link_share_its_batch():
    """Agents (or sandboxed children's relays) resumed in one event-loop tick call one
    after another; the first call wakes the flush loop, and the rest must still join its
    batch, not each take a Ray call of its own."""
    async def scenario():
        kernel = FakeKernel(answer_ok)
        link = await linked(kernel)
        await asyncio.sleep(0.01)  # the flush loop waits for work
        loop = asyncio.get_running_loop()
        futures = [link.call("cap", "proc.self", {"i": 0})]
        for i in (1, 2):  # queued behind the flush loop's wake-up, in the same tick
            loop.call_soon(lambda i=i: futures.append(link.call("cap", "proc.self", {"i": i})))
        await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*futures), 5)
        link.stop()
        return kernel

    kernel = asyncio.run(scenario())
    assert [[wire.decode_args(op.args)["i"] for op in ops_of(b)] for b in kernel.batches] \
        == [[0, 1, 2]]


def test_a_batch_waits_briefly_for_an_expected_caller_and_no_longer(monkeypatch):
    """A sandboxed child just given an answer or a message is expected to call: the batch
    waits for it (up to EXPECT_HOLD_S), and leaves without it when it does not come. (The
    hold is made long here, so a slow machine cannot end it before the child calls.)"""
    from actors import host_transport

    monkeypatch.setattr(host_transport, "EXPECT_HOLD_S", 0.5)

    async def scenario():
        kernel = FakeKernel(answer_ok)
        link = await linked(kernel)
        await asyncio.sleep(0.01)
        link.expect("child", True)
        first = link.call("cap", "proc.self", {"i": 0})
        for _ in range(5):  # the flush loop runs, and holds the batch
            await asyncio.sleep(0)
        assert kernel.batches == []  # held for the child
        second = link.call("cap", "proc.self", {"i": 1})  # the child's call
        link.expect("child", False)
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        link.expect("child", True)  # expected again, and this time it never calls
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(link.call("cap", "proc.self", {"i": 2}), 30)
        waited = asyncio.get_running_loop().time() - started
        link.stop()
        return kernel, waited

    kernel, waited = asyncio.run(scenario())
    assert [[wire.decode_args(op.args)["i"] for op in ops_of(b)] for b in kernel.batches] \
        == [[0, 1], [2]]
    assert waited >= 0.4  # it held the batch for the child, then sent it without
