"""The kernel, a host and the syscall layer working together on the real model."""

from __future__ import annotations

from pingpong import Ping

from syscalls import ipc, proc


def test_spawn_call_and_exit(kernel):
    async def scenario():
        echo = await proc.spawn("pingpong:Echo", name="smoke-echo")
        replies = [(await ipc.call(echo, Ping(i), timeout=30)).body.n for i in range(5)]
        await proc.kill(echo)
        return replies, await proc.wait(echo, timeout=30)

    replies, exit_ = kernel.run(scenario())
    assert replies == [1, 2, 3, 4, 5]
    assert exit_["reason"] == "killed"
