"""A call that becomes a dead letter is answered by the kernel with NoReply, on the real
IPC service, mailbox store and process table (SQLite files in tmp_path; no Ray, no host):
what reaches the caller's host is checked as that host would read it."""

from __future__ import annotations

import pytest

from llmos_kernel.ipc import IPCService
from llmos_kernel.mailbox import MailboxStore
from llmos_kernel.messages import DEFAULT_REGISTRY, Envelope, decode, encode
from llmos_kernel.notices import NoReply
from llmos_kernel.outbox import Outboxes
from llmos_kernel.proctable import ProcessTable


@pytest.fixture
def world(tmp_path):
    table = ProcessTable(tmp_path / "procs.db")
    with MailboxStore(tmp_path / "mailboxes.db") as store:
        outboxes = Outboxes()
        ipc = IPCService(store, table, outboxes)
        pids = []
        for host in ("host-a", "host-b"):
            proc, _ = table.create({"program": {"kind": "module", "ref": "x:y"}})
            proc.status, proc.host = "running", host
            pids.append(proc.pid)
            ipc.pump(proc.pid)  # as at its start: nothing waits, new messages go out at once
        yield ipc, table, outboxes, pids


def send(ipc, table, sender: int, to: int, *, call: bool, deadline: float | None = None) -> str:
    args = {"to": to, "type": "dict", "payload": encode({"n": 1}), "deadline": deadline}
    if call:
        args["reply_to"] = "call"
    sent = ipc.send(table.procs[sender], args, None)
    ipc.commit()
    return sent["id"]


def delivered(outboxes: Outboxes, host: str) -> list[Envelope]:
    items, outboxes.items[host] = list(outboxes.items.get(host, ())), []
    return [Envelope.from_wire(item.envelope) for item in items]


def no_replies(envs: list[Envelope]) -> list[tuple[str, NoReply]]:
    return [(e.correlation_id, decode(e.payload, registry=DEFAULT_REGISTRY))
            for e in envs if e.sender == 0 and e.type == "llmos.NoReply"]


def test_a_call_whose_handler_raised_is_answered_with_no_reply(world):
    ipc, table, outboxes, (caller, callee) = world
    call = send(ipc, table, caller, callee, call=True)
    plain = send(ipc, table, caller, callee, call=False)
    assert [e.id for e in delivered(outboxes, "host-b")] == [call, plain]
    for msg_id in (call, plain):
        ipc.reject(callee, msg_id, "the handler raised ValueError: no")
    ipc.commit()
    assert no_replies(delivered(outboxes, "host-a")) == [
        (call, NoReply(callee, "the handler raised ValueError: no"))]  # the plain send: none


def test_calls_pending_for_a_process_that_exits_are_answered(world):
    ipc, table, outboxes, (caller, callee) = world
    calls = [send(ipc, table, caller, callee, call=True) for _ in range(2)]
    table.procs[callee].status = "exited"
    assert ipc.bury(callee, f"process {callee} exited (killed)") == 2
    ipc.commit()
    assert no_replies(delivered(outboxes, "host-a")) == [
        (c, NoReply(callee, f"process {callee} exited (killed)")) for c in calls]


def test_a_caller_that_is_gone_gets_nothing(world):
    ipc, table, outboxes, (caller, callee) = world
    send(ipc, table, caller, callee, call=True)
    table.procs[caller].status = "exited"
    ipc.bury(callee, "gone")
    ipc.commit()
    assert delivered(outboxes, "host-a") == []
    assert ipc.store.count(caller) == 0


def test_a_call_past_its_deadline_is_answered(world):
    ipc, table, outboxes, (caller, callee) = world
    table.procs[callee].status = "starting"  # not delivered: it waits in the mailbox
    call = send(ipc, table, caller, callee, call=True, deadline=1.0)
    expired = ipc.expire()
    ipc.commit()
    assert [e.id for e in expired] == [call]
    assert no_replies(delivered(outboxes, "host-a")) == [
        (call, NoReply(callee, "its deadline passed"))]


class AckingHost:  # the one part of a host AgentRuntime.deliver uses here
    def __init__(self):
        self.acked: list[str] = []

    def queue_ack(self, agent, msg_id, reply=None):
        self.acked.append(msg_id)


def test_a_no_reply_reaches_only_a_call_still_waiting():
    """Delivered to the caller's runtime: kept for the call that awaits it; acknowledged and
    dropped once that call gave up (timed out), so no later receive finds a stray notice."""
    from actors.runtime import AgentRuntime, Message
    from llmos_kernel.notices import notice

    host = AckingHost()
    agent = AgentRuntime(host, pid=2, capability="cap")
    waiting, given_up = "2:call-1", "2:call-2"
    agent.awaiting.add(waiting)
    for call in (waiting, given_up):
        agent.deliver(Message.of(notice("NoReply", {"pid": 3, "reason": "gone"}, 2,
                                        correlation_id=call)))
    assert [m.correlation_id for m in agent.mailbox.values()] == [waiting]
    assert len(host.acked) == 1 and host.acked[0] not in agent.mailbox


def test_calls_a_process_ended_without_answering_are_answered(world):
    """Its host reports the calls it acknowledged without an answer; each caller still
    alive hears NoReply for its own call (a reported id too long to be a call's: none)."""
    ipc, table, outboxes, (caller, callee) = world
    call = send(ipc, table, caller, callee, call=True)
    ipc.ack(table.procs[callee], call)  # taken, and settled without a reply
    ipc.commit()
    delivered(outboxes, "host-b")
    gone, _ = table.create({"program": {"kind": "module", "ref": "x:y"}})
    ipc.unanswered(callee, [(caller, call), (gone.pid, "x:1"), (caller, "x" * 1000)],
                   f"process {callee} ended (normal) without answering this call")
    ipc.commit()
    assert no_replies(delivered(outboxes, "host-a")) == [
        (call, NoReply(callee, f"process {callee} ended (normal) without answering this call"))]


def test_a_host_keeps_the_calls_an_agent_settled_without_answering():
    """What a host reports at an agent's exit: calls acknowledged with no answer and not
    answered since (an answer sent later, or with the ack, takes a call off)."""
    from actors.runtime import AgentRuntime, Message

    agent = AgentRuntime(host=None, pid=7, capability="")
    calls = [Message(f"3:{i}", 3, "dict", b"", expects_reply=True) for i in range(4)]
    for msg in [*calls, Message("3:9", 3, "dict", b"")]:  # the last is not a call
        agent.took(msg)
    agent.settled("3:0", answered=True)   # its handler returned the answer
    agent.settled("3:1", answered=False)  # acknowledged, then answered with ipc.reply
    agent.answered("3:1")
    agent.settled("3:2", answered=False)  # never answered
    agent.settled("3:9", answered=False)
    assert agent.unanswered == {"3:2": 3}
    assert agent.calls_taken == {"3:3": 3}  # still in hand: the kernel buries it if it ends
