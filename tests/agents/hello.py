"""A program for ``llmos run`` (shipped as source): prints its lines, or fails on request."""

import asyncio

from workers import Num  # noqa: F401 - declares test.Num, so such a message decodes to a Num

from syscalls import ipc


async def main(lines: list, pause: float = 0.0, fail: bool = False) -> dict:
    for line in lines:
        print(line)
        await asyncio.sleep(pause)
    if fail:
        raise RuntimeError("asked to fail")
    return {"printed": len(lines)}


async def inbox() -> dict:
    """Returns the first message it receives."""
    msg = await ipc.recv()
    return {"sender": msg.sender, "type": msg.type, "body": msg.body}
