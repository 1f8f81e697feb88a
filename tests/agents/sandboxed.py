"""Programs for the sandbox tests on a real kernel: each runs sandboxed, some also not."""

from __future__ import annotations

import os

from syscalls import fs, ipc, llm, proc


async def worker(peer: int) -> dict:
    """Everything through syscalls: a chat, a file in its home, a call to ``peer`` and a
    message each way."""
    chat = await llm.chat([{"role": "user", "content": "Say hi."}], max_tokens=4,
                          temperature=0)
    await fs.write("notes.txt", f"chat said: {chat.text}")
    answer = await ipc.call(peer, {"n": 1}, timeout=120)
    await ipc.send(peer, {"from": proc.pid()})
    back = await ipc.recv(timeout=120)
    return {"chat": chat.text,
            "file": await fs.read_text("notes.txt"), "answer": answer.body, "back": back.body,
            "os_pid": os.getpid()}


async def peer() -> dict:
    """An unsandboxed partner: answers one call, then echoes one message."""
    request = await ipc.recv(timeout=120)
    await ipc.reply(request, {"n": request.body["n"] + 1})
    note = await ipc.recv(timeout=120)
    await ipc.send(note.sender, {"seen": note.body["from"]})
    return {"os_pid": os.getpid()}


def read_file(path: str) -> dict:
    """Plain ``open()``: what a program reaches without asking the kernel."""
    try:
        with open(path) as f:
            return {"read": len(f.read())}
    except OSError as e:
        return {"error": type(e).__name__}


def memory_bomb() -> None:
    hog = []
    while True:
        hog.append(bytearray(32 << 20))


def cpu_spin() -> None:
    while True:
        pass


async def crash_twice(driver: int, path: str) -> None:
    """Dies without an exit report in its first two lives; in its third, tells ``driver``
    what ``read_file(path)`` gives it, then waits."""
    if (await proc.self())["restarts"] < 2:
        os._exit(3)
    await ipc.send(driver, read_file(path))
    await ipc.recv()
