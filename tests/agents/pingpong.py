"""Test agents: ping-pong, counters and collectors (shipped to hosts by module name)."""

from llmos_kernel.messages import message
from syscalls import ipc


@message(name="test.Ping")
class Ping:
    n: int
    text: str = ""


class Echo:
    """Answers every Ping with n + 1."""

    async def on_message(self, msg):
        return Ping(msg.body.n + 1, msg.body.text)


async def ponger():
    while True:
        msg = await ipc.recv(type=Ping)
        await ipc.send(msg.sender, Ping(msg.body.n + 1))
