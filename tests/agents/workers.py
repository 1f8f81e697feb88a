"""Test agents for processes, supervision, messages and faults (hosts import them by name)."""

import asyncio

from llmos_kernel.errors import LlmosError
from llmos_kernel.messages import message
from syscalls import _context, fs, ipc, proc, tools


@message(name="test.Num")
class Num:
    n: int


@message(name="test.Cmd")
class Cmd:
    what: str


@message(name="test.Report")
class Report:
    text: str


async def idle() -> None:
    """Waits for a Cmd that never comes (messages of other types stay in its mailbox)."""
    await ipc.recv(type=Cmd)


async def forwarder(to: int) -> None:
    """Sends the number of every Num it handles on to ``to``: what it handled is durable."""
    while True:
        msg = await ipc.recv(type=Num)
        await ipc.send(to, Num(msg.body.n))


async def collector(count: int) -> list:
    """Returns the (sender, n) of the first ``count`` Num messages it receives."""
    got = []
    for _ in range(count):
        msg = await ipc.recv(type=Num)
        got.append([msg.sender, msg.body.n])
    return got


async def counter(to: int | str, count: int) -> int:
    """Sends Num(0) .. Num(count - 1) to ``to``."""
    for i in range(count):
        await ipc.send(to, Num(i))
    return count


class Commanded:
    """Does what each Cmd says: "crash" raises, "exit" ends normally, "ping" answers."""

    def on_message(self, msg: ipc.Message):
        if msg.body.what == "crash":
            raise RuntimeError("crashing on command")
        if msg.body.what == "exit":
            self.stopped, self.result = True, "bye"
        return Report(f"{msg.body.what} from {msg.sender}")


async def crash_at_once() -> None:
    raise RuntimeError("this program always crashes")


async def supervise(children: list) -> None:
    """Spawns its children (dicts of proc.spawn arguments), then waits forever."""
    for child in children:
        await proc.spawn(child["program"], child.get("args"), name=child.get("name"),
                         restart=child.get("restart"), trap_exits=child.get("trap_exits", False))
    await idle()


async def subscriber(topic: str, report_to: int) -> None:
    """Subscribes to ``topic`` and reports every Report published there."""
    await ipc.subscribe(topic)
    await ipc.send(report_to, Report("subscribed"))
    while True:
        msg = await ipc.recv(type=Report)
        await ipc.send(report_to, Report(f"{proc.pid()} heard {msg.body.text}"))


async def announce(to: int, finish: bool) -> None:
    """On a Cmd, sends a Report to ``to``, says it is done if ``finish``, then sleeps."""
    await ipc.recv(type=Cmd)
    await ipc.send(to, Report("announced"))
    if finish:
        ipc.done()
    await asyncio.sleep(3600)


async def try_kill(target: int, report_to: int) -> None:
    """On each Cmd, tries to kill ``target`` and reports the outcome."""
    while True:
        await ipc.recv(type=Cmd)
        try:
            await proc.kill(target)
            outcome = "killed"
        except LlmosError as e:
            outcome = type(e).__name__
        await ipc.send(report_to, Report(outcome))


async def linked_to(peer: int, report_to: int) -> None:
    """Links to ``peer``; reports ExitSignal notices (when it traps exits) and waits."""
    await proc.link(peer)
    await ipc.send(report_to, Report("linked"))
    while True:
        msg = await ipc.recv(type=proc.ExitSignal)
        await ipc.send(report_to, Report(f"{msg.body.pid} {msg.body.reason}"))


@message(name="test.Forged")
class Forged:  # sent by ``forge`` only: the kernel first hears of it from a refused send
    text: str


async def forge(report_to: int, victim: int) -> list:
    """Tries to send as ``victim``, then with a made-up capability; returns the errors. Then
    sends honestly, a type whose first declaration went with the refused send."""
    errors = []
    try:
        await _context.call("ipc.send", to=report_to, sender=victim, type="dict",
                            payload=b"\x83\xa1t\xa4dict\xa1v\x01\xa1f\x80")
    except LlmosError as e:
        errors.append(type(e).__name__)
    me = _context.runtime()
    real, me.capability = me.capability, "forged-" + me.capability[::-1]
    try:
        await ipc.send(report_to, Forged("forged"))
    except LlmosError as e:
        errors.append(type(e).__name__)
    finally:
        me.capability = real
    await ipc.send(report_to, Forged("honest"))
    return errors


async def chatty(lines: list) -> int:
    """Prints each line (to stdout, and the last one to stderr too)."""
    import sys

    for line in lines:
        print(line)
    print(lines[-1], file=sys.stderr)
    return len(lines)


async def delete_after_approval(path: str) -> str:
    """Writes ``path`` in its home, then deletes it with the dangerous delete_file tool."""
    await fs.write(path, "to be deleted")
    return await tools.call("delete_file", path=path)


async def sleeper(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


async def switcher(to: int, rounds: int) -> int:
    """Per round: five Nums sent as no handler's output (they may stay on this host), then
    five more while handling a Cmd (they commit with its ack); numbered in sending order."""
    n = 0
    for _ in range(rounds):
        for _ in range(5):
            await ipc.send(to, Num(n))
            n += 1
        await ipc.recv(type=Cmd)
        for _ in range(5):
            await ipc.send(to, Num(n))
            n += 1
        ipc.done()
    return n


async def relay(to: int, pause: float = 0.0) -> None:
    """Passes every Num it handles on to ``to``, taking ``pause`` seconds over each."""
    while True:
        msg = await ipc.recv(type=Num)
        if pause:
            await asyncio.sleep(pause)
        await ipc.send(to, Num(msg.body.n))


async def hold_then_forward(to: int) -> None:
    """Handles nothing until it is restarted; then forwards every Num to ``to``. (It waits
    without receiving: a receive that skips past its delivery window's worth of Nums to
    find a command would never see the command.)"""
    if (await proc.self())["restarts"] == 0:
        await asyncio.sleep(3600)
    while True:
        msg = await ipc.recv(type=Num)
        await ipc.send(to, Num(msg.body.n))


async def commander(to: int, whats: list) -> int:
    """Sends a Cmd for each of ``whats`` to ``to``."""
    for what in whats:
        await ipc.send(to, Cmd(what))
    return len(whats)


async def call_and_report(to: int, what: str) -> dict:
    """Calls ``to`` with Cmd(what): the answer's text, or the error the call raised."""
    try:
        answer = await ipc.call(to, Cmd(what), timeout=120)
    except LlmosError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"answer": answer.body.text}


async def take_and_end() -> str:
    """Receives one Cmd (a call) and ends without answering it."""
    msg = await ipc.recv(type=Cmd)
    return msg.body.what


async def call_with_full_mailbox(peer: int, wait: float) -> str:
    """After ``wait`` seconds (its mailbox fills meanwhile), calls ``peer`` with a Cmd."""
    await asyncio.sleep(wait)
    try:
        await ipc.call(peer, Cmd("ping"), timeout=2)
    except LlmosError as e:
        return type(e).__name__
    return "answered"
