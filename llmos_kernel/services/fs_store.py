"""What the file service records beside the homes: heads, versions, grants and quotas.

One SQLite database (``fs.sqlite``) in WAL mode with ``synchronous=FULL``, outside every
home so no agent can reach it through its files. Each change is one immediate transaction,
so a crash leaves either the old rows or the new ones; the homes reconcile what is on disk
with these rows when they open (``fs_homes``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (
    owner INTEGER, path TEXT, version INTEGER, ino INTEGER, PRIMARY KEY (owner, path));
CREATE TABLE IF NOT EXISTS versions (
    owner INTEGER, path TEXT, version INTEGER, size INTEGER, blob TEXT, saved_at REAL,
    PRIMARY KEY (owner, path, version));
CREATE INDEX IF NOT EXISTS versions_by_age ON versions (owner, saved_at);
CREATE TABLE IF NOT EXISTS grants (
    owner INTEGER, path TEXT, grantee INTEGER, mode TEXT, PRIMARY KEY (owner, path, grantee));
CREATE INDEX IF NOT EXISTS grants_by_grantee ON grants (grantee);
CREATE TABLE IF NOT EXISTS quotas (pid INTEGER PRIMARY KEY, quota_bytes INTEGER);
"""
_PATH_TABLES = ("heads", "versions", "grants")


def _subtree_clause(rel: str) -> tuple[str, tuple]:
    if not rel:
        return "", ()
    return " AND (path = ? OR substr(path, 1, ?) = ?)", (rel, len(rel) + 1, rel + "/")


class Store:
    """Heads, versions, grants and quotas: one SQLite database in WAL mode, outside every home."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if "ino" not in {row[1] for row in self._db.execute("PRAGMA table_info(heads)")}:
            self._db.execute("ALTER TABLE heads ADD COLUMN ino INTEGER")  # stores from 0.1

    def close(self) -> None:
        self._db.close()

    def rows(self, sql: str, *args: object) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def head(self, owner: int, rel: str) -> tuple[int | None, int | None]:
        """A file's current version number and the inode it was written to (None, None if
        the service never wrote it)."""
        found = self.rows(
            "SELECT version, ino FROM heads WHERE owner = ? AND path = ?", owner, rel
        )
        return found[0] if found else (None, None)

    def set_inodes(self, rows: list[tuple[int | None, int, str]]) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE heads SET ino = ? WHERE owner = ? AND path = ?", rows)

    def record_write(
        self, owner: int, rel: str, version: int, ino: int, kept: tuple | None
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO heads (owner, path, version, ino) VALUES (?, ?, ?, ?)",
                (owner, rel, version, ino),
            )
            if kept:
                db.execute(
                    "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                    (owner, rel, *kept, time.time()),
                )

    def versions(self, owner: int, rel: str) -> list[tuple[int, int, str, float]]:
        return self.rows(
            "SELECT version, size, blob, saved_at FROM versions WHERE owner = ? AND path = ?"
            " ORDER BY version",
            owner,
            rel,
        )

    def oldest_versions(self, owner: int) -> list[tuple[str, int, int, str]]:
        return self.rows(
            "SELECT path, version, size, blob FROM versions WHERE owner = ?"
            " ORDER BY saved_at, version",
            owner,
        )

    def version_totals(self, owner: int) -> tuple[int, int]:
        count, size = self.rows(
            "SELECT count(*), coalesce(sum(size), 0) FROM versions WHERE owner = ?", owner
        )[0]
        return count, size

    def drop_version(self, owner: int, rel: str, version: int) -> None:
        with self.transaction() as db:
            db.execute(
                "DELETE FROM versions WHERE owner = ? AND path = ? AND version = ?",
                (owner, rel, version),
            )

    def drop_subtree(self, owner: int, rel: str) -> list[str]:
        """Forget everything recorded at or under ``rel``; returns the version blobs to delete."""
        clause, args = _subtree_clause(rel)
        with self.transaction() as db:
            blobs = db.execute(
                "SELECT blob FROM versions WHERE owner = ?" + clause, (owner, *args)
            ).fetchall()
            for table in _PATH_TABLES:
                db.execute(f"DELETE FROM {table} WHERE owner = ?" + clause, (owner, *args))
        return [blob for (blob,) in blobs]

    def move_subtree(self, owner: int, src: str, dst: str) -> None:
        clause, args = _subtree_clause(src)
        with self.transaction() as db:
            for table in _PATH_TABLES:
                db.execute(
                    f"UPDATE {table} SET path = ? || substr(path, ?) WHERE owner = ?" + clause,
                    (dst, len(src) + 1, owner, *args),
                )

    def forget(self, pid: int) -> None:
        with self.transaction() as db:
            for table in ("heads", "versions", "grants"):
                db.execute(f"DELETE FROM {table} WHERE owner = ?", (pid,))
            db.execute("DELETE FROM grants WHERE grantee = ?", (pid,))
            db.execute("DELETE FROM quotas WHERE pid = ?", (pid,))

    def quota(self, pid: int) -> int | None:
        found = self.rows("SELECT quota_bytes FROM quotas WHERE pid = ?", pid)
        return found[0][0] if found else None

    def set_quota(self, pid: int, quota_bytes: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO quotas VALUES (?, ?)", (pid, quota_bytes))

    def put_grant(self, owner: int, rel: str, grantee: int, mode: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?)", (owner, rel, grantee, mode)
            )

    def delete_grant(self, owner: int, rel: str, grantee: int) -> bool:
        with self.transaction() as db:
            cursor = db.execute(
                "DELETE FROM grants WHERE owner = ? AND path = ? AND grantee = ?",
                (owner, rel, grantee),
            )
            return cursor.rowcount > 0

    def grants_between(self, owner: int, grantee: int) -> list[tuple[str, str]]:
        return self.rows(
            "SELECT path, mode FROM grants WHERE owner = ? AND grantee = ?", owner, grantee
        )

    def grants_of(self, pid: int) -> list[tuple[int, str, int, str]]:
        return self.rows(
            "SELECT owner, path, grantee, mode FROM grants WHERE owner = ? OR grantee = ?"
            " ORDER BY owner, path, grantee",
            pid,
            pid,
        )
