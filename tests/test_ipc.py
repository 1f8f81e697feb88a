"""Messages between processes on a real kernel: order, dedup, call, topics, and bad input.

Bad input goes through the real syscall path (``_context.call`` is what ``ipc.send``
uses underneath) with payloads no honest program would produce; each must come back
as the typed error that says what is wrong, and leave everyone else served.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
from checks import reports, until
from pingpong import Echo, Ping
from workers import (
    Cmd,
    Commanded,
    Num,
    Report,
    announce,
    call_and_report,
    call_with_full_mailbox,
    collector,
    commander,
    counter,
    idle,
    relay,
    subscriber,
    switcher,
    take_and_end,
)

from llmos_kernel.errors import CallFailed, MessageError, NoSuchProcess, QuotaExceeded, Timeout
from llmos_kernel.messages import new_message_id
from syscalls import _context, ipc, proc


def test_order_per_sender_within_and_across_hosts(kernel):
    """Three senders, two on the collector's host and one on the other, 300 messages each:
    each sender's messages arrive in the order sent, none lost, none twice."""
    hosts = kernel.call("status")["processes"]["shared_hosts"]

    async def scenario():
        sink = await proc.spawn(collector, {"count": 900}, host=hosts[0])
        senders = [await proc.spawn(counter, {"to": sink, "count": 300}, host=h)
                   for h in (hosts[0], hosts[0], hosts[1])]
        got = (await proc.wait(sink, timeout=120))["result"]
        return senders, got

    senders, got = kernel.run(scenario())
    for s in senders:
        assert [n for sender, n in got if sender == s] == list(range(300))
    assert len(got) == 900


def test_a_resent_id_is_delivered_once(kernel):
    """Sending again with the same id (say, after an error left the sender unsure) is a
    no-op; ids are per sender, so another sender's equal id is its own message."""
    async def scenario():
        sink = await proc.spawn(collector, {"count": 3})
        first = await ipc.send(sink, Num(1), id="order-17")
        again = await ipc.send(sink, Num(1), id="order-17")
        other = await proc.spawn(counter, {"to": sink, "count": 1})  # its own ids
        await ipc.send(sink, Num(2), id="order-18")
        return first, again, other, (await proc.wait(sink, timeout=30))["result"]

    first, again, other, got = kernel.run(scenario())
    assert first == again
    assert sorted(got) == sorted([[kernel.pid, 1], [other, 0], [kernel.pid, 2]])


@pytest.mark.parametrize("finish", [True, False])
def test_what_a_handler_sends_goes_out_when_it_is_done(kernel, finish):
    """Sends made while handling a message are held until that message is handled (next
    recv, ``ipc.done()``, or exit), and dropped if the handler never finishes."""
    async def scenario():
        speaker = await proc.spawn(announce, {"to": proc.pid(), "finish": finish})
        await ipc.send(speaker, Cmd("go"))
        try:
            heard = await reports(1, timeout=2 if not finish else 30)
        except Timeout:
            heard = []
        await proc.kill(speaker)
        with pytest.raises(Timeout):
            await reports(1, timeout=1)
        return heard

    assert kernel.run(scenario()) == (["announced"] if finish else [])


def test_call_reply_and_timeout(kernel):
    async def scenario():
        echo, mute = await proc.spawn(Echo), await proc.spawn(idle)
        answer = await ipc.call(echo, Ping(41), timeout=30)
        started = time.monotonic()
        with pytest.raises(Timeout, match="within 0.3 s"):
            await ipc.call(mute, Ping(1), timeout=0.3)
        waited = time.monotonic() - started
        with pytest.raises(Timeout):
            await ipc.recv(type=Report, timeout=0.2)
        for pid in (echo, mute):
            await proc.kill(pid)
        return echo, answer, waited

    echo, answer, waited = kernel.run(scenario())
    assert (answer.sender, answer.body.n) == (echo, 42)
    assert 0.3 <= waited < 5


