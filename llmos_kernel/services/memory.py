"""Long-term memory for agents: texts kept with metadata and found again by meaning.

Each pid has its own memories and never sees another's: every statement is scoped by the
pid the kernel vouches for, and another pid's item id reads exactly like a missing one. One
SQLite file keeps them across restarts: the text, the metadata as JSON and the embedding as
a float32 blob (WAL, synchronous=NORMAL: a committed memory survives a kernel crash; a power
cut may lose the last few). The store takes an exclusive lock on its file (one kernel per
state dir), so the in-memory matrices below can never go stale.

Search is exact and brute force: a pid's unit vectors sit in one numpy matrix, loaded on
first use, and a query is one matrix-vector product and a partial sort. At the per-pid cap
(100,000 × 384 float32) that is one pass over the matrix; an approximate index (HNSW,
IVF) would only trade recall for speed nobody needs at this scale.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import numpy as np

from llmos_kernel.errors import InvalidArgument, NotFound, QuotaExceeded, Unavailable

MAX_K = 1000
SCHEMA_VERSION = 1
_IDS = "(SELECT value FROM json_each(?))"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS memories (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    pid INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created REAL NOT NULL,
    vector BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS memories_by_pid ON memories (pid, seq);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
PRAGMA user_version = {SCHEMA_VERSION};
"""

Embed = Callable[[list[str]], np.ndarray]
"""Texts in, one embedding per text out (``[n, dim]``); the store normalises the rows."""


@dataclass
class MemoryItem:
    """One memory; ``score`` is its cosine similarity to the query, in search results only."""

    id: str
    text: str
    metadata: dict
    created: float
    score: float | None = None


@dataclass
class _PidMatrix:
    """One pid's unit vectors (rows ``[0, len(ids))`` of a buffer that grows by doubling),
    their ids, and each item's metadata values as canonical JSON, for ``where`` filters."""

    vectors: np.ndarray
    ids: list[str] = field(default_factory=list)
    fields: list[dict[str, str]] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)

    def append(self, item_id: str, vector: np.ndarray, fields: dict[str, str]) -> None:
        n = len(self.ids)
        if n == len(self.vectors):
            grown = np.empty((max(64, 2 * n), self.vectors.shape[1]), dtype=np.float32)
            grown[:n] = self.vectors[:n]
            self.vectors = grown
        self.vectors[n] = vector
        self.ids.append(item_id)
        self.fields.append(fields)
        self.rows[item_id] = n

    def remove(self, item_id: str) -> None:
        """Move the last row into the removed one's place."""
        row, last = self.rows.pop(item_id), len(self.ids) - 1
        if row != last:
            moved = self.ids[last]
            self.vectors[row], self.ids[row], self.fields[row] = (
                self.vectors[last], moved, self.fields[last])
            self.rows[moved] = row
        self.ids.pop()
        self.fields.pop()


