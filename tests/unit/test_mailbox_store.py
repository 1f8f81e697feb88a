"""The mailbox store on a real SQLite file in tmp_path: the delivery guarantees agents rely
on, one per test. tests/test_mailbox.py adds crash, thread and model-based checks."""

from __future__ import annotations

import pytest

from llmos_kernel.errors import InvalidArgument
from llmos_kernel.mailbox import MailboxStore
from llmos_kernel.messages import Envelope, encode


def env(id: str, sender: int = 1, receiver: int = 2, deadline: float | None = None) -> Envelope:
    return Envelope(id, sender, receiver, "dict", encode({"id": id}), deadline=deadline,
                    timestamp=1_700_000_000.0)


def ids(messages) -> list[str]:
    return [m.envelope.id for m in messages]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "mailboxes.db"


@pytest.fixture
def store(path):
    with MailboxStore(path) as s:
        yield s


def test_each_sender_to_receiver_stream_keeps_its_order(store):
    store.commit([env("a1", 1), env("b1", 4), env("a2", 1)])
    store.commit([env("b2", 4), env("x", 1, receiver=9)])
    store.commit([env("a3", 1), env("b3", 4)])
    got = store.pending(2)
    assert [m.envelope.id for m in got if m.envelope.sender == 1] == ["a1", "a2", "a3"]
    assert [m.envelope.id for m in got if m.envelope.sender == 4] == ["b1", "b2", "b3"]
    assert [m.seq for m in got] == sorted(m.seq for m in got)
    assert store.newest_per_sender(2) == {1: "a3", 4: "b3"}


def test_a_delivery_cursor_sees_each_new_message_once(store):
    store.commit([env("a"), env("b", receiver=3)])
    first = store.pending_all()
    store.commit([env("c")], acks=["a"])
    assert ids(store.pending_all(after_seq=first[-1].seq)) == ["c"]
    assert store.last_seq == store.pending_all()[-1].seq


def test_a_message_id_is_accepted_once_whatever_became_of_it(store):
    assert store.commit([env("m"), env("m"), env("n"), env("gone")]) == [True, False, True, True]
    assert store.commit([env("m")]) == [False], "still pending"
    store.commit(acks=["m"])
    assert store.commit([env("m")]) == [False], "acked"
    store.dead_letter(2, "receiver exited", ids=["gone"])
    assert store.commit([env("gone")]) == [False], "dead-lettered"
    assert ids(store.pending(2)) == ["n"]


def test_an_ack_removes_that_message_only(store):
    store.commit([env("a"), env("b"), env("c", receiver=3)])
    store.commit(acks=["b", "never-sent"])
    assert ids(store.pending(2)) == ["a"] and ids(store.pending(3)) == ["c"]
    assert store.receivers_with_pending() == {2: 1, 3: 1}


def test_unacked_messages_survive_reopening_and_acked_ones_stay_gone(path):
    with MailboxStore(path) as store:
        store.commit([env("a"), env("b"), env("c")])
        store.commit(acks=["b"])
        last = store.last_seq
    with MailboxStore(path) as store:
        assert ids(store.pending(2)) == ["a", "c"] and store.count(2) == 2
        assert store.commit([env("b"), env("d")]) == [False, True], "dedup survives too"
        assert store.pending(2)[-1].seq > last, "sequence numbers are never reused"


def test_dead_letters_keep_the_message_and_the_reason(store):
    store.commit([env("a"), env("b"), env("c")])
    assert [e.id for e in store.dead_letter(2, "handler crashed 3 times", ids=["b"])] == ["b"]
    store.commit(dead=[(env("z", receiver=7), "no such process")])
    assert ids(store.pending(2)) == ["a", "c"]
    letters = store.dead_letters()
    assert [(d.envelope.id, d.reason) for d in letters] == [
        ("b", "handler crashed 3 times"), ("z", "no such process")]
    assert letters[0].envelope == env("b")
    assert [d.envelope.id for d in store.dead_letters(receiver=7)] == ["z"]


def test_messages_past_their_deadline_expire_into_dead_letters(store):
    store.commit([env("early", deadline=50.0), env("exact", deadline=100.0),
                  env("late", deadline=150.0), env("forever")])
    assert [e.id for e in store.expire(now=100.0)] == ["early", "exact"]
    assert ids(store.pending(2)) == ["late", "forever"]
    assert [e.id for e in store.expire(now=200.0)] == ["late"]
    assert store.expire(now=1e12) == []
    assert {d.reason for d in store.dead_letters()} == {"deadline passed"}
    assert env("x", deadline=100.0).expired(now=100.0) and not env("x").expired(now=1e12)


def test_a_rejected_commit_changes_nothing(store):
    store.commit([env("a")])
    with pytest.raises(InvalidArgument, match="sender/receiver pids ints"):
        store.commit([env("b"), Envelope("c", 1, "2", "dict", b"")], acks=["a"])
    assert ids(store.pending(2)) == ["a"], "neither the good send nor the ack went in"
    assert store.commit([env("b")]) == [True]
