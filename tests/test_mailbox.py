"""The durable mailbox store, on real SQLite files: order, dedup, atomic commits, crashes."""

from __future__ import annotations

import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from llmos_kernel.errors import InvalidArgument, Unavailable
from llmos_kernel.mailbox import MailboxStore
from llmos_kernel.messages import Envelope, encode

PAST, FUTURE = 1.0, 1e12


def env(id: str, sender: int = 1, receiver: int = 2, deadline: float | None = None) -> Envelope:
    return Envelope(id, sender, receiver, "dict", encode({"id": id}), deadline=deadline,
                    timestamp=1_700_000_000.0)


@pytest.fixture
def store(tmp_path):
    with MailboxStore(tmp_path / "mailboxes.db") as s:
        yield s


def ids(messages) -> list[str]:
    return [m.envelope.id for m in messages]


def test_commit_pending_and_ack(store):
    assert store.commit([env("a"), env("b"), env("c", receiver=3)]) == [True, True, True]
    assert ids(store.pending(2)) == ["a", "b"]
    assert store.pending(2)[0].envelope == env("a")
    full = Envelope("f", 1, 4, "t", b"\x00", "corr", "reply", 5.5, 6.5, "topic")
    store.commit([full])
    assert store.pending(4)[0].envelope == full
    assert store.count(2) == 2 and store.receivers_with_pending() == {2: 2, 3: 1, 4: 1}
    assert store.commit([env("d")], acks=["a", "c", "f", "never-sent"]) == [True]
    assert ids(store.pending(2)) == ["b", "d"] and store.receivers_with_pending() == {2: 2}
    first, second = store.pending(2)
    assert first.seq < second.seq
    assert ids(store.pending(2, after_seq=first.seq)) == ["d"]
    assert ids(store.pending(2, limit=1)) == ["b"]
    store.commit(acks=["b", "d", "b"])
    assert store.pending(2) == [] and store.count(2) == 0 and store.receivers_with_pending() == {}


def test_duplicate_ids_are_accepted_once(store):
    assert store.commit([env("a"), env("a"), env("b")]) == [True, False, True]
    assert store.commit([env("a")]) == [False]
    store.commit(acks=["a"])
    assert store.commit([env("a")]) == [False], "an acked id must stay known"
    assert ids(store.pending(2)) == ["b"] and store.count(2) == 1


def test_settled_ids_are_forgotten_after_the_dedup_window(tmp_path):
    with MailboxStore(tmp_path / "m.db", dedup_window=0.05) as store:
        store.commit([env("a")])
        store.commit(acks=["a"])
        assert store.commit([env("a")]) == [False]
        store.commit(acks=["a"])
        time.sleep(0.15)
        assert store.commit([env("a")]) == [True]


@settings(max_examples=60, deadline=None)
@given(
    ticks=st.lists(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), max_size=8),
                   max_size=8),
    page=st.integers(1, 5),
    data=st.data(),
)
def test_order_survives_interleaving_and_acks(ticks, page, data):
    counters: dict[tuple[int, int], itertools.count] = {}
    unacked: list[Envelope] = []
    with tempfile.TemporaryDirectory() as tmp, MailboxStore(Path(tmp, "m.db")) as store:
        for tick in ticks:
            sends = []
            for sender, receiver in tick:
                n = next(counters.setdefault((sender, receiver), itertools.count()))
                sends.append(env(f"{sender}-{receiver}-{n}", sender, receiver))
            acks = data.draw(st.lists(st.sampled_from(unacked), unique_by=lambda e: e.id)) if unacked else []
            store.commit(sends, acks=[e.id for e in acks])
            unacked = [e for e in unacked if e not in acks] + sends
        for receiver in (1, 2, 3):
            got, after = [], 0
            while batch := store.pending(receiver, after_seq=after, limit=page):
                got += batch
                after = batch[-1].seq
            assert [m.seq for m in got] == sorted(m.seq for m in got)
            assert [m.envelope for m in got] == [e for e in unacked if e.receiver == receiver]
            assert store.count(receiver) == len(got)
        everything, after = [], 0
        while batch := store.pending_all(after_seq=after, limit=page):
            everything += batch
            after = batch[-1].seq
        assert [m.envelope for m in everything] == unacked


