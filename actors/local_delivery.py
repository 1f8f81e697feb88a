"""Messages between agents of one host, kept on that host.

A host on the kernel's node keeps messages between its own agents in a journal of its
own (``llmos_kernel.journal``, in the kernel's state dir) instead of sending them
through the kernel: committed there before the sender hears "ok", delivered from
memory, deleted with the handler's acknowledgement (together with what the handler
sent to agents here). The guarantees stay those of the kernel path, so the kernel
takes over whatever could break them: a message whose handler sends beyond this host
(with what the handler sent so far, so its ack and those sends still commit together),
a sender's earlier direct messages to a receiver it now reaches through the kernel (its
later direct ones wait behind a *gate* until that one arrives: order per sender), an
exiting agent's unhandled messages, and a dead host's journal. Sends with a deadline,
an id of the sender's choosing, to a topic or from a driver script always go through
the kernel.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from actors.runtime import AgentRuntime, Message
from llmos_kernel import wire
from llmos_kernel.errors import MessageError, QuotaExceeded, Unavailable
from llmos_kernel.journal import HostJournal
from llmos_kernel.messages import (
    DEFAULT_REGISTRY,
    MAX_MESSAGE_BYTES,
    UNTYPED,
    Envelope,
    check,
    schema_of,
)

if TYPE_CHECKING:
    from actors.agent_host import AgentHost

log = logging.getLogger("llmos.host")

_LOCAL_ARGS = frozenset({"to", "id", "type", "payload", "schema", "correlation_id", "reply_to"})


def log_failure(agent: AgentRuntime, what: str, result: wire.Result) -> None:
    if result.error is not None:
        agent.log(f"[{what} failed] {result.error.type}: {result.error.message}\n")


class LocalDelivery:
    def __init__(self, host: AgentHost, journal: HostJournal):
        self.host, self.journal = host, journal
        self.adds: list[tuple[Envelope, asyncio.Future | None]] = []  # to commit
        self.removes: list[str] = []  # handled: to delete with the next commit
        self.inflight: dict[str, Envelope] = {}  # committed, not yet handled
        self.pending: collections.Counter[int] = collections.Counter()  # per receiver
        self.held: dict[str, list[Envelope]] = {}  # handled msg id -> what it sent
        self.gates: dict[tuple[int, int], str] = {}  # (sender, receiver) -> id on its way

    # -- sending ------------------------------------------------------------------
    def receiver(self, to: Any) -> AgentRuntime | None:
        """The running agent of this host that ``to`` (a pid or a name) is, if any."""
        host = self.host
        agent = host.agents.get(to) if type(to) is int else \
            host.names.get(to) if type(to) is str else None
        return agent if agent is not None and agent.running else None

    def envelope(self, agent: AgentRuntime, args: dict) -> Envelope | None:
        """The envelope of a send that may stay on this host, else None (the kernel takes it:
        a receiver elsewhere, a deadline, a message this host cannot vouch for...)."""
        if not agent.handles or not args.keys() <= _LOCAL_ARGS:
            return None
        receiver = self.receiver(args.get("to"))
        if receiver is None or (agent.pid, receiver.pid) in self.gates:
            return None
        payload, type_ = args.get("payload"), args.get("type")
        if type(payload) is not bytes or len(payload) > MAX_MESSAGE_BYTES:
            return None
        encoded = self.host.last_encoded
        try:  # what encode_message() just made from a declared message is valid already
            if not (encoded is not None and encoded[0] is payload and encoded[1] == type_) and \
                    check(payload, registry=DEFAULT_REGISTRY) != type_:
                return None
            env = Envelope.from_wire([f"{agent.pid}:{args['id']}", agent.pid, receiver.pid,
                                      type_, payload, args.get("correlation_id"),
                                      args.get("reply_to"), None, time.time(), None])
        except MessageError:
            return None
        if self.pending[receiver.pid] >= receiver.mailbox_quota:
            raise QuotaExceeded(f"the mailbox of process {receiver.pid} is full "
                                f"({receiver.mailbox_quota} pending messages); retry later")
        if "schema" in args:
            self.host.sent_schemas.discard(type_)  # the kernel has not seen it yet
        return env

    def send(self, agent: AgentRuntime, args: dict, explicit: bool
             ) -> dict | asyncio.Future | None:
        """Keep a send on this host when it may; None when the kernel must take it.

        A send with an id of the caller's choosing goes through the kernel, which remembers
        ids for deduplication across restarts."""
        handling = agent.handling if args.get("reply_to") != "call" else None
        if explicit or (handling is not None and handling not in self.inflight):
            return None
        env = self.envelope(agent, args)
        if env is None:
            return None
        self.pending[env.receiver] += 1
        if handling is not None:  # goes out with the handler's acknowledgement
            self.held.setdefault(handling, []).append(env)
            return {"id": env.id, "to": env.receiver}
        future = asyncio.get_running_loop().create_future()
        self.adds.append((env, future))
        self.host.link.wake()
        return future

    def before_kernel_send(self, agent: AgentRuntime, args: dict) -> tuple[int, int] | None:
        """A send that goes through the kernel; returns its gate, if it set one."""
        handling = agent.handling if args.get("reply_to") != "call" else None
        if handling is not None and handling in self.inflight:
            self.adopt_handled(agent, handling)  # it must commit with the handler's ack
        receiver = self.receiver(args.get("to"))
        if receiver is None:
            return None
        self.route_via_kernel(agent.pid, receiver.pid, f"{agent.pid}:{args['id']}")
        return (agent.pid, receiver.pid)

    def ack(self, agent: AgentRuntime, msg_id: str, reply: dict | None) -> bool:
        """Finish a local message here if its reply may stay here too; False when the
        acknowledgement (and reply) must go through the kernel."""
        if msg_id not in self.inflight:
            return False
        try:
            env = None if reply is None else self.envelope(agent, reply)
        except QuotaExceeded as e:  # as through the kernel: handled, the reply refused
            log_failure(agent, "reply", wire.failure(e))
            reply = env = None
        if reply is None or env is not None:
            self.finish(msg_id, [] if env is None else [env])
            return True
        self.adopt_handled(agent, msg_id)  # the reply leaves through the kernel
        return False

    # -- committing -----------------------------------------------------------------
    def commit(self) -> None:
        """Commit what was sent and handled here since the last commit, then deliver."""
        if not (self.adds or self.removes):
            return
        adds, removes = self.adds, self.removes
        self.adds, self.removes = [], []
        try:
            self.journal.commit([env for env, _ in adds], removes)
        except Exception as e:
            log.exception("host %s: journal commit failed", self.host.host_id)
            error = wire.failure(Unavailable(f"could not persist: {e}"))
            for env, future in adds:
                self.pending[env.receiver] -= 1
                if future is not None and not future.done():
                    future.set_result(error)
            return
        orphans = []
        for env, future in adds:
            self.inflight[env.id] = env
            receiver = self.host.agents.get(env.receiver)
            if receiver is not None:
                msg = Message.of(env)
                receiver.took(msg)
                receiver.deliver(msg)
            else:  # it exited meanwhile: its next incarnation gets it from the kernel
                orphans.append(env)
            if future is not None and not future.done():
                future.set_result(wire.ok({"id": env.id, "to": env.receiver}))
        if orphans:
            self.adopt(orphans)

    def finish(self, msg_id: str, replies: list[Envelope]) -> None:
        """A handler finished a local message: its sends and its deletion commit together."""
        env = self.inflight.pop(msg_id)
        self.pending[env.receiver] -= 1
        for reply in replies:
            self.pending[reply.receiver] += 1
        sent = self.held.pop(msg_id, []) + replies
        self.adds.extend((e, None) for e in sent)
        self.removes.append(msg_id)
        self.host.link.wake()

    # -- handing over to the kernel ---------------------------------------------------
    def adopt(self, envs: list[Envelope]) -> None:
        """Hand unhandled local messages to the kernel (in order); the journal forgets them
        once the kernel has committed them."""
        for env in envs:
            self.inflight.pop(env.id, None)
            self.pending[env.receiver] -= 1
        ids = [env.id for env in envs]

        def adopted(future: asyncio.Future) -> None:
            if future.result().error is not None:  # kept here: taken when we die
                log.error("host %s could not hand %d messages to the kernel: %s",
                          self.host.host_id, len(ids), future.result().error.message)
                return
            self.removes.extend(ids)
            self.host.link.wake()

        self.host.link.call("", "ipc.adopt", {"envelopes": [env.to_wire() for env in envs]}
                            ).add_done_callback(adopted)

    def route_via_kernel(self, sender: int, receiver: int, msg_id: str) -> None:
        """``sender`` sends to ``receiver`` (here) through the kernel: what it sent directly
        before goes to the kernel first, and later direct sends wait until ``msg_id``
        arrives, so its messages keep their order, also when redelivered after a crash."""
        self.commit()
        earlier = [e for e in self.inflight.values()
                   if e.sender == sender and e.receiver == receiver]
        if earlier:
            self.adopt(earlier)
        self.gates[(sender, receiver)] = msg_id

    def adopt_handled(self, agent: AgentRuntime, msg_id: str) -> None:
        """The handler of local message ``msg_id`` sends beyond this host: the message and
        what the handler sent so far become the kernel's, to commit with its ack there."""
        self.adopt([self.inflight[msg_id]])
        host = self.host
        for env in self.held.pop(msg_id, []):
            self.pending[env.receiver] -= 1
            args: dict[str, Any] = {"to": env.receiver, "id": env.id.split(":", 1)[1],
                                    "type": env.type, "payload": env.payload}
            for key in ("correlation_id", "reply_to"):
                if getattr(env, key) is not None:
                    args[key] = getattr(env, key)
            if env.type != UNTYPED and env.type not in host.sent_schemas:
                args["schema"] = schema_of(env.type, registry=DEFAULT_REGISTRY)
                host.sent_schemas.add(env.type)
            if self.receiver(env.receiver) is not None:
                self.route_via_kernel(agent.pid, env.receiver, env.id)
            host.link.call(agent.capability, "ipc.send", args, msg_id).add_done_callback(
                lambda f: log_failure(agent, "send", f.result()))

    def hand_over(self, agent: AgentRuntime) -> None:
        """An agent exited: its unhandled local messages go to the kernel, which delivers them
        to its next incarnation or makes them dead letters (before its exit report)."""
        for env in self.held.pop(agent.handling, []) if agent.handling else []:
            self.pending[env.receiver] -= 1  # its handler did not finish
        self.commit()
        mine = [e for e in self.inflight.values() if e.receiver == agent.pid]
        if mine:
            self.adopt(mine)

    # -- gates ------------------------------------------------------------------------
    def arrived(self, msg: Message, receiver: int) -> None:
        """A message came through the kernel: later direct sends of its sender may go."""
        if self.gates and self.gates.get((msg.sender, receiver)) == msg.id:
            del self.gates[(msg.sender, receiver)]

    def spawned(self, pid: int, backlog: dict[int, str]) -> None:
        """What waits in the kernel for a new agent comes before direct sends to it."""
        for key in [k for k in self.gates if k[1] == pid]:
            del self.gates[key]
        for sender, newest in backlog.items():
            self.gates[(sender, pid)] = newest

    def send_failed(self, gate: tuple[int, int] | None, agent: AgentRuntime, msg_id: str) -> None:
        """A send through the kernel failed: it never arrives, so its gate opens."""
        if gate is not None and self.gates.get(gate) == f"{agent.pid}:{msg_id}":
            del self.gates[gate]