class MemoryStore:
    """Every agent's long-term memory, in one SQLite file, searched by cosine similarity."""

    def __init__(self, path: Path, embed: Embed, *, max_items_per_pid: int = 100_000,
                 max_text_bytes: int = 64 * 1024) -> None:
        for name, value in (("max_items_per_pid", max_items_per_pid),
                            ("max_text_bytes", max_text_bytes)):
            if type(value) is not int or value < 1:
                raise InvalidArgument(f"{name} must be an int >= 1, got {value!r}")
        self.path = Path(path)
        self.max_items_per_pid = max_items_per_pid
        self.max_text_bytes = max_text_bytes
        self._embed_texts = embed
        self.dim = int(np.asarray(embed(["what size are these embeddings?"])).shape[-1])
        self._lock = threading.Lock()
        self._matrices: dict[int, _PidMatrix] = {}
        self._db: sqlite3.Connection | None = self._open()

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=1.0)
        try:
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode.lower() != "wal":
                raise Unavailable(f"{self.path}: cannot switch the database to WAL mode")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit survives a kernel crash
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version not in (0, SCHEMA_VERSION):
                raise Unavailable(f"{self.path} has memory schema version {version}; this "
                                  f"llmos reads version {SCHEMA_VERSION}")
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} "
                             f"INSERT OR IGNORE INTO settings VALUES ('dim', {self.dim}); COMMIT;")
            (dim,) = db.execute("SELECT value FROM settings WHERE key = 'dim'").fetchone()
        except sqlite3.DatabaseError as e:
            db.close()
            hint = "; another kernel is using this state dir" if "locked" in str(e) else ""
            raise Unavailable(f"cannot open the memory store {self.path}: {e}{hint}") from e
        except BaseException:
            db.close()
            raise
        if dim != self.dim:
            db.close()
            raise InvalidArgument(f"{self.path} holds {dim}-dimensional embeddings but embed "
                                  f"gives {self.dim}; open it with the embedder that wrote it")
        return db

    def add(self, pid: int, text: str, metadata: dict | None = None) -> MemoryItem:
        """Remember ``text`` for ``pid``, with JSON ``metadata`` to filter on later."""
        return self.add_many(pid, [(text, metadata)])[0]

    def add_many(self, pid: int, items: list[tuple[str, dict | None]]) -> list[MemoryItem]:
        """Remember several texts in one embedding batch and one transaction: all or none."""
        _check_pid(pid)
        if type(items) is not list:
            raise InvalidArgument(f"items must be a list of (text, metadata) pairs, "
                                  f"got {type(items).__name__}")
        prepared = []
        for i, item in enumerate(items):
            if type(item) not in (tuple, list) or len(item) != 2:
                raise InvalidArgument(f"items[{i}] must be a (text, metadata) pair, got "
                                      f"{item!r:.80}")
            self._check_text(item[0], f"items[{i}] text")
            prepared.append((item[0], *_encode_metadata(item[1], self.max_text_bytes)))
        if not prepared:
            return []
        with self._lock:
            self._check_quota(pid, len(prepared))
        vectors = self._embed([text for text, _, _ in prepared])
        now = time.time()
        added = [MemoryItem(uuid.uuid4().hex, text, json.loads(encoded), now)
                 for text, encoded, _ in prepared]
        with self._lock:
            with self._transaction() as db:
                self._check_quota(pid, len(prepared))
                db.executemany(
                    "INSERT INTO memories (id, pid, text, metadata, created, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(item.id, pid, item.text, encoded, now, vector.tobytes())
                     for item, (_, encoded, _), vector in zip(added, prepared, vectors)])
            if (matrix := self._matrices.get(pid)) is not None:
                for item, (_, _, fields), vector in zip(added, prepared, vectors):
                    matrix.append(item.id, vector, fields)
        return added

    def search(self, pid: int, query: str, k: int = 5, *,
               where: dict | None = None) -> list[MemoryItem]:
        """``pid``'s ``k`` memories most similar to ``query``, best first, with their scores.

        ``where`` keeps only items whose metadata has each of its keys with an equal JSON
        value (``1`` matches ``1``, not ``1.0`` or ``true``).
        """
        _check_pid(pid)
        self._check_text(query, "query")
        if type(k) is not int or not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k must be an int from 1 to {MAX_K}, got {k!r}")
        wanted = _encode_metadata(where, self.max_text_bytes, "where")[1].items()
        vector = self._embed([query])[0]
        with self._lock:
            matrix = self._matrix(pid)
            candidates, rows = matrix.vectors[:len(matrix.ids)], np.arange(len(matrix.ids))
            if wanted:
                rows = np.flatnonzero([wanted <= fields.items() for fields in matrix.fields])
                candidates = candidates[rows]
            scores = candidates @ vector
            best = np.argpartition(-scores, k - 1)[:k] if len(rows) > k else np.arange(len(rows))
            best = best[np.argsort(-scores[best], kind="stable")]
            ranked = {matrix.ids[rows[i]]: float(scores[i]) for i in best}
            found = {item.id: item for item in self._items(pid, list(ranked))}
        return [replace(found[item_id], score=score) for item_id, score in ranked.items()]

    def get(self, pid: int, item_id: str) -> MemoryItem:
        """One of ``pid``'s memories; NotFound for an id it does not own."""
        _check_pid(pid)
        _check_id(item_id)
        with self._lock:
            items = self._items(pid, [item_id])
        if not items:
            raise NotFound(f"no memory with id {item_id!r}")
        return items[0]

    def delete(self, pid: int, item_id: str) -> None:
        """Forget one of ``pid``'s memories; NotFound for an id it does not own."""
        _check_pid(pid)
        _check_id(item_id)
        with self._lock:
            with self._transaction() as db:
                deleted = db.execute("DELETE FROM memories WHERE pid = ? AND id = ?",
                                     (pid, item_id)).rowcount
            if not deleted:
                raise NotFound(f"no memory with id {item_id!r}")
            matrix = self._matrices.get(pid)
            if matrix is not None:
                matrix.remove(item_id)

    def count(self, pid: int) -> int:
        _check_pid(pid)
        with self._lock:
            return self._count(pid)

    def clear(self, pid: int) -> int:
        """Forget all of ``pid``'s memories; returns how many there were."""
        _check_pid(pid)
        with self._lock:
            with self._transaction() as db:
                cleared = db.execute("DELETE FROM memories WHERE pid = ?", (pid,)).rowcount
            self._matrices.pop(pid, None)
        return cleared

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._matrices.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_text(self, text: object, what: str) -> None:
        if type(text) is not str:
            raise InvalidArgument(f"{what} must be a str, got {type(text).__name__}")
        if not text.strip():
            raise InvalidArgument(f"{what} is empty; give some text")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"{what} is not valid Unicode: {e}") from None
        if size > self.max_text_bytes:
            raise InvalidArgument(f"{what} is {size:,} bytes of UTF-8, over the limit of "
                                  f"{self.max_text_bytes:,}; split it into smaller memories")

    def _check_quota(self, pid: int, adding: int) -> None:
        held = self._count(pid)
        if held + adding > self.max_items_per_pid:
            raise QuotaExceeded(f"pid {pid} holds {held:,} memories and may hold "
                                f"{self.max_items_per_pid:,}; cannot add {adding:,} more. "
                                "Delete or clear some first")

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Unit float32 rows; InvalidArgument when the embedder breaks its contract."""
        vectors = np.asarray(self._embed_texts(texts), dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise InvalidArgument(f"embed gave shape {vectors.shape} for {len(texts)} texts; "
                                  f"expected ({len(texts)}, {self.dim})")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms) & (norms > 0)):
            raise InvalidArgument("embed gave a zero or non-finite vector")
        return vectors / norms

    def _matrix(self, pid: int) -> _PidMatrix:
        if (matrix := self._matrices.get(pid)) is None:
            rows = self._conn().execute(
                "SELECT id, metadata, vector FROM memories WHERE pid = ? ORDER BY seq", (pid,)
            ).fetchall()
            vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
            matrix = _PidMatrix(vectors.reshape(len(rows), self.dim).copy(),
                                [r[0] for r in rows],
                                [_fields(json.loads(r[1])) for r in rows],
                                {r[0]: i for i, r in enumerate(rows)})
            self._matrices[pid] = matrix
        return matrix

    def _items(self, pid: int, ids: list[str]) -> list[MemoryItem]:
        rows = self._conn().execute(
            f"SELECT id, text, metadata, created FROM memories WHERE pid = ? AND id IN {_IDS}",
            (pid, json.dumps(ids)))
        return [MemoryItem(i, text, json.loads(metadata), created)
                for i, text, metadata, created in rows]

    def _count(self, pid: int) -> int:
        if (matrix := self._matrices.get(pid)) is not None:
            return len(matrix.ids)
        (n,) = self._conn().execute("SELECT COUNT(*) FROM memories WHERE pid = ?",
                                    (pid,)).fetchone()
        return n

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise Unavailable(f"the memory store {self.path} is closed")
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
            if isinstance(e, sqlite3.Error):
                raise Unavailable(f"the memory store {self.path} failed: {e}") from e
            raise


def _check_pid(pid: object) -> None:
    if type(pid) is not int or pid < 0:
        raise InvalidArgument(f"pid must be an int >= 0, got {pid!r}")


def _check_id(item_id: object) -> None:
    if type(item_id) is not str:
        raise InvalidArgument(f"a memory id is a str, got {type(item_id).__name__}")


def _encode_metadata(metadata: object, max_bytes: int,
                     what: str = "metadata") -> tuple[str, dict[str, str]]:
    """Metadata as stored (JSON text) and as filtered on (each value as canonical JSON).

    Only what survives a JSON round trip unchanged is accepted: dicts with str keys, lists,
    str, finite numbers, bools and None.
    """
    if metadata is None:
        metadata = {}
    if type(metadata) is not dict:
        raise InvalidArgument(f"{what} must be a dict, got {type(metadata).__name__}")
    try:
        encoded = json.dumps(metadata, allow_nan=False)
        faithful = json.loads(encoded) == metadata
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidArgument(f"{what} must be JSON: {e}") from None
    if not faithful:
        raise InvalidArgument(f"{what} must be JSON (dicts with str keys, lists, str, numbers, "
                              f"bools, None); got {metadata!r:.120}")
    if len(encoded) > max_bytes:
        raise InvalidArgument(f"{what} is {len(encoded):,} bytes as JSON, over the limit of "
                              f"{max_bytes:,}")
    return encoded, _fields(metadata)


def _fields(metadata: dict[str, Any]) -> dict[str, str]:
    return {key: json.dumps(value, sort_keys=True) for key, value in metadata.items()}


class MemoryService:
    """The kernel's memory store, opened on first use: its embedding model loads off the
    event loop, once, and a failed load is tried again by the next caller."""

    def __init__(self, path: Path, model: str):
        self.path, self.model = path, model
        self._store: asyncio.Future[MemoryStore] | None = None
        self._embedder = None

    async def store(self) -> MemoryStore:
        if self._store is None or (self._store.done() and self._store.exception()):
            self._store = asyncio.ensure_future(asyncio.to_thread(self._open))
        return await asyncio.shield(self._store)

    def _open(self) -> MemoryStore:
        from llmos_kernel.core.embedder import Embedder

        self._embedder = Embedder.load(self.model)
        return MemoryStore(self.path, self._embedder.embed)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Unit sentence embeddings from the store's model, computed off the loop."""
        await self.store()
        return (await asyncio.to_thread(self._embedder.embed, texts)).tolist()