def test_everything_survives_reopening(tmp_path):
    path = tmp_path / "m.db"
    with MailboxStore(path) as store:
        store.commit([env("a"), env("b", receiver=5), env("c")], acks=[])
        store.commit(acks=["a"], dead=[(env("x", receiver=9), "no such process")])
        store.set_meta("next_pid", 42)
        store.set_meta("hosts", {1: ["h1", b"\x00"]})
        with pytest.raises(InvalidArgument, match="not msgpack-able"):
            store.set_meta("bad", object())
        before = store.pending(2)
    with MailboxStore(path) as store:
        assert store.pending(2) == before
        assert store.receivers_with_pending() == {2: 1, 5: 1}
        assert store.commit([env("a"), env("x"), env("d")]) == [False, False, True]
        assert store.pending(2)[-1].seq > before[-1].seq
        assert [d.envelope.id for d in store.dead_letters()] == ["x"]
        assert store.get_meta("next_pid") == 42 and store.get_meta("missing", 0) == 0
        assert store.get_meta("hosts") == {1: ["h1", b"\x00"]}
    with MailboxStore(path) as store:
        store.commit(acks=["c", "d"])
        assert store.receivers_with_pending() == {5: 1}
    with MailboxStore(path) as store:
        store.commit([env("e")])
        assert store.pending(2)[0].seq > before[-1].seq + 1, "sequence numbers are never reused"


def test_dead_letters(store):
    store.commit([env("a"), env("b"), env("c", receiver=3), env("late", deadline=PAST),
                  env("soon", deadline=FUTURE)])
    assert store.commit(dead=[(env("c", receiver=3), "handler refused"),
                              (env("ghost", receiver=8), "no such process")]) == []
    assert store.receivers_with_pending() == {2: 4}
    assert [e.id for e in store.expire()] == ["late"]
    assert [e.id for e in store.dead_letter(2, "process exited")] == ["a", "b", "soon"]
    assert store.receivers_with_pending() == {} and store.pending(2) == []
    letters = store.dead_letters()
    assert [(d.envelope.id, d.reason) for d in letters] == [
        ("c", "handler refused"), ("ghost", "no such process"), ("late", "deadline passed"),
        ("a", "process exited"), ("b", "process exited"), ("soon", "process exited")]
    assert letters[0].envelope == env("c", receiver=3)
    assert [d.envelope.id for d in store.dead_letters(receiver=3)] == ["c"]
    assert [d.envelope.id for d in store.dead_letters(limit=2)] == ["b", "soon"]
    assert store.commit([env("a"), env("ghost")]) == [False, False]
    store.commit(dead=[(env("a"), "again")])
    assert len(store.dead_letters()) == 6, "a settled id is not buried twice"
    assert store.purge_dead_letters(before=time.time() + 1) == 6 and store.dead_letters() == []


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from llmos_kernel.mailbox import MailboxStore
    from llmos_kernel.messages import Envelope

    store = MailboxStore(Path(sys.argv[1]))
    batch = int(sys.argv[2])
    pending = [m.envelope.id for m in store.pending(1, limit=10 * batch)]
    tick = int(pending[0].split("-")[0]) + 1 if pending else 0
    while True:
        sends = [Envelope(f"{tick}-{i}", 7, 1, "dict", bytes(200)) for i in range(batch)]
        store.commit(sends, acks=pending)
        print(tick, flush=True)
        pending = [e.id for e in sends]
        tick += 1
