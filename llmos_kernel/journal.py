"""A host's message journal: durable mailboxes for messages between agents of one host.

A message whose sender and receiver run on the same agent host need not cross
to the kernel: the host commits it here (one SQLite transaction per host tick,
in the kernel's state dir) before its sender hears "ok", delivers it from
memory, and deletes it when the receiver's handler finishes — in the same
transaction as what that handler sent to agents of the host, so a crash keeps
both or neither, as in the kernel's store (llmos_kernel.mailbox).

The journal holds only messages not yet handled. Whatever is still in it when
its host dies is taken over by the kernel (:func:`take_over`): it moves the
messages into its own store, in journal order, and deletes the file; the
supervisor then restarts the receivers and the kernel delivers them again. A
kernel that starts takes over every journal it finds (their hosts died with the
kernel before).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from llmos_kernel.errors import Unavailable
from llmos_kernel.mailbox import ENVELOPE_COLUMN_DEFS
from llmos_kernel.mailbox import ENVELOPE_COLUMNS as _COLUMNS
from llmos_kernel.messages import Envelope

JOURNAL_DIR = "journals"  # in the kernel's state dir
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,{ENVELOPE_COLUMN_DEFS}
);
"""


def journal_path(journal_dir: Path, host_id: str) -> Path:
    """The journal of host ``host_id``; its name is the host's (named) actor's."""
    return journal_dir / f"{host_id}.db"


class HostJournal:
    """The open journal of a live host (it alone writes it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise Unavailable(f"cannot open the host journal {self.path}: {e}") from e
        self._db = db

    def commit(self, adds: Sequence[Envelope], removes: Sequence[str]) -> None:
        """In one transaction: keep ``adds`` and forget the handled ``removes``."""
        if not (adds or removes):
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if adds:
                db.executemany(f"INSERT OR IGNORE INTO messages ({_COLUMNS}) "
                               "VALUES (?,?,?,?,?,?,?,?,?,?)", [e.to_wire() for e in adds])
            if removes:
                db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in removes])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


def take_over(path: Path) -> list[Envelope]:
    """The unhandled messages of a dead host's journal, in the order they were committed.

    Raises Unavailable while the host still holds the file (it is not dead after all).
    """
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=2.0)
        try:
            rows = db.execute(f"SELECT {_COLUMNS} FROM messages ORDER BY seq").fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise Unavailable(f"cannot read the host journal {path}: {e}") from e
    return [Envelope(*row) for row in rows]


def remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
