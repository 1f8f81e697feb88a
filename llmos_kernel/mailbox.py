"""Durable mailboxes: every message the kernel accepts, kept in SQLite until handled.

The kernel calls :meth:`MailboxStore.commit` once per host tick with the
messages that host's agents sent and the ids of messages whose handlers
finished. Both go into one transaction (a transactional outbox): a finished
handler's ack and the messages it sent become durable together, so after a
crash a handler is either re-run with nothing of its output recorded, or not
re-run at all. The kernel then pushes what :meth:`MailboxStore.pending_all`
returns past its delivery cursor (calling :meth:`MailboxStore.expire` first, so
messages past their deadline become dead letters instead); :meth:`MailboxStore.pending`
reads one mailbox, e.g. to redeliver it after a host restart.

Guarantees:

* order: one global sequence number, assigned in commit order, orders every
  mailbox; so messages from one sender to one receiver keep their order.
* dedup: a message id is accepted once. Ids of acked or dead-lettered messages
  are remembered for at least ``dedup_window`` seconds (at most twice that), so
  a sender retrying a batch the kernel already committed, and perhaps already
  delivered, is not delivered twice.
* durability: the database is in WAL mode. With ``synchronous="NORMAL"`` (the
  default) a committed transaction survives the kernel process crashing or
  being killed and any restart; a power loss or OS crash may roll back the last
  few transactions (never corrupt the file). ``synchronous="FULL"`` syncs every
  commit to disk and survives power loss too, at a cost in throughput.

The store takes an exclusive lock on its file: one kernel per state dir.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import msgpack

from llmos_kernel.errors import InvalidArgument, Unavailable
from llmos_kernel.messages import Envelope

SCHEMA_VERSION = 1
_SYNC_MODES = ("NORMAL", "FULL", "EXTRA")
ENVELOPE_COLUMNS = ("id, sender, receiver, type, payload, correlation_id, reply_to, deadline, "
                    "timestamp, topic")
# The columns after ``id`` of a table of envelopes (the journal of a host has one too).
ENVELOPE_COLUMN_DEFS = """
    sender INTEGER NOT NULL,
    receiver INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload BLOB NOT NULL,
    correlation_id TEXT,
    reply_to TEXT,
    deadline REAL,
    timestamp REAL NOT NULL,
    topic TEXT"""
_IDS = "(SELECT value FROM json_each(?))"
_SETTLED_AMONG = f"SELECT id FROM settled WHERE generation IN (?, ?) AND id IN {_IDS}"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,{ENVELOPE_COLUMN_DEFS}
) STRICT;
CREATE INDEX IF NOT EXISTS messages_by_receiver ON messages (receiver, seq);
CREATE INDEX IF NOT EXISTS messages_by_deadline ON messages (deadline)
    WHERE deadline IS NOT NULL;
CREATE TABLE IF NOT EXISTS settled (
    generation INTEGER NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (generation, id)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,{ENVELOPE_COLUMN_DEFS},
    reason TEXT NOT NULL,
    died_at REAL NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS dead_letters_by_receiver ON dead_letters (receiver, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS sequence (next INTEGER NOT NULL) STRICT;
INSERT INTO sequence (next) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM sequence);
PRAGMA user_version = {SCHEMA_VERSION};
"""


@dataclass(slots=True)
class StoredMessage:
    """A pending message and its place in the global commit order."""

    seq: int
    envelope: Envelope


@dataclass(slots=True)
class DeadLetter:
    """A message that will never be delivered, and why."""

    seq: int
    envelope: Envelope
    reason: str
    died_at: float