""")


def test_a_killed_kernel_loses_no_acknowledged_commit_and_keeps_each_whole(tmp_path):
    """SIGKILL the writer at random points of its commits (it spends nearly all its time in
    them); each commit (sends + acks of the previous tick's messages) is then entirely there
    or entirely absent, and every commit the writer saw return is there."""
    path, batch = tmp_path / "m.db", 1000
    rng = random.Random(7)
    for _ in range(10):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(batch)],
                                 stdout=subprocess.PIPE, text=True)
        seen = child.stdout.readline()
        started = time.monotonic()
        seen += child.stdout.readline()
        assert seen.count("\n") == 2, "the writer died on its own"
        time.sleep(rng.uniform(0, 2 * (time.monotonic() - started)))
        os.kill(child.pid, signal.SIGKILL)
        reported = [int(line) for line in (seen + child.communicate()[0]).split()]
        with MailboxStore(path) as store:
            pending = ids(store.pending(1, limit=10 * batch))
            tick = int(pending[0].split("-")[0])
            assert pending == [f"{tick}-{i}" for i in range(batch)]
            assert tick >= reported[-1]
            assert store.receivers_with_pending() == {1: batch}
            assert store.commit([env(f"{tick - 1}-0", 7, 1)]) == [False]
            store.commit(acks=[f"{tick - 1}-0"])


def test_commits_from_several_threads_all_land(store):
    def writer(t: int) -> None:
        for k in range(20):
            store.commit([env(f"{t}-{k}-{i}", t, 2) for i in range(10)],
                         acks=[f"{t}-{k - 1}-{i}" for i in range(5)])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count(2) == 4 * (20 * 10 - 19 * 5) == len(store.pending(2, limit=10_000))


def test_misuse_is_a_typed_error(tmp_path):
    path = tmp_path / "m.db"
    with MailboxStore(path) as store:
        with pytest.raises(Unavailable, match="database is locked; another kernel is using"):
            MailboxStore(path)
        with pytest.raises(InvalidArgument, match="sends takes Envelope items"):
            store.commit([("a", 1, 2)])
        with pytest.raises(InvalidArgument, match=r"acks takes message ids \(str\)"):
            store.commit(acks=[b"a"])
        with pytest.raises(InvalidArgument, match=r"\(Envelope, reason\) pairs"):
            store.commit(dead=[env("a")])
        with pytest.raises(InvalidArgument, match="sender/receiver pids ints"):
            store.commit([Envelope("a", 1, "2", "dict", b"")])
        with pytest.raises(InvalidArgument, match="BLOB column messages.payload"):
            store.commit([env("ok"), Envelope("a", 1, 2, "dict", 3.5)])
        assert store.commit([env("a")]) == [True], "a rejected commit leaves no trace"
        with pytest.raises(InvalidArgument, match="limit must be an int >= 1"):
            store.pending(2, limit=0)
    with pytest.raises(Unavailable, match="closed"):
        store.count(2)
    with pytest.raises(InvalidArgument, match="synchronous must be one of"):
        MailboxStore(path, synchronous="OFF")
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(Unavailable, match="schema version 99"):
        MailboxStore(path)
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(Unavailable, match="cannot open the mailbox store .*not a database"):
        MailboxStore(tmp_path / "junk.db")


class StoreAgainstModel(RuleBasedStateMachine):
    """Random commits, acks, burials and reopenings, checked against a dict-and-set model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name, "m.db")
        self.store = MailboxStore(self.path)
        self.pending: dict[str, Envelope] = {}
        self.settled: set[str] = set()
        self.dead: list[tuple[str, str]] = []

    message_ids = st.sampled_from([f"m{i}" for i in range(12)])
    envelopes = st.builds(env, message_ids, st.integers(1, 2), st.integers(1, 3),
                          st.sampled_from([None, PAST, FUTURE]))

    @rule(sends=st.lists(envelopes, max_size=5), acks=st.lists(message_ids, max_size=4),
          dead=st.lists(st.tuples(envelopes, st.sampled_from(["r1", "r2"])), max_size=2))
    def commit(self, sends, acks, dead):
        expected = []
        for e in sends:
            new = e.id not in self.pending and e.id not in self.settled
            expected.append(new)
            if new:
                self.pending[e.id] = e
        for i in acks:
            if self.pending.pop(i, None) is not None:
                self.settled.add(i)
        for e, reason in dead:
            if e.id not in self.settled:
                self.pending.pop(e.id, None)
                self.settled.add(e.id)
                self.dead.append((e.id, reason))
        assert self.store.commit(sends, acks, dead) == expected

    @rule(receiver=st.integers(1, 3))
    def dead_letter(self, receiver):
        gone = [i for i, e in self.pending.items() if e.receiver == receiver]
        assert sorted(e.id for e in self.store.dead_letter(receiver, "exit")) == sorted(gone)
        self._bury(gone, "exit")

    @rule()
    def expire(self):
        gone = [i for i, e in self.pending.items() if e.deadline == PAST]
        assert [e.id for e in self.store.expire()] == gone
        self._bury(gone, "deadline passed")

    @rule()
    def reopen(self):
        self.store.close()
        self.store = MailboxStore(self.path)

    def _bury(self, gone: list[str], reason: str) -> None:
        for i in gone:
            del self.pending[i]
            self.settled.add(i)
            self.dead.append((i, reason))

    @invariant()
    def mailboxes_match(self):
        by_receiver: dict[int, list[str]] = {}
        for i, e in self.pending.items():
            by_receiver.setdefault(e.receiver, []).append(i)
        assert self.store.receivers_with_pending() == {r: len(v) for r, v in by_receiver.items()}
        for receiver in (1, 2, 3):
            assert ids(self.store.pending(receiver)) == by_receiver.get(receiver, [])
            assert self.store.count(receiver) == len(by_receiver.get(receiver, []))
        assert [(d.envelope.id, d.reason) for d in self.store.dead_letters(limit=1000)] == self.dead

    def teardown(self):
        self.store.close()
        self.dir.cleanup()


TestStoreAgainstModel = StoreAgainstModel.TestCase
TestStoreAgainstModel.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)
