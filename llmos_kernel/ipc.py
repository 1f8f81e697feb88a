"""Message routing: validate, persist, deliver, acknowledge — the ipc syscalls' kernel side.

Within one host batch, every send and acknowledgement is staged and then
committed to the mailbox store in one transaction before any sender hears
"ok"; then new messages are pushed to their receivers' hosts — straight from
memory while a receiver has nothing older waiting, else read back from the
store in order. Messages sent by a handler while it handles message M are
held until M is acknowledged and committed together with that
acknowledgement, so a crash either loses both (M is redelivered, the handler
runs again) or keeps both (never twice). A message whose handler raises is
not redelivered but dead-lettered with the error, so one bad message cannot
crash-loop its receiver; only host and kernel failures redeliver. Message ids are kept per sender (the
kernel prefixes the sender's pid), so one program cannot claim another's.

A call (``reply_to="call"``) that becomes a dead letter — its handler raised, its receiver
exited for good, its deadline passed — is answered at once by the kernel with a
``notices.NoReply`` carrying the call's id, so the caller's ``ipc.call`` raises
CallFailed instead of waiting out its timeout.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument, MessageError, NoSuchProcess, QuotaExceeded
from llmos_kernel.mailbox import MailboxStore
from llmos_kernel.messages import (
    MAX_MESSAGE_BYTES,
    UNTYPED,
    Envelope,
    MessageRegistry,
    check,
    new_message_id,
)
from llmos_kernel.notices import notice
from llmos_kernel.outbox import Outboxes
from llmos_kernel.proctable import Process, ProcessTable

DELIVERY_WINDOW = 512  # unacknowledged messages in flight per receiver
MAX_ID = 200  # characters in a sender-chosen message id
_REPLY_ARGS = ("to", "type", "payload", "schema", "correlation_id", "id")
SCHEMAS_KEY = "schemas"
TOPICS_KEY = "topics"


@dataclass
class _Batch:
    sends: list[Envelope] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    dead: list[tuple[Envelope, str]] = field(default_factory=list)
    adopted: set[str] = field(default_factory=set)  # already delivered by their host
    per_receiver: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class IPCService:
    def __init__(self, store: MailboxStore, table: ProcessTable, outboxes: Outboxes):
        self.store, self.table, self.outboxes = store, table, outboxes
        self.schemas = MessageRegistry()
        for schema in store.get_meta(SCHEMAS_KEY, []):
            self.schemas.register_schema(schema)
        self.topics: dict[str, set[int]] = {
            t: set(pids) for t, pids in store.get_meta(TOPICS_KEY, {}).items()}
        self.held: dict[str, list[Envelope]] = defaultdict(list)  # handled msg id -> its sends
        self.inflight: dict[str, int] = {}  # delivered, unacknowledged msg id -> receiver
        self.window: dict[int, int] = defaultdict(int)  # receiver -> messages in flight
        self.cursor: dict[int, int] = defaultdict(int)  # receiver -> last delivered seq
        self.caught_up: set[int] = set()  # receivers with every committed message pushed
        self.batch = _Batch()
        self.stats = {"sent": 0, "delivered": 0, "acked": 0, "dead": 0, "adopted": 0,
                      "taken_over": 0}

    # -- staging (inside one host batch) ----------------------------------------
    def send(self, sender: Process, args: dict, handling: str | None) -> dict:
        """Validate and stage one message; returns its id (committed at the batch's end)."""
        self._learn_schema(args.get("type"), args.get("schema"))
        receiver = self._receiver(args.get("to"))
        env = self._envelope(sender.pid, receiver.pid, args)
        self._validate_payload(env)
        if not receiver.alive:  # for good: one about to restart is "starting"
            self.batch.dead.append((env, f"process {receiver.pid} has exited"))
            raise NoSuchProcess(f"process {receiver.pid} has exited; the message was "
                                "dead-lettered")
        pending = self.store.count(receiver.pid) + self.batch.per_receiver[receiver.pid]
        if pending >= receiver.quotas.mailbox:
            raise QuotaExceeded(f"the mailbox of process {receiver.pid} is full "
                                f"({receiver.quotas.mailbox} pending messages); retry later")
        self.batch.per_receiver[receiver.pid] += 1
        if handling is not None and args.get("reply_to") != "call" and \
                self.inflight.get(handling) == sender.pid:
            self.held[handling].append(env)
        else:
            self.batch.sends.append(env)
        return {"id": env.id, "to": receiver.pid}

    def publish(self, sender: Process, args: dict, handling: str | None) -> dict:
        topic = args.get("topic")
        if not isinstance(topic, str) or not 0 < len(topic) <= 200:
            raise InvalidArgument("topic must be a non-empty string of at most 200 characters")
        self._learn_schema(args.get("type"), args.get("schema"))
        base = args.get("id") or new_message_id()
        if not isinstance(base, str) or len(base) > MAX_ID - 21:
            raise MessageError(f"message id must be a string of at most {MAX_ID - 21} characters")
        delivered = []
        for pid in sorted(self.topics.get(topic, ())):
            proc = self.table.procs.get(pid)
            if proc is None or not proc.alive or pid == sender.pid:
                continue
            try:
                self.send(sender, {**args, "to": pid, "id": f"{base}/{pid}", "topic": topic,
                                   "schema": None}, handling)
                delivered.append(pid)
            except QuotaExceeded:
                continue  # a full subscriber misses this one; the others still get it
        return {"id": base, "subscribers": delivered}

    def subscribe(self, proc: Process, topic: Any, on: bool) -> None:
        if not isinstance(topic, str) or not 0 < len(topic) <= 200:
            raise InvalidArgument("topic must be a non-empty string of at most 200 characters")
        members = self.topics.setdefault(topic, set())
        (members.add if on else members.discard)(proc.pid)
        self.store.set_meta(TOPICS_KEY, {t: sorted(p) for t, p in self.topics.items() if p})

    def ack(self, proc: Process, msg_id: Any, reply: Any = None) -> dict | None:
        """A handler finished: settle its message, release its held sends and send its reply.

        An ack for a message not in flight to ``proc`` is ignored: a stale one (from before a
        kernel restart; the message is delivered again) or someone else's.
        """
        if not isinstance(msg_id, str):
            raise InvalidArgument("ack takes a message id")
        if self.inflight.get(msg_id) != proc.pid:
            return None
        self.batch.acks.append(msg_id)
        self.batch.sends.extend(self.held.pop(msg_id, ()))
        if reply is None:
            return None
        if not isinstance(reply, dict):
            raise InvalidArgument("a reply is a dict of ipc.send arguments")
        return self.send(proc, {k: v for k, v in reply.items() if k in _REPLY_ARGS}, None)

    def adopt(self, host_id: str, wires: Any) -> int:
        """Take over messages a host kept in its journal (llmos_kernel.journal): they become
        pending here, in the order given. One its receiver holds unhandled on that host
        counts as delivered there (its ack comes here); the host deletes the journal copy
        once this commits. Returns how many it took."""
        if not isinstance(wires, list):
            raise InvalidArgument("ipc.adopt takes a list of envelopes")
        envs = [Envelope.from_wire(w) for w in wires]
        for env in envs:
            receiver = self.table.procs.get(env.receiver)
            if receiver is None or env.sender not in self.table.procs or \
                    not env.id.startswith(f"{env.sender}:") or \
                    host_id not in (receiver.host, self.table.procs[env.sender].host):
                raise InvalidArgument(f"message {env.id!r:.60} is not one this host may hand "
                                      "over")
        self.stats["adopted"] += len(envs)
        for env in envs:
            receiver = self.table.procs[env.receiver]
            self.batch.sends.append(env)
            if receiver.host == host_id and receiver.status == "running" and \
                    env.id not in self.inflight:
                self.batch.adopted.add(env.id)
                self.inflight[env.id] = receiver.pid
                self.window[receiver.pid] += 1
        return len(envs)

    def take_over(self, envs: list[Envelope]) -> None:
        """A dead host's journal: its messages join the mailboxes, after what is here."""
        self.stats["taken_over"] += len(envs)
        self.batch.sends.extend(envs)
        self.commit()
        for pid in {env.receiver for env in envs}:
            proc = self.table.procs.get(pid)
            if proc is None or proc.status == "exited":
                reason = f"process {pid} has exited"
                self.no_reply(self.store.dead_letter(pid, reason), reason)

    def backlog(self, pid: int) -> dict[int, str]:
        """Per sender, the id of its newest message pending for ``pid``."""
        return self.store.newest_per_sender(pid)

    def _receiver(self, to: Any) -> Process:
        if isinstance(to, bool) or not isinstance(to, int | str):
            raise InvalidArgument(f"send to a pid (int) or a process name (str), got {to!r}")
        return self.table.find(to)

    def _envelope(self, sender: int, receiver: int, args: dict) -> Envelope:
        """The stored envelope; a sender-chosen id is kept apart from other senders' ids."""
        payload = args.get("payload")
        if not isinstance(payload, bytes):
            raise MessageError("payload must be msgpack bytes (use syscalls.ipc.send)")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise MessageError(f"message of {len(payload)} bytes exceeds the "
                               f"{MAX_MESSAGE_BYTES}-byte limit")
        given = args.get("id")
        if given is None:
            given = new_message_id()
        elif not isinstance(given, str) or not 0 < len(given) <= MAX_ID:
            raise MessageError(f"message id must be a non-empty string of at most {MAX_ID} "
                               f"characters, got {given!r:.60}")
        wire = [f"{sender}:{given}", sender, receiver, args.get("type"), payload,
                args.get("correlation_id"), args.get("reply_to"), args.get("deadline"),
                time.time(), args.get("topic")]
        return Envelope.from_wire(wire)

    def _learn_schema(self, type_: Any, schema: Any) -> None:
        """A sender declares a message type the first time its host sends one."""
        if schema is None:
            return
        if not isinstance(schema, dict) or schema.get("name") != type_:
            raise MessageError(f"the schema sent with a {type_!r} message describes "
                               f"{schema.get('name') if isinstance(schema, dict) else schema!r}")
        if type_ not in self.schemas:
            self.schemas.register_schema(schema)
            self.store.set_meta(SCHEMAS_KEY, [self.schemas.schema(n) for n in self.schemas.names()])

    def _validate_payload(self, env: Envelope) -> None:
        """The payload decodes, against its type's schema, as a message of the type it is
        sent as; else it becomes a dead letter and the sender gets the MessageError."""
        try:
            if env.type != UNTYPED and env.type not in self.schemas:
                raise MessageError(f"unknown message type {env.type!r}: declare it with "
                                   "@message in the sending program")
            tag = check(env.payload, registry=self.schemas)
            if tag != env.type:
                raise MessageError(f"the payload is a {tag} message but was sent as {env.type}")
        except MessageError as error:
            self.batch.dead.append((env, str(error)))
            raise

    # -- commit and delivery ----------------------------------------------------
    def commit(self) -> None:
        """Persist the staged batch in one transaction, then push new messages to hosts."""
        batch, self.batch = self.batch, _Batch()
        if not (batch.sends or batch.acks or batch.dead):
            return
        fresh = self.store.commit(batch.sends, batch.acks, batch.dead)
        new = [env for env, is_new in zip(batch.sends, fresh, strict=True) if is_new]
        self.stats["sent"] += len(new)
        self.stats["acked"] += len(batch.acks)
        self.stats["dead"] += len(batch.dead)
        freed = set()
        for msg_id in batch.acks:
            pid = self.inflight.pop(msg_id, None)
            if pid is not None:
                self.window[pid] -= 1
                freed.add(pid)
        for seq, env in enumerate(new, self.store.last_seq - len(new) + 1):
            if env.id in batch.adopted:  # its host delivered it already
                if env.receiver in self.caught_up:
                    self.cursor[env.receiver] = seq
                continue
            self._push(env, seq)
        for pid in freed - self.caught_up:
            self.pump(pid)

    def _push(self, env: Envelope, seq: int) -> None:
        """Deliver a just-committed message straight away if nothing older waits before it."""
        pid = env.receiver
        if pid not in self.caught_up:
            return
        proc = self.table.procs.get(pid)
        if proc is None or proc.status != "running" or proc.host is None or \
                self.window[pid] >= DELIVERY_WINDOW:
            self.caught_up.discard(pid)
            return
        self._deliver(proc, env, seq)

    def _deliver(self, proc: Process, env: Envelope, seq: int) -> None:
        self.cursor[proc.pid] = seq
        self.inflight[env.id] = proc.pid
        self.window[proc.pid] += 1
        self.stats["delivered"] += 1
        self.outboxes.put(proc.host, wire.Deliver(proc.pid, env.to_wire()))

    def pump(self, pid: int) -> None:
        """Deliver pending messages from the store to a running receiver, up to its window."""
        proc = self.table.procs.get(pid)
        if proc is None or proc.status != "running" or proc.host is None:
            self.caught_up.discard(pid)
            return
        room = DELIVERY_WINDOW - self.window[pid]
        if room <= 0:
            return
        rows = self.store.pending(pid, after_seq=self.cursor[pid], limit=room)
        for stored in rows:
            self._deliver(proc, stored.envelope, stored.seq)
        if len(rows) < room:
            self.caught_up.add(pid)

    def pump_all(self) -> None:
        for pid in self.store.receivers_with_pending():
            if pid not in self.caught_up and self.window[pid] < DELIVERY_WINDOW // 2:
                self.pump(pid)

    def reject(self, pid: int, msg_id: Any, reason: str) -> None:
        """The handler of ``msg_id`` raised: the message becomes a dead letter instead of
        being delivered again (it would crash every restart of its receiver)."""
        if isinstance(msg_id, str) and self.inflight.get(msg_id) == pid:
            self.no_reply(self.store.dead_letter(pid, reason, ids=[msg_id]), reason)

    def expire(self) -> list[Envelope]:
        """Messages past their deadline become dead letters (calls among them are answered
        with NoReply); returns them."""
        expired = self.store.expire()
        self.no_reply(expired, "its deadline passed")
        return expired

    def no_reply(self, dead: list[Envelope], reason: str) -> None:
        """The calls among ``dead`` (just dead-lettered) will never be answered: stage a
        NoReply for each caller still alive, from the kernel, with the call's id."""
        for env in dead:
            if env.reply_to == "call":
                self._no_reply(env.sender, env.receiver, env.id, reason)

    def unanswered(self, pid: int, calls: list[tuple[int, str]], reason: str) -> None:
        """Process ``pid`` ended having acknowledged ``calls`` (caller, call id) without
        answering them (its host kept count): their callers still alive hear so now."""
        for caller, call_id in calls[:wire.MAX_UNANSWERED]:
            if len(call_id) <= 2 * MAX_ID:  # "sender:id"
                self._no_reply(caller, pid, call_id, reason)

    def _no_reply(self, caller: int, receiver: int, call_id: str, reason: str) -> None:
        proc = self.table.procs.get(caller)
        if proc is not None and proc.alive:
            self.batch.sends.append(notice("NoReply", {"pid": receiver, "reason": reason},
                                           caller, correlation_id=call_id))

    def forget_deliveries(self, pid: int) -> None:
        """The receiver's host is gone: its unacknowledged messages will be delivered again,
        and what its unfinished handlers sent is dropped with them."""
        for msg_id in [m for m, p in self.inflight.items() if p == pid]:
            del self.inflight[msg_id]
            self.held.pop(msg_id, None)
        self.window[pid] = 0
        self.cursor[pid] = 0
        self.caught_up.discard(pid)

    def bury(self, pid: int, reason: str) -> int:
        """The process is gone for good: its pending messages become dead letters (after the
        staged batch is committed: its last acks settle what it did handle)."""
        self.commit()
        self.forget_deliveries(pid)
        for topic in self.topics.values():
            topic.discard(pid)
        dead = self.store.dead_letter(pid, reason)
        self.no_reply(dead, reason)
        return len(dead)