class MailboxStore:
    """The kernel's message log: pending mailboxes, dedup memory, dead letters, metadata."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL",
                 dedup_window: float = 3600.0) -> None:
        if synchronous not in _SYNC_MODES:
            raise InvalidArgument(f"synchronous must be one of {', '.join(_SYNC_MODES)}, "
                                  f"got {synchronous!r}")
        if type(dedup_window) not in (int, float) or not 0 < dedup_window < math.inf:
            raise InvalidArgument(f"dedup_window must be > 0 seconds, got {dedup_window!r}")
        if sqlite3.sqlite_version_info < (3, 37):
            raise Unavailable(f"the mailbox store needs SQLite >= 3.37, this Python has "
                              f"{sqlite3.sqlite_version}")
        self.path = Path(path)
        self.dedup_window = float(dedup_window)
        self._pruned_generation = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=1.0)
        try:
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode.lower() != "wal":
                raise Unavailable(f"{self.path}: cannot switch the database to WAL mode")
            db.execute(f"PRAGMA synchronous = {synchronous}")
            db.execute("PRAGMA cache_size = -16000")
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version not in (0, SCHEMA_VERSION):
                raise Unavailable(f"{self.path} has mailbox schema version {version}; this "
                                  f"llmos reads version {SCHEMA_VERSION}")
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            self._pending: dict[int, int] = dict(
                db.execute("SELECT receiver, COUNT(*) FROM messages GROUP BY receiver")
            )
            (self._next_seq,) = db.execute(
                "SELECT max(next, (SELECT coalesce(max(seq), 0) + 1 FROM messages)) FROM sequence"
            ).fetchone()
        except sqlite3.DatabaseError as e:
            db.close()
            hint = "; another kernel is using this state dir" if "locked" in str(e) else ""
            raise Unavailable(f"cannot open the mailbox store {self.path}: {e}{hint}") from e
        except BaseException:
            db.close()
            raise
        self._db = db

    def commit(
        self,
        sends: Sequence[Envelope] = (),
        acks: Sequence[str] = (),
        dead: Sequence[tuple[Envelope, str]] = (),
    ) -> list[bool]:
        """In one transaction: add ``sends``, settle ``acks``, record ``dead`` letters.

        Returns, per send, whether it was new (False: its id was seen before). Acking an
        unknown or settled id does nothing; a dead letter whose id was already settled is
        dropped; a pending one leaves its mailbox.
        """
        for e in sends:
            _check_envelope(e, "sends")
        for i in acks:
            if type(i) is not str:
                raise InvalidArgument(f"acks takes message ids (str), got {type(i).__name__}")
        for item in dead:
            if not (type(item) is tuple and len(item) == 2 and type(item[1]) is str):
                raise InvalidArgument(f"dead takes (Envelope, reason) pairs, got {item!r:.80}")
            _check_envelope(item[0], "dead")
        if not (sends or acks or dead):
            return []
        with self._lock:
            delta: Counter[int] = Counter()
            with self._transaction() as db:
                now = time.time()
                fresh = self._insert(db, sends, now, delta)
                if acks:
                    acked = self._remove(db, f"id IN {_IDS}", (json.dumps(list(acks)),), "id",
                                         delta)
                    self._settle(db, [row[1] for row in acked], now)
                if dead:
                    self._bury_envelopes(db, dead, now, delta)
                self._prune(db, now)
            self._apply(delta)
        return fresh

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest message committed (0 if none ever was)."""
        return self._next_seq - 1

    def pending(self, receiver: int, *, after_seq: int = 0, limit: int = 1000
                ) -> list[StoredMessage]:
        """Unacked messages for ``receiver`` with seq > ``after_seq``, in commit order."""
        return self._select(receiver, after_seq, limit)

    def pending_all(self, *, after_seq: int = 0, limit: int = 1000) -> list[StoredMessage]:
        """Unacked messages for everyone with seq > ``after_seq``, in commit order: a delivery
        cursor, so each tick pushes only what was committed since the last push."""
        return self._select(None, after_seq, limit)

    def _select(self, receiver: int | None, after_seq: int, limit: int) -> list[StoredMessage]:
        _check_int(limit, "limit", 1)
        _check_int(after_seq, "after_seq", 0)
        where, params = "seq > ?", (after_seq, limit)
        if receiver is not None:
            where, params = "receiver = ? AND seq > ?", (receiver, *params)
        with self._lock:
            rows = self._conn().execute(
                f"SELECT seq, {ENVELOPE_COLUMNS} FROM messages WHERE {where} ORDER BY seq "
                f"LIMIT ?", params,
            ).fetchall()
        return [StoredMessage(row[0], Envelope(*row[1:])) for row in rows]

    def receivers_with_pending(self) -> dict[int, int]:
        with self._lock:
            self._conn()
            return dict(self._pending)

    def newest_per_sender(self, receiver: int) -> dict[int, str]:
        """Per sender, the id of its newest pending message for ``receiver``."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT sender, id FROM messages WHERE seq IN (SELECT max(seq) FROM messages "
                "WHERE receiver = ? GROUP BY sender)", (receiver,)).fetchall()
        return dict(rows)

    def count(self, receiver: int) -> int:
        """Pending messages for ``receiver`` (kept as a counter: O(1))."""
        with self._lock:
            self._conn()
            return self._pending.get(receiver, 0)

    def dead_letter(self, receiver: int, reason: str, *, ids: Sequence[str] | None = None
                    ) -> list[Envelope]:
        """Move ``receiver``'s pending messages (all, or those of ``ids``) to dead letters;
        returns them."""
        if ids is None:
            return self._bury_where("receiver = ?", (receiver,), reason)
        return self._bury_where(f"receiver = ? AND id IN {_IDS}",
                                (receiver, json.dumps(list(ids))), reason)

    def expire(self, now: float | None = None) -> list[Envelope]:
        """Move every pending message whose deadline has passed to dead letters; return them."""
        now = time.time() if now is None else now
        return self._bury_where("deadline IS NOT NULL AND deadline <= ?", (now,),
                                "deadline passed")

    def dead_letters(self, *, receiver: int | None = None, limit: int = 100) -> list[DeadLetter]:
        """The most recent ``limit`` dead letters (of one receiver, or all), oldest first."""
        _check_int(limit, "limit", 1)
        where, params = "", (limit,)
        if receiver is not None:
            where, params = "WHERE receiver = ?", (receiver, limit)
        with self._lock:
            rows = self._conn().execute(
                f"SELECT seq, {ENVELOPE_COLUMNS}, reason, died_at FROM dead_letters {where} "
                f"ORDER BY seq DESC LIMIT ?", params,
            ).fetchall()
        return [DeadLetter(r[0], Envelope(*r[1:11]), r[11], r[12]) for r in reversed(rows)]

    def purge_dead_letters(self, *, before: float) -> int:
        """Forget dead letters that died before ``before`` (epoch seconds); returns how many."""
        with self._lock, self._transaction() as db:
            return db.execute("DELETE FROM dead_letters WHERE died_at < ?", (before,)).rowcount

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else msgpack.unpackb(row[0], raw=False,
                                                           strict_map_key=False)

    def set_meta(self, key: str, value: Any) -> None:
        """Store any msgpack value under ``key``, durably."""
        if type(key) is not str:
            raise InvalidArgument(f"meta keys are str, got {type(key).__name__}")
        try:
            data = msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidArgument(f"meta value for {key!r} is not msgpack-able: {e}") from e
        with self._lock, self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, data))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise Unavailable(f"the mailbox store {self.path} is closed")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError,
                              sqlite3.InterfaceError)):
                raise InvalidArgument(f"the mailbox store rejected a record: {e}") from e
            if isinstance(e, sqlite3.Error):
                raise Unavailable(f"the mailbox store {self.path} failed: {e}") from e
            raise

    def _insert(self, db: sqlite3.Connection, sends: Sequence[Envelope], now: float,
                delta: Counter[int]) -> list[bool]:
        if not sends:
            return []
        ids = json.dumps([e.id for e in sends])
        seen = {row[0] for row in db.execute(
            f"SELECT id FROM messages WHERE id IN {_IDS} "
            f"UNION ALL {_SETTLED_AMONG}", (ids, *self._remembered(now), ids))}
        fresh, new = [], []
        for e in sends:
            is_new = e.id not in seen
            fresh.append(is_new)
            if is_new:
                seen.add(e.id)
                new.append(e)
        seq = self._next_seq
        rows = [(seq + n, e.id, e.sender, e.receiver, e.type, e.payload, e.correlation_id,
                 e.reply_to, e.deadline, e.timestamp, e.topic) for n, e in enumerate(new)]
        seq += len(new)
        delta.update(e.receiver for e in new)
        db.executemany(
            f"INSERT INTO messages (seq, {ENVELOPE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows
        )
        db.execute("UPDATE sequence SET next = ?", (seq,))
        self._next_seq = seq
        return fresh

    def _remove(self, db: sqlite3.Connection, where: str, params: tuple, columns: str,
                delta: Counter[int]) -> list[tuple]:
        """Delete pending messages and count them out; returns (receiver, *columns) rows."""
        rows = db.execute(f"DELETE FROM messages WHERE {where} RETURNING receiver, {columns}",
                          params).fetchall()
        for row in rows:
            delta[row[0]] -= 1
        return rows

    def _settle(self, db: sqlite3.Connection, ids: list[str], now: float) -> None:
        """Remember ids that left the mailboxes, so resends of them are recognised."""
        _, generation = self._remembered(now)
        db.executemany("INSERT OR IGNORE INTO settled (generation, id) VALUES (?, ?)",
                       [(generation, i) for i in ids])

    def _bury_envelopes(self, db: sqlite3.Connection, dead: Sequence[tuple[Envelope, str]],
                        now: float, delta: Counter[int]) -> None:
        ids = json.dumps([e.id for e, _ in dead])
        settled = {row[0] for row in db.execute(
            _SETTLED_AMONG, (*self._remembered(now), ids))}
        rows = []
        for e, reason in dead:
            if e.id not in settled:
                settled.add(e.id)
                rows.append((*e.to_wire(), reason, now))
        self._remove(db, f"id IN {_IDS}", (ids,), "id", delta)
        self._record_dead(db, rows)
        self._settle(db, [row[0] for row in rows], now)

    def _bury_where(self, where: str, params: tuple, reason: str) -> list[Envelope]:
        if type(reason) is not str:
            raise InvalidArgument(f"a dead-letter reason is a str, got {type(reason).__name__}")
        with self._lock:
            delta: Counter[int] = Counter()
            with self._transaction() as db:
                now = time.time()
                rows = [row[1:] for row in
                        self._remove(db, where, params, ENVELOPE_COLUMNS, delta)]
                self._record_dead(db, [(*row, reason, now) for row in rows])
                self._settle(db, [row[0] for row in rows], now)
            self._apply(delta)
        return [Envelope(*row) for row in rows]

    def _record_dead(self, db: sqlite3.Connection, rows: list[tuple]) -> None:
        db.executemany(
            f"INSERT INTO dead_letters ({ENVELOPE_COLUMNS}, reason, died_at) "
            f"VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows,
        )

    def _remembered(self, now: float) -> tuple[int, int]:
        """The generations (``dedup_window`` long) whose settled ids still count: the previous
        one and the current one."""
        current = int(now // self.dedup_window)
        return current - 1, current

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        """Forget settled ids of older generations (once per generation)."""
        oldest, _ = self._remembered(now)
        if oldest > self._pruned_generation:
            db.execute("DELETE FROM settled WHERE generation < ?", (oldest,))
            self._pruned_generation = oldest

    def _apply(self, delta: Counter[int]) -> None:
        for receiver, change in delta.items():
            left = self._pending.get(receiver, 0) + change
            if left:
                self._pending[receiver] = left
            else:
                self._pending.pop(receiver, None)


def _check_envelope(e: Any, name: str) -> None:
    """The fields the store's own bookkeeping relies on; STRICT tables check the rest."""
    if type(e) is not Envelope:
        raise InvalidArgument(f"{name} takes Envelope items, got {type(e).__name__}")
    if type(e.id) is not str or type(e.receiver) is not int or type(e.sender) is not int:
        raise InvalidArgument(f"{name}: envelope id must be a str and sender/receiver pids ints, "
                              f"got {e.id!r:.40}, {e.sender!r:.20}, {e.receiver!r:.20}")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise InvalidArgument(f"{name} must be an int >= {minimum}, got {value!r}")