def test_publish_reaches_subscribers_only(kernel):
    async def scenario():
        me = proc.pid()
        topic = f"news-{new_message_id()}"
        subscribers = [await proc.spawn(subscriber, {"topic": topic, "report_to": me})
                       for _ in range(2)]
        bystander = await proc.spawn(subscriber, {"topic": topic + "-other", "report_to": me})
        assert await reports(3) == ["subscribed"] * 3
        reached = await ipc.publish(topic, Report("hello"))
        heard = sorted(await reports(2))
        with pytest.raises(Timeout):
            await reports(1, timeout=0.5)
        for pid in (*subscribers, bystander):
            await proc.kill(pid)
        return subscribers, reached, heard

    subscribers, reached, heard = kernel.run(scenario())
    assert sorted(reached) == sorted(subscribers)
    assert heard == sorted(f"{pid} heard hello" for pid in subscribers)


def _raw_send(to, type_: str, payload: bytes):
    return _context.call("ipc.send", to=to, id=new_message_id(), type=type_, payload=payload)


def _typed(type_: str, fields: dict, version: int = 1) -> bytes:
    return msgpack.packb({"t": type_, "v": version, "f": fields}, use_bin_type=True)


BAD_MESSAGES = {
    "malformed msgpack": ("dict", b"\xc1\x93\x01", "not valid msgpack"),
    "not a message map": ("dict", msgpack.packb([1, 2, 3]), "must be a map"),
    "wrong field type": ("test.Num", _typed("test.Num", {"n": "seven"}),
                         "test.Num.n: expected int, got str"),
    "missing field": ("test.Num", _typed("test.Num", {}), "missing n"),
    "unknown type": ("test.NoSuchType", _typed("test.NoSuchType", {"x": 1}),
                     "unknown message type 'test.NoSuchType'"),
    "wrong version": ("test.Num", _typed("test.Num", {"n": 1}, version=9), "version 9"),
    "type tag mismatch": ("test.Num", _typed("test.Cmd", {"what": "x"}), "test.Cmd"),
    "oversize": ("dict", _typed("dict", {"blob": b"x" * (2 << 20)}), "limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_messages_get_a_message_error_and_a_dead_letter(kernel, case):
    """The sender gets MessageError naming the problem; the receiver is never fed it (the
    kernel keeps it as a dead letter) and goes on receiving good messages."""
    type_, payload, says = BAD_MESSAGES[case]

    async def scenario():
        sink = await proc.spawn(collector, {"count": 2})
        await ipc.send(sink, Num(0))  # declares test.Num to the kernel
        await ipc.publish("no-subscribers", Cmd("declare"))  # and test.Cmd
        with pytest.raises(MessageError) as raised:
            await _raw_send(sink, type_, payload)
        await ipc.send(sink, Num(1))
        return sink, str(raised.value), (await proc.wait(sink, timeout=30))["result"]

    sink, error, got = kernel.run(scenario())
    assert says in error
    assert got == [[kernel.pid, 0], [kernel.pid, 1]], "good messages pass; the bad one not"
    if case != "oversize":  # an oversize payload is refused before it becomes an envelope
        dead = kernel.call("dead_letters", sink)
        assert [d["sender"] for d in dead] == [kernel.pid]
        assert dead[0]["type"] == type_


def test_sending_to_a_process_that_is_gone(kernel):
    async def scenario():
        gone = await proc.spawn(idle)
        await proc.kill(gone)
        await proc.wait(gone, timeout=30)
        errors = []
        for to in (gone, 10**9, "no-such-name"):
            with pytest.raises(NoSuchProcess) as raised:
                await ipc.send(to, Num(1))
            errors.append(str(raised.value))
        return gone, errors

    gone, errors = kernel.run(scenario())
    assert f"process {gone} has exited" in errors[0]
    assert "no process with pid 1000000000" in errors[1]
    assert "no live process named 'no-such-name'" in errors[2]


def test_a_full_mailbox_pushes_back(kernel):
    """A receiver with a 3-message mailbox that handles nothing: the 4th send is refused
    with QuotaExceeded, and sends to others still go through."""
    async def scenario():
        slow = await proc.spawn(idle, quotas={"mailbox": 3})
        echo = await proc.spawn(Commanded)
        for i in range(3):
            await ipc.send(slow, Num(i))
        with pytest.raises(QuotaExceeded, match="mailbox of process .* is full"):
            await ipc.send(slow, Num(3))
        answer = await ipc.call(echo, Cmd("ping"), timeout=30)
        for pid in (slow, echo):
            await proc.kill(pid)
        return answer

    assert kernel.run(scenario()).body.text.startswith("ping from ")


def test_a_message_whose_handler_raises_is_dead_lettered_not_redelivered(kernel):
    """A permanent receiver restarts after the crash but does not get the message again."""
    async def scenario():
        victim = await proc.spawn(Commanded, restart="permanent")
        await ipc.send(victim, Cmd("crash"))
        await until(lambda t: t[victim]["restarts"] == 1 and t[victim]["status"] == "running")
        answer = await ipc.call(victim, Cmd("ping"), timeout=30)
        await proc.kill(victim)
        return victim, answer

    victim, answer = kernel.run(scenario())
    assert answer.body.text == f"ping from {kernel.pid}"
    dead = kernel.call("dead_letters", victim)
    assert [d["type"] for d in dead] == ["test.Cmd"]
    assert "raised RuntimeError: crashing on command" in dead[0]["reason"]


@pytest.mark.parametrize("caller", ["other host", "same host", "sandboxed"])
def test_a_call_whose_handler_raises_fails_at_once_saying_why(kernel, caller):
    """The caller hears CallFailed with the handler's error, not a Timeout after its 120 s:
    through the kernel, between agents of one host (kept in that host's journal), and
    from a sandboxed child. (That a permanent receiver restarts and serves on after such
    a crash: test_a_message_whose_handler_raises_is_dead_lettered_not_redelivered.)"""
    hosts = kernel.call("status")["processes"]["shared_hosts"]

    async def scenario():
        victim = await proc.spawn(Commanded, host=hosts[0])
        spec = {"sandbox": True} if caller == "sandboxed" else \
            {"host": hosts[0] if caller == "same host" else hosts[1]}
        pid = await proc.spawn(call_and_report, {"to": victim, "what": "crash"}, **spec)
        return victim, (await proc.wait(pid, timeout=180))["result"]

    victim, got = kernel.run(scenario(), timeout=300)
    assert got["error"] == "CallFailed", got
    assert got["message"].startswith(f"process {victim} will not answer this call: ")
    assert "raised RuntimeError: crashing on command" in got["message"]


def test_a_call_whose_receiver_exits_unanswered_fails_at_once(kernel):
    async def scenario():
        mute = await proc.spawn(idle)
        waiting = asyncio.ensure_future(ipc.call(mute, Num(1), timeout=120))  # not its type
        await until(lambda t: t[mute]["mailbox"] == 1, what="the call to reach its mailbox")
        await proc.kill(mute)
        with pytest.raises(CallFailed) as failed:
            await waiting
        return mute, str(failed.value)

    mute, message = kernel.run(scenario(), timeout=300)
    assert message == f"process {mute} will not answer this call: process {mute} exited (killed)"


@pytest.mark.parametrize("where", ["other host", "same host", "sandboxed"])
def test_a_call_taken_and_left_unanswered_fails_when_its_receiver_ends(kernel, where):
    """The receiver takes the call (ipc.recv) and ends without answering: its host reports
    the call at its exit and the caller hears CallFailed then, not a Timeout after 120 s:
    through the kernel, within one host (its journal), and from a sandboxed receiver."""
    hosts = kernel.call("status")["processes"]["shared_hosts"]

    async def scenario():
        taker = await proc.spawn(take_and_end, **(
            {"sandbox": True} if where == "sandboxed" else {"host": hosts[0]}))
        caller = await proc.spawn(call_and_report, {"to": taker, "what": "take"},
                                  host=hosts[0] if where == "same host" else hosts[1])
        return (taker, (await proc.wait(taker, timeout=120))["result"],
                (await proc.wait(caller, timeout=180))["result"])

    taker, took, got = kernel.run(scenario(), timeout=300)
    assert took == "take"
    assert got == {"error": "CallFailed", "message": f"process {taker} will not answer this "
                   f"call: process {taker} ended (normal) without answering this call"}


def test_many_concurrent_calls_are_all_answered(kernel):
    async def scenario():
        echo = await proc.spawn(Echo)
        answers = await asyncio.gather(*(ipc.call(echo, Ping(i), timeout=60)
                                         for i in range(300)))
        await proc.kill(echo)
        return [a.body.n for a in answers]

    assert kernel.run(scenario()) == list(range(1, 301))


# -- local delivery: messages between agents of one host (actors.agent_host) --------------
def _kernel_sent(kernel) -> int:
    return kernel.call("status")["ipc"]["sent"]


def test_messages_between_agents_of_one_host_stay_there(kernel):
    """Two senders and a collector on one host: every message arrives, in order per sender,
    and (almost) none of them went through the kernel."""
    host = kernel.call("status")["processes"]["shared_hosts"][0]
    before = _kernel_sent(kernel)

    async def scenario():
        sink = await proc.spawn(collector, {"count": 1000}, host=host)
        senders = [await proc.spawn(counter, {"to": sink, "count": 500}, host=host)
                   for _ in range(2)]
        return senders, (await proc.wait(sink, timeout=120))["result"]

    senders, got = kernel.run(scenario())
    for s in senders:
        assert [n for sender, n in got if sender == s] == list(range(500))
    assert _kernel_sent(kernel) - before < 100, "the messages went through the kernel"


def test_order_holds_when_a_sender_switches_between_host_and_kernel(kernel):
    """A sender alternates five direct sends with five sent while handling a message that
    came through the kernel (those go through the kernel, with that message's ack): its
    receiver still gets all of them in the order sent."""
    host = kernel.call("status")["processes"]["shared_hosts"][0]
    rounds = 20

    async def scenario():
        sink = await proc.spawn(collector, {"count": 10 * rounds}, host=host)
        sender = await proc.spawn(switcher, {"to": sink, "rounds": rounds}, host=host)
        for _ in range(rounds):
            await ipc.send(sender, Cmd("next"))
        return sender, (await proc.wait(sink, timeout=120))["result"]

    sender, got = kernel.run(scenario())
    assert got == [[sender, n] for n in range(10 * rounds)]


def test_a_handler_of_a_local_message_may_send_beyond_its_host(kernel):
    """A relay handles numbers from a neighbour on its host and passes each on to this
    driver script: the kernel takes each such message over (to commit its ack with the
    relay's send), and all arrive, in order, once."""
    host = kernel.call("status")["processes"]["shared_hosts"][0]
    before = kernel.call("status")["ipc"]["adopted"]

    async def scenario():
        relayer = await proc.spawn(relay, {"to": proc.pid()}, host=host)
        await proc.spawn(counter, {"to": relayer, "count": 300}, host=host)
        got = [(await ipc.recv(type=Num, sender=relayer, timeout=60)).body.n
               for _ in range(300)]
        await proc.kill(relayer)
        return got

    assert kernel.run(scenario()) == list(range(300))
    assert kernel.call("status")["ipc"]["adopted"] - before >= 300


def test_a_full_mailbox_pushes_back_a_neighbour_too(kernel):
    host = kernel.call("status")["processes"]["shared_hosts"][0]

    async def scenario():
        slow = await proc.spawn(idle, quotas={"mailbox": 3}, host=host)
        sender = await proc.spawn(counter, {"to": slow, "count": 4}, host=host)
        exit_ = await proc.wait(sender, timeout=60)
        await proc.kill(slow)
        return exit_

    exit_ = kernel.run(scenario())
    assert exit_["reason"] == "error"
    assert exit_["error"]["type"] == "QuotaExceeded"
    assert "is full (3 pending messages)" in exit_["error"]["message"]


def test_a_local_message_whose_handler_raises_is_dead_lettered_not_redelivered(kernel):
    """The crash's message becomes a dead letter; the message still waiting behind it
    reaches the restarted receiver (which it tells to stop)."""
    host = kernel.call("status")["processes"]["shared_hosts"][0]

    async def scenario():
        victim = await proc.spawn(Commanded, restart="transient", host=host)
        await proc.spawn(commander, {"to": victim, "whats": ["crash", "exit"]}, host=host)
        return victim, await proc.wait(victim, timeout=60)

    victim, exit_ = kernel.run(scenario())
    assert exit_["reason"] == "normal" and exit_["result"] == "bye"
    rows = kernel.run(until(lambda t: t[victim]["status"] == "exited"))
    assert rows[victim]["restarts"] == 1
    dead = kernel.call("dead_letters", victim)
    assert [d["type"] for d in dead] == ["test.Cmd"]
    assert "raised RuntimeError: crashing on command" in dead[0]["reason"]


def test_a_reply_to_a_full_local_mailbox_is_refused_and_logged(kernel):
    """A caller whose mailbox (quota 2) is full of a neighbour's numbers: the answer to its
    call is refused, the answerer's log says why, and the answerer keeps serving."""
    host = kernel.call("status")["processes"]["shared_hosts"][0]

    async def scenario():
        answerer = await proc.spawn(Commanded, host=host)
        caller = await proc.spawn(call_with_full_mailbox, {"peer": answerer, "wait": 1.0},
                                  quotas={"mailbox": 2}, host=host)
        await proc.spawn(counter, {"to": caller, "count": 2}, host=host)
        result = (await proc.wait(caller, timeout=60))["result"]
        still = await ipc.call(answerer, Cmd("ping"), timeout=30)
        await proc.kill(answerer)
        return answerer, result, still

    answerer, result, still = kernel.run(scenario())
    assert result == "Timeout"
    assert still.body.text == f"ping from {kernel.pid}"
    log = kernel.call("logs", answerer)["text"]
    assert "[reply failed] QuotaExceeded" in log and "is full (2 pending" in log


def test_a_behaviours_receive_loop_leaves_its_own_calls_replies_alone(kernel, tmp_path):
    """A behaviour whose background task makes an ipc.call: the reply goes to that call,
    not to the behaviour's on_message (which would leave the call to time out)."""
    program = tmp_path / "calls_from_a_task.py"
    program.write_text(
        "import asyncio\n"
        "from llmos_kernel.messages import message\n"
        "from syscalls import ipc, proc\n\n"
        "@message(name='race.Ping')\n"
        "class Ping:\n    n: int\n\n"
        "class Echo:\n"
        "    async def on_message(self, msg):\n"
        "        return Ping(msg.body.n + 1)\n\n"
        "class Caller:\n"
        "    async def init(self, echo: int):\n"
        "        self.echo, self.seen = echo, []\n"
        "        self.asked = asyncio.get_running_loop().create_task(self.ask())\n\n"
        "    async def ask(self):\n"
        "        replies = [await ipc.call(self.echo, Ping(n), timeout=30) for n in range(3)]\n"
        "        return [r.body.n for r in replies]\n\n"
        "    async def on_message(self, msg):\n"
        "        self.seen.append(msg.type)\n"
        "        if msg.type == 'race.Stop':\n"
        "            self.stopped, self.result = True, [await self.asked, self.seen]\n\n"
        "@message(name='race.Stop')\n"
        "class Stop:\n    pass\n\n"
        "async def main():\n"
        "    echo = await proc.spawn(Echo)\n"
        "    caller = await proc.spawn(Caller, {'echo': echo})\n"
        "    await asyncio.sleep(0.5)\n"
        "    await ipc.send(caller, Stop())\n"
        "    return (await proc.wait(caller, timeout=60))\n")
    pid = kernel.run(proc.spawn(str(program)))
    exit_ = kernel.run(proc.wait(pid, timeout=90), timeout=120)
    assert exit_["reason"] == "normal", exit_
    replies, seen = exit_["result"]["result"]
    assert replies == [1, 2, 3]
    assert seen == ["race.Stop"]  # on_message saw only what was sent to it
